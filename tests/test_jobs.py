"""Ray Data job layer without running a model: part files with their progress records, the
reading stage, per-row isolation in the actor, flags, the submission request, and the plan built
from a config (GPU resources included) without executing it."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from opsft.data import parts
from opsft.data.corpus import rows_table
from opsft.data.reader import corpus_ranges, read_rows
from opsft.faults import Guard, apply_rows
from opsft.jobs.stages import ROW, EngineActor, read_pieces


def test_rows_table_fixes_score_types_and_survives_mixed_columns():
    rows = [{"id": "a", "cll": None, "n_tokens": None, "error": "bad", "token_phi": None, "answer": 4},
            {"id": "b", "cll": None, "n_tokens": None, "error": "bad", "token_phi": None, "answer": "four"}]
    table = rows_table(rows, parts.SCORE_TYPES)
    assert table.schema.field("cll").type == pa.float64()  # not null-typed although all values are null
    assert table.schema.field("n_tokens").type == pa.int64()
    assert table.schema.field("token_phi").type == pa.list_(pa.float64())
    assert table.column("answer").to_pylist() == ["4", "four"]  # int and str in one column -> text (JSON for the int)


def test_parts_progress_records_and_temporaries(tmp_path):
    out = str(tmp_path / "out.parquet")
    assert parts.part_files(out) == [] and parts.progress(out).rows == 0
    first = parts.write_part(out, [{"id": "1", "x": 1.0}, {"id": "2", "x": None}], [0, 1], parts.SCORE_TYPES,
                             {"error_rows": 1})
    parts.write_part(out, [{"id": "3", "x": None}], [5], parts.SCORE_TYPES)  # a part with only nulls in x
    again = parts.write_part(out, [{"id": "1", "x": 1.0}, {"id": "2", "x": None}], [0, 1], parts.SCORE_TYPES,
                             {"error_rows": 1})
    assert again == first  # the same rows make the same part: a write done twice is not a row written twice
    (tmp_path / "out.parquet" / ".tmp-part-dead.parquet").write_bytes(b"half written")
    (tmp_path / "out.parquet" / ".rows-part-never-came.parquet.json").write_text("{}")  # its part never came
    done = parts.progress(out)
    assert (done.rows, done.parts, done.intervals, done.stats["error_rows"]) == (3, 2, [[0, 2], [5, 6]], 1)
    assert sorted(r["id"] for r in read_rows(out)) == ["1", "2", "3"]
    assert parts.remove_temporaries(out) == 2 and parts.remove_temporaries(out) == 0
    jl = str(tmp_path / "out.jsonl")
    parts.write_part(jl, [{"id": "z", "nested": {"a": [1, 2]}}], [7])
    assert read_rows(jl) == [{"id": "z", "nested": {"a": [1, 2]}}]
    single = tmp_path / "single.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "q"}]), single)
    assert read_rows(str(single)) == [{"id": "q"}]
    with pytest.raises(ValueError, match="is a file"):
        parts.part_files(str(single))
    stranger = tmp_path / "foreign.parquet"
    stranger.mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": "q"}]), stranger / "part-0.parquet")
    with pytest.raises(ValueError, match="no progress record"):
        parts.progress(str(stranger))


def test_intervals_merge_and_lookup():
    assert parts.coalesce([5, 1, 2, 3, 9]) == [[1, 4], [5, 6], [9, 10]]
    with pytest.raises(ValueError, match="twice"):
        parts.coalesce([1, 1])
    merged, overlap = parts.merge([[4, 6], [0, 2], [2, 3], [5, 8]])
    assert merged == [[0, 3], [4, 8]] and overlap == 1
    assert parts.within(merged, 1, 5) == [[1, 3], [4, 5]] and parts.covered(merged) == 7
    assert [n for n in range(10) if parts.contains(merged, n)] == [0, 1, 2, 4, 5, 6, 7]


def test_a_folder_holding_another_jobs_output_is_refused(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "p", "response": "r"}\n')
    out = str(tmp_path / "o.parquet")
    first = parts.job_identity(str(corpus), [{"fn": "score", "engine": {"model": "a"}}])
    parts.claim([out], first, has_rows=False)
    parts.claim([out], first, has_rows=True)  # the same job: a resume
    other = parts.job_identity(str(corpus), [{"fn": "score", "engine": {"model": "b"}}])
    with pytest.raises(ValueError, match="holds the output of another job"):
        parts.claim([out], other, has_rows=True)
    corpus.write_text('{"prompt": "p", "response": "changed"}\n')
    with pytest.raises(ValueError, match="another job"):
        parts.claim([out], parts.job_identity(str(corpus), [{"fn": "score", "engine": {"model": "a"}}]), True)


def test_read_pieces_gives_every_line_a_row_a_number_and_skips_done_rows(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "p", "response": "r"}\nnot json\n\n{"prompt": "q", "response": "s"}\n'
                     b"\xff\xfe\n")
    pieces = corpus_ranges(str(path), range_bytes=8)
    items = [{"piece": json.dumps(p), "done": json.dumps([[0, 1]])} for p in pieces]
    table = pa.concat_tables([read_pieces(pa.Table.from_pylist([item])) for item in items])
    rows = [pickle.loads(b) for b in table.column("row").to_pylist()]
    assert table.column(ROW).to_pylist() == [1, 2, 3]  # row 0 was done; the blank line is not a row
    assert "invalid JSON" in rows[0]["error"] and "line 2" in rows[0]["error"]
    assert "not UTF-8" in rows[2]["error"] and "line 5" in rows[2]["error"]
    again = pa.concat_tables([read_pieces(pa.Table.from_pylist([item])) for item in items])
    assert again.column("id").to_pylist() == table.column("id").to_pylist()  # same ids on a re-run
    assert [r["id"] for r in rows] == table.column("id").to_pylist()


class Tagged:
    """An engine stand-in with no capability: its health check always passes."""

    def __init__(self, tag: str):
        self.tag = tag


def _fails_on_poison(rows, engine, suffix=""):
    if any(r.get("poison") for r in rows):
        raise RuntimeError("poisoned row")
    return [{**r, "seen": (engine.tag if engine is not None else "none") + suffix} for r in rows]


def test_apply_rows_isolates_a_failing_row():
    rows = [{"id": "1"}, {"id": "2", "poison": True}, {"id": "3"}]
    out = apply_rows(_fails_on_poison, rows, Tagged("eng"), {"suffix": "!"})
    assert [r["id"] for r in out] == ["1", "2", "3"]
    assert out[0]["seen"] == "eng!" and out[2]["seen"] == "eng!"
    assert out[1]["error"] == "RuntimeError: poisoned row" and "seen" not in out[1]
    with pytest.raises(RuntimeError, match="1:1"):
        apply_rows(lambda rows, engine: rows[:1], rows, None, {})


def test_actor_maps_a_batch_and_keeps_row_numbers():
    actor = EngineActor.__new__(EngineActor)  # no engine needed to check the mapping
    actor.fn, actor.fn_kwargs, actor.engine, actor.monitor, actor.step = _fails_on_poison, {}, "e", None, "s"
    actor.busy = {}
    actor.guard = Guard(Tagged("e"))
    batch = pa.table({"row": [pickle.dumps({"id": "1"}), pickle.dumps({"id": "2"})], "id": ["1", "2"],
                      ROW: [4, 9]})
    out = actor(batch)
    assert [pickle.loads(b) for b in out.column("row").to_pylist()] == [{"id": "1", "seen": "e"},
                                                                       {"id": "2", "seen": "e"}]
    assert out.column(ROW).to_pylist() == [4, 9] and out.column("id").to_pylist() == ["1", "2"]


def test_job_flags_and_submission_request():
    from opsft.cli.jobflags import parse_actors
    from opsft.cli.submit import build_submission

    assert parse_actors("3") == (3, 3) and parse_actors("2-8") == (2, 8)
    with pytest.raises(ValueError):
        parse_actors("8-2")
    sub = build_submission(["score", "--input", "a b.jsonl", "--ray"], "/repo", environ={"HF_HUB_OFFLINE": "1"})
    assert sub["entrypoint"] == "python -m opsft.cli score --input 'a b.jsonl' --ray"
    assert sub["runtime_env"]["working_dir"] == "/repo"
    assert sub["runtime_env"]["env_vars"] == {"HF_HUB_OFFLINE": "1", "PYTHONPATH": "services"}
    assert ".venv" in sub["runtime_env"]["excludes"]
    with pytest.raises(ValueError, match="opsft command"):
        build_submission(["rm", "-rf"])


@pytest.mark.slow
def test_vllm_generation_stages_keep_several_calls_in_flight(ray_local, tmp_path):
    from opsft.config import RewriteConfig
    from opsft.jobs.pipeline import build_plan, rewrite_spec

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"prompt": "1+1?", "response": "2", "answer": "2"}) + "\n")
    cfg = RewriteConfig(engine={"kind": "vllm"}, pool={"num_gpus": 1})
    plan = build_plan(rewrite_spec(cfg, str(corpus), str(tmp_path / "out.parquet")))
    actors = {s.name.split(":")[0]: s for s in plan.stages if s.kind == "actors"}
    calls = {name: s.resources["calls_in_flight"] for name, s in actors.items()}
    # generation through the Feeder: 4 batches at once; hinted decoding's waves and scoring: one
    assert calls == {"self-answer": 4, "hint": 4, "hinted-decoding": 1, "score": 1}
    ops, op = {}, plan.dataset._logical_plan.dag
    while op.input_dependencies:
        if op.name == "MapBatches(EngineActor)":
            ops[op.fn_constructor_kwargs["step"]] = op
        op = op.input_dependencies[0]
    assert ops["self-answer"].compute.max_concurrent_calls_per_actor == 4
    assert ops["self-answer"].compute.enable_true_multi_threading
    assert ops["self-answer"].fn_constructor_kwargs["engine"]["options"]["runners"] == ("generate",)
    assert ops["score"].fn_constructor_kwargs["engine"]["options"]["runners"] == ("score",)
    assert ops["hinted-decoding"].compute.max_concurrent_calls_per_actor is None
    with pytest.raises(ValueError, match="hf engine takes one call at a time"):
        RewriteConfig(pool={"calls_in_flight": 2})


@pytest.mark.slow
def test_plan_from_config_has_configured_pool_and_gpu_resources(ray_local, tmp_path):
    from opsft.config import ScoreConfig, load_config
    from opsft.jobs.pipeline import build_plan, score_spec

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    cfg_file = tmp_path / "score.yaml"
    cfg_file.write_text("engine: {kind: vllm, tensor_parallel_size: 1}\n"
                        "pool: {min_size: 2, max_size: 8, num_gpus: 1, num_cpus: 4, batch_size: 256}\n")
    cfg = load_config(ScoreConfig, cfg_file, {"input": str(corpus), "output": str(tmp_path / "o.parquet")})
    plan = build_plan(score_spec(cfg.input, cfg.output, cfg.engine, cfg.pool))
    assert [s.kind for s in plan.stages] == ["task", "task", "actors", "write"]
    actors = plan.stages[2]
    assert (actors.min_actors, actors.max_actors, actors.batch_size) == (2, 8, 256)
    assert actors.resources["num_gpus"] == 1 and actors.resources["num_cpus"] == 4
    # the Ray Data logical plan itself (nothing executed; there is no GPU here)
    op = plan.dataset._logical_plan.dag
    assert op.name == "MapBatches(EngineActor)"
    assert (op.compute.min_size, op.compute.max_size) == (2, 8)
    assert op.ray_remote_args["num_gpus"] == 1 and op.ray_remote_args["num_cpus"] == 4
    assert op.batch_size == 256
    assert op.ray_remote_args_fn is None  # deprecated in Ray 2.60; the job's monitor bounds the retries
    assert actors.resources["max_task_retries"] == 3
    assert op.fn_constructor_kwargs["engine"]["kind"] == "vllm"
    assert op.fn_constructor_kwargs["engine"]["options"]["tensor_parallel_size"] == 1
    # a scoring stage starts the pooling runner only, with all of the memory share; one call at a time
    assert op.fn_constructor_kwargs["engine"]["options"]["runners"] == ("score",)
    assert actors.resources["calls_in_flight"] == 1 and op.compute.max_concurrent_calls_per_actor is None
    reblock = op.input_dependencies[0]
    assert type(reblock).__name__ == "StreamingRepartition"
    assert reblock.input_dependencies[0].name == "MapBatches(read_pieces)"


def test_every_schema_of_a_scored_row_agrees_with_score_columns(tiny_model, tokenizer):
    """One definition (opsft.score_columns): the fields score_rows writes, their Arrow types, the
    columns realign drops and the HTTP answer's ItemScores are the same names with the same types."""
    from opsft import score_columns
    from opsft.engines.hf import HFEngine
    from opsft.scoring import score_rows
    from opsft.serve.schemas import ItemScores

    fields = score_columns.SCORE_FIELDS
    assert fields[:9] == ("cll", "cll_sum", "cll_frac_pos", "cll_frac_gt_m1", "cll_frac_gt_m3", "cll_frac_gt_m5",
                          "logprob_mean", "entropy_mean", "n_tokens") and fields[9:] == ("exact_entropy",)
    engine = HFEngine(device="cpu", model_and_tokenizer=(tiny_model, tokenizer))
    good, bad = score_rows([{"prompt": "Hi", "response": "Hello there."}, {"prompt": "", "response": "x"}],
                           engine, tokens=True)
    added = set(good) - {"prompt", "response", "id"}
    assert added == set(score_columns.SCORED_COLUMNS) == set(bad) - {"prompt", "response", "id"}
    python = {"float": float, "int": int, "bool": bool}
    assert all(type(good[f]) is python[score_columns.FIELD_TYPES[f]] for f in fields)  # noqa: E721
    arrow = {"float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}
    assert all(parts.SCORE_TYPES[f] == arrow[score_columns.FIELD_TYPES[f]] for f in fields)
    assert set(parts.SCORE_TYPES) == set(score_columns.SCORED_COLUMNS) | {"id"}
    http = {name: f.annotation for name, f in ItemScores.model_fields.items() if name not in ("id", "tokens")}
    assert http == {f: python[score_columns.FIELD_TYPES[f]] for f in fields}


def test_progress_lines_one_per_stage_from_the_monitors_counts():
    from opsft.jobs.pipeline import ProgressLog, progress_interval

    now = [100.0]
    counts: dict = {}
    emitted: list[str] = []
    progress = ProgressLog("rewrite", ["self-answer", "score", "write"], 1000, lambda: {"rows": dict(counts)},
                           30, emitted.append, clock=lambda: now[0])
    now[0] += 20
    assert progress.lines() == ["rewrite [20s] 1000 rows to do; no stage has finished a batch yet"]
    now[0] += 70
    counts.update({"self-answer": 450, "score": 90})
    # first seen running: counts only (a rate needs two sightings); write has no rows yet: quiet
    assert progress.lines() == ["rewrite [1m30s] self-answer: 450/1000 rows (45%)",
                                "rewrite [1m30s] score: 90/1000 rows (9%)"]
    now[0] += 3600  # score: (999 - 90) / 3600 = 0.2525 rows/s, 1 row left ~4 s; write first seen
    counts.update({"self-answer": 1000, "score": 999, "write": 640})
    assert progress.lines() == ["rewrite [1h01m] self-answer: 1000/1000 rows (100%), done",
                                "rewrite [1h01m] score: 999/1000 rows (99%), 0.253 rows/s, ~4s left",
                                "rewrite [1h01m] write: 640/1000 rows (64%)"]
    now[0] += 100  # write: 100 rows in 100 s since it was first seen (not 740 over the job's 3790 s)
    counts.update({"write": 740})
    assert progress.lines() == ["rewrite [1h03m] score: 999/1000 rows (99%), 0.246 rows/s, ~4s left",  # 909 / 3700
                                "rewrite [1h03m] write: 740/1000 rows (74%), 1 rows/s, ~4m20s left"]
    counts.update({"score": 1000, "write": 1000})
    progress.stop()  # the stages not yet reported done, once; a finished stage is quiet
    assert emitted == ["rewrite [1h03m] score: 1000/1000 rows (100%), done",
                       "rewrite [1h03m] write: 1000/1000 rows (100%), done"]
    assert progress.lines() == []
    from opsft.jobs.pipeline import JobSpec

    spec = JobSpec(input="a.jsonl", output="b.parquet", fn="m:f")
    assert progress_interval(spec, {}) == 30 and progress_interval(spec, {"OPSFT_PROGRESS_S": "45"}) == 45
    assert progress_interval(JobSpec(input="a", output="b", fn="f", progress_s=0), {"OPSFT_PROGRESS_S": "5"}) == 0
    with pytest.raises(ValueError, match="OPSFT_PROGRESS_S='soon'"):
        progress_interval(spec, {"OPSFT_PROGRESS_S": "soon"})


@pytest.mark.slow
def test_a_job_outside_a_terminal_logs_one_line_per_stage_not_ray_data_blocks(ray_local, tmp_path, caplog, capfd):
    """Not a TTY (pytest captures stdout): Ray Data's progress is off for the job's dataset (it would log a
    '======= Running Dataset' block at once, then every 10 s) and each stage ends with one line of its rows.
    A 4-stage rewrite on the fake engine; no deprecation warning points at our calls of Ray Data's API
    (Ray 2.60 warns where `map_batches(ray_remote_args_fn=...)` or `**ray_remote_args` are called)."""
    import logging
    import warnings

    from opsft.config import EngineConfig, PoolConfig, RewriteConfig
    from opsft.jobs.pipeline import rewrite_spec, run_job

    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "response": f"It is {i + 1}."} for i in range(10)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = rewrite_spec(RewriteConfig(max_new_tokens=8, hint_max_new_tokens=8), str(tmp_path / "in.jsonl"),
                        str(tmp_path / "out.parquet"), engine=EngineConfig(kind="fake"),
                        pool=PoolConfig(num_cpus=0.25, batch_size=4), dropped_output=str(tmp_path / "dropped"))
    spec.progress_s = 3600  # no periodic line in this short job: the closing ones only
    caplog.set_level(logging.INFO, logger="opsft.jobs.pipeline")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        summary = run_job(spec)
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in seen if issubclass(w.category, DeprecationWarning)
            and ("/opsft/" in w.filename or "ray_remote_args" in str(w.message))]
    assert ours == []
    assert summary["rows_out_total"] == 10
    lines = [r.getMessage() for r in caplog.records if r.name == "opsft.jobs.pipeline" and "rows" in r.getMessage()]
    stages = [s.name for s in spec.steps] + ["write"]
    assert [line.split("] ")[1] for line in lines] == [f"{s}: 10/10 rows (100%), done" for s in stages]
    assert all(line.startswith("rewrite [") for line in lines)
    out, err = capfd.readouterr()
    assert "Running Dataset" not in out + err and "Total Progress" not in out + err
    assert not any("Running Dataset" in r.getMessage() for r in caplog.records)
