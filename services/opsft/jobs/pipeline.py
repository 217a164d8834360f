"""Build and run a Ray Data corpus job: read -> parse (ids, resume) -> one or more map steps
(an actor pool holding an engine that applies a row function, or CPU tasks) -> part files.
Generic over the row functions: `opsft score` runs one step (score_spec below: opsft.scoring.score_rows),
`opsft rewrite --ray` and the realignment cycle run the recipe's stages (rewrite_spec below).

    spec = JobSpec(input="corpus.jsonl", output="scored.parquet", fn="opsft.scoring:score_rows",
                   engine=EngineConfig(), pool=PoolConfig(min_size=1, max_size=2))
    plan = build_plan(spec)        # lazy: plan.stages / plan.dataset can be inspected, nothing runs
    summary = run_job(spec)        # executes; resumes from what the output already holds

`build_plan` needs a Ray connection (it lists the input files); `opsft.cluster.connect()` makes one.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.data

from opsft.config import EngineConfig, PoolConfig
from opsft.data.corpus import file_format
from opsft.jobs import files
from opsft.jobs.stages import EngineActor, PartsDatasink, parse_jsonl_files, parse_table, task_batch

log = logging.getLogger(__name__)
# CPU share of the light stages (parse, write): actors that take every CPU of a node must not
# starve them (2 engine actors x 1 CPU on a 2-CPU machine would otherwise never write a row).
LIGHT_CPUS = 0.25


@dataclass
class StepSpec:
    """One map step of a job: fn(rows, engine, **fn_kwargs) -> rows on an actor pool of `engine`
    (its own pool, or the job's), or as light CPU tasks with engine None when `engine` is None."""

    name: str
    fn: Any
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    engine: EngineConfig | None = None
    pool: PoolConfig | None = None


@dataclass
class JobSpec:
    """Everything a corpus job needs; the CLI fills it from the command's config."""

    input: str
    output: str
    fn: Any  # 'package.module:function' (or a picklable callable): fn(rows, engine, **fn_kwargs) -> rows
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    column_types: dict | None = None  # Arrow types of the columns fn adds (see files.SCORE_TYPES)
    name: str = "job"
    rows_per_file: int | None = None  # rows per output part (resume granularity); None = one per actor batch
    steps: list[StepSpec] | None = None  # None: one step, fn on engine / pool
    dropped_output: str | None = None  # rows marked `dropped` go here (a folder of parts too)

    def all_steps(self) -> list[StepSpec]:
        return self.steps or [StepSpec(self.name, self.fn, self.fn_kwargs, self.engine, self.pool)]

    def outputs(self) -> list[str]:
        return [self.output] + ([self.dropped_output] if self.dropped_output else [])


@dataclass
class Stage:
    """One step of the plan as configured: what a plan test checks without running anything."""

    name: str
    kind: str  # read | task | actors | write
    min_actors: int | None = None
    max_actors: int | None = None
    batch_size: int | None = None
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class Plan:
    spec: JobSpec
    stages: list[Stage]
    dataset: Any  # the lazy ray.data.Dataset (not yet written)
    datasink: PartsDatasink
    skipped_ids: int


def _engine_payload(engine: EngineConfig) -> dict:
    return {"kind": engine.kind, "model": engine.model, "options": engine.options()}


def _remote_args(max_restarts: int, max_task_retries: int) -> dict:
    """Actor fault tolerance: a dead engine actor is restarted and its batch retried."""
    return {"max_restarts": max_restarts, "max_task_retries": max_task_retries}


def _read(spec: JobSpec, skip: frozenset):
    if file_format(spec.input) == "jsonl":
        ds = ray.data.read_binary_files(spec.input, file_extensions=["jsonl", "json"], num_cpus=LIGHT_CPUS)
        return ds.map_batches(parse_jsonl_files, fn_kwargs={"skip_ids": skip}, batch_size=1, batch_format="numpy",
                              num_cpus=LIGHT_CPUS)
    ds = ray.data.read_parquet(spec.input, num_cpus=LIGHT_CPUS)
    return ds.map_batches(parse_table, fn_kwargs={"skip_ids": skip}, batch_format="pyarrow",
                          batch_size=spec.pool.batch_size, num_cpus=LIGHT_CPUS)


def light_repartition(ds, rows_per_block: int):
    """ds.repartition(target_num_rows_per_block=...) whose tasks ask for LIGHT_CPUS: Ray Data gives a
    repartition task 1 CPU and has no option for it, so a pool that leaves less than one CPU free
    (two 0.75-CPU actors on 2 CPUs) would wait for that CPU forever. Ray is pinned (2.60): the
    logical operator's remote args are the ones its tasks get (tests/test_jobs.py checks)."""
    ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    ds._logical_plan.dag.ray_remote_args["num_cpus"] = LIGHT_CPUS
    return ds


def warn_if_pool_cannot_fit(pools: list[PoolConfig]) -> None:
    """The actor pools take their CPUs before any row is read: if the cluster cannot hold them
    and the light read/write tasks together, the job waits until it can (forever on a fixed
    cluster). Say so, rather than hang in silence (an autoscaling cluster may still grow)."""
    need, have = sum(p.min_size * p.num_cpus for p in pools) + LIGHT_CPUS, ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        log.warning("the %d engine pool(s) need %s CPUs and the read/write tasks %g more: %g CPUs, but the cluster "
                    "has %g; the job waits until it has them (lower --cpus or --actors)", len(pools),
                    " + ".join(f"{p.min_size} x {p.num_cpus:g}" for p in pools), LIGHT_CPUS, need, have)


def _actor_step(ds, step: StepSpec, pool: PoolConfig):
    resources = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
    custom = {"resources": dict(pool.resources)} if pool.resources else {}  # e.g. one engine per labelled node
    ds = ds.map_batches(
        EngineActor,
        fn_constructor_kwargs={"engine": _engine_payload(step.engine), "fn": step.fn, "fn_kwargs": step.fn_kwargs},
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        batch_size=pool.batch_size, batch_format="pyarrow", zero_copy_batch=False,
        ray_remote_args_fn=functools.partial(_remote_args, pool.max_restarts, pool.max_task_retries),
        **resources, **custom,
    )
    stage = Stage(f"{step.name}:{step.engine.kind}", "actors", pool.min_size, pool.max_size, pool.batch_size,
                  {**resources, **pool.resources, "max_restarts": pool.max_restarts,
                   "max_task_retries": pool.max_task_retries})
    return ds, stage


def engine_pools(spec: JobSpec) -> list[PoolConfig]:
    """The actor pool of each engine step, in order."""
    return [s.pool or spec.pool for s in spec.all_steps() if s.engine is not None]


def local_num_cpus(pools: list[PoolConfig]) -> int:
    """Logical CPUs for a local Ray cluster that can hold these pools' minimum actors and the light
    read/write tasks: at least this machine's cores. Ray CPUs are a scheduling count, so a rewrite
    with four 1-CPU engine pools runs on a 2-core laptop (each actor's torch then uses 1 thread)
    instead of waiting forever for CPUs that do not exist."""
    need = sum(p.min_size * p.num_cpus for p in pools) + 2 * LIGHT_CPUS
    return max(os.cpu_count() or 1, math.ceil(need))


def build_plan(spec: JobSpec) -> Plan:
    """The lazy Dataset of a job, and its stages as configured (reads the output's done ids)."""
    file_format(spec.input), file_format(spec.output)  # clear errors for unknown extensions
    steps = spec.all_steps()
    for step in steps:
        pool = step.pool or spec.pool
        if pool.min_size > pool.max_size:
            raise ValueError(f"{step.name}: pool.min_size {pool.min_size} > pool.max_size {pool.max_size}")
    skip = frozenset(i for out in spec.outputs() for i in files.done_ids(out))
    # Streaming re-blocking: a JSONL file is one block after parsing; blocks of batch_size rows spread
    # the work over the pool and let results be written (and resumed) as they come.
    ds = light_repartition(_read(spec, skip), spec.pool.batch_size)
    stages = [Stage("read", "read"), Stage("parse", "task", resources={"num_cpus": LIGHT_CPUS}),
              Stage("reblock", "task", batch_size=spec.pool.batch_size)]
    for step in steps:
        if step.engine is None:  # a CPU stage: light tasks, no engine
            ds = ds.map_batches(task_batch, fn_kwargs={"fn": step.fn, "fn_kwargs": step.fn_kwargs},
                                batch_size=spec.pool.batch_size, batch_format="pyarrow", zero_copy_batch=False,
                                num_cpus=LIGHT_CPUS)
            stages.append(Stage(step.name, "task", batch_size=spec.pool.batch_size,
                                resources={"num_cpus": LIGHT_CPUS}))
        else:
            ds, stage = _actor_step(ds, step, step.pool or spec.pool)
            stages.append(stage)
    stages.append(Stage(f"write:{file_format(spec.output)}", "write", resources={"num_cpus": LIGHT_CPUS}))
    sink = PartsDatasink(spec.output, spec.column_types, spec.rows_per_file, spec.dropped_output)
    return Plan(spec, stages, ds, sink, len(skip))


def run_job(spec: JobSpec) -> dict:
    """Execute the plan; a summary of rows in/out, error rows and tokens/s."""
    for out in spec.outputs():
        removed = files.remove_temporaries(out)
        if removed:
            log.info("removed %d half-written part(s) of an earlier run in %s", removed, out)
    plan = build_plan(spec)
    warn_if_pool_cannot_fit(engine_pools(spec))
    if plan.skipped_ids:
        log.info("resuming: %d rows already in %s are skipped", plan.skipped_ids, " + ".join(spec.outputs()))
    start = time.monotonic()
    plan.dataset.write_datasink(plan.datasink, ray_remote_args={"num_cpus": LIGHT_CPUS})
    elapsed = time.monotonic() - start
    res = plan.datasink.result or {"rows": 0, "skipped": 0, "error_rows": 0, "dropped": 0, "tokens": 0}
    summary = {
        "rows_in": res["rows"] + res["skipped"],
        "rows_written": res["rows"],
        "rows_skipped_already_done": res["skipped"],
        "rows_out_total": sum(len(files.output_ids(out)) for out in spec.outputs()),
        "error_rows": res["error_rows"],
        "tokens": res["tokens"],
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(res["tokens"] / elapsed, 1) if elapsed > 0 else None,
        "output": spec.output,
        "steps": [f"{st.name}:{st.engine.kind}" if st.engine else st.name for st in spec.all_steps()],
    }
    if spec.dropped_output:
        summary.update(dropped=res["dropped"], dropped_output=spec.dropped_output)
    return summary


def score_spec(input: str, output: str, engine: EngineConfig, pool: PoolConfig, *, include_eos: bool = False,
               tokens: bool = False, temperature: float = 1.0, name: str = "score") -> JobSpec:
    """The Ray Data job of `opsft score`: what `opsft score --ray` and the realignment cycle's score and
    rescore stages run (opsft.scoring.score_rows on an actor pool, the score columns' fixed types)."""
    return JobSpec(input=input, output=output, fn="opsft.scoring:score_rows", engine=engine, pool=pool,
                   fn_kwargs={"include_eos": include_eos, "tokens": tokens, "temperature": temperature},
                   column_types=files.SCORE_TYPES, name=name)


def rewrite_spec(cfg, input: str, output: str, *, model: str | None = None, engine: EngineConfig | None = None,
                 pool: PoolConfig | None = None, dropped_output: str | None = None) -> JobSpec:
    """The Ray Data job of the on-policy recipe (opsft.recipe's stages, one map step each): what
    `opsft rewrite --ray` and the realignment cycle both run. cfg: a RewriteConfig (its engine and
    pool, or `engine` / `pool` given here, with cfg.stages' per-stage overrides); `model`
    replaces every stage engine's model (the cycle's current model). Refuses (ValueError) a stage
    whose engine cannot do it, before anything runs."""
    from opsft.recipe import STAGE_NEEDS, stages_for

    params = cfg.recipe_params()
    cfg.check_stages(engine)
    steps = []
    for i, stage in enumerate(stages_for(cfg.policy)):
        kwargs = {"stage": stage, "params": params, "first": i == 0}
        if STAGE_NEEDS[stage] is None:
            steps.append(StepSpec(stage, "opsft.recipe:rewrite_stage", kwargs))
            continue
        stage_engine = cfg.stage_engine(stage, engine)
        if model is not None:
            stage_engine = stage_engine.model_copy(update={"model": model})
        steps.append(StepSpec(stage, "opsft.recipe:rewrite_stage", kwargs, stage_engine, cfg.stage_pool(stage, pool)))
    return JobSpec(input=input, output=output, fn="opsft.recipe:rewrite_stage", engine=engine or cfg.engine,
                   pool=pool or cfg.pool, name="rewrite", steps=steps, dropped_output=dropped_output)
