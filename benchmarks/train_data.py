"""Benchmark: the memory a training worker spends on the corpus, before and after sharding.

Before (the driver path, still used for pairs and by `--local`): every worker held every example
as a TrainExample, a Python list of ints. After (opsft.train.worker_corpus): a worker holds its part's
token ids as one int32 array, plus per-row metadata of the whole corpus (position and length).
Both measured with tracemalloc on the same synthetic corpus tokenised with the embedded
tokenizer, in one process; the sharded figure is for W = 1 (every row held), its token part
divides by W.

    .venv/bin/python benchmarks/train_data.py [--rows 20000] [--words 150]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import tracemalloc
from pathlib import Path

from _results import Recorder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def corpus(path: Path, rows: int, words: int) -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    with path.open("w") as f:
        for i in range(rows):
            n = rng.randint(words // 4, words)
            f.write(json.dumps({"prompt": f"Question {i}?", "response": " ".join(rng.choices(vocab, k=n))}) + "\n")


def traced(fn):
    tracemalloc.start()
    out = fn()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return out, size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--words", type=int, default=150)
    args = p.parse_args()
    from opsft.data.reader import read_rows
    from opsft.models import default_model_dir, load_model
    from opsft.train.batches import prepare_examples
    from opsft.train.worker_corpus import ShardedCorpus, local_rows

    _, tok = load_model(str(default_model_dir()), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.jsonl"
        corpus(path, args.rows, args.words)
        rows = local_rows(path, tok, 4096)  # the tokenised dataset rows (as Ray Data would hand them over)
        raw = read_rows(path)
        (examples, _), before = traced(lambda: prepare_examples(raw, tok, 4096))
        tokens = sum(len(e) for e in examples)
        del examples
        sharded, after = traced(lambda: ShardedCorpus(iter(rows), lambda x: [x], 0, 0))
    out = {"rows": args.rows, "tokens": tokens, "examples_bytes_per_token": round(before / tokens, 2),
           "sharded_bytes_per_token_w1": round(after / tokens, 2),
           "sharded_token_ids_bytes": int(sharded._ids.nbytes), "sharded_total_bytes": after,
           "examples_total_bytes": before}
    print(json.dumps(out))
    rec = Recorder("train_data", args)
    rec.figure("corpus memory per worker, sharded (W = 1)", after / 2**20, "MB",
               baseline=("every worker holds TrainExamples", before / 2**20),
               note="token ids: 4 bytes a token divided by W; metadata: ~12 bytes a row on every worker")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
