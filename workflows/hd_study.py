"""The hinted-decoding settings study across task families (docs/hinted_decoding.md).

    .venv/bin/python workflows/hd_study.py [--rows 16] [--families sums differences products friends]
        [--settings default direct ...] [--output runs/hd_study]

For each family of opsft.data.datasets.FAMILIES (reasoning-gym tasks the embedded model partly
does, each with off-policy worked solutions in a style of its own) and each setting, rewrites the
same rows with `opsft rewrite`'s recipe (policy self-first, in this process, one engine for all)
and prints one table row per family and setting, and one per setting over all families:
- `hd / self / original`: rows rewritten by hinted decoding / kept as the model's own verified
  answer / kept as their reference;
- verified: the share of rows whose written response verifies;
- mean CLL under the base model of the rows hinted decoding rewrote, and of all rows;
- what hinted decoding ended with (the summary's `hinted_decoding` outcomes): empty outputs,
  runaways (max_length + repetition), stops at a hint header, hints with no usable analysis
  (forced or no_hint).
Each run's rows go to <output>/<family>/<setting>.jsonl, the tables to <output>/table.md and the
figures to <output>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# every setting differs from BASE in the fields it names (RewriteConfig fields). BASE is what all runs share:
# budgets that fit each family's answers (so a cut at max_length is a runaway) and the official temperature
# 0.3, the default before this study chose greedy (setting "greedy", the recipe's default now)
BASE = {"policy": "self-first", "max_new_tokens": 128, "hint_max_new_tokens": 128, "seed": 0, "batch_size": 16,
        "verifier": "auto", "temperature": 0.3}
SETTINGS = {
    "analyze": {"hint_prompt": "analyze"},
    "direct": {"hint_prompt": "direct"},
    "official-rules": {"hint_prompt": "analyze", "hint_cut": "marker", "missing_hint": "skip"},
    "beta-1": {"beta": 1.0},
    "sigmoid": {"lambda_mode": "sigmoid"},
    "greedy": {"temperature": 0.0},
    "temperature-1": {"temperature": 1.0},
}
DEFAULT_SETTINGS = list(SETTINGS)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def measure(rows: list[dict]) -> dict:
    """The table's figures for one run's output rows."""
    from opsft.recipe import recipe_summary

    summary = recipe_summary(rows)
    outcomes = summary["hinted_decoding"]
    return {
        "rows": len(rows), "hd": summary["sources"].get("hd", 0), "self": summary["sources"].get("self", 0),
        "original": summary["sources"].get("original", 0), "verified": summary["verified_fraction"],
        "cll_hd": _mean([r["cll"] for r in rows if r.get("source") == "hd" and r.get("cll") is not None]),
        "cll_all": summary["cll_mean"], "cll_original": summary["cll_original_mean"],
        "empty": outcomes["empty"], "runaway": outcomes["max_length"] + outcomes["repetition"],
        "stop": outcomes["stop"], "no_analysis": outcomes["forced_hints"] + outcomes["no_hint"],
        "outcomes": outcomes,
    }


def pooled(figures: list[dict]) -> dict:
    """One setting's figures over all families (counts summed, means weighted by their rows)."""
    total = {key: sum(f[key] for f in figures) for key in ("rows", "hd", "self", "original", "empty", "runaway",
                                                            "stop", "no_analysis", "seconds")}
    total["verified"] = sum(f["verified"] * f["rows"] for f in figures) / total["rows"]
    for key, weight in (("cll_hd", "hd"), ("cll_all", "rows"), ("cll_original", "rows")):
        parts = [(f[key], f[weight]) for f in figures if f[key] is not None and f[weight]]
        total[key] = sum(v * w for v, w in parts) / sum(w for _, w in parts) if parts else None
    return total


def table(results: dict[str, dict[str, dict]], settings: list[str]) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["| family | setting | hd / self / original | verified | mean CLL, hd rows | mean CLL, all rows "
             "| empty | runaway | header stops | hints without analysis | time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    families = list(results)
    for setting in settings:
        runs = [(family, results[family][setting]) for family in families if setting in results[family]]
        if len(runs) > 1:
            runs.append(("**all**", pooled([m for _, m in runs])))
        for family, m in runs:
            lines.append(f"| {family} | {setting} | {m['hd']} / {m['self']} / {m['original']} | {f(m['verified'])} "
                         f"| {f(m['cll_hd'])} | {f(m['cll_all'])} | {m['empty']} | {m['runaway']} | {m['stop']} "
                         f"| {m['no_analysis']} | {m['seconds']:.0f} s |")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> int:
    from opsft.data.datasets import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="rows per family")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    parser.add_argument("--output", default="runs/hd_study")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from opsft.engines.hf import HFEngine
    from opsft.recipe import rewrite_rows

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    engine = HFEngine(None, device="cpu", max_batch_size=32)  # None = the embedded model
    results: dict[str, dict[str, dict]] = {}
    for family in args.families:
        corpus = FAMILIES[family](args.rows, seed=args.seed)
        (out / family).mkdir(parents=True, exist_ok=True)
        for name in args.settings:
            start = time.time()
            rows = rewrite_rows(corpus, engine, {**BASE, **SETTINGS[name]})
            figures = {**measure(rows), "seconds": time.time() - start}
            results.setdefault(family, {})[name] = figures
            write_atomic(out / family / f"{name}.jsonl", "".join(
                json.dumps({k: r.get(k) for k in ("id", "source", "finish_reason", "hint", "hint_forced",
                                                  "hd_response", "self_response", "cll", "cll_original")}) + "\n"
                for r in rows))
            print(f"{family} {name}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    text = table(results, args.settings)
    write_atomic(out / "table.md", text + "\n")
    write_atomic(out / "results.json", json.dumps({"base": BASE, "settings": {s: SETTINGS[s] for s in args.settings},
                                                   "rows_per_family": args.rows, "results": results}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
