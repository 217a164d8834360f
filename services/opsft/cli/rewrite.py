"""`opsft rewrite`: the on-policy data recipe (self-answers, Hinted Decoding, verification, CLL).

    opsft rewrite --input corpus.jsonl --output rewritten.jsonl [--policy self-first|hd-all] [--beta 3]
                  [--lambda-mode linear] [--temperature 0] [--top-p 0.95] [--max-new-tokens N]
                  [--splitter '\\boxed{'] [--seed S] [--verifier auto] [--drop-unverified]
                  [--hint-prompt analyze|direct] [--hint-cut line|marker] [--missing-hint cot|skip]
                  [--engine hf|vllm] [--hd-engine hf|vllm] [--ray [--address A] [--actors N] [--gpus G]]

Every input row is written with `response` replaced and `original_response`, `source`,
`verified`, `finish_reason`, `cll`, `cll_original`, `exact_entropy` added. With --drop-unverified the
rows whose rewrite failed verification go to <output stem>.dropped.<ext> instead (nothing is lost).

In-process by default. `--ray` (or `--address`) runs the recipe's stages as one Ray Data job, one
actor pool per engine stage (self-answer, hint, hinted-decoding, score) and CPU tasks for the
verify stages; the output (and the dropped side output) is then a folder of part files and a
re-run resumes by id. `--engine` picks the engine of every stage, `--hd-engine` the one of
hinted decoding (both engines can: hf steps its own decode session, vllm pairs the two streams
on its generate runner, opsft.engines.vllm_hd); config `stages:` sets any stage's engine and pool.
"""

from __future__ import annotations

from opsft.cli.common import Progress, Settings, add_model_flags, print_summary
from opsft.cli.jobflags import add_job_flags, job_overrides
from opsft.config import EngineConfig, RewriteConfig
from opsft.recipe_plan import ENGINE_STAGES

FLAGS = Settings(RewriteConfig)
# The recipe's settings as flags: type, choices, help and default from RewriteConfig (opsft.recipe_plan)
RECIPE_FLAGS = ("policy", "verifier", "drop_unverified", "beta", "lambda_mode", "temperature", "top_p",
                "max_new_tokens", "hint_max_new_tokens", "missing_hint", "hint_cut", "hint_prompt", "splitter", "seed",
                "batch_size")


def add_parser(sub) -> None:
    parser = sub.add_parser("rewrite", help="rewrite a corpus on-policy (self-first answers + hinted decoding)")
    parser.add_argument("--input", help="JSONL or Parquet corpus (prompt|messages, response, answer)")
    parser.add_argument("--output", help="JSONL or Parquet file to write (by extension)")
    add_model_flags(parser)
    FLAGS.add(parser, "engine.dtype")
    FLAGS.add(parser, "engine.kind", "--engine", help="engine of every stage")
    FLAGS.add(parser, "stages.hinted-decoding.engine.kind", "--hd-engine", field=(EngineConfig, "kind"),
              help="engine of the hinted-decoding stage (default: --engine)")
    for name in RECIPE_FLAGS:
        FLAGS.add(parser, name)
    add_job_flags(parser, FLAGS)
    parser.set_defaults(run=run)


def run(args) -> int:
    from opsft import commands
    from opsft.config import load_config
    from opsft.data.reader import check_corpus_paths
    from opsft.plan import preflight
    from opsft.stages import check_stages

    cfg = load_config(RewriteConfig, args.config, {**FLAGS.overrides(args), "input": args.input, "output": args.output,
                                                   "engine.model": args.model, **job_overrides(args)})
    if not cfg.input or not cfg.output:
        raise ValueError("--input and --output are required (on the command line or in --config)")
    dropped = commands.dropped_path(cfg.output)
    check_corpus_paths(cfg.input, [cfg.output, dropped])
    check_stages(cfg)  # an engine that cannot do a stage is refused here, before any model loads
    preflight(cfg)  # so is a GPU stage that cannot fit (opsft plan)
    if cfg.distributed or cfg.address:
        print_summary("rewrite (Ray Data)", commands.rewrite_on_ray(cfg, cfg.input, cfg.output,
                                                                    dropped_output=dropped))
        return 0
    print_summary("rewrite", commands.rewrite_file(
        cfg.input, cfg.output, lambda: stage_engines(cfg), cfg.params(), dropped_output=dropped,
        retries=cfg.pool.max_task_retries, chunk_rows=max(cfg.pool.batch_size, 256), report=ProgressBars(),
        identity={stage: cfg.stage_engine(stage).identity() for stage in ENGINE_STAGES}))
    return 0


def stage_engines(cfg: RewriteConfig) -> dict:
    """One engine per distinct engine config, for every engine stage (in-process: one engine may serve
    several stages)."""
    from opsft.engines import engine_from_config

    made, out = {}, {}
    for stage in ENGINE_STAGES:
        ecfg = cfg.stage_engine(stage)
        key = ecfg.model_dump_json()
        if key not in made:
            made[key] = engine_from_config(ecfg)
        out[stage] = made[key]
    return out


class ProgressBars:
    """The recipe's report(stage, done, total) as one progress line per stage."""

    def __init__(self):
        self.bars: dict[str, Progress] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.setdefault(stage, Progress(total, f"rewrite {stage}", unit="", every=5.0))
        bar.update(done - bar.done)
