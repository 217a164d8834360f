"""The hf engine's numerics with bf16 weights: the LM head, the softmax, log p and H stay float32."""

import copy

import pytest
import torch
from opsft.engines.hf import HFEngine


def test_bf16_weights_score_with_a_float32_head(tiny_model, tokenizer):
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    engine = HFEngine(model_and_tokenizer=(model, tokenizer), device="cpu", max_batch_size=1, chunk_size=5)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, len(tokenizer), (n,), generator=g).tolist() for n in (12, 30)]
    starts = [4, 9]
    scores = engine.score_tokens(seqs, starts, temperature=0.8)
    for seq, start, got in zip(seqs, starts, scores, strict=True):
        ids = torch.tensor([seq])
        with torch.no_grad():  # the same decoder call on the same single row: the same bf16 hidden states
            hidden = model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        hidden = hidden[start - 1: -1]
        weight = model.get_output_embeddings().weight.detach()
        labels = torch.tensor(seq[start:])
        ref = torch.log_softmax((hidden.double() @ weight.double().T) / 0.8, -1)  # the bf16 values, exactly
        ref_logp, ref_h = ref.gather(-1, labels[:, None]).squeeze(-1), -(ref.exp() * ref).sum(-1)
        assert got.logprob == pytest.approx(ref_logp.numpy(), abs=2e-5)
        assert got.entropy == pytest.approx(ref_h.numpy(), abs=2e-5)
        # what a bf16 head gives (its logits rounded to bf16) is measurably off: the check above can tell
        rounded = torch.log_softmax((hidden @ weight.T).double() / 0.8, -1)
        assert (rounded.gather(-1, labels[:, None]).squeeze(-1) - ref_logp).abs().max() > 1e-4
