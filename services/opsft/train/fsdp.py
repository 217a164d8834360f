"""FSDP2 sharding of a LossHead, and its checkpoints (distributed checkpointing).

`shard(head, device, bf16)`: torch.distributed.fsdp.fully_shard on every decoder layer (the
classes a transformers model names in `_no_split_modules`), on the input embeddings when the
head does not share their weight, then on the LossHead itself (the root unit: final norm and LM
head, and the embeddings when tied). Each unit's parameters are whole only from its forward to
the end of its backward, so a worker holds its 1/W shard of every parameter, gradient and AdamW
moment plus one or two whole layers at a time. With bf16, the policy is
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32): the shards stay float32 (the
optimiser's master weights), the forward and backward run on bf16 copies gathered for each unit,
and gradients are reduce-scattered in float32. Without it everything stays in the parameter dtype
(float64 for the exactness tests).

Checkpoints under FSDP hold two views of the same state:
- `shards/`, torch.distributed.checkpoint (DCP) of {"model", "optim"} as sharded state dicts: every
  worker writes its own shards (no gather), and a resume loads them back into shards, whatever the
  number of workers (DCP reshards on load). `load_shards` also loads them into an unsharded model
  (DDP, or one process);
- the Hugging Face folder, gathered once to rank 0 (`full_model_state`) for transformers and vLLM.

    head = shard(LossHead(model), device, bf16=True)
    optimizer = make_optimizer(head, ...)
"""

from __future__ import annotations

from pathlib import Path

import torch

SHARDS = "shards"  # the DCP folder inside a checkpoint


def decoder_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a transformers causal LM: the modules of the classes it lists in
    `_no_split_modules` (what must stay whole on one device: one FSDP unit each)."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(lm).__name__}: cannot find its decoder layers to shard (no module of the classes in "
                         f"_no_split_modules={sorted(names)}); use strategy ddp")
    return layers


def mixed_precision(bf16: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(head: torch.nn.Module, device: torch.device, bf16: bool, reshard_after_forward: bool = True):
    """Shard a LossHead in place over all workers of the default process group; returns it (now an
    FSDPModule). Rank 0's weights are the model's (on any device: the shards go to `device`); the
    other workers' may be on the meta device (load_for_training(meta=True)): each worker receives
    its shards from rank 0, and the buffers (rotary frequencies) too, so no worker but rank 0 ever
    holds the whole model."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    whole = head.state_dict() if dist.get_rank() == 0 else {}  # references, not copies
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, mp_policy=mixed_precision(bf16))
    lm = head.lm
    for layer in decoder_layers(lm):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    embed, out = lm.get_input_embeddings(), lm.get_output_embeddings()
    if out is None or out.weight is not embed.weight:  # tied: one parameter, so one unit (the root)
        fully_shard(embed, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(head, **kw)  # the root: FSDP keeps it gathered from forward to backward
    if any(p.is_meta for p in head.parameters()) or any(b.is_meta for b in head.buffers()):
        head.to_empty(device=device)
    set_model_state_dict(head, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in head.buffers():  # persistent or not (rotary inv_freq is not in the state dict)
        dist.broadcast(buffer, src=0)
    return head


def _strip(state: dict, prefix: str = "lm.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def full_model_state(wrapped, optimizer) -> tuple[dict, None]:
    """The whole model's state dict on rank 0 (CPU, keys of the causal LM), {} elsewhere: a collective
    (every worker gathers its shards). No optimiser state: that is in the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = _strip(get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    # a tied parameter is gathered once per name: keep one (what transformers saves and expects)
    lm = wrapped.lm
    aliases = {n for n, _ in lm.named_parameters(remove_duplicate=False)} - {n for n, _ in lm.named_parameters()}
    return {k: v for k, v in state.items() if k not in aliases}, None


def save_shards(wrapped, optimizer, folder: str | Path) -> None:
    """This worker's shards of the model and optimiser state into folder/shards (DCP; a collective).
    Each worker may write into a folder of its own: the files are named by rank, and rank 0 writes
    the metadata, so the union of the folders is the checkpoint (what Ray Train uploads)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(wrapped, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(Path(folder) / SHARDS))


def load_shards(wrapped, optimizer, folder: str | Path) -> None:
    """Load folder/shards into the model and optimiser, sharded or not (DCP reshards to this run's
    workers; a collective when a process group is up)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(folder) / SHARDS
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{folder}: no sharded training state ({SHARDS}/.metadata); the checkpoint is "
                                "incomplete")
    model_state, optim_state = get_state_dict(wrapped, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(wrapped, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
