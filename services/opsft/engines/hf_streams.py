"""The decode capability (opsft.engines.base.DecodeEngine) on a transformers model: the streams
that opsft.method.hinted.hinted_decode steps, one token per row per call.

A Stream is one left-padded batch (attention mask + explicit position ids) with its DynamicCache:
the prompts are prefilled in row chunks whose caches are then joined along the batch, every step
appends one token per row, and rows leave as their items finish (their cache rows are
index-selected away, with the left padding no row needs any more). HFEngine.open_stream opens
them on its model; ModelStreams does the same for a bare model (tests, benchmarks):

    results = hinted_decode(ModelStreams(model, pad_id, prefill_rows), items, params, eos_ids)
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class Stream:
    """One left-padded batch of sequences with its DynamicCache; rows carry item indices."""

    def __init__(self, model, prompts: list[list[int]], items: list[int], pad_id: int, prefill_rows: int):
        self.model, self.items = model, list(items)
        device = model.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        self.attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            self.attn[r, width - len(p):] = 1
        self.attn = self.attn.to(device)
        self.next_pos = self.attn.sum(-1)
        positions = (self.attn.cumsum(-1) - 1).clamp(min=0)
        # Prefill in row chunks (bounded activation memory), then join the caches along the batch.
        chunks, logits = [], []
        for s in range(0, len(prompts), prefill_rows):
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids[s:s + prefill_rows].to(device), attention_mask=self.attn[s:s + prefill_rows],
                        position_ids=positions[s:s + prefill_rows], past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            chunks.append(out.past_key_values)
            logits.append(out.logits[:, -1].float())
        self.cache = chunks[0] if len(chunks) == 1 else _concat_caches(chunks, model.config)
        self.last_logits = torch.cat(logits)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Append one token per row; the next-token logits [rows, V]."""
        device = self.attn.device
        self.attn = torch.cat([self.attn, torch.ones((len(tokens), 1), dtype=torch.long, device=device)], dim=1)
        out = self.model(input_ids=torch.tensor(tokens, dtype=torch.long, device=device)[:, None],
                         attention_mask=self.attn, position_ids=self.next_pos[:, None], past_key_values=self.cache,
                         use_cache=True)
        self.cache = out.past_key_values
        self.next_pos = self.next_pos + 1
        self.last_logits = out.logits[:, -1].float()
        return self.last_logits

    def keep(self, items: set[int]) -> None:
        """Drop every row whose item is not in `items`, and left padding no row needs any more."""
        rows = [r for r, i in enumerate(self.items) if i in items]
        if len(rows) == len(self.items):
            return
        self.items = [self.items[r] for r in rows]
        if not rows:
            return
        index = torch.tensor(rows, device=self.attn.device)
        self.cache.batch_select_indices(index)
        self.attn, self.next_pos, self.last_logits = self.attn[index], self.next_pos[index], self.last_logits[index]
        first_used = int((self.attn.sum(0) > 0).nonzero()[0])
        if first_used > 0:
            self.attn = self.attn[:, first_used:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first_used:, :], layer.values[..., first_used:, :]


class ModelStreams:
    """The decode capability over a bare transformers model: `open_stream(prompts, items)` prefills a
    Stream, as HFEngine.open_stream does for its own model; `max_length` is the model's position limit."""

    def __init__(self, model, pad_id: int = 0, prefill_rows: int = 4):
        self.model, self.pad_id, self.prefill_rows = model, pad_id, prefill_rows
        self.max_length = getattr(model.config, "max_position_embeddings", None) or 10**9

    def open_stream(self, prompts: list[list[int]], items: list[int]) -> Stream:
        return Stream(self.model, prompts, items, self.pad_id, self.prefill_rows)


def _concat_caches(caches: list[DynamicCache], config) -> DynamicCache:
    merged = DynamicCache(config=config)
    for layer_idx in range(len(caches[0].layers)):
        keys = torch.cat([c.layers[layer_idx].keys for c in caches])
        values = torch.cat([c.layers[layer_idx].values for c in caches])
        merged.update(keys, values, layer_idx)
    return merged
