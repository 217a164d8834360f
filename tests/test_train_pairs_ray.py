"""opsft train --loss dpo as a Ray Train job: two CPU workers (gloo, FSDP: the hardest case, the
reference log-probs split between them and computed by the sharded initial model, rank 1 built on
the meta device; the DDP wrapping of the same loop is tests/test_train_ray.py's) reproduce the
one-process run with the same global batch of pairs, through a worker crash and Ray's restart from
the last checkpoint (which must reuse the initial model's reference log-probs saved there, not
recompute them from the restored weights). Both runs are float64 and agree within SPLIT_TOL
(train_helpers: why float64, and the bound)."""

from __future__ import annotations

import pytest
from test_train_pairs import pair_rows
from train_helpers import (
    SPLIT_TOL,
    max_weight_diff,
    one_process_and_two_crashing_workers,
    save_tiny,
    weights,
    write_corpus,
)


@pytest.mark.slow
def test_two_ray_workers_with_a_crash_equal_one_process_for_dpo(tmp_path, tiny_model, tokenizer, ray_local):
    model_dir = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "pairs.jsonl", pair_rows(11) + [{"prompt": "q", "chosen": "a"}])
    ref, out, one, two = one_process_and_two_crashing_workers(
        tmp_path, input=corpus, model=model_dir, loss={"name": "dpo", "dpo_beta": 0.5}, max_steps=4,
        global_batch_size=4, lr=1e-2, warmup_ratio=0.0, eval_rows=2, checkpoint_every=2, seed=3,
        ray_extra={"scaling": {"num_workers": 2, "strategy": "fsdp"}})
    assert one[0]["pairs"] == two[0]["pairs"] == 4
    assert out["strategy"] == "fsdp"  # recorded in the metrics and checkpoints (train_helpers checks)
    for step, (a, b) in enumerate(zip(one, two, strict=True)):
        assert b["tokens"] == a["tokens"]
        # at step 1 the policy is the reference: every margin is 0 up to rounding (also in float64),
        # so "margin > 0" (reward_accuracy) is the sign of rounding noise; margins start near 0:
        # floor SPLIT_TOL x the log-prob sums' scale (~100)
        for key in ("loss", "margin") + (("reward_accuracy",) if step else ()):
            assert b[key] == pytest.approx(a[key], rel=SPLIT_TOL, abs=SPLIT_TOL * 100), key
    for key in ("eval_loss", "eval_margin", "eval_reward_accuracy"):
        assert two[-1][key] == pytest.approx(one[-1][key], rel=SPLIT_TOL, abs=SPLIT_TOL * 100), key
    assert one[-1]["margin"] > one[0]["margin"]  # it learns
    assert max_weight_diff(weights(ref["checkpoint"]), weights(out["checkpoint"])) < SPLIT_TOL
