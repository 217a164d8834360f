"""Model runners behind one small protocol (see base.Engine): `hf` (transformers, CPU or
CUDA, exact CLL, the hinted decoder) and `vllm` (imported lazily, GPU clusters).

`make_engine` is the one factory; the protocol file (base.py) knows no implementation."""

from opsft.engines.base import Engine, GenerationParams, TokenScores

__all__ = ["Engine", "GenerationParams", "TokenScores", "make_engine"]
KINDS = ("hf", "vllm")


def make_engine(kind: str, model: str | None = None, **options) -> Engine:
    """Build an engine by name; `vllm` is imported only when asked for."""
    if kind == "hf":
        from opsft.engines.hf import HFEngine

        return HFEngine(model, **options)
    if kind == "vllm":
        from opsft.engines.vllm import VLLMEngine

        return VLLMEngine(model, **options)
    raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(KINDS)}")
