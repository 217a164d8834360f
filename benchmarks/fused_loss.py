"""Benchmark: the memory-bounded training loss (hidden states + LM head, chunked, recomputed in the
backward pass) against the logits path (the model's [tokens x vocab] logits, then chunked log p / H),
for one IDFT forward + backward: peak memory above the model, and step time.

    .venv/bin/python benchmarks/fused_loss.py [--rows 4] [--tokens 512]

Two vocabularies: the embedded model (SmolLM2-135M, V = 49,152, its real weights) and a random
2-layer model of the same width with Qwen2.5's V = 151,936, where the logits dominate. Each
measurement runs in a fresh process (peak RSS is its own); the step is timed after a warm-up step.
fp32 on the CPU here; on a GPU the logits path's [tokens x V] float32 logits and their gradient
are what runs out of memory first.

`--head-vocab V` times the fused head alone instead: forward + backward of
opsft.method.cll.linear_logprob_entropy on a random [V, --hidden] head of --head-dtype (the hidden
states in the same dtype, as under FSDP bf16 mixed precision), --positions positions in chunks of
--chunk; each of --repeats fresh processes runs --steps steps, reporting the median step time (wall
and CPU seconds) and the peak RSS above the process once its inputs exist. `--against FILE` also
runs a copy of cll.py (e.g. `git show REV:services/opsft/method/cll.py > /tmp/cll_old.py`) as the
baseline, its processes alternating with the current module's. The hidden states are scaled so the
logits have std ~3, as a trained model's do: random unit-variance ones give logits of std ~sqrt(d),
whose softmax is mostly float32 denormals, and CPU matmuls on denormals run ~20x slower.

    .venv/bin/python benchmarks/fused_loss.py --head-vocab 152064 --head-dtype bfloat16 --against /tmp/cll_old.py
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time

from _results import Recorder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
QWEN_VOCAB = 151_936


def build(vocab: str):
    import torch
    from opsft.models import default_model_dir, load_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tok = load_model(str(default_model_dir()), device="cpu")
    if vocab == "qwen":
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=QWEN_VOCAB, hidden_size=model.config.hidden_size, intermediate_size=1536,
                          num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                          max_position_embeddings=2048, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    return model.train(), tok


def measure(vocab: str, fused: bool, rows: int, tokens: int, queue) -> None:
    import torch
    from opsft.train.batches import IGNORE
    from opsft.train.step import LossSpec, forward_loss

    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = build(vocab)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(model.config.vocab_size, 40_000), (rows, tokens), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, : tokens // 8] = IGNORE  # a short prompt, then the response
    labels[:, -1] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    spec = LossSpec("idft", {}, 1.0, fused=fused)
    off = torch.autocast("cpu", enabled=False)

    def step():
        model.zero_grad(set_to_none=True)
        loss, _ = forward_loss(model, batch, spec, 0.5, None, off)
        loss.backward()

    step()  # warm-up (and the gradients' own memory, kept between steps in training)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds": min(times), "peak_mb": peak / 1024, "above_warm_mb": (peak - base) / 1024,
               "vocab": model.config.vocab_size, "loss_tokens": int((labels != IGNORE).sum())})


def run(vocab: str, fused: bool, rows: int, tokens: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(vocab, fused, rows, tokens, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def measure_head(impl: str | None, args, queue) -> None:
    """--head-vocab: --steps forward + backward passes of linear_logprob_entropy (from the file
    `impl`, else opsft.method.cll) in this fresh process."""
    import importlib.util

    import torch

    if impl is None:
        from opsft.method.cll import linear_logprob_entropy
    else:
        spec = importlib.util.spec_from_file_location("cll_against", impl)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        linear_logprob_entropy = module.linear_logprob_entropy
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, args.head_dtype)
    g = torch.Generator().manual_seed(0)
    # drawn in their dtype: no float32 temporary raises the peak RSS before the steps
    weight = torch.randn(args.head_vocab, args.hidden, generator=g, dtype=dtype).requires_grad_()
    hidden = torch.randn(args.positions, args.hidden, generator=g, dtype=dtype).mul_(3 / args.hidden**0.5)
    hidden.requires_grad_()
    labels = torch.randint(0, args.head_vocab, (args.positions,), generator=g)
    upstream = torch.randn(args.positions, generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    for _ in range(args.steps):
        weight.grad = hidden.grad = None
        start, start_cpu = time.perf_counter(), time.process_time()
        logp, _ = linear_logprob_entropy(hidden, weight, labels, 1.0, args.chunk)
        (logp * upstream).sum().backward()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu),
               "peak_mb": peak / 1024, "above_inputs_mb": (peak - base) / 1024})


def run_head(impl: str | None, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure_head, args=(impl, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def head_only(args, rec: Recorder) -> None:
    """--head-vocab: the fused head alone, the current module against --against (if given)."""
    impls = {"current": None} if args.against is None else {"against": args.against, "current": None}
    got = {name: [] for name in impls}
    print(f"V={args.head_vocab} d={args.hidden} {args.head_dtype} head, {args.positions} positions, "
          f"chunk {args.chunk}: forward + backward")
    print(f"{'impl':>8} {'repeat':>6} {'step s':>7} {'cpu s':>7} {'peak MB':>8} {'above inputs MB':>15}")
    for repeat in range(args.repeats):
        for name, impl in impls.items():
            r = run_head(impl, args)
            got[name].append(r)
            print(f"{name:>8} {repeat:>6} {r['seconds']:>7.2f} {r['cpu_seconds']:>7.2f} {r['peak_mb']:>8.0f} "
                  f"{r['above_inputs_mb']:>15.0f}", flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in got.items()}
    for name, m in med.items():
        print(f"{name:>8} median: step {m['seconds']:.2f} s, cpu {m['cpu_seconds']:.2f} s, peak RSS "
              f"{m['peak_mb']:.0f} MB ({m['above_inputs_mb']:.0f} MB above the inputs)")
    cur, base = med["current"], med.get("against")
    label = f"V={args.head_vocab}, d={args.hidden}, {args.head_dtype} head, {args.positions} positions"

    def baseline(key):
        return None if base is None else (f"--against {args.against}", base[key])

    note = f"chunk {args.chunk}, median of {args.repeats} processes x {args.steps} steps, CPU"
    rec.figure(f"fused head forward+backward step time, {label}", cur["seconds"], "s",
               baseline=baseline("seconds"), note=note)
    rec.figure(f"fused head forward+backward CPU time, {label}", cur["cpu_seconds"], "CPU s",
               baseline=baseline("cpu_seconds"), note=note)
    rec.figure(f"fused head forward+backward peak RSS above its inputs, {label}", cur["above_inputs_mb"], "MB",
               baseline=baseline("above_inputs_mb"), note=note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--head-vocab", type=int, help="time the fused head alone, with a [V, --hidden] head")
    parser.add_argument("--head-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--hidden", type=int, default=896, help="hidden size d of --head-vocab's head")
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="--head-vocab: steps per process")
    parser.add_argument("--repeats", type=int, default=3, help="--head-vocab: fresh processes per variant")
    parser.add_argument("--against", help="--head-vocab: a copy of cll.py to run as the baseline")
    args = parser.parse_args()
    rec = Recorder("fused_loss", args)
    if args.head_vocab:
        head_only(args, rec)
        return
    print(f"{'vocab':>8} {'path':>7} {'loss tokens':>11} {'step s':>7} {'peak MB':>8}")
    for vocab in ("embedded", "qwen"):
        got = {fused: run(vocab, fused, args.rows, args.tokens) for fused in (False, True)}
        for fused, r in got.items():
            print(f"{r['vocab']:>8} {'fused' if fused else 'logits':>7} {r['loss_tokens']:>11} {r['seconds']:>7.2f} "
                  f"{r['peak_mb']:>8.0f}", flush=True)
        v = got[True]["vocab"]
        rec.figure(f"peak RSS of an IDFT step, V={v}, fused head", got[True]["peak_mb"], "MB",
                   baseline=("logits path", got[False]["peak_mb"]),
                   note=f"{args.rows} rows x {args.tokens} tokens, fp32, CPU")
        rec.figure(f"IDFT step time, V={v}, fused head", got[True]["seconds"], "s",
                   baseline=("logits path", got[False]["seconds"]))


if __name__ == "__main__":
    main()
