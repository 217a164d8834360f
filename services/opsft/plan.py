"""Will it fit? Per-GPU memory of every stage of a job, cycle or service, by arithmetic from the
model's config.json (no weights needed), so a misfit is refused in seconds instead of after model
loading (`opsft plan`, and the same check before any command starts an engine or a worker).

    shape = read_shape("/models/qwen2.5-7b")          # a folder holding config.json is enough
    stages = plan_config(cfg, shape, gpu_bytes=80 * GIB)
    print(format_plan(stages))

Each figure is an estimate from the shapes, written so it can be checked by hand (docs/planning.md
gives every formula). A stage that runs on CPU is listed and not checked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1 << 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
CUDA_CONTEXT = 1 * GIB  # per GPU process: CUDA context, NCCL buffers, allocator slack
VLLM_GRAPHS = GIB // 2  # vLLM's CUDA graphs (not with enforce_eager)
VLLM_MAX_NUM_SEQS = 256  # vLLM's default sequences per step: the sampler's float32 logits
DEFAULT_GPU = "H100-80GB"
# Memory of the accelerators Ray names (ray.util.accelerators): GiB per GPU. An A100 is taken as 40 GiB
# (the smaller one) unless the node says 80G.
ACCELERATOR_GIB = {"H100": 80, "H200": 141, "B200": 180, "A100-80G": 80, "A100": 40, "A100-40G": 40, "L40S": 48,
                   "L4": 24, "A10G": 24, "V100": 16, "T4": 16}
# Families whose MLP is two matrices (up, down) rather than gated (gate, up, down).
UNGATED_MLP = {"gpt2", "gpt_neox", "gptj", "gpt_neo", "opt", "phi", "bloom", "falcon", "gpt_bigcode", "starcoder2",
               "mpt", "codegen", "biogpt", "xglm"}
QKV_BIAS = {"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"}


class PlanError(ValueError):
    """A configuration whose GPU stages cannot fit, one line per stage that does not."""


# ---------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class Shape:
    """What the memory of a decoder depends on, read from its config.json."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    context: int | None
    params: int  # all parameters
    layer_params: int  # the largest decoder layer (an FSDP unit)
    kv_dim: int  # per layer and token, keys and values together (elements)

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def root_params(self) -> int:
        """FSDP's root unit: the embeddings, the head when untied, the final norm."""
        return self.head_params * (1 if self.tied else 2) + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1) -> int:
        return self.layers * self.kv_dim * dtype_bytes // tp


def _text_config(config: dict) -> dict:
    text = config.get("text_config") or config.get("llm_config")
    return {**config, **text} if isinstance(text, dict) else config


def shape_from_config(config: dict, name: str = "model") -> Shape:
    """The Shape of a Hugging Face decoder config (its text part for multimodal models). Parameter
    counts are computed from the shapes: attention (grouped-query, or DeepSeek's latent attention),
    gated or plain MLP, mixture of experts (routed + shared experts, a router, dense first layers),
    RMS norms, embeddings and an untied head."""
    cfg = _text_config(config)

    def get(*keys, default=None):
        return next((cfg[k] for k in keys if cfg.get(k) is not None), default)

    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head", "num_heads")
    vocab = get("vocab_size", "padded_vocab_size")
    missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if not v]
    if missing:
        raise ValueError(f"{name}: config.json has no {', '.join(missing)}: not a decoder config opsft can size")
    kv_heads = get("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num",
                   default=1 if cfg.get("multi_query") else heads)
    head_dim = get("head_dim", default=hidden // heads)
    intermediate = get("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", default=4 * hidden)
    model_type = str(cfg.get("model_type", ""))
    mlp_mats = 2 if model_type in UNGATED_MLP else 3

    if cfg.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek-V2/V3): vLLM caches the latent
        rope, nope = get("qk_rope_head_dim", default=64), get("qk_nope_head_dim", default=128)
        v_dim, q_rank, kv_rank = get("v_head_dim", default=128), cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
        q = hidden * q_rank + q_rank * heads * (nope + rope) if q_rank else hidden * heads * (nope + rope)
        attention = q + hidden * (kv_rank + rope) + kv_rank * heads * (nope + v_dim) + heads * v_dim * hidden
        kv_dim = kv_rank + rope
    else:
        attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
        if model_type in QKV_BIAS or cfg.get("attention_bias"):
            attention += heads * head_dim + 2 * kv_heads * head_dim
        kv_dim = 2 * kv_heads * head_dim
    dense_mlp = mlp_mats * hidden * intermediate
    experts = get("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", default=0)
    if experts:
        expert_size = get("moe_intermediate_size", "expert_intermediate_size", default=intermediate)
        shared = get("shared_expert_intermediate_size", default=get("n_shared_experts", default=0) * expert_size)
        moe_mlp = experts * mlp_mats * hidden * expert_size + mlp_mats * hidden * shared + experts * hidden
        if cfg.get("shared_expert_intermediate_size"):
            moe_mlp += hidden  # Qwen-MoE's shared-expert gate
        dense_layers = min(layers, get("first_k_dense_replace", default=0))
    else:
        moe_mlp, dense_layers = dense_mlp, layers
    norms = 2 * hidden
    dense_layer, moe_layer = attention + dense_mlp + norms, attention + moe_mlp + norms
    tied = bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True)))
    embed = vocab * hidden
    params = embed * (1 if tied else 2) + dense_layers * dense_layer + (layers - dense_layers) * moe_layer + hidden
    context = get("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    return Shape(name=name, vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                 head_dim=head_dim, intermediate=intermediate, tied=tied, context=context, params=params,
                 layer_params=max(dense_layer if dense_layers else 0, moe_layer if layers > dense_layers else 0),
                 kv_dim=kv_dim)


def read_shape(model: str | os.PathLike) -> Shape:
    """The Shape of a model folder (or s3:// folder) holding config.json; weights are not needed."""
    from opsft.data import storage

    text = storage.read_bytes(storage.join(str(model), "config.json")).decode()
    return shape_from_config(json.loads(text), Path(str(model)).name or str(model))


# ---------------------------------------------------------------------------- stages


@dataclass
class StagePlan:
    """One stage's memory on its busiest GPU: `items` (bytes) against `budget` (bytes)."""

    stage: str
    runs: str  # what holds the GPU: "vllm score runner", "hf engine", "train fsdp x64", ...
    gpu: bool  # False: runs on CPU, not checked
    budget: float = 0.0
    items: dict[str, float] = field(default_factory=dict)
    checks: list[tuple[str, float, float]] = field(default_factory=list)  # (what, need, have): need <= have
    fixes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def need(self) -> float:
        return sum(self.items.values())

    @property
    def headroom(self) -> float:
        return self.budget - self.need

    @property
    def fits(self) -> bool:
        return not self.gpu or (self.headroom >= 0 and all(need <= have for _, need, have in self.checks))

    def to_json(self) -> dict:
        return {"stage": self.stage, "runs": self.runs, "gpu": self.gpu, "fits": self.fits,
                "budget_gib": _gib(self.budget), "need_gib": _gib(self.need), "headroom_gib": _gib(self.headroom),
                "items_gib": {k: _gib(v) for k, v in self.items.items()},
                "checks": [{"what": w, "need_gib": _gib(n), "have_gib": _gib(h)} for w, n, h in self.checks],
                "fixes": self.fixes, "notes": self.notes}


def _gib(x: float) -> float:
    return round(x / GIB, 3)


def engine_dtype(engine) -> str:
    """The dtype an engine's body runs in: its setting, else bfloat16 for vLLM, float32 for hf."""
    return engine.dtype or ("bfloat16" if engine.kind == "vllm" else "float32")


def max_len(engine, shape: Shape) -> int:
    """The sequence length an engine is sized for: max_model_len, else the model's context bounded by
    opsft.engines.base.DEFAULT_MAX_MODEL_LEN (as the engines do)."""
    from opsft.engines.base import DEFAULT_MAX_MODEL_LEN

    return engine.max_model_len or min(shape.context or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)


def plan_engine(stage: str, engine, shape: Shape, gpu_bytes: float, *, runners: tuple[str, ...],
                gpus: float, sequences: int = 1, reload: bool = False) -> StagePlan:
    """An engine stage: `runners` are the vLLM runners it starts ("score", "generate"); `gpus` the GPUs
    of its actor (0: CPU); `sequences` the sequences of max_len a step must hold at once (hinted
    decoding pairs two); `reload`: a service that loads the next model before it drops the last."""
    if engine.kind == "fake":
        return StagePlan(stage, "fake engine", gpu=False, notes=["no model"])
    on_gpu = gpus > 0 or (engine.device or "").startswith("cuda")
    if not on_gpu:
        return StagePlan(stage, f"{engine.kind} engine", gpu=False)
    b = BYTES[engine_dtype(engine)]
    length = max_len(engine, shape)
    head = shape.head_params * 4  # the float32 LM head opsft applies itself (exact CLL)
    chunk = 2 * 1024 * shape.vocab * 4  # a chunk's float32 logits and their exp
    if engine.kind == "vllm":
        plan = _plan_vllm(stage, engine, shape, gpu_bytes, runners, gpus, sequences, b, length, head, chunk)
    else:
        plan = _plan_hf(stage, engine, shape, gpu_bytes, runners, gpus, sequences, b, length, head, chunk)
    if reload:  # the service loads the next model beside the current one, then drops the old
        plan.items["the next model during a reload"] = plan.need - CUDA_CONTEXT
        if plan.headroom < 0:
            plan.fixes.append("a smaller memory share (gpu_memory_utilization at most ~0.4 for vLLM): a reload "
                              "holds two engines on the GPU")
    return plan


def _plan_hf(stage, engine, shape, gpu_bytes, runners, gpus, sequences, b, length, head, chunk) -> StagePlan:
    plan = StagePlan(stage, f"hf engine ({_dtype_name(b)})", gpu=True, budget=gpu_bytes * min(gpus or 1.0, 1.0))
    plan.items["weights"] = shape.params * b
    if "score" in runners:
        if b != 4:
            plan.items["fp32 head"] = head  # cast per scoring call
        tokens = engine.score_batch_tokens or engine.max_batch_tokens
        plan.items["activations"] = tokens * (2 * shape.intermediate + 4 * shape.hidden) * b
        plan.items["head chunk"] = chunk
    if "generate" in runners:
        # a generation batch holds up to max(max_batch_tokens, one whole sequence) tokens (engines/hf.py)
        plan.items["kv cache"] = sequences * max(engine.max_batch_tokens, length) * shape.kv_bytes_per_token(b)
        plan.items.setdefault("activations", sequences * engine.max_batch_size * shape.vocab * 4)
    plan.items["cuda context"] = CUDA_CONTEXT
    if plan.headroom < 0:
        if b == 4:
            plan.fixes.append("engine.dtype: bfloat16 (the head and the softmax stay float32)")
        plan.fixes.append("engine.kind: vllm with tensor_parallel_size > 1, or fewer rows per batch "
                          "(max_batch_size, max_batch_tokens)")
    return plan


def _plan_vllm(stage, engine, shape, gpu_bytes, runners, gpus, sequences, b, length, head, chunk) -> StagePlan:
    tp = engine.tensor_parallel_size
    both = set(runners) == {"score", "generate"}
    shares = {r: engine.gpu_memory_utilization * ((engine.score_memory_share if r == "score" else
                                                   1 - engine.score_memory_share) if both else 1.0)
              for r in runners}
    plan = StagePlan(stage, f"vllm {'+'.join(runners)} runner{'s' if both else ''} ({_dtype_name(b)}, tp {tp})",
                     gpu=True, budget=gpu_bytes)
    if gpus and gpus < tp:
        plan.checks.append((f"pool.num_gpus {gpus:g} holds tensor_parallel_size {tp} GPUs", tp, gpus))
        plan.fixes.append(f"pool.num_gpus: {tp} (one GPU per tensor-parallel rank)")
    if gpus and gpus < 1 and engine.gpu_memory_utilization > gpus:
        plan.checks.append((f"gpu_memory_utilization {engine.gpu_memory_utilization:g} within the actor's "
                            f"{gpus:g} GPU", engine.gpu_memory_utilization, gpus))
        plan.fixes.append(f"engine.gpu_memory_utilization: at most {gpus:g} (the actor's share of the GPU)")
    weights = shape.params * b / tp
    kv_token = shape.kv_bytes_per_token(b, tp)
    for runner, share in shares.items():
        budget = share * gpu_bytes  # vLLM's gpu_memory_utilization: weights, activations, graphs, the rest kv cache
        act = _vllm_activations(engine, shape, b, tp, length, runner)
        kv = budget - weights - act - VLLM_GRAPHS
        plan.items.update({f"{runner}: weights": weights, f"{runner}: activations": act,
                           f"{runner}: cuda graphs": VLLM_GRAPHS, f"{runner}: kv cache": max(kv, 0)})
        plan.notes.append(f"{runner} runner: memory share {share:.3g} of the GPU = {_gib(budget):g} GiB; kv cache "
                          f"{max(int(kv // kv_token), 0)} tokens ({_gib(kv_token * 1024):g} GiB per 1k tokens)")
        want = (sequences if runner == "generate" else 1) * length * kv_token
        plan.checks.append((f"{runner} runner's kv cache holds {sequences if runner == 'generate' else 1} x "
                            f"max_model_len {length}", want, max(kv, 0)))
        if kv < want:
            fit_len = max(int((kv / max(sequences if runner == 'generate' else 1, 1)) // kv_token), 0)
            fix = [f"a larger share (gpu_memory_utilization{', score_memory_share' if both else ''})"]
            if b == 4:
                fix.insert(0, "engine.dtype: bfloat16")
            if weights > budget / 2:
                fix.append(f"tensor_parallel_size: {tp * 2}")
            fix.append(f"max_model_len: {fit_len}" if fit_len >= 256 else "a smaller model")
            plan.fixes.append(f"{runner} runner: " + " or ".join(fix))
    if "score" in runners and engine.scorer == "exact":
        plan.items["fp32 head"] = head
        plan.items["head chunk"] = chunk
        plan.items["hidden states of a call"] = engine.max_batch_tokens * shape.hidden * 4
    plan.items["cuda context"] = CUDA_CONTEXT
    if plan.headroom < 0:
        plan.fixes.append("engine.gpu_memory_utilization lower: the fp32 head and the CUDA context live beside "
                          "vLLM's share")
    return plan


def _dtype_name(b: int) -> str:
    return {2: "bf16", 4: "fp32", 8: "fp64"}[b]


def _vllm_activations(engine, shape: Shape, b: int, tp: int, length: int, runner: str) -> float:
    """vLLM's profiled peak besides weights and kv cache: one step of max_num_batched_tokens through the
    widest layer, and for the generate runner the sampler's float32 logits of every sequence."""
    tokens = max(length, 8192 if runner == "score" else 65536)
    act = tokens * (2 * shape.intermediate / tp + 4 * shape.hidden) * b
    if runner == "generate":
        act += VLLM_MAX_NUM_SEQS * shape.vocab * 4
    return act


def plan_train(cfg, shape: Shape, gpu_bytes: float, strategy: str | None = None) -> StagePlan:
    """A Ray Train worker's GPU: training state (AdamW, float32 master weights: 16 bytes a parameter,
    all of it under DDP, 1/W of it under FSDP plus the units in flight), activations of one micro-batch
    and the loss head (docs/training.md, What fits where)."""
    s = cfg.scaling
    strategy = strategy or (s.strategy if s.strategy != "auto" else "ddp")
    W = s.num_workers
    plan = StagePlan("train", f"train {strategy} x{W}", gpu=s.use_gpu, budget=gpu_bytes * min(s.gpus_per_worker, 1))
    if not s.use_gpu:
        return plan
    P = shape.params
    bf16 = cfg.autocast != "off" and cfg.dtype == "float32"
    a = 2 if bf16 else BYTES[cfg.dtype]
    if strategy == "fsdp":
        plan.items["weights + grads + adam (sharded)"] = 16 * P / W
        unit = max(shape.layer_params, shape.root_params)
        plan.items["units in flight"] = 2 * shape.layer_params * a + unit * (a + 4)
    else:
        plan.items["weights + grads + adam"] = 16 * P
        if bf16:
            plan.items["bf16 weight copies (autocast)"] = 2 * P
    length = cfg.max_length or shape.context or 4096
    tokens = cfg.micro_batch_size * length
    d, kv, ff = shape.hidden, shape.kv_dim // 2, shape.intermediate
    per_layer = a * (8 * d + 2 * kv + 4 * ff) + 8 * d
    if cfg.gradient_checkpointing:
        plan.items["activations"] = tokens * (shape.layers * a * d + per_layer)
    else:
        plan.items["activations"] = tokens * shape.layers * per_layer
    if cfg.fused_head:
        plan.items["loss head"] = 2 * 1024 * shape.vocab * 4 + shape.head_params * 4 * (2 if a != 4 else 1)
    else:
        plan.items["loss head"] = tokens * shape.vocab * (a + 4 + 4)
    plan.items["cuda context"] = CUDA_CONTEXT
    plan.notes.append(f"micro-batch {cfg.micro_batch_size} x {length} tokens")
    if plan.headroom < 0:
        if strategy == "ddp":
            plan.fixes.append("scaling.strategy: fsdp (or auto)")
        elif 16 * P / W > gpu_bytes / 4:
            plan.fixes.append(f"more workers (scaling.num_workers {W * 2})")
        if not cfg.gradient_checkpointing:
            plan.fixes.append("gradient_checkpointing: true")
        plan.fixes.append(f"fewer tokens per micro-batch (micro_batch_size {cfg.micro_batch_size}, max_length "
                          f"{length})")
    return plan


def choose_strategy(cfg, shape: Shape, gpu_bytes: float) -> str:
    """TrainScaling.strategy auto: ddp where it fits (and on CPU or one worker), else fsdp."""
    if cfg.scaling.strategy != "auto":
        return cfg.scaling.strategy
    if not cfg.scaling.use_gpu or plan_train(cfg, shape, gpu_bytes, "ddp").fits:
        return "ddp"
    return "fsdp"


# ---------------------------------------------------------------------------- configs


def _rewrite_stages(cfg, engine, pool, shape, gpu_bytes, per_stage: bool) -> list[StagePlan]:
    from opsft.recipe_plan import STAGE_NEEDS
    from opsft.stages import engine_stages

    plans = []
    for stage, eng, pl in engine_stages(cfg, engine, pool):
        need = STAGE_NEEDS[stage]
        # a Ray job gives each stage its own actors; in-process one engine serves every stage
        runners = stage_runners(eng, need) if per_stage else eng.runners or ("score", "generate")
        plans.append(plan_engine(f"rewrite/{stage}", eng, shape, gpu_bytes, runners=runners,
                                 gpus=pl.num_gpus if per_stage else local_gpus(eng),
                                 sequences=2 if need == "decode" else 1))
    return plans


def stage_runners(engine, need: str) -> tuple[str, ...]:
    """The vLLM runners a stage's engine starts (EngineConfig.for_stage): its own `runners` if set, else
    the one its capability uses (exact scoring: the pooling runner; everything else: generate)."""
    return engine.for_stage(need).runners or ("score", "generate")


def local_gpus(engine) -> float:
    """The GPUs an engine built in this process takes: a vLLM engine (the CUDA build) its tensor-parallel
    ranks, an hf engine on cuda one, else none."""
    if engine.kind == "vllm":
        return engine.tensor_parallel_size
    return 1.0 if engine.kind == "hf" and (engine.device or "").startswith("cuda") else 0.0


def plan_config(cfg, shape: Shape, gpu_bytes: float) -> list[StagePlan]:
    """Every stage of a Score / Rewrite / Realign / Train / Serve / Eval config. An in-process run's engine
    takes this machine's GPUs (local_gpus); a Ray job's actors the pool's num_gpus."""
    from opsft import config as C

    if isinstance(cfg, C.ScoreConfig):
        gpus = cfg.pool.num_gpus if cfg.distributed else local_gpus(cfg.engine)
        return [plan_engine("score", cfg.engine, shape, gpu_bytes, runners=stage_runners(cfg.engine, "score"),
                            gpus=gpus)]
    if isinstance(cfg, C.EvalConfig):  # generation and scoring on one in-process engine
        return [plan_engine("eval", cfg.engine, shape, gpu_bytes, runners=cfg.engine.runners or ("score", "generate"),
                            gpus=local_gpus(cfg.engine))]
    if isinstance(cfg, C.RewriteConfig):
        return _rewrite_stages(cfg, cfg.engine, cfg.pool, shape, gpu_bytes, per_stage=cfg.distributed)
    if isinstance(cfg, C.TrainConfig):
        return [plan_train(cfg, shape, gpu_bytes, choose_strategy(cfg, shape, gpu_bytes))]
    if isinstance(cfg, C.ServeConfig):
        return [plan_engine("serve", cfg.engine, shape, gpu_bytes, runners=stage_runners(cfg.engine, "score"),
                            gpus=cfg.num_gpus, reload=True)]
    if isinstance(cfg, C.RealignConfig):
        score = plan_engine("score", cfg.engine, shape, gpu_bytes, runners=stage_runners(cfg.engine, "score"),
                            gpus=cfg.pool.num_gpus)
        return [score, *_rewrite_stages(cfg.rewrite, cfg.engine, cfg.pool, shape, gpu_bytes, per_stage=True),
                plan_train(cfg.train, shape, gpu_bytes, choose_strategy(cfg.train, shape, gpu_bytes))]
    raise TypeError(f"no plan for {type(cfg).__name__}")


def format_plan(stages: list[StagePlan], shape: Shape, gpu_bytes: float) -> str:
    lines = [f"model {shape.name}: {shape.params / 1e9:.2f} B parameters, vocab {shape.vocab}, {shape.layers} layers, "
             f"hidden {shape.hidden}, kv heads {shape.kv_heads}, context {shape.context}; GPU {_gib(gpu_bytes):g} GiB"]
    for s in stages:
        if not s.gpu:
            lines.append(f"{s.stage}: {s.runs}: runs on CPU, not checked")
            continue
        verdict = "fits" if s.fits else "DOES NOT FIT"
        lines.append(f"{s.stage}: {s.runs}: {verdict}, needs {_gib(s.need):g} of {_gib(s.budget):g} GiB, "
                     f"headroom {_gib(s.headroom):g} GiB")
        lines += [f"    {k}: {_gib(v):g} GiB" for k, v in s.items.items()]
        lines += [f"    check: {w}: needs {_gib(n):g}, has {_gib(h):g}" + ("" if n <= h else "  << short")
                  for w, n, h in s.checks]
        lines += [f"    {n}" for n in s.notes]
    lines += [misfit_line(s) for s in stages if not s.fits]
    return "\n".join(lines)


def misfit_line(s: StagePlan) -> str:
    short = [f"{w} (short by {_gib(n - h):g} GiB)" if "GPU" not in w else w for w, n, h in s.checks if n > h]
    if s.headroom < 0:
        short.insert(0, f"needs {_gib(s.need):g} GiB of {_gib(s.budget):g} (over by {_gib(-s.headroom):g} GiB)")
    return f"{s.stage} does not fit: {'; '.join(short)}; change: {'; '.join(dict.fromkeys(s.fixes)) or '-'}"


# ---------------------------------------------------------------------------- the check before a run


def gpu_memory(explicit_gib: float | None = None) -> tuple[float | None, str]:
    """(bytes per GPU, where it came from): the given GiB, $OPSFT_GPU_MEMORY_GIB, this process's GPU, or
    the accelerator type a Ray cluster reports; (None, why) when none is known."""
    if explicit_gib:
        return explicit_gib * GIB, "given"
    if os.environ.get("OPSFT_GPU_MEMORY_GIB"):
        return float(os.environ["OPSFT_GPU_MEMORY_GIB"]) * GIB, "OPSFT_GPU_MEMORY_GIB"
    try:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory), torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    from opsft.cluster import accelerator_types

    types = accelerator_types()
    known = [ACCELERATOR_GIB[t] for t in types if t in ACCELERATOR_GIB]
    if known:
        return min(known) * GIB, f"the Ray cluster's {', '.join(types)}"
    return None, "no GPU here and none given (OPSFT_GPU_MEMORY_GIB)"


# Any decoder: where a stage runs does not depend on the model (has_gpu_stage plans with it).
_ANY_SHAPE = shape_from_config({"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                                "vocab_size": 128}, "any")


def has_gpu_stage(cfg) -> bool:
    """Whether any stage of cfg runs on a GPU (the same rule as plan_config's)."""
    return any(s.gpu for s in plan_config(cfg, _ANY_SHAPE, 80 * GIB))


def preflight(cfg, model: str | None = None, log=None) -> list[StagePlan] | None:
    """The plan's check before a command starts any engine or worker: raises PlanError (one line per
    stage that does not fit) when a GPU stage cannot fit. Does nothing for a config without GPU stages,
    and only logs when the model's config.json or the GPU's memory cannot be known here."""
    import logging

    log = log or logging.getLogger("opsft.plan")
    if not has_gpu_stage(cfg):
        return None
    gpu_bytes, source = gpu_memory()
    if gpu_bytes is None:
        log.info("plan: GPU stages not checked before the run: %s", source)
        return None
    model = model if model is not None else config_model(cfg)
    try:
        shape = read_shape(model_folder(model))
    except (OSError, ValueError, KeyError) as exc:
        log.warning("plan: GPU stages not checked before the run: no readable config.json for %s (%s)", model, exc)
        return None
    stages = plan_config(cfg, shape, gpu_bytes)
    bad = [misfit_line(s) for s in stages if not s.fits]
    if bad:
        raise PlanError(f"{len(bad)} stage(s) cannot fit a {_gib(gpu_bytes):g} GiB GPU ({source}; opsft plan "
                        f"prints the figures): " + " | ".join(bad))
    return stages


def config_model(cfg) -> str | None:
    engine = getattr(cfg, "engine", None)
    return getattr(cfg, "model", None) or (engine.model if engine is not None else None)


def model_folder(model: str | None) -> str:
    from opsft.data import storage

    if model is None or model in ("", "default"):
        from opsft.models import default_model_dir

        return str(default_model_dir())
    if storage.is_uri(model) or Path(model).is_dir():
        return model
    raise FileNotFoundError(f"{model}: not a local folder (a hub id is not read here)")


# ---------------------------------------------------------------------------- reading a config file


CONFIG_KINDS = ("score", "rewrite", "realign", "train", "serve")  # what `opsft plan --kind` names


def load_any_config(path: str, kind: str | None = None) -> Any:
    """A Score / Rewrite / Realign / Train / Serve config from a YAML file: opsft's own, a Ray Serve
    config (the opsft application's args), a Kubernetes ConfigMap holding one (its first opsft
    YAML), or a RayService (its serveConfigV2). `kind` forces the config type."""
    import yaml

    from opsft import config as C

    data = yaml.safe_load(Path(path).read_text()) or {}
    data = _unwrap(data)
    kinds = dict(zip(CONFIG_KINDS, (C.ScoreConfig, C.RewriteConfig, C.RealignConfig, C.TrainConfig, C.ServeConfig),
                     strict=True))
    kind = kind or _guess_kind(data)
    try:
        return kinds[kind].model_validate(data)
    except Exception as exc:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            raise C.ConfigError(f"{path} (as a {kind} config): {C.describe_errors(exc, path=path)}") from None
        raise


def _unwrap(data: Any) -> dict:
    import yaml

    if not isinstance(data, dict):
        raise ValueError("a config file must hold a mapping")
    if data.get("kind") == "ConfigMap":
        for value in (data.get("data") or {}).values():
            inner = yaml.safe_load(value) if isinstance(value, str) else None
            if isinstance(inner, dict):
                return _unwrap(inner)
        raise ValueError("the ConfigMap holds no YAML mapping")
    if data.get("kind") == "RayService":
        return _unwrap(yaml.safe_load(data["spec"]["serveConfigV2"]))
    if "applications" in data:
        apps = [a for a in data["applications"] if str(a.get("import_path", "")).startswith("opsft.")]
        if not apps:
            raise ValueError("the Serve config has no opsft application")
        return apps[0].get("args") or {}
    return data


def _guess_kind(data: dict) -> str:
    keys = set(data)
    if "corpus" in keys:
        return "realign"
    if keys & {"host", "port", "app_name", "max_items", "autoscaling", "num_replicas", "api_key_env", "batching"}:
        return "serve"
    if keys & {"loss", "scaling", "lr", "global_batch_size", "micro_batch_size", "epochs", "fused_head"}:
        return "train"
    if keys & {"policy", "stages", "hint_max_new_tokens", "beta", "lambda_mode", "verifier", "missing_hint"}:
        return "rewrite"
    return "score"
