"""The transformers engine: exact CLL scoring and generation on CPU or CUDA.

Scoring runs the decoder once per length-sorted batch and applies the LM head only to
the hidden states of response positions, chunk by chunk, so neither the prompt positions
nor a [tokens x vocab] tensor for the whole batch is ever paid for. The head, the softmax,
log p and H are float32 whatever the weights' dtype (a bf16 head's logits rounded to bf16
cost up to 0.47 nats/token of phi; docs/data_jobs.md).

Hinted decoding steps this engine's streams (open_stream: opsft.engines.hf_streams.Stream, a
left-padded, KV-cached batch); batches are cut by opsft.engines.batching.length_batches.
"""

from __future__ import annotations

import torch

from opsft.data.chat import TokenText, model_max_length
from opsft.engines.base import DTYPES, GenerationParams, TokenScores
from opsft.engines.batching import length_batches
from opsft.engines.hf_streams import Stream
from opsft.method.cll import DEFAULT_CHUNK, head_logprob_entropy, token_logprob_entropy
from opsft.method.hinted import trim_at_stop
from opsft.models import load_model, plain_lm_head, resolve_model

# CPU scoring batch budget: benchmarks/score_cli.py on 48 varied pydoc rows (2 cores), against the naive
# per-row reference: 16 rows / 8192 tokens 0.88-0.96x, 2-4 rows or ~1k tokens 1.05-1.15x.
CPU_SCORE_BATCH_TOKENS = 1024
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


class HFEngine:
    name = "hf"

    def __init__(self, model: str | None = None, *, device: str | None = None, dtype: str = "float32",
                 max_batch_size: int = 16, max_batch_tokens: int = 8192, score_batch_tokens: int | None = None,
                 chunk_size: int = DEFAULT_CHUNK, model_and_tokenizer=None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if model_and_tokenizer is not None:  # an already loaded (model, tokenizer), e.g. in tests
            self.model, self.tokenizer = model_and_tokenizer
            self.model_id = getattr(self.model.config, "_name_or_path", "in-memory")
        else:
            self.model_id = resolve_model(model)
            self.model, self.tokenizer = load_model(self.model_id, dtype=TORCH_DTYPES[dtype], device=self.device)
        self.max_length = model_max_length(self.model.config, self.tokenizer)
        self.max_batch_size, self.max_batch_tokens, self.chunk_size = max_batch_size, max_batch_tokens, chunk_size
        # Scoring batches: on CPU small ones (about 1k padded tokens) are fastest, since a 100-token row
        # already fills the matrix units and padding is pure waste; on CUDA, big batches fill the GPU.
        cpu_default = min(CPU_SCORE_BATCH_TOKENS, max_batch_tokens)
        self.score_batch_tokens = score_batch_tokens or (cpu_default if self.device == "cpu" else max_batch_tokens)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.token_text = TokenText(self.tokenizer)  # id -> text, for stop strings

    # ------------------------------------------------------------------ scoring

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            attn[row, : len(seq)] = 1
        return ids.to(self.device), attn.to(self.device)

    def _plain_head(self):
        """The LM head's (weight, bias) in float32 when the logits are a linear map of the decoder's
        last hidden state (opsft.models.plain_lm_head: a plain head, or a logit scale such as Cohere's
        logit_scale or Granite's logits_scaling folded in), else None (e.g. final_logit_softcapping:
        the model's own logits are used). A bf16 / fp16 head is cast per call (its values exactly), so
        the logits, log p and H are float32 whatever the weights' dtype; an fp32 head with no scale
        is used as it is.

        The first call for a model checks the head path against the model's own logits on one short
        probe sequence (opsft.models.head_mismatch: for families opsft.models.HEAD_FAMILIES does not
        describe); when they differ beyond what rounding explains, it warns once and this engine
        scores that model with its own logits from then on."""
        import warnings

        from opsft.models import head_mismatch

        head = plain_lm_head(self.model)
        if head is None:
            return None
        verdict = getattr(self, "_head_verdict", None)  # (id of the model checked, whether its head path agrees)
        if verdict is None or verdict[0] != id(self.model):
            problem = head_mismatch(self.model, head)
            if problem is not None:
                warnings.warn(f"{self.model_id}: {problem}; scoring with the model's own logits instead (a "
                              "[tokens x vocab] logits tensor per batch)", RuntimeWarning, stacklevel=3)
            verdict = self._head_verdict = (id(self.model), problem is None)
        return head.fold() if verdict[1] else None

    @torch.inference_mode()
    def score_tokens(self, sequences, starts, temperature: float = 1.0) -> list[TokenScores]:
        for seq, start in zip(sequences, starts, strict=True):
            if not 1 <= start < len(seq):
                raise ValueError(f"response start {start} must be in [1, {len(seq)})")
        results: list[TokenScores | None] = [None] * len(sequences)
        head = self._plain_head()
        for batch in length_batches([len(s) for s in sequences], self.max_batch_size, self.score_batch_tokens):
            ids, attn = self._padded([sequences[i] for i in batch])
            rows, cols, labels = [], [], []
            for r, i in enumerate(batch):
                n = len(sequences[i]) - starts[i]
                rows += [r] * n
                cols += range(starts[i] - 1, len(sequences[i]) - 1)  # position t-1 predicts token t
                labels += sequences[i][starts[i]:]
            rows_t, cols_t = torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)
            labels_t = torch.tensor(labels, device=self.device)
            if head is not None:  # the head only on response positions, in float32, chunk by chunk
                hidden = self.model.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
                logp, ent = head_logprob_entropy(hidden[rows_t, cols_t], head[0], labels_t, temperature,
                                                 self.chunk_size, bias=head[1])
            else:
                logits = self.model(input_ids=ids, attention_mask=attn).logits
                logp, ent = token_logprob_entropy(logits[rows_t, cols_t], labels_t, temperature, self.chunk_size)
            logp, ent = logp.double().cpu().numpy(), ent.double().cpu().numpy()
            offset = 0
            for i in batch:
                n = len(sequences[i]) - starts[i]
                results[i] = TokenScores(logprob=logp[offset: offset + n], entropy=ent[offset: offset + n])
                offset += n
        return results  # type: ignore[return-value]

    def check(self) -> None:
        """A known-good request through score_tokens (opsft.faults): raises when the engine cannot score."""
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        ids = list(self.tokenizer("The sky is blue.", add_special_tokens=False)["input_ids"])[:6] + [eos]
        self.score_tokens([ids], [1])
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def close(self) -> None:
        """Drop the model (a CUDA engine's memory goes back to the allocator's cache, then the device)."""
        self.model = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ decoding (hinted decoding's streams)

    def open_stream(self, prompts: list[list[int]], items: list[int], prefill_rows: int = 4) -> Stream:
        """The decode capability (engines.base.DecodeEngine): a left-padded, KV-cached batch
        (opsft.engines.hf_streams.Stream)."""
        return Stream(self.model, prompts, items, self.pad_id, prefill_rows)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[int]]:
        stops = set(params.stop_token_ids) | {self.tokenizer.eos_token_id}
        stops.discard(None)
        outputs: list[list[int] | None] = [None] * len(prompts)
        torch.manual_seed(params.seed)
        budget = max(self.max_batch_tokens, max(len(p) for p in prompts) + params.max_new_tokens)
        lengths = [len(p) + params.max_new_tokens for p in prompts]
        for batch in length_batches(lengths, self.max_batch_size, budget):
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):  # left padding for generation
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                attn[r, width - len(prompts[i]):] = 1
            sampling = params.temperature > 0
            strings = {"stop_strings": list(params.stop_strings), "tokenizer": self.tokenizer} \
                if params.stop_strings else {}
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                max_new_tokens=params.max_new_tokens, do_sample=sampling,
                temperature=params.temperature if sampling else None,
                top_p=params.top_p if sampling else None, top_k=None,
                eos_token_id=sorted(stops), pad_token_id=self.pad_id, **strings,
            )
            for r, i in enumerate(batch):
                new = out[r, width:].tolist()
                cut = next((k + 1 for k, tok in enumerate(new) if tok in stops), len(new))
                outputs[i] = trim_at_stop(new[:cut], params.stop_strings, self.token_text)
        return outputs  # type: ignore[return-value]

