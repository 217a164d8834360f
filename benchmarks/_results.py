"""Recording a benchmark's headline figures for `make bench` (benchmarks/_collect.py).

A benchmark prints its figures as before and also hands each headline figure to a Recorder:

    rec = Recorder("serve_load", args)
    rec.figure("req/s, batching on, 16 clients", on, "req/s", baseline=("batching off", off),
               goal=(">=", 2.0, "serve_load.py docstring"))

Each figure carries its value and unit, the baseline it is compared against (name, value),
the ratio value / baseline, the goal on that ratio where an issue or doc sets one (and
whether it was met), and the exact command and settings of the run. When the environment
variable OPSFT_BENCH_OUT names a file (the collector sets it), every figure is appended to it
as one JSON line; without it a standalone run just prints, as before.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import shlex
import sys
from pathlib import Path

OUT_ENV = "OPSFT_BENCH_OUT"
ROOT = Path(__file__).resolve().parents[1]
GOAL_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def make_figure(benchmark: str, name: str, value: float | None, unit: str, *,
                baseline: tuple[str, float] | None = None, goal: tuple[str, float, str] | None = None,
                note: str | None = None, command: str = "", settings: dict | None = None) -> dict:
    """One figure as a JSON-ready dict. goal = (op, ratio, where the goal is set), on the ratio
    value / baseline value; `met` is None when there is no goal or no ratio."""
    value = None if value is None else float(value)
    base = None if baseline is None else {"name": baseline[0], "value": float(baseline[1])}
    ratio = value / base["value"] if value is not None and base and base["value"] else None
    goal_d, met = None, None
    if goal is not None:
        op, target, source = goal
        if op not in GOAL_OPS:
            raise ValueError(f"goal operator {op!r}: use one of {sorted(GOAL_OPS)}")
        goal_d = {"op": op, "ratio": float(target), "source": source}
        met = None if ratio is None else bool(GOAL_OPS[op](ratio, target))
    return {"benchmark": benchmark, "name": name, "value": value, "unit": unit, "baseline": base,
            "ratio": ratio, "goal": goal_d, "met": met, "note": note, "command": command,
            "settings": settings or {}}


def this_command() -> str:
    """The command line that ran this script, with the script's path relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


class Recorder:
    """Collects one benchmark's figures; writes them to $OPSFT_BENCH_OUT when it is set."""

    def __init__(self, benchmark: str, settings: argparse.Namespace | dict, out: str | None = None):
        self.benchmark = benchmark
        self.settings = dict(vars(settings) if isinstance(settings, argparse.Namespace) else settings)
        self.command = this_command()
        self.path = out if out is not None else os.environ.get(OUT_ENV)
        self.figures: list[dict] = []

    def figure(self, name: str, value: float | None, unit: str, *, baseline: tuple[str, float] | None = None,
               goal: tuple[str, float, str] | None = None, note: str | None = None) -> dict:
        fig = make_figure(self.benchmark, name, value, unit, baseline=baseline, goal=goal, note=note,
                          command=self.command, settings=self.settings)
        self.figures.append(fig)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(fig, default=str) + "\n")
        return fig

    def skipped(self, name: str, unit: str, reason: str) -> dict:
        """A figure that was not measured in this run (e.g. its engine is not installed)."""
        return self.figure(name, None, unit, note=f"skipped: {reason}")
