"""Training-step time and peak memory of IDFT against SFT (and the other losses) at the same batch;
the memory-bounded (fused) loss head against the logits path; FSDP against DDP.

Each loss runs in a fresh subprocess (so the peak memory of one does not hide the other):
AdamW steps through opsft.train.step.train_step on synthetic rows (random token ids, the
last 3/4 of each row is the response), first step discarded as warm-up. Goal: IDFT within
10% of SFT in time and in peak memory (its entropy is computed in chunks: no extra
vocabulary-sized tensor).

CPU peak memory is the process's peak RSS (model + optimiser + activations); on CUDA it is
torch.cuda.max_memory_allocated. On a GPU, `--random-model 1b` times a randomly initialised
Llama of realistic size and reports tokens/s and model FLOPs utilisation (6 N tokens/s over
--peak-tflops).

`--heads fused logits` runs each loss both ways: the fused head (final hidden states and the LM
head, chunked, never [tokens x vocab]) and the model's logits; with `--random-model 135m-qwenvocab`
the vocabulary is Qwen2.5's 151,936, where the logits dominate.

`--strategies ddp fsdp --workers 2` starts W gloo (CPU) or NCCL (GPU) processes per strategy and
reports per worker: step time, peak RSS (CPU) or peak allocated memory (GPU), and the training
state the worker holds (parameters + gradients + AdamW moments, counted from the tensors: its
shards under FSDP, everything under DDP). Under FSDP that state is 1/W of DDP's.

`--layouts padded packed --min-seq N` draws row lengths in [N, --seq] and runs the step with
padded micro-batches (sorted by length) and padding-free packed ones (collate_packed).

    .venv/bin/python benchmarks/train_step.py                       # embedded model, 4 x 256, fp32 CPU
    .venv/bin/python benchmarks/train_step.py --autocast bf16 --losses sft idft eaft
    .venv/bin/python benchmarks/train_step.py --losses idft --heads fused logits --random-model 135m-qwenvocab
    .venv/bin/python benchmarks/train_step.py --losses idft --layouts padded packed --min-seq 64 --batch 8 --micro 4
    .venv/bin/python benchmarks/train_step.py --losses idft --strategies ddp fsdp --workers 2 --batch 2
    python benchmarks/train_step.py --device cuda --random-model 1.5b --batch 8 --seq 2048 --peak-tflops 989
    python benchmarks/train_step.py --device cuda --random-model 1.5b --losses idft --strategies ddp fsdp \
        --workers 8 --batch 4 --seq 2048 --autocast bf16 --peak-tflops 989      # 8 GPUs, a process each
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
    "135m-qwenvocab": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),  # Qwen2.5-1.5B's shapes
}


def build_model(args, device, meta: bool = False):
    """The model on `device`; meta: its structure only (an FSDP worker other than rank 0, as in opsft train)."""
    import torch
    from opsft.models import load_model, resolve_model
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.random_model:
        torch.manual_seed(0)
        config = LlamaConfig(**RANDOM_MODELS[args.random_model], max_position_embeddings=max(args.seq, 2048))
        if meta:
            with torch.device("meta"):
                return LlamaForCausalLM(config)
        return LlamaForCausalLM(config).to(device)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(args.model)))
    model, _ = load_model(args.model, device=str(device))
    return model


def one(args) -> dict:
    """Time `args.steps` steps of one loss in this process."""
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build_model(args, torch.device(args.device))
    loss, head, layout = args.one.split("/")
    return measure_steps(model, loss, batch=args.batch, seq=args.seq, steps=args.steps, micro=args.micro,
                         autocast=args.autocast, peak_tflops=args.peak_tflops, fused=head == "fused",
                         min_seq=args.min_seq, packed=layout == "packed")


def _local_numel(t) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def state_mb(model, opt) -> float:
    """MB of training state this worker holds: parameters, as much again for their gradients, and the
    optimiser's tensors (AdamW: 2 per parameter); FSDP's DTensors count their local shard only."""
    import torch

    params = sum(_local_numel(p) * p.element_size() for p in model.parameters())
    moments = sum(_local_numel(t) * t.element_size() for st in opt.state.values() for t in st.values()
                  if isinstance(t, torch.Tensor) and t.ndim > 0)
    return round((2 * params + moments) / 2**20, 1)


def measure_steps(model, loss: str, *, batch: int, seq: int, steps: int, micro: int | None = None,
                  autocast: str = "auto", peak_tflops: float | None = None, fused: bool = True,
                  world_size: int = 1, reduce=None, device=None, min_seq: int | None = None,
                  packed: bool = False) -> dict:
    """AdamW steps of `loss` (opsft.train.step.train_step) on `batch` synthetic rows of `seq` random
    token ids (the last 3/4 of each row is the response): median step time after one warm-up step,
    tokens/s, peak memory (CUDA: allocated during these steps; CPU: the process's peak RSS) and,
    with peak_tflops, model FLOPs utilisation 6 N tokens/s over the peak (attention left out).
    `model` may be wrapped (DDP, FSDP: then world_size and reduce, the all_reduce, are given);
    tokens/s and MFU then count this worker's rows only. min_seq: row lengths drawn in [min_seq, seq]
    (sorted into micro-batches by length, as opsft train does); packed: padding-free micro-batches.
    tokens/s counts real tokens, not padding."""
    import torch
    from opsft.train.batches import TrainExample, collate, collate_packed
    from opsft.train.optim import make_optimizer, make_scheduler
    from opsft.train.precision import autocast_context
    from opsft.train.step import LossSpec, no_reduce, train_step, unwrap

    model.train()
    device = device or next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    vocab = unwrap(model).config.vocab_size
    gen = torch.Generator().manual_seed(0)
    lengths = [seq] * batch if min_seq is None else torch.randint(min_seq, seq + 1, (batch,), generator=gen).tolist()
    rows = sorted((TrainExample(torch.randint(3, vocab, (n,), generator=gen).tolist(), n // 4, False)
                   for n in lengths), key=len, reverse=True)
    micro = micro or batch
    batches = [collate_packed(rows[i:i + micro], device) if packed else collate(rows[i:i + micro], 0, device)
               for i in range(0, batch, micro)]
    padded = sum(b["input_ids"].numel() for b in batches)
    opt = make_optimizer(model, 1e-5, 0.01)
    sched = make_scheduler(opt, steps + 1, 0.0)
    spec = LossSpec(loss, {}, fused=fused)
    context = autocast_context(device, autocast)
    times, cpu = [], []
    for _ in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        train_step(model, opt, sched, batches, spec, 1.0, autocast=context, world_size=world_size,
                   reduce=reduce or no_reduce)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    step = statistics.median(times[1:])
    n_params = sum(p.numel() for p in model.parameters())  # DTensor.numel() is the whole parameter's
    tokens = sum(lengths)
    # CPU seconds of this process per step: the fairer figure on a machine shared with other jobs
    out = {"loss": loss, "head": "fused" if fused else "logits", "layout": "packed" if packed else "padded",
           "tokens": tokens, "tokens_with_padding": padded, "step_s": round(step, 3),
           "step_cpu_s": round(statistics.median(cpu[1:]), 3), "tokens_per_s": round(tokens / step, 1),
           "params_m": round(n_params / 1e6, 1), "state_mb": state_mb(model, opt)}
    if device.type == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        if peak_tflops:
            out["mfu"] = round(6 * n_params * tokens / step / (peak_tflops * 1e12), 4)
    else:
        out["peak_mem_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def _strategy_worker(rank: int, args, port: int, out: str) -> None:
    """One of `args.workers` processes: wrap the model with DDP or FSDP and time the steps."""
    import torch
    import torch.distributed as dist
    from opsft.train import fsdp
    from opsft.train.precision import wants_bf16
    from opsft.train.step import LossHead

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.workers)
    torch.set_num_threads(args.threads or 1)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    args.device = str(device)
    fsdp_ = args.strategy == "fsdp"
    model = build_model(args, torch.device("cpu") if fsdp_ else device, meta=fsdp_ and rank > 0)
    head = LossHead(model)
    bf16 = wants_bf16(device, args.autocast)
    if fsdp_:
        wrapped, autocast = fsdp.shard(head, device, bf16), "off"
    else:
        wrapped, autocast = torch.nn.parallel.DistributedDataParallel(head), args.autocast

    def reduce(t):
        dist.all_reduce(t)
        return t

    r = measure_steps(wrapped, args.one, batch=args.batch, seq=args.seq, steps=args.steps, micro=args.micro,
                      autocast=autocast, peak_tflops=args.peak_tflops, world_size=args.workers, reduce=reduce,
                      device=device)
    r.update(strategy=args.strategy, rank=rank, bf16=bf16)
    Path(out, f"{rank}.json").write_text(json.dumps(r))
    dist.destroy_process_group()


def compare_strategies(args) -> dict:
    """{strategy: rank 0's figures} of one loss, each strategy in fresh processes."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    results = {}
    for strategy in args.strategies:
        with tempfile.TemporaryDirectory() as out, socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            run = argparse.Namespace(**{**vars(args), "strategy": strategy, "one": args.losses[0]})
            mp.start_processes(_strategy_worker, args=(run, port, out), nprocs=args.workers, start_method="spawn")
            ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(args.workers)]
        results[strategy] = {**ranks[0], "peak_mem_mb_by_rank": [r["peak_mem_mb"] for r in ranks],
                             "peak_mem_mb_max": max(r["peak_mem_mb"] for r in ranks),
                             "state_mb_max": max(r["state_mb"] for r in ranks)}
        print(json.dumps(results[strategy]), flush=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--losses", nargs="+", default=["sft", "idft"])
    p.add_argument("--heads", nargs="+", choices=["fused", "logits"], default=["fused"],
                   help="the loss from the fused chunked head, and / or from the model's logits")
    p.add_argument("--layouts", nargs="+", choices=["padded", "packed"], default=["padded"],
                   help="padded micro-batches, and / or padding-free packing")
    p.add_argument("--min-seq", type=int, help="row lengths drawn in [--min-seq, --seq] (default: all --seq)")
    p.add_argument("--strategies", nargs="+", choices=["ddp", "fsdp"],
                   help="compare data-parallel strategies over --workers processes (first loss only)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="rows per step (per worker with --strategies)")
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
    rec = Recorder("train_step", args)
    if args.strategies:
        results = compare_strategies(args)
        ddp = results.get("ddp")
        for name, r in results.items():
            rec.figure(f"{name} training throughput per worker", r["tokens_per_s"], "tokens/s",
                       baseline=None if ddp is None or name == "ddp" else ("ddp", ddp["tokens_per_s"]))
            rec.figure(f"{name} training state per worker", r["state_mb_max"], "MB",
                       baseline=None if ddp is None or name == "ddp" else ("ddp", ddp["state_mb_max"]),
                       note="parameters + gradients + AdamW moments held by one worker")
            mem = "peak RSS" if args.device == "cpu" else "peak allocated memory"
            rec.figure(f"{name} {mem} per worker", r["peak_mem_mb_max"], "MB",
                       baseline=None if ddp is None or name == "ddp" else ("ddp", ddp["peak_mem_mb_max"]))
            if "mfu" in r:
                rec.figure(f"{name} MFU", r["mfu"], "fraction of --peak-tflops")
        return 0
    results = {}
    for loss in args.losses:
        for head in args.heads:
            for layout in args.layouts:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--one", f"{loss}/{head}/{layout}"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return proc.returncode
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps(r), flush=True)
                if layout == "packed" and len(args.layouts) > 1:
                    base = results[(loss, head)]
                    print(f"{loss} packed / padded: step time {r['step_s'] / base['step_s']:.3f}, input tokens "
                          f"{r['tokens_with_padding']} / {base['tokens_with_padding']}")
                    rec.figure(f"{loss} packed step time", r["step_s"], "s", baseline=("padded", base["step_s"]))
                    rec.figure(f"{loss} packed input tokens", r["tokens_with_padding"], "tokens",
                               baseline=("padded", base["tokens_with_padding"]))
                    continue
                results[(loss, head)] = r
    for (loss, head), r in results.items():
        tag = loss if len(args.heads) == 1 else f"{loss} ({head} head)"
        rec.figure(f"{tag} training throughput", r["tokens_per_s"], "tokens/s")
        if "mfu" in r:
            rec.figure(f"{tag} MFU", r["mfu"], "fraction of --peak-tflops")
        mem = "peak RSS" if args.device == "cpu" else "peak allocated memory"
        if head == "logits" and (loss, "fused") in results:
            fused = results[(loss, "fused")]
            print(f"{loss}: fused / logits head: time {fused['step_s'] / r['step_s']:.3f}, "
                  f"peak memory {fused['peak_mem_mb'] / r['peak_mem_mb']:.3f}")
            rec.figure(f"{loss} fused-head {mem}", fused["peak_mem_mb"], "MB",
                       baseline=("logits head", r["peak_mem_mb"]))
            rec.figure(f"{loss} fused-head step time", fused["step_s"], "s", baseline=("logits head", r["step_s"]))
        base = results.get(("sft", head))
        if base is None or loss == "sft":
            continue
        print(f"{tag} / sft: time {r['step_s'] / base['step_s']:.3f}, "
              f"cpu time {r['step_cpu_s'] / base['step_cpu_s']:.3f}, "
              f"peak memory {r['peak_mem_mb'] / base['peak_mem_mb']:.3f}")
        goal = ("<=", 1.10, GOAL) if loss == "idft" else None
        rec.figure(f"{tag} step time", r["step_s"], "s", baseline=("sft", base["step_s"]), goal=goal)
        rec.figure(f"{tag} step CPU time", r["step_cpu_s"], "CPU s", baseline=("sft", base["step_cpu_s"]),
                   note="CPU seconds of the process per step: the fairer time on a machine shared with other jobs")
        rec.figure(f"{tag} {mem}", r["peak_mem_mb"], "MB", baseline=("sft", base["peak_mem_mb"]), goal=goal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
