"""Helpers for the opsft train tests: a tiny random Llama saved as a HF folder with the
real tokenizer, and small corpora."""

from __future__ import annotations

import torch
from opsft.corpus import write_rows


def save_tiny(model, tokenizer, folder) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def arithmetic_rows(n: int) -> list[dict]:
    """Short rows of varied length (the length sort and padding matter)."""
    return [{"id": f"r{i}", "prompt": f"What is {i} plus {i + 1}?",
             "response": f"{i} plus {i + 1} is {2 * i + 1}." + " Done." * (i % 4)} for i in range(n)]


def write_corpus(path, rows) -> str:
    write_rows(rows, path)
    return str(path)


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{folder}/model.safetensors")


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
