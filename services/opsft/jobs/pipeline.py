"""Build and run a Ray Data corpus job: read the input in pieces (the rows not yet done) -> one
or more map steps (an actor pool holding an engine that applies a row function, or CPU tasks)
-> part files with progress records. Generic over the row functions: `opsft score` runs one step
(score_spec below: opsft.scoring.score_rows), `opsft rewrite --ray` and the realignment cycle
run the recipe's stages (rewrite_spec below).

    spec = JobSpec(input="corpus.jsonl", output="scored.parquet", fn="opsft.scoring:score_rows",
                   engine=EngineConfig(), pool=PoolConfig(min_size=1, max_size=2))
    plan = build_plan(spec)        # lazy: plan.stages / plan.dataset can be inspected, nothing runs
    summary = run_job(spec)        # executes; resumes from what the output already holds

Resume, exactly once, and faults: docs/reliability.md. `build_plan` needs a Ray connection;
`opsft.cluster.connect()` makes one.

Progress: in a terminal, Ray Data's own progress bars. Elsewhere (a log file, a Ray job's driver log,
`make demo`) Ray Data would log a block of lines every 10 s; there its bars are off for the job's
dataset (DataContext.enable_progress_bars) and the job logs one line per stage every
OPSFT_PROGRESS_S seconds (default 30; 0: none), from the row counts of its JobMonitor:

    score [1m30s] score: 640/1000 rows (64%), 7.1 rows/s, ~50s left
    score [1m30s] write: 576/1000 rows (58%), 6.4 rows/s, ~1m6s left
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.data

from opsft.cluster import quiet_data_progress
from opsft.config import ROWS_PER_PART, EngineConfig, PoolConfig
from opsft.data import parts
from opsft.data.corpus import file_format
from opsft.data.reader import corpus_ranges
from opsft.faults import JobFailed
from opsft.jobs.stages import WRITE_STEP, EngineActor, JobMonitor, PartsDatasink, read_pieces, task_batch
from opsft.recipe_plan import STAGE_NEEDS, stages_for
from opsft.stages import check_stages, engine_stages

log = logging.getLogger(__name__)
# CPU share of the light stages (read, write): actors that take every CPU of a node must not
# starve them (2 engine actors x 1 CPU on a 2-CPU machine would otherwise never write a row).
LIGHT_CPUS = 0.25
# Bytes of JSONL input per read task: small pieces keep the output's parts close to input order (parts
# written side by side hold rows of the pieces in flight), which keeps reading them in order cheap.
JOB_RANGE_BYTES = 4 << 20
PROGRESS_ENV = "OPSFT_PROGRESS_S"  # seconds between the progress lines of a job outside a terminal; 0: none
DEFAULT_PROGRESS_S = 30.0


@dataclass
class StepSpec:
    """One map step of a job: fn(rows, engine, **fn_kwargs) -> rows on an actor pool of `engine`
    (its own pool, or the job's), or as light CPU tasks with engine None when `engine` is None."""

    name: str
    fn: Any
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    engine: EngineConfig | None = None
    pool: PoolConfig | None = None
    need: str | None = None  # the engine capability it uses (opsft.engines.base.CAPABILITIES)


# map_batches calls a vLLM generation actor runs at once by default (PoolConfig.calls_in_flight): four
# batches of the default 64 rows keep 256 sequences (vLLM's max_num_seqs) in its scheduler
VLLM_CALLS_IN_FLIGHT = 4


def calls_in_flight(step: StepSpec, pool: PoolConfig) -> int:
    """Concurrent calls of a step's engine actor: the pool's setting, else VLLM_CALLS_IN_FLIGHT for a vLLM
    engine that generates (its Feeder serves them together), else 1. Hinted decoding keeps 1: its waves
    drive the runner themselves, a pair's two requests started in one engine step (engines/vllm.py)."""
    if pool.calls_in_flight is not None:
        return pool.calls_in_flight
    return VLLM_CALLS_IN_FLIGHT if step.engine.kind == "vllm" and step.need == "generate" else 1


@dataclass
class JobSpec:
    """Everything a corpus job needs; the CLI fills it from the command's config."""

    input: str
    output: str
    fn: Any  # 'package.module:function' (or a picklable callable): fn(rows, engine, **fn_kwargs) -> rows
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    column_types: dict | None = None  # Arrow types of the columns fn adds (see parts.SCORE_TYPES)
    name: str = "job"
    rows_per_part: int = ROWS_PER_PART  # rows per output part (at least; the last part may hold fewer)
    steps: list[StepSpec] | None = None  # None: one step, fn on engine / pool
    dropped_output: str | None = None  # rows marked `dropped` go here (a folder of parts too)
    need: str | None = None  # the capability fn uses of its engine (one-step jobs; steps name their own)
    progress_s: float | None = None  # progress lines outside a terminal: seconds apart (0: none; None: env or 30)

    def all_steps(self) -> list[StepSpec]:
        return self.steps or [StepSpec(self.name, self.fn, self.fn_kwargs, self.engine, self.pool, self.need)]

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
    dataset: Any  # the lazy ray.data.Dataset (not yet written); None when every row is done
    datasink: PartsDatasink
    n_rows: int  # rows of the input
    done: parts.Progress  # what the outputs already held
    pieces: int  # input pieces still to read


def _engine_payload(engine: EngineConfig) -> dict:
    return {"kind": engine.kind, "model": engine.model, "options": engine.options()}


def _fn_name(fn) -> str:
    return fn if isinstance(fn, str) else f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"


def job_steps(spec: JobSpec) -> list[dict]:
    """What the job computes, step by step (its identity: a rerun with other steps is refused)."""
    return [{"name": s.name, "fn": _fn_name(s.fn), "fn_kwargs": json.loads(json.dumps(s.fn_kwargs, default=str)),
             "engine": None if s.engine is None else s.engine.identity()}
            for s in spec.all_steps()]


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


def _actor_step(ds, step: StepSpec, pool: PoolConfig, monitor):
    resources = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
    custom = {"resources": dict(pool.resources)} if pool.resources else {}  # e.g. one engine per labelled node
    # Ray Data restarts a dead actor and retries its batch without bound; the job's monitor bounds the
    # tries of each batch (pool.max_task_retries) and names the cause when a batch exceeds them.
    calls = calls_in_flight(step, pool)
    concurrent = {"max_concurrent_calls_per_actor": calls, "enable_true_multi_threading": True} if calls > 1 else {}
    ds = ds.map_batches(
        EngineActor,
        fn_constructor_kwargs={"engine": _engine_payload(step.engine), "fn": step.fn, "fn_kwargs": step.fn_kwargs,
                               "monitor": monitor, "step": step.name, "stall_timeout_s": pool.stall_timeout_s},
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size, **concurrent),
        batch_size=pool.batch_size, batch_format="pyarrow", zero_copy_batch=False, **resources, **custom,
    )
    return ds, _actor_stage(step, pool)


def _actor_stage(step: StepSpec, pool: PoolConfig) -> Stage:
    return Stage(f"{step.name}:{step.engine.kind}", "actors", pool.min_size, pool.max_size, pool.batch_size,
                 {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, **pool.resources,
                  "max_task_retries": pool.max_task_retries, "calls_in_flight": calls_in_flight(step, pool)})


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


def block_rows(n_rows: int, spec: JobSpec) -> int:
    """Rows per block between the stages: enough blocks for every actor to have work (8 per actor of the
    largest pool), but blocks of up to 16 actor batches on large inputs, since the driver keeps state
    for every block of every stage (Ray Data's metrics: blocks of one batch made a score job's driver
    grow by ~55 MB per 1M rows). An actor runs its batches of a block one after the other."""
    batch = spec.pool.batch_size
    actors = max((s.pool or spec.pool).max_size for s in spec.all_steps())
    return max(batch, min(16 * batch, math.ceil(n_rows / (8 * actors))))


def _todo(pieces: list[dict], done: parts.Progress) -> list[dict]:
    """The input pieces that still hold rows to do, each with the intervals of its rows already done."""
    todo = []
    for piece in pieces:
        mine = [iv for a, b in piece["numbers"] for iv in parts.within(done.intervals, a, b)]
        if parts.covered(mine) < int(piece["rows"]):
            todo.append({"piece": json.dumps(piece), "done": json.dumps(mine)})
    return todo


def build_plan(spec: JobSpec, monitor=None) -> Plan:
    """The lazy Dataset of a job and its stages as configured: the input's pieces (driver: the
    Parquet footers, or one streamed pass over JSONL for its line ends), minus what the outputs'
    progress records say is done. `monitor`: the job's JobMonitor actor (run_job makes one)."""
    file_format(spec.input), file_format(spec.output)  # clear errors for unknown extensions
    steps = spec.all_steps()
    for step in steps:
        pool = step.pool or spec.pool
        if pool.min_size > pool.max_size:
            raise ValueError(f"{step.name}: pool.min_size {pool.min_size} > pool.max_size {pool.max_size}")
    pieces = corpus_ranges(spec.input, JOB_RANGE_BYTES)
    n_rows = pieces[0]["n_rows"] if pieces else 0
    done = parts.progress(*spec.outputs())
    todo = _todo(pieces, done)
    block = block_rows(n_rows, spec)
    stages = [Stage("read", "task", resources={"num_cpus": LIGHT_CPUS}), Stage("reblock", "task", batch_size=block)]
    ds = None
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map_batches(read_pieces, batch_size=1, batch_format="pyarrow", num_cpus=LIGHT_CPUS)
        # streaming re-blocking: blocks of batch_size rows spread the work over the pools and let results be
        # written (and resumed) as they come
        ds = light_repartition(ds, block)
    for step in steps:
        pool = step.pool or spec.pool
        if step.engine is None:  # a CPU stage: light tasks, no engine
            if ds is not None:
                ds = ds.map_batches(task_batch, fn_kwargs={"fn": step.fn, "fn_kwargs": step.fn_kwargs,
                                                           "monitor": monitor, "step": step.name},
                                    batch_size=spec.pool.batch_size, batch_format="pyarrow", zero_copy_batch=False,
                                    num_cpus=LIGHT_CPUS)
            stages.append(Stage(step.name, "task", batch_size=spec.pool.batch_size,
                                resources={"num_cpus": LIGHT_CPUS}))
        elif ds is not None:
            ds, stage = _actor_step(ds, step, pool, monitor)
            stages.append(stage)
        else:
            stages.append(_actor_stage(step, pool))
    stages.append(Stage(f"write:{file_format(spec.output)}", "write", resources={"num_cpus": LIGHT_CPUS}))
    sink = PartsDatasink(spec.output, spec.column_types, spec.rows_per_part, spec.dropped_output, monitor)
    return Plan(spec, stages, ds, sink, n_rows, done, len(todo))


def run_job(spec: JobSpec) -> dict:
    """Execute the plan; a summary of rows in / out, error rows, retries and tokens/s. Raises
    JobFailed (naming the cause) when a batch kept failing, or when a row went missing."""
    for out in spec.outputs():
        parts.check_folder(out)
        removed = parts.remove_temporaries(out)
        if removed:
            log.info("removed %d half-written file(s) of an earlier run in %s", removed, out)
    max_tries = 1 + max((s.pool or spec.pool).max_task_retries for s in spec.all_steps())
    monitor = ray.remote(JobMonitor).options(num_cpus=0).remote(max_tries)
    try:
        plan = build_plan(spec, monitor)
        parts.claim(spec.outputs(), parts.job_identity(spec.input, job_steps(spec)), has_rows=plan.done.parts > 0)
        warn_if_pool_cannot_fit(engine_pools(spec))
        if plan.done.rows:
            log.info("resuming: %d of %d rows already in %s are skipped", plan.done.rows, plan.n_rows,
                     " + ".join(spec.outputs()))
        start = time.monotonic()
        if plan.dataset is not None:
            progress = None
            if quiet_data_progress(plan.dataset):  # outside a terminal: our lines instead of Ray Data's
                progress = ProgressLog.for_job(spec, plan, monitor)
            try:
                plan.dataset.write_datasink(plan.datasink, ray_remote_args={"num_cpus": LIGHT_CPUS})
            except Exception as exc:
                report = ray.get(monitor.report.remote())
                raise JobFailed(_failure(spec, exc, report)) from exc
            finally:
                if progress is not None:
                    progress.stop()
        elapsed = time.monotonic() - start
        report = ray.get(monitor.report.remote())
    finally:
        end_job(monitor)
    after = parts.progress(*spec.outputs())
    lost = plan.n_rows - parts.covered(parts.within(after.intervals, 0, plan.n_rows))
    if lost or after.duplicated:
        raise JobFailed(f"{spec.name}: the outputs hold {after.rows} rows for {plan.n_rows} input rows ({lost} "
                        f"missing, {after.duplicated} written twice); the rows already written are kept: rerun to "
                        "finish")
    res = plan.datasink.result or {"rows": 0, "error_rows": 0, "dropped": 0, "tokens": 0, "parts": 0}
    summary = {
        "rows_in": plan.n_rows,
        "rows_written": res["rows"],
        "rows_skipped_already_done": plan.done.rows,
        "rows_out_total": after.rows,
        "rows_lost": lost,
        "error_rows": res["error_rows"],
        "error_rows_total": int(after.stats.get("error_rows", 0)),
        "parts": after.parts,
        "engine_faults": report["engine_faults"],
        "batch_retries": report["batch_retries"],
        "tokens": res["tokens"],
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(res["tokens"] / elapsed, 1) if elapsed > 0 else None,
        "output": spec.output,
        "steps": [f"{st.name}:{st.engine.kind}" if st.engine else st.name for st in spec.all_steps()],
    }
    if spec.dropped_output:
        summary.update(dropped=res["dropped"], dropped_output=spec.dropped_output)
    return summary


def progress_interval(spec: JobSpec, environ=None) -> float:
    """Seconds between a job's progress lines: spec.progress_s, else OPSFT_PROGRESS_S, else 30; 0 = none."""
    if spec.progress_s is not None:
        return float(spec.progress_s)
    raw = (os.environ if environ is None else environ).get(PROGRESS_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_PROGRESS_S
    except ValueError:
        raise ValueError(f"{PROGRESS_ENV}={raw!r}: the seconds between a job's progress lines (0: none)") from None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s}s" if m else f"{s}s"


class ProgressLog:
    """One line per stage every `interval_s` seconds, from the job monitor's row counts (report()["rows"]:
    stage -> rows finished). A stage that has not started, or has finished and said so once, is quiet
    (before any stage has rows: one line for the job); stop() logs the stages not yet reported finished
    (so every job ends with where each stage got to). A stage's rate counts from the first line that saw
    it running (a later stage starts late: the job's age would understate it). A thread of the driver."""

    def __init__(self, name: str, stages: list[str], total: int, report: Callable[[], dict], interval_s: float,
                 emit: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.name, self.stages, self.total, self.report = name, stages, total, report
        self.interval_s, self.emit, self.clock = interval_s, emit or log.info, clock
        self.start = clock()
        self.finished: set[str] = set()
        self.first_seen: dict[str, tuple[float, int]] = {}  # stage -> (time, rows) of the first line with rows
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_job(cls, spec: JobSpec, plan: Plan, monitor) -> ProgressLog | None:
        interval = progress_interval(spec)
        if interval <= 0:
            return None
        total = plan.n_rows - plan.done.rows
        stages = [s.name for s in spec.all_steps()] + [WRITE_STEP]
        progress = cls(spec.name, stages, total, lambda: ray.get(monitor.report.remote(), timeout=60), interval)
        progress._thread = threading.Thread(target=progress._run, name="opsft-progress", daemon=True)
        progress._thread.start()
        return progress

    def lines(self) -> list[str]:
        rows = self.report().get("rows") or {}
        now = self.clock()  # one reading for every line of this report
        elapsed = now - self.start
        if not any(rows.get(stage) for stage in self.stages):  # actors still starting: one line, not one a stage
            return [f"{self.name} [{_duration(elapsed)}] {self.total} rows to do; no stage has finished a batch yet"]
        out = []
        for stage in self.stages:
            if stage in self.finished:
                continue
            n = int(rows.get(stage, 0))
            if not n:  # not started: quiet
                continue
            line = f"{self.name} [{_duration(elapsed)}] {stage}: {n}/{self.total} rows"
            if self.total:
                line += f" ({100 * n // self.total}%)"
            if n >= self.total:
                self.finished.add(stage)
                out.append(line + ", done")
                continue
            since, n0 = self.first_seen.setdefault(stage, (now, n))
            rate = (n - n0) / (now - since) if now > since else 0.0
            if rate > 0:
                line += f", {rate:.3g} rows/s, ~{_duration((self.total - n) / rate)} left"
            out.append(line)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                for line in self.lines():
                    self.emit(line)
            except Exception as exc:  # noqa: BLE001 - progress is a nicety: never the reason a job fails
                log.debug("progress: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        try:
            for line in self.lines():
                self.emit(line)
        except Exception as exc:  # noqa: BLE001 - the monitor may be gone with a failed job
            log.debug("progress: %s", exc)


def end_job(monitor) -> None:
    """End the job's engine actors and its monitor. Ray Data ends its actors when a job finishes, but an
    actor that was restarting when a job failed can outlive it, holding its CPUs and GPUs (seen: the next
    job on the cluster waited for ever)."""
    try:
        actors = ray.get(monitor.actors.remote(), timeout=60)
    except Exception:  # noqa: BLE001 - the monitor itself may be gone; nothing more to end then
        actors = []
    for actor in actors + [monitor]:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass


def _failure(spec: JobSpec, exc: Exception, report: dict) -> str:
    """One line: why the job stopped (the monitor's reason when it gave up on a batch)."""
    if report.get("stopped"):  # the monitor gave up on a batch: its own words
        reason = report["stopped"]
    else:
        text = " ".join(str(exc).split())
        last = report["faults"][-1]["cause"] if report["faults"] else None
        reason = f"{type(exc).__name__}: {text[:300]}" + (f"; last engine fault: {last}" if last else "")
    return (f"{spec.name} stopped ({report['engine_faults']} engine fault(s), {report['batch_retries']} batch "
            f"retries): {reason}; rows written so far are kept, a rerun resumes")


def score_spec(input: str, output: str, engine: EngineConfig, pool: PoolConfig, *, include_eos: bool = False,
               tokens: bool = False, temperature: float = 1.0, name: str = "score",
               rows_per_part: int = ROWS_PER_PART) -> JobSpec:
    """The Ray Data job of `opsft score`: what `opsft score --ray` and the realignment cycle's score and
    rescore stages run (opsft.scoring.score_rows on an actor pool, the score columns' fixed types)."""
    return JobSpec(input=input, output=output, fn="opsft.scoring:score_rows", engine=engine.for_stage("score"),
                   pool=pool, fn_kwargs={"include_eos": include_eos, "tokens": tokens, "temperature": temperature},
                   column_types=parts.SCORE_TYPES, name=name, rows_per_part=rows_per_part, need="score")


def rewrite_spec(cfg, input: str, output: str, *, model: str | None = None, engine: EngineConfig | None = None,
                 pool: PoolConfig | None = None, dropped_output: str | None = None,
                 rows_per_part: int = ROWS_PER_PART) -> JobSpec:
    """The Ray Data job of the on-policy recipe (opsft.recipe's stages, one map step each): what
    `opsft rewrite --ray` and the realignment cycle both run. cfg: a RewriteConfig (its engine and
    pool, or `engine` / `pool` given here, with cfg.stages' per-stage overrides); `model`
    replaces every stage engine's model (the cycle's current model). Refuses (ValueError) a stage
    whose engine cannot do it, before anything runs."""
    params = cfg.recipe_fields()  # flat and JSON-ready: the job's identity records them
    check_stages(cfg, engine, pool)
    engines = {stage: (eng, pl) for stage, eng, pl in engine_stages(cfg, engine, pool)}
    steps = []
    for i, stage in enumerate(stages_for(cfg.policy)):
        kwargs = {"stage": stage, "params": params, "first": i == 0}
        if stage not in engines:
            steps.append(StepSpec(stage, "opsft.recipe:rewrite_stage", kwargs))
            continue
        stage_engine, stage_pool = engines[stage]
        stage_engine = stage_engine.for_stage(STAGE_NEEDS[stage])  # its own vLLM runner
        if model is not None:
            stage_engine = stage_engine.model_copy(update={"model": model})
        steps.append(StepSpec(stage, "opsft.recipe:rewrite_stage", kwargs, stage_engine, stage_pool,
                              need=STAGE_NEEDS[stage]))
    return JobSpec(input=input, output=output, fn="opsft.recipe:rewrite_stage", engine=engine or cfg.engine,
                   pool=pool or cfg.pool, name="rewrite", steps=steps, dropped_output=dropped_output,
                   rows_per_part=rows_per_part)
