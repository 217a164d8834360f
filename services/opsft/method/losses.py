"""The SFT loss family: SFT, DFT, EAFT, IDFT (and its hard-mask ablation).

Every loss here is a per-token weighted negative log-likelihood

    loss_t = - stopgrad(w_t) * log p_t(x_t)

and differs only in the weight w_t (method.md section 2):

    sft             w = 1
    dft             w = p
    eaft            w = H(p) / log V
    idft            w = p ** gamma,  gamma = 1 + lambda(s) * (clamp(exp(-phi / beta), gmin, gmax) - 1)
    idft_legacy     like idft, but only gamma is detached (the official code before 2026-03-13)
    idft_hardmask   w = p ** gamma where -B < phi < B (strict), else 0; the ablation of the
                    official code (kept tokens keep the IDFT weight, the loss is still divided
                    by all valid tokens)

Normalisation. `compute` returns sum_t(loss_t * mask_t) / normalizer, where normalizer
defaults to the number of valid tokens in *this call*. A trainer that splits a global
batch over W data-parallel workers and K accumulation micro-batches keeps the loss equal
to the mean over all valid tokens of the global batch by passing

    normalizer = (valid tokens in the whole global batch) / W

to every micro-batch call: the micro-batch gradients add up over K, and DDP averages
(divides by W) across workers, so the result is sum over the global batch / its token
count, independent of the split. `global_token_normalizer` below computes it.

Losses are registered functions of tensors and plain numbers; `compute(name, ...)` is the
one entry point.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from opsft.method import loss_registry
from opsft.method.cll import DEFAULT_CHUNK, token_logprob_entropy

# name -> function(logp, entropy, vocab_size, progress, **params) -> (weight, extra metrics)
WeightFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
_REGISTRY: dict[str, WeightFn] = {}

# Defaults from opsft.method.loss_registry, the one place (LossConfig and `opsft train` use the same).
IDFT_DEFAULTS = loss_registry.LOSSES["idft"].defaults()
HARDMASK_DEFAULTS = {"bound": loss_registry.LOSSES["idft_hardmask"].defaults()["bound"]}


def register(name: str):
    def deco(fn: WeightFn) -> WeightFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def lambda_schedule(progress: float, warmup_ratio: float, transition_ratio: float) -> float:
    """0 while progress < warmup_ratio, then linear over transition_ratio, then 1."""
    if progress < warmup_ratio:
        return 0.0
    if transition_ratio <= 0:
        return 1.0
    return min(1.0, (progress - warmup_ratio) / transition_ratio)


def idft_gamma(phi, beta, gamma_min, gamma_max, lam):
    """gamma = 1 + lam * (clamp(exp(-phi / beta), gamma_min, gamma_max) - 1), and the raw clamp."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    raw = torch.exp(-phi / beta).clamp(gamma_min, gamma_max)
    return 1.0 + lam * (raw - 1.0), raw


@register("sft")
def _sft(logp, entropy, vocab_size, progress):
    return torch.ones_like(logp), {}


@register("dft")
def _dft(logp, entropy, vocab_size, progress):
    return logp.detach().exp(), {}


@register("eaft")
def _eaft(logp, entropy, vocab_size, progress):
    return entropy / math.log(vocab_size), {}


def _idft_parts(logp, entropy, progress, beta, gamma_min, gamma_max, warmup_ratio, transition_ratio):
    phi = logp.detach() + entropy
    lam = lambda_schedule(progress, warmup_ratio, transition_ratio)
    gamma, raw = idft_gamma(phi, beta, gamma_min, gamma_max, lam)
    metrics = {
        "gamma": gamma,
        "frac_gamma_min": (raw <= gamma_min).float(),
        "frac_gamma_max": (raw >= gamma_max).float(),
    }
    return gamma, metrics, lam


@register("idft")
def _idft(logp, entropy, vocab_size, progress, **params):
    p = {**IDFT_DEFAULTS, **params}
    gamma, metrics, lam = _idft_parts(logp, entropy, progress, **p)
    prob = logp.detach().exp().clamp(1e-10, 1.0)
    return prob**gamma, {**metrics, "lambda": torch.full_like(logp, lam)}


@register("idft_legacy")
def _idft_legacy(logp, entropy, vocab_size, progress, **params):
    """Pre-2026-03-13 official gradient: p ** stopgrad(gamma) is *not* detached, so the
    returned weight carries gradient; kept only for comparison."""
    p = {**IDFT_DEFAULTS, **params}
    gamma, metrics, lam = _idft_parts(logp, entropy, progress, **p)
    prob = logp.exp().clamp(1e-10, 1.0)
    return prob ** gamma.detach(), {**metrics, "lambda": torch.full_like(logp, lam)}


@register("idft_hardmask")
def _idft_hardmask(logp, entropy, vocab_size, progress, bound=HARDMASK_DEFAULTS["bound"], **params):
    if bound <= 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    weight, metrics = _idft(logp, entropy, vocab_size, progress, **params)
    phi = logp.detach() + entropy
    keep = ((phi > -bound) & (phi < bound)).float()
    return weight * keep, {**metrics, "frac_kept": keep}


def compute(
    name: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    progress: float = 1.0,
    *,
    normalizer: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    **params,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metrics) of loss `name` on logits [B, T, V] predicting labels [B, T].

    mask [B, T] marks the tokens that count (response tokens); labels outside [0, V)
    (e.g. -100) are masked as well. `progress` in [0, 1] is the fraction of training done
    (IDFT's lambda schedule). `normalizer`: see the module docstring. The loss is 0 (with
    a graph) when no token is valid.
    """
    logp, entropy = token_logprob_entropy(logits, labels, temperature, chunk_size)
    return weighted_nll(name, logp, entropy, labels, logits.shape[-1], mask, progress, normalizer, **params)


def weighted_nll(name: str, logp: torch.Tensor, entropy: torch.Tensor, labels: torch.Tensor, vocab: int,
                 mask: torch.Tensor | None, progress: float, normalizer, **params) -> tuple[torch.Tensor, dict]:
    """The loss and metrics of `name` from per-position log p (differentiable) and H."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; choose one of {names()}")
    valid = (labels >= 0) & (labels < vocab)
    if mask is not None:
        valid = valid & mask.bool()
    weight, extra = _REGISTRY[name](logp, entropy, vocab, progress, **params)
    if loss_registry.LOSSES[name].detached:
        weight = weight.detach()
    validf = valid.to(logp.dtype)  # float32, or float64 for float64 logits (opsft.method.cll.compute_dtype)
    n_valid = validf.sum()
    denom = n_valid.clamp(min=1.0) if normalizer is None else torch.as_tensor(normalizer, dtype=logp.dtype)
    loss = -(weight * logp * validf).sum() / denom

    def vmean(t: torch.Tensor) -> float:
        return float((t.detach() * validf).sum() / n_valid.clamp(min=1.0))

    phi = logp.detach() + entropy
    metrics = {
        "loss": float(loss.detach()),
        "n_tokens": float(n_valid),
        "logprob_mean": vmean(logp),
        "entropy_mean": vmean(entropy),
        "phi_mean": vmean(phi),
        "weight_mean": vmean(weight),
    }
    metrics.update({f"{k}_mean" if not k.startswith("frac") else k: vmean(v) for k, v in extra.items()})
    return loss, metrics


def global_token_normalizer(global_valid_tokens: int | float, world_size: int) -> float:
    """The `normalizer` that makes DDP-averaged, accumulated micro-batch losses equal the
    mean over all valid tokens of the global batch (see the module docstring)."""
    return max(float(global_valid_tokens), 1.0) / world_size
