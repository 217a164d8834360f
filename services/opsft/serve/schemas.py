"""Request and response bodies of the CLL scoring HTTP API (pydantic, extra fields forbidden).

These models are the API's contract and its OpenAPI schema (`/docs`, `/openapi.json`).
Semantic checks that need the tokenizer (a response too long for the model) happen in the
scorer, which answers them with a 422 naming the item.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Message(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ScoreItem(Body):
    """One (prompt or messages, response) pair, as in the corpus format."""

    prompt: str | None = Field(None, description="a single user turn; give this or `messages`")
    messages: list[Message] | None = Field(None, min_length=1, description="a chat ending with a user turn")
    response: str = Field(..., description="the text to score, as the assistant's answer")
    id: str | None = Field(None, max_length=256, description="echoed back; a content hash when missing")

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def as_row(self) -> dict:
        """The corpus row opsft.scoring.score_rows reads."""
        row: dict = {"response": self.response}
        if self.messages is not None:
            row["messages"] = [m.model_dump() for m in self.messages]
        else:
            row["prompt"] = self.prompt
        if self.id is not None:
            row["id"] = self.id
        return row


class ScoreRequest(Body):
    items: list[ScoreItem] = Field(..., min_length=1, description="at most the server's max_items")
    return_tokens: bool = Field(False, description="also return per-token id, text, logprob, entropy, phi")
    include_eos: bool = Field(False, description="score the end-of-turn token too (as training does)")


class TokenScore(Body):
    id: int
    token: str
    logprob: float
    entropy: float
    phi: float


class ItemScores(Body):
    """The fields `opsft score` writes for a row (see opsft.scoring.SCORE_FIELDS)."""

    id: str
    cll: float
    cll_sum: float
    cll_frac_pos: float
    cll_frac_gt_m1: float
    cll_frac_gt_m3: float
    cll_frac_gt_m5: float
    logprob_mean: float
    entropy_mean: float
    n_tokens: int
    exact_entropy: bool = Field(..., description="True: H over the full vocabulary (exact CLL); False: H "
                                "estimated (the vllm engine's top-k scorer, biased low; docs/data_jobs.md)")
    tokens: list[TokenScore] | None = None


class ScoreResponse(Body):
    model: str = Field(..., description="the checkpoint folder (or hub id) that scored the items")
    model_version: int = Field(..., description="increases with every reload")
    results: list[ItemScores]


class ReloadRequest(Body):
    model: str = Field(..., min_length=1, max_length=4096, description="an absolute HF checkpoint folder under one of "
                       "the service's model roots (symlinks and '..' resolved), or an s3://... URI under a root "
                       "that is such a prefix; needs the admin key")


class ReplicaModel(Body):
    replica: str
    model: str
    version: int
    loaded_at: str


class ModelInfo(Body):
    model: str = Field(..., description="the checkpoint being served")
    name: str
    source: str = Field(..., description="where it came from: 'config', 'current_link' (the promoted checkpoint, "
                        "read at start) or 'reload'")
    version: int
    loaded_at: str = Field(..., description="UTC time the current model was promoted")
    replicas: list[ReplicaModel]


class ModelsResponse(Body):
    data: list[ModelInfo]


class ErrorResponse(Body):
    detail: str
    errors: list[dict] | None = None
