"""The corpus format: validation, ids, file round trips."""

import json

import pytest
from opsft.corpus import RowError, parse_row, read_rows, stable_id, with_id, write_rows


@pytest.mark.parametrize("row,fragment", [
    ({"response": "x"}, "neither 'prompt' nor 'messages'"),
    ({"prompt": "", "response": "x"}, "empty"),
    ({"prompt": "q", "response": ""}, "empty"),
    ({"prompt": "q"}, "no 'response'"),
    ({"prompt": ["q"], "response": "x"}, "must be a string"),
    ({"messages": [], "response": "x"}, "non-empty list"),
    ({"messages": [{"role": "user"}], "response": "x"}, "'role' and 'content'"),
    ({"messages": [{"role": "robot", "content": "q"}], "response": "x"}, "role must be one of"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "response": "x"},
     "end with a user turn"),
    ({"prompt": "q\ud800", "response": "x"}, "not valid Unicode"),
    ({"prompt": "q", "response": "x", "error": "upstream failure"}, "upstream failure"),
])
def test_invalid_rows_say_why(row, fragment):
    with pytest.raises(RowError, match=fragment):
        parse_row(row)


def test_prompt_becomes_a_user_turn_and_messages_are_kept():
    assert parse_row({"prompt": "q", "response": "a"}).messages == [{"role": "user", "content": "q"}]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert parse_row({"messages": msgs, "response": "a"}).messages == msgs


def test_ids_are_stable_and_content_dependent():
    a = {"prompt": "q", "response": "a"}
    assert stable_id(a) == stable_id(dict(a)) == with_id(a)["id"]
    assert stable_id(a) != stable_id({"prompt": "q", "response": "b"})
    assert with_id({**a, "id": "mine"})["id"] == "mine"


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_round_trip_preserves_rows_and_extra_columns(tmp_path, ext):
    rows = [{"id": "1", "prompt": "q", "response": "a", "meta": {"k": 1}},
            {"id": "2", "prompt": "q2", "response": "b", "meta": {"k": 2}}]
    path = tmp_path / f"c.{ext}"
    write_rows(rows, path)
    assert read_rows(path) == rows
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_bad_jsonl_lines_become_error_rows(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"prompt": "q", "response": "a"}\n\n[1, 2]\n{bad\n\xff\xfe\n')
    rows = read_rows(path)
    assert len(rows) == 4  # the blank line is not a row
    assert rows[0] == {"prompt": "q", "response": "a"}
    assert "JSON object" in rows[1]["error"] and "invalid JSON" in rows[2]["error"] and "UTF-8" in rows[3]["error"]
    assert json.loads(json.dumps(rows))  # error rows are plain data


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus format"):
        (tmp_path / "x.csv").touch()
        read_rows(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing.jsonl")


def test_parquet_with_mixed_column_types_keeps_every_row(tmp_path):
    rows = [{"id": "1", "response": "text"}, {"id": "2", "response": 42}, {"id": "3", "response": None}]
    write_rows(rows, tmp_path / "m.parquet")
    back = read_rows(tmp_path / "m.parquet")
    assert [r["response"] for r in back] == ["text", "42", None]


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_a_column_only_later_rows_have_is_not_lost(tmp_path, ext):
    rows = [{"id": "1", "response": "a"}, {"id": "2", "response": "b", "error": "bad row"}]
    write_rows(rows, tmp_path / f"k.{ext}")
    back = read_rows(tmp_path / f"k.{ext}")
    assert back[1]["error"] == "bad row" and back[0].get("error") is None
