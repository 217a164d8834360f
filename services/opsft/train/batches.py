"""Token batches of `opsft train`, without Ray: corpus rows -> token ids (TrainExample, with counted
skips), the deterministic global batch of every step, its split over workers and micro-batches (by
length), and padding. (The corpus itself, its formats and rows, is the package opsft.data's; each Ray
worker's part of the tokenised corpus is opsft.train.worker_corpus's.)

Determinism is the point. The rows of optimiser step k are the same whatever the number
of workers W and micro-batches K: epoch e visits the examples in a permutation seeded by
(seed, e); step k of the epoch takes the next `global_batch_size` of them. The global
batch is sorted by length and cut into micro-batches of `micro_batch_size` rows, dealt
round-robin to the workers, so every micro-batch holds rows of similar length (little
padding) and the loss over the whole global batch does not depend on the split.

    examples, stats = prepare_examples(rows, tokenizer, max_length=512, overlong="skip")
    plan = BatchPlan(n_examples=len(examples), global_batch_size=8, seed=0)
    for mb in worker_micro_batches(plan.step_indices(k), lengths, micro_batch_size=2, rank=0, world_size=2):
        batch = collate([examples[i] for i in mb], pad_id)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from opsft.data.chat import encode, end_of_turn_id
from opsft.data.corpus import RowError, parse_row

IGNORE = -100


@dataclass(frozen=True)
class TrainExample:
    input_ids: list[int]
    response_start: int  # first response token; the loss covers [response_start, len)
    has_eos: bool  # the last token is the end-of-turn token (False after truncation)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PrepareStats:
    rows: int = 0
    used: int = 0
    error_rows: int = 0  # rows with an `error` or failing validation
    too_long_skipped: int = 0
    truncated: int = 0
    tokens: int = 0
    response_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # reason -> count (first words)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def count_error(self, message: str) -> None:
        self.error_rows += 1
        key = message.split(":")[0][:60]  # the reason's first words: counts stay few
        self.errors[key] = self.errors.get(key, 0) + 1


OVERLONG = ("skip", "truncate")


def tokenize_rows(rows: list[dict], sides_of: Callable[[dict], tuple[list[dict], list[str]]], tokenizer,
                  max_length: int, overlong: str, stats: PrepareStats) -> list[list[TrainExample]]:
    """The one tokenisation of `opsft train` (token losses and pairs): each row's chat and
    response texts (`sides_of(row)`: one response, or chosen and rejected), each text a
    TrainExample ending with the end-of-turn token; rows in order, the skipped ones left out.

    Skipped and counted in `stats`: an invalid row (`sides_of` or the template raises RowError;
    rows with an `error`), a row whose prompt is empty, and a row with a side longer than
    max_length under overlong="skip". Under "truncate" such a side is cut to its first max_length
    tokens (its end-of-turn token is lost), unless the prompt alone fills them (skipped)."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be 'skip' or 'truncate', got {overlong!r}")
    eot = end_of_turn_id(tokenizer)
    out = []
    for row in rows:
        try:
            messages, texts = sides_of(row)
            sides = [encode(tokenizer, messages, text, include_eos=True) for text in texts]
        except RowError as exc:
            stats.count_error(str(exc))
            continue
        if any(enc.response_start < 1 for enc in sides):  # no context for the first response token
            stats.count_error("empty prompt")
            continue
        if any(len(enc.input_ids) > max_length for enc in sides):
            if overlong == "skip" or any(enc.response_start >= max_length for enc in sides):
                stats.too_long_skipped += 1
                continue
            stats.truncated += 1
        examples = []
        for enc in sides:
            ids = list(enc.input_ids[:max_length])
            examples.append(TrainExample(ids, enc.response_start,
                                         has_eos=ids[-1] == eot and len(ids) == len(enc.input_ids)))
            stats.tokens += len(ids)
            stats.response_tokens += len(ids) - enc.response_start
        out.append(examples)
    stats.used = len(out)
    return out


def _prompt_and_response(row: dict) -> tuple[list[dict], list[str]]:
    example = parse_row(row)
    return example.messages, [example.response]


def prepare_examples(rows: list[dict], tokenizer, max_length: int, overlong: str = "skip"
                     ) -> tuple[list[TrainExample], PrepareStats]:
    """Tokenise corpus rows with the chat template (tokenize_rows: what is skipped and counted)."""
    stats = PrepareStats(rows=len(rows))
    out = tokenize_rows(rows, _prompt_and_response, tokenizer, max_length, overlong, stats)
    return [sides[0] for sides in out], stats


def split_eval(examples: list, eval_rows: int, seed: int) -> tuple[list, list]:
    """(train, eval): `eval_rows` examples held out by a seeded draw (order otherwise kept)."""
    if eval_rows <= 0:
        return list(examples), []
    if eval_rows >= len(examples):
        raise ValueError(f"eval_rows={eval_rows} leaves no training rows (only {len(examples)} usable)")
    held = set(random.Random(f"eval-{seed}").sample(range(len(examples)), eval_rows))
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


@dataclass(frozen=True)
class BatchPlan:
    """Which examples each optimiser step uses: a seeded permutation per epoch, cut into
    global batches (the last batch of an epoch may be smaller)."""

    n_examples: int
    global_batch_size: int
    seed: int = 0

    def __post_init__(self):
        if self.n_examples <= 0:
            raise ValueError("no training examples")

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n_examples // self.global_batch_size)

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else epochs * self.steps_per_epoch

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.n_examples))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    def step_indices(self, step: int) -> list[int]:
        """Example indices of global step `step` (0-based, counted over all epochs). The epoch's order
        is shuffled once and kept as an int64 array (8 bytes an example: 10M rows, one shuffle of a
        few seconds per epoch, not per step)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        cached = self.__dict__.get("_order")
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.asarray(self.epoch_order(epoch), dtype=np.int64))
            object.__setattr__(self, "_order", cached)  # a cache on a frozen dataclass
        return cached[1][k * self.global_batch_size:(k + 1) * self.global_batch_size].tolist()


def worker_micro_batches(indices: list[int], lengths: list[int], micro_batch_size: int, rank: int,
                         world_size: int) -> list[list[int]]:
    """This worker's micro-batches of a global batch: sorted by length (longest first, ties
    by index), cut into runs of `micro_batch_size`, dealt round-robin to the workers. On a
    short last batch a worker may get fewer (or none): the loop pads with no-token
    micro-batches (collate([])) so that every worker runs the same number of passes."""
    ordered = sorted(indices, key=lambda i: (-lengths[i], i))
    chunks = [ordered[s:s + micro_batch_size] for s in range(0, len(ordered), micro_batch_size)]
    return chunks[rank::world_size]


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per worker per full step; raises unless the global batch splits evenly."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size x workers "
                         f"= {micro_batch_size} x {world_size}")
    return global_batch_size // per_step


def collate(examples: list[TrainExample], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and next-token labels of the same width:
    labels[b, t] = input_ids[b, t + 1] where token t + 1 is a response token (the loss
    covers the response and its end-of-turn token), IGNORE elsewhere. An empty list
    gives one all-padding row with no label (a no-token micro-batch)."""
    if not examples:
        return {"input_ids": torch.full((1, 2), pad_id, dtype=torch.long, device=device),
                "attention_mask": torch.ones((1, 2), dtype=torch.long, device=device),
                "labels": torch.full((1, 2), IGNORE, dtype=torch.long, device=device)}
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for b, e in enumerate(examples):
        seq = torch.tensor(e.input_ids, dtype=torch.long)
        ids[b, :len(e)] = seq
        attn[b, :len(e)] = 1
        labels[b, e.response_start - 1:len(e) - 1] = seq[e.response_start:]
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def collate_packed(examples: list[TrainExample], device="cpu") -> dict[str, torch.Tensor]:
    """Padding-free: the examples back to back in one row, with `position_ids` restarting at 0 for
    each, so that attention stays within each sequence (transformers builds that block-causal mask
    from the position ids when no attention mask is given; on a GPU flash-attention runs the
    sequences as variable-length ones). Labels as collate's, per sequence: no label crosses a
    boundary. attention_mask is all ones (it counts the input tokens; the model does not get it).
    An empty list gives collate's no-token micro-batch."""
    if not examples:
        return collate([], 0, device)
    ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.long)
    positions = torch.cat([torch.arange(len(e)) for e in examples])
    labels = torch.full_like(ids, IGNORE)
    offset = 0
    for e in examples:
        labels[offset + e.response_start - 1:offset + len(e) - 1] = ids[offset + e.response_start:offset + len(e)]
        offset += len(e)
    return {"input_ids": ids[None].to(device), "attention_mask": torch.ones_like(ids)[None].to(device),
            "labels": labels[None].to(device), "position_ids": positions[None].to(device)}


def cll_mask(examples: list[TrainExample], labels: torch.Tensor) -> torch.Tensor:
    """The label positions `opsft score` counts for CLL: the response without its end-of-turn token."""
    mask = labels != IGNORE
    for b, e in enumerate(examples):
        if e.has_eos:
            mask[b, len(e) - 2] = False
    return mask
