"""opsft train with the pair losses (dpo, simpo), without Ray, on the tiny random Llama of
conftest: the pair mean is exact over workers and micro-batches, the reference log-probs are
those of the initial model (also after a resume), DPO and SimPO raise the chosen-vs-rejected
margin on the training pairs, held-out pair metrics, and the CLI from a rewrite output. Every
comparison between splits, with a resumed run, or of the policy with its own reference (margin 0) is
made in float64 within SPLIT_TOL (train_helpers: why, and the bound)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opsft.cli import main as cli_main
from opsft.config import TrainConfig
from opsft.method import losses
from opsft.train.batches import worker_micro_batches
from opsft.train.checkpoint import load_trainer_state
from opsft.train.loop import InjectedFailure, run_local
from opsft.train.metrics import read_metrics
from opsft.train.optim import make_scheduler
from opsft.train.pairs import collate_pairs, evaluate_pairs, prepare_pairs, reference_logps, with_reference
from opsft.train.step import LossSpec, forward_loss, train_step
from train_helpers import SPLIT_TOL, float64_copy, max_weight_diff, save_tiny, weights, write_corpus

OFF = torch.autocast("cpu", enabled=False)


def pair_rows(n: int) -> list[dict]:
    """The right sum as chosen, a wrong one (of another length) as rejected."""
    return [{"id": f"p{i}", "prompt": f"What is {i} plus {i + 1}?",
             "chosen": f"{i} plus {i + 1} is {2 * i + 1}." + " Done." * (i % 3),
             "rejected": f"I think {i} plus {i + 1} is {2 * i + 3}" + ", maybe" * (i % 2) + "."} for i in range(n)]


def _pairs(tokenizer, n=6):
    pairs, _ = prepare_pairs(pair_rows(n), tokenizer, max_length=256)
    return pairs


@pytest.mark.parametrize("name", ["dpo", "simpo"])
def test_pair_mean_is_exact_over_micro_batches_and_workers(tiny_model, tokenizer, name):
    """The gradient of the mean pair loss of the global batch, whether it is one forward pass,
    accumulated micro-batches, or two workers (gradients averaged as DDP does). In float64."""
    pad = tokenizer.pad_token_id
    pairs = _pairs(tokenizer)
    model0 = float64_copy(tiny_model)
    ref = reference_logps(model0, pairs, pad, "cpu", micro_batch_size=4)
    # the reference split over two workers (each its share, then summed) is the same; the sums are ~100
    split = sum(reference_logps(model0, pairs, pad, "cpu", micro_batch_size=2, rank=r, world_size=2)
                for r in range(2))
    torch.testing.assert_close(split, ref, rtol=SPLIT_TOL, atol=SPLIT_TOL * 100)
    pairs = with_reference(pairs, ref)
    spec = LossSpec(name, {"beta": 0.5} if name == "dpo" else {"beta": 2.0, "gamma": 0.5})
    model0.train()
    g = torch.Generator().manual_seed(1)  # its own seed: the same model whatever ran before
    with torch.no_grad():  # move off the reference so that the DPO gradient is not the trivial one
        for p in model0.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)

    def grads(parts, world):
        model = copy.deepcopy(model0)
        norm = losses.global_token_normalizer(len(pairs), world)
        total = 0.0
        for part in parts:
            loss, _ = forward_loss(model, collate_pairs(part, pad), spec, 0.0, norm, OFF)
            loss.backward()
            total += float(loss.detach())
        return {k: p.grad.clone() for k, p in model.named_parameters()}, total

    whole, loss_whole = grads([pairs], 1)
    accumulated, loss_acc = grads([pairs[:1], pairs[1:4], pairs[4:]], 1)
    (w0, l0), (w1, l1) = grads([pairs[:1], []], 2), grads([pairs[1:3], pairs[3:]], 2)  # [] = a no-pair batch
    assert loss_acc == pytest.approx(loss_whole, rel=SPLIT_TOL)
    assert (l0 + l1) / 2 == pytest.approx(loss_whole, rel=SPLIT_TOL)
    scale = max(float(g.abs().max()) for g in whole.values())
    assert scale > 1e-3  # a real gradient
    for k in whole:
        torch.testing.assert_close(accumulated[k], whole[k], rtol=SPLIT_TOL, atol=SPLIT_TOL * scale)
        torch.testing.assert_close((w0[k] + w1[k]) / 2, whole[k], rtol=SPLIT_TOL, atol=SPLIT_TOL * scale)
    # and the value: the mean over pairs of the formula, from the model's own per-row log-probs
    with torch.no_grad():
        batch = collate_pairs(pairs, pad)
        logp = torch.log_softmax(model0(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                 .logits, -1)
        labels = batch["labels"]
        valid = labels >= 0
        tok = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid
        sums, counts = tok.sum(1), valid.sum(1)
        n = len(pairs)
        if name == "dpo":
            z = 0.5 * ((sums[:n] - ref[:, 0]) - (sums[n:] - ref[:, 1]))
        else:
            z = 2.0 * sums[:n] / counts[:n] - 2.0 * sums[n:] / counts[n:] - 0.5
        assert loss_whole == pytest.approx(float(-torch.nn.functional.logsigmoid(z).mean()), rel=SPLIT_TOL)


def test_train_step_with_pairs_is_the_same_for_any_micro_batch_size(tiny_model, tokenizer):
    """Two steps with one micro-batch of 8 pairs or four of 2: the same curve and weights (float64)."""
    pad = tokenizer.pad_token_id
    model64 = float64_copy(tiny_model)
    pairs = with_reference(_pairs(tokenizer, 8), reference_logps(model64, _pairs(tokenizer, 8), pad, "cpu"))
    results = []
    for micro in (8, 2):
        model = copy.deepcopy(model64).train()
        # SGD: the weights then show gradient differences as they are, unamplified by Adam
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = make_scheduler(opt, 2, 0.0)
        curve = []
        for _ in range(2):
            parts = worker_micro_batches(list(range(8)), [len(p) for p in pairs], micro, 0, 1)
            curve.append(train_step(model, opt, sched, [collate_pairs([pairs[i] for i in p], pad) for p in parts],
                                    LossSpec("dpo", {"beta": 0.1}), 0.0))
        results.append((curve, model.state_dict()))
    (c1, s1), (c2, s2) = results
    # the policy is the reference: margin 0 up to rounding of log-prob sums of ~100 (beta 0.1 scales it down)
    assert c1[0]["loss"] == pytest.approx(math.log(2), abs=SPLIT_TOL * 100)
    assert c1[0]["margin"] == pytest.approx(0.0, abs=SPLIT_TOL * 100) and c1[0]["pairs"] == 8
    for step, (a, b) in enumerate(zip(c1, c2, strict=True)):
        # at step 0 every margin is 0 up to rounding (also in float64), so "margin > 0"
        # (reward_accuracy) is the sign of rounding noise
        keys = ("loss", "margin", "logp_chosen", "logp_rejected") + (("reward_accuracy",) if step else ())
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=SPLIT_TOL, abs=SPLIT_TOL * 100), key
        assert a["tokens"] == b["tokens"]
    assert max(float((s1[k] - model64.state_dict()[k]).abs().max()) for k in s1) > 1e-3  # it moved
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=SPLIT_TOL, atol=SPLIT_TOL)


def _cfg(corpus, model_dir, **kw):
    base = dict(input=corpus, model=model_dir, max_steps=6, global_batch_size=4, micro_batch_size=2, lr=1e-2,
                warmup_ratio=0.0, seed=1, eval_rows=0, loss={"name": "dpo"})
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("name,params", [("dpo", {"dpo_beta": 0.1}), ("simpo", {})])
def test_training_raises_the_margin_on_the_training_pairs(tmp_path, tiny_model, tokenizer, name, params):
    """In float64: before training the dpo margin is 0 and the loss log 2 up to rounding, though the
    reference (reference_logps) and the policy (evaluate_pairs) batch the pairs differently."""
    corpus = write_corpus(tmp_path / "pairs.jsonl", pair_rows(8))
    model = float64_copy(tiny_model)
    pad = tokenizer.pad_token_id
    pairs = _pairs(tokenizer, 8)
    spec = LossSpec(name, TrainConfig(loss={"name": name, **params}).loss.params())
    if name == "dpo":
        pairs = with_reference(pairs, reference_logps(model, pairs, pad, "cpu"))
    before = evaluate_pairs(model, pairs, spec, pad, "cpu")
    out = run_local(_cfg(corpus, None, loss={"name": name, **params}, dtype="float64"), model=model,
                    tokenizer=tokenizer)
    after = evaluate_pairs(model, pairs, spec, pad, "cpu")
    assert out["final"]["step"] == 6 and out["data"]["train"]["used"] == 8
    if name == "dpo":
        assert before["eval_margin"] == pytest.approx(0.0, abs=SPLIT_TOL * 100)
        assert before["eval_loss"] == pytest.approx(math.log(2), abs=SPLIT_TOL * 100)
    assert after["eval_margin"] > before["eval_margin"] + 0.1
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_reward_accuracy"] >= 0.75


def test_dpo_resume_uses_the_initial_models_reference(tmp_path, tiny_model, tokenizer):
    """A crash after step 3, resumed from the step-2 checkpoint, gives the curve and weights of
    the uninterrupted run: the reference is the initial model's, saved in the checkpoint, not
    recomputed from the resumed weights. Held-out pair metrics are reported. In float64."""
    model_dir = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "pairs.jsonl", pair_rows(10))
    kw = dict(max_steps=4, checkpoint_every=2, eval_rows=2, dtype="float64")
    full = run_local(_cfg(corpus, model_dir, output_dir=str(tmp_path / "full"), **kw))
    crashed = tmp_path / "crashed"
    with pytest.raises(InjectedFailure):
        run_local(_cfg(corpus, model_dir, output_dir=str(crashed), fail_after_step=3, **kw))
    step2 = crashed / "checkpoints" / "step-000002"
    resumed = run_local(_cfg(corpus, model_dir, output_dir=str(crashed), resume_from=str(step2), **kw))
    a, b = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(crashed / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["lr"] == y["lr"]  # a function of the step alone
        assert x["loss"] == pytest.approx(y["loss"], rel=SPLIT_TOL)
        assert x["margin"] == pytest.approx(y["margin"], rel=SPLIT_TOL, abs=SPLIT_TOL * 100)
    assert max_weight_diff(weights(full["checkpoint"]), weights(resumed["checkpoint"])) < SPLIT_TOL
    assert {"eval_loss", "eval_reward_accuracy", "eval_margin"} <= set(a[-1])
    assert a[-1]["eval_rows"] == 2
    # the saved reference is the initial model's
    saved = load_trainer_state(step2)["reference_logps"]
    assert saved["train"].shape == (8, 2) and saved["eval"].shape == (2, 2)
    assert float(saved["train"].abs().min()) > 0
    # a checkpoint without a reference (an SFT run) cannot be resumed as dpo
    assert saved["train"].dtype == torch.float64
    sft = run_local(_cfg(corpus, model_dir, output_dir=str(tmp_path / "sft"), max_steps=1,
                         loss={"name": "simpo"}))
    with pytest.raises(ValueError, match="no dpo reference"):
        run_local(_cfg(corpus, model_dir, output_dir=str(tmp_path / "x"), max_steps=1,
                       resume_from=sft["checkpoint"]))


def test_cli_trains_dpo_on_a_rewrite_output(tmp_path, tiny_model, tokenizer, capsys):
    from test_pairs import ROWS

    model_dir = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    rewrite = write_corpus(tmp_path / "rw.jsonl", ROWS)
    args = ["train", "--local", "--model", model_dir, "--output-dir", str(tmp_path / "o"), "--max-steps", "2",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--loss", "dpo", "--dpo-beta", "0.2",
            "--label-smoothing", "0.1", "--input", rewrite]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert '"pairs": 5' in out and '"self_correct": 1' in out
    last = read_metrics(tmp_path / "o" / "metrics.jsonl")[-1]
    assert last["step"] == 2 and math.isfinite(last["loss"]) and "reward_accuracy" in last
    assert cli_main([*args[:-1], write_corpus(tmp_path / "plain.jsonl", [{"prompt": "q", "response": "a"}])]) == 2
    assert "no 'chosen'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([*args, "--loss", "ipo"])
