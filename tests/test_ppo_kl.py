"""algos/ppo_kl.py: the k1 / k2 / k3 estimators and the exact KL against hand computations; the expected gradient of
every estimator-placement pair on a small categorical policy against the exact reverse-KL gradient (the paper's point:
which pairs are correct); the penalty in the rewards fed to GAE (by hand, and end to end against a reference network
the test builds itself); the hook handing the rollout's pi_old and the loss pass's pi_theta to the penalty; the loss
placement's wiring in run() (the minibatch's reference log-probs, the term in the gradient with weight beta, its log);
the init reference frozen at the agent's initial weights; a ppo.py checkpoint as the reference; --kl-beta 0 against
ppo.py (same episodes, CartPole and MinAtar); MinAtar, Atari and continuous runs; bad input (a checkpoint trained with
another --norm-obs included)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from helpers import assert_same_run, call_main, load_script, read_json, read_scalars, run_in_process

SMOKE = dict(total_timesteps=1024, num_envs=2, num_steps=64, eval_episodes=0, metrics_every=8)
TINY = dict(total_timesteps=512, num_envs=2, num_steps=64, eval_episodes=0, metrics_every=0)
KL_KEYS = {"kl/exact", "kl/k1", "kl/k2", "kl/k3"}


@pytest.fixture(scope="module")
def kl():
    return load_script("ppo_kl")


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


@pytest.fixture(scope="module")
def checkpoint(ppo, tmp_path_factory):
    """model.pt of a short ppo.py run on CartPole (--save-model): a reference policy that is not uniform."""
    out = tmp_path_factory.mktemp("reference")
    run_in_process(ppo, out, "ppo", "CartPole-v1", dict(TINY, total_timesteps=2048, seed=3), save_model=True)
    return os.path.join(str(out), "ppo", "model.pt")


# ---------------------------------------------------------------------------------------------------------------
# The estimators, and the exact KL
# ---------------------------------------------------------------------------------------------------------------


def test_estimators_by_hand(kl):
    """k1 = ell, k2 = ell^2 / 2, k3 = exp(-ell) - 1 + ell, written out with math.exp; k2 and k3 are >= 0, k1 is not."""
    ells = [-2.0, -0.7, -1e-4, 0.0, 0.3, 1.5, 4.0]
    x = torch.tensor(ells, dtype=torch.float64)
    for name, hand in (("k1", lambda e: e), ("k2", lambda e: e * e / 2), ("k3", lambda e: math.exp(-e) - 1 + e)):
        got = kl.kl_estimate(x, name).tolist()
        assert got == pytest.approx([hand(e) for e in ells], rel=1e-12, abs=1e-15), name
    assert (kl.kl_estimate(x, "k3") >= 0).all() and (kl.kl_estimate(x, "k2") >= 0).all()
    assert (kl.kl_estimate(x, "k1") < 0).any()
    # unbiased for the reverse KL in expectation under pi (k1, k3); k2 is not
    logits = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    ref = torch.tensor([0.0, 0.3, 0.1], dtype=torch.float64)
    p, q = torch.softmax(logits, 0).tolist(), torch.softmax(ref, 0).tolist()
    reverse = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ell = torch.tensor([math.log(pi / qi) for pi, qi in zip(p, q)], dtype=torch.float64)
    for name, unbiased in (("k1", True), ("k2", False), ("k3", True)):
        mean = sum(pi * k for pi, k in zip(p, kl.kl_estimate(ell, name).tolist()))
        assert (mean == pytest.approx(reverse, rel=1e-12)) == unbiased, name


def test_exact_kl_by_hand(kl):
    """Categorical: sum_a p log(p / q) from softmax probabilities written out; Gaussian: 1-d closed forms."""
    agent, reference = kl.Agent((3,), 3, continuous=False), kl.Agent((3,), 3, continuous=False)
    out = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.2, 0.2]], dtype=torch.float64)
    ref = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5]], dtype=torch.float64)
    hand = []
    for row, ref_row in zip(out.tolist(), ref.tolist()):
        p = [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
        q = [math.exp(v) / sum(math.exp(u) for u in ref_row) for v in ref_row]
        hand.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    assert kl.kl_exact(agent, out, reference, ref).tolist() == pytest.approx(hand, rel=1e-12)
    # Gaussian: KL(N(m, s^2) || N(m', s'^2)) = log(s'/s) + (s^2 + (m - m')^2) / (2 s'^2) - 1/2, summed over components
    agent, reference = kl.Agent((3,), 2, continuous=True), kl.Agent((3,), 2, continuous=True)
    with torch.no_grad():
        agent.actor_logstd.copy_(torch.tensor([[0.0, math.log(0.5)]]))
        reference.actor_logstd.copy_(torch.tensor([[math.log(2.0), 0.0]]))
    mean, ref_mean = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, -1.0]])
    first = math.log(2.0) + (1.0 + 1.0) / (2 * 4.0) - 0.5
    second = math.log(1.0 / 0.5) + (0.25 + 4.0) / 2.0 - 0.5
    assert kl.kl_exact(agent, mean, reference, ref_mean).item() == pytest.approx(first + second, rel=1e-6)
    assert kl.kl_exact(agent, mean, agent, mean).item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# The gradient of each estimator-placement pair (the paper's point)
# ---------------------------------------------------------------------------------------------------------------


def pair_gradients(kl, theta: torch.Tensor, ref_logits: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
    """The EXPECTED gradient (w.r.t. the logits theta, states x actions) of each pair, summed over states, with the
    expectation over a ~ pi written out as a sum weighted by pi (detached), no sampling:
    loss placement, E_a[grad k(ell(a))], k through pi_theta: the script's kl_loss on the single pair (s, a);
    reward placement, the score function E_a[k(ell(a)) grad log pi(a)] with k detached (the penalty is a reward)."""
    agent = kl.Agent((1,), theta.shape[1], continuous=False)  # only its categorical log_prob_entropy is used
    ref_logp = torch.log_softmax(ref_logits, dim=-1)
    out = {}
    for estimator in ("k1", "k2", "k3"):
        theta_loss = theta.detach().clone().requires_grad_(True)
        pi = torch.softmax(theta_loss, dim=-1).detach()
        loss = sum(pi[s, a] * kl.kl_loss(agent, theta_loss[s:s + 1], torch.tensor([a]), ref_logp[s, a:a + 1], estimator)
                   for s in range(theta.shape[0]) for a in range(theta.shape[1]))
        out[estimator, "loss"] = torch.autograd.grad(loss, theta_loss)[0]
        theta_reward = theta.detach().clone().requires_grad_(True)
        logp = torch.log_softmax(theta_reward, dim=-1)
        k = kl.kl_estimate((logp - ref_logp).detach(), estimator)
        out[estimator, "reward"] = torch.autograd.grad((pi * k * logp).sum(), theta_reward)[0]
    return out


def test_gradient_of_each_estimator_placement_pair(kl):
    """Against autograd on hand-written KLs (sum over states of sum_a p log(p/q)): k1 in the reward and k2 in the loss
    are the reverse-KL gradient; k1 in the loss is zero; k3 in the loss is the forward-KL(ref || pi) gradient; k3 in
    the reward is reverse minus forward; k2 in the reward is none of these."""
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    ref_logits = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    grads = pair_gradients(kl, theta, ref_logits)

    t = theta.clone().requires_grad_(True)
    p, q = torch.softmax(t, -1), torch.softmax(ref_logits, -1)
    reverse = torch.autograd.grad((p * (torch.log(p) - torch.log(q))).sum(), t)[0]
    t = theta.clone().requires_grad_(True)
    p = torch.softmax(t, -1)
    forward = torch.autograd.grad((q * (torch.log(q) - torch.log(p))).sum(), t)[0]
    assert (reverse - forward).abs().max() > 0.1  # the two KLs' gradients differ here: the test can tell them apart

    def close(a, b):
        return torch.allclose(a, b, rtol=0, atol=1e-12)

    assert close(grads["k1", "reward"], reverse)
    assert close(grads["k2", "loss"], reverse)
    assert close(grads["k1", "loss"], torch.zeros_like(reverse))
    assert close(grads["k3", "loss"], forward)
    assert close(grads["k3", "reward"], reverse - forward)
    assert not close(grads["k3", "reward"], reverse)
    assert (grads["k2", "reward"] - reverse).abs().max() > 0.01
    # with pi = pi_ref every pair's expected gradient vanishes (the KL's minimum)
    for grad in pair_gradients(kl, ref_logits, ref_logits).values():
        assert grad.abs().max() < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# The penalty in the rewards, and where the loss penalty reads pi_theta
# ---------------------------------------------------------------------------------------------------------------


def test_reward_penalty_by_hand(kl):
    """r - beta * k on the agent's steps only (an auto-reset step keeps its reward); the logs by hand."""
    rewards = np.array([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]], dtype=np.float32)
    k = np.array([[0.2, 3.0], [-0.4, 1.0], [7.0, 0.1]], dtype=np.float32)
    valid = np.array([[True, False], [True, True], [False, True]])
    new, logs = kl.kl_reward_penalty(rewards, k, valid, 0.5)
    expected = [[1.0 - 0.1, 0.0], [0.5 + 0.2, -1.0 - 0.5], [0.0, 2.0 - 0.05]]
    assert new.dtype == np.float32 and np.allclose(new, expected, atol=1e-7)
    assert logs["penalty"] == pytest.approx((0.1 - 0.2 + 0.5 + 0.05) / 4, rel=1e-6)
    assert logs["penalty_share"] == pytest.approx(0.85 / (4.5 + 0.85), rel=1e-6)


def ref_logprobs_by_hand(ppo, checkpoint_path: str, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi_ref(a|s) from ppo.py's Agent with the checkpoint's weights, the softmax written out."""
    reference = ppo.Agent((4,), 2, continuous=False)
    reference.load_state_dict(torch.load(checkpoint_path, weights_only=True)["model"])
    with torch.no_grad():
        logits = reference(obs)[0].double()
    log_z = torch.logsumexp(logits, dim=-1)
    return logits.gather(1, actions.view(-1, 1)).squeeze(1) - log_z


def test_reward_placement_feeds_gae_r_minus_beta_k(kl, ppo, checkpoint, tmp_path, monkeypatch):
    """End to end with a ppo.py checkpoint as the reference (k3, beta 0.5): the rewards compute_gae receives are
    CartPole's 1 - beta * k3(ell) on every agent step, with ell = the rollout's own log-prob minus the reference's,
    the latter computed here by ppo.py's network; auto-reset steps keep EnvPool's reward."""
    steps, gae_inputs = [], []
    sample, gae = kl.Agent.get_action_and_value, kl.compute_gae

    def spy_sample(self, x, action=None, generator=None):
        out = sample(self, x, action, generator)
        steps.append((x.clone(), out[0].clone(), out[1].clone()))
        return out

    def spy_gae(rewards, values, next_value, terminated, done, valid, *rest):
        gae_inputs.append((rewards.copy(), valid.copy()))
        return gae(rewards, values, next_value, terminated, done, valid, *rest)

    monkeypatch.setattr(kl.Agent, "get_action_and_value", spy_sample)
    monkeypatch.setattr(kl, "compute_gae", spy_gae)
    beta, settings = 0.5, dict(TINY, total_timesteps=768)
    run_in_process(kl, tmp_path, "reward", "CartPole-v1", settings, kl_beta=beta, kl_estimator="k3",
                   kl_reference=checkpoint)
    num_steps = settings["num_steps"]
    assert len(gae_inputs) == 6 and len(steps) == 6 * num_steps
    largest = 0.0
    for i, (rewards, valid) in enumerate(gae_inputs):
        obs = torch.cat([s[0] for s in steps[i * num_steps:(i + 1) * num_steps]])
        actions = torch.cat([s[1] for s in steps[i * num_steps:(i + 1) * num_steps]])
        own = torch.cat([s[2] for s in steps[i * num_steps:(i + 1) * num_steps]]).double()
        ell = (own - ref_logprobs_by_hand(ppo, checkpoint, obs, actions)).view(num_steps, -1).numpy()
        k3 = np.exp(-ell) - 1 + ell
        assert np.allclose(rewards[valid], (1.0 - beta * k3)[valid], rtol=0, atol=2e-5), i
        assert (rewards[~valid] == 0).all()
        largest = max(largest, float(np.abs(beta * k3[valid]).max()))
    assert largest > 1e-3  # the agent has moved away from the reference: the check is not vacuous


@pytest.mark.parametrize("pass_in_between", ["none", "another forward", "a no-grad forward on the same obs"])
def test_rollout_and_loss_read_the_policy_outputs_of_their_own_passes(kl, tmp_path, monkeypatch, pass_in_between):
    """The hook hands kl_rollout pi_old's outputs (the agent, unchanged since its rollout, recomputes them) and
    kl_loss pi_theta's on the minibatch, in the graph: the loss pass's own output (no extra forward), or, when another
    forward pass of the agent came in between (as a composed method's: on other observations, or without a graph on the
    very same ones, whose output would give the KL term no gradient), a forward pass of its own."""
    checked = {"rollout": 0, "loss": 0, "forwards": 0}
    rollout, loss, ppo_loss, forward = kl.kl_rollout, kl.kl_loss, kl.ppo_loss, kl.Agent.forward
    last = {}

    def spy_rollout(agent, reference, obs_buf, actions_buf, logprobs_buf, policy_buf, valid_buf, args):
        with torch.no_grad():
            again = agent(obs_buf.reshape(-1, *obs_buf.shape[2:]))[0]
        assert torch.allclose(policy_buf.reshape(again.shape), again, atol=1e-6)
        checked["rollout"] += 1
        return rollout(agent, reference, obs_buf, actions_buf, logprobs_buf, policy_buf, valid_buf, args)

    def spy_ppo_loss(agent, obs, *rest, **kw):
        out = ppo_loss(agent, obs, *rest, **kw)
        with torch.no_grad():  # functional: calling the layers would fire the hook
            h = obs.float()
            for layer in agent.actor.children():
                is_linear = isinstance(layer, torch.nn.Linear)
                h = torch.nn.functional.linear(h, layer.weight, layer.bias) if is_linear else layer(h)
            last["expected"] = h
        if pass_in_between == "another forward":
            agent(obs[:3])
        elif pass_in_between == "a no-grad forward on the same obs":
            with torch.no_grad():
                agent(obs)
        last["forwards"] = checked["forwards"]
        return out

    def spy_forward(self, x, return_hidden=False):
        checked["forwards"] += 1
        return forward(self, x, return_hidden)

    def spy_loss(agent, policy_out, actions, ref_logprobs, estimator):
        assert policy_out.requires_grad and torch.allclose(policy_out.detach(), last.pop("expected"), atol=1e-6)
        own_pass = pass_in_between != "none"
        assert checked["forwards"] == last.pop("forwards") + own_pass  # its own forward pass only if needed
        checked["loss"] += 1
        return loss(agent, policy_out, actions, ref_logprobs, estimator)

    monkeypatch.setattr(kl, "kl_rollout", spy_rollout)
    monkeypatch.setattr(kl, "ppo_loss", spy_ppo_loss)
    monkeypatch.setattr(kl, "kl_loss", spy_loss)
    monkeypatch.setattr(kl.Agent, "forward", spy_forward)
    run_in_process(kl, tmp_path, "loss", "CartPole-v1", dict(TINY, update_epochs=2, num_minibatches=2),
                   kl_placement="loss", kl_estimator="k2", kl_beta=0.5)
    assert checked["rollout"] == 4 and checked["loss"] == 4 * 2 * 2


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_loss_placement_wiring_in_run(kl, ppo, checkpoint, tmp_path, monkeypatch, estimator):
    """run()'s loss placement end to end (a ppo.py checkpoint as the reference, beta 0.5, 2 epochs x 2 minibatches):
    every minibatch's kl_loss gets the minibatch's own actions and the reference's log-probs of exactly those
    (state, action) pairs, computed here by ppo.py's network on the minibatch's observations; its term is the mean k
    of ell by hand; the gradient the optimizer step clips is the PPO loss's gradient + beta * the term's (so the term
    reaches the update with weight beta); losses/kl_term logs each iteration's last term."""
    beta, state, terms, visible = 0.5, {}, [], []
    ppo_loss, loss, clip = kl.ppo_loss, kl.kl_loss, torch.nn.utils.clip_grad_norm_

    def spy_ppo_loss(agent, obs, actions, *rest, **kw):
        out = ppo_loss(agent, obs, actions, *rest, **kw)
        state["batch"] = (agent, obs, actions, out[0])
        return out

    def spy_loss(agent, policy_out, actions, ref_logprobs, estimator_passed):
        same_agent, obs, mb_actions, ppo_total = state.pop("batch")
        assert agent is same_agent and estimator_passed == estimator
        assert torch.equal(actions, mb_actions)
        by_hand = ref_logprobs_by_hand(ppo, checkpoint, obs, actions)
        assert ref_logprobs.shape == by_hand.shape
        assert torch.allclose(ref_logprobs.double(), by_hand, rtol=0, atol=1e-5)  # this minibatch's, not others'
        term = loss(agent, policy_out, actions, ref_logprobs, estimator_passed)
        logits = policy_out.detach().double()
        ell = logits.gather(1, actions.view(-1, 1)).squeeze(1) - torch.logsumexp(logits, -1) - by_hand
        k = ell if estimator == "k1" else torch.exp(-ell) - 1 + ell
        assert term.item() == pytest.approx(k.mean().item(), rel=1e-4, abs=1e-6)
        params = list(agent.parameters())
        grads = [torch.autograd.grad(part, params, retain_graph=True, allow_unused=True) for part in (ppo_total, term)]
        ppo_only = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[0])]
        state["expected"] = [g + beta * (0 if h is None else h) for g, h in zip(ppo_only, grads[1])]
        # would the PPO gradient alone fail the check below? (then a term that misses the update is caught)
        state["visible"] = not all(torch.allclose(g, e, rtol=1e-4, atol=1e-6)
                                   for g, e in zip(ppo_only, state["expected"]))
        terms.append(term.item())
        return term

    def spy_clip(parameters, *rest, **kw):
        parameters = list(parameters)
        if "expected" in state:  # the update's clipping (the only call with metrics_every=0)
            for p, expected in zip(parameters, state.pop("expected")):
                assert torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-6)
            visible.append(state.pop("visible"))
        return clip(parameters, *rest, **kw)

    monkeypatch.setattr(kl, "ppo_loss", spy_ppo_loss)
    monkeypatch.setattr(kl, "kl_loss", spy_loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    run = run_in_process(kl, tmp_path, "loss", "CartPole-v1", dict(TINY, update_epochs=2, num_minibatches=2),
                         kl_placement="loss", kl_estimator=estimator, kl_beta=beta, kl_reference=checkpoint)
    assert len(terms) == 4 * 2 * 2 and "expected" not in state
    assert sum(visible) >= len(visible) // 2  # beta * the term's gradient shows: the check is not vacuous
    logged = [value for _, value in read_scalars(run)["losses/kl_term"]]
    assert logged == pytest.approx(terms[3::4], rel=1e-6, abs=1e-7)  # each iteration's last minibatch, before beta


# ---------------------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------------------


def spy_reference(kl, monkeypatch) -> dict:
    """Catch the agent and the reference kl_reference_policy returns, with a copy of the reference's weights then."""
    seen, build = {}, kl.kl_reference_policy

    def spy(agent, *rest):
        reference = build(agent, *rest)
        seen.update(agent=agent, reference=reference,
                    start={key: value.clone() for key, value in reference.state_dict().items()})
        return reference

    monkeypatch.setattr(kl, "kl_reference_policy", spy)
    return seen


def test_init_reference_is_the_initial_policy_and_stays_frozen(kl, tmp_path, monkeypatch):
    """The init reference equals an Agent built after torch.manual_seed(seed), as run() builds the agent; after a
    run that trains the agent (loss placement), the reference's weights are unchanged and take no gradient."""
    seen = spy_reference(kl, monkeypatch)
    run = run_in_process(kl, tmp_path, "init", "CartPole-v1", dict(TINY, seed=7), kl_placement="loss", kl_beta=0.5)
    torch.manual_seed(7)
    fresh = kl.Agent((4,), 2, continuous=False)
    reference = seen["reference"]
    assert reference is not seen["agent"]
    for key, value in fresh.state_dict().items():
        assert torch.equal(seen["start"][key], value), key
        assert torch.equal(reference.state_dict()[key], value), key
    assert not any(p.requires_grad for p in reference.parameters())
    assert not torch.equal(seen["agent"].actor.out.weight, reference.actor.out.weight)  # the agent did train
    assert read_scalars(run)["kl/exact"][0][1] == pytest.approx(0.0, abs=1e-6)  # first rollout: pi_old = pi_ref


def test_path_reference_is_the_checkpoint_and_the_agent_starts_from_it(kl, checkpoint, tmp_path, monkeypatch):
    seen = spy_reference(kl, monkeypatch)
    run = run_in_process(kl, tmp_path, "path", "CartPole-v1", TINY, kl_reference=checkpoint)
    model = torch.load(checkpoint, weights_only=True)["model"]
    assert seen["start"].keys() == model.keys()
    for key, value in model.items():
        assert torch.equal(seen["start"][key], value) and torch.equal(seen["reference"].state_dict()[key], value), key
    scalars = read_scalars(run)
    assert scalars["kl/exact"][0][1] == pytest.approx(0.0, abs=1e-6)  # the agent starts at the reference (float32)
    assert scalars["kl/exact"][-1][1] > 1e-4
    assert read_json(os.path.join(run, "summary.json"))["status"] == "completed"


def test_bad_reference_files_are_one_line_errors(kl, checkpoint, tmp_path, capsys):
    """A missing file, another task, another network, a tensor of another shape, a non-torch file, and a checkpoint
    trained with another --norm-obs than the run's (either way): one line naming --kl-reference (and --norm-obs for
    the last), exit status 2, summary.json status failed."""
    saved = torch.load(checkpoint, weights_only=True)
    files = {"missing": (str(tmp_path / "missing.pt"), "no such file")}
    other_task = tmp_path / "other_task.pt"
    torch.save(dict(saved, args=dict(saved["args"], env_id="Acrobot-v1")), other_task)
    files["another task"] = (str(other_task), "trained on Acrobot-v1, not on CartPole-v1")
    other_shape = tmp_path / "other_shape.pt"
    torch.save(dict(saved, obs_shape=[6], n_actions=3), other_shape)
    files["another network"] = (str(other_shape), "takes observations (6,) and 3 actions")
    wrong = tmp_path / "wrong_tensor.pt"
    torch.save(dict(saved, model=dict(saved["model"], **{"actor.fc1.weight": torch.zeros(65, 4)})), wrong)
    files["a tensor of another shape"] = (str(wrong), "actor.fc1.weight")
    not_torch = tmp_path / "text.pt"
    not_torch.write_text("not a checkpoint")
    files["not a torch file"] = (str(not_torch), "safe loading")
    # the observation statistics in the state dict apply only with the --norm-obs the checkpoint was trained with
    normalised = tmp_path / "norm_obs.pt"
    torch.save(dict(saved, args=dict(saved["args"], norm_obs=True)), normalised)
    files["trained with --norm-obs"] = (str(normalised), "--norm-obs True, this run has --norm-obs False")
    files["run with --norm-obs"] = (checkpoint, "--norm-obs False, this run has --norm-obs True", "--norm-obs", "True")
    for case, (path, fragment, *flags) in files.items():
        out_dir = tmp_path / case.replace(" ", "_").replace("--", "")
        code, lines = call_main(kl, ["--env-id", "CartPole-v1", "--total-timesteps", 256, "--num-envs", 2,
                                     "--num-steps", 64, "--eval-episodes", 0, "--kl-reference", path, *flags,
                                     "--device", "cpu", "--output-dir", out_dir, "--run-name", "bad"], capsys)
        assert code == 2 and len(lines) == 1, (case, lines)
        assert lines[0].startswith("error: --kl-reference") and fragment in lines[0], (case, lines)
        assert "eval-checkpoint" not in lines[0], (case, lines)
        assert read_json(os.path.join(out_dir, "bad", "summary.json"))["status"] == "failed"


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def test_beta_zero_is_ppo_py_and_the_default_is_not(kl, ppo, tmp_path):
    """--kl-beta 0 is ppo.py's run (same episodes and value losses), with the kl/ logs; the default (k1 in the
    reward) changes what the critic learns and logs the penalty."""
    base = run_in_process(ppo, tmp_path, "ppo", "CartPole-v1", SMOKE)
    off = run_in_process(kl, tmp_path, "off", "CartPole-v1", SMOKE, kl_beta=0.0)
    on = run_in_process(kl, tmp_path, "on", "CartPole-v1", SMOKE)
    assert_same_run(base, off, "ppo_kl.py --kl-beta 0")
    assert read_scalars(off)["losses/value_loss"] == read_scalars(base)["losses/value_loss"]
    assert read_scalars(on)["losses/value_loss"] != read_scalars(base)["losses/value_loss"]
    off_scalars, on_scalars = read_scalars(off), read_scalars(on)
    assert KL_KEYS <= off_scalars.keys() and "kl/penalty" not in off_scalars
    assert KL_KEYS | {"kl/penalty", "kl/penalty_share"} <= on_scalars.keys() and "losses/kl_term" not in on_scalars
    assert off_scalars["kl/exact"][-1][1] > 0  # the unregularised agent drifts from its initial policy


def test_beta_zero_is_ppo_py_on_minatar(kl, ppo, tmp_path):
    """--kl-beta 0 (init reference) on MinAtar/Breakout (the kl-ppo suite's task) writes ppo.py's episodes.csv."""
    settings = dict(total_timesteps=1024, num_envs=4, num_steps=64, num_minibatches=4, eval_episodes=0,
                    metrics_every=8)
    base = run_in_process(ppo, tmp_path, "ppo", "MinAtar/Breakout", settings)
    off = run_in_process(kl, tmp_path, "off", "MinAtar/Breakout", settings, kl_beta=0.0)
    assert_same_run(base, off, "ppo_kl.py --kl-beta 0 on MinAtar/Breakout")
    assert read_scalars(off)["losses/value_loss"] == read_scalars(base)["losses/value_loss"]


def test_minatar_run_with_the_penalty_in_the_reward(kl, tmp_path):
    run = run_in_process(kl, tmp_path, "breakout", "MinAtar/Breakout", dict(
        total_timesteps=1024, num_envs=4, num_steps=64, num_minibatches=4, eval_episodes=1, metrics_every=8),
        kl_estimator="k3", kl_beta=0.1)
    scalars = read_scalars(run)
    assert KL_KEYS | {"kl/penalty_share"} <= scalars.keys()
    assert all(np.isfinite(v) for key in KL_KEYS for _, v in scalars[key])
    assert read_json(os.path.join(run, "summary.json"))["status"] == "completed"


def test_atari_smoke_with_the_penalty_in_the_loss(kl, tmp_path):
    run = run_in_process(kl, tmp_path, "breakout", "Breakout-v5", dict(
        total_timesteps=256, num_envs=2, num_steps=32, max_episode_steps=60, eval_episodes=1, metrics_every=8,
        metrics_batch_size=32), kl_placement="loss", kl_estimator="k3")
    scalars = read_scalars(run)
    assert KL_KEYS | {"losses/kl_term"} <= scalars.keys() and "kl/penalty" not in scalars
    assert all(np.isfinite(v) for _, v in scalars["kl/exact"])


def test_continuous_run_logs_the_gaussian_kl(kl, tmp_path):
    run = run_in_process(kl, tmp_path, "pendulum", "Pendulum-v1", dict(
        total_timesteps=256, num_envs=1, num_steps=64, num_minibatches=2, update_epochs=2, eval_episodes=0,
        metrics_every=0), kl_placement="loss", kl_estimator="k2", kl_beta=1.0)
    exact = read_scalars(run)["kl/exact"]
    assert exact[0][1] == pytest.approx(0.0, abs=1e-6) and exact[-1][1] > 0


@pytest.mark.parametrize("argv, fragment", [
    (["--kl-beta", "-0.1"], "--kl-beta"), (["--kl-beta", "nan"], "--kl-beta"),
    (["--kl-reference", "some.pt", "--eval-checkpoint", __file__], "--kl-reference"),
])
def test_bad_kl_flags_are_one_line_errors(kl, capsys, argv, fragment):
    code, lines = call_main(kl, ["--env-id", "CartPole-v1", *argv, "--output-dir", "/nonexistent/never"], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], lines


@pytest.mark.parametrize("argv, fragment", [(["--kl-estimator", "k4"], "--kl-estimator"),
                                            (["--kl-placement", "value"], "--kl-placement")])
def test_unknown_choices_are_refused_by_the_parser(kl, capsys, argv, fragment):
    """tyro refuses a value outside a Literal's choices before run(): exit status 2, its error box names the flag."""
    capsys.readouterr()
    code, lines = call_main(kl, ["--env-id", "CartPole-v1", *argv, "--output-dir", "/nonexistent/never"], capsys)
    assert code == 2 and any(fragment in line for line in lines), lines
    assert not any("Traceback" in line for line in lines)
