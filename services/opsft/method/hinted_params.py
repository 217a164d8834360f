"""What a hinted-decoding call takes and gives (method.md section 3), torch-free: its settings
(HDParams, whose lambda modes are LAMBDA_MODES), an item (HDItem: the two prompts as token ids),
a result (HDResult) and the one check of a call's items that every decoder makes before any work
(check_items). The decoders: opsft.method.hinted.hinted_decode (over a stream-opening engine) and
opsft.engines.vllm_hd.hinted_decode_vllm; opsft.config reads the settings from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LAMBDA_MODES = ("linear", "sigmoid", "piecewise")


@dataclass(frozen=True)
class HDParams:
    beta: float = 3.0
    lambda_mode: str = "linear"
    sigmoid_center: float = 0.5
    piecewise_bounds: tuple[float, float] = (0.3, 0.7)
    temperature: float = 0.3  # 0 = greedy
    top_p: float = 0.95
    max_new_tokens: int = 1024
    seed: int = 0
    splitter: str | None = "\\boxed{"
    repeat_window: int = 30
    repeat_times: int = 5
    repeat_every: int = 100
    stop_strings: tuple[str, ...] = ()  # the official code has none; the recipe stops at its hint headers
    hold_eos: bool = False              # True: no eos while the output is blank (official: eos any time)

    @classmethod
    def from_fields(cls, fields: dict) -> HDParams:
        """From a JSON-style dict of fields (dataclasses.asdict, or a request): lists become tuples."""
        values = dict(fields)
        for name in ("piecewise_bounds", "stop_strings"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def __post_init__(self):
        if self.lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"lambda_mode must be one of {LAMBDA_MODES}, got {self.lambda_mode!r}")
        if self.beta < 0 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError("need beta >= 0, temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1")
        lo, hi = self.piecewise_bounds
        if not lo < hi:
            raise ValueError(f"piecewise_bounds must be (h1, h2) with h1 < h2, got {self.piecewise_bounds}")
        if any(not isinstance(text, str) or not text for text in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")


@dataclass(frozen=True)
class HDItem:
    hinted_prompt: list[int]   # chat(system + question + reference) + generation prompt + analysis prefix
    student_prompt: list[int]  # chat(question) + generation prompt
    seed: int | None = None    # sampling seed of this item (None: its index in the call); the recipe derives it
                               # from the row id, so a row samples the same tokens in any batch (resume-safe)


@dataclass
class HDResult:
    tokens: list[int]
    finish_reason: str
    switched_at: int | None = None  # index of the first token decoded from the student stream alone


def check_items(items: Sequence[HDItem], limit: int) -> None:
    """Refuse (ValueError naming the first bad item) an item with an empty prompt, or one whose
    longer prompt leaves no room for a token under `limit` (prompt + generated tokens). Every
    hinted decoder calls it before any work."""
    for k, item in enumerate(items):
        if not item.hinted_prompt or not item.student_prompt:
            raise ValueError(f"item {k}: empty prompt")
        longest = max(len(item.hinted_prompt), len(item.student_prompt))
        if longest >= limit:
            raise ValueError(f"item {k}: prompt of {longest} tokens leaves no room (model limit {limit})")
