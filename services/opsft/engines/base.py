"""The engine protocol: what scoring, rewriting and serving need from a model runner.

Engines work on token ids; tokenization stays with the caller (opsft.data.chat).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

# Tokens an engine is sized for when max_model_len is unset (the model's context if shorter): a 128k-context
# model would otherwise ask vLLM for a kv cache of 128k tokens before it scores a row.
DEFAULT_MAX_MODEL_LEN = 16_384
# Each engine setting's allowed values, written once (opsft.config's EngineConfig takes them as its choices).
KINDS = ("hf", "vllm", "fake")             # opsft.engines.make_engine
DTYPES = ("float32", "bfloat16", "float16")  # the body's dtype (hf, vllm); log p and H stay float32
SCORERS = ("exact", "topk")                # vllm: how H is computed


@dataclass(frozen=True)
class TokenScores:
    """Per response token: log p(x_t) and the entropy H(p_t) of the model's distribution.
    `exact_entropy` is False when H was approximated (e.g. from top-k log-probs)."""

    logprob: np.ndarray
    entropy: np.ndarray
    exact_entropy: bool = True


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop_strings: tuple[str, ...] = field(default_factory=tuple)  # output ends with the token completing one


class Engine(Protocol):
    name: str
    tokenizer: object
    model_id: str
    max_length: int

    def score_tokens(self, sequences: list[list[int]], starts: list[int],
                     temperature: float = 1.0) -> list[TokenScores]:
        """log p and H of tokens sequences[i][starts[i]:], each given everything before it."""

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        """New token ids for each prompt (without the prompt; the stop token, or the token that
        completes a stop string, included if hit; nothing after it)."""

    def check(self) -> None:
        """Raise if the engine cannot serve a known-good request (opsft.faults: a failing check makes
        an error the engine's, never a row's)."""

    def close(self) -> None:
        """Free what the engine holds (device memory, engine processes); it is not used again."""


class DecodeStream(Protocol):
    """A batch of sequences decoded one token per step, rows tagged by item index (each of the
    two streams of hinted decoding). `last_logits` [rows, V] are each row's next-token logits."""

    items: list[int]
    last_logits: object  # a torch.Tensor on the engine's device

    def step(self, tokens: list[int]) -> object:
        """Append one given token per row; returns the new next-token logits [rows, V]."""

    def keep(self, items: set[int]) -> None:
        """Drop every row whose item is not in `items` (its cache is freed)."""


class DecodeEngine(Engine, Protocol):
    """An engine with the decode capability that hinted decoding needs: the caller picks every
    token (mixing two streams), the engine runs the model step by step with its cache."""

    def open_stream(self, prompts: list[list[int]], items: list[int]) -> DecodeStream:
        """Prefill the prompts (one row per item index) and return the stream."""


def can_decode(engine) -> bool:
    """Whether an engine object has the decode capability, in either form: streams (DecodeEngine,
    stepped by opsft.method.hinted.hinted_decode) or one `hinted_decode(items, params, eos_ids,
    decode_token=None, max_positions=None, on_token=None)` call of an engine that schedules the two
    streams itself (vllm: opsft.engines.vllm_hd; fake), whose results equal hinted_decode's."""
    return hasattr(engine, "open_stream") or hasattr(engine, "hinted_decode")


# What each engine kind can do; a job refuses a stage whose engine lacks the capability before it
# starts (tests/test_recipe.py checks this table against the classes).
CAPABILITIES = {kind: frozenset({"score", "generate", "decode"}) for kind in ("hf", "vllm", "fake")}


def require(kind: str, capability: str, stage: str) -> None:
    """Refuse (ValueError, one line) a stage whose engine kind lacks the capability it needs."""
    have = CAPABILITIES.get(kind)
    if have is None:
        raise ValueError(f"stage {stage}: unknown engine kind {kind!r} (known: {sorted(CAPABILITIES)})")
    if capability not in have:
        able = sorted(k for k, caps in CAPABILITIES.items() if capability in caps)
        raise ValueError(f"stage {stage} needs an engine that can {capability}; engine {kind!r} cannot "
                         f"(use {' or '.join(repr(k) for k in able)} for this stage)")
