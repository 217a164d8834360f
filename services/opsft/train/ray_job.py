"""`opsft train` as a Ray Train job: a thin TorchTrainer around opsft.train.loop.train_loop.

Driver (token losses): Ray Data reads the corpus in ranges and tokenises it in a map stage on the
cluster (opsft.train.ray_data.corpus_dataset), materialised in the object store; the driver streams
back only the per-row counts (corpus_summary: the data summary, and the clear errors of an empty
or unusable corpus before any worker starts), splits the dataset into one part per worker
(worker_datasets: "train_0", "train_1", ...) and starts a TorchTrainer with the ScalingConfig from
TrainConfig.scaling. Workers: read their part (ray.train.get_dataset_shard), build a ShardedCorpus
(opsft.train.worker_corpus: the same numbering, held-out split and lengths as one process, from
metadata the workers exchange), load the model (or the checkpoint Ray hands back after a failure, or
cfg.resume_from), take their named strategy (opsft.train.strategy.worker_strategy: fsdp, ddp, or
none for one worker; the driver resolved `auto` first, fit_strategy), wrap the model as it says (DDP
via ray.train.torch.prepare_model, or FSDP2 via opsft.train.fsdp) and run the shared loop, which
fetches each step's rows from the workers that hold them; checkpoints go through ray.train.report
into <storage_path>/ray/ (storage_path: output_dir, a shared folder or s3://).

So no worker holds the corpus, and the rows of step k are still the same whatever the number of
workers and however Ray split the blocks: exact normalisation and resuming depend on that.

Pair losses (dpo, simpo): the driver reads and tokenises the pairs (opsft.train.pairs) and every
worker receives all of them (DataConfig(datasets_to_split=[])).

Experiment tracking (cfg.tracking, opsft.train.tracking): the driver starts the MLflow / W&B run (params),
hands its handle to the workers, rank 0 logs every step's metrics to it (through a Ray Train restart too),
and the driver logs the final checkpoint and ends the run FINISHED or FAILED.

Ray Train V2 (the default in Ray 2.60): a rerun with the same output_dir continues from the
run's last checkpoint (ray.train.get_checkpoint), like a restart after a failure.

    python -m opsft.cli train --input corpus.jsonl --output-dir out --workers 2
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import torch

from opsft.cluster import connect
from opsft.data import storage
from opsft.data.reader import corpus_files
from opsft.train.batches import TrainExample
from opsft.train.loop import load_for_training, prepare_data, resolve_max_length, train_loop
from opsft.train.pairs import PairExample
from opsft.train.ray_data import corpus_dataset, corpus_summary, worker_data_config, worker_datasets
from opsft.train.strategy import build_runtime, fit_strategy, worker_strategy
from opsft.train.tracking import check_available, tracked_run
from opsft.train.worker_corpus import ShardedCorpus, dist_gather

log = logging.getLogger(__name__)
RUN_NAME = "ray"


def _flat(e: TrainExample, prefix: str = "") -> dict:
    return {f"{prefix}input_ids": e.input_ids, f"{prefix}response_start": e.response_start,
            f"{prefix}has_eos": e.has_eos}


def _unflat(r: dict, prefix: str = "") -> TrainExample:
    return TrainExample([int(t) for t in r[f"{prefix}input_ids"]], int(r[f"{prefix}response_start"]),
                        bool(r[f"{prefix}has_eos"]))


def _to_rows(examples: list[TrainExample | PairExample]) -> list[dict]:
    """Dataset rows of examples or pairs (a pair: its chosen and rejected sides as c_* and r_*
    columns; dpo reference log-probs are computed on the workers, not carried)."""
    return [{"i": i, **(_flat(e.chosen, "c_") | _flat(e.rejected, "r_") if isinstance(e, PairExample) else _flat(e))}
            for i, e in enumerate(examples)]


def _from_shard(shard) -> list[TrainExample | PairExample]:
    if shard is None:
        return []
    rows = sorted(shard.iter_rows(), key=lambda r: r["i"])
    return [PairExample(_unflat(r, "c_"), _unflat(r, "r_")) if "c_input_ids" in r else _unflat(r) for r in rows]


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _report_checkpoint(rank: int):
    import ray.train

    def checkpoint(metrics: dict, write, write_shards) -> None:
        with tempfile.TemporaryDirectory() as folder:
            write_shards(folder)  # every rank its own shards (FSDP); Ray uploads them into one checkpoint
            if rank == 0:
                write(folder)
            ckpt = ray.train.Checkpoint.from_directory(folder) if any(Path(folder).iterdir()) else None
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, int | float | str)},
                             checkpoint=ckpt, checkpoint_dir_name=f"checkpoint-{int(metrics['step']):06d}")
        return None

    return checkpoint


def train_worker(config: dict) -> None:
    """The per-worker function of the TorchTrainer."""
    import ray.train
    import ray.train.torch

    from opsft.config import TrainConfig
    from opsft.train.tracking import worker_tracker

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tracker = worker_tracker(config.get("tracking"), rank)  # rank 0 only
    try:
        _train_worker(cfg, config, rank, world, tracker)
    except BaseException:
        if tracker is not None:
            tracker.close(ok=False)
        raise
    if tracker is not None:
        tracker.close()


def _train_worker(cfg, config: dict, rank: int, world: int, tracker) -> None:
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    if config.get("sharded"):  # token losses: this worker's part of the tokenised corpus
        train, eval_ex = _sharded_examples(cfg, rank, config)
    else:  # pairs: every worker has them all
        train = _from_shard(ray.train.get_dataset_shard("train"))
        eval_ex = _from_shard(ray.train.get_dataset_shard("eval")) if config.get("has_eval") else []
    ckpt = ray.train.get_checkpoint()  # a restart after a failure, or a rerun of the same output_dir
    strategy = worker_strategy(cfg.scaling.strategy, world)
    with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext() as folder:
        fsdp_ = strategy == "fsdp"
        # FSDP: rank 0 reads the weights on the CPU and hands out the shards; the others build the
        # structure on the meta device (no worker but rank 0 holds the whole model, no GPU ever does)
        model, tokenizer, resume_state = load_for_training(cfg, torch.device("cpu") if fsdp_ else device,
                                                           config["model"], folder, meta=fsdp_ and rank > 0)
        runtime = build_runtime(strategy, cfg, device, rank=rank, world_size=world, reduce=_all_reduce,
                                replicate=lambda m: ray.train.torch.prepare_model(m, parallel_strategy="ddp"),
                                checkpoint=_report_checkpoint(rank), tracker=tracker)
        train_loop(cfg, train, eval_ex, model, tokenizer, runtime, resume_state)


def _sharded_examples(cfg, rank: int, config: dict):
    """(ShardedCorpus of the training rows, the held-out examples) on this worker: collectives."""
    import ray.train

    def corpus(name: str, source: str, eval_rows: int) -> ShardedCorpus:
        return ShardedCorpus(ray.train.get_dataset_shard(f"{name}_{rank}").iter_rows(), dist_gather, eval_rows,
                             cfg.seed, source=source, max_length=config["max_length"])

    train = corpus("train", cfg.input, 0 if cfg.eval_input else cfg.eval_rows)
    log.info("worker %d holds the tokens of %d of the %d training and held-out examples", rank, train.held_rows,
             train.n_train + train.n_eval)
    if config.get("has_eval"):  # --eval-input: gathered whole on every worker (a held-out set is small)
        held = corpus("evalset", cfg.eval_input, 0)
        return train, held.fetch(list(range(held.n_train)))
    return train, train.eval_examples()


def _corpus_datasets(cfg, tokenizer_path: str, max_length: int) -> tuple[dict, dict, bool]:
    """(per-worker datasets, data summary, whether there is an --eval-input set) of a token-loss run."""
    W = cfg.scaling.num_workers
    ds = corpus_dataset(cfg.input, tokenizer_path, max_length, cfg.overlong).materialize()
    summary = {"train": corpus_summary(ds, cfg.input, max_length, 0 if cfg.eval_input else cfg.eval_rows)}
    datasets = worker_datasets(ds, W)
    if not cfg.eval_input:
        summary["eval_held_out"] = cfg.eval_rows
        return datasets, summary, False
    eds = corpus_dataset(cfg.eval_input, tokenizer_path, max_length, cfg.overlong).materialize()
    summary["eval"] = corpus_summary(eds, cfg.eval_input, max_length, check=False)
    if not summary["eval"]["used"]:
        return datasets, summary, False
    return datasets | worker_datasets(eds, W, "evalset"), summary, True


def run_ray(cfg) -> dict:
    """Run the TorchTrainer to the end; returns a summary (data counts, last metrics, the
    final checkpoint folder: a HF model folder, the workers' `strategy`)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from transformers import AutoConfig, AutoTokenizer

    from opsft.models import resolve_model

    if not cfg.output_dir:
        raise ValueError("output_dir is required (checkpoints and metrics go there)")
    check_available(cfg)  # a tracking library missing: said before the corpus is read
    output_dir = Path(cfg.output_dir).resolve()
    storage_path = cfg.storage_path or str(output_dir)
    if not storage.is_uri(storage_path):
        storage_path = str(Path(storage_path).resolve())
    model_path = resolve_model(cfg.resume_from, everything=True) if cfg.resume_from else resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    max_length = resolve_max_length(cfg, AutoConfig.from_pretrained(model_path), tokenizer)
    if cfg.loss.pairs:  # the driver reads the pairs; every worker gets them all
        train, eval_ex, data_summary = prepare_data(cfg, tokenizer, max_length)
        connect(cfg.address, log_to_driver=True)  # the workers' progress lines reach this console
        datasets = {"train": ray.data.from_items(_to_rows(train))}
        if eval_ex:
            datasets["eval"] = ray.data.from_items(_to_rows(eval_ex))
        has_eval = bool(eval_ex)
    else:
        corpus_files(cfg.input)  # a missing or unknown file fails before Ray starts
        connect(cfg.address, log_to_driver=True)
        datasets, data_summary, has_eval = _corpus_datasets(cfg, model_path, max_length)
    cfg = fit_strategy(cfg, model_path)  # on the cluster: its GPUs are known now
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    cfg = cfg.model_copy(update={"output_dir": str(output_dir)})
    cfg_dump = cfg.model_dump(mode="json")
    with tracked_run(cfg) as tracker:  # FINISHED, or FAILED when fit raises (the workers failed for good)
        trainer = TorchTrainer(
            train_worker,
            # a URI goes as it is: each worker fetches it to its own node (opsft.models.fetch_model)
            train_loop_config={"cfg": cfg_dump, "has_eval": has_eval,
                               "model": cfg.model if storage.is_uri(cfg.model or "") else resolve_model(cfg.model),
                               "sharded": not cfg.loss.pairs, "max_length": max_length,
                               "tracking": tracker.handle() if tracker is not None else None},
            scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                                   resources_per_worker=resources),
            datasets=datasets,
            dataset_config=worker_data_config(),
            run_config=ray.train.RunConfig(
                name=RUN_NAME, storage_path=storage_path,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        )
        result = trainer.fit()
        checkpoint = None
        if result.checkpoint is not None:  # a path inside the storage's filesystem: a URI again for object storage
            checkpoint = storage.full_path(storage_path, result.checkpoint.path)
        if tracker is not None:
            tracker.log_checkpoint(checkpoint)
    return {"data": data_summary, "final": result.metrics, "checkpoint": checkpoint,
            "metrics_file": str(output_dir / "metrics.jsonl"), "strategy": worker_strategy(sc.strategy, sc.num_workers)}
