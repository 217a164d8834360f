"""opsft train as a Ray Train job: two CPU workers (gloo, DDP) reproduce the one-process
run with the same global batch, through a worker crash and Ray's restart from the last
checkpoint, and a short last batch (13 rows, batch 4: worker 1 has no row in step 4); the
result is a HF folder. One TorchTrainer fit with one restart."""

from __future__ import annotations

import pytest
from train_helpers import (
    arithmetic_rows,
    max_weight_diff,
    one_process_and_two_crashing_workers,
    save_tiny,
    weights,
    write_corpus,
)


@pytest.mark.slow
def test_two_ray_workers_with_a_crash_equal_one_uninterrupted_process(tmp_path, tiny_model, tokenizer, ray_local):
    model_dir = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "c.jsonl", arithmetic_rows(15) + [{"prompt": "no response"}])
    ref, out, one, two = one_process_and_two_crashing_workers(
        tmp_path, input=corpus, model=model_dir, loss={"name": "idft"}, max_steps=4, global_batch_size=4, lr=3e-3,
        warmup_ratio=0.25, eval_rows=2, checkpoint_every=2, seed=3)
    for a, b in zip(one, two, strict=True):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["phi_mean"] == pytest.approx(a["phi_mean"], rel=1e-5, abs=1e-6)
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5)
    assert out["final"]["step"] == 4 and out["checkpoint"]
    assert max_weight_diff(weights(ref["checkpoint"]), weights(out["checkpoint"])) < 1e-5
    assert max_weight_diff(weights(model_dir), weights(out["checkpoint"])) > 1e-3  # it did train
