"""CLL math against a brute-force reference (full log_softmax + entropy)."""

import math

import pytest
import torch
from opsft.method.cll import head_logprob_entropy, summarize, token_logprob_entropy, token_phi


def brute_phi(logits, labels, temperature=1.0):
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1) + ent


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_chunked_phi_equals_brute_force(chunk, temperature):
    g = torch.Generator().manual_seed(chunk)
    logits = torch.randn(3, 11, 97, generator=g) * 4
    labels = torch.randint(0, 97, (3, 11), generator=g)
    phi = token_phi(logits, labels, temperature=temperature, chunk_size=chunk)
    torch.testing.assert_close(phi.double(), brute_phi(logits, labels, temperature), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_head_logprob_entropy_equals_brute_force_of_the_head_logits(chunk, temperature):
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(9, 16, generator=g).to(torch.bfloat16)  # e.g. a bf16 body's final hidden states
    weight, bias = torch.randn(97, 16, generator=g).to(torch.bfloat16), torch.randn(97, generator=g)
    labels = torch.randint(0, 97, (9,), generator=g)
    logits = hidden.double() @ weight.double().T + bias.double()  # the bf16 values, exactly
    logp, ent = head_logprob_entropy(hidden, weight.float(), labels, temperature, chunk, bias=bias)
    assert logp.dtype == ent.dtype == torch.float32
    ref = torch.log_softmax(logits / temperature, -1)
    torch.testing.assert_close(logp.double(), ref.gather(-1, labels[:, None]).squeeze(-1), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        head_logprob_entropy(hidden, weight.float(), labels[:-1])


def test_mask_zeroes_positions_and_out_of_range_labels():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 13, generator=g)
    labels = torch.randint(0, 13, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    phi = token_phi(logits, labels, mask=mask, chunk_size=4)
    assert torch.all(phi[~mask] == 0)
    torch.testing.assert_close(phi[mask].double(), brute_phi(logits, labels)[mask], atol=1e-5, rtol=1e-5)
    labels_ignored = labels.clone()
    labels_ignored[0, 0] = -100
    logp, _ = token_logprob_entropy(logits, labels_ignored)
    assert logp[0, 0] == 0


def test_logprob_gradient_equals_autograd_of_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 6, 31, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 31, (4, 6), generator=g)
    weights = torch.randn(4, 6, generator=g)
    logp, ent = token_logprob_entropy(logits, labels, temperature=0.8, chunk_size=5)
    (logp * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref = torch.log_softmax(logits / 0.8, -1).gather(-1, labels[..., None]).squeeze(-1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad, atol=1e-5, rtol=1e-4)
    assert not ent.requires_grad


def test_float64_logits_are_computed_in_float64_and_others_in_float32():
    """compute_dtype: float64 logits (opsft train's float64 reference) give float64 log p, H and
    gradient, within 1e-12 of a float64 log_softmax (rounding: a few eps64 x |z| ~ 1e-14; a float32
    step anywhere would leave ~1e-7); float32 and bf16 logits give float32 log p and H as before."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 7, 97, generator=g, dtype=torch.float64) * 4).requires_grad_()
    labels = torch.randint(0, 97, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g, dtype=torch.float64)
    logp, ent = token_logprob_entropy(logits, labels, temperature=0.7, chunk_size=5)
    assert logp.dtype == ent.dtype == torch.float64
    torch.testing.assert_close(logp + ent, brute_phi(logits.detach(), labels, 0.7), rtol=1e-12, atol=1e-12)
    (logp * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    (ref * weights).sum().backward()
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, logits.grad, rtol=1e-12, atol=1e-12)
    for dtype in (torch.float32, torch.bfloat16):
        low = logits.detach().to(dtype).requires_grad_()
        logp, ent = token_logprob_entropy(low, labels)
        assert logp.dtype == ent.dtype == torch.float32
        logp.sum().backward()
        assert low.grad.dtype == dtype


def test_sampled_tokens_have_phi_mean_near_zero():
    # E_{x ~ p}[log p(x) + H(p)] = 0: the property that gives CLL its name.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20000, 50, generator=g) * 2
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(-1)
    assert abs(float(token_phi(logits, labels).mean())) < 0.02


def test_summarize_hand_computed():
    logp = [-0.5, -2.0, -6.0, -0.1]
    ent = [1.0, 0.5, 0.5, 0.05]  # phi = 0.5, -1.5, -5.5, -0.05
    s = summarize(logp, ent)
    assert s.n_tokens == 4
    assert math.isclose(s.cll, (0.5 - 1.5 - 5.5 - 0.05) / 4)
    assert math.isclose(s.cll_sum, -6.55)
    assert s.cll_frac_pos == 0.25
    assert s.cll_frac_gt_m1 == 0.5
    assert s.cll_frac_gt_m3 == 0.75
    assert s.cll_frac_gt_m5 == 0.75
    assert math.isclose(s.logprob_mean, -8.6 / 4)
    with pytest.raises(ValueError):
        summarize([], [])


def test_float32_entropy_has_no_cancellation_when_logits_share_a_large_offset():
    """Softmax is shift-invariant; float32 logits near 300 must still give H and log p within
    1e-5 of a float64 brute force on the same (float32) logits. H computed as
    logsumexp - sum p z loses ~5e-3 here (the cancellation of two numbers near 300)."""
    torch.manual_seed(0)
    labels = torch.randint(0, 49152, (64,))
    for offset in (0.0, 300.0):
        logits = (torch.randn(64, 49152, dtype=torch.float64) * 3 + offset).float()
        logp64 = torch.log_softmax(logits.double(), -1)
        want_h = -(logp64.exp() * logp64).sum(-1)
        want_lp = logp64.gather(-1, labels[:, None]).squeeze(-1)
        logp, ent = token_logprob_entropy(logits, labels)
        assert float((ent.double() - want_h).abs().max()) < 1e-5
        assert float((logp.double() - want_lp).abs().max()) < 1e-5


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk,temperature", [(1, 1.0), (3, 0.7), (64, 1.3)])
def test_linear_logprob_entropy_values_and_gradients_equal_float64_brute_force(chunk, temperature, with_bias):
    """The memory-bounded fused head (chunks of positions, recomputed in the backward pass) against
    a float64 brute force (full logits, log_softmax, autograd): log p, H and the gradients of a
    weighted sum of log p for hidden, weight and bias, with ignored labels among the positions.
    Both sides float64, so the bound is float64 reduction noise, not float32's."""
    from opsft.method.cll import linear_logprob_entropy

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 5, 8, generator=g, dtype=torch.float64) * 2
    weight = torch.randn(13, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(13, generator=g, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, 13, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    upstream = torch.randn(2, 5, generator=g, dtype=torch.float64)

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        b = bias.clone().requires_grad_() if bias is not None else None
        logp, ent = fn(h, w, b)
        (logp * upstream).sum().backward()
        return logp.detach(), ent.detach(), h.grad, w.grad, None if b is None else b.grad

    def brute(h, w, b):
        logits = torch.nn.functional.linear(h, w, b) / temperature
        logp_all = torch.log_softmax(logits, -1)
        valid = labels >= 0
        logp = logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid
        ent = -(logp_all.exp() * logp_all).sum(-1)
        return logp, ent.detach()

    got = run(lambda h, w, b: linear_logprob_entropy(h, w, labels, temperature, chunk, bias=b))
    want = run(brute)
    for a, b in zip(got, want, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_linear_logprob_entropy_keeps_float32_logits_under_bf16_autocast():
    """A float32 head under bf16 autocast still makes float32 logits (autocast is off inside), so
    training with autocast computes log p and H as exactly as without it."""
    from opsft.method.cll import linear_logprob_entropy

    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 40, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = linear_logprob_entropy(hidden, weight, labels, chunk_size=4)
    ref_lp, ref_ent = token_logprob_entropy(hidden @ weight.T, labels)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_lp, rtol=1e-5, atol=1e-5)  # float32 matmul blocking only
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
