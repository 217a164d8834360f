"""The output folder of a Ray Data corpus job, and resume by id. Ray-free (pyarrow only).

A job writes its output path as a FOLDER of part files, whatever the extension says:
`scored.parquet/part-<uuid>.parquet` (or `.jsonl` parts for a `.jsonl` output). Each part is
written under a hidden temporary name and renamed into place when complete, so a job that
is killed leaves only whole parts behind (plus temporaries, removed on the next run).
Re-running the job reads the ids already in the folder and skips those input rows; the
final folder holds every row exactly once. Works on any pyarrow filesystem URI (s3://...).

    rows = read_output("scored.parquet")        # all rows of all parts (or of a single file)
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from opsft import score_columns
from opsft.data.corpus import file_format, jsonl_line, jsonl_rows, rows_table

PART_PREFIX = "part-"
TMP_PREFIX = ".tmp-"

# Arrow types for the columns opsft adds, so a part whose rows are all errors (nulls)
# still has the same schema as the others.
ARROW_OF = {"float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}
# Arrow types of the columns scoring adds (and of id): from opsft.score_columns
SCORE_TYPES = {**{name: ARROW_OF[kind] for name, kind in score_columns.FIELD_TYPES.items()},
               "token_phi": pa.list_(pa.float64()), "error": pa.string(), "id": pa.string()}


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/key."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).absolute())


def part_files(path: str) -> list[str]:
    """Complete part files of an output folder, sorted (empty if the folder does not exist)."""
    fs, root = filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        raise ValueError(f"{path} is a file; a Ray Data job writes its output as a folder of part files "
                         "(choose a new output path, or delete the file)")
    found = fs.get_file_info(pafs.FileSelector(root))
    return sorted(f.path for f in found if f.type == pafs.FileType.File and f.base_name.startswith(PART_PREFIX))


def remove_temporaries(path: str) -> int:
    """Delete half-written parts left by a killed job; returns how many."""
    fs, root = filesystem(path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return 0
    stale = [f.path for f in fs.get_file_info(pafs.FileSelector(root)) if f.base_name.startswith(TMP_PREFIX)]
    for p in stale:
        fs.delete_file(p)
    return len(stale)


def _iter_part(fs: pafs.FileSystem, part: str, columns: list[str] | None = None, batch_rows: int = 8192):
    """A part's (or a single corpus file's) rows, only `columns` when given (a column the file lacks
    reads as None). Parquet is read a record batch at a time, so a large file is never held whole;
    a JSONL part is read whole (parts are bounded by the job's batch size)."""
    columns = columns or None
    if part.endswith(".parquet"):
        with fs.open_input_file(part) as handle:
            pfile = pq.ParquetFile(handle)
            have = [c for c in columns if c in pfile.schema_arrow.names] if columns else None
            if have == []:  # none of the columns exist: one all-None row per row of the file
                for _ in range(pfile.metadata.num_rows):
                    yield dict.fromkeys(columns)
                return
            for batch in pfile.iter_batches(batch_size=batch_rows, columns=have):
                for r in batch.to_pylist():
                    yield {c: r.get(c) for c in columns} if columns else r
        return
    with fs.open_input_stream(part) as handle:
        rows = jsonl_rows(handle.read())
    yield from ({c: r.get(c) for c in columns} for r in rows) if columns else rows


def _read_part(fs: pafs.FileSystem, part: str, columns: list[str] | None = None) -> list[dict]:
    return list(_iter_part(fs, part, columns))


def read_output(path: str) -> list[dict]:
    """Every row of a job's output folder (parts in name order), or of a single corpus file."""
    fs, root = filesystem(path)
    if fs.get_file_info(root).type == pafs.FileType.File:
        return _read_part(fs, root)
    return [row for part in part_files(path) for row in _read_part(fs, part)]


def iter_rows(path: str, columns: list[str] | None = None):
    """The rows of a job's output folder part by part (or of a single file), only `columns` when
    given: what a driver reads to summarise an output without holding it whole."""
    fs, root = filesystem(path)
    info = fs.get_file_info(root)
    parts = [root] if info.type == pafs.FileType.File else part_files(path)
    for part in parts:
        yield from _iter_part(fs, part, columns)


def count_rows(path: str) -> int:
    """Rows of a job's output folder or of a single corpus file (Parquet: from the footers)."""
    fs, root = filesystem(path)
    parts = [root] if fs.get_file_info(root).type == pafs.FileType.File else part_files(path)
    total = 0
    for part in parts:
        if part.endswith(".parquet"):
            with fs.open_input_file(part) as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        else:
            total += sum(1 for _ in _iter_part(fs, part))
    return total


def output_ids(path: str) -> list[str]:
    """The id of every row already written to an output folder, one per row."""
    fs, _ = filesystem(path)
    return [str(r.get("id")) for part in part_files(path) for r in _read_part(fs, part, ["id"])]


def done_ids(path: str) -> set[str]:
    """Ids of the rows already written to an output folder (what a resumed job skips)."""
    return set(output_ids(path))


def write_part(path: str, rows: list[dict], column_types: dict[str, pa.DataType] | None = None) -> str:
    """Write rows as one new part file of the output folder (atomically); returns its path."""
    fmt = file_format(path)
    fs, root = filesystem(path)
    fs.create_dir(root, recursive=True)
    name = f"{PART_PREFIX}{uuid.uuid4().hex}.{fmt}"
    tmp, final = f"{root}/{TMP_PREFIX}{name}", f"{root}/{name}"
    with fs.open_output_stream(tmp) as handle:
        if fmt == "parquet":
            pq.write_table(rows_table(rows, column_types), handle)
        else:
            for row in rows:
                handle.write(jsonl_line(row))
    fs.move(tmp, final)
    return final
