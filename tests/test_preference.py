"""DPO and SimPO (opsft.method.preference): hand-computed values, and value and gradient against a
brute-force per-pair computation in float64 from random logits; the pair-mean normalisation."""

import math

import pytest
import torch
from opsft.method import losses, preference
from opsft.method.preference import dpo_loss, pair_loss, sequence_logps, simpo_loss

V = 19


def test_dpo_hand_computed():
    # pair 1: the policy moved +1 on chosen and -1 on rejected vs the reference: h = 2
    # pair 2: the opposite: h = -2
    pi_c, pi_r = torch.tensor([-10.0, -12.0]), torch.tensor([-12.0, -10.0])
    ref = torch.tensor([-11.0, -11.0])
    loss, m = dpo_loss(pi_c, pi_r, ref, ref, beta=0.1)
    per = [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.2))]  # -log sigmoid(+-0.2)
    assert float(loss) == pytest.approx(sum(per) / 2, rel=1e-6)
    assert m["reward_accuracy"] == 0.5 and m["n_pairs"] == 2.0
    assert m["margin"] == pytest.approx(0.0, abs=1e-6)
    assert m["chosen_reward"] == pytest.approx(0.0, abs=1e-6)  # +0.1 and -0.1
    one, m1 = dpo_loss(pi_c[:1], pi_r[:1], ref[:1], ref[:1], beta=0.1)
    assert float(one) == pytest.approx(0.598138869, rel=1e-6)
    assert (m1["margin"], m1["chosen_reward"], m1["rejected_reward"]) == pytest.approx((0.2, 0.1, -0.1), rel=1e-5)
    assert (m1["logp_chosen"], m1["logp_rejected"]) == (-10.0, -12.0)
    # conservative DPO, eps = 0.1: 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2)
    smooth, _ = dpo_loss(pi_c[:1], pi_r[:1], ref[:1], ref[:1], beta=0.1, label_smoothing=0.1)
    assert float(smooth) == pytest.approx(0.618138869, rel=1e-6)


def test_simpo_hand_computed():
    # 2 * (-0.5) - 2 * (-1.0) - 1 = 0  ->  log 2;   2 * (-0.2) - 2 * (-1.2) - 1 = 1  ->  log(1 + e^-1)
    loss, m = simpo_loss(torch.tensor([-0.5, -0.2]), torch.tensor([-1.0, -1.2]), beta=2.0, gamma=1.0)
    assert float(loss) == pytest.approx((math.log(2) + math.log(1 + math.exp(-1))) / 2, rel=1e-6)
    assert m["reward_accuracy"] == 1.0 and m["margin"] == pytest.approx(1.5, rel=1e-6)  # beta * (0.5, 1.0) mean
    assert m["logp_chosen"] == pytest.approx(-0.35) and m["logp_rejected"] == pytest.approx(-1.1)
    with_gamma_0, _ = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), beta=2.0, gamma=0.0)
    assert float(with_gamma_0) == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)


def _pairs(seed=0, n=3, T=6):
    """2n rows (chosen 0..n-1, rejected n..2n-1) of random logits and labels, some positions unlabelled."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * n, T, V, generator=g) * 2
    labels = torch.randint(0, V, (2 * n, T), generator=g)
    labels[torch.rand(2 * n, T, generator=g) < 0.3] = -100
    labels[:, 0] = -100  # a "prompt" position
    labels[:, 1] = 3  # every row has at least one labelled token
    ref = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3 - 10
    return logits, labels, ref


def brute(name, logits, labels, ref, **p):
    """Per pair, in float64, with plain loops: sum / mean of log_softmax at the labels, then the formula."""
    n = logits.shape[0] // 2
    sums, means = [], []
    for row in range(2 * n):
        terms = [torch.log_softmax(logits[row, t].double(), -1)[labels[row, t]]
                 for t in range(labels.shape[1]) if labels[row, t] >= 0]
        sums.append(sum(terms))
        means.append(sum(terms) / len(terms))
    total = 0.0
    for i in range(n):
        if name == "dpo":
            z = p["beta"] * ((sums[i] - ref[i, 0]) - (sums[n + i] - ref[i, 1]))
            eps = p.get("label_smoothing", 0.0)
            total = total - (1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))
        else:
            z = p["beta"] * means[i] - p["beta"] * means[n + i] - p["gamma"]
            total = total - torch.log(torch.sigmoid(z))
    return total / n


def ours(name, logits, labels, ref, normalizer=None, **p):
    n = logits.shape[0] // 2
    sums, counts = sequence_logps(logits, labels, chunk_size=5)
    return pair_loss(name, sums[:n], sums[n:], counts[:n], counts[n:], ref[:, 0], ref[:, 1],
                     normalizer=normalizer, **p)


@pytest.mark.parametrize("name,params", [("dpo", {"beta": 0.1}), ("dpo", {"beta": 0.5, "label_smoothing": 0.2}),
                                         ("simpo", {"beta": 2.0, "gamma": 1.0}),
                                         ("simpo", {"beta": 10.0, "gamma": 0.0})])
def test_value_and_gradient_match_brute_force(name, params):
    logits, labels, ref = _pairs()
    x = logits.clone().requires_grad_()
    loss, metrics = ours(name, x, labels, ref, **params)
    loss.backward()
    y = logits.clone().double().requires_grad_()
    expected = brute(name, y, labels, ref, **params)
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-7)
    assert metrics["n_pairs"] == 3 and 0.0 <= metrics["reward_accuracy"] <= 1.0


def test_sequence_logps_sums_and_counts():
    logits, labels, _ = _pairs(1)
    mask = torch.ones_like(labels, dtype=torch.bool)
    mask[:, -1] = False
    sums, counts = sequence_logps(logits, labels, mask)
    logp = torch.log_softmax(logits.double(), -1)
    for r in range(labels.shape[0]):
        keep = [t for t in range(labels.shape[1] - 1) if labels[r, t] >= 0]
        assert float(counts[r]) == len(keep)
        assert float(sums[r]) == pytest.approx(float(sum(logp[r, t, labels[r, t]] for t in keep)), rel=1e-5)


@pytest.mark.parametrize("name", ["dpo", "simpo"])
def test_pair_mean_is_exact_over_workers_and_micro_batches(name):
    """normalizer = global pairs / W: gradients summed over each worker's micro-batches, then
    averaged over W workers (DDP), equal the gradient of the mean over all pairs."""
    n = 5
    logits, labels, ref = _pairs(2, n=n)
    x = logits.clone().requires_grad_()
    ours(name, x, labels, ref, beta=0.3, **({"gamma": 0.5} if name == "simpo" else {}))[0].backward()
    full = x.grad.clone()
    world = 2
    norm = losses.global_token_normalizer(n, world)
    worker_grads = []
    for micro_batches in ([[0], [1, 2]], [[3, 4]]):  # worker 0: 2 micro-batches, worker 1: one
        x.grad = None
        for pairs in micro_batches:
            rows = pairs + [n + i for i in pairs]
            ours(name, x[rows], labels[rows], ref[pairs], normalizer=norm, beta=0.3,
                 **({"gamma": 0.5} if name == "simpo" else {}))[0].backward()
        worker_grads.append(x.grad.clone())
    torch.testing.assert_close(sum(worker_grads) / world, full, rtol=1e-5, atol=1e-8)


def test_bad_parameters_say_what_is_wrong():
    a = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(a, a, a, a, label_smoothing=0.5)
    with pytest.raises(ValueError, match="reference"):
        pair_loss("dpo", a, a, a + 1, a + 1)
    with pytest.raises(ValueError, match="unknown pair loss"):
        pair_loss("ipo", a, a, a + 1, a + 1)
    assert preference.PAIR_LOSSES == ("dpo", "simpo")
