"""A corpus job in this process: the in-process twin of the Ray Data job (opsft.jobs.pipeline),
used by `opsft score` and `opsft rewrite` without --ray. Ray-free.

The input is streamed in chunks of rows through a row function `fn(rows, engine, **kwargs)` on an
EngineSlot (opsft.faults: an engine fault rebuilds the engine and does the chunk again, never
writes it). Each chunk becomes a part of a hidden work folder beside the output
(`.<name>.inprogress.<ext>/`, opsft.data.parts: parts with progress records); at the end the parts
are streamed into the one output file (atomically) and the work folder is removed. So memory
holds one chunk, not the corpus, and a run that was killed resumes from its work folder.

    summary = run_local_job("in.jsonl", "out.parquet", score_rows, {"tokens": False}, slot)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from opsft.data import parts, storage
from opsft.data.corpus import write_rows, write_rows_chunked
from opsft.data.reader import corpus_ranges, iter_rows, read_range
from opsft.faults import EngineSlot, JobFailed

log = logging.getLogger(__name__)
CHUNK_ROWS = 256  # rows per call of the row function (and per part of the work folder)


def work_folder(output: str) -> str:
    """The hidden folder of parts beside `output` where an in-process job keeps its progress."""
    name = storage.name_of(output)
    stem, dot, ext = name.partition(".")
    return storage.join(storage.parent_of(output), f".{stem}.inprogress.{ext}" if dot else f".{name}.inprogress")


def run_local_job(input: str, output: str, fn: Callable, fn_kwargs: dict, slot: EngineSlot, *,
                  steps: list | None = None, chunk_rows: int = CHUNK_ROWS, column_types: dict | None = None,
                  dropped_output: str | None = None, engine_arg: Callable | None = None,
                  report: Callable[[int, int], None] | None = None) -> dict:
    """Run fn over every row of `input` into `output` (rows marked `dropped` into `dropped_output`,
    written only when there are some). steps: what identifies the job (a rerun with other steps
    does not resume from a work folder of this one). report(done, total) after each chunk."""
    outputs = [output] + ([dropped_output] if dropped_output else [])
    work = {out: work_folder(out) for out in outputs}
    for folder in work.values():
        parts.remove_temporaries(folder)
    identity = parts.job_identity(input, steps or [getattr(fn, "__qualname__", str(fn))])
    try:
        done = parts.progress(*work.values())
        parts.claim(list(work.values()), identity, has_rows=done.parts > 0)
    except ValueError as exc:  # the work folder of an earlier, different run (opsft's own): started afresh
        log.warning("%s; starting afresh", exc)
        for folder in work.values():
            storage.delete(folder)
        done = parts.progress(*work.values())
        parts.claim(list(work.values()), identity, has_rows=False)
    if done.rows:
        log.info("resuming an interrupted run: %d rows already done in %s", done.rows, work[output])
    pieces = corpus_ranges(input, 4 << 20)
    n_rows = pieces[0]["n_rows"] if pieces else 0
    counts = {"rows": 0, "error_rows": 0, "dropped": 0}
    chunk: list[tuple[int, dict]] = []

    def flush() -> None:
        rows = slot.run(fn, [row for _, row in chunk], fn_kwargs, engine_arg)
        numbers = [n for n, _ in chunk]
        for to_side in (False, True):
            if to_side and not dropped_output:
                continue
            mine = [(r, n) for r, n in zip(rows, numbers, strict=True)
                    if bool(dropped_output and r.get("dropped")) == to_side]
            if mine:
                kept = [r for r, _ in mine]
                stats = {"error_rows": sum(1 for r in kept if r.get("error")), "dropped": len(kept) if to_side else 0}
                parts.write_part(work[dropped_output if to_side else output], kept, [n for _, n in mine],
                                 column_types, stats)
        counts["rows"] += len(rows)
        counts["error_rows"] += sum(1 for r in rows if r.get("error"))
        counts["dropped"] += sum(1 for r in rows if dropped_output and r.get("dropped"))
        chunk.clear()
        if report is not None:
            report(done.rows + counts["rows"], n_rows)

    for piece in pieces:
        for number, row in read_range(piece):
            if done.intervals and parts.contains(done.intervals, number):
                continue
            chunk.append((number, row))
            if len(chunk) >= chunk_rows:
                flush()
    if chunk:
        flush()
    after = parts.progress(*work.values())
    lost = n_rows - parts.covered(parts.within(after.intervals, 0, n_rows))
    if lost or after.duplicated:
        raise JobFailed(f"{output}: {after.rows} rows done for {n_rows} input rows ({lost} missing, "
                        f"{after.duplicated} twice); the work folder {work[output]} is kept: rerun to finish")
    written = {}
    for out, folder in work.items():
        has_parts = bool(storage.exists(folder) and parts.part_files(folder))
        if out == output or has_parts:
            written[out] = write_rows_chunked(lambda f=folder: iter_rows(f), out) if has_parts else _empty(out)
        storage.delete(folder)
    return {"rows_in": n_rows, "rows_written": counts["rows"], "rows_skipped_already_done": done.rows,
            "rows_out_total": sum(written.values()), "error_rows": counts["error_rows"],
            "engine_faults": len(slot.faults), "output": output,
            **({"dropped": counts["dropped"] + int(done.stats.get("dropped", 0)), "dropped_output": dropped_output}
               if dropped_output and dropped_output in written else {})}


def _empty(path: str) -> int:
    write_rows([], path)
    return 0
