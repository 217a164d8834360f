"""The in-process corpus job (opsft.local_job, what `opsft score` and `opsft rewrite` run without
--ray) on the fake engine: no Ray, no model. An engine fault rebuilds the engine and does the
chunk again (never an error row); a run killed midway resumes from its work folder and gives the
rows of an uninterrupted run, each once, in input order; a work folder of another input is
discarded; an engine that keeps failing stops the command with the cause in one line (exit 1)."""

from __future__ import annotations

import json

import pytest
from opsft.config import EngineConfig
from opsft.data import storage
from opsft.data.parts import SCORE_TYPES
from opsft.data.reader import read_rows
from opsft.engines import engine_from_config
from opsft.faults import EngineSlot, JobFailed
from opsft.local_job import run_local_job, work_folder
from opsft.scoring import score_rows


def corpus(path, n=45):
    lines = [json.dumps({"id": f"r{i}", "prompt": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}."})
             for i in range(n)]
    lines.insert(7, "{not json")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def slot(fake: dict | None = None, retries: int = 3) -> EngineSlot:
    cfg = EngineConfig(kind="fake", fake=fake)
    return EngineSlot(lambda: engine_from_config(cfg), retries=retries)


def run(inp, out, engine_slot, fn=score_rows, chunk_rows=10):
    return run_local_job(inp, out, fn, {}, engine_slot, chunk_rows=chunk_rows, column_types=SCORE_TYPES,
                         steps=[{"fn": "score"}])


def test_an_engine_fault_is_retried_on_a_new_engine_and_never_written(tmp_path):
    inp = corpus(tmp_path / "in.jsonl")
    clean = run(inp, str(tmp_path / "clean.parquet"), slot())
    faulty = slot({"dead_after": 2, "deaths": 2, "fault_dir": str(tmp_path / "tickets")})
    summary = run(inp, str(tmp_path / "faulty.parquet"), faulty)
    assert summary["engine_faults"] == 2 and clean["engine_faults"] == 0
    assert sorted(p.name for p in (tmp_path / "tickets").iterdir()) == ["death-1", "death-2"]
    rows = read_rows(tmp_path / "faulty.parquet")
    assert rows == read_rows(tmp_path / "clean.parquet") and len(rows) == 46
    assert [r["id"] for r in rows if r["error"]] == [rows[7]["id"]]  # the bad line only, at its place
    assert not storage.exists(work_folder(str(tmp_path / "faulty.parquet")))  # the work folder is gone


def test_an_engine_that_keeps_failing_stops_with_its_cause(tmp_path, capsys):
    inp = corpus(tmp_path / "in.jsonl")
    with pytest.raises(JobFailed, match="failed 3 times, each time with an engine fault; last: RuntimeError: CUDA"):
        run(inp, str(tmp_path / "out.parquet"), slot({"dead_after": 0, "deaths": 9, "fault_dir": str(tmp_path / "t")},
                                                     retries=2))
    assert not (tmp_path / "out.parquet").exists()  # nothing half written
    from opsft.cli import main

    code = main(["score", "--input", inp, "--output", str(tmp_path / "cli.jsonl"), "--engine", "fake",
                 "--config", _yaml(tmp_path, {"engine": {"fake": {"dead_after": 0, "deaths": 9,
                                                                  "fault_dir": str(tmp_path / "t2")}},
                                              "pool": {"max_task_retries": 1}})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("opsft score: failed: the fake engine failed 2 times")


def _yaml(tmp_path, data: dict) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


class Interrupt(BaseException):
    """A kill: not an Exception, so nothing classifies it; the run just stops."""


def test_a_killed_run_resumes_from_its_work_folder_and_another_input_starts_afresh(tmp_path):
    inp = corpus(tmp_path / "in.jsonl")
    calls = []

    def dies_at_the_third_chunk(rows, engine, **kw):
        calls.append(len(rows))
        if len(calls) == 3:
            raise Interrupt
        return score_rows(rows, engine, **kw)

    out = str(tmp_path / "out.jsonl")
    with pytest.raises(Interrupt):
        run(inp, out, slot(), fn=dies_at_the_third_chunk)
    assert not (tmp_path / "out.jsonl").exists() and storage.is_dir(work_folder(out))
    resumed = run(inp, out, slot())
    assert resumed["rows_skipped_already_done"] == 20 and resumed["rows_written"] == 26
    clean = str(tmp_path / "clean.jsonl")
    run(inp, clean, slot())
    assert read_rows(out) == read_rows(clean)  # each row once, in input order
    # a work folder left by a run of another input is opsft's own: discarded, not mixed in
    with pytest.raises(Interrupt):
        calls.clear()
        run(inp, out, slot(), fn=dies_at_the_third_chunk)
    inp2 = corpus(tmp_path / "in2.jsonl", n=12)
    again = run(inp2, out, slot())
    assert again["rows_skipped_already_done"] == 0 and len(read_rows(out)) == 13
