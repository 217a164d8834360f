"""A fuzzer of our own: hypothesis writes corpus files, valid and broken (any JSON at any depth,
text with lone surrogates and NUL, junk bytes, non-objects, blank lines, CRLF / CR ends, a
byte-order mark), and runs them through the row pipeline of every command that reads a corpus.

Asserted for each file: nothing crashes; rows out == rows in (one row per non-blank line, in
order, with the same ids); every row read can be written to JSONL and Parquet; and a good row
is scored as it is when scored alone. The Ray Data path is fuzzed through its stage functions
(parse -> engine actor -> part writer) in-process, and one real Ray Data job runs a fixed
hostile file end to end against the in-process command.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opsft.data.corpus import jsonl_rows, with_id, write_rows
from opsft.data.reader import read_rows
from opsft.faults import apply_rows
from opsft.scoring import score_rows

# Scores of a row in a batch and alone differ only by float32 reduction order (the batch changes
# the matmul shapes). log p and H are each about log V; a pairwise float32 reduction over V terms
# is off by at most ~log2(V) ulps, so |d phi| <= 2 * 16 ulps of log V. Twice that:
PHI_TOL = 64 * torch.finfo(torch.float32).eps * math.log(49152)

# ------------------------------------------------------------------------------------- strategies

# any code point, lone surrogates included (hypothesis leaves them out unless asked)
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
plain_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=1, max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8)


@st.composite
def good_rows(draw) -> dict:
    row = {"response": draw(plain_text)}
    if draw(st.booleans()):
        row["prompt"] = draw(plain_text)
    else:
        row["messages"] = [{"role": "system", "content": draw(plain_text)}] * draw(st.integers(0, 1)) + [
            {"role": "user", "content": draw(plain_text)}]
    if draw(st.booleans()):
        row["id"] = draw(st.text(max_size=6) | st.integers())
    if draw(st.booleans()):
        row["meta"] = draw(json_values)
    return row


@st.composite
def broken_rows(draw) -> dict:
    """A good row with one field replaced by anything, or removed."""
    row = draw(good_rows())
    key = draw(st.sampled_from(["prompt", "messages", "response", "id", "error", "answer"]))
    if draw(st.booleans()):
        row.pop(key, None)
    else:
        row[key] = draw(json_values)
    return row


def dumps(row: dict, ascii_only: bool) -> bytes:
    try:
        return json.dumps(row, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only its JSON escape can be written
        return json.dumps(row, ensure_ascii=True).encode("utf-8")


lines = st.one_of(
    st.tuples(good_rows(), st.booleans()).map(lambda t: dumps(*t)),
    st.tuples(broken_rows(), st.booleans()).map(lambda t: dumps(*t)),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),  # not objects
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),              # junk bytes
    st.integers(30, 3000).map(lambda n: b'{"x": ' + b"[" * n + b"]" * n + b"}"),                  # deep
    st.sampled_from([b"", b"  ", b"\t"]),                                                         # blank
)


@st.composite
def corpus_files(draw, max_lines: int = 12) -> tuple[bytes, int]:
    """(file bytes, how many rows it holds: its non-blank lines)."""
    body = draw(st.lists(lines, min_size=1, max_size=max_lines))
    ends = draw(st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=len(body), max_size=len(body)))
    data = b"".join(line + end for line, end in zip(body, ends, strict=True))
    if draw(st.booleans()):
        data = BOM + data
    elif body[0].startswith(BOM):  # junk that starts with a byte-order mark: the mark is not part of the line
        body[0] = body[0][len(BOM):]
    return data, sum(1 for line in body if line.strip())


BOM = b"\xef\xbb\xbf"


def tiny_engine(tiny_model, tokenizer):
    from opsft.engines.hf import HFEngine

    return HFEngine(model_and_tokenizer=(tiny_model, tokenizer), device="cpu", max_batch_size=4)


# ------------------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(corpus_files(max_lines=20))
def test_reading_gives_one_writable_row_per_non_blank_line(case):
    data, n = case
    rows = jsonl_rows(data)
    assert len(rows) == n
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.jsonl"
        path.write_bytes(data)
        assert read_rows(path) == rows
        write_rows(rows, Path(tmp) / "out.jsonl")
        assert read_rows(Path(tmp) / "out.jsonl") == rows
        # Parquet holds a column of mixed types as text; the id and error every command carries
        # (with_id: strings) come back as they were
        carried = [with_id(r) for r in rows]
        write_rows(carried, Path(tmp) / "out.parquet")
        back = read_rows(Path(tmp) / "out.parquet")
        assert [(r["id"], r.get("error")) for r in back] == [(r["id"], r.get("error")) for r in carried]


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpus_files())
def test_score_in_process_and_ray_stages_keep_every_row_and_score_good_rows_as_alone(tiny_model, tokenizer, case):
    from opsft.data.parts import SCORE_TYPES
    from opsft.data.reader import corpus_ranges
    from opsft.faults import Guard
    from opsft.jobs.stages import EngineActor, PartsDatasink, read_pieces

    data, n = case
    engine = tiny_engine(tiny_model, tokenizer)
    rows = jsonl_rows(data)
    out = apply_rows(score_rows, rows, engine, {})  # what `opsft score` does with each chunk
    assert len(out) == n
    assert [r["id"] for r in out] == [with_id(r)["id"] for r in rows]
    for row, scored in zip(rows, out, strict=True):
        if scored["error"] is None:
            alone = score_rows([row], engine)[0]
            assert alone["error"] is None and alone["n_tokens"] == scored["n_tokens"] >= 1
            assert abs(alone["cll"] - scored["cll"]) <= PHI_TOL
        else:
            assert scored["cll"] is None

    # the Ray Data path's row pipeline, stage by stage, without Ray
    actor = EngineActor.__new__(EngineActor)
    actor.engine, actor.fn, actor.fn_kwargs, actor.monitor, actor.step = engine, score_rows, {}, None, "score"
    actor.busy = {}
    actor.guard = Guard(engine)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "c.jsonl").write_bytes(data)
        pieces = [{"piece": json.dumps(p), "done": "[]"} for p in corpus_ranges(f"{tmp}/c.jsonl", range_bytes=64)]
        batches = [actor(read_pieces(pa.Table.from_pylist([p]))) for p in pieces]
        sink = PartsDatasink(f"{tmp}/out.parquet", SCORE_TYPES)
        sink.write([b for b in batches if b.num_rows], None)
        parts = read_rows(f"{tmp}/out.parquet") if n else []
    assert [r["id"] for r in parts] == [r["id"] for r in out]
    assert [r["error"] for r in parts] == [r["error"] for r in out]
    for a, b in zip(parts, out, strict=True):
        assert (a["cll"] is None) == (b["cll"] is None)
        if a["cll"] is not None:
            assert abs(a["cll"] - b["cll"]) <= PHI_TOL


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(corpus_files())
def test_train_and_pairs_count_every_row(tokenizer, case):
    from opsft.data.pairs import preference_pairs
    from opsft.train.batches import prepare_examples
    from opsft.train.pairs import prepare_pairs

    rows = jsonl_rows(case[0])
    examples, stats = prepare_examples(rows, tokenizer, max_length=64)
    assert stats.rows == len(rows) == stats.used + stats.error_rows + stats.too_long_skipped
    assert len(examples) == stats.used
    _, pair_stats = prepare_pairs(rows, tokenizer, max_length=64)
    assert pair_stats.rows == len(rows)
    _, counts = preference_pairs(rows)
    assert counts["rows"] == len(rows) == counts["pairs"] + sum(v for k, v in counts.items() if k not in
                                                                 ("rows", "pairs"))


@settings(max_examples=60, deadline=None)
@given(corpus_files())
def test_report_and_eval_exclusion_take_any_rows(case):
    from opsft.evaluation import row_question
    from opsft.report import source_summary

    rows = jsonl_rows(case[0])
    scored = [{**r, "cll": r.get("meta"), "logprob_mean": -1.0, "cll_frac_pos": 0.5} for r in rows]  # junk scores
    summary = source_summary(scored)
    assert summary["rows"] == len(rows) and 0 <= summary["error_rows"] <= len(rows)
    for r in rows:
        q = row_question(r)
        assert q is None or isinstance(q, str)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpus_files(max_lines=6))
def test_rewrite_keeps_every_row(tiny_model, tokenizer, case):
    from opsft.recipe import rewrite_rows

    rows = jsonl_rows(case[0])
    params = {"max_new_tokens": 3, "hint_max_new_tokens": 3, "missing_hint": "cot", "temperature": 0.0,
              "policy": "self-first"}
    out = apply_rows(rewrite_rows, rows, tiny_engine(tiny_model, tokenizer), {"params": params})
    assert [r["id"] for r in out] == [with_id(r)["id"] for r in rows]
    for r in out:
        assert (r["source"] is None) == bool(r.get("error"))


HOSTILE_LINES = [
    b'\xef\xbb\xbf{"id": "g0", "prompt": "What is 2+2?", "response": "4"}',
    b'{"id": "sur", "prompt": "hi", "response": "bad \\ud800 text"}',
    b'{"id": "nul", "prompt": "hi", "response": "a \\u0000 b"}',
    b'{"id": {"nested": 1}, "prompt": "hi", "response": "a dict id"}',
    b'{"id": 7, "prompt": "hi", "response": "an int id", "meta": {}}',
    b'{"id": "role", "messages": [{"role": {"a": 1}, "content": "x"}], "response": "y"}',
    b'["not", "an", "object"]',
    b'{"broken json',
    b'\xff\xfe not utf8',
    b"   ",
    b'{"id": "deep", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"id": "nan", "prompt": "hi", "response": "x", "score": NaN, "big": 123456789012345678901234567890}',
    b'{"id": "long", "prompt": "hi", "response": "' + b"word " * 2000 + b'"}',
    b'{"id": "err", "prompt": "hi", "response": "x", "error": 42}',
    b'{"id": "g1", "prompt": "Name a colour.", "response": "Blue."}\r',
]


@pytest.mark.slow
@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_a_hostile_file_through_a_real_ray_data_job_equals_the_in_process_run(ray_local, tiny_model, tokenizer,
                                                                                tmp_path, ext):
    from opsft.config import EngineConfig, PoolConfig
    from opsft.data.parts import SCORE_TYPES
    from opsft.jobs.pipeline import JobSpec, run_job
    from train_helpers import save_tiny

    folder = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    corpus = tmp_path / "hostile.jsonl"
    corpus.write_bytes(b"\n".join(HOSTILE_LINES) + b"\n")
    summary = run_job(JobSpec(input=str(corpus), output=str(tmp_path / f"out.{ext}"), fn="opsft.scoring:score_rows",
                              engine=EngineConfig(model=folder), pool=PoolConfig(batch_size=4),
                              column_types=SCORE_TYPES, name="score"))
    ray_rows = read_rows(str(tmp_path / f"out.{ext}"))
    local = apply_rows(score_rows, read_rows(corpus), tiny_engine(tiny_model, tokenizer), {})
    assert summary["rows_in"] == summary["rows_out_total"] == len(local) == len(HOSTILE_LINES) - 1  # one blank
    ray_by_id = {r["id"]: r for r in ray_rows}
    assert sorted(ray_by_id) == sorted(r["id"] for r in local)
    for row in local:
        other = ray_by_id[row["id"]]
        assert other["error"] == row["error"]
        assert (other["cll"] is None) == (row["cll"] is None)
        if row["cll"] is not None:
            assert abs(other["cll"] - row["cll"]) <= PHI_TOL
    assert sum(r["error"] is None for r in local) == 5  # g0, nul, int id, nan, g1
    assert "not valid Unicode" in ray_by_id["sur"]["error"] and "too long" in ray_by_id["long"]["error"]
