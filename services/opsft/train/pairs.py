"""Training data and held-out evaluation for the pair losses (dpo, simpo), without Ray.

A pair is two TrainExamples on the same prompt, chosen and rejected, each tokenised like an SFT
row (chat template, response, end-of-turn token; the loss covers the response and the
end-of-turn token). The batch plan of opsft.train.batches applies unchanged with pairs as the
unit: global_batch_size and micro_batch_size count pairs, a pair's length is that of its
longer side. A micro-batch is one forward pass over its chosen rows then its rejected rows.

DPO's reference log-probs (the initial model's sequence log-prob sums of both sides) are
computed once, before the first step, by `reference_logps` (the model in eval mode, no_grad:
no second model in memory), attached to the examples (`with_reference`) and saved in every
checkpoint, so that a resumed run uses those of the initial model, never the resumed weights.

    pairs, stats = prepare_pairs(rows, tokenizer, max_length=512)
    ref = reference_logps(model, pairs, pad_id, device)          # [n, 2] float64: chosen, rejected
    batch = collate_pairs(with_reference(pairs, ref)[:4], pad_id)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from opsft.data.pairs import is_rewrite_output, parse_pair, preference_pairs
from opsft.method.preference import pair_loss
from opsft.train.batches import PrepareStats, TrainExample, collate, tokenize_rows
from opsft.train.heldout import evaluating, shard_rounds
from opsft.train.step import LossSpec, Reduce, no_reduce, response_scores


@dataclass
class PairStats(PrepareStats):
    from_rewrite: dict | None = None  # opsft.data.pairs.preference_pairs counts when the input was a rewrite output


@dataclass(frozen=True)
class PairExample:
    chosen: TrainExample
    rejected: TrainExample
    ref: tuple[float, float] | None = None  # reference log-prob sums (chosen, rejected), dpo

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def prepare_pairs(rows: list[dict], tokenizer, max_length: int, overlong: str = "skip"
                  ) -> tuple[list[PairExample], PairStats]:
    """Tokenise pair rows (opsft.data.pairs). Rows of an `opsft rewrite` output are first made into
    pairs by opsft.data.pairs.preference_pairs (its counts: stats.from_rewrite; stats.rows counts pairs).
    Invalid rows are skipped and counted; a pair with a side longer than max_length is skipped
    (overlong="skip") or has that side cut to max_length ("truncate", the end-of-turn token is
    lost; skipped when the prompt alone fills it)."""
    built = None
    if is_rewrite_output(rows):
        rows, built = preference_pairs(rows)
    stats = PairStats(rows=len(rows), from_rewrite=built)
    out = tokenize_rows(rows, _prompt_and_pair, tokenizer, max_length, overlong, stats)
    return [PairExample(*sides) for sides in out], stats


def _prompt_and_pair(row: dict) -> tuple[list[dict], list[str]]:
    messages, chosen, rejected = parse_pair(row)
    return messages, [chosen, rejected]


def collate_pairs(pairs: list[PairExample], pad_id: int, device="cpu") -> dict:
    """collate() of the chosen sides then the rejected sides, plus n_pairs and, when every
    pair has one, ref_logps [n, 2] (float64, as reference_logps computes them; the loss casts them
    to the policy's dtype). An empty list gives collate([]) with n_pairs 0 and an empty ref_logps
    (a no-pair micro-batch, for any pair loss)."""
    if not pairs:
        return {**collate([], pad_id, device), "n_pairs": 0,
                "ref_logps": torch.zeros(0, 2, dtype=torch.float64, device=device)}
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)
    batch["n_pairs"] = len(pairs)
    if all(p.ref is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref for p in pairs], dtype=torch.float64, device=device)
    return batch


def with_reference(pairs: list[PairExample], ref: torch.Tensor) -> list[PairExample]:
    """The pairs with their reference log-prob sums (ref [n, 2]: chosen, rejected) attached."""
    if ref.shape != (len(pairs), 2):
        raise ValueError(f"reference log-probs of shape {tuple(ref.shape)} do not match {len(pairs)} pairs")
    return [replace(p, ref=(float(c), float(r))) for p, (c, r) in zip(pairs, ref.tolist(), strict=True)]


@torch.no_grad()
def reference_logps(model, pairs: list[PairExample], pad_id: int, device, *, micro_batch_size: int = 8,
                    rank: int = 0, world_size: int = 1, reduce: Reduce = no_reduce, autocast=None,
                    fused: bool = True) -> torch.Tensor:
    """[n, 2] float64: the sequence log-prob sums of (chosen, rejected) under `model` as it is
    now (call it with the initial model, before any step; wrapped or not: under FSDP every forward
    is a collective, and every worker runs the same number of them). Worker `rank` computes
    pairs rank, rank + W, ...; the sum over workers (`reduce`) gives every worker all of them.
    Every worker runs the same number of forward passes."""
    autocast = autocast or contextlib.nullcontext()
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    with evaluating(model) as model:
        for idx in shard_rounds(len(pairs), rank, world_size, micro_batch_size):
            batch = collate_pairs([pairs[i] for i in idx], pad_id, device)
            sums, _ = response_scores(model, batch, autocast, fused=fused).sequence_sums()
            if idx:
                n = len(idx)
                out[idx] = torch.stack([sums[:n], sums[n:2 * n]], dim=1).double()
    return reduce(out)


EVAL_KEYS = ("loss", "reward_accuracy", "margin", "logp_chosen", "logp_rejected")


@torch.no_grad()
def evaluate_pairs(model, pairs: list[PairExample], spec: LossSpec, pad_id: int, device, *,
                   micro_batch_size: int = 8, rank: int = 0, world_size: int = 1, reduce: Reduce = no_reduce,
                   autocast=None) -> dict[str, float]:
    """Held-out figures over all workers, means over the pairs: eval_loss (the training loss),
    eval_reward_accuracy, eval_margin, eval_logp_chosen, eval_logp_rejected; eval_rows (pairs)."""
    autocast = autocast or contextlib.nullcontext()
    sums = torch.zeros(len(EVAL_KEYS) + 1, dtype=torch.float64, device=device)
    with evaluating(model) as model:
        for idx in shard_rounds(len(pairs), rank, world_size, micro_batch_size, [len(p) for p in pairs]):
            batch = collate_pairs([pairs[i] for i in idx], pad_id, device)
            n = batch["n_pairs"]
            seq, counts = response_scores(model, batch, autocast, fused=spec.fused).sequence_sums()
            ref = batch.get("ref_logps")
            _, metrics = pair_loss(spec.name, seq[:n], seq[n:2 * n], counts[:n], counts[n:2 * n],
                                   None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
                                   **spec.params)
            for k, key in enumerate(EVAL_KEYS):
                sums[k] += metrics[key] * n
            sums[-1] += n
    sums = reduce(sums)
    total = max(float(sums[-1]), 1.0)
    return {**{f"eval_{key}": float(v) / total for key, v in zip(EVAL_KEYS, sums[:-1], strict=True)},
            "eval_rows": len(pairs)}
