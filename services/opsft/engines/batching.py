"""How the engines cut a call into model batches: length_batches (the hf engine: rows of similar
length, bounded in rows and padded tokens) and token_groups (the vllm engine: consecutive rows,
bounded in tokens and rows per vLLM call; hinted decoding's waves on vLLM)."""

from __future__ import annotations


def length_batches(lengths: list[int], max_batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), each within
    max_batch_size rows and max_batch_tokens padded tokens (a single longer row still gets
    a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= max_batch_size or width * (len(current) + 1) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def token_groups(lengths: list[int], max_tokens: int, max_items: int | None = None) -> list[list[int]]:
    """Consecutive indices grouped so each group holds at most max_tokens tokens (a longer row
    gets a group of its own) and at most max_items indices: one vLLM call each, bounding the
    hidden states held at once (scoring) or what one engine step admits (hinted-decoding waves)."""
    groups, current, total = [], [], 0
    for i, n in enumerate(lengths):
        if current and (total + n > max_tokens or (max_items is not None and len(current) >= max_items)):
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        groups.append(current)
    return groups
