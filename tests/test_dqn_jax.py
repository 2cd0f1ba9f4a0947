"""algos/dqn_jax.py, the JAX twin of algos/dqn.py (docs/dqn_jax.md).

Unit tests against dqn.py's own functions on the same inputs with the same weights (copied from a dqn.py QNetwork
into the flax parameters): the TD loss (MSE and Huber, n-step discounts, terminal masking), one full update (loss,
gradient and Adam), the greedy action, the diagnostics; the copied host-side code (replay memory, episode
bookkeeping, environments) equal to dqn.py's text; end-to-end runs in this process: determinism, the diagnostics
leave the run unchanged, warm-up identical to dqn.py's, jitted functions compiled once per shape, the checkpoint
round trip, bad checkpoints and bad flags, an Atari smoke run.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import glob
import inspect
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import DQN_SMOKE, call_main, load_script, read_json, read_scalars, script_path

jax.config.update("jax_platforms", "cpu")


@pytest.fixture(scope="module")
def dj():
    return load_script("dqn_jax")


CASES = {  # obs shape, n actions, QNetwork settings, observation dtype
    "mlp": ((4,), 2, dict(minatar=False), np.float32),
    "minatar": ((4, 10, 10), 6, dict(minatar=True), np.uint8),
    "nature_cnn": ((4, 84, 84), 4, dict(minatar=False), np.uint8),
}


def twin_networks(dqn, dj, case: str, seed: int = 0):
    """A dqn.py QNetwork and dqn_jax.py's QNetwork with the torch network's weights (Linear weight transposed, Conv
    weight OIHW -> HWIO). Returns (torch net, flax module, flax params)."""
    obs_shape, n_actions, settings, dtype = CASES[case]
    torch.manual_seed(seed)
    net = dqn.QNetwork(obs_shape, n_actions, **settings)
    module = dj.QNetwork(obs_shape, n_actions, **settings)
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, *obs_shape), dtype))
    ours = {}
    for name, layer in net.net.named_children():
        if isinstance(layer, torch.nn.Linear):
            ours[name] = {"kernel": layer.weight.detach().numpy().T, "bias": layer.bias.detach().numpy()}
        elif isinstance(layer, torch.nn.Conv2d):
            ours[name] = {"kernel": layer.weight.detach().numpy().transpose(2, 3, 1, 0),
                          "bias": layer.bias.detach().numpy()}
    assert jax.tree.map(np.shape, ours) == jax.tree.map(np.shape, dict(params["params"]))
    return net, module, {"params": jax.tree.map(jnp.asarray, ours)}


def random_batch(case: str, batch_size: int, seed: int):
    obs_shape, n_actions, _, dtype = CASES[case]
    rng = np.random.default_rng(seed)
    sample = (lambda n: rng.normal(size=(n, *obs_shape)).astype(np.float32)) if dtype == np.float32 else \
        (lambda n: rng.integers(0, 2 if case == "minatar" else 256, (n, *obs_shape)).astype(np.uint8))
    discounts = rng.choice([0.0, 0.99, 0.99**3], batch_size).astype(np.float32)  # terminal, 1-step, 3-step
    return (sample(batch_size), rng.integers(0, n_actions, batch_size), rng.normal(size=batch_size).astype(np.float32),
            discounts, sample(batch_size))


def torch_batch(batch):
    return [torch.from_numpy(np.ascontiguousarray(x)) for x in batch]


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_greedy_action_equal_dqn_py(dqn, dj, case):
    net, module, params = twin_networks(dqn, dj, case)
    obs = random_batch(case, 8, 1)[0]
    with torch.no_grad():
        expected = net(torch.from_numpy(obs)).numpy()
    q_values, hidden = module.apply(params, obs)
    np.testing.assert_allclose(np.asarray(q_values), expected, rtol=1e-5, atol=1e-5)
    assert len(hidden) == len(net.hidden_layers()) and module.hidden_layers() == net.hidden_layers()
    greedy = np.asarray(dj.greedy_actions(module, params, obs))
    np.testing.assert_array_equal(greedy, expected.argmax(axis=1))


@pytest.mark.parametrize("case", ["mlp", "minatar"])
@pytest.mark.parametrize("loss_type", ["mse", "huber"])
def test_td_loss_equals_dqn_py(dqn, dj, case, loss_type):
    """Same weights (online and a different target network), same batch with terminal (discount 0), 1-step and
    3-step bootstraps: the same loss and Q(s, a)."""
    net, module, params = twin_networks(dqn, dj, case, seed=0)
    target_net, _, target_params = twin_networks(dqn, dj, case, seed=1)
    batch = random_batch(case, 64, 2)
    batch = (batch[0], batch[1], batch[2] * 3.0, batch[3], batch[4])  # errors beyond Huber's delta too
    loss, q_taken = dqn.td_loss(net, target_net, *torch_batch(batch), loss_type)
    ours, (our_q, _) = dj.td_loss(module, params, target_params, *batch, loss_type)
    np.testing.assert_allclose(float(ours), loss.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(our_q), q_taken.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_replay_n_step_batch_feeds_the_same_loss(dqn, dj):
    """An n-step batch drawn from dqn_jax.py's replay memory (terminations inside the horizon) gives the same loss in
    both scripts: the memory is the same code (test below), the loss takes its discounts as they are."""
    rb = dj.ReplayBuffer(200, 1, (4,), np.float32, False)
    rng = np.random.default_rng(0)
    for t in range(150):
        done = np.array([t % 7 == 6])
        rb.add(rng.normal(size=(1, 4)).astype(np.float32), np.array([t % 2]), np.array([1.0], np.float32), done,
               np.zeros(1, bool), np.array([t % 7 == 0]), np.ones(1, bool))
    batch = rb.sample(64, np.random.default_rng(1), n_step=3, gamma=0.9)
    assert (batch[3] == 0).any() and (np.isclose(batch[3], 0.9**3)).any()
    net, module, params = twin_networks(dqn, dj, "mlp")
    loss, _ = dqn.td_loss(net, net, *torch_batch(batch), "huber")
    ours, _ = dj.td_loss(module, params, params, *batch, "huber")
    np.testing.assert_allclose(float(ours), loss.item(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["mse", "huber"])
def test_two_updates_equal_dqn_py(dqn, dj, loss_type):
    """train_steps (loss, gradient, optax Adam with dqn.py's eps), two updates in one call, against dqn.py's
    td_loss + backward + torch Adam on the same two batches: the same parameters afterwards."""
    import optax

    net, module, params = twin_networks(dqn, dj, "minatar", seed=0)
    target_net, _, target_params = twin_networks(dqn, dj, "minatar", seed=1)
    batches = [random_batch("minatar", 32, seed) for seed in (3, 4)]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, eps=3.125e-4)
    for batch in batches:
        loss, _ = dqn.td_loss(net, target_net, *torch_batch(batch), loss_type)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    adam = optax.adam(1e-3, eps=3.125e-4)
    stacked = tuple(np.stack(field) for field in zip(*batches))
    new, _, losses, _ = dj.train_steps(module, adam, loss_type, params, adam.init(params), target_params, stacked)
    assert losses.shape == (2,)
    np.testing.assert_allclose(float(losses[1]), loss.item(), rtol=1e-5, atol=1e-6)
    for name, layer in net.net.named_children():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            weight = layer.weight.detach().numpy()
            weight = weight.T if weight.ndim == 2 else weight.transpose(2, 3, 1, 0)
            np.testing.assert_allclose(np.asarray(new["params"][name]["kernel"]), weight, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(np.asarray(new["params"][name]["bias"]), layer.bias.detach().numpy(),
                                       rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["mlp", "minatar"])
def test_plasticity_metrics_equal_dqn_py(dqn, dj, case):
    net, module, params = twin_networks(dqn, dj, case, seed=0)
    target_net, _, target_params = twin_networks(dqn, dj, case, seed=1)
    batch = random_batch(case, 128, 5)
    expected = dqn.plasticity_metrics(net, target_net, torch_batch(batch), "huber")
    ours = jax.device_get(dj.plasticity_metrics(module, params, target_params, batch, "huber"))
    assert set(ours) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(float(ours[key]), value, rtol=1e-4, atol=1e-6, err_msg=key)


def test_init_distributions_are_dqn_py_s(dj):
    """PyTorch's default init where dqn.py uses it (MLP, MinAtar): U(+-1/sqrt(fan_in)) kernels and biases, whose
    standard deviation is 1/sqrt(3 fan_in); Dopamine's xavier_uniform and zero biases for the Nature CNN."""
    params = dj.QNetwork((4,), 2).init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
    for name, fan_in in (("fc1", 4), ("fc2", 120), ("q", 84)):
        for part in ("kernel", "bias"):
            x = np.asarray(params[name][part])
            assert np.abs(x).max() <= 1 / np.sqrt(fan_in), (name, part)
            assert x.size < 50 or np.abs(x).max() > 0.9 / np.sqrt(fan_in), (name, part)
    kernel = np.asarray(params["fc2"]["kernel"])
    assert abs(kernel.std() - 1 / np.sqrt(3 * 120)) < 0.05 / np.sqrt(120)
    conv = dj.QNetwork((4, 10, 10), 6, minatar=True).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 10, 10)))["params"]
    assert np.abs(np.asarray(conv["conv1"]["bias"])).max() <= 1 / 6  # fan_in 4 * 3 * 3
    atari = dj.QNetwork((4, 84, 84), 4).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 84, 84), jnp.uint8))["params"]
    assert all(not np.asarray(atari[n]["bias"]).any() for n in atari)
    limit = np.sqrt(6 / (4 * 64 + 32 * 64))  # xavier: fan_in 4*8*8, fan_out 32*8*8
    assert np.abs(np.asarray(atari["conv1"]["kernel"])).max() <= limit


def test_host_side_code_is_dqn_py_s(dqn, dj):
    """The replay memory, episode bookkeeping, MinAtar wrapper and environment set-up are copies of dqn.py's, so
    sampling and the environments are the same code (docs/dqn_jax.md, detail 1)."""
    for name in ("ReplayBuffer", "EpisodeStats", "MinAtarVecEnv", "make_env", "env_seeds"):
        assert inspect.getsource(getattr(dj, name)) == inspect.getsource(getattr(dqn, name)), name
    assert dj.FAMILY_DEFAULTS == dqn.FAMILY_DEFAULTS and dj.MINATAR_GAMES == dqn.MINATAR_GAMES


def test_flags_are_dqn_py_s(dqn, dj):
    import dataclasses

    theirs = {f.name: f.default for f in dataclasses.fields(dqn.Args)}
    ours = {f.name: f.default for f in dataclasses.fields(dj.Args)}
    assert set(theirs) - set(ours) == {"torch_deterministic", "torch_threads"}
    assert set(ours) - set(theirs) == {"xla_threads"}
    assert {k: v for k, v in ours.items() if k not in ("exp_name", "xla_threads")} == \
        {k: v for k, v in theirs.items() if k not in ("exp_name", "torch_deterministic", "torch_threads")}


def test_imports_no_torch():
    with open(script_path("dqn_jax")) as f:
        tree = ast.parse(f.read())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" not in modules and {"jax", "flax", "optax"} <= modules


# --- end-to-end runs in this process (the CartPole smoke arm of benchmark/suites/smoke.toml) -----------------------

def run_dqn_smoke(module, out_dir, name: str, env_id: str, **changes) -> str:
    """helpers.run_dqn_smoke for the JAX twin (which has --xla-threads, not --torch-threads): DQN_SMOKE's settings
    for `env_id`, changed by `changes`, run in this process on the CPU; returns the run directory."""
    args = module.Args(env_id=env_id, **{**DQN_SMOKE[env_id], **changes}, device="cpu", xla_threads=1,
                       output_dir=str(out_dir), run_name=name)
    assert module.run(args)["status"] == "completed"
    return os.path.join(str(out_dir), name)


def episodes(run_dir: str) -> bytes:
    with open(os.path.join(run_dir, "episodes.csv"), "rb") as f:
        return f.read()


@contextlib.contextmanager
def count_compiles():
    """Counts XLA compilations by function name (jax.log_compiles' "Compiling <name> ..." records)."""
    counts = collections.Counter()

    class Handler(logging.Handler):
        def emit(self, record):
            words = record.getMessage().split()
            if words and words[0] == "Compiling" and len(words) > 1:
                counts[words[1]] += 1

    handler, logger = Handler(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield counts
    finally:
        logger.removeHandler(handler)


def test_determinism_and_diagnostics_leave_the_run_unchanged(dj, tmp_path):
    """Same seed -> the same episodes.csv; another seed -> another; --metrics-every 1 and 0 -> the same run as the
    smoke arm's 10. The 1.5 replay ratio with 2 envs runs 3 updates per step, cut at each diagnostics point."""
    flags = dict(num_envs=2, replay_ratio=1.5, total_timesteps=500, log_every=7, eval_episodes=0)
    dj.jitted_functions.cache_clear()
    with count_compiles() as compiles:
        a = run_dqn_smoke(dj, tmp_path, "a", "CartPole-v1", seed=5, **flags)
    # shapes decide compilation: the update once per chunk length (3, and 1 + 2 around diagnostics points), the
    # greedy action for the 2 training envs, the diagnostics once
    assert compiles["jit(train_steps)"] == 3 and compiles["jit(greedy_actions)"] == 1, compiles
    assert compiles["jit(plasticity_metrics)"] == 1, compiles
    with count_compiles() as compiles:  # another run of the same network and settings in this process: none
        b = run_dqn_smoke(dj, tmp_path, "b", "CartPole-v1", seed=5, **flags)
    assert not {"jit(train_steps)", "jit(greedy_actions)", "jit(plasticity_metrics)"} & set(compiles), compiles
    c = run_dqn_smoke(dj, tmp_path, "c", "CartPole-v1", seed=6, **flags)
    off = run_dqn_smoke(dj, tmp_path, "off", "CartPole-v1", seed=5, **flags, metrics_every=0)
    every = run_dqn_smoke(dj, tmp_path, "every", "CartPole-v1", seed=5, **flags, metrics_every=1)
    assert episodes(a).count(b"\n") > 15
    assert episodes(a) == episodes(b) == episodes(off) == episodes(every)
    assert episodes(a) != episodes(c)
    summary = read_json(os.path.join(a, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] == (500 - 200) // 2 * 3
    assert summary["peak_gpu_memory_mb"] is None
    scalars = read_scalars(every)
    for key in ("losses/td_loss", "losses/q_values", "charts/epsilon", "charts/SPS", "charts/num_updates",
                "charts/episodic_return", "plasticity/dormant_tau0/fc1",
                "plasticity/grad_inactive_tau0.1", "plasticity/srank", "plasticity/grad_norm"):
        assert key in scalars, key
    assert [v for _, v in scalars["charts/num_updates"]][:2] == [7, 14]
    assert len(scalars["plasticity/srank"]) == summary["num_updates"]
    config = read_json(os.path.join(a, "config.json"))
    assert {"jax", "jaxlib", "flax", "optax"} <= set(config["versions"]) and "torch" not in config["versions"]


def test_warm_up_is_dqn_py_s(dqn, dj, tmp_path):
    """Before learning starts both scripts see the same environment seeds and draw the same exploration coins
    from the same NumPy generator: the same episodes.csv."""
    settings = dict(total_timesteps=1500, learning_starts=1500, buffer_size=1000, batch_size=32, eval_episodes=0,
                    metrics_every=0, num_envs=3, seed=7)
    theirs = os.path.join(tmp_path, "torch")
    dqn.run(dqn.Args(env_id="CartPole-v1", **settings, device="cpu", torch_threads=1, output_dir=str(tmp_path),
                     run_name="torch"))
    ours = run_dqn_smoke(dj, tmp_path, "jax", "CartPole-v1", **settings)
    assert episodes(ours).count(b"\n") > 20 and episodes(ours) == episodes(theirs)


def test_checkpoint_round_trip_and_bad_checkpoints(dj, tmp_path, capsys):
    import flax.serialization

    run_dir = run_dqn_smoke(dj, tmp_path, "train", "MinAtar/Breakout", save_model=True, eval_episodes=3)
    path = os.path.join(run_dir, "model.msgpack")
    with open(path, "rb") as f:
        checkpoint = flax.serialization.msgpack_restore(f.read())
    assert checkpoint["script"] == "dqn_jax.py" and checkpoint["obs_shape"] == [4, 10, 10]
    assert checkpoint["args"]["env_id"] == "MinAtar/Breakout" and set(checkpoint["model"]) == {"conv1", "fc1", "q"}
    trained = read_json(os.path.join(run_dir, "summary.json"))
    evaluated = run_dqn_smoke(dj, tmp_path, "eval", "MinAtar/Breakout", eval_checkpoint=path, eval_episodes=3)
    assert read_json(os.path.join(evaluated, "summary.json"))["eval_returns"] == trained["eval_returns"]

    def write(name, data: bytes):
        with open(tmp_path / name, "wb") as f:
            f.write(data)
        return str(tmp_path / name)

    wrong = dict(checkpoint, model=dict(checkpoint["model"], fc1=dict(checkpoint["model"]["fc1"],
                                                                      kernel=np.zeros((3, 3), np.float32))))
    cases = {
        "empty": (write("empty", b""), "not a msgpack file"),
        "random": (write("random", os.urandom(4096)), "--eval-checkpoint"),
        "foreign": (write("foreign", flax.serialization.msgpack_serialize({"weights": np.zeros(3)})),
                    "not a checkpoint written by --save-model"),
        "wrong shape": (write("wrong", flax.serialization.msgpack_serialize(wrong)), "fc1/kernel"),
        "other task": (write("other", flax.serialization.msgpack_serialize(
            dict(checkpoint, args=dict(checkpoint["args"], env_id="MinAtar/Asterix")))), "MinAtar/Asterix"),
    }
    for case, (bad, fragment) in cases.items():
        out = tmp_path / f"bad_{case.replace(' ', '_')}"
        code, lines = call_main(dj, ["--env-id", "MinAtar/Breakout", "--device", "cpu", "--eval-checkpoint", bad,
                                     "--output-dir", out, "--run-name", "x"], capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --eval-checkpoint"), (case, lines)
        assert fragment in lines[0], (case, lines)
        for summary in glob.glob(str(out / "*" / "summary.json")):
            assert read_json(summary)["status"] == "failed"
        assert not glob.glob(str(out / "*" / "model.*"))


@pytest.mark.parametrize("flags, fragments", [
    (["--env-id", "NoSuchEnv-v0"], ("NoSuchEnv-v0",)),
    (["--env-id", "Pendulum-v1"], ("Pendulum-v1", "discrete")),
    (["--xla-threads", "-1"], ("--xla-threads",)),
    (["--env-ids", "CartPole-v1", "CartPole-v1"], ("--steps-per-task",)),
])
def test_bad_flags(dj, tmp_path, capsys, flags, fragments):
    code, lines = call_main(dj, ["--env-id", "CartPole-v1", "--device", "cpu", "--output-dir", tmp_path, *flags],
                            capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert all(fragment in lines[0] for fragment in fragments), lines


def test_atari_smoke(dj, tmp_path):
    run_dir = run_dqn_smoke(dj, tmp_path, "atari", "Breakout-v5", total_timesteps=120, learning_starts=80,
                            batch_size=8, metrics_batch_size=16, max_episode_steps=30, metrics_every=5)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["num_updates"] == 10 and summary["num_episodes"] >= 1
    assert "plasticity/dormant_tau0/conv3" in read_scalars(run_dir)
