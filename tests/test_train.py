"""opsft train without Ray: data plan, labels, exact normalisation over micro-batches and
(simulated) workers, LR schedule, exact resume, HF checkpoint reload, bad inputs, the named
parallel strategy. Uses the tiny random Llama of conftest with the real tokenizer. Every comparison
between splits or with a resumed run is made in float64 within SPLIT_TOL (train_helpers: why, and
the bound)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opsft.cli import main as cli_main
from opsft.config import TrainConfig
from opsft.method import losses
from opsft.train.batches import (
    IGNORE,
    BatchPlan,
    TrainExample,
    check_batch_sizes,
    collate,
    prepare_examples,
    worker_micro_batches,
)
from opsft.train.checkpoint import check_strategy, load_trainer_state, save_checkpoint, saved_strategy
from opsft.train.loop import InjectedFailure, run_local
from opsft.train.metrics import read_metrics
from opsft.train.optim import lr_factor, make_optimizer, make_scheduler
from opsft.train.precision import to_dtype
from opsft.train.step import LossSpec, forward_loss, train_step
from opsft.train.strategy import STRATEGIES, Runtime, build_runtime, plain_state, worker_strategy
from train_helpers import SPLIT_TOL, arithmetic_rows, float64_copy, max_weight_diff, save_tiny, weights, write_corpus


def test_labels_cover_response_and_end_of_turn_never_the_prompt(tokenizer):
    rows = [{"prompt": "Say hi.", "response": "Hi there!"}]
    [ex], stats = prepare_examples(rows, tokenizer, max_length=512)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                           tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    response = tokenizer("Hi there!", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert ex.response_start == len(prompt) and ex.has_eos
    batch = collate([ex, TrainExample([5, 6, 7], 2, False)], pad_id=0)
    labels = batch["labels"]
    # position t predicts token t + 1: labelled exactly where token t + 1 is a response token
    expected = [IGNORE] * (len(prompt) - 1) + response + [tokenizer.eos_token_id, IGNORE]
    assert labels[0].tolist() == expected
    assert labels[1].tolist()[:3] == [IGNORE, 7, IGNORE] and batch["attention_mask"][1].tolist()[:4] == [1, 1, 1, 0]
    assert stats.response_tokens == len(response) + 1


def test_bad_rows_are_counted_and_overlong_policy_is_explicit(tokenizer):
    long = {"prompt": "Count.", "response": " ".join(["one two three"] * 40)}
    rows = [{"prompt": "ok?", "response": "yes"}, {"prompt": "x", "error": "upstream failure"},
            {"prompt": "no response"}, {"messages": "bad"}, long]
    ex, stats = prepare_examples(rows, tokenizer, max_length=64, overlong="skip")
    assert (len(ex), stats.error_rows, stats.too_long_skipped, stats.truncated) == (1, 3, 1, 0)
    ex, stats = prepare_examples(rows, tokenizer, max_length=64, overlong="truncate")
    assert (len(ex), stats.too_long_skipped, stats.truncated) == (2, 0, 1)
    assert len(ex[1]) == 64 and not ex[1].has_eos and ex[0].has_eos


def test_every_global_batch_is_the_same_rows_for_any_split():
    lengths = [7, 3, 9, 9, 2, 5, 8, 1, 4, 6, 6]
    plan = BatchPlan(len(lengths), global_batch_size=4, seed=1)
    assert plan.steps_per_epoch == 3 and plan.total_steps(epochs=2, max_steps=None) == 6
    seen = []
    for step in range(6):
        rows = plan.step_indices(step)
        seen += rows
        for world, micro in [(1, 4), (1, 1), (2, 2), (2, 1), (4, 1)]:
            parts = [worker_micro_batches(rows, lengths, micro, r, world) for r in range(world)]
            flat = [i for worker in parts for mb in worker for i in mb]
            assert sorted(flat) == sorted(rows) and all(len(mb) <= micro for w in parts for mb in w)
            for worker in parts:  # each micro-batch holds neighbours in the length order
                for mb in worker:
                    assert [lengths[i] for i in mb] == sorted((lengths[i] for i in mb), reverse=True)
    assert sorted(seen[:11]) == list(range(11)) and sorted(seen[11:]) == list(range(11))  # each epoch once
    assert plan.step_indices(0) != BatchPlan(len(lengths), 4, seed=2).step_indices(0)
    with pytest.raises(ValueError, match="multiple"):
        check_batch_sizes(8, 3, 2)


def test_lr_warmup_then_cosine():
    assert [lr_factor(s, 10, 2) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(10, 10, 2) == pytest.approx(0.0) and lr_factor(10, 10, 2, min_ratio=0.1) == pytest.approx(0.1)
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(model, lr=1.0, weight_decay=0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]  # no decay on the bias
    sched = make_scheduler(opt, total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[6] == pytest.approx(0.5)


def test_float64_mode_computes_the_norms_in_float64_and_refuses_autocast(tiny_model):
    """to_dtype(model, "float64"): transformers' Llama RMSNorm upcasts to float32 and back, which
    for a float64 model is a float32 rounding (~6e-8 relative); widened, the norm equals a float64
    evaluation of weight * x / sqrt(mean(x^2) + eps) to ~1e-16 (checked at 1e-13). A float32 model
    keeps transformers' forward; an RMSNorm of another form is refused rather than left float32."""
    model = float64_copy(tiny_model)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    g = torch.Generator().manual_seed(0)
    for norm in (model.model.norm, model.model.layers[0].input_layernorm):
        with torch.no_grad():
            norm.weight.copy_(1 + torch.randn(norm.weight.shape, generator=g, dtype=torch.float64) * 0.1)
        x = torch.randn(3, 5, norm.weight.shape[0], generator=g, dtype=torch.float64) * 3
        want = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        torch.testing.assert_close(norm(x), want, rtol=1e-13, atol=1e-13)
    plain = copy.deepcopy(tiny_model)
    assert "forward" not in vars(to_dtype(plain, "float32").model.norm)

    class OffsetRMSNorm(torch.nn.Module):  # Gemma-style (1 + weight): not the form opsft widens
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(4)), 1e-6

        def forward(self, x):
            x32 = x.float()
            return ((1 + self.weight) * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    with pytest.raises(ValueError, match="OffsetRMSNorm computes in float32"):
        to_dtype(torch.nn.Sequential(OffsetRMSNorm()), "float64")
    with pytest.raises(ValueError, match="bf16 autocast"):
        TrainConfig(dtype="float64", autocast="bf16")


def _batches(tokenizer, n=6):
    ex, _ = prepare_examples(arithmetic_rows(n), tokenizer, max_length=256)
    return ex


def test_exact_normalisation_over_micro_batches_and_workers(tiny_model, tokenizer):
    """The gradient of the global-batch token mean, whether the batch is one forward pass,
    several accumulated micro-batches, or two workers whose gradients are averaged (DDP).
    In float64 (SPLIT_TOL); the loss value against a float64 log_softmax as well."""
    ex = _batches(tokenizer)
    spec = LossSpec("idft", {})
    n_tokens = sum(len(e) - e.response_start for e in ex)
    model64 = float64_copy(tiny_model)

    def grads(parts, world):
        model = copy.deepcopy(model64).train()
        norm = losses.global_token_normalizer(n_tokens, world)
        for part in parts:
            loss_value, _ = forward_loss(model, collate(part, tokenizer.pad_token_id), spec, 0.5, norm,
                                         torch.autocast("cpu", enabled=False))
            loss_value.backward()
        return {k: p.grad.clone() / 1.0 for k, p in model.named_parameters()}

    whole = grads([ex], 1)
    accumulated = grads([ex[:1], ex[1:4], ex[4:]], 1)
    # two workers with 1 and 5 rows: each worker's sum, then DDP's average over W = 2
    w0, w1 = grads([ex[:1]], 2), grads([ex[1:3], ex[3:]], 2)
    scale = max(float(g.abs().max()) for g in whole.values())
    assert scale > 1e-5  # a real gradient (1.4e-4 here)
    for k in whole:
        torch.testing.assert_close(accumulated[k], whole[k], rtol=SPLIT_TOL, atol=SPLIT_TOL * scale)
        torch.testing.assert_close((w0[k] + w1[k]) / 2, whole[k], rtol=SPLIT_TOL, atol=SPLIT_TOL * scale)
    # and the loss itself: the per-token mean over the global batch, by brute force (SFT: mean -log p)
    model = copy.deepcopy(model64)
    batch = collate(ex, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    valid = batch["labels"] != IGNORE
    logp = torch.log_softmax(logits, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    got = forward_loss(model, batch, LossSpec("sft"), 0.5, None, torch.autocast("cpu", enabled=False))[0]
    assert got.dtype == torch.float64
    assert float(got.detach()) == pytest.approx(float(-(logp[valid]).mean()), rel=SPLIT_TOL)


@pytest.mark.parametrize("name,params", [("idft", {"warmup_ratio": 0.2, "transition_ratio": 0.5}), ("sft", {}),
                                         ("eaft", {}), ("idft_hardmask", {"bound": 2.0})])
def test_fused_head_loss_equals_the_logits_path_in_value_and_gradient(tiny_model, tokenizer, name, params):
    """The memory-bounded path (final hidden states + LM head, chunked, recomputed in backward)
    against the model's own logits: the loss, its metrics and every parameter's gradient, the tied
    embedding included. float64 on both sides (SPLIT_TOL)."""
    batch = collate(_batches(tokenizer, 6), tokenizer.pad_token_id)
    off = torch.autocast("cpu", enabled=False)
    results = []
    for fused in (True, False):
        model = float64_copy(tiny_model)
        loss, metrics = forward_loss(model, batch, LossSpec(name, params, 0.8, fused=fused), 0.3, None, off)
        loss.backward()
        results.append((metrics, {k: p.grad for k, p in model.named_parameters()}))
    (m_fused, g_fused), (m_plain, g_plain) = results
    assert m_fused.keys() == m_plain.keys()
    for key in m_plain:
        assert m_fused[key] == pytest.approx(m_plain[key], rel=SPLIT_TOL, abs=SPLIT_TOL), key
    assert tiny_model.config.tie_word_embeddings and g_fused.keys() == g_plain.keys()
    for k in g_plain:
        scale = float(g_plain[k].abs().max()) or 1.0
        torch.testing.assert_close(g_fused[k], g_plain[k], rtol=SPLIT_TOL, atol=SPLIT_TOL * scale)


@pytest.mark.parametrize("fused", [True, False])
def test_packed_micro_batches_equal_padded_ones_in_value_and_gradient(tiny_model, tokenizer, fused):
    """Padding-free packing (collate_packed: one row, position ids restarting per sequence) against the
    padded batch: the same loss, metrics and gradients (float64, SPLIT_TOL), with fewer input tokens;
    and a sequence's scores do not depend on its neighbours (attention stays within each sequence)."""
    from opsft.train.batches import collate_packed
    from opsft.train.step import response_scores

    ex = _batches(tokenizer, 5)
    assert len({len(e) for e in ex}) > 1  # lengths differ: the padded batch has padding
    off = torch.autocast("cpu", enabled=False)
    results = []
    for batch in (collate(ex, tokenizer.pad_token_id), collate_packed(ex)):
        model = float64_copy(tiny_model)
        loss, metrics = forward_loss(model, batch, LossSpec("idft", {}, fused=fused), 0.3, None, off)
        loss.backward()
        results.append((metrics, {k: p.grad for k, p in model.named_parameters()}, batch))
    (m_pad, g_pad, padded), (m_pack, g_pack, packed) = results
    total = sum(len(e) for e in ex)
    assert packed["input_ids"].shape == (1, total) and total < padded["input_ids"].numel()
    for key in m_pad:
        assert m_pack[key] == pytest.approx(m_pad[key], rel=SPLIT_TOL, abs=SPLIT_TOL), key
    for k in g_pad:
        scale = float(g_pad[k].abs().max()) or 1.0
        torch.testing.assert_close(g_pack[k], g_pad[k], rtol=SPLIT_TOL, atol=SPLIT_TOL * scale)
    # the last sequence scored alone and after the others: the same log p
    model = float64_copy(tiny_model)
    with torch.no_grad():
        alone = response_scores(model, collate_packed(ex[-1:]), off, fused=fused)
        after = response_scores(model, packed, off, fused=fused)
    n = alone.logp.shape[1]
    torch.testing.assert_close(after.logp[0, -n:], alone.logp[0], rtol=SPLIT_TOL, atol=SPLIT_TOL)


def test_packing_refuses_pair_losses():
    with pytest.raises(ValueError, match="packing is for the token losses"):
        TrainConfig(packing=True, loss={"name": "dpo"})


def test_train_step_accumulation_gives_the_same_weights(tiny_model, tokenizer):
    """Two AdamW steps with one micro-batch of 8 rows or four of 2: the same curve and weights
    (float64, SPLIT_TOL)."""
    ex = _batches(tokenizer, 8)
    results = []
    model64 = float64_copy(tiny_model)
    for micro in (8, 2):
        model = copy.deepcopy(model64).train()
        opt = make_optimizer(model, 1e-2, 0.01)
        sched = make_scheduler(opt, 2, 0.0)
        curve = []
        for _ in range(2):
            parts = worker_micro_batches(list(range(8)), [len(e) for e in ex], micro, 0, 1)
            mbs = [collate([ex[i] for i in p], tokenizer.pad_token_id) for p in parts]
            curve.append(train_step(model, opt, sched, mbs, LossSpec("idft", {}), 0.0))
        results.append((curve, model.state_dict()))
    (c1, s1), (c2, s2) = results
    for a, b in zip(c1, c2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=SPLIT_TOL) and a["tokens"] == b["tokens"]
        assert a["gamma_mean"] == pytest.approx(b["gamma_mean"], rel=SPLIT_TOL)
        assert 0 <= a["frac_gamma_min"] <= 1 and 0 <= a["frac_gamma_max"] <= 1
    assert c1[1]["logprob_mean"] > c1[0]["logprob_mean"]  # it learns
    assert max(float((s1[k] - model64.state_dict()[k]).abs().max()) for k in s1) > 1e-3  # it moved
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=SPLIT_TOL, atol=SPLIT_TOL)


def _cfg(tmp_path, corpus, model_dir, **kw):
    base = dict(input=corpus, model=model_dir, max_steps=4, global_batch_size=4, micro_batch_size=2, lr=3e-3,
                warmup_ratio=0.25, checkpoint_every=2, seed=5, eval_rows=2,
                loss={"name": "idft", "warmup_ratio": 0.25, "transition_ratio": 0.5})
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_kill_and_resume_continues_exactly(tmp_path, tiny_model, tokenizer, dropout):
    """A crash after step 3, resumed from the step-2 checkpoint, gives the curve and the
    weights of the uninterrupted run, the IDFT lambda schedule included. In float64: the
    checkpoints hold float64 weights and reload as float64 (a float32 reload would be ~1e-9 off).
    With attention dropout too: no RNG state is checkpointed, so the resumed run draws the same
    dropout masks only because every step reseeds torch from (seed, step, rank)."""
    model = copy.deepcopy(tiny_model)
    model.config.attention_dropout = dropout
    model_dir = save_tiny(model, tokenizer, tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "c.jsonl", arithmetic_rows(12))
    full = run_local(_cfg(tmp_path, corpus, model_dir, output_dir=str(tmp_path / "full"), dtype="float64"))
    crashed = tmp_path / "crashed"
    step2 = str(crashed / "checkpoints" / "step-000002")
    with pytest.raises(InjectedFailure):
        run_local(_cfg(tmp_path, corpus, model_dir, output_dir=str(crashed), fail_after_step=3, dtype="float64"))
    assert [m["step"] for m in read_metrics(crashed / "metrics.jsonl")] == [1, 2, 3]
    assert {t.dtype for t in weights(step2).values()} == {torch.float64}
    resumed = run_local(_cfg(tmp_path, corpus, model_dir, output_dir=str(crashed), resume_from=step2,
                             dtype="float64"))
    a, b = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(crashed / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [m["lambda_mean"] for m in a] == [0.0, 0.0, 0.5, 1.0]  # progress 0, .25, .5, .75: rise over .25...75
    for x, y in zip(a, b, strict=True):
        assert (x["lr"], x["lambda_mean"]) == (y["lr"], y["lambda_mean"])  # functions of the step alone
        assert x["loss"] == pytest.approx(y["loss"], rel=SPLIT_TOL)
    assert max_weight_diff(weights(full["checkpoint"]), weights(resumed["checkpoint"])) < SPLIT_TOL
    # one process: strategy none, in the summary, every metrics line and every checkpoint
    assert full["strategy"] == full["final"]["strategy"] == resumed["strategy"] == "none"
    assert {m["strategy"] for m in a + b} == {"none"}
    for folder in (step2, resumed["checkpoint"]):
        trainer = load_trainer_state(folder)["trainer"]
        assert (trainer["strategy"], trainer["world_size"], trainer["shards"]) == ("none", 1, False)
    with pytest.raises(ValueError, match="cannot resume exactly"):
        run_local(_cfg(tmp_path, corpus, model_dir, output_dir=str(tmp_path / "x"), global_batch_size=2,
                       resume_from=step2, dtype="float64"))
    with pytest.raises(ValueError, match="dtype: checkpoint float64 vs now float32"):
        run_local(_cfg(tmp_path, corpus, model_dir, output_dir=str(tmp_path / "y"), resume_from=step2))


def test_the_strategy_is_named_built_and_checked_on_resume(tmp_path):
    """Exactly none, ddp, fsdp: a Ray worker's from the config and its world size (one worker without
    FSDP is none); a Runtime that contradicts its strategy is refused; a checkpoint must record one;
    only an unsharded checkpoint under fsdp cannot resume (a one-line error naming both)."""
    assert STRATEGIES == ("none", "ddp", "fsdp")
    assert [worker_strategy(s, w) for s, w in [("fsdp", 1), ("fsdp", 4), ("ddp", 2), ("ddp", 1)]] == [
        "fsdp", "fsdp", "ddp", "none"]
    for bad in (dict(strategy="zero"), dict(strategy="none", world_size=2), dict(strategy="fsdp"),
                dict(strategy="ddp", world_size=2, save_shards=lambda *a: None)):
        with pytest.raises(ValueError):
            Runtime(**bad)
    cfg = TrainConfig(input="unused")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="replicate"):
        build_runtime("ddp", cfg, cpu, world_size=2)
    ddp = build_runtime("ddp", cfg, cpu, rank=1, world_size=2, replicate=copy.copy)
    assert (ddp.strategy, ddp.wrap, ddp.full_state, ddp.save_shards, ddp.wrapper_casts) == (
        "ddp", copy.copy, plain_state, None, False)
    fsdp = build_runtime("fsdp", cfg, cpu, world_size=2)
    assert fsdp.save_shards is not None and not fsdp.wrapper_casts  # fp32 on the CPU: no bf16 policy
    none = build_runtime("none", cfg, cpu)
    head = torch.nn.Linear(2, 2)
    assert none.wrap(head) is head and none.full_state is plain_state
    with pytest.raises(ValueError, match="records its strategy"):
        save_checkpoint(tmp_path, None, None, {}, {}, {"step": 1})
    # written before the `strategy` entry existed: told by the shards and the world size
    assert [saved_strategy(t) for t in ({}, {"world_size": 2}, {"shards": True, "world_size": 2})] == [
        "none", "ddp", "fsdp"]
    for saved in ({"strategy": "fsdp", "shards": True}, {"strategy": "ddp", "shards": False}):
        for now in STRATEGIES[:2]:
            check_strategy(saved, now)
    check_strategy({"strategy": "fsdp", "shards": True}, "fsdp")
    with pytest.raises(ValueError, match="written under strategy ddp, without FSDP"):
        check_strategy({"strategy": "ddp", "world_size": 2, "shards": False}, "fsdp")


def test_checkpoint_reloads_with_plain_transformers_and_scores_identically(tmp_path, tiny_model, tokenizer):
    from opsft.engines.hf import HFEngine
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "c.jsonl", arithmetic_rows(6))
    cfg = _cfg(tmp_path, corpus, model_dir, output_dir=str(tmp_path / "o"), max_steps=2, eval_rows=0)
    trained = copy.deepcopy(tiny_model)
    out = run_local(cfg, model=trained, tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out["checkpoint"])
    tok2 = AutoTokenizer.from_pretrained(out["checkpoint"])
    assert tok2.chat_template == tokenizer.chat_template and tok2.eos_token_id == tokenizer.eos_token_id
    ex, _ = prepare_examples(arithmetic_rows(3), tokenizer, 256)
    seqs, starts = [e.input_ids for e in ex], [e.response_start for e in ex]
    s_mem = HFEngine(model_and_tokenizer=(trained.eval(), tokenizer)).score_tokens(seqs, starts)
    s_disk = HFEngine(model_and_tokenizer=(reloaded.eval(), tok2)).score_tokens(seqs, starts)
    s_base = HFEngine(model_and_tokenizer=(tiny_model.eval(), tokenizer)).score_tokens(seqs, starts)
    for a, b, c in zip(s_mem, s_disk, s_base, strict=True):
        assert (a.logprob == b.logprob).all() and (a.entropy == b.entropy).all()
        assert not (a.logprob == c.logprob).all()  # the weights did change
    assert math.isfinite(read_metrics(tmp_path / "o" / "metrics.jsonl")[-1]["loss"])


def test_cli_bad_inputs_fail_clearly(tmp_path, tiny_model, tokenizer, capsys):
    model_dir = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    args = ["train", "--local", "--model", model_dir, "--output-dir", str(tmp_path / "o"), "--max-steps", "1",
            "--global-batch-size", "2", "--micro-batch-size", "2"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli_main([*args, "--input", str(empty)]) == 2
    assert "the corpus has no rows" in capsys.readouterr().err
    invalid = write_corpus(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"response": "b"}, {"error": "x"}])
    assert cli_main([*args, "--input", invalid]) == 2
    err = capsys.readouterr().err
    assert "no usable training rows out of 3 (3 invalid" in err
    huge = {"prompt": "Go.", "response": "word " * 600}  # over the tiny model's 512-token context
    mixed = write_corpus(tmp_path / "mixed.jsonl", arithmetic_rows(2) + [huge])
    assert cli_main([*args, "--input", mixed]) == 0
    out = capsys.readouterr().out
    assert '"too_long_skipped": 1' in out and '"used": 2' in out
    assert cli_main([*args, "--input", mixed, "--max-length", "100000"]) == 2
    assert "exceeds the model's context of 512" in capsys.readouterr().err
    assert cli_main([*args, "--input", mixed, "--micro-batch-size", "3"]) == 2
    assert "not a multiple" in capsys.readouterr().err
