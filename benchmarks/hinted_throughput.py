"""Generated tokens/s of hinted decoding: the batched, KV-cached decoder (opsft.method.hinted) against
the official scheme (one item at a time, no cache: every step re-runs the whole hinted and
student sequences through the model), on the embedded SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/hinted_throughput.py [--items 16] [--new-tokens 128] [--ref-items 1]
                                                     [--ref-tokens 64] [--threads 2]

Prompts are real hint prompts (official system prompt + a gsm_symbolic question + its worked
solution) followed by a stand-in analysis prefix ("# Analyze" + the solution + "# CoT"), so the
hinted stream has the length it has in a real run without paying for the hint generation.
Both sides use the same per-step math (mixture, top-p 0.95 then temperature 0.3); eos is
ignored so every item produces exactly the asked number of tokens. The reference is timed on
fewer, shorter items (its cost per token grows with the sequence, so this flatters it).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _baselines import official_hinted_loop  # noqa: E402
from _results import Recorder  # noqa: E402
from opsft.data.chat import prompt_ids, response_ids  # noqa: E402
from opsft.data.datasets import gsm_symbolic_corpus  # noqa: E402
from opsft.data.hints import hint_messages  # noqa: E402
from opsft.engines.hf_streams import ModelStreams  # noqa: E402
from opsft.method.hinted import hinted_decode, item_generator  # noqa: E402
from opsft.method.hinted_params import HDItem, HDParams  # noqa: E402
from opsft.models import load_model  # noqa: E402


def build_items(tokenizer, n: int) -> list[HDItem]:
    items = []
    for row in gsm_symbolic_corpus(n, seed=0):
        hinted = prompt_ids(tokenizer, hint_messages(row["prompt"], row["response"]))
        hinted += response_ids(tokenizer, "# Analyze\n\n" + row["response"] + "\n\n# CoT")
        student = prompt_ids(tokenizer, [{"role": "user", "content": row["prompt"]}])
        items.append(HDItem(hinted_prompt=hinted, student_prompt=student))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ref-items", type=int, default=1)
    parser.add_argument("--ref-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-rows", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(None, dtype=torch.float32, device="cpu")
    items = build_items(tokenizer, max(args.items, args.ref_items))
    lengths = [len(it.hinted_prompt) for it in items[: args.items]]
    print(f"hinted prompts: {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}); "
          f"student prompts: mean {sum(len(it.student_prompt) for it in items) / len(items):.0f} tokens")
    params = HDParams(max_new_tokens=args.new_tokens, splitter=None)  # beta 3, top-p 0.95, T 0.3

    start = time.perf_counter()
    results = hinted_decode(ModelStreams(model, tokenizer.pad_token_id or 0, args.prefill_rows), items[: args.items],
                            params, eos_ids=set())
    batched_s = time.perf_counter() - start
    batched_tokens = sum(len(r.tokens) for r in results)
    batched_rate = batched_tokens / batched_s
    print(f"batched+cached: {args.items} items x {args.new_tokens} tokens = {batched_tokens} tokens in "
          f"{batched_s:.1f} s -> {batched_rate:.1f} tokens/s (prefill included)")

    start = time.perf_counter()
    ref_tokens = sum(official_hinted_loop(model, items[k], params, args.ref_tokens, item_generator(params.seed, k))
                     for k in range(args.ref_items))
    ref_s = time.perf_counter() - start
    ref_rate = ref_tokens / ref_s
    print(f"reference (1 item, no cache): {args.ref_items} items x {args.ref_tokens} tokens = {ref_tokens} tokens in "
          f"{ref_s:.1f} s -> {ref_rate:.2f} tokens/s")
    print(f"speed-up: {batched_rate / ref_rate:.1f}x  (torch threads {args.threads}, load average "
          f"{os.getloadavg()[0]:.1f})")
    Recorder("hinted_throughput", args).figure(
        "batched+cached hinted decoding", batched_rate, "generated tokens/s",
        baseline=("official scheme: 1 item, no cache", ref_rate), goal=(">=", 10.0, "docs/hinted_decoding.md"),
        note=f"reference timed on {args.ref_items} item(s) x {args.ref_tokens} tokens (shorter sequences: "
             f"flatters it), batched on {args.items} x {args.new_tokens}; batched includes prefill")


if __name__ == "__main__":
    main()
