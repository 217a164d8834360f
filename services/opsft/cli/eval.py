"""`opsft eval`: accuracy on held-out reasoning-gym tasks (greedy, batched) and retention on
general text (NLL / CLL per token), for one model or several side by side.

    opsft eval --tasks gsm_symbolic:50,basic_arithmetic:50:64 --output eval/
    opsft eval --model base=/models/smol --model idft=runs/idft/checkpoints/step-000010 \\
        --exclude train.jsonl --family gsm_symbolic --output eval/

Writes <output>/eval.json (every figure, per model), table.md (the table printed at the end)
and items.jsonl (every question, output and verdict). The first model is the baseline of the
NLL change.
"""

from __future__ import annotations

import sys

from opsft.cli.common import Settings, add_engine_flags
from opsft.config import EvalConfig

FLAGS = Settings(EvalConfig)


def add_parser(sub) -> None:
    parser = sub.add_parser("eval", help="accuracy on held-out reasoning-gym tasks and general-text retention")
    parser.add_argument("--model", action="append", metavar="[LABEL=]PATH",
                        help="a model folder (repeat to compare; the first is the baseline); default: the "
                        "embedded model")
    parser.add_argument("--config", help="YAML config (opsft.config.EvalConfig); flags override it")
    parser.add_argument("--tasks", help="comma-separated name[:n[:max_new_tokens]] (default "
                        "gsm_symbolic:50:256,basic_arithmetic:50:64)")
    parser.add_argument("--family", help="comma-separated training-family tasks (default gsm_symbolic)")
    parser.add_argument("--exclude", action="append", metavar="PATH", help="a training corpus: its questions are "
                        "never evaluated (repeatable)")
    parser.add_argument("--seed", type=int, help="reasoning-gym seed of the items (default 1234)")
    parser.add_argument("--passages", type=int, help="general-text windows (default 16; 0 skips retention)")
    parser.add_argument("--tokens-per-passage", type=int, help="tokens per window (default 256)")
    parser.add_argument("--text", help="general text: pydoc (default) or a UTF-8 file")
    parser.add_argument("--output", help="folder for eval.json, table.md, items.jsonl")
    add_engine_flags(parser, FLAGS)
    parser.set_defaults(run=run)


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def labelled(spec: str) -> tuple[str, str | None]:
    """'label=path' -> (label, path); 'path' -> (its last folder name, path); 'default' -> embedded."""
    label, sep, path = spec.partition("=")
    if not sep:
        path = spec
        label = spec.rstrip("/").split("/")[-1] or spec
    return label, (None if path in ("", "default") else path)


def run(args) -> int:
    from opsft.config import load_config

    cfg = load_config(EvalConfig, args.config, {
        "models": args.model, "tasks": _split(args.tasks), "family": _split(args.family), "exclude": args.exclude,
        "seed": args.seed, "passages": args.passages, "tokens_per_passage": args.tokens_per_passage,
        "text": args.text, "output": args.output, **FLAGS.overrides(args)})
    results, table = run_eval(cfg, report=lambda m: print(m, file=sys.stderr, flush=True))
    print(table)
    if cfg.output:
        print(f"wrote {cfg.output}/eval.json, table.md, items.jsonl", file=sys.stderr)
    return 0


def run_eval(cfg: EvalConfig, report=None) -> tuple[list[dict], str]:
    """An EvalConfig run through opsft.commands.evaluate: one engine per model, built from cfg.engine when its
    turn comes (and closed before the next). Returns (results with their labels, the markdown table)."""
    from opsft.commands import evaluate
    from opsft.engines import make_engine
    from opsft.evaluation import EvalTask
    from opsft.plan import preflight

    tasks = [EvalTask.from_spec(t) for t in cfg.tasks]
    if not tasks:
        raise ValueError("no tasks to evaluate (--tasks)")
    models = [labelled(m) for m in cfg.models] or [("default", None)]
    if len({label for label, _ in models}) != len(models):
        raise ValueError(f"model labels must differ: {[label for label, _ in models]}")
    for _, path in models:  # a model whose engine cannot fit its GPU fails here, before any engine starts
        preflight(cfg, path or cfg.engine.model)

    def builder(path):
        return lambda: make_engine(cfg.engine.kind, path or cfg.engine.model, **cfg.engine.options())

    return evaluate({label: builder(path) for label, path in models}, tasks, family=cfg.family, seed=cfg.seed,
                    exclude=cfg.exclude, passages=cfg.passages, tokens_per_passage=cfg.tokens_per_passage,
                    text=cfg.text, output=cfg.output, config=cfg.model_dump(), report=report)
