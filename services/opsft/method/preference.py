"""Preference losses on pairs (chosen, rejected) of responses to the same prompt: DPO and
SimPO, the offline baselines the paper compares on-policy SFT with (method.md section 4).
Plain torch over logits, labels and per-sequence log-probs; no Ray.

    sums, counts = sequence_logps(logits, labels)             # per row: sum of log p, labelled tokens
    loss, metrics = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    loss, metrics = simpo_loss(sum_c / n_c, sum_r / n_r, beta=2.0, gamma=1.0)
    loss, metrics = pair_loss("dpo", sum_c, sum_r, n_c, n_r, ref_c, ref_r, beta=0.1)   # what training calls

DPO (Rafailov et al., 2023). With sequence log-prob SUMS of the response under the policy
(pi) and under the frozen initial model (ref), per pair:

    h    = (pi_c - ref_c) - (pi_r - ref_r)
    loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

eps = label_smoothing: conservative DPO (each label taken as flipped with probability eps);
eps = 0 is plain DPO. Implicit rewards: beta * (pi - ref). Defaults beta 0.1 (the DPO paper's
common setting), eps 0.

SimPO (Meng et al., 2024). Reference-free, with length-normalised log-probs: avg = sum / number
of response tokens (the end-of-turn token included, as in training), per pair:

    loss = -log sigmoid(beta * avg_c - beta * avg_r - gamma)

Rewards beta * avg. Defaults beta 2.0, gamma 1.0: the SimPO paper's Llama-3-Base setting
(gamma / beta = 0.5, the ratio its README recommends to start from; its other settings use
beta 2.0-2.5 and gamma / beta 0.1-0.8).

Metrics, means over the pairs of the call: loss, n_pairs, reward_accuracy (fraction of pairs
with margin > 0), margin (chosen reward - rejected reward), chosen_reward, rejected_reward,
logp_chosen, logp_rejected (the log-probs the loss takes: sums for DPO, per-token means for
SimPO).

Normalisation, as in opsft.method.losses with pairs for tokens: the loss is the sum of the pair losses
divided by `normalizer`, by default the number of pairs in this call. A trainer that splits a
global batch over W workers and K micro-batches passes normalizer = (pairs in the global batch)
/ W to every micro-batch; accumulated gradients averaged over workers are then those of the
mean over all pairs of the global batch (losses.global_token_normalizer computes it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opsft.method import loss_registry
from opsft.method.cll import DEFAULT_CHUNK, token_logprob_entropy

PAIR_LOSSES = loss_registry.PAIR_LOSSES
DPO_DEFAULTS = loss_registry.LOSSES["dpo"].defaults()
SIMPO_DEFAULTS = loss_registry.LOSSES["simpo"].defaults()


def is_pair_loss(name: str) -> bool:
    return name in PAIR_LOSSES


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                   chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts) per row: the sum of log p(label) over the row's valid positions and their
    number. logits [B, T, V] at t predict labels [B, T]; labels outside [0, V) (e.g. -100) and
    positions where mask is False do not count. sums is differentiable in the logits (float32,
    float64 for float64 logits: opsft.method.cll.compute_dtype); computed in chunks of positions
    (opsft.method.cll), never a full [B, T, V] log_softmax."""
    vocab = logits.shape[-1]
    valid = (labels >= 0) & (labels < vocab)
    if mask is not None:
        valid = valid & mask.bool()
    logp, _ = token_logprob_entropy(logits, labels, 1.0, chunk_size)
    validf = valid.to(logp.dtype)
    return (logp * validf).sum(-1), validf.sum(-1)


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = DPO_DEFAULTS["beta"],
             label_smoothing: float = DPO_DEFAULTS["label_smoothing"], *,
             normalizer: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO with conservative label smoothing (module docstring); inputs are per-pair
    sequence log-prob sums [N]. Returns (sum of pair losses / normalizer, metrics)."""
    if beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    ref_chosen = torch.as_tensor(ref_chosen, dtype=pi_chosen.dtype, device=pi_chosen.device)
    ref_rejected = torch.as_tensor(ref_rejected, dtype=pi_rejected.dtype, device=pi_rejected.device)
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    z = chosen_reward - rejected_reward
    per_pair = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return _finish(per_pair, chosen_reward, rejected_reward, pi_chosen, pi_rejected, normalizer)


def simpo_loss(avg_logp_chosen: torch.Tensor, avg_logp_rejected: torch.Tensor,
               beta: float = SIMPO_DEFAULTS["beta"], gamma: float = SIMPO_DEFAULTS["gamma"], *,
               normalizer: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """SimPO (module docstring); inputs are per-pair per-token MEAN log-probs [N]. Returns
    (sum of pair losses / normalizer, metrics); the margin is beta * (avg_c - avg_r), gamma
    not subtracted (reward accuracy = chosen reward > rejected reward)."""
    if beta <= 0:
        raise ValueError(f"simpo beta must be > 0, got {beta}")
    chosen_reward = beta * avg_logp_chosen
    rejected_reward = beta * avg_logp_rejected
    per_pair = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return _finish(per_pair, chosen_reward, rejected_reward, avg_logp_chosen, avg_logp_rejected, normalizer)


def pair_loss(name: str, sum_chosen: torch.Tensor, sum_rejected: torch.Tensor, n_chosen: torch.Tensor,
              n_rejected: torch.Tensor, ref_chosen: torch.Tensor | None = None,
              ref_rejected: torch.Tensor | None = None, *, normalizer: float | None = None,
              **params) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss `name` of pairs given as per-sequence log-prob sums and token counts (and, for
    DPO, the reference sums). One entry point for training and evaluation."""
    if name == "dpo":
        if ref_chosen is None or ref_rejected is None:
            raise ValueError("dpo needs the reference model's log-probs of both responses")
        return dpo_loss(sum_chosen, sum_rejected, ref_chosen, ref_rejected, normalizer=normalizer, **params)
    if name == "simpo":
        return simpo_loss(sum_chosen / n_chosen.clamp(min=1), sum_rejected / n_rejected.clamp(min=1),
                          normalizer=normalizer, **params)
    raise ValueError(f"unknown pair loss {name!r}; choose one of {list(PAIR_LOSSES)}")


def _finish(per_pair, chosen_reward, rejected_reward, logp_chosen, logp_rejected, normalizer):
    n = per_pair.numel()
    denom = float(max(n, 1)) if normalizer is None else float(normalizer)
    loss = per_pair.sum() / denom
    margin = (chosen_reward - rejected_reward).detach()

    def mean(t: torch.Tensor) -> float:
        return float(t.detach().double().sum()) / max(n, 1)

    metrics = {
        "loss": float(loss.detach()),
        "n_pairs": float(n),
        "reward_accuracy": mean((margin > 0).double()),
        "margin": mean(margin),
        "chosen_reward": mean(chosen_reward),
        "rejected_reward": mean(rejected_reward),
        "logp_chosen": mean(logp_chosen),
        "logp_rejected": mean(logp_rejected),
    }
    return loss, metrics
