"""Model runners behind one small protocol (see base.Engine): `hf` (transformers, CPU or
CUDA, exact CLL, the hinted decoder) and `vllm` (imported lazily, GPU clusters)."""

from opsft.engines.base import Engine, GenerationParams, TokenScores, make_engine

__all__ = ["Engine", "GenerationParams", "TokenScores", "make_engine"]
