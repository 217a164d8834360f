"""Precision of `opsft train`: the parameter dtype (TrainConfig.dtype: float32, or float64, the
exactness reference in which the tests compare worker splits, micro-batch splits, resumes and one
process), and bf16 compute (TrainConfig.autocast: `wants_bf16`, `autocast_context`; under FSDP the
same decision picks bf16 mixed precision instead of autocast, opsft.train.strategy).

Why float64 for those comparisons: two splits of the same global batch sum the same terms in
another order, so they differ by rounding (about n * eps relative for n terms), and AdamW's
update lr * m / (sqrt(v) + eps_adam) moves a weight by up to lr / eps_adam times a change of its
gradient (3e-3 / 1e-8 = 3e5 in the tests' runs). In float32 (eps 1.2e-7) that turns rounding
into weight differences of about 1e-5 after a few steps; in float64 (eps 2.2e-16) the same
amplification leaves them some 1e9 times smaller.

float64 must hold end to end. Two parts compute in float32 whatever the model's dtype:
opsft.method.cll (its compute_dtype follows the logits' dtype) and transformers' RMSNorm of the Llama
family, which upcasts to float32 and back (`hidden_states.to(torch.float32)` in
modeling_llama.py): for a float64 model that is a downcast, so every norm output would carry
float32 rounding, and two splits whose inputs differ by 1e-16 would now and then round to
neighbouring float32 values (6e-8 apart), which AdamW amplifies like any float32 noise.
`to_dtype(model, "float64")` gives such norms a forward computed in promote_types(input dtype,
float32): for float32 / bf16 inputs the same operations as transformers' (checked bitwise on each
module it changes), for float64 inputs float64. The rotary angles stay float32 (transformers
computes them so): they depend on the position only, the same in every split, so they add no
split noise.

    model = to_dtype(model, "float64")
    with autocast_context(device, "auto"):   # bf16 on a bf16 GPU, else nothing
        ...
"""

from __future__ import annotations

import contextlib
import types

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def wants_bf16(device: torch.device, mode: str) -> bool:
    """bf16 compute for mode 'bf16', or 'auto' on a CUDA device that supports bf16."""
    return mode == "bf16" or (mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def autocast_context(device: torch.device, mode: str):
    """bf16 autocast when wants_bf16(device, mode); else nothing."""
    if not wants_bf16(device, mode):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_dtype(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """`model` (in place) with its parameters and buffers in dtype `name`; for float64, its
    float32-upcasting RMSNorms compute in float64 too (module docstring)."""
    dtype = torch_dtype(name)
    model.to(dtype)
    if dtype == torch.float64:
        for module in model.modules():
            if _is_upcasting_rms_norm(module):
                _widen_rms_norm(module)
    return model


def _is_upcasting_rms_norm(module: torch.nn.Module) -> bool:
    """transformers' Llama-family RMSNorm (Llama, Mistral, Qwen2/3, SmolLM, ...): weight * x / rms(x),
    with `variance_epsilon`. Other norms (Gemma's 1 + weight, LayerNorm) are left alone."""
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.nn.Parameter))


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _widen_rms_norm(module: torch.nn.Module) -> None:
    if getattr(module.forward, "__func__", None) is _rms_norm_forward:
        return
    if module.weight.is_meta:  # an FSDP worker's structure (no values): rank 0 checks the same class
        module.forward = types.MethodType(_rms_norm_forward, module)
        return
    # the same function as the module's own on a float32 input, or the module is not the Llama form
    probe = torch.randn(3, module.weight.shape[-1], generator=torch.Generator().manual_seed(0))
    probe = probe.to(module.weight.device)
    with torch.no_grad():
        same = torch.equal(module(probe), _rms_norm_forward(module, probe))
    if not same:
        raise ValueError(f"dtype float64: {type(module).__name__} computes in float32 and is not the Llama-family "
                         "RMSNorm opsft knows how to widen; train this model with dtype float32")
    module.forward = types.MethodType(_rms_norm_forward, module)
