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

from opsft.cli.common import Progress, Settings, add_engine_flags, add_model_flags, print_summary
from opsft.cli.jobflags import add_job_flags, job_overrides
from opsft.config import ScoreConfig

FLAGS = Settings(ScoreConfig)


def add_parser(sub) -> None:
    parser = sub.add_parser("score", help="score a corpus with CLL (log p + H per response token)")
    parser.add_argument("--input", help="JSONL or Parquet corpus")
    parser.add_argument("--output", help="JSONL or Parquet file to write (by extension)")
    add_model_flags(parser)
    add_engine_flags(parser, FLAGS)
    FLAGS.add(parser, "tokens")
    FLAGS.add(parser, "include_eos", help="score the end-of-turn token too")
    FLAGS.add(parser, "temperature", help="softmax temperature of p")
    add_job_flags(parser, FLAGS)
    parser.set_defaults(run=run)


def run(args) -> int:
    from opsft import commands
    from opsft.config import load_config
    from opsft.data.reader import check_corpus_paths
    from opsft.plan import preflight

    cfg = load_config(ScoreConfig, args.config, {**FLAGS.overrides(args), "engine.model": args.model,
                                                 "input": args.input, "output": args.output, **job_overrides(args)})
    if not cfg.input or not cfg.output:
        raise ValueError("--input and --output are required (on the command line or in --config)")
    check_corpus_paths(cfg.input, [cfg.output])
    preflight(cfg)  # a GPU stage that cannot fit fails here, before any engine starts
    options = {"include_eos": cfg.include_eos, "tokens": cfg.tokens, "temperature": cfg.temperature}
    if cfg.distributed or cfg.address:
        print_summary("score (Ray Data)", commands.score_on_ray(
            cfg.input, cfg.output, cfg.engine, cfg.pool, rows_per_part=cfg.rows_per_part, address=cfg.address,
            **options))
        return 0
    from opsft.engines import engine_from_config

    engine = cfg.engine.for_stage("score")
    print_summary("score", commands.score_file(
        cfg.input, cfg.output, lambda: engine_from_config(engine, "score"), retries=cfg.pool.max_task_retries,
        identity=cfg.engine.identity(), report=Progress(0, "score").to, **options))
    return 0
