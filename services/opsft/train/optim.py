"""The optimiser and the learning-rate schedule of `opsft train`, without Ray.

AdamW with weight decay on everything but biases and normalisation weights, decided by name
(`no_decay_names`: the same groups unwrapped, under DDP and under FSDP), and a LambdaLR of
linear warm-up from 0 then cosine down to `min_ratio` of the peak (`lr_factor`).

    optimizer = make_optimizer(model, lr=6e-5, weight_decay=0.01)
    scheduler = make_scheduler(optimizer, total_steps=100, warmup_ratio=0.1)
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based): linear warm-up from 0
    over warmup_steps, then cosine from 1 down to min_ratio at total_steps."""
    if step < warmup_steps:
        return step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    done = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))


NORM_WORDS = ("norm",)  # module class names of normalisation layers (LayerNorm, LlamaRMSNorm, ...)


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters without weight decay: biases and the weights of normalisation layers
    (decided by parameter and module names, like the HF Trainer, not by shape: FSDP1's flat
    parameters are 1-d, so a shape rule would silently drop decay under FSDP)."""
    names = set()
    for mname, module in model.named_modules(remove_duplicate=False):
        is_norm = isinstance(module, torch.nn.LayerNorm | torch.nn.GroupNorm) or any(
            w in type(module).__name__.lower() for w in NORM_WORDS)
        for pname, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            if is_norm or pname == "bias" or pname.endswith("_bias"):
                names.add(f"{mname}.{pname}" if mname else pname)
    return names


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW; weight decay on everything but biases and normalisation weights (no_decay_names), as
    the HF Trainer does: the same groups unwrapped, under DDP and under FSDP."""
    skip = no_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if n not in skip]
    rest = [p for n, p in named if n in skip]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def make_scheduler(optimizer, total_steps: int, warmup_ratio: float, min_ratio: float = 0.0):
    """LambdaLR of lr_factor: warm-up over ceil(warmup_ratio x total_steps) steps, then cosine."""
    warmup = math.ceil(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, min_ratio))
