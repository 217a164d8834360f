"""The one configuration system: pydantic models (extra fields forbidden), loaded from YAML
at the edge, overridden by command-line flags, and shared by the CLI, the Ray jobs and the
HTTP API.

    cfg = load_config(ScoreConfig, "score.yaml", {"engine.model": "/ckpt", "batch_size": 8})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from opsft.data.hints import HINT_CUTS, HINT_PROMPTS, MISSING_HINT
from opsft.data.storage import require_posix
from opsft.engines.base import DEFAULT_MAX_MODEL_LEN, DTYPES, KINDS, SCORERS
from opsft.method import loss_registry
from opsft.method.hinted_params import LAMBDA_MODES
from opsft.recipe_plan import ENGINE_STAGES, POLICIES, RewriteParams

ROWS_PER_PART = 20_000  # rows per part of a Ray Data job's output: ~500 parts for 10M rows (docs/data_jobs.md)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class FakeOptions(Strict):
    """Fault injection of the fake engine (opsft.engines.fake): what a rehearsal makes go wrong."""

    dead_after: int | None = Field(None, ge=0, description="an engine dies (every call raises a CUDA error) after "
                                   "this many calls, while `deaths` tickets last")
    deaths: int = Field(0, ge=0, description="engine deaths in all, over every process (tickets in fault_dir)")
    kill_after: int | None = Field(None, ge=0, description="a process SIGKILLs itself after this many calls, while "
                                   "`kills` tickets last")
    kills: int = Field(0, ge=0, description="process kills in all (tickets in fault_dir)")
    hang_after: int | None = Field(None, ge=0, description="a call never returns after this many calls, while `hangs` "
                                   "tickets last")
    hangs: int = Field(0, ge=0, description="hung calls in all (tickets in fault_dir)")
    fault_dir: str | None = Field(None, description="a folder every engine process can write: the tickets")
    poison_token: int | None = Field(None, ge=0, description="a sequence holding this token id raises (a row fault)")


class EngineConfig(Strict):
    """Which model runner, on which model, with what numeric settings."""

    kind: Literal[KINDS] = Field("hf", description="hf (transformers), vllm, or fake: a "
                                                "deterministic engine without a model, for rehearsals and tests")
    model: str | None = Field(None, description="local HF folder or hub id; None = the embedded default")
    dtype: Literal[DTYPES] | None = Field(
        None, description="the body's weights and activations; None = float32 for hf (the exactness reference), "
        "bfloat16 for vllm on a GPU (float32 on CPU). The LM head, the softmax, log p and H are float32 in every "
        "case (bf16 body vs fp32: docs/data_jobs.md)")
    device: str | None = Field(None, description="hf only: 'cpu', 'cuda', ...; None = cuda if available")
    max_batch_size: int = Field(16, ge=1, description="rows per forward pass")
    max_batch_tokens: int = Field(8192, ge=64, description="hf: padded tokens per forward pass; vllm: tokens "
                                  "per scoring call (bounds the hidden states held at once)")
    score_batch_tokens: int | None = Field(None, ge=64, description="hf: padded tokens per scoring forward pass; "
                                           "None = 1024 on CPU (there padding costs more than batching gains: "
                                           "docs/data_jobs.md), max_batch_tokens on CUDA")
    # vLLM only
    scorer: Literal[SCORERS] = Field("exact", description="vllm: exact = full-vocabulary H from the "
                                             "pooling runner's hidden states (as hf); topk = H estimated from "
                                             "top_k_logprobs log-probs, biased low (-0.09 nats/token measured, "
                                             "docs/data_jobs.md), temperature 1 only")
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm: GPU fraction for all its runners")
    score_memory_share: float = Field(0.4, gt=0, lt=1, description="vllm, scorer exact: the pooling runner's "
                                      "share of gpu_memory_utilization; the generate runner gets the rest")
    max_model_len: int | None = Field(None, ge=16, description="tokens per sequence the engine holds; None = the "
                                      f"model's context, at most {DEFAULT_MAX_MODEL_LEN:,}")
    runners: tuple[Literal["score", "generate"], ...] | None = Field(
        None, description="vllm: the runners this engine starts (the job sets it per stage): one runner gets all of "
        "gpu_memory_utilization; None = both, split by score_memory_share")
    top_k_logprobs: int = Field(20, ge=1, description="vllm, scorer topk: log-probs per position for the H estimate")
    fake: FakeOptions | None = Field(None, description="fake only: its fault injection (opsft.engines.fake)")

    def identity(self) -> dict[str, Any]:
        """The settings that change an engine's results (a job resumes only under the same ones)."""
        return {"kind": self.kind, "model": self.model, "dtype": self.dtype, "scorer": self.scorer}

    def for_stage(self, need: str) -> EngineConfig:
        """This engine for one stage's capability ("score", "generate", "decode"): a vLLM engine then starts
        only the runner that stage uses, with all of gpu_memory_utilization."""
        if self.kind != "vllm" or self.runners is not None:
            return self
        runner = "score" if need == "score" and self.scorer == "exact" else "generate"
        return self.model_copy(update={"runners": (runner,)})

    @model_validator(mode="after")
    def _runners_not_empty(self):
        if self.runners is not None and not self.runners:
            raise ValueError("runners: name at least one of score, generate (or leave it unset)")
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments for opsft.engines.make_engine(kind, model, **options)."""
        if self.kind == "fake":
            return {"max_length": self.max_model_len or 2048, **(self.fake.model_dump() if self.fake else {})}
        if self.kind == "hf":
            return {"dtype": self.dtype or "float32", "device": self.device, "max_batch_size": self.max_batch_size,
                    "max_batch_tokens": self.max_batch_tokens, "score_batch_tokens": self.score_batch_tokens}
        return {"dtype": self.dtype, "scorer": self.scorer, "tensor_parallel_size": self.tensor_parallel_size,
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "score_memory_share": self.score_memory_share, "max_model_len": self.max_model_len,
                "runners": self.runners,
                "max_batch_tokens": self.max_batch_tokens, "top_k_logprobs": self.top_k_logprobs}


class PoolConfig(Strict):
    """The Ray Data actor pool that holds engines."""

    min_size: int = Field(1, ge=1)
    max_size: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (tensor_parallel_size for vLLM)")
    batch_size: int = Field(64, ge=1, description="rows handed to an actor per map_batches call")
    calls_in_flight: int | None = Field(None, ge=1, description="map_batches calls one engine actor runs at once: a "
                                        "vLLM engine serves them as one stream of requests, so its scheduler stays "
                                        "full across batches (opsft.engines.vllm.Feeder); None = 4 for vLLM "
                                        "generation stages, 1 otherwise (hf engines take one call at a time)")
    max_task_retries: int = Field(3, ge=0, description="times one batch is tried again after its engine faulted or "
                                  "its actor died (a new engine each time); then the job fails, naming the cause. "
                                  "In-process: times the engine is rebuilt for one batch")
    stall_timeout_s: float | None = Field(3600.0, gt=0, description="an engine actor whose batch has run this long is "
                                          "taken for hung (a stuck device, a lost engine process): an engine fault, "
                                          "its batch retried on a new actor; None = wait for ever")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per actor, e.g. "
                                        "{engine_slot: 1} to place engines on the nodes that offer that resource")


def check_placement(engine: EngineConfig, pool: PoolConfig, where: str = "") -> None:
    """Refuse (ValueError, one line) an engine its actors cannot hold: a vLLM engine's tensor-parallel ranks
    each need a whole GPU of the actor, and a fraction of a GPU must cover vLLM's memory share."""
    if engine.kind == "hf" and (pool.calls_in_flight or 1) > 1:
        raise ValueError(f"{where + ': ' if where else ''}pool.calls_in_flight {pool.calls_in_flight}: an hf engine "
                         "takes one call at a time (set 1, or use the vllm engine)")
    if engine.kind != "vllm" or pool.num_gpus == 0:
        return
    tp, gpus = engine.tensor_parallel_size, pool.num_gpus
    at = f"{where}: " if where else ""
    if tp > 1 and (gpus != int(gpus) or gpus < tp):
        raise ValueError(f"{at}pool.num_gpus {gpus:g} cannot hold tensor_parallel_size {tp} (one whole GPU per "
                         f"rank): set pool.num_gpus: {tp}")
    if gpus < 1 and engine.gpu_memory_utilization > gpus:
        raise ValueError(f"{at}engine.gpu_memory_utilization {engine.gpu_memory_utilization:g} is more than the "
                         f"actor's {gpus:g} GPU: set it to at most {gpus:g}")


class ScoreConfig(Strict):
    input: str | None = None
    output: str | None = None
    engine: EngineConfig = EngineConfig()
    pool: PoolConfig = PoolConfig()
    include_eos: bool = False
    tokens: bool = Field(False, description="also write per-token phi as `token_phi`")
    temperature: float = Field(1.0, gt=0)
    address: str | None = Field(None, description="Ray cluster address; None = RAY_ADDRESS or a local cluster")
    distributed: bool = Field(False, description="run as a Ray Data job (else in-process)")
    rows_per_part: int = Field(ROWS_PER_PART, ge=1, description="Ray Data job: rows per output part file")

    @model_validator(mode="after")
    def _engine_fits_its_actors(self):
        check_placement(self.engine, self.pool)
        return self


ConfigT = TypeVar("ConfigT", bound=Strict)


def set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


class ConfigError(ValueError):
    """A configuration that cannot be used, said in one line: which setting, what is wrong, where it came from."""


def load_config(cls: type[ConfigT], path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> ConfigT:
    """cls from a YAML file (if given) with dotted-key overrides applied; None values are ignored.
    Raises ConfigError (one line) for an unreadable file or an invalid setting."""
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            raise ConfigError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping")
        data = loaded
    given = {key for key, value in (overrides or {}).items() if value is not None}
    for key in given:
        set_path(data, key, overrides[key])
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, given, path)) from None


def describe_errors(exc: ValidationError, flags: set[str] = frozenset(), path=None) -> str:
    """A pydantic ValidationError as one line: `key: what is wrong (got value; where it was set)`."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "config"
        source = "from a command-line flag" if key in flags else f"in {path}" if path else "in the config"
        if err["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown setting ({source}; check its spelling)")
            continue
        if err["type"] == "missing":
            parts.append(f"{key}: required, but not set")
            continue
        got = repr(err.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        parts.append(f"{key}: {msg} (got {got}, {source})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- serving (opsft serve)


class ServeAutoscaling(Strict):
    """Ray Serve autoscaling of the scorer replicas (replaces a fixed num_replicas)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="per replica")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)


class ServeConfig(Strict):
    """The CLL scoring HTTP API (opsft.serve): engine, HTTP limits, batching, replicas, auth."""

    engine: EngineConfig = EngineConfig()
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    app_name: str = "opsft-score"
    route_prefix: str = "/"
    temperature: float = Field(1.0, gt=0)
    max_items: int = Field(64, ge=1, description="items per request")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="request body size limit")
    batching: bool = Field(True, description="let concurrent requests share forward passes")
    max_batch_requests: int = Field(16, ge=1, description="requests merged into one scoring call")
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    num_replicas: int = Field(1, ge=1, description="scorer replicas when autoscaling is off")
    autoscaling: ServeAutoscaling | None = None
    max_ongoing_requests: int = Field(64, ge=1, description="per scorer replica")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per scorer replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per scorer replica (set engine.device too)")
    torch_threads: int | None = Field(None, ge=1, description="None = num_cpus rounded up")
    api_key_env: str = Field("OPSFT_API_KEY", description="environment variable holding the bearer token of "
                             "scoring and reading (/v1/score, /v1/models, /docs)")
    api_key_file: str | None = Field(None, description="file holding the bearer token (wins over the env var)")
    admin_key_env: str | None = Field("OPSFT_ADMIN_KEY", description="environment variable holding the admin token: "
                                      "POST /v1/models/reload needs it (it may also score); none = reloads refused "
                                      "unless allow_open")
    admin_key_file: str | None = Field(None, description="file holding the admin token (wins over the env var)")
    allow_open: bool = Field(False, description="start without an API key (local demos only): no key = every route "
                             "open, and without an admin key reloads too. False: no API key = the service refuses "
                             "to start")
    model_roots: list[str] = Field(default_factory=list, description="folders (or s3://... prefixes) a reload may "
                                   "load from, after resolving symlinks and '..'; empty = the folder holding "
                                   "engine.model (or current_link)")
    current_link: str | None = Field(None, description="a symlink naming the promoted checkpoint (e.g. "
                                     "/models/current): the service serves its target at start and moves it "
                                     "atomically on every successful reload; None = a promotion lasts until the "
                                     "service restarts")
    reload_timeout_s: float = Field(600.0, gt=0)
    stall_timeout_s: float = Field(600.0, gt=0, description="a scoring call that runs this long is taken for a hung "
                                   "engine: 503, and the replica is replaced")

    @model_validator(mode="after")
    def _model_paths_are_absolute(self):
        for root in self.model_roots:
            if not root.strip() or not ("://" in root or root.startswith("/")):
                raise ValueError(f"model_roots: {root!r} is not an absolute folder or a URI prefix")
        if self.current_link is not None and ("://" in self.current_link or not self.current_link.startswith("/")):
            raise ValueError(f"current_link: {self.current_link!r} must be an absolute local path (a symlink)")
        return self


# ---------------------------------------------------------------------------- training (opsft train)


def _loss_param(name: str, **bounds):
    default, description = loss_registry.PARAMS[name]
    return Field(default, description=description, **bounds)


class LossConfig(Strict):
    """The loss of `opsft train` and its parameters: the token losses (method.md section 2) or the
    preference baselines dpo / simpo (opsft.method.preference), which train on pair rows."""

    name: Literal[loss_registry.NAMES] = "idft"  # the names of opsft.method.loss_registry.LOSSES
    # each parameter's default and meaning: opsft.method.loss_registry.PARAMS
    beta: float = _loss_param("beta", gt=0)
    gamma_min: float = _loss_param("gamma_min", ge=0)
    gamma_max: float = _loss_param("gamma_max", ge=0)
    warmup_ratio: float = _loss_param("warmup_ratio", ge=0, le=1)
    transition_ratio: float = _loss_param("transition_ratio", ge=0, le=1)
    bound: float = _loss_param("bound", gt=0)
    temperature: float = Field(1.0, gt=0, description="softmax temperature of p in the loss (token losses; "
                               "dpo / simpo use the model's plain distribution and require 1)")
    dpo_beta: float = _loss_param("dpo_beta", gt=0)
    label_smoothing: float = _loss_param("label_smoothing", ge=0, lt=0.5)
    simpo_beta: float = _loss_param("simpo_beta", gt=0)
    simpo_gamma: float = _loss_param("simpo_gamma", ge=0)

    @model_validator(mode="after")
    def _pair_losses_use_temperature_one(self):
        if self.pairs and self.temperature != 1.0:
            raise ValueError(f"loss {self.name} uses the model's own log-probs: temperature must be 1")
        return self

    @property
    def pairs(self) -> bool:
        """True for the preference losses, which train on pair rows (prompt, chosen, rejected)."""
        return loss_registry.LOSSES[self.name].kind == "pair"

    def params(self) -> dict[str, float]:
        """Keyword arguments for opsft.method.losses.compute (token losses) or opsft.method.preference.pair_loss."""
        return {kw: getattr(self, name) for kw, name in loss_registry.LOSSES[self.name].params.items()}


class TrainScaling(Strict):
    """Ray Train workers (ray.train.ScalingConfig) and the data-parallel strategy."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, ge=0, description="with use_gpu")
    cpus_per_worker: float = Field(1.0, ge=0)
    strategy: Literal["auto", "ddp", "fsdp"] = Field("auto", description="auto: ddp where the whole training "
                                                      "state fits a GPU (opsft.plan), else fsdp; ddp on CPU. "
                                                      "fsdp: FSDP2 shards parameters, gradients and "
                                              "optimiser state (one unit per decoder layer); bf16 mixed precision "
                                              "when autocast resolves to bf16")


class MlflowTracking(Strict):
    """MLflow tracking of `opsft train` (opsft.train.tracking; the `tracking` extra)."""

    enabled: bool = False
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI, else a sqlite store in "
                                     "<output_dir>/mlruns/ (mlflow.db, artifacts/); a folder: a sqlite store in it; "
                                     "http(s)://... a tracking server")
    experiment: str = Field("opsft", min_length=1, description="created when missing")
    run_name: str | None = Field(None, description="None: MLflow's generated name")


class WandbTracking(Strict):
    """Weights & Biases tracking of `opsft train` (opsft.train.tracking; the `tracking` extra): on when `project`
    is set."""

    project: str | None = None
    entity: str | None = None
    mode: Literal["offline", "online"] = Field("offline", description="offline: no network, the run folder under "
                                               "<output_dir>/wandb/ (`wandb sync` uploads it); WANDB_MODE wins")
    run_name: str | None = None


class TrackingConfig(Strict):
    """Where `opsft train` logs params, per-step metrics and the final checkpoint, besides metrics.jsonl and
    TensorBoard (docs/training.md, "Experiment tracking")."""

    mlflow: MlflowTracking = MlflowTracking()
    wandb: WandbTracking = WandbTracking()
    log_checkpoint: Literal["auto", "path", "files"] = Field(
        "auto", description="the final checkpoint: files = uploaded as an artifact (MLflow artifacts, a W&B Artifact "
        "of type model), path = its location only (MLflow tag / W&B summary `checkpoint`); auto = files up to "
        "checkpoint_files_max_mb (a local folder), else path")
    checkpoint_files_max_mb: float = Field(1024.0, ge=0, description="auto's limit: the checkpoint folder's size "
                                           "(weights, tokenizer, optimiser state)")


class TrainConfig(Strict):
    """`opsft train`. Defaults are the official settings (method.md): AdamW betas (0.9, 0.95), weight decay
    0.01, 10% warm-up then cosine, gradient clip 1.0, bf16 autocast on GPU, lr 6e-5, batch 256, 1 epoch (the
    base-model runs; runs on hinted-decoding data used lr 8e-6 for IDFT, 1e-6 for SFT, 3 epochs)."""

    input: str | None = Field(None, description="corpus, or the output of score / rewrite; for dpo / simpo: "
                              "pair rows, or a rewrite output (made into pairs)")
    output_dir: str | None = Field(None, description="checkpoints, metrics.jsonl, tensorboard/")
    model: str | None = Field(None, description="local HF folder; None = the embedded default")
    eval_input: str | None = Field(None, description="held-out corpus; else eval_rows are held out of input")
    eval_rows: int = Field(0, ge=0, description="rows held out of input (seeded) when eval_input is not given")
    fused_head: bool = Field(True, description="the loss from the final hidden states and the LM head, chunk by "
                             "chunk (memory-bounded: never [tokens x vocab] logits, float32 logits under bf16 "
                             "autocast); false: the model's logits of the response positions, then chunked log p / H")
    gradient_checkpointing: bool = Field(False, description="recompute decoder layers in the backward pass")
    packing: bool = Field(False, description="padding-free micro-batches: the rows back to back in one sequence, "
                          "attention kept within each row by its position ids (token losses only)")
    loss: LossConfig = LossConfig()
    scaling: TrainScaling = TrainScaling()
    tracking: TrackingConfig = Field(TrackingConfig(), description="MLflow / W&B experiment tracking (off by default)")
    lr: float = Field(6e-5, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine decays to lr * this")
    weight_decay: float = Field(0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = Field(1e-8, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="lr warm-up, fraction of all optimiser steps")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = off")
    global_batch_size: int = Field(256, ge=1, description="rows (pairs for dpo / simpo) per optimiser step, over "
                                   "all workers")
    micro_batch_size: int = Field(4, ge=1, description="rows (pairs) per forward pass on one worker")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps (wins over epochs)")
    seed: int = 0
    autocast: Literal["auto", "bf16", "off"] = Field("auto", description="auto = bf16 on a GPU with bf16, else off")
    dtype: Literal["float32", "float64"] = Field("float32", description="parameter dtype. float64: the exactness "
                                                 "reference on CPU, used by the tests (no autocast)")
    max_length: int | None = Field(None, ge=8, description="tokens per row; None = the model's context")
    overlong: Literal["skip", "truncate"] = Field("skip", description="rows over max_length: skip, or cut the end")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only the final one")
    keep_checkpoints: int | None = Field(2, ge=1, description="checkpoints Ray keeps; None = all")
    eval_every: int = Field(0, ge=0, description="steps between held-out evaluations; 0 = only at the end")
    resume_from: str | None = Field(None, description="a checkpoint folder to continue from exactly")
    max_failures: int = Field(3, ge=-1, description="worker failures Ray Train recovers from, each time restarting "
                              "the workers from the last checkpoint (-1: no limit)")
    storage_path: str | None = Field(None, description="where Ray Train keeps the checkpoints: a shared folder or "
                                     "object storage (s3://...); None = output_dir")
    address: str | None = Field(None, description="Ray cluster address; None = RAY_ADDRESS or a local cluster")
    fail_after_step: int | None = Field(None, ge=1, description="testing: crash once after this step (recovery)")
    fail_mode: Literal["raise", "kill"] = Field("raise", description="testing: fail_after_step raises on every "
                                                "worker, or SIGKILLs the last worker's process")

    @model_validator(mode="after")
    def _output_dir_is_posix(self):
        require_posix(self.output_dir, "output_dir (metrics.jsonl and TensorBoard logs; put checkpoints on object "
                                       "storage with storage_path)")
        return self

    @model_validator(mode="after")
    def _packing_is_for_token_losses(self):
        if self.packing and self.loss.pairs:
            raise ValueError(f"packing is for the token losses; {self.loss.name} trains on pairs, which stay padded")
        return self

    @model_validator(mode="after")
    def _float64_is_not_autocast(self):
        if self.dtype == "float64" and self.autocast == "bf16":
            raise ValueError("dtype float64 is the exactness reference: it cannot run under bf16 autocast "
                             "(set autocast to off or auto)")
        return self


# ---------------------------------------------------------------------------- recurring cycle (opsft schedule)


class ScheduleConfig(Strict):
    """`opsft schedule`: when and where the realignment cycle runs (the cycle's own settings stay in
    its realign.yaml). Loaded from --schedule-config YAML, flags override."""

    cron: str = Field("0 3 * * *", description="minute hour day-of-month month day-of-week")
    timezone: str | None = Field(None, description="IANA name (e.g. Europe/Paris); None = this machine's local time")
    address: str | None = Field(None, description="Ray dashboard address; None = RAY_ADDRESS, else local subprocess")
    state_dir: str | None = Field(None, description="history and lock (a POSIX folder); None = <realign "
                                  "output_dir>/.schedule")
    working_dir: str | None = Field(".", description="Ray mode: uploaded as the job's working_dir; None = "
                                                     "use the opsft installed in the cluster's image")
    entrypoint: str | None = Field(None, description="None = python -m opsft.cli realign --config <config>")
    pip: list[str] = Field(default_factory=list, description="Ray mode: extra pip requirements of the job")
    poll_s: float = Field(30.0, gt=0, description="seconds between status checks of the running job")

    @model_validator(mode="after")
    def _state_dir_is_posix(self):
        require_posix(self.state_dir, "state_dir (the scheduler's lock and history)")
        return self


# ---------------------------------------------------------------------------- rewriting (opsft rewrite)


_RECIPE = RewriteParams().fields()  # the recipe's defaults, written once (opsft.recipe_plan)


def _recipe(name: str, description: str | None = None, **bounds):
    default = _RECIPE[name]
    return Field(tuple(default) if isinstance(default, list) else default, description=description, **bounds)


class RewriteStageConfig(Strict):
    """Per-stage overrides of the rewrite job: the fields set here replace those of the job's
    `engine` / `pool` for this stage (e.g. hinted-decoding: {engine: {kind: hf}})."""

    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields for this stage")
    pool: dict[str, Any] = Field(default_factory=dict, description="PoolConfig fields for this stage's actors")

    @model_validator(mode="after")
    def _valid_fields(self):
        EngineConfig.model_validate(self.engine), PoolConfig.model_validate(self.pool)
        return self


class RewriteConfig(Strict):
    """`opsft rewrite`: the on-policy data recipe (opsft.recipe) and its hinted decoder. The recipe's own
    settings are RewriteParams' fields (opsft.recipe_plan), flat, with their defaults and allowed values."""

    input: str | None = None
    output: str | None = None
    engine: EngineConfig = EngineConfig()
    pool: PoolConfig = PoolConfig()
    stages: dict[Literal[ENGINE_STAGES], RewriteStageConfig] = Field(
        default_factory=dict, description="per-stage engine / pool overrides, keys: " + ", ".join(ENGINE_STAGES))
    address: str | None = Field(None, description="Ray cluster address (jobs that run the recipe on Ray)")
    distributed: bool = Field(False, description="run as a Ray Data job, one actor pool per stage (else in-process)")
    rows_per_part: int = Field(ROWS_PER_PART, ge=1, description="Ray Data job: rows per output part file")
    # the recipe's settings (RewriteParams)
    policy: Literal[POLICIES] = _recipe("policy", "self-first: keep verified self-answers, hinted decoding for "
                                        "the rest; hd-all: hinted decoding for every row")
    verifier: str = _recipe("verifier", "numeric | exact | auto | rg:<reasoning-gym task>")
    drop_unverified: bool = _recipe("drop_unverified", "rows whose rewrite fails verification go to a side file "
                                    "instead of keeping their original response")
    beta: float = _recipe("beta", "lambda = clamp(beta * H_norm) (linear), the sigmoid slope", ge=0)
    lambda_mode: Literal[LAMBDA_MODES] = _recipe("lambda_mode", "how the student's weight follows H_norm")
    sigmoid_center: float = _recipe("sigmoid_center", "lambda_mode sigmoid: H_norm where lambda = 0.5")
    piecewise_bounds: tuple[float, float] = _recipe("piecewise_bounds", "lambda_mode piecewise: lambda rises from "
                                                    "0 to 1 between these H_norm")
    temperature: float = _recipe("temperature", "0 = greedy (the best setting across four task families, "
                                 "docs/hinted_decoding.md); official: 0.3", ge=0)
    top_p: float = _recipe("top_p", "nucleus, chosen at temperature 1", gt=0, le=1)
    max_new_tokens: int = _recipe("max_new_tokens", "per self-answer and per hinted-decoding output", ge=1)
    hint_max_new_tokens: int = _recipe("hint_max_new_tokens", "per '# Analyze ... # CoT' hint", ge=1)
    missing_hint: Literal[MISSING_HINT] = _recipe(
        "missing_hint", "a hint with no usable analysis ended by its '# CoT' marker: cot: decode anyway with the "
        "hinted stream opened at '# CoT:' (after the analysis, if any); skip: keep the row's reference (the "
        "official rule, finish_reason no_hint). docs/hinted_decoding.md")
    hint_cut: Literal[HINT_CUTS] = _recipe("hint_cut", "how the hinted stream's analysis prefix ends: line = with "
                                           "the line '# CoT:'; marker = with '# CoT' (the official rule; outputs "
                                           "then often start with ':')")
    hint_prompt: Literal[HINT_PROMPTS] = _recipe("hint_prompt", "analyze: the model analyses the reference, then "
                                                 "its own CoT opens the hinted stream; direct: no analysis, the "
                                                 "hinted stream opens at '# CoT:' at once")
    splitter: str | None = _recipe("splitter", "after this text, decode from the student stream alone "
                                   "('' or None: never)")
    seed: int = _recipe("seed", "sampling seed (each row's own stream is seeded from its id too)")
    batch_size: int = _recipe("batch_size", "items per hinted-decoding batch", ge=1)

    def recipe_fields(self) -> dict:
        """The recipe's own settings, flat (RewriteParams.from_fields takes them): every field but where the
        job reads, writes and runs."""
        return self.model_dump(mode="json", include=set(_RECIPE))

    def params(self) -> RewriteParams:
        return RewriteParams.from_fields(self.recipe_fields())

    def stage_engine(self, stage: str, base: EngineConfig | None = None) -> EngineConfig:
        """The engine of a stage: `base` (default: engine) with the stage's overrides."""
        over = self.stages.get(stage)
        base = base or self.engine
        return EngineConfig.model_validate({**base.model_dump(), **over.engine}) if over else base

    def stage_pool(self, stage: str, base: PoolConfig | None = None) -> PoolConfig:
        """The actor pool of a stage: `base` (default: pool) with the stage's overrides."""
        over = self.stages.get(stage)
        base = base or self.pool
        return PoolConfig.model_validate({**base.model_dump(), **over.pool}) if over else base

    @model_validator(mode="after")
    def _recipe_can_run(self):
        self.params()  # what the recipe itself refuses (e.g. piecewise_bounds out of order), at load
        return self

    @model_validator(mode="after")
    def _engines_fit_their_actors(self):
        for stage in ENGINE_STAGES:
            check_placement(self.stage_engine(stage), self.stage_pool(stage), stage)
        return self


# ---------------------------------------------------------------------------- realignment (opsft realign)


class SelectConfig(Strict):
    """Which rows drifted off-policy: cll < threshold, or the lowest `quantile` fraction by cll."""

    mode: Literal["threshold", "quantile"] = "quantile"
    threshold: float = Field(-0.1, description="mode threshold: rewrite rows with mean phi below this "
                             "(the official guide: a corpus below about -0.1 is off-policy on a 7B instruct model)")
    quantile: float = Field(0.25, ge=0, le=1, description="mode quantile: rewrite this fraction, lowest CLL first")


class RealignConfig(Strict):
    """`opsft realign`: one cycle (opsft.realign.cycle). `engine`/`pool` run the scoring and
    rewriting jobs; `rewrite` and `train` are the same models as `opsft rewrite` / `opsft train`
    (their input, output and model fields are filled in by the cycle)."""

    corpus: str = Field(..., description="the training corpus to keep on-policy (JSONL or Parquet; a path or s3://)")
    output_dir: str = Field(..., description="the cycles' state, lock and LATEST: <output_dir>/cycles/vNNNN/ (a local "
                            "or shared POSIX folder: the lock needs one)")
    data_dir: str | None = Field(None, description="the cycles' data and checkpoints: <data_dir>/cycles/vNNNN/ (a "
                                 "folder or s3://...); None = output_dir")
    rows_per_part: int = Field(ROWS_PER_PART, ge=1, description="rows per output part of the score, rewrite and "
                               "rescore jobs")
    model: str | None = Field(None, description="starting model, used until a cycle completes; None = default")
    start_from: Literal["latest", "model"] = Field(
        "latest", description="latest: each cycle fine-tunes the newest completed cycle's checkpoint (a re-run "
        "right after a cycle is the next cycle); model: always start from `model` (a re-run does nothing)")
    engine: EngineConfig = EngineConfig()
    pool: PoolConfig = PoolConfig()
    select: SelectConfig = SelectConfig()
    rewrite: RewriteConfig = RewriteConfig()
    train: TrainConfig = TrainConfig(lr=8e-6, epochs=1)
    address: str | None = Field(None, description="Ray cluster address; None = RAY_ADDRESS or a local cluster")
    promote_url: str | None = Field(None, description="scoring service base URL to POST /v1/models/reload to")
    promote_api_key_env: str | None = Field("OPSFT_ADMIN_KEY", description="env var holding its bearer token (the "
                                            "service's admin key: a reload needs it)")
    promote_timeout_s: float = Field(600.0, gt=0, description="seconds one reload request may take")
    promote_attempts: int = Field(5, ge=1, description="tries in all when the service answers 429/502/503/504, "
                                  "refuses or drops the connection, or times out; other errors fail at once")
    promote_backoff_s: float = Field(2.0, ge=0, description="wait before the 2nd try, doubled before each next one")
    promote_backoff_max_s: float = Field(60.0, ge=0, description="cap on one wait (a Retry-After included)")

    @model_validator(mode="after")
    def _output_dir_is_posix(self):
        require_posix(self.output_dir, "output_dir (the cycle's lock and state; put the data on object storage with "
                                       "data_dir)")
        return self

    @model_validator(mode="after")
    def _engines_fit_their_actors(self):
        # The cycle's engine serves scoring and the rewrite's stages (with rewrite.stages' overrides);
        # whether each engine can do its stage is checked before any job starts (opsft.stages.check_stages).
        check_placement(self.engine, self.pool, "score")
        for stage in ENGINE_STAGES:
            check_placement(self.rewrite.stage_engine(stage, self.engine), self.rewrite.stage_pool(stage, self.pool),
                            stage)
        return self


# ---------------------------------------------------------------------------- evaluation (opsft eval)


class EvalTaskSpec(Strict):
    """One evaluation task given in full (opsft.evaluation.EvalTask)."""

    name: str
    n: int = Field(50, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    config: dict[str, Any] = Field(default_factory=dict, description="the task's reasoning-gym generator "
                                   "settings, e.g. {max_terms: 2} for chain_sum")
    label: str | None = Field(None, description="its name in results and tables (default: name)")


class EvalConfig(Strict):
    """`opsft eval` (opsft.evaluation): accuracy on reasoning-gym tasks and retention on general text."""

    models: list[str] = Field(default_factory=list, description="[LABEL=]PATH of each model; the first is the "
                              "baseline of the NLL change; empty = the embedded default")
    engine: EngineConfig = EngineConfig()
    tasks: list[str | EvalTaskSpec] = Field(["gsm_symbolic:50:256", "basic_arithmetic:50:64"],
                                            description="reasoning-gym tasks: 'name[:n[:max_new_tokens]]' or "
                                            "{name, n, max_new_tokens, config, label}")
    family: list[str] = Field(["gsm_symbolic"], description="the training family: these tasks are in-family")
    seed: int = Field(1234, description="reasoning-gym seed of the items (opsft's training corpora use 0)")
    exclude: list[str] = Field(default_factory=list, description="corpora whose questions are never evaluated")
    passages: int = Field(16, ge=0, description="general-text windows for NLL / CLL; 0 = skip retention")
    tokens_per_passage: int = Field(256, ge=2)
    text: str = Field("pydoc", description="general text: 'pydoc' (pydoc_data.topics) or a UTF-8 file")
    output: str | None = Field(None, description="folder for eval.json, table.md and items.jsonl")
