"""The corpus format shared by every command, and its row-level validation.

A row has `prompt` (string) or `messages` (chat list ending with a user turn), and
`response` (string); optional `id` (made stable from the content when missing) and
`answer` (reference final answer). Other columns are carried through untouched.

Invalid rows are never dropped and never fatal: they get a non-null `error` string and
are written like the others, so rows out == rows in. A JSONL line that is not valid JSON
or not UTF-8 becomes a row with only `error` and `raw_line`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROLES = {"system", "user", "assistant", "tool"}


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
            if m["role"] not in ROLES:
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
    if row.get("id") in (None, ""):
        row = {**row, "id": stable_id(row)}
    return row


# ---------------------------------------------------------------------------- files


def file_format(path: str | Path) -> str:
    name = str(path).lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise ValueError(f"{path}: unknown corpus format (use .jsonl or .parquet)")


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a JSONL or Parquet file, as dicts; bad JSONL lines become error rows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such corpus file")
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            rows.append(parse_jsonl_line(raw, lineno))
    return rows


def parse_jsonl_line(raw: bytes, lineno: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {"error": f"line {lineno}: not UTF-8 ({exc.reason})", "raw_line": raw.decode("utf-8", "replace")}
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return {"error": f"line {lineno}: invalid JSON ({exc.msg})", "raw_line": text.rstrip("\n")}
    if not isinstance(row, dict):
        return {"error": f"line {lineno}: a row must be a JSON object", "raw_line": text.rstrip("\n")}
    return row


def write_rows(rows: Iterable[dict], path: str | Path) -> None:
    """Write rows as JSONL or Parquet (by extension), atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    rows = list(rows)
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(arrow_table(rows), tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, default=json_default) + "\n")
    tmp.replace(path)


def arrow_table(rows: list[dict]):
    """A pyarrow Table of rows that may have different keys, and columns that mix types (a bad
    row's `response: 42` among strings): such a column is written as strings (JSON for
    non-strings) instead of failing."""
    import pyarrow as pa

    # Every column of every row (from_pylist alone would take the columns of the first row only).
    columns = list(dict.fromkeys(k for row in rows for k in row))
    try:
        return pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        pass
    data = {}
    for col in columns:
        values = [row.get(col) for row in rows]
        try:
            data[col] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            data[col] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v, default=json_default)
                                  for v in values], type=pa.string())
    return pa.table(data)


def json_default(value):
    if hasattr(value, "tolist"):  # numpy arrays and scalars from Parquet / Ray Data
        return value.tolist()
    return str(value)
