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

import time

from opsft.cli.common import Progress, add_model_flags, print_summary
from opsft.cli.jobflags import add_job_flags, job_overrides
from opsft.data import storage
from opsft.data.corpus import check_corpus_paths
from opsft.engines import KINDS


def add_parser(sub) -> None:
    parser = sub.add_parser("rewrite", help="rewrite a corpus on-policy (self-first answers + hinted decoding)")
    parser.add_argument("--input", help="JSONL or Parquet corpus (prompt|messages, response, answer)")
    parser.add_argument("--output", help="JSONL or Parquet file to write (by extension)")
    add_model_flags(parser)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: float32 for hf, bfloat16 for vllm on a GPU)")
    parser.add_argument("--engine", choices=KINDS, help="engine of every stage (default hf)")
    parser.add_argument("--hd-engine", choices=KINDS, help="engine of the hinted-decoding stage "
                        "(default: --engine)")
    parser.add_argument("--policy", choices=["self-first", "hd-all"], help="default self-first")
    parser.add_argument("--verifier", help="numeric | exact | auto | rg:<task> (default auto)")
    parser.add_argument("--drop-unverified", action="store_true", default=None,
                        help="write rows whose rewrite fails verification to a side file instead")
    parser.add_argument("--beta", type=float, help="student weight slope (default 3)")
    parser.add_argument("--lambda-mode", choices=["linear", "sigmoid", "piecewise"], help="default linear")
    parser.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (default 0; official 0.3)")
    parser.add_argument("--top-p", type=float, help="nucleus at temperature 1 (default 0.95)")
    parser.add_argument("--max-new-tokens", type=int, help="per answer (default 1024)")
    parser.add_argument("--hint-max-new-tokens", type=int, help="per '# Analyze ... # CoT' hint (default 512)")
    parser.add_argument("--missing-hint", choices=["skip", "cot"], help="a hint with no usable analysis ended by "
                        "'# CoT': decode with the hinted stream opened at '# CoT:' (cot, default) or keep the "
                        "reference (skip, official)")
    parser.add_argument("--hint-cut", choices=["line", "marker"], help="how the hinted stream's analysis prefix "
                        "ends: with the line '# CoT:' (default) or with '# CoT' (the official rule)")
    parser.add_argument("--hint-prompt", choices=["analyze", "direct"], help="analyze: the model's analysis of the "
                        "reference first (default); direct: the hinted stream opens at '# CoT:' with no analysis")
    parser.add_argument("--splitter", help="switch to the student stream after this text (default '\\boxed{'; "
                                           "'' = never)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int, help="items per hinted-decoding batch (default 16)")
    add_job_flags(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from opsft.config import RewriteConfig, load_config
    from opsft.plan import preflight

    cfg = load_config(RewriteConfig, args.config, {
        "input": args.input, "output": args.output, "engine.model": args.model, "engine.dtype": args.dtype,
        "engine.kind": args.engine, "stages.hinted-decoding.engine.kind": args.hd_engine, **job_overrides(args),
        "policy": args.policy, "verifier": args.verifier, "drop_unverified": args.drop_unverified,
        "beta": args.beta, "lambda_mode": args.lambda_mode, "temperature": args.temperature, "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens, "hint_max_new_tokens": args.hint_max_new_tokens,
        "missing_hint": args.missing_hint, "hint_cut": args.hint_cut, "hint_prompt": args.hint_prompt,
        "splitter": args.splitter, "seed": args.seed, "batch_size": args.batch_size})
    if not cfg.input or not cfg.output:
        raise ValueError("--input and --output are required (on the command line or in --config)")
    check_corpus_paths(cfg.input, [cfg.output, dropped_path(cfg.output)])
    cfg.check_stages()  # an engine that cannot do a stage is refused here, before any model loads
    preflight(cfg)  # so is a GPU stage that cannot fit (opsft plan)
    if cfg.distributed or cfg.address:
        print_summary("rewrite (Ray Data)", rewrite_distributed(cfg))
    else:
        print_summary("rewrite", rewrite_in_process(cfg))
    return 0


def dropped_path(output: str) -> str:
    """<stem>.dropped.<ext> beside the output (a path or a URI)."""
    name = storage.name_of(output)
    stem, dot, ext = name.rpartition(".")
    return storage.join(storage.parent_of(output), f"{stem}.dropped.{ext}" if dot else f"{name}.dropped")


def rewrite_distributed(cfg) -> dict:
    """The recipe as one Ray Data job (opsft.jobs.pipeline.rewrite_spec, as the realignment cycle runs it)."""
    from opsft.cluster import connect
    from opsft.data.reader import iter_rows
    from opsft.jobs.pipeline import engine_pools, local_num_cpus, rewrite_spec, run_job
    from opsft.recipe import SUMMARY_COLUMNS, recipe_summary

    dropped = str(dropped_path(cfg.output)) if cfg.drop_unverified else None
    spec = rewrite_spec(cfg, cfg.input, cfg.output, dropped_output=dropped, rows_per_part=cfg.rows_per_part)
    connect(cfg.address, num_cpus=local_num_cpus(engine_pools(spec)))  # a local cluster fits every stage pool
    result = run_job(spec)
    return {**result, **recipe_summary(row for out in spec.outputs() if storage.exists(out)
                                       for row in iter_rows(out, SUMMARY_COLUMNS))}


def rewrite_in_process(cfg) -> dict:
    from opsft.data.reader import iter_rows
    from opsft.engines import engine_from_config
    from opsft.faults import EngineSlot
    from opsft.local_job import run_local_job
    from opsft.recipe import STAGE_NEEDS, SUMMARY_COLUMNS, recipe_summary, rewrite_rows

    def build() -> dict:
        """One engine per distinct engine config, for every engine stage."""
        made: dict[str, object] = {}
        out = {}
        for stage, need in STAGE_NEEDS.items():
            if need is None:
                continue
            ecfg = cfg.stage_engine(stage)
            key = ecfg.model_dump_json()
            if key not in made:
                made[key] = engine_from_config(ecfg)
            out[stage] = made[key]
        return out

    bars: dict[str, Progress] = {}

    def report(stage: str, done: int, total: int) -> None:
        bar = bars.setdefault(stage, Progress(total, f"rewrite {stage}", unit="", every=5.0))
        bar.update(done - bar.done)

    def rewrite(rows, engines, **kwargs):
        return rewrite_rows(rows, engines["score"], engines=engines, **kwargs)

    dropped = str(dropped_path(cfg.output)) if cfg.drop_unverified else None
    slot = EngineSlot(build, retries=cfg.pool.max_task_retries, what="rewrite engines")
    start = time.monotonic()
    steps = [{"fn": "rewrite", "params": cfg.recipe_params(),
              "engines": {stage: cfg.stage_engine(stage).identity() for stage in STAGE_NEEDS}}]
    try:
        result = run_local_job(cfg.input, cfg.output, rewrite, {"params": cfg.recipe_params(), "report": report},
                               slot, steps=steps, dropped_output=dropped, engine_arg=lambda engines: engines,
                               chunk_rows=max(cfg.pool.batch_size, 256))
        model = slot.current["score"].model_id
        out_of_step = {k: v for engine in slot.current.values() for k, v in getattr(engine, "stats", {}).items()}
    finally:
        slot.close()
    outputs = [cfg.output] + ([result["dropped_output"]] if result.get("dropped_output") else [])
    summary = recipe_summary(row for out in outputs for row in iter_rows(out, SUMMARY_COLUMNS))
    summary.update(model=model, output=cfg.output, seconds=round(time.monotonic() - start, 1),
                   rows_skipped_already_done=result["rows_skipped_already_done"],
                   engine_faults=result["engine_faults"])
    if result.get("dropped_output"):
        summary["dropped_output"] = result["dropped_output"]
    if out_of_step:  # vllm hinted decoding: pairs decoded again (opsft.engines.vllm_hd); those given up are counted
        summary["hinted_decoding"]["out_of_step_retried"] = out_of_step.get("out_of_step_retried", 0)
    return summary
