"""Flags shared by several subcommands, flags derived from config settings, and small output helpers."""

from __future__ import annotations

import json
import sys
import time
import types
import typing


class Settings:
    """Command-line flags that set config settings. Each flag's type, choices and help (the setting's
    description and default) come from its pydantic field in opsft.config, where they are written once;
    `overrides(args)` gives the dotted keys load_config applies (None: not given).

        flags = Settings(RewriteConfig)
        flags.add(parser, "lambda_mode")                  # --lambda-mode {linear,sigmoid,piecewise}
        cfg = load_config(RewriteConfig, path, flags.overrides(args))
    """

    def __init__(self, model):
        self.model, self.keys = model, {}

    def add(self, parser, key: str, flag: str | None = None, *, field: tuple | None = None, help: str | None = None,
            **kwargs) -> None:
        """--flag (default: --key with dashes) for the setting `key` (dotted: engine.dtype); `field`: (model,
        name) of the field when the key passes through a dict (stages.hinted-decoding.engine.kind)."""
        info = field_info(self.model, key) if field is None else field[0].model_fields[field[1]]
        kind, choices = flag_type(info.annotation, key)
        text = help or info.description or ""
        default = info.get_default(call_default_factory=True)
        if not (default is None or default is False or default == ""):
            text = f"{text} (default {default})".strip()
        flag = flag or "--" + key.rsplit(".", 1)[-1].replace("_", "-")
        text = text.replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            action = parser.add_argument(flag, action="store_true", default=None, help=text, **kwargs)
        else:
            action = parser.add_argument(flag, type=kind, choices=choices, help=text, **kwargs)
        self.keys[action.dest] = key

    def overrides(self, args) -> dict:
        return {key: getattr(args, dest) for dest, key in self.keys.items()}


def field_info(model, key: str):
    """The pydantic FieldInfo of a dotted key of a config model (engine.dtype: EngineConfig.dtype)."""
    *path, name = key.split(".")
    for part in path:
        model = model.model_fields[part].annotation
    return model.model_fields[name]


def flag_type(annotation, key: str) -> tuple[type, tuple | None]:
    """(argparse type, choices) of a setting's annotation: int, float, str, bool, a Literal of strings,
    each optionally `| None`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"{key}: a flag needs one type, got {annotation}")
        return flag_type(options[0], key)
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0]), args
    if annotation in (int, float, str, bool):
        return annotation, None
    raise TypeError(f"{key}: no flag type for {annotation}")


def add_model_flags(parser) -> None:
    parser.add_argument("--model", help="local HF folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--config", help="YAML config; flags given on the command line override it")


def add_engine_flags(parser, flags: Settings) -> None:
    """--engine, --dtype and --batch-size of the config's `engine` (flags: the command's Settings)."""
    flags.add(parser, "engine.kind", "--engine")
    flags.add(parser, "engine.dtype")
    flags.add(parser, "engine.max_batch_size", "--batch-size")


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
