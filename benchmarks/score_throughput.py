"""Benchmark: CLL scoring throughput and peak memory on the embedded model.

Compares `opsft` scoring (HFEngine: length-sorted batches, LM head only on response
positions, chunked fused log p + entropy) with a naive reference done the way the
official scorer does it (one sequence at a time, full logits, full log_softmax), at equal
exactness, and reports the achieved fraction of this machine's measured fp32 matmul
throughput, plus a bf16 mode's speed and error. Exactness: max |delta phi| of each mode against
a float64 run of the naive reference (the truth; not timed), and against the naive fp32 run.
Two fp32 computations differ from each other by about the sum of their errors, so "vs naive"
alone cannot say which one is off.

    .venv/bin/python benchmarks/score_throughput.py [--rows 16] [--tokens 256]

Each measurement runs in a fresh process so peak RSS is its own. Prints a table and a
JSON line (`RESULT {...}`); the headline figures go to benchmarks/_results.py for `make bench`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time

from _results import Recorder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_rows(n_rows: int, n_tokens: int, tokenizer) -> list[dict]:
    """n_rows (question, response) pairs; responses of ~n_tokens tokens of English prose."""
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = []
    for i in range(n_rows):
        chunk = ids[i * n_tokens * 2: i * n_tokens * 2 + n_tokens]
        prompt = f"Explain part {i} of the Python reference manual."
        rows.append({"prompt": prompt, "response": tokenizer.decode(chunk)})
    return rows


def naive_scores(model, tokenizer, rows, dtype=None):
    """Official-style: one sequence at a time, logits for every position, full log_softmax
    (in float32, or in `dtype`: the float64 reference runs it on a float64 model)."""
    from _baselines import naive_phi
    from opsft.data.chat import encode
    from opsft.data.corpus import parse_row

    out = []
    for row in rows:
        ex = parse_row(row)
        enc = encode(tokenizer, ex.messages, ex.response)
        out.append(naive_phi(model, enc.input_ids, enc.response_start, dtype).numpy())
    return out


def measure(mode: str, n_rows: int, n_tokens: int, queue) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from opsft.engines.hf import HFEngine
    from opsft.models import default_model_dir
    from opsft.scoring import score_rows

    dtype = "bfloat16" if mode == "opsft-bf16" else "float32"
    engine = HFEngine(str(default_model_dir()), device="cpu", dtype=dtype, max_batch_size=16)
    rows = make_rows(n_rows, n_tokens, engine.tokenizer)
    if mode == "reference-fp64":  # the truth the fp32 modes are measured against (not timed)
        engine.model.double()
        phis = naive_scores(engine.model, engine.tokenizer, rows, torch.float64)
        queue.put({"mode": mode, "phis": [list(map(float, p)) for p in phis]})
        return
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = (lambda: naive_scores(engine.model, engine.tokenizer, rows)) if mode == "naive" else (
        lambda: [r["token_phi"] for r in score_rows(rows, engine, tokens=True)])
    run()  # warm-up
    start = time.perf_counter()
    phis = run()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_resp = sum(len(p) for p in phis)
    n_total = n_resp + sum(len(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)) for r in rows)
    queue.put({"mode": mode, "seconds": seconds, "response_tokens": n_resp, "total_tokens": n_total,
               "peak_rss_mb": peak / 1024, "model_rss_mb": base_rss / 1024,
               "phis": [list(map(float, p)) for p in phis], "params": _param_counts(engine.model)})


def _param_counts(model) -> dict:
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "embedding": emb.numel(), "hidden": emb.shape[1], "vocab": emb.shape[0],
            "layers": model.config.num_hidden_layers}


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def model_flops(result: dict, lm_head_on_all: bool) -> float:
    """Forward FLOPs: 2 x (non-embedding params) per token + LM head per scored position
    (attention score FLOPs are small at these lengths and left out)."""
    p = result["params"]
    body = 2 * (p["total"] - p["embedding"]) * result["total_tokens"]
    head_positions = result["total_tokens"] if lm_head_on_all else result["response_tokens"]
    return body + 2 * p["hidden"] * p["vocab"] * head_positions


def run_in_process(mode, n_rows, n_tokens):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(mode, n_rows, n_tokens, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    peak_gflops = matmul_gflops()
    res = {m: run_in_process(m, args.rows, args.tokens) for m in ("naive", "opsft-fp32", "opsft-bf16")}
    truth = run_in_process("reference-fp64", args.rows, args.tokens)["phis"]
    import numpy as np

    def max_err(mode, ref):
        pairs = zip(res[mode]["phis"], ref, strict=True)
        return max(float(np.max(np.abs(np.array(a) - np.array(b)))) for a, b in pairs)

    print(f"machine fp32 matmul (2048^3): {peak_gflops:.1f} GFLOP/s")
    header = ("mode", "resp tok/s", "speedup", "peak MB", "GFLOP/s", "of mm", "dphi fp64", "dphi naive")
    print(f"{header[0]:<12} " + " ".join(f"{h:>10}" for h in header[1:]))
    summary = {"matmul_gflops": peak_gflops}
    for mode, r in res.items():
        tps = r["response_tokens"] / r["seconds"]
        gflops = model_flops(r, lm_head_on_all=(mode == "naive")) / r["seconds"] / 1e9
        speedup = tps / (res["naive"]["response_tokens"] / res["naive"]["seconds"])
        err, err_truth = max_err(mode, res["naive"]["phis"]), max_err(mode, truth)
        print(f"{mode:<12} {tps:>10.0f} {speedup:>9.2f}x {r['peak_rss_mb']:>10.0f} {gflops:>10.1f} "
              f"{gflops / peak_gflops:>10.0%} {err_truth:>10.2e} {err:>10.2e}")
        summary[mode] = {"response_tokens_per_s": tps, "speedup_vs_naive": speedup, "peak_rss_mb": r["peak_rss_mb"],
                         "gflops": gflops, "fraction_of_matmul": gflops / peak_gflops, "max_abs_dphi": err,
                         "max_abs_dphi_vs_fp64": err_truth}
    print("RESULT " + json.dumps(summary))

    rec = Recorder("score_throughput", args)
    naive = summary["naive"]
    for mode in ("opsft-fp32", "opsft-bf16"):
        r = summary[mode]
        goal = (">=", 1.5, "issue 2: at least 1.5x the naive reference") if mode == "opsft-fp32" else None
        rec.figure(f"{mode} scoring throughput", r["response_tokens_per_s"], "response tokens/s",
                   baseline=("naive per-sequence full log_softmax", naive["response_tokens_per_s"]), goal=goal)
        rec.figure(f"{mode} peak RSS", r["peak_rss_mb"], "MB", baseline=("naive", naive["peak_rss_mb"]))
        rec.figure(f"{mode} max |dphi| vs float64", r["max_abs_dphi_vs_fp64"], "nats/token",
                   baseline=("naive fp32 vs float64", naive["max_abs_dphi_vs_fp64"]),
                   goal=("<=", 1.0, "issue 2: equal exactness (no worse than the naive fp32 reference)")
                   if mode == "opsft-fp32" else None)
        rec.figure(f"{mode} max |dphi| vs naive fp32", r["max_abs_dphi"], "nats/token")
    for mode in ("naive", "opsft-fp32"):
        rec.figure(f"{mode} model FLOP rate", summary[mode]["gflops"], "GFLOP/s",
                   baseline=("fp32 matmul 2048^3 on this machine", peak_gflops),
                   goal=(">=", 0.5, "issue 2: at least 50% of the machine's matmul throughput")
                   if mode == "opsft-fp32" else None)


if __name__ == "__main__":
    main()
