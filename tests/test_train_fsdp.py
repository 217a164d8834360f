"""FSDP2 training (opsft.train.fsdp): two Ray workers that shard the model (one unit per decoder layer)
reproduce the one-process run through a crash and a resume from their distributed checkpoint; the
gathered Hugging Face checkpoint loads; an FSDP checkpoint resumes in one process (DCP reshards 2
workers' shards to 1); weight decay is decided by name. All float64, compared within SPLIT_TOL
(train_helpers: why float64, and the bound).

The same run under DDP is tests/test_train_ray.py (the same settings, against the same one-process
run within the same bound): so FSDP = one process = DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opsft.train.fsdp import SHARDS, decoder_layers
from opsft.train.optim import make_optimizer, no_decay_names
from opsft.train.step import LossHead
from train_helpers import (
    SPLIT_TOL,
    arithmetic_rows,
    float64_copy,
    max_weight_diff,
    one_process_and_two_crashing_workers,
    save_tiny,
    weights,
    write_corpus,
)

COMMON = dict(loss={"name": "idft"}, max_steps=4, global_batch_size=4, lr=3e-3, warmup_ratio=0.25, eval_rows=2,
              checkpoint_every=2, seed=3)


def test_weight_decay_is_decided_by_name_the_same_wrapped_or_not(tiny_model):
    """The no-decay set is the biases and norm weights (for a Llama: exactly its 1-d parameters), under
    a LossHead and unwrapped alike; the embeddings (a matrix) decay."""
    bare = no_decay_names(tiny_model)
    expected = {n for n, p in tiny_model.named_parameters() if p.ndim < 2}
    assert bare == expected and any("norm" in n for n in bare)
    head = LossHead(tiny_model)
    assert no_decay_names(head) == {f"lm.{n}" for n in expected}
    opt = make_optimizer(head, 1e-3, 0.1)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(tiny_model.model.embed_tokens.weight) in decayed
    assert all(id(p) not in decayed for n, p in tiny_model.named_parameters() if n in expected)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_decoder_layers_are_the_no_split_modules(tiny_model):
    layers = decoder_layers(tiny_model)
    assert layers == list(tiny_model.model.layers)
    with pytest.raises(ValueError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_two_fsdp_workers_with_a_crash_equal_one_process_and_resume_anywhere(tmp_path, tiny_model, tokenizer,
                                                                           ray_local):
    model_dir = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "c.jsonl", arithmetic_rows(15) + [{"prompt": "no response"}])
    common = dict(COMMON, input=corpus, model=model_dir)
    ref, out, one, two = one_process_and_two_crashing_workers(
        tmp_path, **common,
        ray_extra={"scaling": {"num_workers": 2, "strategy": "fsdp"}, "gradient_checkpointing": True})
    for a, b in zip(one, two, strict=True):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=SPLIT_TOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=SPLIT_TOL)
        assert b["phi_mean"] == pytest.approx(a["phi_mean"], rel=SPLIT_TOL, abs=SPLIT_TOL * 10)
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=SPLIT_TOL)
    final = Path(out["checkpoint"])
    # the gathered HF checkpoint: whole tensors equal to the one-process run's
    assert max_weight_diff(weights(ref["checkpoint"]), weights(final)) < SPLIT_TOL
    assert max_weight_diff(weights(model_dir), weights(final)) > 1e-3  # it did train
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float64)
    assert loaded.model.embed_tokens.weight.shape == tiny_model.model.embed_tokens.weight.shape
    # both workers' shards are in the checkpoint (Ray merged the two uploads), with DCP's metadata
    files = sorted(p.name for p in (final / SHARDS).iterdir())
    assert ".metadata" in files and {"__0_0.distcp", "__1_0.distcp"} <= set(files)
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["shards"] and state["strategy"] == "fsdp" and state["world_size"] == 2
    assert out["strategy"] == "fsdp" and {m["strategy"] for m in two} == {"fsdp"}

    # resume the step-2 FSDP checkpoint in one process: DCP loads 2 workers' shards into a whole model
    from opsft.config import TrainConfig
    from opsft.train.loop import run_local
    from opsft.train.metrics import read_metrics

    step2 = final.parent / "checkpoint-000002"
    assert step2.exists()
    resumed = run_local(TrainConfig(**common, dtype="float64", micro_batch_size=4, resume_from=str(step2),
                                    output_dir=str(tmp_path / "resumed")))
    again = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in again] == [3, 4]
    # the fsdp checkpoint resumed under strategy none: each records its own
    assert resumed["strategy"] == "none" and {m["strategy"] for m in again} == {"none"}
    state = json.loads((Path(resumed["checkpoint"]) / "trainer_state.json").read_text())
    assert (state["strategy"], state["shards"], state["world_size"]) == ("none", False, 1)
    for a, b in zip(one[2:], again, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=SPLIT_TOL)
    assert max_weight_diff(weights(ref["checkpoint"]), weights(resumed["checkpoint"])) < SPLIT_TOL


def test_a_ddp_checkpoint_is_not_resumed_under_fsdp(tmp_path, tiny_model, tokenizer):
    """An unsharded optimiser state cannot be loaded into FSDP's shards: a clear error, before any step."""
    from opsft.config import TrainConfig
    from opsft.train.batches import prepare_examples
    from opsft.train.loop import load_for_training, local_checkpointer, train_loop
    from opsft.train.strategy import Runtime

    model_dir = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    rows = arithmetic_rows(4)
    cfg = TrainConfig(input="unused", model=model_dir, output_dir=str(tmp_path / "a"), max_steps=1,
                      global_batch_size=4, dtype="float64")
    examples, _ = prepare_examples(rows, tokenizer, 128)
    model, tok, _ = load_for_training(cfg, torch.device("cpu"), model_dir)
    out = train_loop(cfg, examples, [], model, tok, Runtime(checkpoint=local_checkpointer(cfg.output_dir)))
    assert out["strategy"] == "none"
    cfg2 = cfg.model_copy(update={"resume_from": out["checkpoint"]})
    model, tok, state = load_for_training(cfg2, torch.device("cpu"), model_dir)
    assert state["trainer"]["strategy"] == "none" and not state["trainer"]["shards"]
    fake_fsdp = Runtime(strategy="fsdp", save_shards=lambda *a: None)
    with pytest.raises(ValueError, match="written under strategy none, without FSDP"):
        train_loop(cfg2, examples, [], model, tok, fake_fsdp, state)


def test_gradient_checkpointing_recomputes_each_layer_and_gives_the_same_gradient(tiny_model, tokenizer):
    """With gradient_checkpointing the forward pass saves under half the activations for backward,
    every layer's projections run twice per step (forward, then again in the backward pass), and the
    gradient is the same (float64: the recomputation is the same arithmetic)."""
    from opsft.train.batches import collate, prepare_examples
    from opsft.train.step import LossSpec, forward_loss

    examples, _ = prepare_examples(arithmetic_rows(3), tokenizer, 128)
    batch = collate(examples, tokenizer.pad_token_id)
    grads, calls, saved = [], [], []
    for checkpointing in (False, True):
        model = float64_copy(tiny_model).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        count, numel = [0], [0]
        model.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda *a, c=count: c.__setitem__(0, c[0] + 1))

        weights = {q.data_ptr() for q in model.parameters()}

        def pack(t, n=numel, weights=weights):  # activations saved for backward (not the weights themselves)
            n[0] += 0 if t.data_ptr() in weights else t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = forward_loss(LossHead(model), batch, LossSpec("idft"), 0.5, 1.0, None)
        loss.backward()
        calls.append(count[0])
        saved.append(numel[0])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert calls == [1, 2]
    assert saved[1] < saved[0] / 2
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-12)


def _fsdp_worker(rank: int, port: int, config, out: str) -> None:
    """One of two gloo processes: shard an untied fp32 Llama with bf16 mixed precision, take one
    optimiser step, and record what each worker holds and computes with."""
    import os

    import torch.distributed as dist
    from opsft.train.fsdp import shard
    from opsft.train.step import LossSpec, forward_loss
    from torch.distributed.fsdp import FSDPModule
    from transformers import LlamaForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    whole = {n: p.numel() for n, p in model.named_parameters()}
    # FSDP cuts dim 0 into chunks of ceil(rows / 2): the two halves differ by at most one row each
    row_sizes = sum(p.numel() // p.shape[0] for p in model.parameters())
    head = shard(LossHead(model), torch.device("cpu"), bf16=True)
    seen = []
    model.model.layers[0].mlp.up_proj.register_forward_pre_hook(
        lambda m, a: seen.append((str(m.weight.dtype), str(a[0].dtype))))
    ids = torch.randint(0, config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    opt = make_optimizer(head, 1e-3, 0.1)
    loss, _ = forward_loss(head, batch, LossSpec("sft"), 0.0, 1.0, None)
    loss.backward()
    opt.step()
    local = {n: p.to_local().numel() for n, p in head.named_parameters()}
    result = {
        "units": sorted(n for n, m in head.named_modules() if isinstance(m, FSDPModule)),
        "whole": sum(whole.values()), "local": sum(local.values()),
        "param_dtypes": sorted({str(p.dtype) for p in head.parameters()}),
        "grad_dtypes": sorted({str(p.grad.dtype) for p in head.parameters() if p.grad is not None}),
        "seen": seen, "loss": float(loss), "row_sizes": row_sizes,
        "decay_groups": [len(g["params"]) for g in opt.param_groups],
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_shards_every_unit_and_computes_in_bf16_with_fp32_shards(tmp_path, tiny_model):
    """Two gloo processes: the units are the decoder layers, the (untied) embeddings and the root;
    each worker holds half of every parameter; the forward runs on bf16 weights and activations while
    the shards, their gradients and hence the optimiser stay float32; both workers see the same loss."""
    import socket

    import torch.multiprocessing as mp

    config = tiny_model.config.__class__(**{**tiny_model.config.to_dict(), "tie_word_embeddings": False})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_fsdp_worker, args=(port, config, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["units"] == ["", "lm.model.embed_tokens", "lm.model.layers.0", "lm.model.layers.1"]
    assert r0["local"] + r1["local"] == r0["whole"] and abs(r0["local"] - r1["local"]) <= r0["row_sizes"]
    assert r0["param_dtypes"] == ["torch.float32"] and r0["grad_dtypes"] == ["torch.float32"]
    assert r0["seen"] == [["torch.bfloat16", "torch.bfloat16"]]
    assert r0["loss"] == r1["loss"]
    n_layers, norms_per_layer = 2, 2
    assert r0["decay_groups"][1] == n_layers * norms_per_layer + 1  # the norms; the final norm too
