"""opsft train as a Ray Train job: two CPU workers (gloo, DDP) reproduce the one-process
run with the same global batch, through a worker crash and Ray's restart from the last
checkpoint, and a short last batch (13 rows, batch 4: worker 1 has no row in step 4); the
result is a HF folder. One TorchTrainer fit with one restart. Both runs are float64 and agree
within SPLIT_TOL (train_helpers: why float64, and the bound)."""

from __future__ import annotations

from pathlib import Path

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
    assert out["strategy"] == "ddp"  # two replicas (train_helpers checks it is recorded everywhere)
    assert max_weight_diff(weights(ref["checkpoint"]), weights(out["checkpoint"])) < SPLIT_TOL
    assert max_weight_diff(weights(model_dir), weights(out["checkpoint"])) > 1e-3  # it did train


@pytest.mark.slow
def test_a_rerun_after_a_failed_fit_continues_from_the_last_checkpoint(tmp_path, tiny_model, tokenizer, ray_local):
    """The realignment cycle's train stage, and any `opsft train` rerun on the same output folder: a
    fit that failed after step 2 (no Ray Train retry left, max_failures 0) is continued by the next
    run from its step-2 checkpoint, not started over; its weights equal an uninterrupted run's.
    Observed through metrics.jsonl: a run resumed at step s keeps the lines up to s as they were (a
    mark put on line 1 survives), a run from step 0 writes them all again."""
    import json

    from opsft.config import TrainConfig
    from opsft.train.ray_job import run_ray

    model_dir = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "c.jsonl", arithmetic_rows(12))
    common = dict(input=corpus, model=model_dir, max_steps=4, global_batch_size=4, micro_batch_size=2, lr=3e-3,
                  warmup_ratio=0.0, checkpoint_every=1, dtype="float64", max_failures=0)
    clean = run_ray(TrainConfig(**common, output_dir=str(tmp_path / "clean")))
    out = tmp_path / "resumed"
    with pytest.raises(Exception, match="fail_after_step=2"):
        run_ray(TrainConfig(**common, output_dir=str(out), fail_after_step=2))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    (out / "metrics.jsonl").write_text("\n".join([json.dumps({**json.loads(lines[0]), "mark": 1}), lines[1]]) + "\n")
    resumed = run_ray(TrainConfig(**common, output_dir=str(out)))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[0].get("mark") == 1  # steps 1-2 not redone
    assert resumed["final"]["step"] == 4
    # one Ray worker without FSDP: strategy none, recorded in every metrics line and checkpoint
    assert resumed["strategy"] == resumed["final"]["strategy"] == "none"
    assert {m["strategy"] for m in metrics} == {"none"}
    assert json.loads((Path(resumed["checkpoint"]) / "trainer_state.json").read_text())["strategy"] == "none"
    assert max_weight_diff(weights(clean["checkpoint"]), weights(resumed["checkpoint"])) < SPLIT_TOL
