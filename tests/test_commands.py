"""opsft.commands: one way to run each command. A file in, a file out, equal to the plain row functions
(opsft.scoring.score_rows, opsft.recipe.rewrite_rows) on the same rows; an engine the caller passes is
used and left open, an engine built from a function is closed; evaluate writes its three files.

    .venv/bin/python -m pytest -q tests/test_commands.py
"""

from __future__ import annotations

import pytest
from opsft import commands
from opsft.data.corpus import write_rows
from opsft.data.reader import read_rows
from opsft.engines.fake import FakeEngine
from opsft.recipe import rewrite_rows
from opsft.recipe_plan import RewriteParams
from opsft.scoring import score_rows

ROWS = [{"id": f"r{k}", "prompt": f"What is {k} + {k}?", "response": f"{k} + {k} = {2 * k}. #### {2 * k}",
         "answer": str(2 * k)} for k in range(1, 6)] + [{"id": "bad", "prompt": "no response"}]


class Counting(FakeEngine):
    closed = 0

    def close(self) -> None:
        Counting.closed += 1
        super().close()


@pytest.fixture(scope="module")
def engine():
    return FakeEngine()


def test_score_file_equals_score_rows_and_leaves_a_given_engine_open(tmp_path, engine):
    write_rows(ROWS, tmp_path / "in.jsonl")
    summary = commands.score_file(str(tmp_path / "in.jsonl"), str(tmp_path / "out.parquet"), engine, tokens=True)
    got = read_rows(tmp_path / "out.parquet")
    want = score_rows(ROWS, engine, tokens=True)
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g.get("error") == w.get("error")
        if w["cll"] is not None:  # the fake engine is deterministic: the same numbers, to float32 storage
            assert g["cll"] == pytest.approx(w["cll"], abs=1e-6) and g["n_tokens"] == w["n_tokens"]
            assert g["token_phi"] == pytest.approx(w["token_phi"], abs=1e-6)
    assert summary["rows"] == len(ROWS) and summary["error_rows"] == 1 and summary["engine_faults"] == 0
    assert engine.tokenizer is not None and not (tmp_path / ".out.inprogress.parquet").exists()


def test_an_engine_built_by_a_function_is_closed_after_the_run(tmp_path):
    write_rows(ROWS, tmp_path / "in.jsonl")
    Counting.closed = 0
    summary = commands.score_file(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), Counting)
    assert Counting.closed == 1 and summary["rows"] == len(ROWS)


def test_rewrite_file_equals_rewrite_rows(tmp_path, engine):
    params = RewriteParams.from_fields({"policy": "hd-all", "max_new_tokens": 8, "hint_max_new_tokens": 8,
                                        "drop_unverified": True})
    write_rows(ROWS, tmp_path / "in.jsonl")
    summary = commands.rewrite_file(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
                                    {"score": engine, "hinted-decoding": engine}, params,
                                    dropped_output=str(tmp_path / "dropped.jsonl"))
    want = rewrite_rows(ROWS, engine, params)
    got = read_rows(tmp_path / "out.jsonl") + (read_rows(tmp_path / "dropped.jsonl")
                                               if (tmp_path / "dropped.jsonl").exists() else [])
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in want)  # nothing lost: kept + dropped
    by_id = {r["id"]: r for r in got}
    for w in want:
        g = by_id[w["id"]]
        fields = ("response", "source", "finish_reason", "error")
        assert [g.get(f) for f in fields] == [w.get(f) for f in fields], w["id"]
    assert summary["rows"] == len(ROWS) and summary["error_rows"] == 1
    with pytest.raises(ValueError, match="dropped_output"):
        commands.rewrite_file(str(tmp_path / "in.jsonl"), str(tmp_path / "x.jsonl"), engine, params)
    with pytest.raises(ValueError, match="name engine stages"):
        commands.rewrite_file(str(tmp_path / "in.jsonl"), str(tmp_path / "x.jsonl"), {"hints": engine})


def test_dropped_path_sits_beside_the_output():
    assert commands.dropped_path("/a/b/out.parquet") == "/a/b/out.dropped.parquet"
    assert commands.dropped_path("s3://bucket/k/out.jsonl") == "s3://bucket/k/out.dropped.jsonl"
