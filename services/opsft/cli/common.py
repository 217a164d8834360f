"""Flags shared by several subcommands, and small output helpers."""

from __future__ import annotations

import json
import sys
import time

from opsft.engines import KINDS


def add_model_flags(parser) -> None:
    parser.add_argument("--model", help="local HF folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--config", help="YAML config; flags given on the command line override it")


def add_engine_flags(parser) -> None:
    parser.add_argument("--engine", choices=KINDS, help="model runner (default hf)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="engine dtype (default: float32 for hf, bfloat16 for vllm on a GPU)")
    parser.add_argument("--batch-size", type=int, help="rows per forward pass")


def engine_overrides(args) -> dict:
    return {"engine.model": args.model, "engine.kind": args.engine, "engine.dtype": args.dtype,
            "engine.max_batch_size": args.batch_size}


class Progress:
    """A one-line progress report on stderr (done/total, rate, ETA), at most every `every` s."""

    def __init__(self, total: int, label: str, unit: str = "rows", every: float = 2.0):
        self.total, self.label, self.unit, self.every = total, label, unit, every
        self.start = self.last = time.monotonic()
        self.done = 0

    def to(self, done: int, total: int) -> None:
        """Report an absolute position (done of total)."""
        self.total = total
        self.update(done - self.done)

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.label}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s, eta {eta:.0f}s)",
                  file=sys.stderr, flush=True)


def print_summary(title: str, data: dict) -> None:
    print(f"== {title}")
    print(json.dumps(data, indent=2, default=str))
