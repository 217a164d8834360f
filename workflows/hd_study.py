"""The hinted-decoding settings study on the demo's task family (docs/hinted_decoding.md).

    .venv/bin/python workflows/hd_study.py [--rows 48] [--settings default beta-0 ...] [--output runs/hd_study]

Rewrites the same off-policy addition rows (opsft.data.datasets.addition_corpus, column-method
references) with policy hd-all once per setting, in this process, on the embedded model (one
engine for all settings), and prints one table row per setting:
- `hd / original`: rows whose hinted-decoding output verified (source hd) / kept their reference;
- finish reasons (eos, max_length, no_hint, ...);
- mean CLL under the base model (the recipe's score stage): of all rows, and of the hd rows;
- how many hd responses start with ":" (the hint-cut defect) and how many copy the reference's
  column method ("column" in the text): on-policy outputs do neither.
Each setting's rows go to <output>/<setting>.jsonl (hint, hd_response, finish_reason, cll) for
reading, and the table to <output>/table.md.
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

# every setting differs from the base in the fields it names (RewriteConfig fields)
BASE = {"policy": "hd-all", "max_new_tokens": 64, "hint_max_new_tokens": 64, "seed": 0, "batch_size": 16,
        "verifier": "auto"}
SETTINGS = {
    "default": {},
    "official-cut": {"hint_cut": "marker"},
    "missing-hint-cot": {"missing_hint": "cot"},
    "splitter-####": {"splitter": "####"},
    "beta-0.7": {"beta": 0.7},
    "beta-0": {"beta": 0.0},
    "sigmoid": {"lambda_mode": "sigmoid"},
    "greedy": {"temperature": 0.0},
    "temperature-1": {"temperature": 1.0},
}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def measure(rows: list[dict]) -> dict:
    """The table's figures for one setting's output rows."""
    from opsft.recipe import recipe_summary

    summary = recipe_summary(rows)
    hd = [r for r in rows if r.get("source") == "hd"]
    return {
        "hd": len(hd), "original": summary["sources"].get("original", 0),
        "verified_fraction": summary["verified_fraction"], "finish_reasons": summary["finish_reasons"],
        "hints_with_marker": sum("# CoT" in (r.get("hint") or "") for r in rows),
        "cll_all": summary["cll_mean"], "cll_original": summary["cll_original_mean"],
        "cll_hd": _mean([r["cll"] for r in hd if r.get("cll") is not None]),
        "hd_colon": sum(r["response"].lstrip().startswith(":") for r in hd),
        "hd_column": sum("column" in r["response"].lower() for r in hd),
        "hd_tokens": _mean([r["hd_tokens"] for r in hd if r.get("hd_tokens") is not None]),
    }


def table(results: dict[str, dict]) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["| setting | hd / original | verified | finish reasons | hints with `# CoT` | mean CLL, all rows "
             "| mean CLL, hd rows | hd tokens (mean) | hd starting with `:` | hd copying the column method | time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in results.items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(m["finish_reasons"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {name} | {m['hd']} / {m['original']} | {f(m['verified_fraction'])} | {reasons} "
                     f"| {m['hints_with_marker']} | {f(m['cll_all'])} | {f(m['cll_hd'])} | "
                     f"{'-' if m['hd_tokens'] is None else round(m['hd_tokens'], 1)} | {m['hd_colon']} "
                     f"| {m['hd_column']} | {m['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--output", default="runs/hd_study")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from opsft.data.datasets import addition_corpus
    from opsft.engines.hf import HFEngine
    from opsft.recipe import rewrite_rows

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    corpus = addition_corpus(args.rows, seed=args.seed)
    engine = HFEngine(None, device="cpu", max_batch_size=32)  # None = the embedded model
    results = {}
    for name in args.settings:
        start = time.time()
        rows = rewrite_rows(corpus, engine, {**BASE, **SETTINGS[name]})
        results[name] = {**measure(rows), "seconds": time.time() - start}
        tmp = out / f".{name}.jsonl.tmp"
        with tmp.open("w") as fh:
            for r in rows:
                fh.write(json.dumps({k: r.get(k) for k in ("id", "source", "finish_reason", "hint", "hd_response",
                                                            "cll", "cll_original")}) + "\n")
        tmp.replace(out / f"{name}.jsonl")
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    text = table(results)
    (out / "table.md.tmp").write_text(text + "\n")
    (out / "table.md.tmp").replace(out / "table.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
