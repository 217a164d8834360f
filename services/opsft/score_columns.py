"""The columns `opsft score` adds to each row, defined once (plain Python: no torch, no Arrow).

`SequenceStats` is what opsft.method.cll.summarize computes for one sequence; a scored row holds those
fields, `exact_entropy` (True when H is over the full vocabulary: the hf engine and the vllm
engine's default scorer; False when estimated: the vllm engine's scorer="topk"), and `error`
(None on a scored row; on an error row every score is None). Every schema of a scored row is
derived from here or checked against it (tests/test_jobs.py): scoring.SCORE_FIELDS, the Arrow
types of data/parts.SCORE_TYPES, the columns realign drops (SCORED_COLUMNS), and
serve/schemas.ItemScores.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class SequenceStats:
    """Per-sequence CLL statistics (phi = log p + H per response token)."""

    cll: float  # mean phi
    cll_sum: float
    cll_frac_pos: float  # fraction of tokens with phi > 0
    cll_frac_gt_m1: float
    cll_frac_gt_m3: float
    cll_frac_gt_m5: float
    logprob_mean: float
    entropy_mean: float
    n_tokens: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# name -> Python type name ("float", "int", "bool") of every score field of a row
FIELD_TYPES: dict[str, str] = {**{f.name: str(f.type) for f in fields(SequenceStats)}, "exact_entropy": "bool"}
SCORE_FIELDS: tuple[str, ...] = tuple(FIELD_TYPES)
# the columns scoring adds to a row: the scores, the per-token phi list (--tokens) and the error
SCORED_COLUMNS: tuple[str, ...] = (*SCORE_FIELDS, "token_phi", "error")
