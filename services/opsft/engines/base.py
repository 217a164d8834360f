"""The engine protocol: what scoring, rewriting and serving need from a model runner.

Engines work on token ids; tokenization stays with the caller (opsft.data.chat).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


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


class Engine(Protocol):
    name: str
    tokenizer: object
    model_id: str
    max_length: int

    def score_tokens(self, sequences: list[list[int]], starts: list[int],
                     temperature: float = 1.0) -> list[TokenScores]:
        """log p and H of tokens sequences[i][starts[i]:], each given everything before it."""

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        """New token ids for each prompt (without the prompt; stop token included if hit)."""
