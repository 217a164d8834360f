"""Training-step time and peak memory of IDFT against SFT (and the other losses) at the same batch.

Each loss runs in a fresh subprocess (so the peak memory of one does not hide the other):
AdamW steps through opsft.train.step.train_step on synthetic rows (random token ids, the
last 3/4 of each row is the response), first step discarded as warm-up. Goal: IDFT within
10% of SFT in time and in peak memory (its entropy is computed in chunks: no extra
vocabulary-sized tensor).

CPU peak memory is the process's peak RSS (model + optimiser + activations); on CUDA it is
torch.cuda.max_memory_allocated. On a GPU, `--random-model 1b` times a randomly initialised
Llama of realistic size and reports tokens/s and model FLOPs utilisation (6 N tokens/s over
--peak-tflops).

    .venv/bin/python benchmarks/train_step.py                       # embedded model, 4 x 256, fp32 CPU
    .venv/bin/python benchmarks/train_step.py --autocast bf16 --losses sft idft eaft
    python benchmarks/train_step.py --device cuda --random-model 1b --batch 8 --seq 2048 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from _results import Recorder  # noqa: E402

GOAL = "train_step.py docstring: IDFT within 10% of SFT"

RANDOM_MODELS = {  # Llama shapes for timing with random weights (no download)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152),
}


def build_model(args, device):
    import torch

    if args.random_model:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(**RANDOM_MODELS[args.random_model], max_position_embeddings=max(args.seq, 2048))
        return LlamaForCausalLM(config).to(device)
    from opsft.models import load_model

    model, _ = load_model(args.model, device=str(device))
    return model


def one(args) -> dict:
    """Time `args.steps` steps of one loss in this process."""
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build_model(args, torch.device(args.device))
    return measure_steps(model, args.one, batch=args.batch, seq=args.seq, steps=args.steps, micro=args.micro,
                         autocast=args.autocast, peak_tflops=args.peak_tflops)


def measure_steps(model, loss: str, *, batch: int, seq: int, steps: int, micro: int | None = None,
                  autocast: str = "auto", peak_tflops: float | None = None) -> dict:
    """AdamW steps of `loss` (opsft.train.step.train_step) on `batch` synthetic rows of `seq` random
    token ids (the last 3/4 of each row is the response): median step time after one warm-up step,
    tokens/s, peak memory (CUDA: allocated during these steps; CPU: the process's peak RSS) and,
    with peak_tflops, model FLOPs utilisation 6 N tokens/s over the peak (attention left out)."""
    import torch
    from opsft.train.data import TrainExample, collate
    from opsft.train.step import LossSpec, autocast_context, make_optimizer, make_scheduler, train_step

    model.train()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = [TrainExample(torch.randint(3, vocab, (seq,), generator=gen).tolist(), seq // 4, False)
            for _ in range(batch)]
    micro = micro or batch
    batches = [collate(rows[i:i + micro], 0, device) for i in range(0, batch, micro)]
    opt = make_optimizer(model, 1e-5, 0.01)
    sched = make_scheduler(opt, steps + 1, 0.0)
    spec = LossSpec(loss, {})
    context = autocast_context(device, autocast)
    times, cpu = [], []
    for _ in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        train_step(model, opt, sched, batches, spec, 1.0, autocast=context)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    step = statistics.median(times[1:])
    n_params = sum(p.numel() for p in model.parameters())
    tokens = batch * seq
    # CPU seconds of this process per step: the fairer figure on a machine shared with other jobs
    out = {"loss": loss, "step_s": round(step, 3), "step_cpu_s": round(statistics.median(cpu[1:]), 3),
           "tokens_per_s": round(tokens / step, 1),
           "params_m": round(n_params / 1e6, 1)}
    if device.type == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        if peak_tflops:
            out["mfu"] = round(6 * n_params * tokens / step / (peak_tflops * 1e12), 4)
    else:
        out["peak_mem_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--losses", nargs="+", default=["sft", "idft"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--micro", type=int, help="micro-batch size (default: the whole batch)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto")
    p.add_argument("--model", help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--random-model", choices=sorted(RANDOM_MODELS), help="random Llama of this size instead")
    p.add_argument("--peak-tflops", type=float, help="device peak bf16 TFLOP/s, for MFU (H100 SXM: 989)")
    p.add_argument("--threads", type=int)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return 0
    results = {}
    for loss in args.losses:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", loss]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results[loss] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[loss]), flush=True)
    rec = Recorder("train_step", args)
    base = results.get("sft")
    for loss, r in results.items():
        rec.figure(f"{loss} training throughput", r["tokens_per_s"], "tokens/s")
        if "mfu" in r:
            rec.figure(f"{loss} MFU", r["mfu"], "fraction of --peak-tflops")
        if base is None or loss == "sft":
            continue
        print(f"{loss} / sft: time {r['step_s'] / base['step_s']:.3f}, "
              f"cpu time {r['step_cpu_s'] / base['step_cpu_s']:.3f}, "
              f"peak memory {r['peak_mem_mb'] / base['peak_mem_mb']:.3f}")
        goal = ("<=", 1.10, GOAL) if loss == "idft" else None
        rec.figure(f"{loss} step time", r["step_s"], "s", baseline=("sft", base["step_s"]), goal=goal)
        rec.figure(f"{loss} step CPU time", r["step_cpu_s"], "CPU s", baseline=("sft", base["step_cpu_s"]),
                   note="CPU seconds of the process per step: the fairer time on a machine shared with other jobs")
        mem = "peak RSS" if args.device == "cpu" else "peak allocated memory"
        rec.figure(f"{loss} {mem}", r["peak_mem_mb"], "MB", baseline=("sft", base["peak_mem_mb"]), goal=goal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
