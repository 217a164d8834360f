"""The training loop, shared by the Ray Train workers (opsft.train.ray_job) and the
in-process run (`run_local`, one worker, no Ray: the reference the tests compare with).

What differs between the two is a `Runtime` (opsft.train.strategy): the named parallel strategy
(none, ddp or fsdp) and what it decides (rank, world size, the sum-over-workers reduction, how the
model is wrapped, how the state is read and saved), and where a checkpoint goes (a folder under
output_dir, or ray.train.report). The loop records the strategy in every step's metrics and every
checkpoint. The loop itself: for every
optimiser step, take this worker's micro-batches of the deterministic global batch,
call train_step, log, evaluate and checkpoint on schedule. With a pair loss (dpo, simpo) the
examples are pairs (opsft.train.pairs); for dpo the initial model's reference log-probs are
computed before the first step and kept in every checkpoint (a resume reuses them).

    from opsft.config import TrainConfig
    run_local(TrainConfig(input="corpus.jsonl", output_dir="out", max_steps=20, global_batch_size=8))
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import torch

from opsft.data.chat import model_max_length
from opsft.data.reader import read_rows
from opsft.train.batches import (
    BatchPlan,
    TrainExample,
    check_batch_sizes,
    collate,
    collate_packed,
    prepare_examples,
    split_eval,
    worker_micro_batches,
)
from opsft.train.checkpoint import (
    check_compatible,
    check_strategy,
    load_trainer_state,
    restore_training,
    save_checkpoint,
    saved_strategy,
)
from opsft.train.fsdp import load_shards
from opsft.train.heldout import evaluate
from opsft.train.metrics import MetricsWriter
from opsft.train.optim import make_optimizer, make_scheduler
from opsft.train.pairs import collate_pairs, evaluate_pairs, prepare_pairs, reference_logps, with_reference
from opsft.train.precision import autocast_context, to_dtype, torch_dtype
from opsft.train.step import LossHead, LossSpec, train_step
from opsft.train.strategy import Runtime, build_runtime

log = logging.getLogger(__name__)
FAIL_MARKER = ".fail_after_step_done"


class InjectedFailure(RuntimeError):
    """Raised once by `fail_after_step` (testing crash recovery)."""


def prepare_data(cfg, tokenizer, max_length: int) -> tuple[list[TrainExample], list[TrainExample], dict]:
    """Train and eval examples from cfg.input / cfg.eval_input, with counted skips; raises a
    clear error when nothing is left to train on."""
    prepare = prepare_pairs if cfg.loss.pairs else prepare_examples
    rows = read_rows(cfg.input)
    if not rows:
        raise ValueError(f"{cfg.input}: the corpus has no rows")
    examples, stats = prepare(rows, tokenizer, max_length, cfg.overlong)
    if not examples:
        built = getattr(stats, "from_rewrite", None)
        made = f"; pairs made from a rewrite output: {built}" if built else ""
        raise ValueError(f"{cfg.input}: no usable training rows out of {stats.rows} ({stats.error_rows} invalid "
                         f"{stats.errors}, {stats.too_long_skipped} longer than {max_length} tokens){made}")
    if cfg.eval_input:
        eval_ex, eval_stats = prepare(read_rows(cfg.eval_input), tokenizer, max_length, cfg.overlong)
        train = examples
        summary = {"train": stats.as_dict(), "eval": eval_stats.as_dict()}
    else:
        train, eval_ex = split_eval(examples, cfg.eval_rows, cfg.seed)
        summary = {"train": stats.as_dict(), "eval_held_out": len(eval_ex)}
    return train, eval_ex, summary


def resolve_max_length(cfg, model_config, tokenizer) -> int:
    limit = model_max_length(model_config, tokenizer)
    if cfg.max_length is None:
        return limit
    if cfg.max_length > limit:
        raise ValueError(f"max_length {cfg.max_length} exceeds the model's context of {limit} tokens")
    return cfg.max_length


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of (step, rank): any randomness in the model (dropout) is a function of
    the position in training, so resuming needs no per-rank RNG bookkeeping."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**63)


def dpo_reference(cfg, train: list, eval_ex: list, model, pad_id: int, runtime: Runtime, autocast,
                  resume_state: dict | None) -> dict[str, torch.Tensor]:
    """{"train": [n, 2], "eval": [m, 2]} reference log-prob sums for dpo: those saved in the
    checkpoint when resuming (never recomputed from resumed weights), else computed now from
    `model`, the initial model, before any step (split over the workers, then summed)."""
    if resume_state is not None:
        saved = resume_state.get("reference_logps")
        if saved is None:
            raise ValueError("this checkpoint has no dpo reference log-probs (it was not written by a dpo run): "
                             "start a new dpo run from it with --model instead of --resume-from")
        if saved["train"].shape[0] != len(train) or saved["eval"].shape[0] != len(eval_ex):
            raise ValueError("the checkpoint's dpo reference log-probs do not match this run's pairs; use the same "
                             "corpus, eval split and max_length")
        return {k: v.to(runtime.device) for k, v in saved.items()}
    kw = dict(micro_batch_size=cfg.micro_batch_size, rank=runtime.rank, world_size=runtime.world_size,
              reduce=runtime.reduce, autocast=autocast, fused=fused_head(cfg))
    return {"train": reference_logps(model, train, pad_id, runtime.device, **kw),
            "eval": reference_logps(model, eval_ex, pad_id, runtime.device, **kw)}


def fused_head(cfg) -> bool:
    """The memory-bounded loss (hidden states + LM head, chunked) unless configured off; the LossHead
    runs it inside the forward, so FSDP has the head's weight whole when it is used."""
    return cfg.fused_head


def train_loop(cfg, train, eval_ex: list[TrainExample], model, tokenizer, runtime: Runtime,
               resume_state: dict | None = None) -> dict:
    """Train `model` (unwrapped, on runtime.device; under FSDP maybe on the meta device, rank 0
    excepted) from step 0 or from resume_state; returns the last step's metrics (`strategy` among them:
    runtime.strategy) plus `checkpoint` (the last checkpoint path, rank 0). `train`: a list of
    TrainExamples (PairExamples with a pair loss), or a ShardedCorpus (this worker's part of the corpus,
    opsft.train.worker_corpus; its `fetch` is a collective)."""
    W, rank = runtime.world_size, runtime.rank
    plan = BatchPlan(len(train), cfg.global_batch_size, cfg.seed)
    total = plan.total_steps(cfg.epochs, cfg.max_steps)
    check_batch_sizes(cfg.global_batch_size, cfg.micro_batch_size, W)
    # train: a list of examples, or a ShardedCorpus (each worker holds a shard; `fetch` is a collective)
    sharded = hasattr(train, "fetch")
    lengths = train.lengths if sharded else [len(e) for e in train]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data_position = {"n_examples": len(train), "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
                     "total_steps": total, "steps_per_epoch": plan.steps_per_epoch, "dtype": cfg.dtype}
    if resume_state is not None:
        check_compatible(resume_state["trainer"], data_position)
        check_strategy(resume_state["trainer"], runtime.strategy)
    off = cfg.dtype == "float64" or runtime.wrapper_casts
    autocast = autocast_context(runtime.device, "off" if off else cfg.autocast)
    if cfg.loss.pairs:
        batch_of = collate_pairs
    elif cfg.packing:
        batch_of = lambda examples, pad_id, device: collate_packed(examples, device)  # noqa: E731
    else:
        batch_of = collate

    model.train()
    if cfg.gradient_checkpointing:  # recompute each decoder layer in the backward pass (before any wrapping)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = runtime.wrap(LossHead(model))
    optimizer = make_optimizer(wrapped, cfg.lr, cfg.weight_decay, cfg.adam_betas, cfg.adam_eps)
    scheduler = make_scheduler(optimizer, total, cfg.warmup_ratio, cfg.min_lr_ratio)
    reference = None
    if cfg.loss.name == "dpo":  # before any step: the initial model (sharded under FSDP)
        reference = dpo_reference(cfg, train, eval_ex, wrapped, pad_id, runtime, autocast, resume_state)
        train, eval_ex = with_reference(train, reference["train"]), with_reference(eval_ex, reference["eval"])
    start = 0
    if resume_state is not None:
        if resume_state["trainer"].get("shards"):  # an FSDP checkpoint: model and optimiser from its shards
            load_shards(wrapped, optimizer, resume_state["folder"])
        start = restore_training(resume_state, optimizer, scheduler)
        saved = resume_state["trainer"]
        log.info("resumed at step %d of %d from a checkpoint of strategy %s over %s workers (now %s over %d)", start,
                 total, saved_strategy(saved), saved.get("world_size", "?"), runtime.strategy, W)
    spec = LossSpec(cfg.loss.name, cfg.loss.params(), cfg.loss.temperature, fused_head(cfg))
    writer = MetricsWriter(cfg.output_dir, start, tracker=runtime.tracker) if rank == 0 and cfg.output_dir else None
    last: dict = {"step": start, "strategy": runtime.strategy}
    try:
        for step in range(start, total):
            torch.manual_seed(step_seed(cfg.seed, step, rank))
            indices = plan.step_indices(step)
            parts = worker_micro_batches(indices, lengths, cfg.micro_batch_size, rank, W)
            # every worker runs the same number of forward passes (DDP syncs buffers in each one):
            # on a short last batch the ones without rows run a no-token micro-batch
            rounds = -(-len(indices) // (cfg.micro_batch_size * W))
            parts += [[]] * (rounds - len(parts))
            rows = dict(zip(indices, train.fetch(indices), strict=True)) if sharded else train  # the step's rows
            batches = [batch_of([rows[i] for i in part], pad_id, runtime.device) for part in parts]
            progress = step / total
            metrics = train_step(wrapped, optimizer, scheduler, batches, spec, progress, world_size=W,
                                 reduce=runtime.reduce, grad_clip=cfg.grad_clip, autocast=autocast)
            done = step + 1
            metrics.update(step=done, progress=progress, epoch=step // plan.steps_per_epoch,
                           strategy=runtime.strategy)
            if eval_ex and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total):
                kw = dict(micro_batch_size=cfg.micro_batch_size, rank=rank, world_size=W, reduce=runtime.reduce,
                          autocast=autocast)
                if cfg.loss.pairs:
                    metrics.update(evaluate_pairs(wrapped, eval_ex, spec, pad_id, runtime.device, **kw))
                else:
                    metrics.update(evaluate(wrapped, eval_ex, spec, done / total, pad_id, runtime.device, **kw))
            if writer:
                writer.write(metrics)
            if rank == 0:
                log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", done, total, metrics["loss"], metrics["lr"],
                         metrics["tokens_per_s"])
            last = metrics
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total:
                model_state, optim_state = runtime.full_state(wrapped, optimizer)
                trainer = {**data_position, "step": done, "loss": cfg.loss.model_dump(), "world_size": W,
                           "strategy": runtime.strategy, "shards": runtime.strategy == "fsdp", "metrics": metrics}

                def write(folder, model_state=model_state, optim_state=optim_state, trainer=trainer):
                    extra = None if reference is None else {"reference_logps": {k: v.cpu() for k, v in
                                                                                reference.items()}}
                    save_checkpoint(folder, model, tokenizer, optim_state, scheduler.state_dict(), trainer,
                                    model_state=model_state, extra=extra)

                def write_shards(folder):
                    if runtime.save_shards is not None:
                        runtime.save_shards(wrapped, optimizer, folder)

                if runtime.checkpoint is not None:
                    last["checkpoint"] = runtime.checkpoint(metrics, write, write_shards)
            _maybe_fail(cfg, done, rank, W)
    finally:
        if writer:
            writer.close()
    return last


def _maybe_fail(cfg, done: int, rank: int = 0, world_size: int = 1) -> None:
    """testing: after step `fail_after_step`, once per output_dir: raise on every worker, or (fail_mode
    kill) SIGKILL the last worker's process, as the OOM killer or a lost node would."""
    if cfg.fail_after_step != done or not cfg.output_dir:
        return
    if cfg.fail_mode == "kill" and rank != world_size - 1:
        return
    marker = Path(cfg.output_dir) / FAIL_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # it happened already: the resumed run goes on
    marker.write_text(str(done))
    if cfg.fail_mode == "kill":
        log.warning("fail_after_step=%d: killing worker %d (testing recovery)", done, rank)
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFailure(f"fail_after_step={done}: injected failure (testing recovery)")


# ---------------------------------------------------------------------------- one process, no Ray


def local_checkpointer(output_dir: str | Path) -> Callable:
    def checkpoint(metrics: dict, write, write_shards) -> str:
        folder = Path(output_dir) / "checkpoints" / f"step-{int(metrics['step']):06d}"
        write_shards(folder)
        write(folder)
        return str(folder)

    return checkpoint


def load_for_training(cfg, device, model_source: str, checkpoint: str | None = None, meta: bool = False):
    """(model, tokenizer, resume_state) on `device` in cfg.dtype, for one process or one worker:
    from `checkpoint` (a restarted worker's last checkpoint) when given, else from
    cfg.resume_from, with its trainer state; else `model_source` fresh (resume_state None).
    meta: the model's structure only, on the meta device (no weights read, no memory): FSDP workers
    other than rank 0, which receive their shards from rank 0 (opsft.train.fsdp.shard)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from opsft.models import load_model, resolve_model

    folder = checkpoint or (resolve_model(cfg.resume_from, everything=True) if cfg.resume_from else None)
    resume_state = load_trainer_state(folder) if folder else None
    if resume_state is not None:
        resume_state["folder"] = str(folder)  # an FSDP checkpoint's shards are read from it after sharding
    if meta:
        path = resolve_model(folder or model_source)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch_dtype(cfg.dtype))
        return to_dtype(model, cfg.dtype), AutoTokenizer.from_pretrained(path), resume_state
    model, tokenizer = load_model(folder or model_source, dtype=torch_dtype(cfg.dtype), device=str(device))
    return to_dtype(model.to(device), cfg.dtype), tokenizer, resume_state


def run_local(cfg, model=None, tokenizer=None) -> dict:
    """Train in this process on one device (the `opsft train --local` path and the test
    reference). Resumes from cfg.resume_from when set. A `model` given is trained in place,
    moved to the device and to cfg.dtype. Logs to the configured trackers (cfg.tracking: params, metrics,
    the final checkpoint; the run ends FINISHED, or FAILED when training raises). Returns a summary: data
    counts, the last step's metrics (`final`), `checkpoint` and `strategy` (none: one process)."""
    from opsft.train.tracking import check_available, tracked_run

    check_available(cfg)

    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    if model is None or cfg.resume_from:
        model, tokenizer, resume_state = load_for_training(cfg, device, cfg.model)
    else:
        model, resume_state = to_dtype(model.to(device), cfg.dtype), None
    train, eval_ex, data_summary = prepare_data(cfg, tokenizer, resolve_max_length(cfg, model.config, tokenizer))
    with tracked_run(cfg) as tracker:
        runtime = build_runtime("none", cfg, device, tracker=tracker,
                                checkpoint=local_checkpointer(cfg.output_dir) if cfg.output_dir else None)
        last = train_loop(cfg, train, eval_ex, model, tokenizer, runtime, resume_state)
        if tracker is not None:
            tracker.log_checkpoint(last.get("checkpoint"))
    return {"data": data_summary, "final": last, "checkpoint": last.get("checkpoint"), "strategy": runtime.strategy}
