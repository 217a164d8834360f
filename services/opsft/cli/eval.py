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

from opsft.cli.common import add_engine_flags, engine_overrides

OUTPUT_FILES = ("eval.json", "table.md", "items.jsonl")  # what --output receives


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
    add_engine_flags(parser)
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
    from opsft.config import EvalConfig, load_config

    cfg = load_config(EvalConfig, args.config, {
        "models": args.model, "tasks": _split(args.tasks), "family": _split(args.family), "exclude": args.exclude,
        "seed": args.seed, "passages": args.passages, "tokens_per_passage": args.tokens_per_passage,
        "text": args.text, "output": args.output, **engine_overrides(args), "engine.model": None})
    results, table = run_eval(cfg, report=lambda m: print(m, file=sys.stderr, flush=True))
    print(table)
    if cfg.output:
        print(f"wrote {cfg.output}/eval.json, table.md, items.jsonl", file=sys.stderr)
    return 0


def run_eval(cfg, report=None) -> tuple[list[dict], str]:
    """Evaluate every model of cfg; write the outputs when cfg.output is set. Returns
    (results with their labels, the markdown table)."""
    import gc
    import json

    from opsft.data import storage
    from opsft.data.corpus import refuse_overwrite, write_rows, write_text_atomic
    from opsft.data.reader import read_rows
    from opsft.engines import make_engine
    from opsft.evaluation import EvalTask, evaluate_model, results_table

    report = report or (lambda message: None)
    tasks = [EvalTask.from_spec(t) for t in cfg.tasks]
    if not tasks:
        raise ValueError("no tasks to evaluate (--tasks)")
    if cfg.output:
        refuse_overwrite([cfg.output, *(storage.join(cfg.output, name) for name in OUTPUT_FILES)], cfg.exclude)
    exclude = [row for path in cfg.exclude for row in read_rows(path)]
    models = [labelled(m) for m in cfg.models] or [("default", None)]
    if len({label for label, _ in models}) != len(models):
        raise ValueError(f"model labels must differ: {[label for label, _ in models]}")
    from opsft.plan import preflight

    for _, path in models:  # a model whose engine cannot fit its GPU fails here, before any engine starts
        preflight(cfg, path or cfg.engine.model)
    results, items = [], []
    for label, path in models:
        report(f"== {label}: {path or 'embedded default'}")
        engine = make_engine(cfg.engine.kind, path or cfg.engine.model, **cfg.engine.options())
        try:
            result, records = evaluate_model(engine, tasks, family=cfg.family, seed=cfg.seed, exclude=exclude,
                                             passages=cfg.passages, tokens_per_passage=cfg.tokens_per_passage,
                                             text_source=cfg.text, report=report)
        finally:  # vllm: its runners are shut down before the next model's start, and before the command exits
            if hasattr(engine, "close"):
                engine.close()
            del engine
            gc.collect()
        results.append({"label": label, **result})
        items += [{"model": label, **r} for r in records]
    table = results_table(results, [r["label"] for r in results])
    if cfg.output:  # a folder, or a URI (s3://...)
        out = cfg.output
        write_text_atomic(storage.join(out, "eval.json"),
                          json.dumps({"config": cfg.model_dump(), "results": results}, indent=2))
        write_text_atomic(storage.join(out, "table.md"), table + "\n")
        write_rows(items, storage.join(out, "items.jsonl"))
    return results, table
