"""The small-scale reproduction (docs/results.md): one off-policy corpus, seven methods with the
same budget, the same evaluation for each.

    make reproduce                       # = .venv/bin/python workflows/reproduce.py --config workflows/reproduce.yaml
    .venv/bin/python workflows/reproduce.py --config workflows/reproduce.yaml --only sft,idft

Stages (each writes its output under output_dir; a re-run skips every finished stage, so an
interrupted run continues where it stopped; delete output_dir to start over):
1. corpus.jsonl: the off-policy corpus: two-term additions with column-method solutions
   (family addition, the demo's; opsft.data.datasets.addition_corpus), or gsm_symbolic rows with
   their template-written worked solutions (family gsm_symbolic, which the 135M model cannot do);
2. rewrite.jsonl: the paper's pipeline on it with the starting model (self-answers, hinted
   decoding for the wrong ones, verified); hd.jsonl: the rewritten corpus (verified rewrites,
   else the original response); pairs.jsonl: chosen = the verified or reference solution,
   rejected = the model's own wrong answer;
3. eval/base.json: the starting model (accuracy per task, general-text NLL / CLL);
4. for each method: train (opsft.train.loop.run_local, one process: the same loop the Ray Train
   workers run), evaluate, and score its training corpus and the original corpus before / after;
5. results.json, results.md (the table) and results.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from opsft.config import EvalConfig, LossConfig, RewriteConfig, Strict  # noqa: E402
from pydantic import Field  # noqa: E402

log = logging.getLogger("reproduce")
DATA_FILES = {"original": "corpus.jsonl", "hd": "hd.jsonl", "pairs": "pairs.jsonl"}
# what each training corpus's CLL is measured on (pairs: their chosen responses, as corpus rows)
SCORED_FILES = {**DATA_FILES, "pairs": "pairs_chosen.jsonl"}


CORPORA = {"addition": "addition_corpus", "gsm_symbolic": "gsm_symbolic_corpus"}  # opsft.data.datasets


class CorpusSpec(Strict):
    family: Literal["addition", "gsm_symbolic"] = "addition"
    rows: int = Field(96, ge=2)
    seed: int = 0


class MethodSpec(Strict):
    data: Literal["original", "hd", "pairs"]
    loss: LossConfig
    lr: float = Field(..., gt=0)


class ReproduceConfig(Strict):
    output_dir: str = "runs/reproduce"
    model: str | None = None
    threads: int = Field(2, ge=1)
    corpus: CorpusSpec = CorpusSpec()
    rewrite: RewriteConfig = RewriteConfig()
    eval: EvalConfig = EvalConfig()
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields shared by every method")
    methods: dict[str, MethodSpec]


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def timed(stages: dict, name: str):
    class _Timer:
        def __enter__(self):
            self.start = time.monotonic()
            log.info("== %s", name)

        def __exit__(self, *exc):
            seconds = round(time.monotonic() - self.start, 1)
            if not exc[0]:
                stages.setdefault(name, seconds)  # a re-run that skips the finished work keeps the first time
            log.info("== %s done in %.0fs", name, seconds)

    return _Timer()


def make_data(cfg: ReproduceConfig, out: Path, stages: dict) -> None:
    from opsft.commands import rewrite_file
    from opsft.data import datasets
    from opsft.data.corpus import write_rows
    from opsft.data.pairs import preference_pairs
    from opsft.data.reader import read_rows
    from opsft.engines.hf import HFEngine
    from opsft.recipe import recipe_summary

    if not (out / "corpus.jsonl").exists():
        make_corpus = getattr(datasets, CORPORA[cfg.corpus.family])
        write_rows(make_corpus(cfg.corpus.rows, seed=cfg.corpus.seed), out / "corpus.jsonl")
    if not (out / "rewrite.jsonl").exists():
        with timed(stages, "rewrite"):
            # a file in, a file out (atomic; a killed run resumes from its work folder)
            rewrite_file(str(out / "corpus.jsonl"), str(out / "rewrite.jsonl"),
                         lambda: HFEngine(cfg.model, device="cpu", max_batch_size=16), cfg.rewrite.params(),
                         report=lambda s, d, t: log.info("  rewrite %s: %d/%d", s, d, t))
    rows = read_rows(out / "rewrite.jsonl")
    write_rows([{k: r[k] for k in ("id", "prompt", "response", "answer", "task", "source", "verified")}
                for r in rows], out / "hd.jsonl")
    pairs, counts = preference_pairs(rows)
    write_rows(pairs, out / "pairs.jsonl")
    write_rows([{"prompt": r["prompt"], "response": r["chosen"]} for r in pairs], out / "pairs_chosen.jsonl")
    write_json(out / "data.json", {"rewrite": recipe_summary(rows), "pairs": len(pairs), "pair_skips": counts})


def evaluate(cfg: ReproduceConfig, model: str | None, out: Path, label: str) -> dict:
    from opsft.commands import score_file
    from opsft.data.corpus import write_rows
    from opsft.data.reader import read_rows
    from opsft.engines.hf import HFEngine
    from opsft.evaluation import EvalTask, evaluate_model

    path = out / "eval" / f"{label}.json"
    if path.exists():
        return json.loads(path.read_text())
    engine = HFEngine(model, device="cpu", max_batch_size=16)
    e = cfg.eval
    result, records = evaluate_model(engine, [EvalTask.from_spec(t) for t in e.tasks], family=e.family, seed=e.seed,
                                     exclude=read_rows(out / "corpus.jsonl"), passages=e.passages,
                                     tokens_per_passage=e.tokens_per_passage, text_source=e.text,
                                     report=lambda m: log.info("  %s %s", label, m))
    # mean CLL (token-weighted) of each training corpus under this model (pairs: their chosen responses)
    result["corpus_cll"] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    for name, file in SCORED_FILES.items():
        if read_rows(out / file):
            scored = score_file(str(out / file), str(path.parent / f"{label}.{name}.scored.parquet"), engine)
            result["corpus_cll"][name] = scored["cll_token_mean"]
    write_rows(records, out / "eval" / f"{label}.items.jsonl")
    write_json(path, result)
    return result


def train(cfg: ReproduceConfig, name: str, spec: MethodSpec, out: Path) -> str:
    from opsft.config import TrainConfig
    from opsft.train.loop import run_local

    folder = out / "runs" / name
    final = folder / "final"
    if (final / "config.json").exists():
        return str(final)
    shutil.rmtree(folder, ignore_errors=True)
    tcfg = TrainConfig.model_validate({**cfg.train, "input": str(out / DATA_FILES[spec.data]),
                                       "output_dir": str(folder), "model": cfg.model, "loss": spec.loss.model_dump(),
                                       "lr": spec.lr})
    summary = run_local(tcfg)
    checkpoint = Path(summary["checkpoint"])
    # keep the weights and tokenizer only (the optimiser state is 2x the model)
    (checkpoint / "trainer_state.pt").unlink(missing_ok=True)
    checkpoint.replace(final)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    write_json(folder / "train_summary.json", summary)
    return str(final)


def row_of(label: str, result: dict, base: dict, spec: MethodSpec | None, train_s: float | None) -> dict:
    tasks = result["tasks"]
    data = spec.data if spec else None
    return {
        "method": label, "data": data, "loss": spec.loss.name if spec else None, "lr": spec.lr if spec else None,
        "accuracy": {t: {k: s[k] for k in ("correct", "n", "accuracy", "ci95", "in_family")} for t, s in tasks.items()},
        "in_family_accuracy": result.get("in_family_accuracy"),
        "out_of_family_accuracy": result.get("out_of_family_accuracy"),
        "text_nll": result["general_text"]["nll"], "text_cll": result["general_text"]["cll"],
        "text_nll_change": result["general_text"]["nll"] - base["general_text"]["nll"],
        "train_corpus_cll_before": base["corpus_cll"].get(data) if data else None,
        "train_corpus_cll_after": result["corpus_cll"].get(data) if data else None,
        "original_corpus_cll": result["corpus_cll"]["original"],
        "train_seconds": train_s,
    }


def table(rows: list[dict]) -> str:
    from opsft.evaluation import markdown_table

    tasks = list(rows[0]["accuracy"])
    head = (["method", "data"] + [f"{t}{' (in)' if rows[0]['accuracy'][t]['in_family'] else ''}" for t in tasks]
            + ["text NLL change", "train-corpus CLL before -> after", "original-corpus CLL"])
    body = []
    for r in rows:
        cells = [r["method"], r["data"] or "-"]
        cells += [f"{a['accuracy']:.3f} ({a['correct']}/{a['n']})" for a in r["accuracy"].values()]
        cells.append(f"{r['text_nll_change']:+.4f}")
        before, after = r["train_corpus_cll_before"], r["train_corpus_cll_after"]
        cells.append("-" if before is None else f"{before:.3f} -> {after:.3f}")
        cells.append(f"{r['original_corpus_cll']:.3f}")
        body.append(cells)
    return markdown_table(head, body)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    tasks = list(rows[0]["accuracy"])
    fig, axes = plt.subplots(1, len(tasks) + 2, figsize=(4 * (len(tasks) + 2), 4))
    for ax, task in zip(axes, tasks, strict=False):
        acc = [r["accuracy"][task]["accuracy"] for r in rows]
        lo = [a - r["accuracy"][task]["ci95"][0] for a, r in zip(acc, rows, strict=True)]
        hi = [r["accuracy"][task]["ci95"][1] - a for a, r in zip(acc, rows, strict=True)]
        ax.bar(names, acc, yerr=[lo, hi], capsize=3, color="tab:blue")
        ax.set_title(f"{task} accuracy (95% CI)")
        ax.tick_params(axis="x", rotation=60)
    ax = axes[len(tasks)]
    ax.bar(names, [r["text_nll_change"] for r in rows], color="tab:red")
    ax.set_title("general-text NLL change vs base")
    ax.tick_params(axis="x", rotation=60)
    ax = axes[len(tasks) + 1]
    trained = [r for r in rows if r["data"]]
    xs = range(len(trained))
    ax.bar([x - 0.2 for x in xs], [r["train_corpus_cll_before"] for r in trained], width=0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [r["train_corpus_cll_after"] for r in trained], width=0.4, label="after")
    ax.set_xticks(list(xs), [r["method"] for r in trained], rotation=60)
    ax.set_title("mean CLL of the training corpus")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).with_name("reproduce.yaml")))
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--only", help="comma-separated methods to run (default: all of the config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch
    import yaml

    cfg = ReproduceConfig.model_validate(yaml.safe_load(Path(args.config).read_text()))
    if args.output_dir:
        cfg.output_dir = args.output_dir
    methods = cfg.methods
    if args.only:
        unknown = set(args.only.split(",")) - set(methods)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; the config has {sorted(methods)}")
        methods = {k: v for k, v in methods.items() if k in args.only.split(",")}
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages_path = out / "stages.json"
    stages = json.loads(stages_path.read_text()) if stages_path.exists() else {}
    start = time.monotonic()

    make_data(cfg, out, stages)
    write_json(stages_path, stages)
    with timed(stages, "eval base"):
        base = evaluate(cfg, cfg.model, out, "base")
    rows = [row_of("base", base, base, None, None)]
    for name, spec in methods.items():
        if not (out / DATA_FILES[spec.data]).read_text().strip():
            log.warning("== %s skipped: %s has no rows", name, DATA_FILES[spec.data])
            continue
        with timed(stages, f"train {name}"):
            model = train(cfg, name, spec, out)
        with timed(stages, f"eval {name}"):
            result = evaluate(cfg, model, out, name)
        rows.append(row_of(name, result, base, spec, stages.get(f"train {name}")))
        write_json(stages_path, stages)
    data = json.loads((out / "data.json").read_text())
    write_json(out / "results.json", {"config": cfg.model_dump(), "data": data, "rows": rows, "stages_s": stages,
                                      "this_run_s": round(time.monotonic() - start, 1)})
    text = table(rows)
    (out / "results.md").write_text(text + "\n")
    plot(rows, out / "results.png")
    print(text)
    print(f"\nwrote {out}/results.json, results.md, results.png ({time.monotonic() - start:.0f}s this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
