"""Ray Data job layer without running a model: part files and resume ids, the parse stage,
per-row isolation in the actor, flags, the submission request, and the plan built from a
config (GPU resources included) without executing it."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from opsft.data.corpus import rows_table
from opsft.jobs import files
from opsft.jobs.stages import EngineActor, apply_rows, parse_jsonl_files, parse_table


def test_rows_table_fixes_score_types_and_survives_mixed_columns():
    rows = [{"id": "a", "cll": None, "n_tokens": None, "error": "bad", "token_phi": None, "answer": 4},
            {"id": "b", "cll": None, "n_tokens": None, "error": "bad", "token_phi": None, "answer": "four"}]
    table = rows_table(rows, files.SCORE_TYPES)
    assert table.schema.field("cll").type == pa.float64()  # not null-typed although all values are null
    assert table.schema.field("n_tokens").type == pa.int64()
    assert table.schema.field("token_phi").type == pa.list_(pa.float64())
    assert table.column("answer").to_pylist() == ["4", "four"]  # int and str in one column -> text (JSON for the int)


def test_parts_roundtrip_done_ids_and_temporaries(tmp_path):
    out = str(tmp_path / "out.parquet")
    assert files.part_files(out) == [] and files.done_ids(out) == set()
    files.write_part(out, [{"id": "1", "x": 1.0}, {"id": "2", "x": None}], files.SCORE_TYPES)
    files.write_part(out, [{"id": "3", "x": None}], files.SCORE_TYPES)  # a part with only nulls in x
    (tmp_path / "out.parquet" / ".tmp-part-dead.parquet").write_bytes(b"half written")
    assert len(files.part_files(out)) == 2
    assert files.done_ids(out) == {"1", "2", "3"}
    assert sorted(r["id"] for r in files.read_output(out)) == ["1", "2", "3"]
    assert files.remove_temporaries(out) == 1
    jl = str(tmp_path / "out.jsonl")
    files.write_part(jl, [{"id": "z", "nested": {"a": [1, 2]}}])
    assert files.read_output(jl) == [{"id": "z", "nested": {"a": [1, 2]}}]
    single = tmp_path / "single.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "q"}]), single)
    assert files.read_output(str(single)) == [{"id": "q"}]
    with pytest.raises(ValueError, match="is a file"):
        files.part_files(str(single))


def test_parse_jsonl_gives_every_line_a_row_and_a_stable_id():
    data = b'{"id": "a", "prompt": "p", "response": "r"}\nnot json\n\n{"prompt": "q", "response": "s"}\n\xff\xfe\n'
    table = parse_jsonl_files({"bytes": [data], "path": ["x.jsonl"]}, skip_ids=frozenset({"a"}))
    rows = [pickle.loads(b) for b in table.column("row").to_pylist()]
    assert len(rows) == 4  # the empty line is not a row; the bad ones are
    assert "invalid JSON" in rows[1]["error"] and "line 2" in rows[1]["error"]
    assert "not UTF-8" in rows[3]["error"]
    assert table.column("skip").to_pylist() == [True, False, False, False]
    again = parse_jsonl_files({"bytes": [data], "path": ["x.jsonl"]})
    assert again.column("id").to_pylist() == table.column("id").to_pylist()  # same ids on a re-run
    assert len(set(table.column("id").to_pylist())) == 4
    assert [r["id"] for r in rows] == table.column("id").to_pylist()


def test_parse_table_keeps_columns_and_types():
    t = pa.Table.from_pylist([{"prompt": "p", "response": "r", "meta": {"k": [1, 2]}, "n": 3}])
    rows = [pickle.loads(b) for b in parse_table(t).column("row").to_pylist()]
    assert rows[0]["meta"] == {"k": [1, 2]} and rows[0]["n"] == 3 and rows[0]["id"]


def _fails_on_poison(rows, engine, suffix=""):
    if any(r.get("poison") for r in rows):
        raise RuntimeError("poisoned row")
    return [{**r, "seen": engine + suffix} for r in rows]


def test_apply_rows_isolates_a_failing_row():
    rows = [{"id": "1"}, {"id": "2", "poison": True}, {"id": "3"}]
    out = apply_rows(_fails_on_poison, rows, "eng", {"suffix": "!"})
    assert [r["id"] for r in out] == ["1", "2", "3"]
    assert out[0]["seen"] == "eng!" and out[2]["seen"] == "eng!"
    assert out[1]["error"] == "RuntimeError: poisoned row" and "seen" not in out[1]
    with pytest.raises(RuntimeError, match="1:1"):
        apply_rows(lambda rows, engine: rows[:1], rows, None, {})


def test_actor_skips_rows_already_done():
    actor = EngineActor.__new__(EngineActor)  # no engine needed to check the skip logic
    actor.fn, actor.fn_kwargs, actor.engine = _fails_on_poison, {}, "e"
    batch = pa.table({"row": [pickle.dumps({"id": "1"}), pickle.dumps({"id": "2"})], "id": ["1", "2"],
                      "skip": [True, False]})
    rows = [pickle.loads(b) for b in actor(batch).column("row").to_pylist()]
    assert rows == [{"id": "1"}, {"id": "2", "seen": "e"}]


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
    assert [s.kind for s in plan.stages] == ["read", "task", "task", "actors", "write"]
    actors = plan.stages[3]
    assert (actors.min_actors, actors.max_actors, actors.batch_size) == (2, 8, 256)
    assert actors.resources["num_gpus"] == 1 and actors.resources["num_cpus"] == 4
    # the Ray Data logical plan itself (nothing executed; there is no GPU here)
    op = plan.dataset._logical_plan.dag
    assert op.name == "MapBatches(EngineActor)"
    assert (op.compute.min_size, op.compute.max_size) == (2, 8)
    assert op.ray_remote_args["num_gpus"] == 1 and op.ray_remote_args["num_cpus"] == 4
    assert op.batch_size == 256
    assert op.ray_remote_args_fn() == {"max_restarts": 3, "max_task_retries": 3}
    assert op.fn_constructor_kwargs["engine"]["kind"] == "vllm"
    assert op.fn_constructor_kwargs["engine"]["options"]["tensor_parallel_size"] == 1
    reblock = op.input_dependencies[0]
    assert type(reblock).__name__ == "StreamingRepartition"
    assert reblock.input_dependencies[0].name == "MapBatches(parse_jsonl_files)"


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
    assert all(files.SCORE_TYPES[f] == arrow[score_columns.FIELD_TYPES[f]] for f in fields)
    assert set(files.SCORE_TYPES) == set(score_columns.SCORED_COLUMNS) | {"id"}
    http = {name: f.annotation for name, f in ItemScores.model_fields.items() if name not in ("id", "tokens")}
    assert http == {f: python[score_columns.FIELD_TYPES[f]] for f in fields}
