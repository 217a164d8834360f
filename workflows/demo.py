"""`make demo`: one realignment cycle end to end on the embedded model, local Ray, CPU.

    .venv/bin/python workflows/demo.py [--rows 96] [--held-out 200] [--output runs/demo]

1. makes a corpus deterministically: two-term additions (reasoning-gym basic_arithmetic, terms of
   1-2 digits), a task the embedded 135M model gets right about a third of the time, each with an
   off-policy reference: a terse column-method solution in a style that is not the model's;
2. evaluates the base model: held-out additions (never in the corpus; Wilson 95% intervals),
   two out-of-family tasks and the NLL of general text (opsft.evaluation);
3. runs one cycle of `opsft realign` with workflows/realign_demo.yaml: score the corpus, select
   the off-policy rows (CLL < -0.1), rewrite them (self-first: the model's own verified answer
   where it has one, hinted decoding for the rest), fine-tune with IDFT, re-score;
4. scores the realigned corpus under the BASE model (the rewrite's own effect, apart from
   training), evaluates the new checkpoint as in 2, and prints one table (README: how to read it).

Running it again with the same inputs finds the finished cycle and does no work twice
(delete <output> to start over).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
# out-of-family tasks (base accuracy 62% and 30% in workflows/demo_task_survey.yaml) and their settings
OUT_OF_FAMILY = [("products", "products_1x1", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
                 ("gcd", "gcd_small", {"min_value": 1, "max_value": 20})]


def evaluation_tasks(held_out: int, out_of_family: int):
    from opsft.data.datasets import ADDITION
    from opsft.evaluation import EvalTask

    return [EvalTask("basic_arithmetic", held_out, 48, ADDITION, "addition")] + [
        EvalTask(name, out_of_family, 48, config, label) for name, label, config in OUT_OF_FAMILY]


def evaluate(label: str, model: str, tasks, corpus: str, passages: int, say) -> dict:
    from opsft.commands import evaluate
    from opsft.engines.hf import HFEngine

    results, _ = evaluate({label: lambda: HFEngine(model, device="cpu", max_batch_size=32)}, tasks,
                          family=["basic_arithmetic"], exclude=[corpus], passages=passages, tokens_per_passage=256,
                          report=lambda m: say(f"  {m}"))
    return results[0]


def corpus_cll(model: str, path: str, output: str) -> float | None:
    """Mean per-row CLL of a corpus file under `model` (in-process, hf), its scored rows written to output."""
    from opsft.commands import score_file
    from opsft.engines.hf import HFEngine

    return score_file(path, output, lambda: HFEngine(model, device="cpu"))["cll_mean"]


def rewritten_cll(folder: Path) -> tuple[float | None, float | None]:
    """Mean CLL under the base model (the rewrite's score stage) of the rewritten rows: their
    original responses, and what they became (opsft.recipe.recipe_summary over the rewrite's output)."""
    from opsft.data.reader import iter_rows
    from opsft.recipe import SUMMARY_COLUMNS, recipe_summary

    summary = recipe_summary(iter_rows(str(folder / "rewritten.parquet"), SUMMARY_COLUMNS))
    return summary["cll_original_mean"], summary["cll_mean"]


def accuracy_cell(task: dict) -> str:
    low, high = task["ci95"]
    return f"{task['accuracy']:.2f} [{low:.2f}, {high:.2f}] ({task['correct']}/{task['n']})"


def print_table(before: dict, after: dict, cll_orig: float, cll_new: float, selected: tuple, outputs: dict) -> None:
    merge, train = outputs["merge"], outputs["train"].get("final_metrics") or {}
    w = 44
    print(f"\n{'the rewrite (CLL under the base model)':<{w}} {'original':>24} {'realigned':>24}")
    print(f"{'  mean CLL of the corpus':<{w}} {cll_orig:>24.3f} {cll_new:>24.3f}")
    n = outputs["select"]["selected"]
    if selected[0] is not None and n < outputs["merge"]["rows"] + outputs["merge"]["dropped"]:
        print(f"{f'  mean CLL of the {n} rewritten rows':<{w}} {selected[0]:>24.3f} {selected[1]:>24.3f}")
    print(f"{'  rows by source':<{w}} {json.dumps(merge['sources'])}")
    print(f"\n{'training (IDFT on the realigned corpus)':<{w}} {'base model':>24} {'after training':>24}")
    for key, task in before["tasks"].items():
        scope = "in-family, held out" if task["in_family"] else "out-of-family"
        print(f"{f'  {key} accuracy ({scope})':<{w}} {accuracy_cell(task):>24} "
              f"{accuracy_cell(after['tasks'][key]):>24}")
    if "general_text" in before:
        nb, na = before["general_text"]["nll"], after["general_text"]["nll"]
        print(f"{'  general-text NLL (pydoc; lower is better)':<{w}} {nb:>24.4f} {na:>24.4f}  (change {na - nb:+.4f})")
    print(f"  training: {json.dumps({k: train.get(k) for k in ('step', 'loss', 'phi_mean', 'gamma_mean')})}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--held-out", type=int, default=200, help="held-out in-family items (default 200)")
    parser.add_argument("--out-of-family", type=int, default=60, help="items of each out-of-family task")
    parser.add_argument("--passages", type=int, default=8, help="general-text windows of 256 tokens (0 = skip)")
    parser.add_argument("--output", default="runs/demo")
    parser.add_argument("--config", default=str(HERE / "realign_demo.yaml"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("ray", "ray.data", "ray.train", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import ray.data

    # Ray Data's memory advice ("consider setting memory=...") repeats every 30 s; the demo's actors fit
    ray.data.DataContext.get_current().issue_detectors_config.detectors = []

    from opsft.config import RealignConfig, load_config
    from opsft.data.corpus import write_rows
    from opsft.data.datasets import addition_corpus
    from opsft.models import default_model_dir
    from opsft.realign.cycle import Cycle

    start = time.monotonic()

    def say(message: str) -> None:
        print(f"[demo {time.monotonic() - start:5.0f}s] {message}", flush=True)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    corpus = addition_corpus(args.rows, seed=0)
    write_rows(corpus, out / "corpus.jsonl")
    base = str(default_model_dir())
    cfg = load_config(RealignConfig, args.config, {"corpus": str(out / "corpus.jsonl"),
                                                   "output_dir": str(out / "realign"), "model": base})
    tasks = evaluation_tasks(args.held_out, args.out_of_family)
    say(f"corpus: {len(corpus)} additions with column-method solutions -> {out / 'corpus.jsonl'}")

    say("evaluating the base model (held-out additions, out-of-family tasks, general text) ...")
    before = evaluate("base model", base, tasks, str(out / "corpus.jsonl"), args.passages, say)

    say("realignment cycle: score -> select -> rewrite -> train -> rescore -> report (Ray, local)")
    result = Cycle(cfg).run()
    outputs = result["outputs"]
    folder = Path(result["cycle"])
    say(f"cycle {folder.name}: {outputs['select']['selected']} rows selected, rewritten in "
        f"{outputs['rewrite'].get('seconds', 0):.0f}s; sources {json.dumps(outputs['merge']['sources'])}")

    say("scoring the realigned corpus under the base model ...")
    cll_orig = outputs["report"]["cll_before"]  # the cycle's score stage: the original corpus, base model
    cll_new = corpus_cll(base, str(folder / "corpus.parquet"), str(out / "realigned.base_scores.parquet"))

    checkpoint = outputs["train"]["checkpoint"]
    say("evaluating the new checkpoint ...")
    after = evaluate("after training", checkpoint, tasks, str(out / "corpus.jsonl"), args.passages, say)

    print_table(before, after, cll_orig, cll_new, rewritten_cll(folder), outputs)
    (out / "demo.json").write_text(json.dumps({"before": before, "after": after, "cll_original": cll_orig,
                                               "cll_realigned": cll_new, "cycle": outputs}, indent=2, default=str))
    print(f"\ncycle: {result['cycle']} ({result['status']})")
    print(f"report: {outputs['report']['folder']}/; figures: {out / 'demo.json'}; checkpoint: {checkpoint}")
    say(f"done in {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
