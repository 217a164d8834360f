"""The corpus format: validation, ids, file round trips."""

import json

import pytest
from opsft.data.corpus import RowError, parse_row, stable_id, with_id, write_rows
from opsft.data.reader import read_rows


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
    assert [p.name for p in tmp_path.iterdir()] == [f"c.{ext}"]  # atomic write leaves no temp file


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


# ---------------------------------------------------------------------------- hostile input


def test_every_non_blank_line_is_one_row_whatever_it_holds(tmp_path):
    lines = [
        b'\xef\xbb\xbf{"id": "bom", "prompt": "q", "response": "a"}',        # a byte-order mark before row 1
        b'{"id": "crlf", "prompt": "q", "response": "a"}\r',                  # CRLF line end
        b'   \t ',                                                             # blank: not a row
        b'{"id": "sur", "prompt": "q", "response": "x \\ud800 y"}',           # lone surrogate escape
        b'{"id": "deep-sur", "prompt": "q", "response": "a", "m": {"k": ["\\udfff"]}}',
        b'{"id": "key-sur", "prompt": "q", "response": "a", "m": {"\\ud83d": 1}}',
        b'{"id": "deep", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",          # deeper than the parser's stack
        b'{"id": "d33", "x": ' + b"[" * 33 + b"]" * 33 + b"}",               # just past MAX_DEPTH
        b'{"id": "d31", "prompt": "q", "response": "a", "x": ' + b"[" * 31 + b"]" * 31 + b"}",
        b'{"id": "nul", "prompt": "q", "response": "a\\u0000b"}',           # NUL is text: carried
    ]
    path = tmp_path / "h.jsonl"
    path.write_bytes(b"\n".join(lines[:6]) + b"\r\n" + b"\r".join(lines[6:]) + b"\n")  # CR-only ends too
    rows = read_rows(path)
    assert [r.get("id") for r in rows] == ["bom", "crlf", "sur", "deep-sur", "key-sur", None, "d33", "d31", "nul"]
    assert len(rows) == 9  # 10 lines, one blank
    by_id = {r.get("id"): r for r in rows}
    assert by_id["bom"] == {"id": "bom", "prompt": "q", "response": "a"}
    assert by_id["crlf"] == {"id": "crlf", "prompt": "q", "response": "a"}
    assert "response is not valid Unicode" in by_id["sur"]["error"]
    assert "m.k[0] is not valid Unicode" in by_id["deep-sur"]["error"]
    assert "a key in m" in by_id["key-sur"]["error"]
    assert by_id["nul"]["response"] == "a\x00b" and "error" not in by_id["nul"]
    assert not by_id["d31"].get("error")
    assert "nested deeper than 32" in rows[5]["error"] and "nested deeper than 32" in by_id["d33"]["error"]
    for r in rows:  # error rows keep the line's text, valid UTF-8, and with_id gives them a stable id
        if r.get("error"):
            assert r["raw_line"].encode("utf-8") and with_id(r)["id"] == with_id(dict(r))["id"]
    for ext in ("jsonl", "parquet"):  # every row read can be written
        write_rows(rows, tmp_path / f"out.{ext}")
        back = read_rows(tmp_path / f"out.{ext}")
        assert [r.get("id") for r in back] == [r.get("id") for r in rows]
    assert read_rows(tmp_path / "out.jsonl") == rows


def test_text_that_is_not_valid_unicode_is_still_written(tmp_path):
    rows = [{"id": "a", "response": "x\ud800y"}, {"id": "b", "response": "ok"}]
    write_rows(rows, tmp_path / "s.jsonl")
    assert (tmp_path / "s.jsonl").read_bytes().decode("utf-8")  # valid UTF-8 on disk
    assert read_rows(tmp_path / "s.jsonl")[0]["error"].endswith("response is not valid Unicode text (a lone surrogate)")
    assert json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0]) == rows[0]  # the escape is kept
    write_rows(rows, tmp_path / "s.parquet")
    assert [r["response"] for r in read_rows(tmp_path / "s.parquet")] == ["x\\ud800y", "ok"]


def test_ids_are_strings(tmp_path):
    assert with_id({"id": 7})["id"] == "7" and "error" not in with_id({"id": 7})
    bad = with_id({"id": {"b": 1, "a": [2]}})
    assert bad["id"] == '{"a": [2], "b": 1}' and "'id' must be a string or an integer" in bad["error"]
    assert "error" in with_id({"id": True}) and "error" in with_id({"id": 1.5})


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from opsft.data import corpus

    path = tmp_path / "out.jsonl"
    write_rows([{"id": "old"}], path)
    calls = []

    def failing(row):
        calls.append(row)
        if len(calls) == 2:
            raise OSError("disk full")
        return json.dumps(row).encode() + b"\n"

    monkeypatch.setattr(corpus, "jsonl_line", failing)
    with pytest.raises(OSError, match="disk full"):
        write_rows([{"id": "1"}, {"id": "2"}, {"id": "3"}], path)
    assert path.read_text() == '{"id": "old"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_an_output_that_is_an_input_is_refused(tmp_path, monkeypatch):
    from opsft.data.corpus import refuse_overwrite, same_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "c.jsonl").write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "d" / "c.jsonl")
    for spelling in ("d/c.jsonl", "./d/../d/c.jsonl", str(tmp_path / "d" / "c.jsonl"), "link.jsonl"):
        assert same_path(spelling, "d/c.jsonl")
        with pytest.raises(ValueError, match="never overwrites an input"):
            refuse_overwrite(["other.jsonl", spelling], ["d/c.jsonl"])
    assert same_path("s3://b/k/", "s3://b/k") and not same_path("s3://b/k", "s3://b/k2")
    refuse_overwrite(["d/other.jsonl", None], ["d/c.jsonl", None])  # different paths: fine


# ---------------------------------------------------------------------------- streamed writes and reads

# columns whose types differ between rows: a chunked write sees them in different chunks
MIXED = [
    {"id": "1", "response": "a", "meta": 1, "s": {"a": 1}, "l": [1]},
    {"id": "2", "response": 42, "meta": 2.5, "s": {"b": "x"}, "l": [2.5], "flag": True},
    {"id": "3", "response": "x\ud800y", "meta": None, "e": {}, "flag": 1},
    {"id": "4", "response": "c", "new": [1, "x"], "meta": 3},
    {"id": "5"},
]


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 100])
def test_a_chunked_write_reads_back_as_the_whole_write(tmp_path, ext, chunk_rows):
    from opsft.data.corpus import write_rows_chunked

    write_rows(MIXED, tmp_path / f"whole.{ext}")
    passes = []
    n = write_rows_chunked(lambda: passes.append(1) or iter(MIXED), tmp_path / f"chunked.{ext}", chunk_rows)
    assert n == len(MIXED) and len(passes) == (2 if ext == "parquet" else 1)
    assert read_rows(tmp_path / f"chunked.{ext}") == read_rows(tmp_path / f"whole.{ext}")
    write_rows_chunked(lambda: iter([]), tmp_path / f"empty.{ext}")
    assert read_rows(tmp_path / f"empty.{ext}") == []


def test_a_large_parquet_file_is_read_in_batches_with_the_columns_asked_for(tmp_path):
    from opsft.data.reader import count_rows, iter_rows

    rows = [{"id": str(i), "cll": -i / 1000, "response": "r" * (i % 7)} for i in range(20_000)]
    write_rows(rows, tmp_path / "big.parquet")
    assert list(iter_rows(str(tmp_path / "big.parquet"))) == rows
    assert list(iter_rows(str(tmp_path / "big.parquet"), ["id", "missing"])) == [
        {"id": r["id"], "missing": None} for r in rows]
    assert list(iter_rows(str(tmp_path / "big.parquet"), ["missing"]))[:2] == [{"missing": None}] * 2
    assert count_rows(str(tmp_path / "big.parquet")) == 20_000
