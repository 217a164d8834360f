"""Benchmark: the memory-bounded training loss (hidden states + LM head, chunked, recomputed in the
backward pass) against the logits path (the model's [tokens x vocab] logits, then chunked log p / H),
for one IDFT forward + backward: peak memory above the model, and step time.

    .venv/bin/python benchmarks/fused_loss.py [--rows 4] [--tokens 512]

Two vocabularies: the embedded model (SmolLM2-135M, V = 49,152, its real weights) and a random
2-layer model of the same width with Qwen2.5's V = 151,936, where the logits dominate. Each
measurement runs in a fresh process (peak RSS is its own); the step is timed after a warm-up step.
fp32 on the CPU here; on a GPU the logits path's [tokens x V] float32 logits and their gradient
are what runs out of memory first.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
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
    from opsft.train.data import IGNORE
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    rec = Recorder("fused_loss", args)
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
