"""The stages of a Ray Data corpus job: parse input into rows (with ids), the actor that holds
an engine and applies a per-batch function `fn(rows, engine, **kwargs) -> rows`, and the
datasink that writes part files and counts what it wrote.

Rows travel between stages as one pickled dict per Arrow row (column `row`) next to their
`id`: a corpus has arbitrary, sometimes mixed-type columns, and pickling keeps every value
exactly as read, whatever the other blocks hold. Only the writer turns rows into Parquet
or JSONL (opsft.jobs.files). See docs/data_jobs.md.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import time

import pyarrow as pa
from ray.data import Datasink

from opsft.data.corpus import apply_rows, jsonl_rows, with_id
from opsft.jobs import files

log = logging.getLogger(__name__)


def _carrier(rows: list[dict], skip_ids: frozenset) -> pa.Table:
    rows = [with_id(r) for r in rows]
    ids = [r["id"] for r in rows]
    return pa.table({"row": pa.array([pickle.dumps(r, protocol=5) for r in rows], pa.binary()),
                     "id": pa.array(ids, pa.string()),
                     "skip": pa.array([i in skip_ids for i in ids], pa.bool_())})


def parse_jsonl_files(batch: dict, skip_ids: frozenset = frozenset()) -> pa.Table:
    """read_binary_files batch (bytes, path) -> carrier rows; a bad line becomes an error row."""
    return _carrier([row for data in batch["bytes"] for row in jsonl_rows(bytes(data))], skip_ids)


def parse_table(batch: pa.Table, skip_ids: frozenset = frozenset()) -> pa.Table:
    """read_parquet batch (any columns) -> carrier rows."""
    return _carrier(batch.to_pylist(), skip_ids)


def load_function(ref):
    """'package.module:function' -> the function (a callable is returned as it is)."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    if not name:
        raise ValueError(f"row function {ref!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def apply_batch(batch: pa.Table, fn, fn_kwargs: dict, engine) -> pa.Table:
    """fn over the rows of a carrier batch that are not skipped (row errors isolated: apply_rows)."""
    skip = batch.column("skip").to_pylist()
    todo = [k for k, s in enumerate(skip) if not s]
    if not todo:
        return batch
    blobs = batch.column("row").to_pylist()
    out = apply_rows(fn, [pickle.loads(blobs[k]) for k in todo], engine, fn_kwargs)
    for k, row in zip(todo, out, strict=True):
        blobs[k] = pickle.dumps(row, protocol=5)
    return pa.table({"row": pa.array(blobs, pa.binary()), "id": batch.column("id"), "skip": batch.column("skip")})


def task_batch(batch: pa.Table, fn, fn_kwargs: dict | None = None) -> pa.Table:
    """A stage without an engine (a Ray Data task, e.g. verification): fn(rows, None, **fn_kwargs)."""
    return apply_batch(batch, load_function(fn), dict(fn_kwargs or {}), None)


class EngineActor:
    """A Ray Data callable class: builds the engine once per actor, then maps batches."""

    def __init__(self, engine: dict, fn: str, fn_kwargs: dict | None = None):
        from opsft.engines import make_engine

        start = time.monotonic()
        self.fn, self.fn_kwargs = load_function(fn), dict(fn_kwargs or {})
        self.engine = make_engine(engine["kind"], engine.get("model"), **engine.get("options", {}))
        log.info("engine %s on %s ready in %.1fs", engine["kind"], self.engine.model_id, time.monotonic() - start)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return apply_batch(batch, self.fn, self.fn_kwargs, self.engine)


class PartsDatasink(Datasink):
    """Writes each write task's rows as one part file; counts rows, errors and tokens. With
    `dropped_output`, rows marked `dropped` (rewrite's drop_unverified) go to parts of that folder."""

    def __init__(self, output: str, column_types: dict | None = None, rows_per_file: int | None = None,
                 dropped_output: str | None = None):
        self.output, self.column_types, self.rows_per_file = output, column_types, rows_per_file
        self.dropped_output = dropped_output
        self.result: dict | None = None

    @property
    def min_rows_per_write(self) -> int | None:
        return self.rows_per_file

    def write(self, blocks, ctx) -> dict:
        rows, skipped = [], 0
        for block in blocks:
            for blob, skip in zip(block.column("row").to_pylist(), block.column("skip").to_pylist(), strict=True):
                if skip:
                    skipped += 1
                else:
                    rows.append(pickle.loads(blob))
        dropped = [r for r in rows if r.get("dropped")] if self.dropped_output else []
        kept = [r for r in rows if not r.get("dropped")] if self.dropped_output else rows
        if kept:
            files.write_part(self.output, kept, self.column_types)
        if dropped:
            files.write_part(self.dropped_output, dropped, self.column_types)
        return {"rows": len(rows), "skipped": skipped, "error_rows": sum(1 for r in rows if r.get("error")),
                "dropped": len(dropped), "tokens": sum(int(r.get("n_tokens") or 0) for r in rows)}

    def on_write_complete(self, write_result) -> None:
        total = {"rows": 0, "skipped": 0, "error_rows": 0, "dropped": 0, "tokens": 0}
        for part in write_result.write_returns:
            for key in total:
                total[key] += part[key]
        self.result = total
