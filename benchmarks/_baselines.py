"""The baselines the benchmarks time opsft against, shared by score_throughput, hinted_throughput,
serve_load and gpu_check. Plain torch over token ids (no Ray, no tokenizer), on whatever device
the model is on:

- naive_phi: CLL the way the official scorer computes it: one sequence at a time, logits for
  every position, a full log_softmax over the vocabulary.
- official_hinted_loop: hinted decoding the way the official code runs it: one item, no key/value
  cache, both whole sequences through the model at every step (same per-step math as opsft.method.hinted).
- seconds_per_row: in-process scoring one row per call against many rows per call (the most a
  serving layer can gain by merging requests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from opsft.method.hinted import mixed_logprobs, pick_tokens
from opsft.method.hinted_params import HDItem, HDParams


@torch.inference_mode()
def naive_phi(model, input_ids: Sequence[int], response_start: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """phi of tokens input_ids[response_start:] (float64, on the CPU), from logits of every position and
    a full log_softmax in float32 (or in `dtype`: a float64 reference runs it on a float64 model)."""
    logits = model(torch.tensor([list(input_ids)], device=model.device)).logits[0].to(dtype or torch.float32)
    logp_all = torch.log_softmax(logits, -1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    labels = torch.tensor(input_ids[1:], device=logits.device)
    logp = logp_all[:-1].gather(-1, labels[:, None]).squeeze(-1)
    return (logp + ent[:-1])[response_start - 1:].double().cpu()


@torch.inference_mode()
def official_hinted_loop(model, item: HDItem, params: HDParams, new_tokens: int, generator: torch.Generator) -> int:
    """The official scheme for one item: no cache, both full sequences through the model per step;
    returns the number of tokens generated (eos is not checked: every item runs new_tokens steps)."""
    hinted, student = list(item.hinted_prompt), list(item.student_prompt)

    def last_logits(ids):  # logits_to_keep=1: the official code pays the LM head on every position; spared here
        return model(input_ids=torch.tensor([ids], device=model.device), logits_to_keep=1).logits[:, -1].float()

    for step in range(new_tokens):
        logits_p = last_logits(hinted)
        if step == 0:
            scores = F.log_softmax(logits_p, dim=-1)
        else:
            scores = mixed_logprobs(logits_p, last_logits(student), params)
        token = pick_tokens(scores, params, [generator])[0]
        hinted.append(token)
        student.append(token)
    return new_tokens


def seconds_per_row(score: Callable[[list], object], rows: list, per_call: Sequence[int], repeats: int = 1,
                    sync: Callable[[], None] = lambda: None) -> dict[int, float]:
    """Seconds per row of score(rows[k:k + n]) over all rows, for each n in per_call (best of
    `repeats` passes, after one warm-up call); sync() waits for the device before reading the clock."""
    score(rows[:max(per_call)])  # warm-up
    out = {}
    for n in per_call:
        best = float("inf")
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for k in range(0, len(rows), n):
                score(rows[k:k + n])
            sync()
            best = min(best, time.perf_counter() - start)
        out[n] = best / len(rows)
    return out
