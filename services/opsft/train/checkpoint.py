"""Checkpoints: a Hugging Face model folder that transformers and vLLM load as is
(safetensors, config, tokenizer with its chat template) plus `trainer_state.pt` (optimiser and
scheduler state, the trainer metadata, and a dpo run's reference log-probs) and a readable
`trainer_state.json` (the trainer metadata), so that a run resumed from it continues exactly where
it stopped, the IDFT lambda schedule included (progress = step / total_steps is restored with step).
No RNG state is saved (restore_training says why).

The trainer metadata: the data position (DATA_KEYS: n_examples, global_batch_size, seed,
total_steps, dtype; plus steps_per_epoch), `step` (optimiser steps done), `loss` (the loss config),
the parallel strategy it was written under (`strategy`: none, ddp or fsdp, opsft.train.strategy),
`world_size`, `shards` (true under fsdp) and the step's `metrics`. Under fsdp the folder also holds
`shards/`, the sharded model and optimiser state (opsft.train.fsdp), and trainer_state.pt's
optimiser entry is None. Which strategy resumes which checkpoint: check_strategy.

    save_checkpoint(folder, model, tokenizer, optimizer.state_dict(), scheduler.state_dict(),
                    {"step": 10, "strategy": "none", ...})
    state = load_trainer_state(folder); check_strategy(state["trainer"], "ddp")
    restore_training(state, optimizer, scheduler)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opsft.train.strategy import STRATEGIES

STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
# The data position is only meaningful for the same examples, batch size and seed; an exact
# continuation also needs the same parameter dtype (TrainConfig.dtype).
DATA_KEYS = ("n_examples", "global_batch_size", "seed", "total_steps", "dtype")
SAVED_DEFAULTS = {"dtype": "float32"}  # checkpoints written before the key existed


def save_checkpoint(folder: str | Path, model, tokenizer, optimizer_state: dict, scheduler_state: dict,
                    trainer: dict, model_state: dict | None = None, extra: dict | None = None) -> Path:
    """Write the HF folder and the trainer state. `model` is the unwrapped HF model (its
    config and save logic); `model_state` overrides its weights (e.g. gathered from FSDP);
    `extra` adds entries to trainer_state.pt only (e.g. dpo's reference log-probs). `trainer` must
    name the strategy the state was written under (`strategy`, one of STRATEGIES)."""
    if trainer.get("strategy") not in STRATEGIES:
        raise ValueError(f"a checkpoint records its strategy ({', '.join(STRATEGIES)}), got "
                         f"{trainer.get('strategy')!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True, state_dict=model_state)
    tokenizer.save_pretrained(folder)
    torch.save({**(extra or {}), "optimizer": optimizer_state, "scheduler": scheduler_state, "trainer": trainer},
               folder / STATE_FILE)
    (folder / STATE_JSON).write_text(json.dumps(trainer, indent=2, default=str))
    return folder


def load_trainer_state(folder: str | Path) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder}: not an opsft checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=False)


def check_compatible(saved: dict, current: dict) -> None:
    """Raise when the checkpoint's data position does not apply to this run's data."""
    saved = {**SAVED_DEFAULTS, **saved}
    bad = {k: (saved.get(k), current.get(k)) for k in DATA_KEYS if saved.get(k) != current.get(k)}
    if bad:
        detail = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in bad.items())
        raise ValueError(f"cannot resume exactly: the run differs from the checkpoint ({detail}); use the same "
                         "corpus, global_batch_size, seed, epochs/max_steps, dtype")


def saved_strategy(trainer: dict) -> str:
    """The strategy a checkpoint was written under: its `strategy` entry; for a checkpoint written
    before the entry existed, fsdp when it holds shards, else ddp over several workers, else none."""
    if trainer.get("strategy"):
        return str(trainer["strategy"])
    return "fsdp" if trainer.get("shards") else "ddp" if int(trainer.get("world_size", 1)) > 1 else "none"


def check_strategy(trainer: dict, strategy: str) -> None:
    """Raise when a run of `strategy` cannot take this checkpoint's training state. An fsdp checkpoint's
    shards load under any strategy and number of workers (DCP reshards, opsft.train.fsdp.load_shards);
    none and ddp write the same whole state, so each resumes the other; a whole optimiser state cannot be
    loaded into fsdp's shards."""
    saved = saved_strategy(trainer)
    if strategy == "fsdp" and not trainer.get("shards"):
        raise ValueError(f"this checkpoint was written under strategy {saved}, without FSDP (its optimiser state is "
                         "unsharded): resume it with strategy ddp or --local (an FSDP checkpoint resumes under fsdp, "
                         "ddp or --local)")


def restore_training(state: dict, optimizer, scheduler) -> int:
    """Load optimiser and scheduler state; returns the optimiser steps already done. No RNG state
    is saved or restored: the data order comes from seeded generators of its own (opsft.train.batches.BatchPlan),
    and torch is reseeded at every step from (seed, step, rank) (loop.step_seed), so a resumed
    run draws what the uninterrupted one drew (checkpoints of older versions hold an unused
    `rng` entry)."""
    if state["optimizer"] is not None:  # None: an FSDP checkpoint, whose optimiser state is in its shards
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["trainer"]["step"])
