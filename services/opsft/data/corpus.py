"""The corpus format shared by every command, and its row-level validation.

A row has `prompt` (string) or `messages` (chat list ending with a user turn), and
`response` (string); optional `id` (made stable from the content when missing) and
`answer` (reference final answer). Other columns are carried through untouched.

Invalid rows are never dropped and never fatal: they get a non-null `error` string and
are written like the others, so rows out == rows in. A JSONL line that is not valid JSON,
not UTF-8, not an object, nested deeper than MAX_DEPTH, or holding text that is not valid
Unicode (a lone surrogate escape such as "\\ud800", anywhere in the row) becomes a row with
`error`, `raw_line` (the line's text, always valid UTF-8) and its `id` when it had a plain one.
So every row that leaves `read_rows` can be written to JSONL and Parquet.

Line ends: LF, CRLF and CR all end a line; a UTF-8 byte-order mark at the start of a file is
ignored; a blank (or whitespace-only) line is not a row and is skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROLES = {"system", "user", "assistant", "tool"}
MAX_DEPTH = 32  # nesting of lists/objects in a row; deeper rows are error rows (Parquet reads at most 100
# schema levels, two per list)
BOM = b"\xef\xbb\xbf"


class RowError(ValueError):
    """What is wrong with one row; becomes that row's `error` field."""


@dataclass(frozen=True)
class Example:
    """A validated row: the chat that prompts the model and the response to score/train."""

    messages: list[dict]
    response: str


def _check_text(value, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"'{field}' must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(f"'{field}' is not valid Unicode text ({exc.reason})") from None
    return value


def row_messages(row: dict) -> list[dict]:
    """The prompt of a row as a chat list (a bare `prompt` is one user turn)."""
    messages = row.get("messages")
    if messages is not None:
        if not isinstance(messages, list | tuple) or not messages:
            raise RowError("'messages' must be a non-empty list of {role, content}")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RowError(f"messages[{i}] must be an object with 'role' and 'content'")
            if not isinstance(m["role"], str) or m["role"] not in ROLES:
                raise RowError(f"messages[{i}].role must be one of {sorted(ROLES)}, got {m['role']!r}")
            out.append({"role": m["role"], "content": _check_text(m["content"], f"messages[{i}].content")})
        if out[-1]["role"] != "user":
            raise RowError("'messages' must end with a user turn")
        return out
    prompt = row.get("prompt")
    if prompt is None:
        raise RowError("row has neither 'prompt' nor 'messages'")
    prompt = _check_text(prompt, "prompt")
    if not prompt.strip():
        raise RowError("'prompt' is empty")
    return [{"role": "user", "content": prompt}]


def check_text(value, field: str) -> str:
    """`value` as text of the row's `field`; raises RowError when it is not a string or not valid Unicode."""
    return _check_text(value, field)


def check_answer(row: dict):
    """The row's reference `answer`: None, a string or a number (an integer is kept as it is); raises
    RowError for anything else (an object, a list, a boolean), which no verifier can compare."""
    answer = row.get("answer")
    if answer is None or isinstance(answer, str) and _check_text(answer, "answer") is not None:
        return answer
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        return answer
    raise RowError(f"'answer' must be a string or a number, got {type(answer).__name__}")


def parse_row(row: dict, need_response: bool = True) -> Example:
    """Validate a row; raises RowError with the reason."""
    if row.get("error"):
        raise RowError(str(row["error"]))
    messages = row_messages(row)
    response = row.get("response")
    if response is None:
        if need_response:
            raise RowError("row has no 'response'")
        response = ""
    response = _check_text(response, "response")
    if need_response and not response.strip():
        raise RowError("'response' is empty")
    return Example(messages=messages, response=response)


def question_text(messages: list[dict]) -> str:
    """The last user turn: what hinted decoding and verifiers call the question."""
    return messages[-1]["content"]


def stable_id(row: dict) -> str:
    """A hash of the row's content (every field): the same input row always gets the same id."""
    blob = json.dumps(row, sort_keys=True, ensure_ascii=False, default=json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def with_id(row: dict) -> dict:
    """The row with a string `id`: its own (an integer becomes its decimal text), else a stable hash
    of its content (of the raw line for an unparseable one). Any other id type is an error: the row
    keeps the id as JSON text and gets `error`. An `error` the row brings must be a string or null:
    any other value (a number, a list) becomes an error saying so, with the value as JSON text."""
    bad = row.get("error")
    if bad is not None and not isinstance(bad, str):
        shown = json.dumps(bad, ensure_ascii=True, default=json_default)[:200]
        row = {**row, "error": f"'error' must be a string or null, got {type(bad).__name__} {shown}"}
    rid = row.get("id")
    if isinstance(rid, str) and rid:
        return row
    if rid is None or rid == "":
        if "raw_line" in row:  # an unparseable line: the id comes from its text
            blob = f"{row.get('error')}\n{row['raw_line']}".encode("utf-8", "surrogatepass")
            return {**row, "id": "line-" + hashlib.sha256(blob).hexdigest()[:16]}
        return {**row, "id": stable_id(row)}
    if isinstance(rid, int) and not isinstance(rid, bool):
        return {**row, "id": str(rid)}
    problem = f"'id' must be a string or an integer, got {type(rid).__name__}"
    text = json.dumps(rid, sort_keys=True, ensure_ascii=True, default=json_default)
    return {**row, "id": text, "error": row.get("error") or problem}


# ---------------------------------------------------------------------------- files


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths (or URIs such as s3://b/k) name the same file or folder."""
    from opsft.data.storage import same_location

    return same_location(a, b)


def refuse_overwrite(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path | None]) -> None:
    """Raise ValueError when an output path is one of the input paths: an input is never overwritten."""
    inputs = [i for i in inputs if i]
    for out in outputs:
        for inp in inputs:
            if out and same_path(out, inp):
                raise ValueError(f"the output {out} is the input {inp}: opsft never overwrites an input; "
                                 "choose another output path")


def file_format(path: str | Path) -> str:
    name = str(path).lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise ValueError(f"{path}: unknown corpus format (use .jsonl or .parquet)")


def jsonl_rows(data: bytes) -> list[dict]:
    """The rows of a JSONL file's bytes: one per non-blank line (LF, CRLF or CR ends a line)."""
    if data.startswith(BOM):
        data = data[len(BOM):]
    return [parse_jsonl_line(raw, n) for n, raw in enumerate(data.splitlines(), 1) if raw.strip()]


def parse_jsonl_line(raw: bytes, lineno: int) -> dict:
    """One JSONL line as a row; a line that cannot be a row becomes an error row (module doc)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {"error": f"line {lineno}: not UTF-8 ({exc.reason})", "raw_line": raw.decode("utf-8", "replace")}
    text = text.rstrip("\r\n")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return {"error": f"line {lineno}: invalid JSON ({exc.msg})", "raw_line": text}
    except RecursionError:
        return {"error": f"line {lineno}: nested deeper than {MAX_DEPTH} levels", "raw_line": text}
    if not isinstance(row, dict):
        return {"error": f"line {lineno}: a row must be a JSON object", "raw_line": text}
    problem = unrepresentable(row)
    if problem:
        bad = {"error": f"line {lineno}: {problem}", "raw_line": text}
        if isinstance(row.get("id"), str) and not unrepresentable(row["id"]):
            bad = {"id": row["id"], **bad}
        return bad
    return row


def unrepresentable(value, depth: int = 0, where: str = "row") -> str | None:
    """Why a parsed JSON value cannot be carried as it is (nesting deeper than MAX_DEPTH, or text
    that is not valid Unicode: a lone surrogate), or None."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"{where} is not valid Unicode text (a lone surrogate)"
        return None
    if isinstance(value, dict | list):
        if depth >= MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(value, list):
                inner = f"{where}[{key}]"
            else:
                if unrepresentable(key):
                    return f"a key in {where} is not valid Unicode text (a lone surrogate)"
                inner = key if where == "row" else f"{where}.{key}"
            problem = unrepresentable(item, depth + 1, inner)
            if problem:
                return problem
    return None


def write_rows(rows: Iterable[dict], path: str | Path) -> None:
    """Write rows as JSONL or Parquet (by extension), atomically (temp file + rename), to a local
    path or a URI (s3://...)."""
    from opsft.data import storage

    rows = list(rows)
    with storage.atomic_output(path) as handle:
        if file_format(path) == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(rows_table(rows), handle)
        else:
            for row in rows:
                handle.write(jsonl_line(row))


def write_rows_chunked(make_rows: Callable[[], Iterable[dict]], path: str | Path, chunk_rows: int = 10_000) -> int:
    """write_rows for more rows than memory holds: `make_rows()` returns a fresh iterator of the rows
    each time it is called. JSONL is written in one pass. Parquet takes two: the first finds each
    column's type over all chunks of `chunk_rows` rows (types Arrow can widen are widened, int to
    double say; any other disagreement makes the column text, as rows_table does within one
    table), the second writes each chunk as a row group of that one schema. The file reads back as
    write_rows would have written it. Atomic like write_rows; returns the rows written."""
    import pyarrow as pa

    from opsft.data import storage

    if file_format(path) != "parquet":
        n = 0
        with storage.atomic_output(path) as handle:
            for row in make_rows():
                handle.write(jsonl_line(row))
                n += 1
        return n
    types: dict = {}
    for chunk in _chunks(make_rows(), chunk_rows):
        for field in rows_table(chunk).schema:
            types[field.name] = _widen(types.get(field.name), field.type)
    while True:  # a chunk whose values do not convert to the widened type makes that column text
        try:
            with storage.atomic_output(path) as handle:
                return _write_parquet_chunks(make_rows, handle, chunk_rows, types)
        except _ColumnMismatch as exc:
            types[exc.column] = pa.string()


class _ColumnMismatch(Exception):
    def __init__(self, column: str):
        super().__init__(column)
        self.column = column


def _widen(old, new):
    """The one type of a column that is `old` in some chunks and `new` in another (None: unseen)."""
    import pyarrow as pa

    if old is None or old == new or pa.types.is_null(new):
        return new if old is None else old
    if pa.types.is_null(old):
        return new
    try:
        return pa.unify_schemas([pa.schema([("c", old)]), pa.schema([("c", new)])],
                                promote_options="permissive").field("c").type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pa.string()


def _write_parquet_chunks(make_rows, handle, chunk_rows: int, types: dict) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, t) for name, t in types.items()])
    n = 0
    with pq.ParquetWriter(handle, schema) as writer:
        for chunk in _chunks(make_rows(), chunk_rows):
            table = rows_table(chunk, types)
            arrays = []
            for field in schema:
                if field.name not in table.column_names:
                    arrays.append(pa.nulls(len(chunk), field.type))
                    continue
                column = table.column(field.name)
                if column.type != field.type:
                    raise _ColumnMismatch(field.name)
                arrays.append(column)
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            n += len(chunk)
    return n


def _chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextmanager
def atomic_path(path: str | Path):
    """A temporary path beside `path` (same suffix) to write to; renamed over `path` when the block
    ends without error, removed otherwise. A reader never sees half a file, and a crash leaves
    the old file as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """A small text file (a summary, a marker) written atomically, to a local path or a URI."""
    from opsft.data import storage

    storage.write_bytes_atomic(path, text.encode("utf-8"))


def jsonl_line(row: dict) -> bytes:
    """One row as a JSONL line (UTF-8, newline-terminated). Text that is not valid Unicode (a lone
    surrogate) is written as its JSON escape, so the line is valid UTF-8 and reads back the same."""
    try:
        return (json.dumps(row, ensure_ascii=False, default=json_default) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row, ensure_ascii=True, default=json_default) + "\n").encode("ascii")


def rows_table(rows: list[dict], column_types: dict | None = None):
    """A pyarrow Table of rows that may have different keys (every column of every row), with
    the given Arrow types for known columns. A column that Arrow cannot hold in one type (a bad
    row's `response: 42` among strings) is written as strings: text as it is, any other value as
    its JSON text. Text that is not valid Unicode gets backslash escapes (Arrow needs UTF-8)."""
    import pyarrow as pa

    column_types = column_types or {}
    names = list(dict.fromkeys(k for row in rows for k in row))
    arrays = []
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            array = pa.array(values, type=column_types.get(name))
            if _parquet_writable(array.type):
                arrays.append(array)
                continue
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError,
                OverflowError):
            pass
        arrays.append(pa.array([_as_text(v) for v in values], type=pa.string()))
    return pa.Table.from_arrays(arrays, names=names)


def _parquet_writable(arrow_type) -> bool:
    """False for a type that Parquet refuses: a struct with no field (from `{}` values), at any depth."""
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        return arrow_type.num_fields > 0 and all(_parquet_writable(f.type) for f in arrow_type)
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _parquet_writable(arrow_type.value_type)
    return True


def _as_text(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, default=json_default)
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def json_default(value):
    if hasattr(value, "tolist"):  # numpy arrays and scalars from Parquet / Ray Data
        return value.tolist()
    return str(value)
