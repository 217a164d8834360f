"""The one corpus reader: JSONL (plain or .gz) and Parquet, one file or a folder of parts, on a
local disk or object storage (s3://...), streamed or in ranges. Ray-free: the in-process
commands, the Ray Data jobs, training and the realignment cycle all read through it.

A corpus is a file, or a folder: the part files of a job's output (`part-*`), else every
corpus file in it, in name order. Its rows are numbered 0..n-1 in that order (blank JSONL lines
are not rows); a bad JSONL line is an error row (opsft.data.corpus's rules), never a failure.
A job's output folder (opsft.data.parts: every part with its progress record) is read in the
order of its input: each part holds its input rows sorted, and the parts are merged by input
row number, a few at a time (only parts that were written at the same time interleave), so a
job's output has the same row order whatever the order its parts were written in.

    for row in iter_rows("s3://b/corpus.jsonl"): ...             # streamed, one pass
    for table in iter_batches("scored.parquet", ["id", "cll"]):   # Arrow tables of some columns
    rows = read_rows("corpus.parquet")                            # all of them (small corpora)
    n = count_rows("scored.parquet")                              # Parquet: from the footers
    pieces = corpus_ranges("corpus.jsonl")                        # what a cluster reads in parallel
    for number, row in read_range(pieces[3]): ...

Ranges: a JSONL file is cut at line ends into pieces of about `range_bytes` (the driver scans
the bytes for line ends once, streamed, so it knows each piece's first row and line number); a
Parquet file gives one piece per row group (its footer says the row counts; write Parquet in row
groups of 10^4-10^5 rows for fine-grained progress, as opsft's writers do); a .gz file is one
piece. Every piece carries `first_row` (the corpus number of its first row), `rows` and the
corpus' row count `n_rows`.
"""

from __future__ import annotations

import gzip
import heapq
import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from opsft.data import storage
from opsft.data.corpus import BOM, file_format, parse_jsonl_line, refuse_overwrite, rows_table

RANGE_BYTES = 16 << 20  # a JSONL piece is at least this long (up to the next line end), or the rest of the file
WINDOW = 16 << 20  # bytes read at a time when a JSONL file is streamed
BATCH_ROWS = 8192  # rows per Arrow batch when a file is streamed
MERGE_BATCH_ROWS = 256  # rows each open part holds while a job's parts are merged in input order
STREAM_BUFFER = 2 << 20  # bytes of a Parquet column stream read at a time when a file is streamed
PART_PREFIX = "part-"
MANIFEST_PREFIX = ".rows-"  # opsft.data.parts: a part's progress record (the input rows it holds)
JOB_FILE = ".opsft-job.json"  # opsft.data.parts: what a job's output folder is the output of


# ---------------------------------------------------------------------------- which files


def _expand(intervals) -> Iterator[int]:
    for a, b in intervals:
        yield from range(int(a), int(b))


def _positions(intervals, start: int, stop: int) -> list[list[int]]:
    """The numbers at positions [start, stop) of the expansion of sorted intervals, as intervals."""
    out, seen = [], 0
    for a, b in intervals:
        a, b = int(a), int(b)
        lo, hi = max(start, seen), min(stop, seen + b - a)
        if lo < hi:
            out.append([a + lo - seen, a + hi - seen])
        seen += b - a
        if seen >= stop:
            break
    return out


def job_parts(path) -> list[tuple[str, list[list[int]]]] | None:
    """For a job's output folder (every part with its progress record): (part path, the sorted
    intervals of the input rows it holds), by first input row. None for anything else."""
    if storage.info(path).type.name != "Directory":
        return None
    listed = storage.listdir(path)
    names = {e.base_name for e in listed}
    parts = [e for e in listed if e.type.name == "File" and e.base_name.startswith(PART_PREFIX)]
    if not parts or any(f"{MANIFEST_PREFIX}{e.base_name}.json" not in names for e in parts):
        return None
    out = []
    for e in parts:
        record = json.loads(storage.read_bytes(storage.join(path, f"{MANIFEST_PREFIX}{e.base_name}.json")))
        out.append((storage.full_path(path, e.path), [[int(a), int(b)] for a, b in record["intervals"]]))
    return sorted(out, key=lambda p: (p[1][0][0] if p[1] else -1, p[0]))


class _Dense:
    """Input row numbers -> dense positions 0..n-1 of a job's output (rows the job wrote elsewhere,
    e.g. dropped, leave no gap)."""

    def __init__(self, parts: list[tuple[str, list[list[int]]]]):
        self.merged = sorted([a, b] for _, ivs in parts for a, b in ivs)
        self.offsets, total = [], 0
        for a, b in self.merged:
            self.offsets.append(total)
            total += b - a
        self.n = total

    def dense(self, intervals: list[list[int]]) -> list[list[int]]:
        import bisect

        out = []
        for a, b in intervals:
            k = bisect.bisect_right(self.merged, [a, float("inf")]) - 1
            start = self.offsets[k] + a - self.merged[k][0]
            out.append([start, start + b - a])
        return out


def check_corpus_paths(input: str, outputs: list) -> None:
    """Before any work: the input exists, the input and output corpora have known formats, and no
    output is the input."""
    for path in (input, *outputs):
        file_format(path)
    refuse_overwrite(outputs, [input])
    corpus_files(input)  # a missing input, or a folder without corpus files


def corpus_files(path) -> list[str]:
    """The files of a corpus, in order: the file itself; for a folder its part files (`part-*`), else
    every corpus file in it (hidden names left out). Raises for a missing path, or a folder without
    corpus files (unless it is a job's output: a job whose rows all went elsewhere writes no part)."""
    kind = storage.info(path).type.name
    if kind == "NotFound":
        raise FileNotFoundError(f"{path}: no such corpus file")
    if kind == "File":
        file_format(path)
        return [str(path)]
    listed = storage.listdir(path)
    entries = [e for e in listed if e.type.name == "File" and not e.base_name.startswith((".", "_"))]
    parts = [e for e in entries if e.base_name.startswith(PART_PREFIX)]
    chosen = [e for e in (parts or entries) if _known(e.base_name)]
    if not chosen and not any(e.base_name == JOB_FILE for e in listed):  # a job's output may have no rows
        raise ValueError(f"{path} is a folder without corpus files (part-* or *.jsonl / *.parquet)")
    return [storage.full_path(path, e.path) for e in chosen]


def _known(name: str) -> bool:
    try:
        file_format(name)
        return True
    except ValueError:
        return False


def _gz(path) -> bool:
    return str(path).lower().endswith(".gz")


# ---------------------------------------------------------------------------- streaming


def _jsonl_windows(handle, window: int) -> Iterator[bytes]:
    """The bytes of a JSONL stream in pieces that each end at a line end (a BOM at the start dropped)."""
    buf = handle.read(len(BOM))
    if buf == BOM:
        buf = b""
    while True:
        chunk = handle.read(window)
        data = buf + chunk
        cut = len(data) if not chunk else _last_line_end(data)
        if chunk and not cut:  # one line longer than the window so far: read on
            buf = data
            continue
        if cut:
            yield data[:cut]
        buf = data[cut:]
        if not chunk:
            return


def _last_line_end(buf: bytes) -> int:
    """The end of the last complete line in buf (0: none): after its last LF, or after a CR that a
    byte other than LF follows (a CR at the very end may be the first half of a CRLF: not a cut)."""
    return max(buf.rfind(b"\n") + 1, buf.rfind(b"\r", 0, len(buf) - 1) + 1)


def _jsonl_file_rows(path, window: int = WINDOW) -> Iterator[dict]:
    """The rows of one JSONL file, streamed `window` bytes at a time (lines numbered from 1, blank
    lines counted)."""
    lineno = 0
    if _gz(path):
        data = gzip.decompress(storage.read_bytes(path))
        windows = [data[len(BOM):] if data.startswith(BOM) else data]
    else:
        fs, inner = storage.filesystem(path)
        handle = fs.open_input_stream(inner)
        windows = _jsonl_windows(handle, window)
    try:
        for piece in windows:
            for raw in piece.splitlines():
                lineno += 1
                if raw.strip():
                    yield parse_jsonl_line(raw, lineno)
    finally:
        if not _gz(path):
            handle.close()


def _parquet_batches(path, columns: list[str] | None, batch_rows: int = BATCH_ROWS,
                     buffer: int = STREAM_BUFFER) -> Iterator[pa.Table]:
    with storage.open_input(path) as handle:
        # no pre-buffering: it reads ahead the asked columns of every row group and keeps them (a 200 MB
        # file took 320 MB of memory); buffered reads of 2 MiB per column stream instead
        pfile = pq.ParquetFile(handle, pre_buffer=False, buffer_size=buffer)
        names = pfile.schema_arrow.names
        have = [c for c in columns if c in names] if columns is not None else None
        if have == [] and columns:  # none of the columns exist: all-null rows, one per row of the file
            n = pfile.metadata.num_rows
            for start in range(0, n, batch_rows):
                size = min(batch_rows, n - start)
                yield pa.table({c: pa.nulls(size) for c in columns})
            return
        for batch in pfile.iter_batches(batch_size=batch_rows, columns=have):
            table = pa.Table.from_batches([batch])
            if columns is not None:
                table = pa.table({c: table.column(c) if c in table.column_names else pa.nulls(len(table))
                                  for c in columns})
            yield table


def _file_rows(f, columns: list[str] | None, batch_rows: int = BATCH_ROWS) -> Iterator[dict]:
    if file_format(f) == "parquet":
        small = batch_rows < BATCH_ROWS  # one of many parts open at once (a merge): small reads
        for table in _parquet_batches(f, columns, batch_rows, 64 << 10 if small else STREAM_BUFFER):
            yield from table.to_pylist()
    else:
        window = WINDOW if batch_rows >= BATCH_ROWS else 1 << 18
        rows = _jsonl_file_rows(f, window)
        yield from rows if columns is None else ({c: row.get(c) for c in columns} for row in rows)


def iter_rows(path, columns: list[str] | None = None) -> Iterator[dict]:
    """Every row of a corpus (file or folder), streamed, in corpus order (a job's output folder: in
    the order of its input); only `columns` when given (a column a row lacks reads as None)."""
    parts = job_parts(path)
    if parts is None:
        for f in corpus_files(path):
            yield from _file_rows(f, columns)
        return
    yield from _merged(parts, columns)


def _merged(parts: list[tuple[str, list[list[int]]]], columns: list[str] | None) -> Iterator[dict]:
    """The rows of a job's parts in input row order: a part is opened when the merge reaches its first
    row, so only parts that overlap are open at once (parts written side by side interleave: a job
    over few large input pieces may have all its parts open), each holding MERGE_BATCH_ROWS rows."""
    heap: list = []
    waiting = 0
    while heap or waiting < len(parts):
        while waiting < len(parts) and (not heap or parts[waiting][1][0][0] <= heap[0][0]):
            path, intervals = parts[waiting]
            rows = zip(_expand(intervals), _file_rows(path, columns, MERGE_BATCH_ROWS), strict=True)
            first = next(rows, None)
            if first is not None:
                heapq.heappush(heap, (first[0], waiting, first[1], rows))
            waiting += 1
        number, k, row, rows = heapq.heappop(heap)
        yield row
        following = next(rows, None)
        if following is not None:
            heapq.heappush(heap, (following[0], k, following[1], rows))


def iter_batches(path, columns: list[str], batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """The corpus as Arrow tables of `columns` (nulls where a file lacks one), streamed: what a
    summary or a report reads to compute over millions of rows without holding them."""
    for f in corpus_files(path):
        if file_format(f) == "parquet":
            yield from _parquet_batches(f, columns, batch_rows)
            continue
        chunk: list[dict] = []
        for row in _jsonl_file_rows(f):
            chunk.append({c: row.get(c) for c in columns})
            if len(chunk) >= batch_rows:
                yield _projected(chunk, columns)
                chunk = []
        if chunk:
            yield _projected(chunk, columns)


def _projected(rows: list[dict], columns: list[str]) -> pa.Table:
    table = rows_table(rows)
    return pa.table({c: table.column(c) if c in table.column_names else pa.nulls(len(rows)) for c in columns})


def read_rows(path) -> list[dict]:
    """All rows of a corpus as dicts (bad JSONL lines become error rows). For corpora that fit in
    memory; iter_rows streams."""
    files = corpus_files(path)
    if len(files) == 1 and file_format(files[0]) == "parquet":
        with storage.open_input(files[0]) as handle:
            return pq.read_table(handle).to_pylist()
    return list(iter_rows(path))


def count_rows(path) -> int:
    """The rows of a corpus: Parquet from its footers, JSONL by counting non-blank lines (streamed)."""
    total = 0
    for f in corpus_files(path):
        if file_format(f) == "parquet":
            with storage.open_input(f) as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        else:
            total += sum(1 for _ in _jsonl_lines(f))
    return total


def _jsonl_lines(path) -> Iterator[bytes]:
    if _gz(path):
        data = gzip.decompress(storage.read_bytes(path))
        yield from (raw for raw in data.splitlines() if raw.strip())
        return
    fs, inner = storage.filesystem(path)
    with fs.open_input_stream(inner) as handle:
        for piece in _jsonl_windows(handle, WINDOW):
            yield from (raw for raw in piece.splitlines() if raw.strip())


# ---------------------------------------------------------------------------- ranges


def corpus_ranges(path, range_bytes: int = RANGE_BYTES) -> list[dict]:
    """The pieces of a corpus that read_range reads, in row order (pieces without a row are left
    out). Each: kind, path, first_row, rows, n_rows (the corpus' row count) and where it is in its
    file: JSONL `start`/`end` bytes and `first_line` (the lines before it in its file, blank ones
    included: error messages count them); Parquet `group`."""
    parts = job_parts(path)
    if parts is not None:
        return _job_ranges(parts)
    pieces: list[dict] = []
    first = 0
    for f in corpus_files(path):
        if file_format(f) == "parquet":
            with storage.open_input(f) as handle:
                meta = pq.ParquetFile(handle).metadata
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                if rows:
                    pieces.append({"kind": "parquet", "path": f, "group": group, "first_row": first, "rows": rows})
                first += rows
        elif _gz(f):
            rows = sum(1 for _ in _jsonl_lines(f))
            if rows:
                pieces.append({"kind": "jsonl.gz", "path": f, "first_row": first, "rows": rows})
            first += rows
        else:
            found, first = _jsonl_ranges(f, max(1, range_bytes), first)
            pieces += found
    return [{**piece, "n_rows": first, "numbers": [[piece["first_row"], piece["first_row"] + piece["rows"]]]}
            for piece in pieces]


def _job_ranges(parts: list[tuple[str, list[list[int]]]]) -> list[dict]:
    """The pieces of a job's output folder, numbered in input order (dense): each part's row groups
    (a JSONL part is one piece), with the corpus numbers of their rows as intervals (`numbers`)."""
    dense = _Dense(parts)
    pieces = []
    for path, intervals in parts:
        if file_format(path) == "parquet":
            with storage.open_input(path) as handle:
                meta = pq.ParquetFile(handle).metadata
            groups = [(g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        else:
            groups = [(None, sum(b - a for a, b in intervals))]
        seen = 0
        for group, rows in groups:
            if not rows:
                continue
            numbers = dense.dense(_positions(intervals, seen, seen + rows))
            piece = {"kind": "parquet", "group": group} if group is not None else {"kind": "jsonl.part"}
            pieces.append({**piece, "path": path, "first_row": numbers[0][0], "rows": rows, "numbers": numbers})
            seen += rows
    pieces.sort(key=lambda p: p["first_row"])
    return [{**piece, "n_rows": dense.n} for piece in pieces]


def _jsonl_ranges(path, range_bytes: int, first_row: int) -> tuple[list[dict], int]:
    ranges: list[dict] = []
    line, row = 0, first_row
    fs, inner = storage.filesystem(path)
    with fs.open_input_stream(inner) as handle:
        head = handle.read(len(BOM))
        start = len(BOM) if head == BOM else 0
        buf = b"" if head == BOM else head
        while True:
            chunk = handle.read(range_bytes)
            buf += chunk
            cut = len(buf) if not chunk else _last_line_end(buf)
            if chunk and not cut:
                continue
            if cut:
                lines = buf[:cut].splitlines()
                rows = sum(1 for raw in lines if raw.strip())
                if rows:
                    ranges.append({"kind": "jsonl", "path": path, "start": start, "end": start + cut,
                                   "first_line": line, "first_row": row, "rows": rows})
                line, row, start, buf = line + len(lines), row + rows, start + cut, buf[cut:]
            if not chunk:
                return ranges, row


def read_range(piece: dict) -> Iterator[tuple[int, dict]]:
    """(row number, row) of each row of one piece of corpus_ranges, exactly as iter_rows gives them."""
    row = int(piece["first_row"])
    numbers = _expand(piece["numbers"]) if "numbers" in piece else None
    if piece["kind"] == "parquet":
        with storage.open_input(piece["path"]) as handle:
            table = pq.ParquetFile(handle).read_row_group(int(piece["group"]))
        rows = table.to_pylist()
        yield from zip(numbers, rows, strict=True) if numbers is not None else enumerate(rows, row)
        return
    if piece["kind"] in ("jsonl.gz", "jsonl.part"):
        rows = _jsonl_file_rows(piece["path"])
        yield from zip(numbers, rows, strict=True) if numbers is not None else enumerate(rows, row)
        return
    fs, inner = storage.filesystem(piece["path"])
    with fs.open_input_file(inner) as handle:
        handle.seek(int(piece["start"]))
        data = handle.read(int(piece["end"]) - int(piece["start"]))
    for lineno, raw in enumerate(data.splitlines(), int(piece["first_line"]) + 1):
        if raw.strip():
            yield row, parse_jsonl_line(raw, lineno)
            row += 1
