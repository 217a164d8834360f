"""CLL scoring on the real embedded model (SmolLM2-135M-Instruct)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from opsft.data.chat import encode, prompt_ids, response_ids
from opsft.engines.base import GenerationParams
from opsft.scoring import score_rows

pytestmark = pytest.mark.slow
Q = "What is the capital of France?"


def test_span_is_the_response_tokens_and_values_match_a_full_forward(real_engine):
    tok = real_engine.tokenizer
    messages = [{"role": "user", "content": Q}]
    response = "The capital of France is Paris."
    enc = encode(tok, messages, response)
    prompt = prompt_ids(tok, messages)
    assert enc.input_ids[: enc.response_start] == prompt
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")  # generation prompt included
    assert enc.input_ids[enc.response_start:] == response_ids(tok, response)
    assert tok.decode(enc.input_ids[enc.response_start:]) == response  # no prompt token in the span

    [row] = score_rows([{"prompt": Q, "response": response}], real_engine, tokens=True)
    # Independent reference: one plain forward over the whole sequence, full log_softmax.
    with torch.no_grad():
        logits = real_engine.model(torch.tensor([enc.input_ids])).logits[0].double()
    logp_all = torch.log_softmax(logits[enc.response_start - 1: -1], -1)
    labels = torch.tensor(enc.input_ids[enc.response_start:])
    phi = logp_all.gather(-1, labels[:, None]).squeeze(-1) - (logp_all.exp() * logp_all).sum(-1)
    assert row["n_tokens"] == len(labels)
    assert row["cll"] == pytest.approx(float(phi.mean()), abs=1e-4)
    assert row["token_phi"] == pytest.approx(phi.tolist(), abs=1e-4)


def test_include_eos_adds_exactly_the_end_of_turn_token(real_engine):
    rows = [{"prompt": Q, "response": "Paris."}]
    [plain] = score_rows(rows, real_engine, tokens=True)
    [with_eos] = score_rows(rows, real_engine, include_eos=True, tokens=True)
    assert with_eos["n_tokens"] == plain["n_tokens"] + 1
    # A longer sequence changes matmul shapes: fp32 noise of ~3e-5, hence 1e-4.
    assert with_eos["token_phi"][:-1] == pytest.approx(plain["token_phi"], abs=1e-4)


def test_paris_scores_higher_than_berlin(real_engine):
    paris, berlin = score_rows([{"prompt": Q, "response": "The capital of France is Paris."},
                                {"prompt": Q, "response": "The capital of France is Berlin."}], real_engine)
    assert paris["cll"] > berlin["cll"] + 0.5


def test_own_greedy_answer_is_on_policy_and_beats_another_style(real_engine):
    tok = real_engine.tokenizer
    question = "Name three primary colors."
    prompt = prompt_ids(tok, [{"role": "user", "content": question}])
    [new] = real_engine.generate([prompt], GenerationParams(max_new_tokens=40, temperature=0.0))
    greedy = tok.decode([t for t in new if t != tok.eos_token_id])
    own, other = score_rows([
        {"prompt": question, "response": greedy},
        {"prompt": question, "response": "Primary colours?? Easy-peasy: crimson-ish red, sky-blue & lemon yellow!!"},
    ], real_engine)
    # A greedy token is the argmax, so log p(x) >= -H and phi >= 0 for every token: near 0, not below.
    assert 0.0 <= own["cll"] < 1.5
    assert own["cll_frac_pos"] == 1.0
    assert own["cll"] > other["cll"] + 1.0


def test_cli_bad_rows_get_errors_and_the_rest_is_scored(tmp_path, model_dir):
    lines = [
        json.dumps({"id": "good", "prompt": Q, "response": "Paris.", "extra": [1, 2]}),
        json.dumps({"id": "empty", "prompt": Q, "response": "   "}),
        json.dumps({"id": "noresp", "prompt": Q}),
        json.dumps({"id": "badtype", "prompt": Q, "response": 42}),
        json.dumps({"id": "endsassistant", "messages": [{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": "b"}], "response": "c"}),
        json.dumps({"id": "toolong", "prompt": Q, "response": "word " * 9000}),
        "{not json",
        json.dumps({"id": "chat", "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": Q}], "response": "Paris."}),
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "latin1", "prompt": "caf\xe9", "response": "x"}\n')
    out = tmp_path / "out.parquet"
    proc = subprocess.run([sys.executable, "-m", "opsft.cli", "score", "--input", str(src), "--output", str(out),
                           "--model", model_dir], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import pyarrow.parquet as pq

    rows = {r.get("id"): r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 9  # rows out == rows in
    assert rows["good"]["error"] is None and rows["good"]["extra"] == [1, 2]
    assert rows["chat"]["error"] is None and rows["chat"]["cll"] is not None
    expected = {"empty": "empty", "noresp": "no 'response'", "badtype": "must be a string",
                "endsassistant": "user turn", "toolong": "too long"}
    for rid, fragment in expected.items():
        assert fragment in rows[rid]["error"], rows[rid]["error"]
        assert rows[rid]["cll"] is None
    errors = [r["error"] for r in rows.values()]
    assert any("invalid JSON" in e for e in errors if e) and any("not UTF-8" in e for e in errors if e)
    assert "error_rows" in proc.stdout and math.isfinite(rows["good"]["cll"])
