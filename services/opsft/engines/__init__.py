"""Model runners behind one small protocol (see base.Engine): `hf` (transformers, CPU or
CUDA, exact CLL, hinted decoding's streams: hf_streams.py), `vllm` (imported lazily, GPU
clusters; hinted decoding: vllm_hd.py; driven by a JSON request in its own venv:
opsft.vllm_probe) and `fake` (deterministic, no model, fault injection: rehearsals and
tests). batching.py cuts calls into model batches.

`make_engine` is the one factory; the protocol file (base.py) knows no implementation."""

from opsft.engines.base import KINDS, Engine, GenerationParams, TokenScores

__all__ = ["Engine", "GenerationParams", "TokenScores", "engine_from_config", "make_engine"]


def make_engine(kind: str, model: str | None = None, **options) -> Engine:
    """Build an engine by name; `vllm` is imported only when asked for."""
    if kind == "hf":
        from opsft.engines.hf import HFEngine

        return HFEngine(model, **options)
    if kind == "vllm":
        from opsft.engines.vllm import VLLMEngine

        return VLLMEngine(model, **options)
    if kind == "fake":
        from opsft.engines.fake import FakeEngine

        return FakeEngine(model, **options)
    raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(KINDS)}")


def engine_from_config(cfg, *runners: str) -> Engine:
    """The engine of an EngineConfig, with these vLLM runners ("score", "generate") started now: a
    rate then excludes the start, and a runner that cannot start fails here (an engine fault)."""
    engine = make_engine(cfg.kind, cfg.model, **cfg.options())
    if runners and hasattr(engine, "start"):
        engine.start(*runners)
    return engine
