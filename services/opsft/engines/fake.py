"""The fake engine: deterministic, no model, behind the same protocol and factory as hf and vllm,
so that everything but the model is real in a rehearsal (benchmarks/scale_rehearsal.py) or a test.
It loads only a tokenizer (the embedded model's by default) and can be told to fail.

Scores: log p and H of each token are fixed functions of (token id, position): the same sequence
always scores the same, in any batch, on any worker. Generation answers the simple sums of
opsft.data.datasets-style questions ("What is 12 + 7?"): right for about a third of the prompts
(chosen by a hash of the prompt), one off for the rest, so a rewrite sees every source. A hint
prompt gets a fixed "# Analysis ... # CoT:" hint. Hinted decoding (the one-call form, as vLLM's)
gives the reference's answer for even item seeds, one off for odd ones.

Faults (options; tickets in `fault_dir` so that a total holds over every process and restart):
  dead_after N, deaths K   after N calls the engine dies: every call (and check) raises a CUDA
                           error, as a process whose device faulted does; K such deaths in all
  kill_after N, kills K    after N calls the process SIGKILLs itself (OOM killer, preemption)
  hang_after N, hangs K    after N calls a call never returns (a stuck device, a lost engine process)
  poison_token T           a sequence holding token id T raises ValueError: a row fault, the
                           engine stays healthy
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from pathlib import Path

import numpy as np

from opsft.engines.base import GenerationParams, TokenScores

DEATH = "CUDA error: an illegal memory access was encountered (injected by the fake engine)"
HINT = "# Analysis\nThe reference adds the two numbers.\n\n# CoT:\n"
SUM = re.compile(r"(-?\d+)\s*([+-])\s*(-?\d+)")
ANSWER = re.compile(r"answer is (-?\d+)")


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16)


def take_ticket(folder: str | None, kind: str, limit: int) -> bool:
    """Whether this process gets one of `limit` tickets of `kind` (O_EXCL files: each number once)."""
    if not folder or limit <= 0:
        return False
    Path(folder).mkdir(parents=True, exist_ok=True)
    for k in range(1, limit + 1):
        try:
            os.close(os.open(os.path.join(folder, f"{kind}-{k}"), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            continue
    return False


class FakeEngine:
    name = "fake"

    def __init__(self, model: str | None = None, *, max_length: int = 2048, dead_after: int | None = None,
                 deaths: int = 0, kill_after: int | None = None, kills: int = 0, hang_after: int | None = None,
                 hangs: int = 0, fault_dir: str | None = None, poison_token: int | None = None, tokenizer=None):
        from transformers import AutoTokenizer

        from opsft.models import resolve_model

        path = resolve_model(model)
        self.model_id = f"fake:{Path(path).name}"
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        self.max_length = int(max_length)
        self.dead_after, self.deaths, self.kill_after, self.kills = dead_after, deaths, kill_after, kills
        self.hang_after, self.hangs = hang_after, hangs
        self.fault_dir, self.poison_token = fault_dir, poison_token
        self.calls = 0
        self.dead = False

    # ------------------------------------------------------------------ faults

    def _call(self) -> None:
        if self.dead:
            raise RuntimeError(DEATH)
        self.calls += 1
        if self.kill_after is not None and self.calls > self.kill_after and take_ticket(self.fault_dir, "kill",
                                                                                          self.kills):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang_after is not None and self.calls > self.hang_after and take_ticket(self.fault_dir, "hang",
                                                                                          self.hangs):
            while True:  # a call that never returns (a stuck device)
                time.sleep(3600)
        if self.dead_after is not None and self.calls > self.dead_after and take_ticket(self.fault_dir, "death",
                                                                                          self.deaths):
            self.dead = True
            raise RuntimeError(DEATH)

    def check(self) -> None:
        """The engine's own health check: a dead engine fails it."""
        if self.dead:
            raise RuntimeError(DEATH)

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ scoring

    def score_tokens(self, sequences, starts, temperature: float = 1.0) -> list[TokenScores]:
        self._call()
        out = []
        for seq, start in zip(sequences, starts, strict=True):
            if not 1 <= start < len(seq):
                raise ValueError(f"response start {start} must be in [1, {len(seq)})")
            if self.poison_token is not None and self.poison_token in seq:
                raise ValueError(f"fake engine: token {self.poison_token} cannot be scored (an injected row fault)")
            ids = np.asarray(seq[start:], dtype=np.int64)
            pos = np.arange(start, len(seq), dtype=np.int64)
            entropy = ((ids * 40503 + pos * 7) % 1000) / 400.0
            logprob = -entropy * (((ids * 2654435761 + pos) % 1000) / 500.0) - 0.01
            out.append(TokenScores(logprob=logprob / temperature, entropy=entropy))
        return out

    # ------------------------------------------------------------------ generation

    def _answer(self, prompt: str) -> str:
        if "# Question:" in prompt:  # the hint prompt (opsft.data.hints.hint_messages)
            return HINT
        found = SUM.findall(prompt)
        if not found:
            return "I do not know."
        a, op, b = found[-1]
        value = int(a) + int(b) if op == "+" else int(a) - int(b)
        right = _hash(prompt) % 3 == 0
        return f"The answer is {value if right else value + 1}."

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        from opsft.data.chat import TokenText
        from opsft.method.hinted import trim_at_stop

        self._call()
        token_text = TokenText(self.tokenizer)
        eos = self.tokenizer.eos_token_id
        out = []
        for prompt in prompts:
            text = self._answer(self.tokenizer.decode(prompt, skip_special_tokens=True))
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]
            out.append(trim_at_stop(ids[: params.max_new_tokens], params.stop_strings, token_text))
        return out

    def hinted_decode(self, items, params, eos_ids, decode_token=None, max_positions=None, on_token=None) -> list:
        """The decode capability as one call (as the vLLM engine's): one deterministic text per item."""
        from opsft.method.hinted_params import HDResult

        self._call()
        eos = min(eos_ids) if eos_ids else self.tokenizer.eos_token_id
        results = []
        for k, item in enumerate(items):
            seed = k if item.seed is None else item.seed
            found = ANSWER.findall(self.tokenizer.decode(item.hinted_prompt, skip_special_tokens=True))
            value = int(found[-1]) if found else 0
            text = f"Adding them, the answer is {value if seed % 2 == 0 else value + 1}."
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]
            room = min(params.max_new_tokens, (max_positions or self.max_length) - len(item.hinted_prompt))
            tokens = ids[: max(room, 0)]
            results.append(HDResult(tokens=tokens, finish_reason="eos" if tokens == ids else "max_length"))
            if on_token is not None:
                on_token(len(tokens))
        return results
