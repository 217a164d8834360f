"""End to end on local Ray with the real model: `opsft score --ray` over JSONL and Parquet,
rows and columns preserved, error rows, distributed scores equal to the in-process ones,
an engine actor killed mid-job (score and rewrite) retried with the output of an uninterrupted
run, a killed job resumed, and a generation row function (the
hook `opsft rewrite` uses) through the same actor pool."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from opsft.config import EngineConfig, PoolConfig
from opsft.data import parts
from opsft.data.reader import read_rows
from opsft.engines import GenerationParams
from opsft.scoring import score_rows
from ray import cloudpickle

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the row functions below run in actors

QUESTIONS = ["What is 2+3?", "Name a primary colour.", "What is the capital of France?", "Say hello.",
             "What is 10 minus 4?", "Is water wet?", "Count to three.", "What colour is the sky?"]


def corpus_rows() -> list[dict]:
    rows = [{"prompt": q, "response": f"Here is my answer to: {q.lower()} It is simple.", "k": i, "meta": {"i": i}}
            for i, q in enumerate(QUESTIONS)]
    rows[0]["id"] = "first"
    rows.insert(3, {"prompt": "", "response": "no prompt"})
    rows.insert(6, {"messages": [{"role": "user", "content": "Hi"}], "response": ""})
    return rows


def write_jsonl(path: Path, rows: list[dict], bad_line: bool = True) -> None:
    lines = [json.dumps(r) for r in rows]
    if bad_line:
        lines.insert(5, "{this is not json")
    path.write_text("\n".join(lines) + "\n")


def spec(tmp_path, fn="opsft.scoring:score_rows", name="out.parquet", inp="in.jsonl", **pool):
    from opsft.jobs.pipeline import JobSpec

    return JobSpec(input=str(tmp_path / inp), output=str(tmp_path / name), fn=fn, column_types=parts.SCORE_TYPES,
                   pool=PoolConfig(**{"batch_size": 3, **pool}), name="score")


def test_score_job_preserves_rows_and_matches_in_process(ray_local, tmp_path, real_engine):
    from opsft.jobs.pipeline import run_job

    rows = corpus_rows()
    write_jsonl(tmp_path / "in.jsonl", rows)
    summary = run_job(spec(tmp_path))
    out = {r["id"]: r for r in read_rows(str(tmp_path / "out.parquet"))}
    assert summary["rows_in"] == summary["rows_written"] == summary["rows_out_total"] == len(rows) + 1 == len(out)
    assert summary["error_rows"] == 3 and summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    errors = sorted(r["error"] for r in out.values() if r["error"])
    assert errors == ["'prompt' is empty", "'response' is empty", "line 6: invalid JSON (Expecting property name "
                      "enclosed in double quotes)"]
    reference = score_rows(rows, real_engine)  # the in-process path on the same rows
    for ref in reference:
        got = out[ref["id"]]
        assert got["k"] == ref.get("k") and got.get("meta") == ref.get("meta")  # columns carried through
        if ref["error"]:
            assert got["error"] == ref["error"] and got["cll"] is None
            continue
        assert got["n_tokens"] == ref["n_tokens"]
        # two float32 evaluations in other batches (padding) and thread counts: each token's phi is within
        # 3.9e-5 of float64 on this model (benchmarks/RESULTS.md, score_throughput), so two are within
        # 7.9e-5 per token and so is a mean over tokens (test_score_real uses the same 1e-4); log p's
        # error is that of the same logits. (1e-5, the tolerance before, was below that bound.)
        assert got["cll"] == pytest.approx(ref["cll"], abs=1e-4)
        assert got["logprob_mean"] == pytest.approx(ref["logprob_mean"], abs=1e-4)
    # one unified schema across parts (a part may hold only error rows)
    table = pq.read_table(str(tmp_path / "out.parquet"))
    assert table.schema.field("cll").type == pa.float64() and table.num_rows == len(rows) + 1


def _killed_once(rows, engine, fn, tickets, kill_at, fn_kwargs):
    """The row function `fn`, except that the call holding ticket `kill_at` (calls are numbered
    in the order they start, across actors) SIGKILLs its own actor process, like an OOM kill:
    a deterministic kill in the middle of a job. Retries take new tickets, so it happens once."""
    from opsft.jobs.stages import load_function

    ticket = 1
    while True:  # O_EXCL: exactly one call gets each number
        try:
            os.close(os.open(os.path.join(tickets, f"call-{ticket}"), os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            ticket += 1
    if ticket == kill_at:
        Path(tickets, "killed").write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return load_function(fn)(rows, engine, **fn_kwargs)


@pytest.mark.parametrize("job", ["score", "rewrite"])
def test_engine_actor_killed_mid_job_is_retried_and_output_equals_an_uninterrupted_run(ray_local, tmp_path,
                                                                                        tiny_dir, job):
    """The score job, and the rewrite job of `opsft rewrite --ray` and the cycle (rewrite_spec: six
    stages), with the engine actor of one stage (score; hinted decoding) killed mid-stage."""
    from opsft.config import RewriteConfig
    from opsft.jobs.pipeline import rewrite_spec, run_job, score_spec

    rows = [{"id": f"r{i}", "prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}.",
             "answer": str(2 * i)} for i in range(8)]
    write_jsonl(tmp_path / "in.jsonl", rows, bad_line=False)
    tickets = tmp_path / "tickets"
    tickets.mkdir()
    engine = EngineConfig(model=tiny_dir)
    pool = PoolConfig(num_cpus=0.25, batch_size=2, max_task_retries=2)
    recipe = RewriteConfig(policy="hd-all", missing_hint="cot", max_new_tokens=6, hint_max_new_tokens=6)

    def run(name: str, kill_at: int | None) -> list[dict]:
        inp, out = str(tmp_path / "in.jsonl"), str(tmp_path / name)
        spec = score_spec(inp, out, engine, pool) if job == "score" else rewrite_spec(recipe, inp, out, engine=engine,
                                                                                      pool=pool)
        step = next(s for s in spec.all_steps() if s.name == ("hinted-decoding" if job == "rewrite" else "score"))
        step.fn, step.fn_kwargs = _killed_once, {"fn": step.fn, "tickets": str(tickets), "kill_at": kill_at,
                                                 "fn_kwargs": step.fn_kwargs}
        if spec.steps is None:  # a one-step job: its step is made from the spec's own fn
            spec.fn, spec.fn_kwargs = step.fn, step.fn_kwargs
        summary = run_job(spec)
        assert summary["rows_in"] == summary["rows_out_total"] == len(rows)
        assert summary["batch_retries"] == (1 if kill_at else 0) and summary["rows_lost"] == 0
        return sorted(read_rows(str(tmp_path / name)), key=lambda r: r["id"])

    clean = run("clean.parquet", kill_at=None)
    for ticket in tickets.iterdir():
        ticket.unlink()
    killed = run("killed.parquet", kill_at=2)  # the second of four batches: mid-job
    assert (tickets / "killed").exists()  # the kill did happen
    assert len(list(tickets.glob("call-*"))) == 5  # four batches and the one retried
    # the same batches on the same engine in a fresh process compute the same floats
    assert killed == clean
    assert [r["id"] for r in killed] == [r["id"] for r in sorted(rows, key=lambda r: r["id"])]
    assert all(not r.get("error") for r in killed)
    if job == "score":
        assert all(r["n_tokens"] > 0 for r in killed)
    else:
        assert all(r["original_response"] == next(x["response"] for x in rows if x["id"] == r["id"]) for r in killed)


def _crash_after_first_part(rows, engine, output, crash_flag):
    """score_rows, except that while the file `crash_flag` exists, the actor's second call kills its
    process (after the first part is written): a job killed midway. The same function and settings
    (the job's identity) serve the resumed run, which removes the flag first."""
    if os.path.exists(crash_flag):
        deadline = time.monotonic() + 600  # a hang guard, not a timing bet: waits for the first part file
        if parts.part_files(output) or os.environ.get("OPSFT_TEST_FIRST_BATCH_DONE"):
            while not parts.part_files(output) and time.monotonic() < deadline:
                time.sleep(0.2)
            os._exit(1)  # killed midway, after something was written
        os.environ["OPSFT_TEST_FIRST_BATCH_DONE"] = "1"
    return score_rows(rows, engine)


def test_killed_job_resumes_without_duplicates(ray_local, tmp_path):
    from opsft.faults import JobFailed
    from opsft.jobs.pipeline import run_job

    rows = [{"prompt": r.get("prompt", "?"), "response": r["response"], "k": r.get("k")} for r in corpus_rows()]
    rows.append(dict(rows[0]))  # two identical rows without an id: the same content id, two rows all the same
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = str(tmp_path / "out.jsonl")
    flag = tmp_path / "crash"
    flag.write_text("")
    job = spec(tmp_path, fn=_crash_after_first_part, name="out.jsonl", inp="in.parquet", batch_size=2,
               max_task_retries=0)
    job.fn_kwargs, job.rows_per_part = {"output": out, "crash_flag": str(flag)}, 2
    with pytest.raises(JobFailed, match="stopped .* started 2 times .* died each time .* a rerun resumes"):
        run_job(job)
    before = parts.progress(out)
    assert 0 < before.rows < len(rows)
    flag.unlink()
    summary = run_job(job)
    after = read_rows(out)
    assert len(after) == len(rows) and parts.progress(out).intervals == [[0, len(rows)]]  # every row exactly once
    assert sorted(r["k"] for r in after if r["k"] is not None) == sorted(r["k"] for r in rows if r["k"] is not None)
    assert summary["rows_skipped_already_done"] == before.rows and summary["rows_lost"] == 0
    assert summary["rows_written"] == len(rows) - before.rows and summary["rows_in"] == len(rows)
    assert run_job(job)["rows_written"] == 0  # done: a rerun reads nothing


def _own_answers(rows, engine, max_new_tokens):
    """A generation row function (like the rewrite recipe's): the model's own greedy answer."""
    from opsft.data.chat import prompt_ids
    from opsft.data.corpus import parse_row

    prompts = [prompt_ids(engine.tokenizer, parse_row(r, need_response=False).messages) for r in rows]
    outs = engine.generate(prompts, GenerationParams(max_new_tokens=max_new_tokens))
    texts = engine.tokenizer.batch_decode(outs, skip_special_tokens=True)
    return [{**r, "reference": r.get("response"), "response": t.strip()} for r, t in zip(rows, texts, strict=True)]


def test_generation_row_function_runs_in_the_pool_and_cli_scores_it(ray_local, tmp_path, real_engine):
    from opsft.cli import main
    from opsft.jobs.pipeline import run_job

    rows = [{"id": "fr", "prompt": "What is the capital of France?", "response": "x"},
            {"id": "bad", "prompt": 7, "response": "x"}]
    write_jsonl(tmp_path / "in.jsonl", rows, bad_line=False)
    job = spec(tmp_path, fn=_own_answers, name="own.jsonl")
    job.fn_kwargs, job.column_types = {"max_new_tokens": 12}, None
    assert run_job(job)["rows_out_total"] == 2
    own = {r["id"]: r for r in read_rows(str(tmp_path / "own.jsonl"))}
    assert "Paris" in own["fr"]["response"] and own["fr"]["reference"] == "x"
    assert own["bad"]["error"].startswith("RowError: 'prompt' must be a string")
    # the own answers, scored through the CLI's Ray path, are on-policy (CLL near 0 or above)
    own_file = tmp_path / "own_answers.jsonl"
    write_jsonl(own_file, [own["fr"]], bad_line=False)
    assert main(["score", "--input", str(own_file), "--output", str(tmp_path / "own_scored.parquet"), "--ray",
                 "--actors", "1", "--rows-per-batch", "4"]) == 0
    [scored] = read_rows(str(tmp_path / "own_scored.parquet"))
    assert scored["cll"] > -0.1


def test_cli_rewrite_ray_gives_the_rows_of_the_in_process_rewrite_and_honours_drop_unverified(
        ray_local, tmp_path, tokenizer):
    """`opsft rewrite --ray` (the recipe's six stages as one Ray Data job, an actor pool per engine
    stage) against `opsft rewrite` in one process, greedy: the same rows; rows in == rows out;
    drop_unverified sends the same rows to the side output on both paths. The random model never
    ends an output by itself, so every rewrite is cut at max_length: a runaway, kept by neither
    path (the rows with a reference and those without alike go to the side output)."""
    import torch
    from opsft.cli import main
    from opsft.data.reader import read_rows
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # a random model with room for the ~800-token hint prompt
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.1, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"id": f"n{i}", "prompt": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}.", "answer": str(2 * i)}
            for i in range(4)]  # verifiable: the random model's answers are wrong -> dropped
    rows += [{"id": f"t{i}", "prompt": f"Say something about {w}.", "response": f"{w} is fine."}  # no reference,
             for i, w in enumerate(["rain", "tea", "maps"])]                                         # but cut: dropped
    rows.insert(2, {"id": "bad", "prompt": "", "response": "no prompt"})
    write_jsonl(tmp_path / "in.jsonl", rows, bad_line=False)
    common = ["--input", str(tmp_path / "in.jsonl"), "--model", str(model_dir), "--temperature", "0",
              "--max-new-tokens", "4", "--hint-max-new-tokens", "4", "--splitter", "", "--missing-hint", "cot",
              "--drop-unverified"]
    assert main(["rewrite", *common, "--output", str(tmp_path / "local.jsonl")]) == 0
    assert main(["rewrite", *common, "--output", str(tmp_path / "ray.jsonl"), "--ray", "--cpus", "0.25",
                 "--rows-per-batch", "3"]) == 0
    local = {r["id"]: r for r in read_rows(tmp_path / "local.jsonl")}
    local_dropped = {r["id"]: r for r in read_rows(tmp_path / "local.dropped.jsonl")}
    ray_kept = {r["id"]: r for r in read_rows(str(tmp_path / "ray.jsonl"))}
    ray_dropped = {r["id"]: r for r in read_rows(str(tmp_path / "ray.dropped.jsonl"))}
    assert sorted(ray_kept) == sorted(local) == ["bad"]
    assert sorted(ray_dropped) == sorted(local_dropped) == ["n0", "n1", "n2", "n3", "t0", "t1", "t2"]
    for rid, want in {**local, **local_dropped}.items():
        got = {**ray_kept, **ray_dropped}[rid]
        for key in ("response", "source", "verified", "finish_reason", "hint", "hd_response", "hd_tokens",
                    "self_response", "self_verified", "error", "dropped"):
            assert got.get(key) == want.get(key), (rid, key)
        for key in ("cll", "cll_original"):  # float32 scores from batches of other sizes
            assert (got[key] is None) == (want[key] is None) and (got[key] is None or
                                                                   got[key] == pytest.approx(want[key], abs=1e-5))
    assert {(r["source"], r["finish_reason"], r["hd_tokens"]) for r in ray_dropped.values()} == \
        {("original", "max_length", 4)}


def test_engine_deaths_kills_and_hangs_are_retried_never_written_and_poison_rows_are(ray_local, tmp_path):
    """The score job and the rewrite job on the fake engine (no model: everything else real), with
    every fault at once: engines that die (every call then raises a CUDA error), an actor SIGKILLed,
    a call that never returns (the stall watchdog ends its actor), and a row the engine cannot score
    while it stays healthy. Faults are retried on new actors and never written; the poisoned rows
    and the corpus' bad rows are the only error rows; the rows equal a run without faults."""
    from opsft.config import RewriteConfig
    from opsft.engines.fake import FakeEngine
    from opsft.jobs.pipeline import rewrite_spec, run_job, score_spec

    tok = FakeEngine().tokenizer
    poison = tok(" zebra", add_special_tokens=False)["input_ids"][-1]
    rows = [{"id": f"r{i}", "prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1),
             "response": f"{i} + {i + 1} = {2 * i + 1}. The answer is {2 * i + 1}."} for i in range(28)]
    rows[7]["response"] = "A zebra. The answer is 15."  # scored: the engine raises for it alone (a row fault)
    write_jsonl(tmp_path / "in.jsonl", rows)  # with one line that is not JSON
    # four faults in all: even a batch that met every one of them is tried once more (4 retries)
    pool = PoolConfig(num_cpus=0.25, batch_size=4, max_task_retries=4, stall_timeout_s=3)

    def run(job: str, name: str, faults: dict | None) -> tuple[dict, list[dict]]:
        fake = {"poison_token": poison, **(faults or {})}
        engine = EngineConfig(kind="fake", fake=fake)
        inp, out = str(tmp_path / "in.jsonl"), str(tmp_path / name)
        spec = (score_spec(inp, out, engine, pool, rows_per_part=8) if job == "score" else
                rewrite_spec(RewriteConfig(max_new_tokens=16, hint_max_new_tokens=16), inp, out, engine=engine,
                             pool=pool, rows_per_part=8))
        summary = run_job(spec)
        return summary, read_rows(out)

    faults = {"dead_after": 2, "deaths": 2, "kill_after": 3, "kills": 1, "hang_after": 4, "hangs": 1}
    for job in ("score", "rewrite"):
        clean_summary, clean = run(job, f"{job}-clean.parquet", None)
        summary, got = run(job, f"{job}-faults.parquet", {**faults, "fault_dir": str(tmp_path / f"tickets-{job}")})
        tickets = sorted(p.name for p in (tmp_path / f"tickets-{job}").iterdir())
        assert tickets == ["death-1", "death-2", "hang-1", "kill-1"]  # every fault happened
        assert summary["engine_faults"] == 3 and summary["batch_retries"] >= 4  # the kill leaves no record
        assert summary["rows_lost"] == 0 and summary["rows_out_total"] == summary["rows_in"] == len(rows) + 1
        assert got == clean  # the same rows, in input order, whatever was retried
        errors = {r["id"]: r["error"] for r in got if r.get("error")}
        if job == "score":
            assert set(errors) == {"r7", next(r["id"] for r in got if r.get("raw_line"))}
            assert "cannot be scored" in errors["r7"]
        else:  # the rewrite scores the new and the original responses: its poisoned row is an error row too
            assert "r7" in errors and len(errors) == 2
        assert clean_summary["engine_faults"] == clean_summary["batch_retries"] == 0
