"""algos/dqn_hlgauss.py: the HL-Gauss and two-hot histograms against closed forms computed by hand, the value head
(Q = expected bin centre), the cross-entropy on the taken action only, the family defaults of the support and of
Adam, and end-to-end runs (`--value-loss mse` is dqn.py exactly, the value/ log, checkpoints, bad input)."""

from __future__ import annotations

import filecmp
import math
import os

import pytest
import torch

import helpers
from helpers import (
    assert_one_line_error, assert_seed_determinism, describe, load_script, read_json, read_scalars, run_script,
    script_path,
)

HLGAUSS = script_path("dqn_hlgauss")


@pytest.fixture(scope="module")
def hl():
    return load_script("dqn_hlgauss")


def run_hl(tmp_path, run_name: str, *flags, script: str = HLGAUSS):
    return run_script(script, [*flags, "--output-dir", str(tmp_path), "--run-name", run_name, "--device", "cpu"],
                      cwd=str(tmp_path))


def hand_hl_gauss(y: float, v_min: float, v_max: float, bins: int, sigma: float) -> list[float]:
    """The paper's HL-Gauss target written out with math.erf, one bin at a time (y clipped to the support)."""
    y = min(max(y, v_min), v_max)
    edges = [v_min + (v_max - v_min) * i / bins for i in range(bins + 1)]
    cdf = [0.5 * (1 + math.erf((e - y) / (math.sqrt(2) * sigma))) for e in edges]
    return [(cdf[i + 1] - cdf[i]) / (cdf[-1] - cdf[0]) for i in range(bins)]


@pytest.mark.parametrize("y", [-3.3, 0.0, 2.71, 9.5, 10.0, -9.99, 15.0, -40.0])
def test_hl_gauss_target_matches_the_closed_form(hl, y):
    net = hl.QNetwork((4,), 2, False, "hl-gauss", 51, -10.0, 10.0, 0.75)
    assert net.sigma == pytest.approx(0.75 * 20 / 51)
    probs = hl.hl_gauss_probs(torch.tensor([y]), net.edges, net.sigma)[0]
    expected = hand_hl_gauss(y, -10.0, 10.0, 51, net.sigma)
    assert probs.tolist() == pytest.approx(expected, abs=1e-6)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6) and bool((probs >= 0).all())


def test_hl_gauss_mean_is_the_target_inside_the_support(hl):
    net = hl.QNetwork((4,), 2, False, "hl-gauss", 51, -100.0, 100.0, 0.75)
    y = torch.tensor([-80.0, -12.34, 0.0, 0.5, 33.3, 85.0])  # at least 5 sigma from either end
    probs = hl.hl_gauss_probs(y, net.edges, net.sigma)
    assert (probs @ net.centres).tolist() == pytest.approx(y.tolist(), abs=1e-3)
    # the mass sits on about six bins (sigma = 0.75 bin widths): the central four hold most of it
    assert float(probs[3].topk(4).values.sum()) > 0.85 and int((probs[3] > 1e-3).sum()) in range(5, 9)
    # near an end the renormalised histogram's mean is pulled inwards, never outside the support
    edge = hl.hl_gauss_probs(torch.tensor([99.9]), net.edges, net.sigma)
    assert 95.0 < float(edge @ net.centres) < 99.9


def test_two_hot_weights_on_the_bracketing_centres(hl):
    centres = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5])  # 5 bins on [0, 5]
    net = hl.QNetwork((4,), 2, False, "two-hot", 5, 0.0, 5.0)
    assert net.centres.tolist() == pytest.approx(centres.tolist())
    probs = hl.two_hot_probs(torch.tensor([2.2, 1.5, 4.5, 0.9, -3.0, 7.0, 3.999]), net.centres)
    expected = [[0, 0.3, 0.7, 0, 0],  # lower centre 1.5 gets (2.5 - 2.2) / (2.5 - 1.5)
                [0, 1, 0, 0, 0],  # on a centre: all of it there
                [0, 0, 0, 0, 1],
                [0.6, 0.4, 0, 0, 0],
                [1, 0, 0, 0, 0],  # below the lowest centre: clipped to it
                [0, 0, 0, 0, 1],
                [0, 0, 0, 0.501, 0.499]]
    assert probs.tolist() == [pytest.approx(row, abs=1e-5) for row in expected]
    assert (probs @ net.centres).tolist()[:4] == pytest.approx([2.2, 1.5, 4.5, 0.9], abs=1e-6)


def test_value_head_q_is_the_expected_bin_centre(hl):
    torch.manual_seed(0)
    net = hl.QNetwork((4,), 3, False, "hl-gauss", 7, -2.0, 5.0)
    assert net.net.q.out_features == 3 * 7
    obs = torch.randn(5, 4)
    logits = net(obs, logits=True)
    assert logits.shape == (5, 3, 7)
    raw = net.net(obs)  # the output layer: action-major blocks of 7 logits
    assert torch.equal(logits[:, 1], raw[:, 7:14])
    centres = torch.tensor([-1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.5])
    expected = torch.stack([(logits[:, a].softmax(-1) * centres).sum(-1) for a in range(3)], dim=1)
    assert torch.allclose(net(obs), expected, atol=1e-6)
    q, hidden = net(obs, return_hidden=True)
    assert torch.allclose(q, expected, atol=1e-6) and len(hidden) == 2


def test_mse_head_is_the_base_network(hl):
    dqn = load_script("dqn")
    torch.manual_seed(3)
    base = dqn.QNetwork((4, 10, 10), 6, True)
    torch.manual_seed(3)
    ours = hl.QNetwork((4, 10, 10), 6, True, "mse")
    assert list(base.state_dict()) == list(ours.state_dict())  # edges and centres are not saved
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), ours.state_dict().values()))
    obs = torch.randint(0, 2, (3, 4, 10, 10), dtype=torch.uint8)
    assert torch.equal(base(obs), ours(obs))


@pytest.mark.parametrize("value_loss", ["hl-gauss", "two-hot"])
def test_cross_entropy_on_the_taken_action_only(hl, value_loss):
    torch.manual_seed(1)
    net = hl.QNetwork((4,), 3, False, value_loss, 9, -3.0, 6.0)
    target_net = hl.QNetwork((4,), 3, False, value_loss, 9, -3.0, 6.0)
    obs, next_obs = torch.randn(6, 4), torch.randn(6, 4)
    actions = torch.tensor([0, 2, 2, 0, 2, 0])
    returns = torch.tensor([1.0, 0.0, -1.0, 2.5, 0.3, 1.0])
    discounts = torch.tensor([0.99, 0.99, 0.0, 0.99, 0.99, 0.0])
    loss, q_taken = hl.td_loss(net, target_net, obs, actions, returns, discounts, next_obs, "mse")
    # by hand: the scalar target from the target network's expected Q, its histogram, the CE on the taken logits
    with torch.no_grad():
        y = returns + discounts * target_net(next_obs).max(dim=1).values
    probs = (hl.hl_gauss_probs(y, net.edges, net.sigma) if value_loss == "hl-gauss"
             else hl.two_hot_probs(y, net.centres))
    logits = net(obs, logits=True)
    manual = torch.stack([-(probs[i] * torch.log_softmax(logits[i, a], -1)).sum() for i, a in enumerate(actions)])
    assert loss.item() == pytest.approx(manual.mean().item(), rel=1e-6)
    assert torch.allclose(q_taken, net(obs)[torch.arange(6), actions], atol=1e-6)
    loss.backward()
    grad = net.net.q.weight.grad.view(3, 9, -1)  # rows of the output layer, per action
    assert grad[1].abs().max() == 0  # action 1 was never taken: no gradient reaches its logits
    assert grad[0].abs().max() > 0 and grad[2].abs().max() > 0


@pytest.mark.parametrize("env_id, value_loss, lr, eps, support", [
    ("Breakout-v5", "hl-gauss", 2.5e-4, 3.125e-4, (-10.0, 10.0)),  # the paper's classification arms: C51's Adam
    ("Breakout-v5", "two-hot", 2.5e-4, 3.125e-4, (-10.0, 10.0)),
    ("Breakout-v5", "mse", 6.25e-5, 1.5e-4, (-10.0, 10.0)),  # the MSE baseline keeps Dopamine DQN's
    ("MinAtar/Breakout", "hl-gauss", 2.5e-4, 3.125e-4, (-100.0, 100.0)),
    ("CartPole-v1", "hl-gauss", 2.5e-4, 1e-8, (-100.0, 100.0)),
])
def test_family_defaults(hl, env_id, value_loss, lr, eps, support):
    args = hl.Args(env_id=env_id, value_loss=value_loss)
    _, family = hl.resolve_args(args)
    assert (args.learning_rate, args.adam_eps, (args.v_min, args.v_max)) == (lr, eps, support), family
    explicit = hl.Args(env_id=env_id, value_loss=value_loss, learning_rate=1e-3, v_max=50.0)
    hl.resolve_args(explicit)
    assert (explicit.learning_rate, explicit.v_max) == (1e-3, 50.0)


# ---------------------------------------------------------------------------------------------------------------
# End to end, in process (a subprocess pays seconds of imports per run; the one-line errors go through the CLI)
# ---------------------------------------------------------------------------------------------------------------

SMOKE = {  # the smoke arms of benchmark/suites/smoke.toml, a little longer
    "CartPole-v1": dict(total_timesteps=1200, learning_starts=300, buffer_size=1000, batch_size=32, replay_ratio=0.5,
                        eval_episodes=1),
    "MinAtar/Breakout": dict(total_timesteps=1000, learning_starts=300, buffer_size=1000, eval_episodes=1),
    "MinAtar/SpaceInvaders": dict(total_timesteps=600, learning_starts=200, buffer_size=1000, eval_episodes=1),
    "Breakout-v5": dict(total_timesteps=400, num_envs=2, learning_starts=200, buffer_size=2000, max_episode_steps=100,
                        eval_episodes=1, metrics_batch_size=64),
}


def run_in_process(module, tmp_path, name: str, env_id: str, **changes) -> str:
    return helpers.run_in_process(module, tmp_path, name, env_id, SMOKE[env_id], **changes)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "MinAtar/Breakout"])
def test_value_loss_mse_is_dqn_exactly(hl, tmp_path, env_id):
    base = run_in_process(load_script("dqn"), tmp_path, "base", env_id, seed=4, metrics_every=50)
    ours = run_in_process(hl, tmp_path, "ours", env_id, seed=4, metrics_every=50, value_loss="mse")
    episodes = [os.path.join(run_dir, "episodes.csv") for run_dir in (base, ours)]
    assert open(episodes[0]).read().count("\n") > 5
    assert filecmp.cmp(*episodes, shallow=False), "--value-loss mse wrote another episodes.csv than dqn.py"
    summaries = [read_json(os.path.join(run_dir, "summary.json")) for run_dir in (base, ours)]
    for key in ("status", "num_updates", "num_episodes", "eval_returns"):
        assert summaries[0][key] == summaries[1][key], key
    assert "value/target_outside_support" not in read_scalars(ours)


def test_narrow_support_logs_targets_outside_it(hl, tmp_path):
    # CartPole's rewards of 1 per step: with the support [-1, 1] most targets fall outside after a few updates
    run_dir = run_in_process(hl, tmp_path, "narrow", "CartPole-v1", total_timesteps=1500, buffer_size=1500,
                             replay_ratio=1.0, log_every=100, metrics_every=300, v_min=-1.0, v_max=1.0,
                             value_loss="two-hot")
    scalars = read_scalars(run_dir)
    outside = [v for _, v in scalars["value/target_outside_support"]]
    assert len(outside) == 12 and all(0.0 <= v <= 1.0 for v in outside) and outside[-1] > 0.5
    assert max(v for _, v in scalars["losses/q_values"]) <= 1.0  # an expectation over centres inside the support
    assert "plasticity/srank" in scalars and "plasticity/dormant_tau0.1/fc2" in scalars
    config = read_json(os.path.join(run_dir, "config.json"))["args"]
    assert (config["value_loss"], config["num_bins"], config["v_min"], config["v_max"]) == ("two-hot", 51, -1.0, 1.0)


def test_minatar_and_atari_runs_and_checkpoint_round_trip(hl, tmp_path):
    run_dir = run_in_process(hl, tmp_path, "minatar", "MinAtar/SpaceInvaders", metrics_every=100, save_model=True)
    model = os.path.join(run_dir, "model.pt")
    assert read_json(os.path.join(run_dir, "summary.json"))["status"] == "completed"
    checkpoint = torch.load(model, weights_only=True)
    assert checkpoint["model"]["net.q.weight"].shape[0] == 6 * 51 and "net.edges" not in checkpoint["model"]
    eval_dir = run_in_process(hl, tmp_path, "eval", "MinAtar/SpaceInvaders", eval_checkpoint=model, eval_episodes=2)
    assert len(read_json(os.path.join(eval_dir, "summary.json"))["eval_returns"]) == 2
    wrong = run_hl(tmp_path, "wrong", "--env-id", "MinAtar/SpaceInvaders", "--eval-checkpoint", model,
                   "--eval-episodes", 1, "--v-max", 50)
    assert_one_line_error(wrong, "value head", "--v-max 100.0")
    with pytest.raises(hl.UserError, match="--value-loss hl-gauss"):
        run_in_process(hl, tmp_path, "wrong2", "MinAtar/SpaceInvaders", eval_checkpoint=model, value_loss="mse")
    # a dqn.py checkpoint is an mse head: it evaluates with --value-loss mse and is refused by a histogram head
    base = run_in_process(load_script("dqn"), tmp_path, "base", "MinAtar/SpaceInvaders", save_model=True)
    base_model = os.path.join(base, "model.pt")
    run_in_process(hl, tmp_path, "eval_base", "MinAtar/SpaceInvaders", eval_checkpoint=base_model, value_loss="mse")
    with pytest.raises(hl.UserError, match="--value-loss mse"):
        run_in_process(hl, tmp_path, "wrong3", "MinAtar/SpaceInvaders", eval_checkpoint=base_model)
    atari = run_in_process(hl, tmp_path, "atari", "Breakout-v5", metrics_every=10, log_every=10)
    config = read_json(os.path.join(atari, "config.json"))["args"]
    assert (config["learning_rate"], config["adam_eps"], config["v_max"]) == (2.5e-4, 3.125e-4, 10.0)
    assert len(read_scalars(atari)["value/target_outside_support"]) == 5


def test_same_seed_same_episodes_other_seed_differs(tmp_path):
    assert_seed_determinism(run_hl, tmp_path, "--env-id", "CartPole-v1", "--total-timesteps", 1500,
                            "--learning-starts", 300, "--buffer-size", 1500, "--batch-size", 32, "--replay-ratio", 0.5,
                            "--eval-episodes", 0, "--metrics-every", 0, "--torch-threads", 1)


@pytest.mark.parametrize("flags", [
    ["--num-bins", "1"], ["--v-min", "5", "--v-max", "5"], ["--v-min", "3", "--v-max", "-3"], ["--sigma-ratio", "0"],
])
def test_bad_value_head_flags_are_errors(hl, tmp_path, flags):
    if flags[0] == "--num-bins":  # one through the CLI: one line, exit 2, nothing written
        proc = run_hl(tmp_path, "bad", "--env-id", "CartPole-v1", "--total-timesteps", 1000, *flags)
        assert_one_line_error(proc, "--num-bins", "--v-min")
        assert not os.path.exists(os.path.join(str(tmp_path), "bad"))
    values = {"--num-bins": int, "--v-min": float, "--v-max": float, "--sigma-ratio": float}
    changes = {flag[2:].replace("-", "_"): values[flag](value) for flag, value in zip(flags[::2], flags[1::2])}
    with pytest.raises(hl.UserError, match="--num-bins >= 2, --v-min < --v-max and --sigma-ratio > 0"):
        hl.resolve_args(hl.Args(env_id="CartPole-v1", **changes))
