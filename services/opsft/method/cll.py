"""Centered log-likelihood (CLL): how on-policy each token of a text is for a model.

For a token x_t with next-token distribution p_t = softmax(z_t / tau) over the full
vocabulary:  phi_t = log p_t(x_t) + H(p_t).  If x_t is drawn from p_t, E[phi_t] = 0.

Everything here is plain torch over logits and token ids; it never materialises more
than `chunk_size x vocab` floats at once (plus the caller's logits), so scoring long
sequences costs about what a forward pass costs.
"""

from __future__ import annotations

import torch

from opsft.score_columns import SequenceStats

DEFAULT_CHUNK = 1024

# Thresholds of the per-sequence "fraction of tokens with phi > t" statistics.
FRACTION_THRESHOLDS = {"cll_frac_pos": 0.0, "cll_frac_gt_m1": -1.0, "cll_frac_gt_m3": -3.0, "cll_frac_gt_m5": -5.0}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype log p and H are computed and returned in: float32 for float32 / bf16 / fp16
    logits, float64 for float64 logits (the exactness reference of opsft train, TrainConfig.dtype)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_scores(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(label), H, logsumexp) per row of a chunk of scaled logits z [c, V] (a new tensor of
    the compute dtype, shifted in place). The row max is subtracted first (each difference rounded
    once, relative to its own size), so logsumexp and log p work on small numbers; then
    H = -sum p log p has terms of one sign. (H = lse - sum p z cancels two large numbers: ~1e-4
    lost on real logits.)"""
    top = z.amax(-1, keepdim=True)
    logp_all = z.sub_(top)
    lse_shifted = torch.logsumexp(logp_all, dim=-1, keepdim=True)
    logp_all.sub_(lse_shifted)  # log p over the vocabulary
    ent = -(torch.exp(logp_all) * logp_all).sum(-1)
    return logp_all.gather(-1, labels[:, None]).squeeze(-1), ent, (top + lse_shifted).squeeze(-1)


class _LogprobEntropy(torch.autograd.Function):
    """Fused, chunked log p(label) and H(p), in compute_dtype(logits dtype). Saves only
    logsumexp per position; the backward pass recomputes the softmax chunk by chunk
    (d logp / dz = (onehot - p) / tau) in the same dtype and returns the gradient in the
    logits' dtype. The entropy output carries no gradient (every loss here uses it detached)."""

    @staticmethod
    def forward(ctx, flat, labels, temperature, chunk_size):
        n = flat.shape[0]
        dtype = compute_dtype(flat.dtype)
        logp = torch.empty(n, dtype=dtype, device=flat.device)
        ent = torch.empty(n, dtype=dtype, device=flat.device)
        lses = torch.empty(n, dtype=dtype, device=flat.device)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            logp[sl], ent[sl], lses[sl] = _chunk_scores(flat[sl].to(dtype) / temperature, labels[sl])
        ctx.save_for_backward(flat, labels, lses)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        flat, labels, lses = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk_size
        grad = torch.empty_like(flat)
        for start in range(0, flat.shape[0], chunk):
            sl = slice(start, start + chunk)
            z = flat[sl].to(lses.dtype) / tau
            g = -torch.exp(z - lses[sl].unsqueeze(-1)) * grad_logp[sl].unsqueeze(-1)
            g.scatter_add_(-1, labels[sl, None], grad_logp[sl, None])
            grad[sl] = (g / tau).to(flat.dtype)
        return grad, None, None, None


def token_logprob_entropy(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(labels) and H(p) per position, computed in chunks of positions, in float32
    (float64 for float64 logits: compute_dtype).

    logits: [..., V] (position t predicts labels[..., t]); labels: [...] (ids outside
    [0, V), such as -100, give logprob 0 and must be masked by the caller). log p is
    differentiable in the logits; H is returned without gradient.

    Per chunk of positions: z - logsumexp(z) (log p over the vocabulary, in place), one exp,
    H = -sum p log p; nothing vocabulary-sized is kept for the backward pass.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    valid = (flat_labels >= 0) & (flat_labels < vocab)
    safe = torch.where(valid, flat_labels, torch.zeros_like(flat_labels)).long()
    logp, ent = _LogprobEntropy.apply(flat, safe, float(temperature), int(chunk_size))
    logp = logp.masked_fill(~valid, 0.0)
    return logp.reshape(labels.shape), ent.reshape(labels.shape)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  temperature: float) -> torch.Tensor:
    """(h @ weight.T + bias) / temperature of a chunk, a new tensor of `dtype`: made in the weight's
    dtype, then cast and divided in place (the values of `.to(dtype) / temperature`, without a
    second chunk x V tensor)."""
    return torch.nn.functional.linear(h, weight, bias).to(dtype).div_(temperature)


class _LinearLogprobEntropy(torch.autograd.Function):
    """log p(label) and H(p) from final hidden states and an LM head, chunk by chunk of
    positions: the [chunk x V] logits of a chunk exist only while it is processed, in the forward
    pass and again (recomputed) in the backward pass. Saves hidden, the head and logsumexp per
    position: never [positions x V]. Gradients for hidden, weight and bias through log p (H carries
    none, as in _LogprobEntropy). Logits are made in the weight's dtype with autocast off (an
    fp32 head gives fp32 logits under bf16 autocast), softmax and log p in compute_dtype.

    The backward pass's hidden gradient (g @ head, g the [chunk x V] compute_dtype gradient of
    the logits) is computed in compute_dtype from one compute_dtype copy of the head, cast once per
    backward call and held until it returns: for a bf16 / fp16 head (e.g. under FSDP bf16 mixed
    precision) V x d float32, as large as the float32 weight gradient held beside it; no copy for a
    float32 or float64 head, nor when hidden needs no gradient. (Casting per chunk cast the whole
    head n / chunk_size times.) In the backward pass a chunk's logits, their softmax and g are one
    compute_dtype tensor, rewritten in place and freed before the next chunk's: one chunk x V tensor
    at a time (two while the weight-dtype logits are cast), beside the head's copy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk_size):
        n = hidden.shape[0]
        dtype = compute_dtype(weight.dtype)
        logp = torch.empty(n, dtype=dtype, device=hidden.device)
        ent = torch.empty(n, dtype=dtype, device=hidden.device)
        lses = torch.empty(n, dtype=dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                z = _chunk_logits(hidden[sl].to(weight.dtype), weight, bias, dtype, temperature)
                logp[sl], ent[sl], lses[sl] = _chunk_scores(z, labels[sl])
                del z  # before the next chunk's logits are made
        ctx.save_for_backward(hidden, weight, bias, labels, lses)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        hidden, weight, bias, labels, lses = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk_size
        dtype = lses.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        # the head in compute_dtype for g @ head, cast once for all chunks (the weight itself when
        # it already has that dtype)
        weight_c = weight.to(dtype) if need_h else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                sl = slice(start, start + chunk)
                h = hidden[sl].to(weight.dtype)
                # d log p / d z = (onehot - p) / tau, times the incoming gradient of each position,
                # in place on the chunk's logits
                g = _chunk_logits(h, weight, bias, dtype, tau).sub_(lses[sl].unsqueeze(-1)).exp_()
                g.mul_(-grad_logp[sl].unsqueeze(-1))
                g.scatter_add_(-1, labels[sl, None], grad_logp[sl, None])
                g.div_(tau)
                if need_h:
                    grad_h[sl] = (g @ weight_c).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(g.t(), h.to(dtype))
                if need_b:
                    grad_b += g.sum(0)
                del g  # before the next chunk's logits are made
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(labels) and H(p) per position from final hidden states and an LM head, memory-bounded:
    at most chunk_size x V logits exist at once, forward and backward (the fused linear +
    log-softmax of the memory-bounded training losses; Liger's fused linear cross-entropy is the
    same idea). log p is differentiable in hidden, weight and bias; H has no gradient.

    hidden: [..., d] (the position predicts labels[...]); weight: [V, d]; bias: [V] or None;
    labels outside [0, V) give log p 0 (mask them). The logits hidden @ weight.T (+ bias) are made
    in the weight's dtype: a float32 weight gives float32 logits whatever the hidden dtype."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    vocab = weight.shape[0]
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    valid = (flat_labels >= 0) & (flat_labels < vocab)
    safe = torch.where(valid, flat_labels, torch.zeros_like(flat_labels)).long()
    logp, ent = _LinearLogprobEntropy.apply(flat, weight, bias, safe, float(temperature), int(chunk_size))
    return logp.masked_fill(~valid, 0.0).reshape(labels.shape), ent.reshape(labels.shape)


@torch.no_grad()
def head_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(labels) and H(p) per position from final hidden states and an LM head, without
    gradient (scoring): linear_logprob_entropy under no_grad. hidden: [N, d]; weight: [V, d]; give
    a float32 weight (and any hidden dtype) for float32 logits, e.g. a bf16 model's head cast once
    to float32 (the bf16 values exactly)."""
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    if hidden.shape[0] == 0:
        empty = torch.empty(0, dtype=compute_dtype(weight.dtype), device=hidden.device)
        return empty, empty.clone()
    return linear_logprob_entropy(hidden, weight, labels, temperature, chunk_size, bias)


def token_phi(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """phi_t = log p_t(x_t) + H(p_t) per position (logits at t predict labels[t]); 0 where mask is False."""
    with torch.no_grad():
        logp, ent = token_logprob_entropy(logits, labels, temperature, chunk_size)
        phi = logp + ent
        if mask is not None:
            phi = phi.masked_fill(~mask.bool(), 0.0)
    return phi


def summarize(logprob, entropy) -> SequenceStats:
    """Statistics of one sequence's response tokens from per-token log p and H (1-D, any sequence type)."""
    logprob = torch.as_tensor(logprob, dtype=torch.float64)
    entropy = torch.as_tensor(entropy, dtype=torch.float64)
    n = int(logprob.numel())
    if n == 0:
        raise ValueError("no response tokens to summarise")
    phi = logprob + entropy
    fracs = {name: float((phi > t).double().mean()) for name, t in FRACTION_THRESHOLDS.items()}
    return SequenceStats(
        cll=float(phi.mean()),
        cll_sum=float(phi.sum()),
        logprob_mean=float(logprob.mean()),
        entropy_mean=float(entropy.mean()),
        n_tokens=n,
        **fracs,
    )
