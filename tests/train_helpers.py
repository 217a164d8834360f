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


def one_process_and_two_crashing_workers(tmp_path, **common) -> tuple[dict, dict, list[dict], list[dict]]:
    """The same training run twice: in one process (micro-batches of 4), and as a Ray Train job of
    two workers (micro-batches of 1) that crashes once after step 3 and resumes from its last
    checkpoint. Checks that the crash happened and that the corpus' one bad row was counted;
    returns (local summary, Ray summary, local metrics, Ray metrics)."""
    from opsft.config import TrainConfig
    from opsft.train.loop import run_local
    from opsft.train.metrics import read_metrics
    from opsft.train.ray_job import run_ray

    ref = run_local(TrainConfig(**common, micro_batch_size=4, output_dir=str(tmp_path / "one")))
    out = run_ray(TrainConfig(**common, micro_batch_size=1, output_dir=str(tmp_path / "two"),
                              scaling={"num_workers": 2}, fail_after_step=3, max_failures=1))
    assert out["data"]["train"]["error_rows"] == 1
    assert (tmp_path / "two" / ".fail_after_step_done").exists()  # the crash did happen
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    return ref, out, one, two
