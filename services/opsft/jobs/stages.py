"""The stages of a Ray Data corpus job: read pieces of the input into rows (with ids and their
row numbers), the actor that holds an engine and applies a per-batch function
`fn(rows, engine, **kwargs) -> rows`, the monitor that bounds retries, and the datasink that
writes part files with their progress records.

Rows travel between stages as one pickled dict per Arrow row (column `row`) next to their `id`
and their input row number (`_row`): a corpus has arbitrary, sometimes mixed-type columns, and
pickling keeps every value exactly as read, whatever the other blocks hold. Only the writer
turns rows into Parquet or JSONL (opsft.data.parts). See docs/data_jobs.md and docs/reliability.md.
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import pickle
import sys
import threading
import time

import pyarrow as pa
import ray
from ray.data import Datasink

from opsft.data import parts
from opsft.data.corpus import with_id
from opsft.data.reader import read_range
from opsft.faults import EngineFault, Guard, JobFailed, describe

log = logging.getLogger(__name__)
ROW = "_row"  # the carrier column of each row's number in the input corpus
EXIT_ENGINE_FAULT = 75  # the exit status of an engine actor that ends itself after an engine fault
WRITE_STEP = "write"  # the writer's name in the monitor's row counts


def _carrier(numbered: list[tuple[int, dict]]) -> pa.Table:
    rows = [with_id(r) for _, r in numbered]
    return pa.table({"row": pa.array([pickle.dumps(r, protocol=5) for r in rows], pa.binary()),
                     "id": pa.array([r["id"] for r in rows], pa.string()),
                     ROW: pa.array([n for n, _ in numbered], pa.int64())})


def read_pieces(batch: pa.Table) -> pa.Table:
    """A batch of input pieces (opsft.data.reader.corpus_ranges, as JSON, with the intervals of
    their rows already done) -> carrier rows of the rows still to do; a bad line is an error row."""
    numbered = []
    for item in batch.to_pylist():
        piece, done = json.loads(item["piece"]), json.loads(item["done"])
        numbered += [(n, row) for n, row in read_range(piece) if not (done and parts.contains(done, n))]
    return _carrier(numbered)


def rows_of(batch: pa.Table) -> list[dict]:
    return [pickle.loads(b) for b in batch.column("row").to_pylist()]


def with_rows(batch: pa.Table, rows: list[dict]) -> pa.Table:
    return pa.table({"row": pa.array([pickle.dumps(r, protocol=5) for r in rows], pa.binary()),
                     "id": batch.column("id"), ROW: batch.column(ROW)})


def load_function(ref):
    """'package.module:function' -> the function (a callable is returned as it is)."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    if not name:
        raise ValueError(f"row function {ref!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def task_batch(batch: pa.Table, fn, fn_kwargs: dict | None = None, monitor=None, step: str | None = None) -> pa.Table:
    """A stage without an engine (a Ray Data task, e.g. verification): fn(rows, None, **fn_kwargs);
    a row that raises alone gets `error` (there is no engine to blame). The rows done are counted
    with the job's monitor (progress)."""
    if not batch.num_rows:
        return batch
    out = with_rows(batch, Guard(None).apply(load_function(fn), rows_of(batch), dict(fn_kwargs or {})))
    if monitor is not None:  # waited for: when the job ends, its counts are complete
        ray.get(monitor.done.remote(step, batch.num_rows))
    return out


def batch_key(step: str, batch: pa.Table) -> str:
    """A batch's name across retries (Ray hands a retried task the same rows): step and row numbers."""
    numbers = batch.column(ROW)
    return f"{step}:{numbers[0].as_py()}..{numbers[-1].as_py()}:{batch.num_rows}"


class JobMonitor:
    """One per job (a Ray actor of no CPU): counts how often each batch was started, and records
    engine faults, so that a batch retried too often fails the job with its cause, and the
    summary says what was retried. It also counts the rows each stage finished (the job's
    progress lines, opsft.jobs.pipeline.ProgressLog)."""

    def __init__(self, max_tries: int):
        self.max_tries = max_tries
        self.tries: collections.Counter = collections.Counter()
        self.faults: list[dict] = []
        self.retries = 0  # tries beyond the first of the batches that finished (a batch tried 3 times: 2)
        self.engines: list = []  # every engine actor of the job (run_job ends them all when the job ends)
        self.stopped: str | None = None  # why the job was given up, when it was
        self.rows: collections.Counter = collections.Counter()  # stage -> rows finished (a retried batch once)

    def register(self, actor) -> None:
        self.engines.append(actor)

    def actors(self) -> list:
        return list(self.engines)

    def begin(self, key: str) -> str | None:
        """Count one start of this batch; the reason to give up when it was started too often."""
        self.tries[key] += 1
        if self.tries[key] <= self.max_tries:
            return None
        mine = [f for f in self.faults if f["batch"] == key]
        cause = (f"engine fault: {mine[-1]['cause']} (on {mine[-1]['host']}, pid {mine[-1]['pid']})" if mine else
                 "its engine actor died each time without reporting an engine fault (killed: out of memory, "
                 "preemption, a lost node?)")
        self.stopped = (f"batch {key} was started {self.tries[key]} times (at most {self.max_tries}): {cause}; "
                        f"{len(self.faults)} engine fault(s) in this job")
        return self.stopped

    def end(self, key: str, step: str | None = None, rows: int = 0) -> None:
        self.retries += self.tries.pop(key, 1) - 1
        if step is not None:
            self.rows[step] += rows

    def done(self, step: str, rows: int) -> None:
        """`rows` more rows finished `step` (a stage without an engine, or the writer)."""
        self.rows[step] += rows

    def fault(self, record: dict) -> None:
        self.faults.append(record)

    def report(self) -> dict:
        return {"engine_faults": len(self.faults), "batch_retries": self.retries, "stopped": self.stopped,
                "faults": self.faults[-20:], "unfinished": dict(self.tries), "rows": dict(self.rows)}


class EngineActor:
    """A Ray Data callable class: builds the engine once per actor, then maps batches. An engine
    fault (opsft.faults) is recorded with the job's monitor and ends this process, so that Ray
    restarts the actor with a new engine and runs the batch again; a batch started more than the
    monitor allows fails the job, naming the cause."""

    def __init__(self, engine: dict, fn: str, fn_kwargs: dict | None = None, monitor=None, step: str = "step",
                 stall_timeout_s: float | None = None):
        from opsft.engines import make_engine

        start = time.monotonic()
        self.fn, self.fn_kwargs, self.monitor, self.step = load_function(fn), dict(fn_kwargs or {}), monitor, step
        self.busy: dict[str, float] = {}  # the batches running now (several with calls_in_flight), since when
        if stall_timeout_s:
            threading.Thread(target=self._watch, args=(stall_timeout_s,), name="opsft-stall-watch", daemon=True).start()
        self.engine = make_engine(engine["kind"], engine.get("model"), **engine.get("options", {}))
        self.guard = Guard(self.engine)
        if monitor is not None:  # so that the job ends this actor even when Ray Data loses track of it
            ray.get(monitor.register.remote(ray.get_runtime_context().current_actor))
        log.info("engine %s on %s ready in %.1fs", engine["kind"], self.engine.model_id, time.monotonic() - start)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not batch.num_rows:
            return batch
        key = batch_key(self.step, batch)
        if self.monitor is not None:
            stop = ray.get(self.monitor.begin.remote(key))
            if stop:
                raise JobFailed(stop)
        self.busy[key] = time.monotonic()
        try:
            out = self.guard.apply(self.fn, rows_of(batch), self.fn_kwargs)
        except EngineFault as fault:
            self._die(key, fault)
        finally:
            self.busy.pop(key, None)
        if self.monitor is not None:  # waited for: when the job ends, its counts are complete
            ray.get(self.monitor.end.remote(key, self.step, batch.num_rows))
        return with_rows(batch, out)

    def _watch(self, limit_s: float) -> None:
        """A batch that runs longer than limit_s is taken for a hung engine (a call that never returns:
        a stuck device, an engine process lost without an error): an engine fault."""
        while True:
            time.sleep(min(5.0, limit_s / 4))
            stalled = [(key, since) for key, since in list(self.busy.items()) if time.monotonic() - since > limit_s]
            if stalled:
                self._die(stalled[0][0], EngineFault(f"the engine stalled: no result for {limit_s:g} s "
                                               f"(pool.stall_timeout_s) in stage {self.step}"))

    def _die(self, key: str, fault: EngineFault) -> None:
        """Record the fault, then end this process: Ray restarts the actor (a new engine) and runs the
        batch again. Nothing of the batch was written."""
        record = {"batch": key, "step": self.step, "cause": fault.cause, "check": fault.check,
                  "host": os.uname().nodename, "pid": os.getpid(), "time": time.time()}
        log.error("engine fault in %s (%s): %s; ending this actor so that Ray restarts it with a new engine",
                  self.step, key, describe(fault))
        try:
            if self.monitor is not None:
                ray.get(self.monitor.fault.remote(record), timeout=60)
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stderr.flush()
            os._exit(EXIT_ENGINE_FAULT)


class PartsDatasink(Datasink):
    """Writes each write task's rows as one part file with its progress record; counts rows,
    errors and tokens. With `dropped_output`, rows marked `dropped` (rewrite's drop_unverified)
    go to parts of that folder. With the job's `monitor`, the rows written are counted there as
    stage WRITE_STEP (progress)."""

    def __init__(self, output: str, column_types: dict | None = None, rows_per_part: int | None = None,
                 dropped_output: str | None = None, monitor=None):
        self.output, self.column_types, self.rows_per_part = output, column_types, rows_per_part
        self.dropped_output = dropped_output
        self.monitor = monitor
        self.result: dict | None = None

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_part

    def write(self, blocks, ctx) -> dict:
        rows, numbers = [], []
        for block in blocks:
            rows += rows_of(block)
            numbers += block.column(ROW).to_pylist()
        side = [bool(self.dropped_output and r.get("dropped")) for r in rows]
        written = 0
        for to_side in (False, True):
            mine = [(r, n) for r, n, s in zip(rows, numbers, side, strict=True) if s == to_side]
            if not mine:
                continue
            kept = [r for r, _ in mine]
            stats = {"error_rows": sum(1 for r in kept if r.get("error")), "dropped": len(kept) if to_side else 0,
                     "tokens": sum(int(r.get("n_tokens") or 0) for r in kept)}
            parts.write_part(self.dropped_output if to_side else self.output, kept, [n for _, n in mine],
                             self.column_types, stats)
            written += 1
        if self.monitor is not None:
            ray.get(self.monitor.done.remote(WRITE_STEP, len(rows)))
        return {"rows": len(rows), "error_rows": sum(1 for r in rows if r.get("error")), "dropped": sum(side),
                "tokens": sum(int(r.get("n_tokens") or 0) for r in rows), "parts": written}

    def on_write_complete(self, write_result) -> None:
        total = {"rows": 0, "error_rows": 0, "dropped": 0, "tokens": 0, "parts": 0}
        for part in write_result.write_returns:
            for key in total:
                total[key] += part[key]
        self.result = total
