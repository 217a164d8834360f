"""One way to run each command: score a corpus file, rewrite a corpus file, evaluate models. Plain
arguments and an engine; `opsft score|rewrite|eval` only map their flags and configs to these, and the
workflows and benchmarks call them too.

In this process, `engine` is an engine (opsft.engines; the caller keeps and closes it), or a function
of no arguments that builds one: an engine fault then closes it and builds a new one, up to `retries`
times per chunk of rows (opsft.faults.EngineSlot), and it is closed at the end. The input streams
through in chunks into a hidden work folder beside the output, so a killed run resumes
(opsft.local_job). The Ray Data twins (`score_on_ray`, `rewrite_on_ray`) take engine configs instead:
each actor builds its own engine.

    summary = score_file("corpus.jsonl", "scored.parquet", HFEngine(None))
    summary = rewrite_file("corpus.jsonl", "rewritten.jsonl", lambda: make_engine("hf"), RewriteParams())
    results, table = evaluate({"base": engine}, [EvalTask.from_spec("gsm_symbolic:50")], output="eval/")
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable

from opsft.data import storage
from opsft.data.corpus import refuse_overwrite, write_rows, write_text_atomic
from opsft.data.parts import SCORE_TYPES
from opsft.data.reader import iter_rows, read_rows
from opsft.faults import EngineSlot
from opsft.local_job import CHUNK_ROWS, run_local_job
from opsft.recipe import SUMMARY_COLUMNS as RECIPE_COLUMNS
from opsft.recipe import recipe_summary, rewrite_rows
from opsft.recipe_plan import ENGINE_STAGES, RewriteParams
from opsft.scoring import SUMMARY_COLUMNS as SCORE_COLUMNS
from opsft.scoring import score_rows, summary

Report = Callable[[int, int], None]  # (rows done, rows in all)
EVAL_FILES = ("eval.json", "table.md", "items.jsonl")  # what evaluate writes into its output folder


def _slot(engine, retries: int, what: str) -> tuple[EngineSlot, bool]:
    """(the slot running `engine`, whether the slot owns its engines: built here, closed here)."""
    owned = callable(engine)
    slot = EngineSlot(engine if owned else (lambda: engine), retries=retries if owned else 0, what=what)
    slot.what = f"{getattr(slot.current, 'name', '')} {what}".strip()  # "the hf engine failed ..."
    return slot, owned


def score_file(input: str, output: str, engine, *, include_eos: bool = False, tokens: bool = False,
               temperature: float = 1.0, retries: int = 3, identity: dict | None = None,
               report: Report | None = None) -> dict:
    """CLL of every row of `input` (a corpus file or a job's folder, local or s3://) into `output`, in this
    process. identity: what names the engine in the job's identity (a rerun with another resumes nothing;
    default: the engine's model id). Returns opsft.scoring.summary's figures of the output and the run's."""
    slot, owned = _slot(engine, retries, "engine")
    kwargs = {"include_eos": include_eos, "tokens": tokens, "temperature": temperature}
    start = time.monotonic()
    try:
        model = slot.current.model_id
        steps = [{"fn": "score", "kwargs": kwargs, "engine": identity or {"model": model}}]
        result = run_local_job(input, output, score_rows, kwargs, slot, column_types=SCORE_TYPES, steps=steps,
                               report=report)
    finally:
        if owned:
            slot.close()
    elapsed = time.monotonic() - start
    figures = summary(iter_rows(output, SCORE_COLUMNS))
    return {**figures, "model": model, "output": output, "seconds": round(elapsed, 2),
            "tokens_per_s": round(figures["tokens"] / elapsed, 1) if elapsed else None,
            "rows_skipped_already_done": result["rows_skipped_already_done"], "engine_faults": result["engine_faults"]}


def rewrite_file(input: str, output: str, engines, params: RewriteParams | None = None, *,
                 dropped_output: str | None = None, retries: int = 3, chunk_rows: int = CHUNK_ROWS,
                 identity: dict | None = None, report: Callable[[str, int, int], None] | None = None) -> dict:
    """The on-policy recipe (opsft.recipe.rewrite_rows) over every row of `input` into `output`, in this
    process. engines: one engine for every stage, or {stage: engine} for each engine stage
    (opsft.recipe_plan.ENGINE_STAGES), or a function building either. With params.drop_unverified the
    rows whose rewrite failed go to `dropped_output` (required then). identity: what names the engines in
    the job's identity (default: their model ids). report(stage, done, total) as rewrite_rows reports.
    Returns opsft.recipe.recipe_summary's figures over both outputs and the run's."""
    params = params or RewriteParams()
    if params.drop_unverified and not dropped_output:
        raise ValueError("drop_unverified needs a dropped_output for the rows it drops (nothing is lost)")
    dropped_output = dropped_output if params.drop_unverified else None
    owned = callable(engines)  # built here (rebuilt after a fault, closed at the end), or the caller's
    build = engines if owned else (lambda: engines)
    slot = EngineSlot(lambda: _per_stage(build()), retries=retries if owned else 0, what="rewrite engines")

    def rewrite(rows, stage_engines, **kwargs):
        return rewrite_rows(rows, stage_engines["score"], engines=stage_engines, **kwargs)

    start = time.monotonic()
    try:
        engine_ids = identity or {stage: {"model": e.model_id} for stage, e in slot.current.items()}
        steps = [{"fn": "rewrite", "params": params.fields(), "engines": engine_ids}]
        result = run_local_job(input, output, rewrite, {"params": params, "report": report}, slot, steps=steps,
                               dropped_output=dropped_output, engine_arg=lambda current: current,
                               chunk_rows=chunk_rows)
        model = slot.current["score"].model_id
        stats = {k: v for engine in slot.current.values() for k, v in getattr(engine, "stats", {}).items()}
    finally:
        if owned:
            slot.close()
    outputs = [output] + ([result["dropped_output"]] if result.get("dropped_output") else [])
    figures = recipe_summary(row for out in outputs for row in iter_rows(out, RECIPE_COLUMNS))
    figures.update(model=model, output=output, seconds=round(time.monotonic() - start, 1),
                   rows_skipped_already_done=result["rows_skipped_already_done"],
                   engine_faults=result["engine_faults"])
    if result.get("dropped_output"):
        figures["dropped_output"] = result["dropped_output"]
    if stats:  # vllm hinted decoding: pairs decoded again (opsft.engines.vllm_hd); those given up are counted
        figures["hinted_decoding"]["out_of_step_retried"] = stats.get("out_of_step_retried", 0)
    return figures


def _per_stage(engines) -> dict:
    """{stage: engine} for every engine stage, from one engine or a partial dict (the score stage's engine,
    else the first given, serves the stages not named)."""
    if not isinstance(engines, dict):
        return {stage: engines for stage in ENGINE_STAGES}
    unknown = set(engines) - set(ENGINE_STAGES)
    if unknown or not engines:
        raise ValueError(f"engines: name engine stages ({', '.join(ENGINE_STAGES)}), got {sorted(engines)}")
    default = engines.get("score", next(iter(engines.values())))
    return {stage: engines.get(stage, default) for stage in ENGINE_STAGES}


def evaluate(models: dict, tasks: list, *, family: list[str] = (), seed: int = 1234, exclude: list[str] = (),
             passages: int = 16, tokens_per_passage: int = 256, text: str = "pydoc", output: str | None = None,
             config: dict | None = None, report: Callable[[str], None] | None = None) -> tuple[list[dict], str]:
    """Accuracy on reasoning-gym tasks and general-text retention (opsft.evaluation.evaluate_model) of every
    model, one after the other. models: {label: engine, or a function building it (then closed before the
    next model starts)}; the first is the baseline of the NLL change. tasks: opsft.evaluation.EvalTask.
    exclude: corpora whose questions are never evaluated. With `output` (a folder or s3://...), writes
    eval.json (every figure, and `config` when given), table.md and items.jsonl there. Returns (results
    with their labels, the markdown table)."""
    from opsft.evaluation import evaluate_model, results_table

    report = report or (lambda message: None)
    if not tasks:
        raise ValueError("no tasks to evaluate")
    if not models:
        raise ValueError("no models to evaluate")
    if output:
        refuse_overwrite([output, *(storage.join(output, name) for name in EVAL_FILES)], exclude)
    excluded = [row for path in exclude for row in read_rows(path)]
    results, items = [], []
    for label, engine in models.items():
        built = callable(engine)
        engine = engine() if built else engine
        report(f"== {label}: {engine.model_id}")
        try:
            result, records = evaluate_model(engine, tasks, family=list(family), seed=seed, exclude=excluded,
                                             passages=passages, tokens_per_passage=tokens_per_passage,
                                             text_source=text, report=report)
        finally:  # vllm: its runners are shut down before the next model's start
            if built and hasattr(engine, "close"):
                engine.close()
            del engine
            gc.collect()
        results.append({"label": label, **result})
        items += [{"model": label, **r} for r in records]
    table = results_table(results, [r["label"] for r in results])
    if output:
        write_text_atomic(storage.join(output, "eval.json"),
                          json.dumps({"config": config, "results": results}, indent=2, default=str))
        write_text_atomic(storage.join(output, "table.md"), table + "\n")
        write_rows(items, storage.join(output, "items.jsonl"))
    return results, table


# ---------------------------------------------------------------------------- the Ray Data twins


def score_on_ray(input: str, output: str, engine, pool, *, include_eos: bool = False, tokens: bool = False,
                 temperature: float = 1.0, rows_per_part: int | None = None, address: str | None = None) -> dict:
    """score_file as a Ray Data job (an actor pool of `engine`, an EngineConfig; `pool` a PoolConfig): the
    output is a folder of part files, a rerun resumes by id. Returns the job's figures and the same corpus
    figures as score_file, streamed from the output part by part."""
    from opsft.cluster import connect
    from opsft.jobs.pipeline import run_job, score_spec

    connect(address)
    extra = {} if rows_per_part is None else {"rows_per_part": rows_per_part}
    result = run_job(score_spec(input, output, engine, pool, include_eos=include_eos, tokens=tokens,
                                temperature=temperature, **extra))
    return {**result, **summary(iter_rows(output, SCORE_COLUMNS))}


def rewrite_on_ray(cfg, input: str, output: str, *, dropped_output: str | None = None) -> dict:
    """rewrite_file as one Ray Data job (opsft.jobs.pipeline.rewrite_spec, as the realignment cycle runs it):
    cfg a RewriteConfig (its engines, pools, per-stage overrides, settings)."""
    from opsft.cluster import connect
    from opsft.jobs.pipeline import engine_pools, local_num_cpus, rewrite_spec, run_job

    spec = rewrite_spec(cfg, input, output, dropped_output=dropped_output if cfg.drop_unverified else None,
                        rows_per_part=cfg.rows_per_part)
    connect(cfg.address, num_cpus=local_num_cpus(engine_pools(spec)))  # a local cluster fits every stage pool
    result = run_job(spec)
    return {**result, **recipe_summary(row for out in spec.outputs() if storage.exists(out)
                                       for row in iter_rows(out, RECIPE_COLUMNS))}


def dropped_path(output: str) -> str:
    """<stem>.dropped.<ext> beside the output (a path or a URI): where `opsft rewrite --drop-unverified`
    puts the rows it drops."""
    name = storage.name_of(output)
    stem, dot, ext = name.rpartition(".")
    return storage.join(storage.parent_of(output), f"{stem}.dropped.{ext}" if dot else f"{name}.dropped")
