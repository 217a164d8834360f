"""`opsft score`: add CLL statistics to every row of a corpus.

In-process by default (one engine, one output file: the reference path, fine on a laptop).
`--ray` (or `--address`) runs it as a Ray Data job (actor pool of engines, output folder of
part files, resume by id; local Ray unless `--address` / RAY_ADDRESS names a cluster). Only
these flags (or `distributed` / `address` in the config) choose the Ray path: a RAY_ADDRESS in
the environment alone does not. Both paths print the same summary (opsft.scoring.summary).

    opsft score --input corpus.jsonl --output scored.parquet
    opsft score --input s3://bucket/corpus.parquet --output s3://bucket/scored.parquet --ray --actors 2-8 --gpus 1
"""

from __future__ import annotations

import time

from opsft.cli.common import Progress, add_engine_flags, add_model_flags, engine_overrides, print_summary
from opsft.cli.jobflags import add_job_flags, job_overrides
from opsft.data.corpus import check_corpus_paths


def add_parser(sub) -> None:
    parser = sub.add_parser("score", help="score a corpus with CLL (log p + H per response token)")
    parser.add_argument("--input", help="JSONL or Parquet corpus")
    parser.add_argument("--output", help="JSONL or Parquet file to write (by extension)")
    add_model_flags(parser)
    add_engine_flags(parser)
    parser.add_argument("--tokens", action="store_true", default=None, help="also write per-token phi")
    parser.add_argument("--include-eos", action="store_true", default=None, help="score the end-of-turn token too")
    parser.add_argument("--temperature", type=float, help="softmax temperature of p (default 1)")
    add_job_flags(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from opsft.config import ScoreConfig, load_config
    from opsft.plan import preflight

    cfg = load_config(ScoreConfig, args.config, {
        **engine_overrides(args), "input": args.input, "output": args.output, "tokens": args.tokens,
        "include_eos": args.include_eos, "temperature": args.temperature, **job_overrides(args)})
    if not cfg.input or not cfg.output:
        raise ValueError("--input and --output are required (on the command line or in --config)")
    check_corpus_paths(cfg.input, [cfg.output])
    preflight(cfg)  # a GPU stage that cannot fit fails here, before any engine starts
    if cfg.distributed or cfg.address:
        print_summary("score (Ray Data)", score_distributed(cfg))
    else:
        print_summary("score", score_in_process(cfg))
    return 0


def score_distributed(cfg) -> dict:
    from opsft.cluster import connect
    from opsft.data.reader import iter_rows
    from opsft.jobs.pipeline import run_job, score_spec
    from opsft.scoring import SUMMARY_COLUMNS, summary

    connect(cfg.address)
    result = run_job(score_spec(cfg.input, cfg.output, cfg.engine, cfg.pool, include_eos=cfg.include_eos,
                                tokens=cfg.tokens, temperature=cfg.temperature, rows_per_part=cfg.rows_per_part))
    # the same corpus figures as in-process, streamed from the output folder part by part
    return {**result, **summary(iter_rows(cfg.output, SUMMARY_COLUMNS))}


def score_in_process(cfg) -> dict:
    from opsft.data.parts import SCORE_TYPES
    from opsft.data.reader import iter_rows
    from opsft.engines import engine_from_config
    from opsft.faults import EngineSlot
    from opsft.local_job import run_local_job
    from opsft.scoring import SUMMARY_COLUMNS, score_rows, summary

    engine = cfg.engine.for_stage("score")
    slot = EngineSlot(lambda: engine_from_config(engine, "score"), retries=cfg.pool.max_task_retries,
                      what=f"{cfg.engine.kind} engine")
    kwargs = {"include_eos": cfg.include_eos, "tokens": cfg.tokens, "temperature": cfg.temperature}
    progress = Progress(0, "score")
    start = time.monotonic()
    try:
        result = run_local_job(cfg.input, cfg.output, score_rows, kwargs, slot, column_types=SCORE_TYPES,
                               steps=[{"fn": "score", "kwargs": kwargs, "engine": cfg.engine.identity()}],
                               report=progress.to)
        model = slot.current.model_id
    finally:
        slot.close()
    elapsed = time.monotonic() - start
    figures = summary(iter_rows(cfg.output, SUMMARY_COLUMNS))
    return {**figures, "model": model, "output": cfg.output, "seconds": round(elapsed, 2),
            "tokens_per_s": round(figures["tokens"] / elapsed, 1) if elapsed else None,
            "rows_skipped_already_done": result["rows_skipped_already_done"], "engine_faults": result["engine_faults"]}
