"""Training data without Ray: rows -> token ids, the deterministic global batch of every
step, its split over workers and micro-batches (by length), and padding.

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
from dataclasses import dataclass, field

import torch

from opsft.chat import encode, end_of_turn_id
from opsft.corpus import RowError, parse_row

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


def prepare_examples(rows: list[dict], tokenizer, max_length: int, overlong: str = "skip"
                     ) -> tuple[list[TrainExample], PrepareStats]:
    """Tokenise rows with the chat template; the response ends with the end-of-turn token.

    Rows with an `error`, or invalid, are skipped and counted. A row longer than
    `max_length` is skipped (`overlong="skip"`) or cut to its first max_length tokens
    ("truncate": the end-of-turn token is then lost; a row whose prompt alone leaves no
    response token is skipped)."""
    if overlong not in ("skip", "truncate"):
        raise ValueError(f"overlong must be 'skip' or 'truncate', got {overlong!r}")
    stats, out = PrepareStats(rows=len(rows)), []
    eot = end_of_turn_id(tokenizer)
    for row in rows:
        try:
            ex = parse_row(row)
            enc = encode(tokenizer, ex.messages, ex.response, include_eos=True)
        except RowError as exc:
            stats.error_rows += 1
            key = str(exc).split(":")[0][:60]
            stats.errors[key] = stats.errors.get(key, 0) + 1
            continue
        ids, start = enc.input_ids, enc.response_start
        if start < 1:  # nothing precedes the first response token: it cannot be predicted
            stats.error_rows += 1
            stats.errors["empty prompt"] = stats.errors.get("empty prompt", 0) + 1
            continue
        if len(ids) > max_length:
            if overlong == "skip" or start >= max_length:
                stats.too_long_skipped += 1
                continue
            ids = ids[:max_length]
            stats.truncated += 1
        out.append(TrainExample(list(ids), start, has_eos=ids[-1] == eot and len(ids) == len(enc.input_ids)))
        stats.tokens += len(ids)
        stats.response_tokens += len(ids) - start
    stats.used = len(out)
    return out, stats


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
        """Example indices of global step `step` (0-based, counted over all epochs)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return order[k * self.global_batch_size:(k + 1) * self.global_batch_size]


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


def cll_mask(examples: list[TrainExample], labels: torch.Tensor) -> torch.Tensor:
    """The label positions `opsft score` counts for CLL: the response without its end-of-turn token."""
    mask = labels != IGNORE
    for b, e in enumerate(examples):
        if e.has_eos:
            mask[b, len(e) - 2] = False
    return mask
