"""Helpers for the opsft train tests: a tiny random Llama saved as a HF folder with the
real tokenizer, small corpora, and the tolerance of the split / resume comparisons."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from opsft.data.corpus import write_rows
from opsft.train.precision import to_dtype

# SPLIT_TOL: the tolerance of every comparison between worker splits, micro-batch splits, a crash and
# resume, and one uninterrupted process. Those runs train in float64 (TrainConfig.dtype="float64",
# opsft.train.precision); SPLIT_TOL is relative for losses and metrics (with an absolute floor of
# SPLIT_TOL times the quantity's scale where it can be ~0) and absolute for weights and gradients
# (also times their scale; the tiny model's weights are below 1).
#
# Why not float32: AdamW's update lr * m / (sqrt(v) + eps_adam) is Lipschitz in the gradient with a
# constant up to lr / eps_adam (3e-3 / 1e-8 = 3e5 here), so float32 reduction-order noise in a
# gradient moves weights by ~1e-5 within a few steps: issue 13's flake (eval_loss 0.006568758 vs
# 0.006568910, 2.3e-5 relative, failing rel 1e-5). The only bound float32 allows after AdamW steps is
# the size of the updates themselves (a near-zero gradient's sign can flip: up to 2 lr per weight and
# step), which would no longer catch a wrong normalisation.
#
# The float64 bound. Two splits run the same operations on the same numbers, the sums in another
# order. To first order in the unit roundoff u every difference between them is u times a condition
# factor of the computation (sum lengths, AdamW's lr / eps_adam, the steps), and that factor is the
# same whether the run is float32 (u32 = 2^-24) or float64 (u64 = 2^-53): a float64 difference is
# about u64 / u32 = 2^-29 = 1.9e-9 times the float32 difference of the same comparison (within a
# small factor: the individual roundings differ). So a float64 difference above SPLIT_TOL = 1e-9 means
# a float32 difference of 10% or more: a bug, not rounding; and a bug as small as a float32 rounding
# (6e-8) fails. Seen on this 2-core machine, float32 -> float64: test_train_ray's eval_loss 4.6e-6 ->
# 3.4e-14 relative (ratio 7e-9; issue 13's float32 run: 2.3e-5), its weights 2.1e-7 -> 1.1e-15;
# test_train_pairs_ray's weights 1.2e-5 -> 1.9e-14, margins 2.6e-5 -> 1.3e-14; the local resumes
# are bitwise equal in both.
# What keeps the float64 run float64 end to end: opsft.method.cll computes in the logits' dtype, and
# opsft.train.precision widens transformers' float32 RMSNorm (else a float32 rounding inside every
# norm could land on either side of a boundary in two splits: a 6e-8 jump, amplified like float32 noise).
SPLIT_TOL = 1e-9


def float64_copy(model):
    """A float64 copy of a model (its RMSNorms computed in float64 too), for split comparisons."""
    return to_dtype(copy.deepcopy(model), "float64")


def save_tiny(model, tokenizer, folder) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def arithmetic_rows(n: int) -> list[dict]:
    """Short rows of varied length (the length sort and padding matter)."""
    return [{"id": f"r{i}", "prompt": f"What is {i} plus {i + 1}?",
             "response": f"{i} plus {i + 1} is {2 * i + 1}." + " Done." * (i % 4)} for i in range(n)]


def write_corpus(path, rows) -> str:
    write_rows(rows, path)
    return str(path)


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{folder}/model.safetensors")


def max_weight_diff(a: dict, b: dict) -> float:
    """Largest absolute difference, taken in float64 (a float32 cast would round float64 weights
    that differ by 1e-16 to float32 neighbours ~1e-9 apart)."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def one_process_and_two_crashing_workers(tmp_path, ray_extra: dict | None = None, **common
                                         ) -> tuple[dict, dict, list[dict], list[dict]]:
    """The same training run twice, in float64 (compare with SPLIT_TOL): in one process
    (micro-batches of 4), and as a Ray Train job of two workers (micro-batches of 1; `ray_extra`
    TrainConfig fields for it only, e.g. the FSDP strategy) that crashes once after step 3 and
    resumes from its last checkpoint. Checks that the crash happened, that the corpus' one bad row
    was counted, that the checkpoints hold float64 weights, and that each run recorded its strategy
    (none for the one process; the Ray run's in its summary, every metrics line and its checkpoint);
    returns (local summary, Ray summary, local metrics, Ray metrics)."""
    import json

    from opsft.config import TrainConfig
    from opsft.train.loop import run_local
    from opsft.train.metrics import read_metrics
    from opsft.train.ray_job import run_ray

    ref = run_local(TrainConfig(**common, dtype="float64", micro_batch_size=4, output_dir=str(tmp_path / "one")))
    out = run_ray(TrainConfig(**common, dtype="float64", micro_batch_size=1, output_dir=str(tmp_path / "two"),
                              fail_after_step=3, max_failures=1,
                              **{"scaling": {"num_workers": 2}, **(ray_extra or {})}))
    assert out["data"]["train"]["error_rows"] == 1
    assert (tmp_path / "two" / ".fail_after_step_done").exists()  # the crash did happen
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    assert {t.dtype for t in weights(out["checkpoint"]).values()} == {torch.float64}
    assert ref["strategy"] == ref["final"]["strategy"] == "none" and {m["strategy"] for m in one} == {"none"}
    assert out["strategy"] == out["final"]["strategy"] and {m["strategy"] for m in two} == {out["strategy"]}
    trainer = json.loads((Path(out["checkpoint"]) / "trainer_state.json").read_text())
    assert (trainer["strategy"], trainer["world_size"]) == (out["strategy"], 2)
    return ref, out, one, two
