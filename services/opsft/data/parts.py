"""The output folder of a corpus job, and its progress. Ray-free (pyarrow only); local or s3://.

A Ray Data job writes its output path as a FOLDER of part files, whatever the extension says:
`scored.parquet/part-<first row>-<digest>.parquet` (`.jsonl` parts for a `.jsonl` output). Every
input row has a number (its position in the input corpus, opsft.data.reader), and every part has
a manifest beside it, `.rows-<part name>.json`: which input rows it holds (as intervals) and its
counts (rows, error rows, tokens, dropped). The manifest is written first and counts only once
its part exists; the part is written under a temporary name and moved into place when complete.
So a killed job leaves whole parts (and temporaries, removed on the next run), and

- resume reads the manifests only (never the rows): the intervals of input rows already done,
  merged, are at most one per batch; a rerun skips those rows when it reads its ranges;
- a part's name comes from the rows it holds: a write that Ray runs again writes the same name
  (replacing, never duplicating), so each row is in the folder exactly once;
- end-of-job counts are sums over manifests: no row is read.

A folder also holds `.opsft-job.json`: what it is the output of (the input's files with sizes and
modification times, and the job's steps). A rerun against another input or other steps is
refused rather than mixed into it.

    name = write_part("out.parquet", rows, row_numbers, column_types, stats={"error_rows": 1})
    done = progress("out.parquet")      # done.intervals, done.rows, done.stats
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from opsft import score_columns
from opsft.data import reader, storage
from opsft.data.corpus import file_format, jsonl_line, rows_table

PART_PREFIX, MANIFEST_PREFIX, JOB_FILE = reader.PART_PREFIX, reader.MANIFEST_PREFIX, reader.JOB_FILE
# Rows per Parquet row group of a part: reading a job's folder in input order keeps one row group of
# each part that overlaps others in memory, so small groups keep that small (~1 MB a part).
PART_ROW_GROUP = 1024

# Arrow types for the columns opsft adds, so a part whose rows are all errors (nulls)
# still has the same schema as the others.
ARROW_OF = {"float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}
# Arrow types of the columns scoring adds (and of id): from opsft.score_columns
SCORE_TYPES = {**{name: ARROW_OF[kind] for name, kind in score_columns.FIELD_TYPES.items()},
               "token_phi": pa.list_(pa.float64()), "error": pa.string(), "id": pa.string()}


# ---------------------------------------------------------------------------- intervals of row numbers


def coalesce(numbers: Iterable[int]) -> list[list[int]]:
    """Sorted half-open intervals [a, b) that hold exactly these numbers (duplicates refused)."""
    ordered = sorted(int(n) for n in numbers)
    out: list[list[int]] = []
    for k, n in enumerate(ordered):
        if k and n == ordered[k - 1]:
            raise ValueError(f"row number {n} appears twice in one part")
        if out and out[-1][1] == n:
            out[-1][1] = n + 1
        else:
            out.append([n, n + 1])
    return out


def merge(intervals: Iterable[list[int]]) -> tuple[list[list[int]], int]:
    """(the union of intervals, sorted and coalesced; how many numbers were covered more than once)."""
    out: list[list[int]] = []
    overlap = 0
    for a, b in sorted((int(a), int(b)) for a, b in intervals):
        if out and a <= out[-1][1]:
            overlap += max(0, min(b, out[-1][1]) - a)
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out, overlap


def covered(intervals: list[list[int]]) -> int:
    return sum(b - a for a, b in intervals)


def within(intervals: list[list[int]], start: int, stop: int) -> list[list[int]]:
    """The parts of sorted, disjoint intervals that fall in [start, stop)."""
    out = []
    for a, b in intervals:
        if b <= start:
            continue
        if a >= stop:
            break
        out.append([max(a, start), min(b, stop)])
    return out


def contains(intervals: list[list[int]], n: int) -> bool:
    """Whether n is in one of these sorted, disjoint intervals (binary search)."""
    lo, hi = 0, len(intervals)
    while lo < hi:
        mid = (lo + hi) // 2
        if intervals[mid][1] <= n:
            lo = mid + 1
        else:
            hi = mid
    return lo < len(intervals) and intervals[lo][0] <= n


# ---------------------------------------------------------------------------- parts


def part_name(intervals: list[list[int]], fmt: str) -> str:
    digest = hashlib.sha256(json.dumps(intervals).encode()).hexdigest()[:16]
    first = intervals[0][0] if intervals else 0
    return f"{PART_PREFIX}{first:012d}-{digest}.{fmt}"


def write_part(folder: str, rows: list[dict], row_numbers: list[int],
               column_types: dict[str, pa.DataType] | None = None, stats: dict | None = None) -> str:
    """Write rows (input rows `row_numbers`, one each) as one part of the output folder, with its
    manifest; returns the part's path. The same rows always get the same part name."""
    if len(row_numbers) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(row_numbers)} row numbers")
    order = sorted(range(len(rows)), key=lambda k: row_numbers[k])  # a part holds its rows in input order
    rows, row_numbers = [rows[k] for k in order], [row_numbers[k] for k in order]
    fmt = file_format(folder)
    intervals = coalesce(row_numbers)
    name = part_name(intervals, fmt)
    manifest = {"part": name, "rows": len(rows), "intervals": intervals, **(stats or {})}
    storage.write_bytes_atomic(storage.join(folder, MANIFEST_PREFIX + name + ".json"),
                               json.dumps(manifest).encode())
    path = storage.join(folder, name)
    with storage.atomic_output(path) as handle:
        if fmt == "parquet":
            pq.write_table(rows_table(rows, column_types), handle, row_group_size=PART_ROW_GROUP)
        else:
            for row in rows:
                handle.write(jsonl_line(row))
    return path


def check_folder(folder: str) -> None:
    """Refuse an output path that is a file: a job writes a folder of parts."""
    if storage.is_file(folder):
        raise ValueError(f"{folder} is a file; a Ray Data job writes its output as a folder of part files "
                         "(choose a new output path, or delete the file)")


def part_files(folder: str) -> list[str]:
    """Complete part files of an output folder, sorted (empty if the folder does not exist)."""
    check_folder(folder)
    return [storage.full_path(folder, e.path) for e in storage.listdir(folder)
            if e.type.name == "File" and e.base_name.startswith(PART_PREFIX)]


def remove_temporaries(folder: str) -> int:
    """Delete what a killed job left half done: temporaries, and manifests whose part never came.
    Returns how many files."""
    if not storage.is_dir(folder):
        return 0
    entries = storage.listdir(folder)
    parts = {e.base_name for e in entries if e.base_name.startswith(PART_PREFIX)}
    stale = [e for e in entries if e.base_name.startswith(storage.TMP_PREFIX)
             or (e.base_name.startswith(MANIFEST_PREFIX) and _manifest_part(e.base_name) not in parts)]
    for e in stale:
        storage.delete(storage.full_path(folder, e.path))
    return len(stale)


def _manifest_part(name: str) -> str:
    return name[len(MANIFEST_PREFIX):].removesuffix(".json")


@dataclass
class Progress:
    """What an output folder already holds, from its manifests."""

    intervals: list[list[int]] = field(default_factory=list)  # input rows done, merged
    rows: int = 0  # rows in the parts (== covered(intervals) unless a row was written twice)
    parts: int = 0
    stats: dict = field(default_factory=dict)  # sums of the manifests' counts
    duplicated: int = 0  # rows held by more than one part (never, unless a folder was edited by hand)


def progress(*folders: str) -> Progress:
    """The progress of one or more output folders (a job and its side output), from the manifests
    of their complete parts. A part without a manifest (written by another tool or an older
    opsft) cannot be placed: refused, in one line."""
    out = Progress()
    spans: list[list[int]] = []  # merged as records are read: the done rows are few intervals, not one per batch
    for folder in folders:
        check_folder(folder)
        entries = storage.listdir(folder)
        manifests = {_manifest_part(e.base_name): e for e in entries if e.base_name.startswith(MANIFEST_PREFIX)}
        for e in entries:
            if not e.base_name.startswith(PART_PREFIX):
                continue
            if e.base_name not in manifests:
                raise ValueError(f"{folder}: part {e.base_name} has no progress record ({MANIFEST_PREFIX}"
                                 f"{e.base_name}.json), so its rows cannot be matched to the input: it was not "
                                 "written by this version of opsft; write to a new output folder")
            record = json.loads(storage.read_bytes(storage.full_path(folder, manifests[e.base_name].path)))
            spans, twice = merge(spans + record["intervals"])
            out.duplicated += twice
            out.rows += int(record["rows"])
            out.parts += 1
            for key, value in record.items():
                if key not in ("part", "rows", "intervals") and isinstance(value, int | float):
                    out.stats[key] = out.stats.get(key, 0) + value
    out.intervals = spans
    return out


# ---------------------------------------------------------------------------- what the folder is the output of


def job_identity(input_path: str, steps: list) -> dict:
    """What makes an output folder the output of one job: the input's files (names, sizes,
    modification times) and the job's steps (functions, settings, engines)."""
    files = storage.fingerprint_entries(input_path)
    blob = json.dumps({"files": files, "steps": steps}, sort_keys=True, default=str)
    return {"input": str(input_path), "digest": hashlib.sha256(blob.encode()).hexdigest()[:16], "steps": steps}


def claim(folders: list[str], identity: dict, has_rows: bool) -> None:
    """Record that these folders hold the output of `identity`; refuse, in one line, folders that
    hold rows of another job (another input, or another model or settings)."""
    for folder in folders:
        path = storage.join(folder, JOB_FILE)
        if has_rows and storage.exists(path):
            found = json.loads(storage.read_bytes(path))
            if found.get("digest") != identity["digest"]:
                raise ValueError(f"{folder} holds the output of another job (input {found.get('input')}, job "
                                 f"{found.get('digest')}; this one: input {identity['input']}, job "
                                 f"{identity['digest']}: the input changed since, or the model or settings did); "
                                 "resume only continues the same job: choose another output or delete it")
        storage.write_bytes_atomic(path, json.dumps(identity, default=str).encode())
