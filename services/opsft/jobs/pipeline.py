"""Build and run a Ray Data corpus job: read -> parse (ids, resume) -> actor pool holding an
engine that applies a row function -> part files. Generic over the row function, so
`opsft score` runs opsft.scoring.score_rows and `opsft rewrite` can run its own.

    spec = JobSpec(input="corpus.jsonl", output="scored.parquet", fn="opsft.scoring:score_rows",
                   engine=EngineConfig(), pool=PoolConfig(min_size=1, max_size=2))
    plan = build_plan(spec)        # lazy: plan.stages / plan.dataset can be inspected, nothing runs
    summary = run_job(spec)        # executes; resumes from what the output already holds

`build_plan` needs a Ray connection (it lists the input files); `opsft.cluster.connect()` makes one.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.data

from opsft.config import EngineConfig, PoolConfig
from opsft.data.corpus import file_format
from opsft.jobs import files
from opsft.jobs.stages import EngineActor, PartsDatasink, parse_jsonl_files, parse_table

log = logging.getLogger(__name__)
# CPU share of the light stages (parse, write): actors that take every CPU of a node must not
# starve them (2 engine actors x 1 CPU on a 2-CPU machine would otherwise never write a row).
LIGHT_CPUS = 0.25


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


def warn_if_pool_cannot_fit(pool: PoolConfig) -> None:
    """The actor pool takes its CPUs before any row is read: if the cluster cannot hold the pool
    and the light read/write tasks together, the job waits until it can (forever on a fixed
    cluster). Say so, rather than hang in silence (an autoscaling cluster may still grow)."""
    need, have = pool.min_size * pool.num_cpus + LIGHT_CPUS, ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        log.warning("the engine pool needs %d x %g CPUs and its read/write tasks %g more: %g CPUs, but the cluster "
                    "has %g; the job waits until it has them (lower --cpus or --actors)", pool.min_size,
                    pool.num_cpus, LIGHT_CPUS, need, have)


def build_plan(spec: JobSpec) -> Plan:
    """The lazy Dataset of a job, and its stages as configured (reads the output's done ids)."""
    file_format(spec.input), file_format(spec.output)  # clear errors for unknown extensions
    pool = spec.pool
    if pool.min_size > pool.max_size:
        raise ValueError(f"pool.min_size {pool.min_size} > pool.max_size {pool.max_size}")
    skip = frozenset(files.done_ids(spec.output))
    resources = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
    custom = {"resources": dict(pool.resources)} if pool.resources else {}  # e.g. one engine per labelled node
    # Streaming re-blocking: a JSONL file is one block after parsing; blocks of batch_size rows spread
    # the work over the pool and let results be written (and resumed) as they come.
    ds = light_repartition(_read(spec, skip), pool.batch_size).map_batches(
        EngineActor,
        fn_constructor_kwargs={"engine": _engine_payload(spec.engine), "fn": spec.fn, "fn_kwargs": spec.fn_kwargs},
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        batch_size=pool.batch_size, batch_format="pyarrow", zero_copy_batch=False,
        ray_remote_args_fn=functools.partial(_remote_args, pool.max_restarts, pool.max_task_retries),
        **resources, **custom,
    )
    stages = [
        Stage("read", "read"),
        Stage("parse", "task", resources={"num_cpus": LIGHT_CPUS}),
        Stage("reblock", "task", batch_size=pool.batch_size),
        Stage(f"{spec.name}:{spec.engine.kind}", "actors", pool.min_size, pool.max_size, pool.batch_size,
              {**resources, **pool.resources, "max_restarts": pool.max_restarts,
               "max_task_retries": pool.max_task_retries}),
        Stage(f"write:{file_format(spec.output)}", "write", resources={"num_cpus": LIGHT_CPUS}),
    ]
    return Plan(spec, stages, ds, PartsDatasink(spec.output, spec.column_types, spec.rows_per_file), len(skip))


def run_job(spec: JobSpec) -> dict:
    """Execute the plan; a summary of rows in/out, error rows and tokens/s."""
    removed = files.remove_temporaries(spec.output)
    if removed:
        log.info("removed %d half-written part(s) of an earlier run", removed)
    plan = build_plan(spec)
    warn_if_pool_cannot_fit(spec.pool)
    if plan.skipped_ids:
        log.info("resuming: %d rows already in %s are skipped", plan.skipped_ids, spec.output)
    start = time.monotonic()
    plan.dataset.write_datasink(plan.datasink, ray_remote_args={"num_cpus": LIGHT_CPUS})
    elapsed = time.monotonic() - start
    res = plan.datasink.result or {"rows": 0, "skipped": 0, "error_rows": 0, "tokens": 0}
    return {
        "rows_in": res["rows"] + res["skipped"],
        "rows_written": res["rows"],
        "rows_skipped_already_done": res["skipped"],
        "rows_out_total": len(files.output_ids(spec.output)),
        "error_rows": res["error_rows"],
        "tokens": res["tokens"],
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(res["tokens"] / elapsed, 1) if elapsed > 0 else None,
        "output": spec.output,
    }


def spec_from_config(cfg, fn: str, *, name: str, fn_kwargs: dict | None = None,
                     column_types: dict | None = None) -> JobSpec:
    """A JobSpec from a command's config (anything with input, output, engine and pool):
    the hook `opsft rewrite` uses with its own row function."""
    if not cfg.input or not cfg.output:
        raise ValueError("a job needs input and output")
    return JobSpec(input=cfg.input, output=cfg.output, fn=fn, engine=cfg.engine, pool=cfg.pool,
                   fn_kwargs=dict(fn_kwargs or {}), column_types=column_types, name=name)
