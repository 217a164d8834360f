"""Each loss: value and gradient w.r.t. the logits against a brute-force formula."""

import math

import pytest
import torch
from opsft.method import losses

V = 23


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, V, generator=g) * 3
    labels = torch.randint(0, V, (3, 7), generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    return logits, labels, mask


def brute(name, logits, labels, mask, progress=1.0, beta=1.0, gmin=0.1, gmax=2.0, warm=0.0, trans=0.0, bound=5.0):
    """The per-token losses written out from method.md, in float64, with full log_softmax."""
    logits = logits.double()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    p = logp.exp()
    phi = (logp + ent).detach()
    if progress < warm:
        lam = 0.0
    elif progress < warm + trans:
        lam = (progress - warm) / trans
    else:
        lam = 1.0
    gamma = 1 + lam * (torch.exp(-phi / beta).clamp(gmin, gmax) - 1)
    pc = p.clamp(1e-10, 1)
    per_token = {
        "sft": -logp,
        "dft": -p.detach() * logp,
        "eaft": -(ent / math.log(V)).detach() * logp,
        "idft": -(pc ** gamma).detach() * torch.log(pc),
        "idft_legacy": -(pc ** gamma.detach()) * torch.log(pc),
        "idft_hardmask": -((pc ** gamma) * ((phi > -bound) & (phi < bound))).detach() * torch.log(pc),
    }[name]
    m = mask.double()
    return (per_token * m).sum() / m.sum()


PARAMS = dict(beta=1.0, gamma_min=0.1, gamma_max=2.0, warmup_ratio=0.0, transition_ratio=0.0)


def params_for(name):
    if name.startswith("idft"):
        return {**PARAMS, **({"bound": 1.5} if name == "idft_hardmask" else {})}
    return {}


@pytest.mark.parametrize("name", ["sft", "dft", "eaft", "idft", "idft_legacy", "idft_hardmask"])
def test_value_and_gradient_match_brute_force(name):
    logits, labels, mask = batch()
    ours_in = logits.clone().requires_grad_()
    loss, metrics = losses.compute(name, ours_in, labels, mask, chunk_size=5, **params_for(name))
    loss.backward()
    ref_in = logits.clone().double().requires_grad_()
    ref = brute(name, ref_in, labels, mask, bound=1.5)
    ref.backward()
    assert math.isclose(float(loss), float(ref), rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(ours_in.grad.double(), ref_in.grad, atol=1e-6, rtol=1e-4)
    assert metrics["n_tokens"] == float(mask.sum())


def grad_of(name, logits, labels, mask, **kw):
    x = logits.clone().requires_grad_()
    losses.compute(name, x, labels, mask, **kw)[0].backward()
    return x.grad


def test_idft_gamma_zero_is_sft_and_lambda_zero_is_dft():
    logits, labels, mask = batch(1)
    # gamma_min = gamma_max = 0 forces gamma = 0 everywhere: weight p^0 = 1, the SFT gradient.
    g0 = grad_of("idft", logits, labels, mask, beta=1.0, gamma_min=0.0, gamma_max=0.0,
                 warmup_ratio=0.0, transition_ratio=0.0)
    torch.testing.assert_close(g0, grad_of("sft", logits, labels, mask))
    # During warm-up lambda = 0, gamma = 1: weight p, the DFT gradient.
    g1 = grad_of("idft", logits, labels, mask, progress=0.1, warmup_ratio=0.2, transition_ratio=0.1)
    torch.testing.assert_close(g1, grad_of("dft", logits, labels, mask), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("progress,expected", [(0.0, 0.0), (0.19999, 0.0), (0.2, 0.0), (0.25, 0.5),
                                               (0.29999, 0.9999), (0.3, 1.0), (1.0, 1.0)])
def test_lambda_schedule_edges(progress, expected):
    assert losses.lambda_schedule(progress, 0.2, 0.1) == pytest.approx(expected, abs=1e-3)


def test_lambda_schedule_without_transition_is_a_step():
    assert losses.lambda_schedule(0.0, 0.0, 0.0) == 1.0
    assert losses.lambda_schedule(0.49, 0.5, 0.0) == 0.0
    assert losses.lambda_schedule(0.5, 0.5, 0.0) == 1.0


def test_idft_schedule_matches_brute_force_mid_transition():
    logits, labels, mask = batch(2)
    x = logits.clone().requires_grad_()
    loss, m = losses.compute("idft", x, labels, mask, progress=0.25, warmup_ratio=0.2, transition_ratio=0.1)
    ref = brute("idft", logits, labels, mask, progress=0.25, warm=0.2, trans=0.1)
    assert math.isclose(float(loss), float(ref), rel_tol=1e-5)
    assert m["lambda_mean"] == pytest.approx(0.5)


def test_clamp_fractions_are_reported():
    # phi << 0 (a token the model finds unlikely at a confident position) hits gamma_max.
    logits = torch.zeros(1, 2, V)
    logits[0, 0, 0] = 20.0  # confident: H ~ 0
    logits[0, 1, 0] = 20.0
    labels = torch.tensor([[0, 5]])  # first endorsed (phi ~ 0), second very off-policy
    _, m = losses.compute("idft", logits, labels, warmup_ratio=0.0, transition_ratio=0.0)
    assert m["frac_gamma_max"] == 0.5
    assert m["frac_gamma_min"] == 0.0


def test_normalizer_makes_split_batches_equal_the_global_mean():
    """Two 'workers' x two micro-batches with normalizer = global_tokens / world_size, gradients
    summed over micro-batches and averaged over workers (as DDP does), equal the full batch."""
    logits, labels, mask = batch(3)
    full = grad_of("idft", logits, labels, mask, warmup_ratio=0.0, transition_ratio=0.0)
    world = 2
    norm = losses.global_token_normalizer(int(mask.sum()), world)
    x = logits.clone().requires_grad_()
    worker_grads = []
    for rows in ([0, 1], [2]):  # uneven split across workers
        x.grad = None
        for r in rows:  # one micro-batch per row
            loss, _ = losses.compute("idft", x[r:r + 1], labels[r:r + 1], mask[r:r + 1], normalizer=norm,
                                     warmup_ratio=0.0, transition_ratio=0.0)
            loss.backward()
        worker_grads.append(x.grad.clone())
    averaged = sum(worker_grads) / world
    torch.testing.assert_close(averaged, full, atol=1e-7, rtol=1e-5)


def test_unknown_loss_and_bad_params():
    logits, labels, mask = batch()
    with pytest.raises(ValueError, match="unknown loss"):
        losses.compute("nope", logits, labels, mask)
    with pytest.raises(ValueError, match="beta"):
        losses.compute("idft", logits, labels, mask, beta=0.0)
    with pytest.raises(TypeError):
        losses.compute("sft", logits, labels, mask, beta=1.0)


def test_no_valid_token_gives_zero_loss_with_a_graph():
    logits, labels, _ = batch()
    x = logits.clone().requires_grad_()
    loss, _ = losses.compute("idft", x, labels, torch.zeros_like(labels, dtype=torch.bool))
    loss.backward()
    assert float(loss) == 0.0 and torch.all(x.grad == 0)


def test_idft_defaults_are_one_decision_for_the_function_and_the_cli():
    """losses.compute("idft") and `opsft train --loss idft` use the same defaults: the released run
    scripts' lambda schedule (0 / 0), so by default lambda is 1 from the first step."""
    from opsft.config import LossConfig

    cfg = LossConfig()
    assert {k: getattr(cfg, k) for k in losses.IDFT_DEFAULTS} == losses.IDFT_DEFAULTS
    assert losses.IDFT_DEFAULTS["warmup_ratio"] == 0.0 and losses.IDFT_DEFAULTS["transition_ratio"] == 0.0
    logits = torch.randn(1, 6, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 11, (1, 6), generator=torch.Generator().manual_seed(1))
    _, metrics = losses.compute("idft", logits, labels, progress=0.0)
    assert metrics["lambda_mean"] == 1.0  # not the config file's 0 during a 20% warm-up


def test_the_loss_registry_is_what_every_layer_uses():
    """opsft.method.loss_registry names every loss once: the token functions registered in opsft.method.losses,
    the pair losses of opsft.method.preference, LossConfig's names and params, the CLI's --loss choices,
    and the metric keys each token loss reports."""
    import argparse

    from opsft.cli import train as train_cli
    from opsft.config import LossConfig
    from opsft.method import loss_registry, preference

    assert losses.names() == sorted(loss_registry.TOKEN_LOSSES)
    assert preference.PAIR_LOSSES == loss_registry.PAIR_LOSSES
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    choices = next(a.choices for g in parser._subparsers._group_actions for p in g.choices.values()
                   for a in p._actions if a.dest == "loss")
    assert tuple(choices) == loss_registry.NAMES
    logits = torch.randn(1, 6, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 11, (1, 6), generator=torch.Generator().manual_seed(1))
    common = {"loss", "n_tokens", "logprob_mean", "entropy_mean", "phi_mean", "weight_mean"}
    for name, entry in loss_registry.LOSSES.items():
        cfg = LossConfig(name=name)
        assert cfg.pairs == (entry.kind == "pair")
        assert cfg.params() == entry.defaults()  # every parameter it takes, at its registry default
        if entry.kind == "token":
            _, metrics = losses.compute(name, logits, labels, **cfg.params())
            assert set(metrics) == common | set(entry.metrics), name
