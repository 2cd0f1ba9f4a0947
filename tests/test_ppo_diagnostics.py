"""The parallel-data diagnostics of algos/ppo.py's plasticity_metrics (docs/ppo.md, detail 18; docs/studies/
parallel-data.md): feature rank at 99% energy, gradient kurtosis and the effective sample size of the importance
ratios, each against a hand computation, then inside plasticity_metrics against quantities computed here
independently; and every PPO-family script carries the same three functions."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from helpers import algo_scripts, load_script


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


def with_singular_values(values, n: int = 40, d: int = 12, seed: int = 0) -> torch.Tensor:
    """An n x d matrix U diag(values) V^T with random orthonormal U (n x k) and V (d x k): singular values `values`."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(n, len(values))))
    v, _ = np.linalg.qr(rng.normal(size=(d, len(values))))
    return torch.from_numpy(u @ np.diag(values) @ v.T).float()


# ---------------------------------------------------------------------------------------------------------------
# Feature rank: the fewest singular values whose squares hold 99% of the sum of squares


def test_feature_rank_counts_squared_singular_values(ppo):
    """Squares 50, 30, 10, 5, 3.5, 1, 0.5 (sum 100): the running sums pass 99 at the sixth (99.5). srank counts the
    singular values themselves (sqrt of those): their running sum passes 99% of 21.53 only at the seventh."""
    squares = [50.0, 30.0, 10.0, 5.0, 3.5, 1.0, 0.5]
    features = with_singular_values([math.sqrt(s) for s in squares])
    assert ppo.feature_rank(features) == 6
    assert ppo.srank(features) == 7
    assert ppo.feature_rank(features, energy=0.9) == 3  # 50 + 30 + 10 = 90 of 100
    assert ppo.feature_rank(features, energy=0.95) == 4


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_feature_rank_of_equal_singular_values(ppo, rank):
    """r equal singular values: the first r - 1 hold (r - 1) / r < 99% of the energy, so the rank is r."""
    assert ppo.feature_rank(with_singular_values([2.0] * rank)) == rank


def test_feature_rank_of_zero_features(ppo):
    assert ppo.feature_rank(torch.zeros(16, 8)) == 0


def test_feature_rank_matches_a_numpy_reference(ppo):
    """Random features with a decaying spectrum against numpy's SVD and a plain loop."""
    rng = np.random.default_rng(3)
    features = rng.normal(size=(64, 32)) * np.geomspace(1.0, 1e-3, 32)
    sq = np.linalg.svd(features, compute_uv=False) ** 2
    running, expected = 0.0, None
    for k, s in enumerate(sq, start=1):
        running += s
        if running >= 0.99 * sq.sum():
            expected = k
            break
    assert 1 < expected < 32
    assert ppo.feature_rank(torch.from_numpy(features).float()) == expected


# ---------------------------------------------------------------------------------------------------------------
# Kurtosis (Pearson's, not the excess) and the effective sample size


def test_kurtosis_by_hand(ppo):
    """+-1 in equal numbers: fourth moment 1, variance 1, kurtosis 1. Entries +a, -a and n - 2 zeros: variance
    2a^2 / n, fourth moment 2a^4 / n, kurtosis n / 2 (here n = 10: 5). A shift and a scale change nothing."""
    assert ppo.kurtosis(torch.tensor([1.0, -1.0] * 8)) == pytest.approx(1.0)
    spike = torch.tensor([3.0, -3.0] + [0.0] * 8)
    assert ppo.kurtosis(spike) == pytest.approx(5.0)
    assert ppo.kurtosis(7.0 + 0.5 * spike) == pytest.approx(5.0)
    assert ppo.kurtosis(spike.view(2, 5)) == pytest.approx(5.0)  # all entries, whatever the shape


def test_kurtosis_of_gaussian_and_uniform_samples(ppo):
    """The population values: 3 for a Gaussian, 9/5 for a uniform (large samples, loose tolerance)."""
    gen = torch.Generator().manual_seed(0)
    assert ppo.kurtosis(torch.randn(400_000, generator=gen)) == pytest.approx(3.0, abs=0.05)
    assert ppo.kurtosis(torch.rand(400_000, generator=gen)) == pytest.approx(1.8, abs=0.02)


def test_effective_sample_size_by_hand(ppo):
    """(sum w)^2 / (n sum w^2): equal weights 1 (whatever their value), one weight carrying everything 1/n,
    [1, 1, 2, 2] 36 / (4 * 10) = 0.9."""
    assert ppo.effective_sample_size(torch.full((7,), 0.3)) == pytest.approx(1.0)
    assert ppo.effective_sample_size(torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0])) == pytest.approx(0.2)
    assert ppo.effective_sample_size(torch.tensor([1.0, 1.0, 2.0, 2.0])) == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------------------------
# Inside plasticity_metrics


def test_plasticity_metrics_reports_the_three_diagnostics(ppo):
    """On an MLP agent (tanh, separate actor and critic): the ESS is that of pi / pi_old, the kurtosis that of the
    PPO loss's gradient over all parameters, the feature ranks those of each network's last hidden layer."""
    torch.manual_seed(0)
    agent = ppo.Agent((6,), 3, continuous=False)
    obs = torch.randn(128, 6)
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action_and_value(obs)
    advantages, returns = torch.randn(128), torch.randn(128)
    args = ppo.Args(clip_coef=0.2, ent_coef=0.01)

    # at the rollout policy every ratio is 1: ESS 1
    metrics = ppo.plasticity_metrics(agent, (obs, actions, logprobs, advantages, returns, values), args)
    assert metrics["plasticity/ess"] == pytest.approx(1.0, abs=1e-6)

    # old log-probabilities raised by log 4 on every fourth sample: ratios pi / pi_old are 1, 1, 1, 1/4 (ESS
    # 3.25^2 / (4 * 3.0625) = 0.8622); the inverted ratios 1, 1, 1, 4 would give 49 / 76 = 0.6447
    shift = torch.tensor([0.0, 0.0, 0.0, math.log(4.0)]).repeat(32)
    batch = (obs, actions, logprobs + shift, advantages, returns, values)
    metrics = ppo.plasticity_metrics(agent, batch, args)
    assert metrics["plasticity/ess"] == pytest.approx(3.25**2 / (4 * 3.0625), rel=1e-5)

    loss = ppo.ppo_loss(agent, *batch, args)[0]
    grads = torch.autograd.grad(loss, list(agent.parameters()))
    g = torch.cat([x.flatten() for x in grads]).double().numpy()
    centred = g - g.mean()
    assert metrics["plasticity/grad_kurtosis"] == pytest.approx((centred**4).mean() / (centred**2).mean() ** 2,
                                                                rel=1e-4)
    assert metrics["plasticity/grad_kurtosis"] > 3.0  # a network's gradient is heavy-tailed (not a tautology of 3)

    for side in ("actor", "critic"):
        with torch.no_grad():
            features = getattr(agent, side)[:-1](obs).double().numpy()  # fc1, act1, fc2, act2
        sq = np.linalg.svd(features, compute_uv=False) ** 2
        expected = int(np.searchsorted(np.cumsum(sq) / sq.sum(), 0.99)) + 1
        key = "plasticity/feature_rank" + ("" if side == "actor" else "/critic")
        assert metrics[key] == expected, side
    assert metrics["plasticity/feature_rank"] <= metrics["plasticity/srank"]  # squares concentrate the energy


# ---------------------------------------------------------------------------------------------------------------
# The PPO family carries the same lines


# the torch scripts of the family; the JAX twin computes the same keys in jnp, checked against ppo.py's values on the
# same weights in tests/test_ppo_jax.py
FAMILY = [name[:-3] for name in algo_scripts() if name.startswith("ppo_") and not name.endswith("_jax.py")]


@pytest.mark.parametrize("name", FAMILY)
def test_family_carries_the_diagnostics(ppo, name):
    module = load_script(name)
    for function in ("feature_rank", "kurtosis", "effective_sample_size"):
        assert inspect.getsource(getattr(module, function)) == inspect.getsource(getattr(ppo, function)), function
    source = inspect.getsource(module.plasticity_metrics)
    for key in ("plasticity/feature_rank{suffix}", "plasticity/grad_kurtosis", "plasticity/ess"):
        assert key in source, key
