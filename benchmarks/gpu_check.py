"""GPU check: opsft's method code on one CUDA device, on a model of realistic size built from a
config with random weights (Qwen2-1.5B shapes: nothing to download, and the working tree that
travels to a GPU machine stays small). Random weights are fine for timing and for exactness
against a reference computed from the same weights. Four measurements:

1. CLL scoring: opsft's batched, chunked scorer (HFEngine.score_tokens) against the naive
   official-style reference (one sequence at a time, full log_softmax), in fp32 and in bf16:
   response tokens/s, peak GPU memory, and max |dphi| of each against a float64 run of the same
   weights (first --exact-rows rows). Goal: at least 1.5x the naive reference.
2. Hinted decoding at temperature 0.3 (the shipped default), in bf16, on the device: opsft.method.hinted
   (batched, KV-cached; --hd-items is the recipe's batch) against the official loop (one item, no
   cache) and against plain batched sampling of the same model (transformers generate on the
   hinted prompts, the same top-p and temperature). Goals: >= 10x the official loop, and at
   least half the tokens/s of plain sampling (it runs two streams).
3. IDFT against SFT at the same batch: AdamW step time, peak memory, tokens/s, and model FLOPs
   utilisation (6 N tokens/s over the device's dense bf16 peak: known for H100/H200/A100, else
   --peak-tflops, else none). Goal: IDFT within 10% of SFT in time and in memory.
4. The batching ceiling of the scoring service: in-process seconds per row, 1 row per call
   against 16 rows per call (items of ~40 tokens, as in serve_load.py). Goal: >= 2x.

    PYTHONPATH=services python3 benchmarks/gpu_check.py                 # CUDA, under 5 min on an H100/H200
    PYTHONPATH=services python3 benchmarks/gpu_check.py --quick         # CPU, tiny config, seconds: the plumbing
    PYTHONPATH=services python3 benchmarks/_collect.py --only gpu_check # the same, into benchmarks/results.json

Needs only torch, transformers and numpy: no Ray, vLLM, pydantic or tokenizer (token ids are
random; tests/test_gpu_check.py checks what a run imports). fp32 matmuls stay fp32 (torch's
default: no TF32). Prints a table; the headline figures carry the device name and go to
benchmarks/_results.py for `make bench`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

import torch  # noqa: E402
from _baselines import naive_phi, official_hinted_loop, seconds_per_row  # noqa: E402
from _results import Recorder  # noqa: E402
from opsft.engines.hf import HFEngine  # noqa: E402
from opsft.method.hinted import HDItem, HDParams, hinted_decode, item_generator  # noqa: E402
from train_step import measure_steps  # noqa: E402

GOAL_SOURCE = "issue 17"
QWEN2_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=True)
# Dense bf16 tensor-core peaks from the vendor's data sheets (TFLOP/s), matched by substring, first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))
FULL = dict(score_rows=64, score_tokens=512, exact_rows=4, hd_items=16, hd_tokens=128, hint_len=576, student_len=128,
            ref_items=1, ref_tokens=32, train_batch=8, train_seq=1024, train_steps=4, ceiling_rows=16, repeats=3)
QUICK = dict(score_rows=4, score_tokens=16, exact_rows=2, hd_items=2, hd_tokens=4, hint_len=24, student_len=8,
             ref_items=1, ref_tokens=2, train_batch=2, train_seq=32, train_steps=1, ceiling_rows=4, repeats=1)


def peak_tflops(device_name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds, peak memory in MB allocated during it: CUDA only, else None)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return out, seconds, peak


def build_model(shape: dict, device: torch.device):
    """A Qwen2 causal LM with these shapes and random weights (seeded), fp32, built on the device."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.eval()


def random_ids(gen: torch.Generator, vocab: int, low: int, high: int) -> list[int]:
    """A random length in [low, high], random ids (0-2 left out: pad and the like)."""
    n = int(torch.randint(low, high + 1, (), generator=gen))
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def engine_for(model, device: torch.device) -> HFEngine:
    """The scoring engine around an in-memory model, at the engine's default batch limits."""
    stub = SimpleNamespace(pad_token_id=0, eos_token_id=None)  # no tokenizer: the engine sees token ids only
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[model.dtype]
    return HFEngine(device=str(device), dtype=dtype, model_and_tokenizer=(model, stub))


# ------------------------------------------------------------------ 1. CLL scoring


def check_scoring(model, size: dict, device: torch.device) -> dict:
    """Response tokens/s, peak memory and max |dphi| vs float64, naive and opsft, for this model's dtype."""
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = [random_ids(gen, vocab, 48, 64) for _ in range(size["score_rows"])]
    responses = [random_ids(gen, vocab, size["score_tokens"] // 4, size["score_tokens"]) for _ in prompts]
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    starts = [len(p) for p in prompts]
    engine = engine_for(model, device)
    modes = {
        "naive": lambda: [naive_phi(model, s, start) for s, start in zip(seqs, starts, strict=True)],
        "opsft": lambda: [torch.from_numpy(sc.logprob + sc.entropy) for sc in engine.score_tokens(seqs, starts)],
    }
    n_tokens = sum(len(r) for r in responses)
    out = {}
    for name, run in modes.items():
        run()  # warm-up (kernel selection, allocator)
        phis, seconds, peak = timed(run, device)
        out[name] = {"tokens_per_s": n_tokens / seconds, "seconds": seconds, "peak_mb": peak, "phis": phis}
    exact = min(size["exact_rows"], len(seqs))
    wide = copy.deepcopy(model).to(torch.float64)  # the same weights, in float64: the truth
    truth = [naive_phi(wide, seqs[k], starts[k], torch.float64) for k in range(exact)]
    del wide
    for r in out.values():
        r["max_dphi_fp64"] = max(float((r["phis"][k] - truth[k]).abs().max()) for k in range(exact))
        del r["phis"]
    out["response_tokens"] = n_tokens
    return out


# ------------------------------------------------------------------ 2. hinted decoding


def check_hinted(model, size: dict, device: torch.device) -> dict:
    """Generated tokens/s: opsft.method.hinted batched+cached, the official loop, plain batched sampling."""
    gen = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    items = [HDItem(hinted_prompt=random_ids(gen, vocab, size["hint_len"] * 3 // 4, size["hint_len"]),
                    student_prompt=random_ids(gen, vocab, size["student_len"] // 2, size["student_len"]))
             for _ in range(size["hd_items"])]
    new = size["hd_tokens"]
    params = HDParams(max_new_tokens=new, splitter=None)  # shipped defaults: beta 3, top-p 0.95, temperature 0.3
    assert params.temperature == 0.3 and params.top_p == 0.95

    def batched():
        return hinted_decode(model, items, params, eos_ids=set(), pad_id=0)

    def official():
        return sum(official_hinted_loop(model, items[k], params, size["ref_tokens"], item_generator(params.seed, k))
                   for k in range(size["ref_items"]))

    width = max(len(it.hinted_prompt) for it in items)
    ids = torch.zeros((len(items), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, it in enumerate(items):  # left padding, as hinted_decode pads
        ids[r, width - len(it.hinted_prompt):] = torch.tensor(it.hinted_prompt)
        attn[r, width - len(it.hinted_prompt):] = 1
    ids, attn = ids.to(device), attn.to(device)

    def plain(n=new):
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=params.temperature,
                             top_p=params.top_p, top_k=0, max_new_tokens=n, pad_token_id=0)
        return out[:, width:]

    hinted_decode(model, items[:2], HDParams(max_new_tokens=2, splitter=None), eos_ids=set())  # warm-ups
    official_hinted_loop(model, items[0], params, 2, item_generator(params.seed, 0))
    plain(2)
    results, batched_s, _ = timed(batched, device)
    ref_tokens, ref_s, _ = timed(official, device)
    sampled, plain_s, _ = timed(plain, device)
    got = sum(len(r.tokens) for r in results)
    assert got == new * len(items) and sampled.numel() == new * len(items), (got, tuple(sampled.shape))
    return {"batched": got / batched_s, "official": ref_tokens / ref_s, "plain": sampled.numel() / plain_s,
            "hinted_prompt_mean": statistics.mean(len(it.hinted_prompt) for it in items),
            "student_prompt_mean": statistics.mean(len(it.student_prompt) for it in items)}


# ------------------------------------------------------------------ 4. the batching ceiling of the service


def check_ceiling(model, size: dict, device: torch.device) -> dict[int, float]:
    """Seconds per row of engine scoring, one row per call against all rows per call."""
    gen = torch.Generator().manual_seed(4)
    vocab = model.config.vocab_size
    rows = [(random_ids(gen, vocab, 15, 15) + random_ids(gen, vocab, 20, 30), 15) for _ in range(size["ceiling_rows"])]
    engine = engine_for(model, device)
    return seconds_per_row(lambda part: engine.score_tokens([s for s, _ in part], [st for _, st in part]), rows,
                           (1, len(rows)), repeats=size["repeats"], sync=lambda: sync(device))


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny config and sizes, on the CPU unless --device says")
    p.add_argument("--device", help="default: cuda (cpu with --quick)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device, for MFU (default: by name)")
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, help=f"default {value} ({QUICK[key]} with --quick)")
    args = p.parse_args(argv)
    size = {k: getattr(args, k) or (QUICK if args.quick else FULL)[k] for k in FULL}
    device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --quick runs the same code on the CPU with a tiny model",
              file=sys.stderr)
        return 2
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: a second thread only spins, and crawls on a busy machine
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    import transformers

    model = build_model(TINY if args.quick else QWEN2_1_5B, device)
    n_params = sum(p.numel() for p in model.parameters())
    settings = {**vars(args), **size, "device": name, "torch": torch.__version__,
                "transformers": transformers.__version__, "peak_bf16_tflops": peak,
                "model": f"Qwen2 {'tiny' if args.quick else '1.5B'} shapes, random weights, {n_params / 1e6:.1f}M"}
    print(f"device {name}; model {settings['model']}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}", flush=True)
    rec = Recorder("gpu_check", settings)
    half = copy.deepcopy(model).to(torch.bfloat16)  # bf16 scoring, decoding and serving: the GPU setting
    sections = {  # in this order: training last, as it changes the weights
        "1. CLL scoring": lambda: record_scoring(rec, {"fp32": model, "bf16": half}, size, device),
        "2. hinted decoding": lambda: record_hinted(rec, half, size, device),
        "4. scoring service ceiling": lambda: record_ceiling(rec, half, size, device),
        "3. IDFT vs SFT": lambda: record_training(rec, model, size, peak),
    }
    failed, started = [], time.perf_counter()
    for title, run in sections.items():  # one failing section does not cost the others' figures
        begin = time.perf_counter()
        try:
            run()
        except Exception:
            traceback.print_exc()
            failed.append(title)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"    ({title}: {time.perf_counter() - begin:.0f} s)", flush=True)
    print(f"gpu_check done in {time.perf_counter() - started:.0f} s" + (f"; FAILED: {failed}" if failed else ""),
          flush=True)
    return 1 if failed else 0


def record_scoring(rec: Recorder, nets: dict, size: dict, device: torch.device) -> None:
    for label, net in nets.items():
        r = check_scoring(net, size, device)
        naive, ours = r["naive"], r["opsft"]
        print(f"[1] scoring {label}: opsft {ours['tokens_per_s']:,.0f} vs naive {naive['tokens_per_s']:,.0f} response "
              f"tokens/s ({ours['tokens_per_s'] / naive['tokens_per_s']:.2f}x); peak MB {ours['peak_mb']} vs "
              f"{naive['peak_mb']}; max |dphi| vs float64 {ours['max_dphi_fp64']:.2e} vs {naive['max_dphi_fp64']:.2e}",
              flush=True)
        rec.figure(f"CLL scoring {label}", ours["tokens_per_s"], "response tokens/s",
                   baseline=("naive: one sequence, full log_softmax", naive["tokens_per_s"]),
                   goal=(">=", 1.5, f"{GOAL_SOURCE}: at least 1.5x the naive reference"))
        if device.type == "cuda":
            rec.figure(f"CLL scoring {label} peak GPU memory", ours["peak_mb"], "MB",
                       baseline=("naive", naive["peak_mb"]),
                       note="torch.cuda.max_memory_allocated during the run, weights included")
        rec.figure(f"CLL scoring {label} max |dphi| vs float64", ours["max_dphi_fp64"], "nats/token",
                   baseline=("naive", naive["max_dphi_fp64"]),
                   goal=("<=", 2.0, f"{GOAL_SOURCE}: equal exactness (within 2x of the naive reference's error)"),
                   note="the truth: the naive computation in float64 on the same weights, first exact_rows rows")


def record_hinted(rec: Recorder, model, size: dict, device: torch.device) -> None:
    r = check_hinted(model, size, device)
    print(f"[2] hinted decoding T 0.3: batched+cached {r['batched']:,.1f} tokens/s; official loop {r['official']:,.2f} "
          f"({r['batched'] / r['official']:.1f}x); plain batched sampling {r['plain']:,.1f} "
          f"({r['batched'] / r['plain']:.2f}x)", flush=True)
    note = (f"{size['hd_items']} items x {size['hd_tokens']} tokens, hinted prompts ~{r['hinted_prompt_mean']:.0f}, "
            f"student ~{r['student_prompt_mean']:.0f} tokens; official loop on {size['ref_items']} item(s) x "
            f"{size['ref_tokens']} tokens (shorter: flatters it); plain sampling = generate on the hinted prompts")
    rec.figure("hinted decoding T 0.3, batched+cached", r["batched"], "generated tokens/s",
               baseline=("official loop: one item, no cache", r["official"]),
               goal=(">=", 10.0, f"{GOAL_SOURCE}: at least 10x the official loop"), note=note)
    rec.figure("hinted decoding T 0.3 against plain sampling", r["batched"], "generated tokens/s",
               baseline=("plain batched sampling, same model", r["plain"]),
               goal=(">=", 0.5, f"{GOAL_SOURCE}: within 2x of plain sampling"), note=note)


def record_ceiling(rec: Recorder, model, size: dict, device: torch.device) -> None:
    ceiling = check_ceiling(model, size, device)
    top = size["ceiling_rows"]
    print(f"[4] scoring service ceiling: {ceiling[1] * 1000:.1f} ms per row one per call, {ceiling[top] * 1000:.1f} "
          f"ms per row {top} per call ({ceiling[1] / ceiling[top]:.1f}x)", flush=True)
    rec.figure(f"scoring rows/s, {top} rows per call (the batching ceiling)", 1 / ceiling[top], "rows/s",
               baseline=("1 row per call", 1 / ceiling[1]),
               goal=(">=", 2.0, f"{GOAL_SOURCE}: the service's batching can gain >= 2x"),
               note="in-process engine scoring of ~40-token items, no HTTP or Ray")


def record_training(rec: Recorder, model, size: dict, peak: float | None) -> None:
    train = {loss: measure_steps(model, loss, batch=size["train_batch"], seq=size["train_seq"],
                                 steps=size["train_steps"], autocast="auto", peak_tflops=peak)
             for loss in ("sft", "idft")}
    sft, idft = train["sft"], train["idft"]
    print(f"[3] training {size['train_batch']} x {size['train_seq']}: sft {sft}; idft {idft}", flush=True)
    for loss, t in train.items():
        rec.figure(f"{loss} training throughput", t["tokens_per_s"], "tokens/s")
        if "mfu" in t:
            rec.figure(f"{loss} MFU", t["mfu"], f"fraction of {peak:g} TFLOP/s (6 N tokens/s)")
    goal = ("<=", 1.10, f"{GOAL_SOURCE}: IDFT within 10% of SFT")
    rec.figure("idft step time", idft["step_s"], "s", baseline=("sft", sft["step_s"]), goal=goal)
    if "peak_mem_mb" in idft and next(model.parameters()).device.type == "cuda":
        rec.figure("idft peak GPU memory", idft["peak_mem_mb"], "MB", baseline=("sft", sft["peak_mem_mb"]), goal=goal,
                   note="weights, gradients and AdamW states included")


if __name__ == "__main__":
    sys.exit(main())
