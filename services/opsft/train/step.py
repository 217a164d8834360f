"""One optimiser step with exact normalisation, and the module the trainers wrap (LossHead).

No Ray here: a step takes this worker's micro-batches and a `reduce` function (sum over
workers: torch.distributed.all_reduce under Ray Train, the identity in one process).

Exact normalisation (opsft.method.losses docstring): before the step the valid-token count of
the whole global batch is summed over workers; every micro-batch loss is divided by
count / W, gradients add up over micro-batches (DDP no_sync on all but the last) and DDP
averages over the W workers, so the gradient is that of the mean token loss of the
global batch, whatever W and the number of micro-batches.

Pair losses (dpo, simpo: opsft.method.preference) use the same mechanism with pairs for tokens: a
pair batch (opsft.train.pairs.collate_pairs) holds its n chosen sequences then its n rejected
ones and `n_pairs`; the normalizer is (pairs in the global batch) / W, so the loss is the mean
over the pairs of the global batch, exact over workers and micro-batches.

The optimiser and LR schedule are opsft.train.optim's, held-out evaluation is opsft.train.heldout's,
bf16 autocast is opsft.train.precision's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from opsft.method import loss_registry, losses
from opsft.method.cll import linear_logprob_entropy, token_logprob_entropy
from opsft.method.preference import is_pair_loss, pair_loss
from opsft.models import plain_lm_head
from opsft.train.batches import IGNORE

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class LossSpec:
    name: str = "idft"
    params: dict = field(default_factory=dict)
    temperature: float = 1.0
    fused: bool = True  # log p / H from hidden states and the LM head, chunked (response_scores)


LOSS_METRICS = tuple(dict.fromkeys(k for loss in loss_registry.LOSSES.values() for k in loss.metrics))
STEP_KEYS = ("loss", "phi_mean", "logprob_mean", "entropy_mean", "weight_mean", *LOSS_METRICS)
PAIR_STEP_KEYS = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward", "logp_chosen",
                  "logp_rejected")


@dataclass
class Scores:
    """Per-position log p (differentiable) and H of a batch's label columns first.. on."""

    logp: torch.Tensor  # [B, T - first]
    entropy: torch.Tensor  # [B, T - first], no gradient
    labels: torch.Tensor  # [B, T - first], IGNORE where no loss
    vocab: int

    @property
    def valid(self) -> torch.Tensor:
        return (self.labels >= 0) & (self.labels < self.vocab)

    def sequence_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of log p, number of label tokens) per row: a sequence's log-probability."""
        validf = self.valid.to(self.logp.dtype)
        return (self.logp * validf).sum(-1), validf.sum(-1)


class LossHead(torch.nn.Module):
    """The module a trainer wraps (DDP, FSDP): a causal LM whose forward returns log p and H at the
    label columns, from the batch's earliest response column on (prompt columns have no label).

    The loss head is inside the forward on purpose: under FSDP a unit's parameters are whole only
    during its forward, and the LM head's weight is needed by the chunked loss.
    fused (and a plain linear LM head, opsft.models.plain_lm_head): the decoder's final hidden
    states and the head through opsft.method.cll.linear_logprob_entropy, so no [tokens x vocab]
    logits tensor exists, forward or backward; the logits are float32 under bf16 autocast and
    made from the bf16 weight then upcast per chunk under FSDP bf16 mixed precision. Else the
    model's logits for those columns (logits_to_keep), then the chunked log p / H. The same values
    either way. Returns (logp, entropy, first column, vocabulary size)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, labels, temperature: float = 1.0, fused: bool = True,
                autocast=None, position_ids=None):
        autocast = autocast or contextlib.nullcontext()
        # packed rows (collate_packed): position ids and no attention mask, from which transformers
        # keeps attention within each sequence
        inputs = dict(input_ids=input_ids, use_cache=False, **(
            {"position_ids": position_ids} if position_ids is not None else {"attention_mask": attention_mask}))
        cols = (labels != IGNORE).any(0).nonzero()
        first = int(cols[0]) if len(cols) else labels.shape[1] - 1
        head = plain_lm_head(self.lm) if fused else None
        if head is not None and head.scale_as_temperature:
            # a family's logit scale s (opsft.models.head_spec) as a temperature: s * z / T = z / (T / s),
            # exact, and the gradient is the scaled head's; rows past an unpadded vocabulary dropped
            weight, bias = head.spec.rows(head.linear.weight), head.spec.rows(head.linear.bias)
            with autocast:
                hidden = self.lm.get_decoder()(**inputs).last_hidden_state
            logp, ent = linear_logprob_entropy(hidden[:, first:], weight, labels[:, first:],
                                               temperature / head.spec.weight_scale, bias=bias)
            vocab = weight.shape[0]
        else:
            with autocast:
                logits = self.lm(**inputs, logits_to_keep=labels.shape[1] - first).logits
            logp, ent = token_logprob_entropy(logits, labels[:, first:], temperature)
            vocab = logits.shape[-1]
        # [B, T] each: copies, not views, so that FSDP's backward hook on them cannot be bypassed
        return logp.clone(), ent.clone(), first, vocab


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside a DDP wrapper and / or a LossHead (FSDP shards in place: no wrapper)."""
    model = getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return model.lm if isinstance(model, LossHead) else model


def response_scores(model, batch: dict, autocast, temperature: float = 1.0, fused: bool = True) -> Scores:
    """log p and H at the label columns of a batch (LossHead); `model` is a LossHead (maybe wrapped
    by DDP or sharded by FSDP: the forward goes through the wrapper's hooks) or a bare causal LM."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    scorer = model if isinstance(inner, LossHead) else LossHead(model)
    labels = batch["labels"]
    logp, ent, first, vocab = scorer(batch["input_ids"], batch["attention_mask"], labels, temperature, fused,
                                     autocast, batch.get("position_ids"))
    return Scores(logp, ent, labels[:, first:], vocab)


def forward_loss(model, batch: dict, spec: LossSpec, progress: float, normalizer, autocast):
    scores = response_scores(model, batch, autocast, spec.temperature, spec.fused)
    if is_pair_loss(spec.name):
        return batch_pair_loss(scores, batch, spec, normalizer)
    return losses.weighted_nll(spec.name, scores.logp, scores.entropy, scores.labels, scores.vocab, None, progress,
                               normalizer, **spec.params)


def batch_pair_loss(scores: Scores, batch: dict, spec: LossSpec, normalizer):
    """The pair loss of a collate_pairs batch: rows [0, n) are the chosen responses, [n, 2n) the
    rejected ones, batch["ref_logps"] [n, 2] the reference sums (dpo). `n_tokens` in the metrics
    counts the response tokens of both sides."""
    n = int(batch["n_pairs"])
    sums, counts = scores.sequence_sums()
    ref = batch.get("ref_logps")
    loss, metrics = pair_loss(spec.name, sums[:n], sums[n:2 * n], counts[:n], counts[n:2 * n],
                              None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
                              normalizer=normalizer, **spec.params)
    # keeps a graph through the model on a no-pair micro-batch (DDP must see every parameter)
    loss = loss + 0.0 * sums.sum()
    metrics["n_tokens"] = float(counts.sum())
    return loss, metrics


def loss_units(batch: dict) -> float:
    """What the loss is a mean over: the pairs of a pair batch, else the loss tokens."""
    if "n_pairs" in batch:
        return float(batch["n_pairs"])
    return float((batch["labels"] != IGNORE).sum())


def train_step(model, optimizer, scheduler, micro_batches: list[dict], spec: LossSpec, progress: float, *,
               world_size: int = 1, reduce: Reduce = no_reduce, grad_clip: float = 1.0,
               autocast=None) -> dict[str, float]:
    """Forward/backward over this worker's micro-batches, then one optimiser step.

    Returns global metrics (the same on every worker): `loss` is the mean token loss of the
    global batch, the other *_mean / frac_* are token means over it; plus lr, grad_norm,
    tokens (loss tokens), input_tokens and tokens_per_s. For a pair loss, `loss` is the mean
    pair loss and PAIR_STEP_KEYS are pair means, plus `pairs`."""
    start = time.perf_counter()
    autocast = autocast or contextlib.nullcontext()
    if not micro_batches:
        raise ValueError("a worker needs at least one micro-batch (use collate([]) for an empty one)")
    pairs = is_pair_loss(spec.name)
    keys = PAIR_STEP_KEYS if pairs else STEP_KEYS
    device = micro_batches[0]["labels"].device
    counts = torch.tensor([sum(loss_units(mb) for mb in micro_batches),
                           sum(float((mb["labels"] != IGNORE).sum()) for mb in micro_batches),
                           sum(float(mb["attention_mask"].sum()) for mb in micro_batches)],
                          dtype=torch.float64, device=device)
    counts = reduce(counts)
    global_units = float(counts[0])  # loss tokens, or pairs
    normalizer = losses.global_token_normalizer(global_units, world_size)
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
    lr = optimizer.param_groups[0]["lr"]
    for i, mb in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            loss, metrics = forward_loss(model, mb, spec, progress, normalizer, autocast)
            loss.backward()
        n = metrics["n_pairs" if pairs else "n_tokens"]
        sums[0] += metrics["loss"] * normalizer  # the loss sum of this micro-batch
        for k, key in enumerate(keys[1:], 1):
            sums[k] += metrics.get(key, 0.0) * n
    grad_norm = _clip(model, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums = reduce(sums) / max(global_units, 1.0)
    out = {key: float(v) for key, v in zip(keys, sums, strict=True)}
    if not pairs:  # the loss's own metrics (opsft.method.loss_registry), not the other losses'
        reported = loss_registry.LOSSES[spec.name].metrics
        out = {k: v for k, v in out.items() if k not in LOSS_METRICS or k in reported}
    if pairs:
        out["pairs"] = global_units
    seconds = time.perf_counter() - start
    out.update(lr=lr, grad_norm=grad_norm, tokens=float(counts[1]), input_tokens=float(counts[2]),
               step_seconds=seconds, tokens_per_s=float(counts[2]) / seconds)
    return out


def _clip(model, max_norm: float) -> float:
    """Clip to a global gradient norm; returns the norm before clipping. FSDP's gradients are
    DTensor shards: their norm is a partial sum until full_tensor() reduces it over the workers."""
    params = [p for p in model.parameters() if p.grad is not None]
    limit = max_norm if max_norm > 0 else float("inf")
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, limit, norm)
    return float(norm)
