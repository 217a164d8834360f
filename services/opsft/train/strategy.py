"""The parallel strategy of a training process, named, and the `Runtime` it builds.

Three strategies, exactly:
- "none": one process (`opsft train --local`, the tests' reference), or a Ray Train job of one worker
  without FSDP: the model as it is, no wrapper, its state read directly;
- "ddp": a replica on every worker (torch DistributedDataParallel, through the wrapper the process group
  gives: Ray Train's `prepare_model`), gradients averaged over the workers;
- "fsdp": parameters, gradients and optimiser state sharded over the workers (FSDP2, opsft.train.fsdp),
  with bf16 mixed precision when the run computes in bf16 (opsft.train.precision.wants_bf16), and
  checkpoints that hold the sharded training state (`shards/`) beside the gathered Hugging Face folder.

Where it is chosen: `opsft train --local` (run_local) is "none"; a Ray Train worker takes
`worker_strategy(cfg.scaling.strategy, world size)` ("fsdp" when the config says fsdp, else "ddp" over
several workers and "none" for one), after the driver resolved `auto` (`fit_strategy`, from opsft plan).
The loop reads `runtime.strategy`, and records it in every step's metrics (`strategy`, so in
metrics.jsonl and in the summary a run returns) and in every checkpoint's trainer state
(opsft.train.checkpoint: `strategy`, `world_size`, `shards`).

    runtime = build_runtime(worker_strategy(cfg.scaling.strategy, world), cfg, device, rank=rank,
                            world_size=world, reduce=all_reduce, replicate=ray.train.torch.prepare_model)
    train_loop(cfg, train, eval_ex, model, tokenizer, runtime)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opsft.train import fsdp
from opsft.train.precision import wants_bf16
from opsft.train.step import Reduce, no_reduce, unwrap

STRATEGIES = ("none", "ddp", "fsdp")


def plain_state(wrapped, optimizer) -> tuple[dict, dict]:
    """(model state, optimiser state) of an unsharded model (strategies none and ddp): the causal LM's
    own state dict, unwrapped from DDP and the LossHead."""
    return unwrap(wrapped).state_dict(), optimizer.state_dict()


@dataclass
class Runtime:
    """What a training process trains with: its strategy and what the strategy decides (rank, world
    size, the sum-over-workers reduction, how the LossHead is wrapped, how the state is read and
    saved), plus where checkpoints go and rank 0's trackers. Build it with `build_runtime`."""

    strategy: str = "none"  # one of STRATEGIES
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reduce: Reduce = no_reduce
    wrap: Callable = lambda model: model  # LossHead -> DDP / FSDP module
    # (wrapped model, optimizer) -> (full model state, optimizer state or None); collective under FSDP
    full_state: Callable = plain_state
    # (wrapped model, optimizer, folder) -> None: this worker's shards of the state (FSDP; a collective)
    save_shards: Callable | None = None
    # the wrapper computes in bf16 itself (FSDP mixed precision): no autocast around the forward
    wrapper_casts: bool = False
    # (metrics, write(folder), write_shards(folder)) -> checkpoint path or None; called on every
    # rank at checkpoint steps: write on one rank, write_shards on every rank
    checkpoint: Callable | None = None
    # rank 0's experiment trackers (opsft.train.tracking.Tracker: MLflow / W&B), fed by the MetricsWriter
    tracker: object | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.strategy == "none" and self.world_size != 1:
            raise ValueError(f"strategy none is one process, not {self.world_size} workers")
        if (self.strategy == "fsdp") != (self.save_shards is not None):
            raise ValueError("save_shards (the sharded checkpoint state) goes with strategy fsdp and only with it")


def worker_strategy(requested: str, world_size: int) -> str:
    """The strategy of a Ray Train worker: fsdp when the config asks for it (TrainConfig.scaling.strategy,
    `auto` resolved by fit_strategy), else ddp over several workers and none for one (no replica to
    average with: Ray's prepare_model would not wrap it either)."""
    if requested == "fsdp":
        return "fsdp"
    return "ddp" if world_size > 1 else "none"


def build_runtime(strategy: str, cfg, device: torch.device, *, rank: int = 0, world_size: int = 1,
                  reduce: Reduce = no_reduce, replicate: Callable | None = None, checkpoint: Callable | None = None,
                  tracker=None) -> Runtime:
    """The Runtime of `strategy` for this process. none: no wrapper. ddp: `replicate(head)`, the process
    group's DDP wrapper (under Ray Train: ray.train.torch.prepare_model(head, parallel_strategy="ddp")).
    fsdp: opsft.train.fsdp.shard over the default process group, bf16 mixed precision when the run
    computes in bf16 (cfg.autocast on this device; never for dtype float64), the gathered state and the
    sharded checkpoints of opsft.train.fsdp."""
    common = dict(strategy=strategy, rank=rank, world_size=world_size, device=device, reduce=reduce,
                  checkpoint=checkpoint, tracker=tracker)
    if strategy == "fsdp":
        bf16 = cfg.dtype != "float64" and wants_bf16(device, cfg.autocast)
        return Runtime(**common, wrap=lambda m: fsdp.shard(m, device, bf16), full_state=fsdp.full_model_state,
                       save_shards=fsdp.save_shards, wrapper_casts=bf16)
    if strategy == "ddp":
        if replicate is None:
            raise ValueError("strategy ddp needs the process group's DDP wrapper (replicate)")
        return Runtime(**common, wrap=replicate, full_state=plain_state)
    return Runtime(**common)


def fit_strategy(cfg, model_path: str):
    """cfg with scaling.strategy auto resolved (ddp where the whole training state fits a GPU, else fsdp:
    opsft.plan.choose_strategy), after opsft plan's check of the workers' GPUs (PlanError when they cannot
    fit). Without a GPU to size against, auto is ddp on CPU or one worker and fsdp on several GPU workers.
    The driver of a Ray run calls it; each worker then takes worker_strategy of the result."""
    from opsft import plan

    if cfg.scaling.use_gpu:
        gpu_bytes, _ = plan.gpu_memory()
        try:
            shape = plan.read_shape(model_path)
        except (OSError, ValueError, KeyError):
            shape = None
        if gpu_bytes is not None and shape is not None:
            strategy = plan.choose_strategy(cfg, shape, gpu_bytes)
            cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"strategy": strategy})})
            plan.preflight(cfg, model_path)
            return cfg
    if cfg.scaling.strategy == "auto":
        strategy = "fsdp" if cfg.scaling.use_gpu and cfg.scaling.num_workers > 1 else "ddp"
        cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"strategy": strategy})})
    return cfg
