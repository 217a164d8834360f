"""`make demo`: one realignment cycle end to end on the embedded model, local Ray, CPU.

    .venv/bin/python workflows/demo.py [--rows 160] [--held-out 16] [--output runs/demo]

1. makes a corpus deterministically: reasoning-gym gsm_symbolic questions with their
   template-written worked solutions as the (off-policy) responses, plus held-out questions
   that never occur in it;
2. measures the embedded model's answer accuracy on the held-out questions;
3. runs one cycle of `opsft realign` with workflows/realign_demo.yaml: score the corpus, rewrite
   the most off-policy rows (self-first hinted decoding), fine-tune with IDFT, re-score;
4. measures the new checkpoint's held-out accuracy and prints a before/after table; the
   cycle's report (summary.json + PNG plots) is in <output>/cycles/vNNNN/report/.

Running it again with the same inputs finds the finished cycle and does no work twice
(delete <output> to start over).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent


def held_out_accuracy(model: str, rows: list[dict], max_new_tokens: int) -> float:
    """Greedy answers to the held-out questions, checked by the verifier against `answer`."""
    from opsft.data.chat import prompt_ids
    from opsft.data.verify import make_verifier
    from opsft.engines.base import GenerationParams
    from opsft.engines.hf import HFEngine

    engine = HFEngine(model, device="cpu", max_batch_size=8)
    prompts = [prompt_ids(engine.tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    outputs = engine.generate(prompts, GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0))
    verify = make_verifier("auto")
    texts = [engine.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    return sum(bool(verify(t, r["answer"], r)) for t, r in zip(texts, rows, strict=True)) / len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--output", default="runs/demo")
    parser.add_argument("--config", default=str(HERE / "realign_demo.yaml"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("ray", "ray.data", "ray.train", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from opsft.config import RealignConfig, load_config
    from opsft.data.corpus import write_rows
    from opsft.data.datasets import train_eval_split
    from opsft.models import default_model_dir
    from opsft.realign.cycle import Cycle

    start = time.monotonic()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    corpus, held_out = train_eval_split(args.rows, args.held_out, seed=0)
    write_rows(corpus, out / "corpus.jsonl")
    write_rows(held_out, out / "held_out.jsonl")
    base = str(default_model_dir())
    cfg = load_config(RealignConfig, args.config, {"corpus": str(out / "corpus.jsonl"),
                                                   "output_dir": str(out / "realign"), "model": base})
    print(f"[demo] corpus: {len(corpus)} gsm_symbolic rows, {len(held_out)} held-out questions -> {out}", flush=True)

    gen_tokens = cfg.rewrite.max_new_tokens
    print("[demo] held-out accuracy of the embedded model ...", flush=True)
    acc_before = held_out_accuracy(base, held_out, gen_tokens)

    print("[demo] realignment cycle: score -> select -> rewrite -> train -> rescore -> report", flush=True)
    result = Cycle(cfg).run()
    outputs = result["outputs"]
    checkpoint = outputs["train"]["checkpoint"]
    print("[demo] held-out accuracy of the new checkpoint ...", flush=True)
    acc_after = held_out_accuracy(checkpoint, held_out, gen_tokens)

    report = outputs["report"]
    sources = outputs["merge"]["sources"]
    rw = outputs["rewrite"]
    train_final = outputs["train"].get("final_metrics") or {}
    rows = [
        ("mean CLL of the corpus (own model)", report["cll_before"], report["cll_after"]),
        ("mean CLL of the selected rows", report["rewritten_cll_before"], report.get("rewritten_cll_after")),
        ("held-out accuracy", acc_before, acc_after),
    ]
    print()
    print(f"{'':<38} {'before':>10} {'after':>10}")
    for name, before, after in rows:
        fmt = (lambda v: f"{v:>10.3f}" if isinstance(v, float) else f"{'-':>10}")
        print(f"{name:<38} {fmt(before)} {fmt(after)}")
    print(f"\nrows: {outputs['select']['selected']} selected of {outputs['merge']['rows']}; "
          f"sources of the new corpus: {json.dumps(sources)}")
    print(f"rewrite: {rw.get('rows_written', 0)} rows in {rw.get('seconds', 0):.0f}s; "
          f"training: {json.dumps({k: train_final.get(k) for k in ('step', 'loss', 'phi_mean', 'gamma_mean')})}")
    print(f"cycle: {result['cycle']} ({result['status']})")
    print(f"report: {report['folder']}/ (" + ", ".join(sorted(p.name for p in Path(report['folder']).glob('*.png')))
          + ")")
    print(f"checkpoint: {checkpoint}")
    print(f"[demo] done in {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
