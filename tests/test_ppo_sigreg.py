"""algos/ppo_sigreg.py: the SIGReg statistic against a hand computation (and the official code's loop form), near
zero for N(0, I) samples and large for collapsed or anisotropic ones, its gradient moving a representation toward
isotropy, the directions on the unit sphere and drawn from the script's own generator, the representations it acts on
per observation kind, the repr/ diagnostics against hand values, lambda 0 against ppo.py (same episodes),
end-to-end runs (MinAtar, Atari) and bad input."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from helpers import assert_same_run, call_main, load_script, read_json, read_scalars, run_in_process

SMOKE = dict(total_timesteps=1024, num_envs=2, num_steps=64, eval_episodes=0, metrics_every=8)
MINATAR = dict(total_timesteps=1024, num_envs=4, num_steps=64, num_minibatches=4, eval_episodes=1, metrics_every=8)


@pytest.fixture(scope="module")
def sigreg():
    return load_script("ppo_sigreg")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


def grid(t_max=5.0, num=8):
    """The default grid of t in float64, as the script builds it (torch.linspace(-t_max, t_max, T))."""
    return torch.linspace(-t_max, t_max, num, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# The statistic
# ---------------------------------------------------------------------------------------------------------------


def test_statistic_against_a_hand_computation(sigreg):
    """Three 2-d points, two directions, a 3-point grid: the empirical characteristic function written out with
    math.cos / math.sin."""
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    t = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    real = imag = 0.0
    for direction in a.tolist():
        s = [sum(zi * ai for zi, ai in zip(point, direction)) for point in z.tolist()]
        for tt in t.tolist():
            re = sum(math.cos(tt * v) for v in s) / 3
            im = sum(math.sin(tt * v) for v in s) / 3
            real += (re - math.exp(-tt * tt / 2)) ** 2 / 6
            imag += im**2 / 6
    total, real_term, imag_term = sigreg.sigreg_loss(z, a, t)
    assert real_term.item() == pytest.approx(real, rel=1e-12)
    assert imag_term.item() == pytest.approx(imag, rel=1e-12)
    assert total.item() == pytest.approx(real + imag, rel=1e-12)


def test_statistic_matches_the_official_loop_form(sigreg):
    """The official code loops over the grid: sum over t of mean over slices, divided by T. Same value."""
    torch.manual_seed(0)
    z, a, t = torch.randn(50, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), grid()
    a = a / a.norm(dim=1, keepdim=True)
    s = (z @ a.T).T  # (M, B)
    loop = 0.0
    for tt in t:
        loop += ((torch.cos(tt * s).mean(1) - torch.exp(-0.5 * tt**2)) ** 2).mean() + (torch.sin(tt * s).mean(1) ** 2).mean()
    assert sigreg.sigreg_loss(z, a, t)[0].item() == pytest.approx(loop.item() / len(t), rel=1e-12)


def test_statistic_is_near_zero_for_standard_normal_samples_and_large_otherwise(sigreg):
    """N(0, I): only the sampling noise of the empirical characteristic function, O(1/B). A collapsed representation
    (every row the same point 0) has phi = 1 for every t: the statistic is mean_t (1 - exp(-t^2/2))^2, exactly.
    Scaled, shifted or rank-one Gaussians are far from zero too."""
    gen = torch.Generator().manual_seed(3)
    t = grid()
    a = sigreg.random_directions(16, 32, gen, "cpu").double()
    normal = torch.randn(4096, 32, generator=gen, dtype=torch.float64)
    near = sigreg.sigreg_loss(normal, a, t)[0].item()
    assert near < 2e-3
    collapsed = torch.zeros(256, 32, dtype=torch.float64)
    assert sigreg.sigreg_loss(collapsed, a, t)[0].item() == pytest.approx(
        ((1 - torch.exp(-0.5 * t**2)) ** 2).mean().item(), rel=1e-12)
    for other in (3.0 * normal, 0.1 * normal, normal + 2.0,
                  torch.randn(4096, 1, generator=gen, dtype=torch.float64) * torch.ones(1, 32) / math.sqrt(32) * 4):
        assert sigreg.sigreg_loss(other, a, t)[0].item() > 20 * near


def test_gradient_moves_an_anisotropic_representation_toward_isotropy(sigreg):
    """z = x W with x ~ N(0, I) and W = diag(4, 1, 0.25, ...) (plus a mean offset): Adam on SIGReg alone, directions
    drawn afresh each step as in training, brings the covariance W^T W toward I and the mean toward 0."""
    torch.manual_seed(0)
    dim = 8
    scales = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 1.5, 0.75, 3.0])
    weight = torch.diag(scales).clone().requires_grad_(True)
    offset = torch.full((dim,), 1.0, requires_grad=True)
    optimizer = torch.optim.Adam([weight, offset], lr=0.02)
    gen, t = torch.Generator().manual_seed(1), torch.linspace(-5, 5, 8)

    def distance():
        with torch.no_grad():
            return (weight.T @ weight - torch.eye(dim)).norm().item(), offset.norm().item()

    before = distance()
    for _ in range(600):
        z = torch.randn(512, dim) @ weight + offset
        loss = sigreg.sigreg_loss(z, sigreg.random_directions(16, dim, gen, "cpu"), t)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = distance()
    assert after[0] < 0.2 * before[0] and after[1] < 0.2 * before[1], (before, after)
    eig = torch.linalg.eigvalsh(weight.detach().T @ weight.detach())
    assert eig.min() > 0.5 and eig.max() < 1.6, eig


def test_directions_are_unit_vectors_from_the_given_generator(sigreg):
    a = sigreg.random_directions(16, 512, torch.Generator().manual_seed(5), "cpu")
    assert a.shape == (16, 512) and torch.allclose(a.norm(dim=1), torch.ones(16), atol=1e-6)
    assert torch.equal(a, sigreg.random_directions(16, 512, torch.Generator().manual_seed(5), "cpu"))
    state = torch.random.get_rng_state()
    sigreg.random_directions(4, 3, torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(state, torch.random.get_rng_state())  # the global stream (action sampling) is untouched
    # uniform on the sphere: the mean of many directions is near 0, their second moment near I / dim
    many = sigreg.random_directions(20000, 3, torch.Generator().manual_seed(6), "cpu")
    assert many.mean(0).abs().max() < 0.02
    assert torch.allclose(many.T @ many / len(many), torch.eye(3) / 3, atol=0.01)


# ---------------------------------------------------------------------------------------------------------------
# Where it acts, and the diagnostics
# ---------------------------------------------------------------------------------------------------------------


def test_representation_layers_are_the_chosen_pre_activations(sigreg):
    """Vectors: fc2 of the policy and/or value MLP, whose output is the pre-activation the ReLU then reads (checked
    against the hidden list of the forward pass); pixels: the trunk's fc1, the 512 features before the heads' ReLU."""
    vec = sigreg.Agent((7,), 3, continuous=False, minatar=True)
    assert list(sigreg.representation_layers(vec, "auto")) == ["actor.fc2", "critic.fc2"]
    assert list(sigreg.representation_layers(vec, "both")) == ["actor.fc2", "critic.fc2"]
    assert list(sigreg.representation_layers(vec, "actor")) == ["actor.fc2"]
    assert list(sigreg.representation_layers(vec, "critic")) == ["critic.fc2"]
    x = torch.randn(5, 7)
    _, _, hidden = vec(x, return_hidden=True)
    pre = {name: z for name, z, _ in hidden}
    for name, layer in sigreg.representation_layers(vec, "auto").items():
        first = getattr(vec, name.split(".")[0]).fc1
        assert torch.allclose(layer(torch.relu(first(x))), pre[name])
    pix = sigreg.Agent((4, 84, 84), 4, continuous=False)
    layers = sigreg.representation_layers(pix, "auto")
    assert list(layers) == ["fc1"] and layers["fc1"] is pix.trunk.fc1
    frames = torch.randint(0, 255, (2, 4, 84, 84), dtype=torch.uint8)
    _, _, hidden = pix(frames, return_hidden=True)
    fc1 = {name: z for name, z, _ in hidden}["fc1"]
    assert fc1.shape == (2, 512) and (fc1 < 0).any()  # the pre-activation: the heads read its ReLU


def test_penalty_uses_the_loss_forward_pass_representation(sigreg, tmp_path, monkeypatch):
    """The hooked representation handed to the statistic is the ppo_loss forward pass's own: it requires grad, and it
    equals the representation layer's output on the minibatch's observations."""
    seen = []
    loss = sigreg.sigreg_loss
    ppo_loss = sigreg.ppo_loss

    def spy_ppo_loss(agent, obs, *rest, **kw):
        out = ppo_loss(agent, obs, *rest, **kw)
        with torch.no_grad():  # functional: calling the layers would fire the script's hooks
            fc1, fc2 = agent.actor.fc1, agent.actor.fc2
            h = agent.actor.act1(torch.nn.functional.linear(obs.float(), fc1.weight, fc1.bias))  # tanh here
            seen.append(("expected", torch.nn.functional.linear(h, fc2.weight, fc2.bias)))
        return out

    monkeypatch.setattr(sigreg, "ppo_loss", spy_ppo_loss)
    monkeypatch.setattr(sigreg, "sigreg_loss", lambda z, a, t: seen.append(("z", z)) or loss(z, a, t))
    settings = dict(SMOKE, total_timesteps=128, update_epochs=1, num_minibatches=2, metrics_every=0)
    run_in_process(sigreg, tmp_path, "actor", "CartPole-v1", settings, sigreg_on="actor")
    assert [kind for kind, _ in seen] == ["expected", "z"] * 2
    for (_, expected), (_, z) in zip(seen[::2], seen[1::2]):
        assert z.requires_grad and torch.allclose(z.detach(), expected)
    seen.clear()
    run_in_process(sigreg, tmp_path, "both", "CartPole-v1", settings)
    assert [kind for kind, _ in seen] == ["expected", "z", "z"] * 2
    assert [z.shape[1] for kind, z in seen if kind == "z"] == [64] * 4


def test_diagnostics_against_hand_values(sigreg):
    """A diagonal covariance with eigenvalues (4, 1, 1, 0) from a centred sample written out: isotropy =
    36 / (4 * 18) = 0.5, erank = exp(entropy of (2/3, 1/6, 1/6)), top fraction 2/3, mean variance 1.5."""
    rows = []
    for sign in (1, -1):
        rows += [[sign * 2.0 * math.sqrt(5 / 2), 0, 0, 0], [0, sign * math.sqrt(5 / 2), 0, 0],
                 [0, 0, sign * math.sqrt(5 / 2), 0]]
    z = torch.tensor(rows, dtype=torch.float64) + torch.tensor([3.0, 0.0, 4.0, 0.0], dtype=torch.float64)
    cov = torch.cov(z.T)
    assert torch.allclose(torch.diag(cov), torch.tensor([4.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    out = sigreg.representation_diagnostics(z, torch.eye(4)[:2], torch.linspace(-5, 5, 8))
    p = [2 / 3, 1 / 6, 1 / 6]
    assert out["isotropy"] == pytest.approx(36 / 72, rel=1e-9)
    assert out["erank"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-9)
    assert out["top_eig_frac"] == pytest.approx(2 / 3, rel=1e-9)
    assert out["mean_var"] == pytest.approx(1.5, rel=1e-9)
    assert out["mean_norm"] == pytest.approx(5.0, rel=1e-9)
    assert out["sigreg"] == pytest.approx(sigreg.sigreg_loss(
        z, torch.eye(4, dtype=torch.float64)[:2], torch.linspace(-5, 5, 8, dtype=torch.float64))[0].item())
    iso = sigreg.representation_diagnostics(torch.randn(20000, 4, generator=torch.Generator().manual_seed(2)),
                                            torch.eye(4)[:2], torch.linspace(-5, 5, 8))
    assert iso["isotropy"] > 0.99 and iso["erank"] > 3.98 and iso["mean_var"] == pytest.approx(1.0, abs=0.03)


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def test_lambda_zero_is_ppo_py_and_the_default_is_not(sigreg, ppo, tmp_path):
    """--sigreg-lambda 0 is ppo.py's run (same episodes and losses), with the repr/ logs and no losses/sigreg; the
    default lambda 1 changes the run and logs the penalty."""
    base = run_in_process(ppo, tmp_path, "ppo", "CartPole-v1", SMOKE)
    off = run_in_process(sigreg, tmp_path, "off", "CartPole-v1", SMOKE, sigreg_lambda=0.0)
    on = run_in_process(sigreg, tmp_path, "on", "CartPole-v1", SMOKE)
    assert_same_run(base, off, "ppo_sigreg.py --sigreg-lambda 0")
    assert read_scalars(off)["losses/value_loss"] == read_scalars(base)["losses/value_loss"]
    assert open(os.path.join(on, "episodes.csv")).read() != open(os.path.join(base, "episodes.csv")).read()
    for run_dir, penalised in ((off, False), (on, True)):
        scalars = read_scalars(run_dir)
        assert {"repr/isotropy/actor.fc2", "repr/erank/critic.fc2", "repr/sigreg/actor.fc2"} <= scalars.keys()
        assert ("losses/sigreg" in scalars) == penalised
    scalars = read_scalars(on)
    assert all(total == pytest.approx(re + im, rel=1e-5) for (_, total), (_, re), (_, im) in zip(
        scalars["losses/sigreg"], scalars["losses/sigreg_real"], scalars["losses/sigreg_imag"]))


def test_minatar_run_regularises_both_mlps(sigreg, tmp_path):
    run = run_in_process(sigreg, tmp_path, "breakout", "MinAtar/Breakout", MINATAR)
    scalars = read_scalars(run)
    assert {"losses/sigreg", "repr/isotropy/actor.fc2", "repr/isotropy/critic.fc2"} <= scalars.keys()
    assert all(np.isfinite(v) for _, v in scalars["losses/sigreg"])
    assert read_json(os.path.join(run, "summary.json"))["status"] == "completed"


def test_atari_smoke_regularises_the_trunk(sigreg, tmp_path):
    run = run_in_process(sigreg, tmp_path, "breakout", "Breakout-v5", dict(
        total_timesteps=256, num_envs=2, num_steps=32, max_episode_steps=60, eval_episodes=1, metrics_every=8,
        metrics_batch_size=32))
    scalars = read_scalars(run)
    assert {"losses/sigreg", "repr/isotropy/fc1", "repr/top_eig_frac/fc1"} <= scalars.keys()
    assert not any(key.startswith("repr/") and "actor" in key for key in scalars)


@pytest.mark.parametrize("argv, fragment", [
    (["--sigreg-lambda", "-1"], "--sigreg-lambda"), (["--sigreg-slices", "0"], "--sigreg-slices"),
    (["--sigreg-grid", "0"], "--sigreg-grid"), (["--sigreg-t-max", "0"], "--sigreg-t-max"),
    (["--env-id", "Breakout-v5", "--sigreg-on", "actor"], "share the CNN trunk"),
])
def test_bad_sigreg_flags_are_one_line_errors(sigreg, capsys, argv, fragment):
    code, lines = call_main(sigreg, ["--env-id", "CartPole-v1", *argv, "--output-dir", "/nonexistent/never"], capsys)
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
