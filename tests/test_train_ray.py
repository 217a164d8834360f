"""opsft train as a Ray Train job: two CPU workers (gloo, DDP) reproduce the one-process
run with the same global batch, through a worker crash and Ray's restart from the last
checkpoint, and a short last batch (13 rows, batch 4: worker 1 has no row in step 4); the
result is a HF folder. One TorchTrainer fit with one restart. Both runs are float64 and agree
within SPLIT_TOL (train_helpers: why float64, and the bound)."""

from __future__ import annotations

import pytest
from train_helpers import (
    SPLIT_TOL,
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
        assert b["loss"] == pytest.approx(a["loss"], rel=SPLIT_TOL)
        # phi_mean is a mean of log p + H, terms of ~10 of both signs: floor SPLIT_TOL x that scale
        assert b["phi_mean"] == pytest.approx(a["phi_mean"], rel=SPLIT_TOL, abs=SPLIT_TOL * 10)
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=SPLIT_TOL)
    assert out["final"]["step"] == 4 and out["checkpoint"]
    assert max_weight_diff(weights(ref["checkpoint"]), weights(out["checkpoint"])) < SPLIT_TOL
    assert max_weight_diff(weights(model_dir), weights(out["checkpoint"])) > 1e-3  # it did train
