"""On the real SmolLM2-135M-Instruct, a few optimiser steps on a small corpus lower the
training loss (the loss being trained, measured on the corpus before and after) and the
NLL, for every loss name. In-process (the Ray path is covered by test_train_ray.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from opsft.config import TrainConfig
from opsft.data.corpus import write_rows
from opsft.train.batches import prepare_examples
from opsft.train.heldout import evaluate
from opsft.train.loop import run_local
from opsft.train.step import LossSpec

ROWS = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris, on the Seine."},
    {"prompt": "Name a primary colour.", "response": "Blue is a primary colour, like red and yellow."},
    {"prompt": "What is 7 times 6?", "response": "7 times 6 is 42, because 7 x 6 = 42."},
    {"prompt": "Say hello in French.", "response": "Bonjour! That is hello in French."},
]


@pytest.fixture(scope="module")
def real(model_dir):
    from opsft.models import load_model

    return load_model(model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sft", "dft", "eaft", "idft", "idft_hardmask"])
def test_a_few_steps_lower_the_training_loss(tmp_path, real, loss):
    base, tokenizer = real
    model = copy.deepcopy(base)
    write_rows(ROWS, tmp_path / "c.jsonl")
    cfg = TrainConfig(input=str(tmp_path / "c.jsonl"), loss={"name": loss},  # no output_dir: no 1.6 GB checkpoint
                      max_steps=8, global_batch_size=2, micro_batch_size=2, lr=1e-4, seed=0)
    examples, _ = prepare_examples(ROWS, tokenizer, 256)
    spec = LossSpec(loss, cfg.loss.params())

    def measure(m):
        return evaluate(m, examples, spec, 1.0, tokenizer.pad_token_id, torch.device("cpu"))

    before = measure(model)
    out = run_local(cfg, model=model, tokenizer=tokenizer)
    after = measure(model)
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_nll"] < before["eval_nll"] - 0.1
    assert out["final"]["step"] == 8
