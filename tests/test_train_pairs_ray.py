"""opsft train --loss dpo as a Ray Train job: two CPU workers (gloo, DDP; the reference log-probs
split between them) reproduce the one-process run with the same global batch of pairs, through
a worker crash and Ray's restart from the last checkpoint (which must reuse the initial model's
reference log-probs saved there, not recompute them from the restored weights)."""

from __future__ import annotations

import pytest
from opsft.config import TrainConfig
from opsft.train.loop import run_local
from opsft.train.metrics import read_metrics
from test_train_pairs import pair_rows
from train_helpers import max_weight_diff, save_tiny, weights, write_corpus


@pytest.mark.slow
def test_two_ray_workers_with_a_crash_equal_one_process_for_dpo(tmp_path, tiny_model, tokenizer, ray_local):
    from opsft.train.ray_job import run_ray

    model_dir = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "pairs.jsonl", pair_rows(11) + [{"prompt": "q", "chosen": "a"}])
    common = dict(input=corpus, model=model_dir, loss={"name": "dpo", "dpo_beta": 0.5}, max_steps=4,
                  global_batch_size=4, lr=1e-2, warmup_ratio=0.0, eval_rows=2, checkpoint_every=2, seed=3)
    ref = run_local(TrainConfig(**common, micro_batch_size=4, output_dir=str(tmp_path / "one")))
    out = run_ray(TrainConfig(**common, micro_batch_size=1, output_dir=str(tmp_path / "two"),
                              scaling={"num_workers": 2}, fail_after_step=3, max_failures=1))

    assert out["data"]["train"]["error_rows"] == 1
    assert (tmp_path / "two" / ".fail_after_step_done").exists()  # the crash did happen
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [m["step"] for m in two] == [1, 2, 3, 4] and one[0]["pairs"] == two[0]["pairs"] == 4
    for step, (a, b) in enumerate(zip(one, two, strict=True)):
        assert b["tokens"] == a["tokens"]
        # at step 1 every margin is 0 up to float noise, so "margin > 0" (reward_accuracy) is noise
        for key in ("loss", "margin") + (("reward_accuracy",) if step else ()):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    for key in ("eval_loss", "eval_margin", "eval_reward_accuracy"):
        assert two[-1][key] == pytest.approx(one[-1][key], rel=1e-4, abs=1e-5), key
    assert one[-1]["margin"] > one[0]["margin"]  # it learns
    assert max_weight_diff(weights(ref["checkpoint"]), weights(out["checkpoint"])) < 1e-4
