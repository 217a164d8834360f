"""Held-out evaluation of the token losses, without Ray: each worker runs its share of the held-out
examples (`shard_rounds`: the same number of forward passes on every worker, since under FSDP each
one is a collective), in eval mode without gradients (`evaluating`), and the sums are added over the
workers (`reduce`), so every worker gets the figures of the whole held-out set. The pair losses'
evaluation (opsft.train.pairs.evaluate_pairs) uses the same two helpers.

    metrics = evaluate(model, eval_examples, LossSpec("idft"), progress=1.0, pad_id=0, device="cpu")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.fsdp import FSDPModule

from opsft.method import losses
from opsft.train.batches import TrainExample, cll_mask, collate
from opsft.train.step import LossSpec, Reduce, no_reduce, response_scores


def shard_rounds(n: int, rank: int, world_size: int, micro_batch_size: int,
                 lengths: list[int] | None = None) -> Iterator[list[int]]:
    """Worker `rank`'s share of n held-out items (indices rank, rank + W, ...), in micro-batches of
    indices, longest first when `lengths` is given. Every worker gets the same number of
    micro-batches, the last ones possibly empty: under FSDP each forward pass is a collective."""
    mine = list(range(rank, n, world_size))
    if lengths is not None:
        mine.sort(key=lambda i: lengths[i], reverse=True)
    rounds = -(-n // world_size)
    for s in range(0, max(rounds, 1), micro_batch_size):
        yield mine[s:s + micro_batch_size]


@contextlib.contextmanager
def evaluating(model):
    """The model to run held-out passes on: a DDP replica unwrapped (no collective in its
    forward), in eval mode for the block, then back to the mode it had."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
        # FSDP keeps its root unit gathered after a forward (for the backward that usually follows):
        # after forwards without backward, put every unit back to its shards (the optimiser's and the
        # checkpoints' parameters)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


@torch.no_grad()
def evaluate(model, examples: list[TrainExample], spec: LossSpec, progress: float, pad_id: int, device, *,
             micro_batch_size: int = 8, rank: int = 0, world_size: int = 1, reduce: Reduce = no_reduce,
             autocast=None) -> dict[str, float]:
    """Held-out figures over all workers: eval_loss (the training loss, token mean), eval_nll
    (token mean of -log p), eval_cll (row mean of the per-row mean phi over the response
    without its end-of-turn token, the `cll` of opsft score), eval_rows, eval_tokens."""
    autocast = autocast or contextlib.nullcontext()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, nll sum, tokens, cll sum, cll rows
    with evaluating(model) as model:
        for idx in shard_rounds(len(examples), rank, world_size, micro_batch_size, [len(e) for e in examples]):
            sums += _eval_sums(model, [examples[i] for i in idx], spec, progress, pad_id, device, autocast)
    sums = reduce(sums)
    tokens, cll_rows = max(float(sums[2]), 1.0), max(float(sums[4]), 1.0)
    return {"eval_loss": float(sums[0]) / tokens, "eval_nll": float(sums[1]) / tokens,
            "eval_cll": float(sums[3]) / cll_rows, "eval_rows": len(examples), "eval_tokens": float(sums[2])}


def _eval_sums(model, group: list[TrainExample], spec: LossSpec, progress: float, pad_id: int, device,
               autocast) -> torch.Tensor:
    """[loss sum, nll sum, tokens, cll sum, cll rows] of one held-out micro-batch (maybe empty)."""
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    batch = collate(group, pad_id, device)
    scores = response_scores(model, batch, autocast, spec.temperature, spec.fused)
    _, metrics = losses.weighted_nll(spec.name, scores.logp, scores.entropy, scores.labels, scores.vocab, None,
                                     progress, None, **spec.params)
    n = metrics["n_tokens"]
    sums[0] += metrics["loss"] * n
    sums[1] -= metrics["logprob_mean"] * n
    sums[2] += n
    first = batch["labels"].shape[1] - scores.labels.shape[1]
    mask = cll_mask(group, batch["labels"])[:, first:]
    phi = (scores.logp + scores.entropy).masked_fill(~mask.bool(), 0.0)
    rows = mask.sum(1)
    keep = rows > 0
    sums[3] += (phi.sum(1)[keep] / rows[keep]).double().sum()
    sums[4] += float(keep.sum())
    return sums
