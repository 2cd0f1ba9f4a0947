"""algos/dqn_mico.py: the MICo distance and target against hand computations on a small batch (pairing, squared
norms, angle, |r_i - r_j|, gamma^n, Huber), the safe square root's gradient where the naive arccos's is not finite,
which layers phi comes from on each network, alpha = 0 as the base script exactly, and end-to-end runs (mico/ logs,
Atari, bad input)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from helpers import (
    assert_one_line_error, assert_same_run, load_script, read_json, read_scalars, run_dqn_smoke, run_script,
    script_path,
)

MICO = script_path("dqn_mico")


@pytest.fixture(scope="module")
def mico():
    return load_script("dqn_mico")


def hand_distance(u: np.ndarray, v: np.ndarray, beta: float) -> float:
    """U(u, v) for one pair, in float64 from the definition: mean of the squared norms plus beta times the angle."""
    cos = float(u @ v) / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-9)
    return 0.5 * (float(u @ u) + float(v @ v)) + beta * math.acos(max(-1.0, min(1.0, cos)))


def test_distances_pair_row_i_of_the_first_with_row_j_of_the_second(mico):
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    second[3] = 2.5 * first[1]  # parallel: angle 0; anti-parallel: angle pi
    second[4] = -first[0]
    got = mico.representation_distances(first, second, beta=0.1).numpy()
    assert got.shape == (5, 5)
    a, b = first.double().numpy(), second.double().numpy()
    expected = np.array([[hand_distance(a[i], b[j], 0.1) for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, got.T)  # online vs target: not symmetric, so the orientation [i, j] is pinned
    # the norms are squared, as the official code (not the plain norms of the paper's formula)
    assert got[1, 3] == pytest.approx(0.5 * (a[1] @ a[1] + b[3] @ b[3]), rel=1e-5, abs=1e-3)
    assert got[0, 4] == pytest.approx(0.5 * (a[0] @ a[0] + b[4] @ b[4]) + 0.1 * math.pi, rel=1e-5)
    # beta weighs the angle only
    angle_only = mico.representation_distances(first, second, beta=1.0) - mico.representation_distances(first, second, 0.0)
    np.testing.assert_allclose(angle_only.numpy(), (expected - np.array(
        [[0.5 * (a[i] @ a[i] + b[j] @ b[j]) for j in range(5)] for i in range(5)])) / 0.1, rtol=1e-4, atol=1e-4)


def test_safe_sqrt_keeps_the_angle_gradient_finite_where_arccos_is_not(mico):
    x = torch.tensor([[1.0, 2.0, -0.5]], requires_grad=True)
    y = torch.tensor([[2.0, 4.0, -1.0]])  # parallel: cos rounds to exactly 1 in float32
    (grad,) = torch.autograd.grad(mico.representation_distances(x, y, beta=0.1).sum(), x)
    assert torch.isfinite(grad).all()
    # with the angle's weight alone the gradient is 0 there: the custom square root's gradient at 1 - cos^2 <= 1e-30
    (grad,) = torch.autograd.grad((mico.representation_distances(x, y, 1.0) - mico.representation_distances(x, y, 0.0))
                                  .sum(), x)
    assert torch.isfinite(grad).all()
    x2 = x.detach().clone().requires_grad_(True)
    cos = (x2 * y).sum(1) / (x2.norm(dim=1) * y.norm(dim=1) + 1e-9)  # the same cos, then the naive angle
    assert cos.item() == 1.0
    (naive,) = torch.autograd.grad(torch.arccos(cos).sum(), x2)
    assert not torch.isfinite(naive).all()
    # away from the edge the custom square root's gradient is the square root's: 1 / (2 sqrt(x))
    z = torch.tensor([0.04, 0.25, 1e-31, 0.0, -1e-3], requires_grad=True)
    (dz,) = torch.autograd.grad(mico.SafeSqrt.apply(z).sum(), z)
    np.testing.assert_allclose(dz.numpy(), [2.5, 1.0, 0.0, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(mico.SafeSqrt.apply(z).detach().numpy(), [0.2, 0.5, math.sqrt(1e-31), 0.0, 0.0])


@pytest.mark.parametrize("family, obs_shape, depth, dim", [
    ("atari", (4, 84, 84), 9, 11 * 11 * 64),  # SAME padding: Dopamine's 7744-d conv output
    ("minatar", (4, 10, 10), 2, 16 * 8 * 8),
    ("vector", (4,), 4, 84),  # no encoder: the last hidden layer
])
def test_phi_is_the_flattened_encoder_output(mico, family, obs_shape, depth, dim):
    torch.manual_seed(0)
    net = mico.QNetwork(obs_shape, 3, minatar=family == "minatar")
    assert mico.mico_depth(net) == depth
    obs = torch.randint(0, 256 if family == "atari" else 2, (6, *obs_shape), dtype=torch.uint8)
    phi = mico.mico_features(net, obs)
    assert phi.shape == (6, dim)
    q, hidden = net(obs, return_hidden=True)
    expected = hidden[-2] if family != "vector" else hidden[-1]  # the ReLU before the dense (or Q) layer
    torch.testing.assert_close(phi, expected.flatten(1))
    torch.testing.assert_close(net.net[depth:](phi), q)  # the rest of the network maps phi to the Q-values


def test_mico_loss_against_a_hand_computation(mico):
    torch.manual_seed(1)
    net = mico.QNetwork((3,), 2)
    obs, next_obs = torch.randn(4, 3), torch.randn(4, 3)
    returns = torch.tensor([0.0, 1.0, -0.5, 1.0])
    online_rep = torch.randn(4, 84).abs() * torch.tensor([[0.02], [0.05], [0.1], [0.3]])  # distances below and above 1
    online_rep.requires_grad_(True)
    gamma_n, beta = 0.99**3, 0.1
    loss, online = mico.mico_loss(online_rep, mico.mico_features(net, obs), mico.mico_features(net, next_obs),
                                  returns, gamma_n, beta)

    def phi(x):  # the MLP's last hidden layer, written out
        h = torch.relu(x @ net.net.fc1.weight.T + net.net.fc1.bias)
        return torch.relu(h @ net.net.fc2.weight.T + net.net.fc2.bias).double().detach().numpy()

    x, xn, r, o = phi(obs), phi(next_obs), returns.double().numpy(), online_rep.detach().double().numpy()
    online_expected = np.array([[hand_distance(o[i], x[j], beta) for j in range(4)] for i in range(4)])
    target = np.array([[abs(r[i] - r[j]) + gamma_n * hand_distance(xn[i], xn[j], beta) for j in range(4)]
                       for i in range(4)])
    np.testing.assert_allclose(online.detach().numpy(), online_expected, rtol=1e-5, atol=1e-5)
    diff = np.abs(online_expected - target)
    huber = np.where(diff <= 1.0, 0.5 * diff**2, diff - 0.5)  # Dopamine's Huber loss, delta 1
    assert (diff > 1).any() and (diff <= 1).any()  # both branches of the Huber loss are exercised
    assert loss.item() == pytest.approx(huber.mean(), rel=1e-5)
    # the target network's side is held constant: no gradient reaches it, though its features were built with grad
    loss.backward()
    assert online_rep.grad is not None and all(p.grad is None for p in net.parameters())


def test_total_loss_mixes_td_and_mico(mico):
    torch.manual_seed(2)
    args = mico.Args(env_id="MinAtar/Breakout", mico_weight=0.3, mico_beta=0.2, n_step=2)
    mico.resolve_args(args)
    q, target = mico.QNetwork((4, 10, 10), 6, minatar=True), mico.QNetwork((4, 10, 10), 6, minatar=True)
    batch = [torch.randint(0, 2, (8, 4, 10, 10), dtype=torch.uint8), torch.randint(0, 6, (8,)), torch.randn(8),
             torch.full((8,), 0.98), torch.randint(0, 2, (8, 4, 10, 10), dtype=torch.uint8)]
    loss, q_taken, logs = mico.mico_td_loss(q, target, batch, args)
    td, q_expected = mico.td_loss(q, target, *batch, args.loss)
    l_mico, distances = mico.mico_loss(mico.mico_features(q, batch[0]), mico.mico_features(target, batch[0]),
                                       mico.mico_features(target, batch[4]), batch[2], 0.99**2, 0.2)
    assert loss.item() == pytest.approx(0.7 * td.item() + 0.3 * l_mico.item(), rel=1e-6)
    torch.testing.assert_close(q_taken, q_expected)
    assert logs["mico/loss"].item() == pytest.approx(l_mico.item(), rel=1e-6)
    assert logs["mico/td_loss"].item() == pytest.approx(td.item(), rel=1e-6)
    assert logs["mico/distance"].item() == pytest.approx(distances.mean().item(), rel=1e-6)
    args.mico_weight = 0.0  # alpha 0: the base script's loss, nothing else computed
    loss0, _, logs0 = mico.mico_td_loss(q, target, batch, args)
    assert loss0.item() == td.item() and logs0 == {}


def test_alpha_zero_is_the_base_script_exactly(mico, tmp_path):
    dqn = load_script("dqn")
    base = run_dqn_smoke(dqn, tmp_path, "base", "CartPole-v1", seed=3)
    off = run_dqn_smoke(mico, tmp_path, "off", "CartPole-v1", seed=3, mico_weight=0.0)
    assert_same_run(base, off, "dqn_mico.py --mico-weight 0")
    on = run_dqn_smoke(mico, tmp_path, "on", "CartPole-v1", seed=3, mico_weight=0.5)
    scalars = read_scalars(on)
    assert read_json(os.path.join(on, "summary.json"))["status"] == "completed"
    for key in ("mico/loss", "mico/td_loss", "mico/distance"):
        assert len(scalars[key]) >= 3 and all(math.isfinite(v) for _, v in scalars[key]), key
    assert "mico/loss" not in read_scalars(off)
    with open(os.path.join(base, "episodes.csv")) as a, open(os.path.join(on, "episodes.csv")) as b:
        assert a.read() != b.read()  # the loss changes learning (a check that the switch is not vacuous)


def test_atari_and_minatar_runs_log_mico(mico, tmp_path):
    for env_id in ("Breakout-v5", "MinAtar/Breakout"):
        run_dir = run_dqn_smoke(mico, tmp_path, env_id.replace("/", "-"), env_id, log_every=10)
        scalars = read_scalars(run_dir)
        assert read_json(os.path.join(run_dir, "summary.json"))["status"] == "completed"
        assert len(scalars["mico/loss"]) >= 2 and all(v > 0 for _, v in scalars["mico/distance"]), env_id


@pytest.mark.parametrize("changes, fragment", [
    (dict(mico_weight=1.5), "--mico-weight"),
    (dict(mico_weight=-0.1), "--mico-weight"),
    (dict(mico_beta=-1.0), "--mico-beta"),
])
def test_bad_mico_flags_are_refused(mico, changes, fragment):
    with pytest.raises(mico.UserError, match=fragment):
        mico.resolve_args(mico.Args(env_id="CartPole-v1", **changes))


def test_a_bad_mico_flag_is_one_line_and_exit_status_2(tmp_path):
    proc = run_script(MICO, ["--env-id", "CartPole-v1", "--total-timesteps", 1000, "--mico-weight", "2", "--output-dir",
                             str(tmp_path), "--run-name", "bad"], cwd=str(tmp_path))
    assert_one_line_error(proc, "--mico-weight", "(got 2.0, 0.1)")
    assert not os.path.exists(os.path.join(str(tmp_path), "bad", "summary.json"))
