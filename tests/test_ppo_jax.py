"""algos/ppo_jax.py, the JAX twin of algos/ppo.py: GAE, the minibatch split and the PPO loss against ppo.py's own
functions on the same inputs (weights copied from a ppo.py Agent), the diagnostics against ppo.py's, determinism,
diagnostics that never change a run, the checkpoint round trip and its refusals, an Atari smoke run, MinAtar through
the host-step callback (the same environment trajectory as stepping ppo.py's MinAtarVecEnv by hand), bad input."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from helpers import call_main, load_script, read_json, read_scalars, synthetic_rollout


@pytest.fixture(scope="module")
def ppo():
    return load_script("ppo")


@pytest.fixture(scope="module")
def pj():
    return load_script("ppo_jax")


@pytest.mark.parametrize("seed,gamma,lam", [(0, 0.99, 0.95), (1, 0.9, 0.0), (2, 0.97, 1.0)])
def test_gae_equals_ppo_py(ppo, pj, seed, gamma, lam):
    rollout = synthetic_rollout(seed)
    expected_adv, expected_ret = ppo.compute_gae(*rollout, gamma, lam)
    rewards, values, next_value, terminated, done, valid = rollout
    adv, ret = pj.compute_gae(rewards, values, next_value, terminated.astype(bool), done.astype(bool), valid, gamma,
                              lam)
    np.testing.assert_allclose(np.asarray(adv), expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), expected_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[~valid] == 0)


@pytest.mark.parametrize("n_valid,num_minibatches", [(150, 4), (7, 4), (3, 4), (160, 1)])
def test_minibatch_windows_split_the_valid_steps_as_ppo_py(pj, n_valid, num_minibatches):
    """Every valid step once per epoch, invalid ones never, in np.array_split's sizes (ppo.py's `minibatches`)."""
    import jax

    valid = np.zeros(160, bool)
    valid[np.random.default_rng(0).choice(160, n_valid, replace=False)] = True
    order, starts, sizes = map(np.asarray, pj.minibatch_windows(valid, num_minibatches, jax.random.PRNGKey(3)))
    expected = [len(mb) for mb in np.array_split(np.arange(n_valid), num_minibatches)]
    np.testing.assert_array_equal(sizes, expected)
    used = np.concatenate([order[s: s + n] for s, n in zip(starts, sizes)])
    np.testing.assert_array_equal(np.sort(used), np.flatnonzero(valid))


def copy_weights(pj, agent, obs_shape) -> dict:
    """A ppo.py Agent's weights as ppo_jax.py parameters (Linear weight -> kernel transposed, Conv2d OIHW -> HWIO,
    fc1's rows from CHW to HWC flattening order)."""
    sd = {k: v.detach().numpy() for k, v in agent.state_dict().items()}
    params = {}

    def put(path, value):
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.asarray(value, np.float32)

    for key, value in sd.items():
        if key.startswith("obs_norm"):
            continue
        if key == "actor_logstd":
            put(["actor_logstd"], value)
            continue
        module, layer, kind = key.split(".")
        if kind == "bias":
            put([module, layer, "bias"], value)
        elif value.ndim == 4:
            put([module, layer, "kernel"], value.transpose(2, 3, 1, 0))
        elif module == "trunk" and layer == "fc1":
            c, h, w = 64, 7, 7
            put([module, layer, "kernel"], value.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(c * h * w, -1))
        else:
            put([module, layer, "kernel"], value.T)
    return params


CASES = {"discrete": ((4,), 3, False), "continuous": ((11,), 3, True), "pixels": ((4, 84, 84), 4, False),
         "minatar": ((400,), 3, False)}  # MinAtar: ReLU MLPs (docs/ppo.md, detail 16)


@pytest.mark.parametrize("case", list(CASES))
def test_ppo_loss_equals_ppo_py(ppo, pj, case):
    """The same weights and batch: ppo_jax.ppo_loss equals ppo.ppo_loss (loss and statistics, ~1e-5), also after
    the policy moved (ratios away from 1, clipping active), with value clipping and advantage normalisation."""
    import jax

    obs_shape, action_dim, continuous = CASES[case]
    torch.manual_seed(0)
    agent = ppo.Agent(obs_shape, action_dim, continuous, minatar=case == "minatar")
    batch_size = 16 if case == "pixels" else 64
    gen = torch.Generator().manual_seed(1)
    if len(obs_shape) == 3:
        obs = torch.randint(0, 256, (batch_size, *obs_shape), dtype=torch.uint8, generator=gen)
    else:
        obs = torch.randn((batch_size, *obs_shape), generator=gen)
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action_and_value(obs, generator=gen)
    logprobs = logprobs + 0.3 * torch.randn(batch_size, generator=gen)  # an older policy: ratios spread around 1
    values = values + 0.5 * torch.randn(batch_size, generator=gen)
    advantages, returns = torch.randn(batch_size, generator=gen), torch.randn(batch_size, generator=gen)
    args = ppo.Args(clip_coef=0.2, ent_coef=0.01)
    loss, stats, _ = ppo.ppo_loss(agent, obs, actions, logprobs, advantages, returns, values, args)

    params = copy_weights(pj, agent, obs_shape)
    model = pj.Agent(obs_shape, action_dim, continuous, minatar=case == "minatar")
    init = model.init(jax.random.PRNGKey(0), np.zeros((1, *obs_shape), np.uint8 if len(obs_shape) == 3 else np.float32))
    assert pj.param_paths(init["params"]) == pj.param_paths(params)  # the same layers, names and shapes
    cfg = dict(continuous=continuous, norm_adv=True, clip_coef=0.2, clip_vloss=True, ent_coef=0.01, vf_coef=0.5)
    batch = [x.numpy() for x in (obs, actions, logprobs, advantages, returns, values)]
    ours, (our_stats, _) = pj.ppo_loss(params, model.apply, *batch, np.ones(batch_size, bool), cfg)
    assert float(ours) == pytest.approx(loss.item(), rel=1e-5, abs=1e-5)
    for key in ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"):
        assert float(our_stats[key]) == pytest.approx(stats[key].item(), rel=1e-4, abs=1e-5), key
    assert 0 < stats["clipfrac"].item() < 1  # the clipped branch is exercised
    # a mask computes the loss of the masked rows only (the fixed-width minibatch windows, docs/ppo_jax.md detail 4)
    half = batch_size // 2
    sub_loss = ppo.ppo_loss(agent, *(x[:half] for x in (obs, actions, logprobs, advantages, returns, values)), args)[0]
    masked, _ = pj.ppo_loss(params, model.apply, *batch, np.arange(batch_size) < half, cfg)
    assert float(masked) == pytest.approx(sub_loss.item(), rel=1e-5, abs=1e-5)


def test_plasticity_metrics_equal_ppo_py(ppo, pj):
    import jax

    torch.manual_seed(0)
    agent = ppo.Agent((4,), 2, False)
    with torch.no_grad():
        agent.actor.fc1.bias[:5] = -50.0  # tanh saturated at -1: not dormant; a few units exactly dead below
        agent.critic.fc2.weight[:3] = 0.0
        agent.critic.fc2.bias[:3] = 0.0
    gen = torch.Generator().manual_seed(2)
    obs = torch.randn(128, 4, generator=gen)
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action_and_value(obs, generator=gen)
    batch = (obs, actions, logprobs + 0.2 * torch.randn(128, generator=gen), torch.randn(128, generator=gen),
             torch.randn(128, generator=gen), values)
    expected = ppo.plasticity_metrics(agent, batch, ppo.Args(clip_coef=0.2, ent_coef=0.01))
    params = copy_weights(pj, agent, (4,))
    model = pj.Agent((4,), 2, False)
    hidden = model.apply({"params": params}, np.zeros((1, 4), np.float32), True)[2]
    cfg = dict(continuous=False, norm_adv=True, clip_coef=0.2, clip_vloss=True, ent_coef=0.01, vf_coef=0.5,
               hidden_names=[n for n, _, _ in hidden], hidden_shapes={n: z.shape[1:] for n, z, _ in hidden})
    ours = pj.plasticity_metrics(params, model.apply, [x.numpy() for x in batch], np.ones(128, bool), cfg)
    assert set(ours) == set(expected)
    assert expected["plasticity/dormant_tau0/critic.fc2"] == pytest.approx(3 / 64)
    for key, value in expected.items():
        assert float(ours[key]) == pytest.approx(value, rel=1e-3, abs=1e-4), key
    del jax


# ---------------------------------------------------------------------------------------------------------------
# Runs (in process: a subprocess costs seconds of imports; each run compiles its iteration once)
# ---------------------------------------------------------------------------------------------------------------

SMOKE = dict(env_id="CartPole-v1", total_timesteps=1024, num_envs=4, num_steps=32, eval_episodes=2, device="cpu",
             xla_threads=1)


def run_in_process(pj, out_dir, name: str, **changes) -> str:
    args = pj.Args(**{**SMOKE, **changes, "output_dir": str(out_dir), "run_name": name})
    summary = pj.run(args)
    assert summary["status"] == "completed", summary
    return os.path.join(str(out_dir), name)


@pytest.fixture(scope="module")
def runs(pj, tmp_path_factory):
    """Seed 5 without diagnostics, seed 5 with them every update (and --save-model), seed 6: {name: run dir} and the
    traces of the jitted iteration per run."""
    out = tmp_path_factory.mktemp("ppo_jax_runs")
    dirs, traces = {}, {}
    for name, seed, changes in (("a", 5, dict(metrics_every=0)), ("b", 5, dict(metrics_every=1, save_model=True)),
                                ("c", 6, dict(metrics_every=0))):
        before = pj.TRACES["iteration"]
        dirs[name] = run_in_process(pj, out, name, seed=seed, **changes)
        traces[name] = pj.TRACES["iteration"] - before
    return dirs, traces


def episodes(run_dir: str) -> bytes:
    with open(os.path.join(run_dir, "episodes.csv"), "rb") as f:
        return f.read()


def test_same_seed_same_run_and_diagnostics_never_change_it(runs):
    dirs, traces = runs
    a, b, c = (episodes(dirs[k]) for k in "abc")
    assert a.count(b"\n") > 10
    assert a == b, "seed 5 with --metrics-every 1 wrote another episodes.csv than seed 5 with --metrics-every 0"
    assert a != c, "seeds 5 and 6 wrote the same episodes.csv"
    assert traces == {"a": 1, "b": 1, "c": 1}  # the iteration compiles once per run, never retraced
    summary_a, summary_b = (read_json(os.path.join(dirs[k], "summary.json")) for k in "ab")
    for key in ("num_updates", "num_episodes", "final_train_return", "eval_returns"):
        assert summary_a[key] == summary_b[key], key
    assert summary_a["num_updates"] == 8 * 4 * 4  # every minibatch of every epoch of every iteration


def test_outputs_match_the_torch_script(runs):
    dirs, _ = runs
    scalars = read_scalars(dirs["b"])
    for key in ("charts/episodic_return", "charts/SPS", "charts/learning_rate", "charts/num_updates",
                "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
                "losses/explained_variance", "eval/episodic_return", "plasticity/dormant_tau0/actor.fc1",
                "plasticity/srank/critic", "plasticity/grad_kurtosis", "plasticity/ess", "plasticity/feature_rank"):
        assert key in scalars, key
    assert len(scalars["plasticity/ess"]) == 8 * 16  # every update of 8 iterations
    assert not any(k.startswith("plasticity/") for k in read_scalars(dirs["a"]))
    lr = [v for _, v in scalars["charts/learning_rate"]]
    assert lr[0] == pytest.approx(2.5e-4) and lr[-1] == pytest.approx(2.5e-4 / 8)  # annealed per iteration
    config = read_json(os.path.join(dirs["b"], "config.json"))
    assert {"jax", "jaxlib", "flax", "optax"} <= config["versions"].keys() and "torch" not in config["versions"]
    with open(os.path.join(dirs["b"], "episodes.csv")) as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["global_step"]) for r in rows]
    assert steps == sorted(steps) and all(s % 4 == 0 for s in steps)
    assert all(r["task"] == "CartPole-v1" for r in rows)
    summary = read_json(os.path.join(dirs["b"], "summary.json"))
    assert summary["peak_gpu_memory_mb"] is None and summary["global_step"] == 1024


def test_checkpoint_round_trip_and_refusals(pj, runs, tmp_path, capsys):
    import flax.serialization

    dirs, _ = runs
    path = os.path.join(dirs["b"], "model.msgpack")
    with open(path, "rb") as f:
        checkpoint = flax.serialization.msgpack_restore(f.read())
    assert checkpoint["script"] == "ppo_jax.py" and checkpoint["n_actions"] == 2 and checkpoint["obs_shape"] == [4]
    assert {"actor/fc1/kernel", "critic/out/bias", "obs_norm/mean"} <= pj.param_paths(checkpoint["model"]).keys()
    summary = pj.run(pj.Args(**{**SMOKE, "eval_checkpoint": path, "output_dir": str(tmp_path), "run_name": "eval"}))
    assert summary["status"] == "completed" and len(summary["eval_returns"]) == 2

    def write(name, data: bytes) -> str:
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)

    wrong = json.loads(json.dumps({k: v for k, v in checkpoint.items() if k != "model"}))
    model = dict(checkpoint["model"], actor=dict(checkpoint["model"]["actor"],
                                                 fc1=dict(checkpoint["model"]["actor"]["fc1"], bias=np.zeros(65))))
    other_task = dict(wrong, model=checkpoint["model"], args=dict(wrong["args"], env_id="Acrobot-v1", env_ids=[]))
    files = {
        "empty": (write("empty.msgpack", b""), "msgpack_restore"),
        "random bytes": (write("random.msgpack", np.random.default_rng(0).bytes(300)), "--eval-checkpoint"),
        "foreign": (write("foreign.msgpack", flax.serialization.msgpack_serialize({"weights": np.zeros(3)})),
                    "not a checkpoint written by --save-model"),
        "wrong shape": (write("shape.msgpack", flax.serialization.msgpack_serialize(dict(wrong, model=model))),
                        "actor/fc1/bias"),
        "another task": (write("task.msgpack", flax.serialization.msgpack_serialize(other_task)), "Acrobot-v1"),
    }
    for case, (file, fragment) in files.items():
        out_dir = tmp_path / case.replace(" ", "_")
        code, lines = call_main(pj, ["--env-id", "CartPole-v1", "--eval-checkpoint", file, "--eval-episodes", "1",
                                     "--device", "cpu", "--output-dir", out_dir, "--run-name", "r"], capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (case, lines)
        assert "--eval-checkpoint" in lines[0] and fragment in lines[0], (case, lines)
        summary_path = out_dir / "r" / "summary.json"
        if summary_path.exists():  # checks after the run directory exists leave a failed run, no model
            assert read_json(str(summary_path))["status"] == "failed"
        assert not (out_dir / "r" / "model.msgpack").exists()


def test_atari_smoke(pj, tmp_path):
    """The Nature CNN through EnvPool's XLA Atari step: full-game returns, diagnostics of the conv trunk."""
    # a small update (1 epoch x 2 minibatches): pixel updates are unrolled in the jit (detail 4), so compile time
    # grows with the steps per iteration
    run_dir = run_in_process(pj, tmp_path, "atari", env_id="Breakout-v5", total_timesteps=128, num_envs=2,
                             num_steps=32, max_episode_steps=20, eval_episodes=1, metrics_every=2,
                             metrics_batch_size=16, update_epochs=1, num_minibatches=2)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["num_updates"] == 2 * 1 * 2 and summary["num_episodes"] >= 2
    scalars = read_scalars(run_dir)
    assert "plasticity/dormant_tau0/conv1" in scalars and "plasticity/srank" in scalars
    assert "plasticity/srank/critic" not in scalars  # one shared trunk


def test_mujoco_runs_in_64_bit_mode(pj, tmp_path):
    """EnvPool's MuJoCo step exchanges float64: the script turns on JAX's 64-bit mode (docs/ppo_jax.md, detail 2);
    without it EnvPool writes float64 into float32 buffers. The networks stay float32, the statistics float64."""
    import jax

    run_dir = run_in_process(pj, tmp_path, "hopper", env_id="Hopper-v4", total_timesteps=128, num_envs=2,
                             num_steps=64, num_minibatches=2, update_epochs=1, max_episode_steps=30, eval_episodes=1,
                             metrics_every=1, metrics_batch_size=16, save_model=True)
    try:
        summary = read_json(os.path.join(run_dir, "summary.json"))
        assert summary["num_updates"] == 2 and summary["num_episodes"] >= 2 and len(summary["eval_returns"]) == 1
        assert "plasticity/srank/critic" in read_scalars(run_dir)
        import flax.serialization

        with open(os.path.join(run_dir, "model.msgpack"), "rb") as f:
            model = flax.serialization.msgpack_restore(f.read())["model"]
        assert model["actor"]["fc1"]["kernel"].dtype == np.float32 and model["obs_norm"]["mean"].dtype == np.float64
        assert model["actor_logstd"].shape == (1, 3)
    finally:
        jax.config.update("jax_enable_x64", False)  # the other tests of this process run 32-bit tasks


def test_minatar_host_step_and_run(pj, tmp_path):
    """MinAtar has no XLA step: `host_step` calls MinAtarVecEnv.step from inside jit and lax.scan (an ordered
    io_callback). The same actions give the same observations, rewards and flags as stepping a twin env by hand,
    auto-resets included; a run learns nothing yet but is deterministic and logs full-game returns."""
    import jax
    import jax.numpy as jnp

    args = pj.Args(env_id="MinAtar/Breakout")
    pj.resolve_args(args)
    envs, twin = (pj.make_env("MinAtar/Breakout", 3, [7, 8, 9], args) for _ in range(2))
    handle, step_env = pj.host_step(envs)
    actions = jax.random.randint(jax.random.PRNGKey(0), (60, 3), 0, envs.action_space.n)

    @jax.jit
    def rollout(handle):
        def body(h, a):
            h, (obs, reward, terminated, truncated, _) = step_env(h, a)
            return h, (obs, reward, terminated, truncated)
        return jax.lax.scan(body, handle, actions)[1]

    envs.reset(), twin.reset()
    got = jax.device_get(rollout(handle))
    want = [twin.step(np.asarray(a))[:4] for a in actions]
    for k in range(4):
        assert np.array_equal(got[k], np.stack([w[k] for w in want])), k
    assert got[2].any()  # an episode ended (and auto-reset) within the 60 random steps
    del jnp
    dirs = [run_in_process(pj, tmp_path, name, env_id="MinAtar/Breakout", total_timesteps=512, num_envs=4,
                           num_steps=128, eval_episodes=1) for name in "ab"]
    a, b = (episodes(d) for d in dirs)
    assert a == b and a.count(b"\n") > 5  # the same seed, the same games (the envs' seeds are ppo.py's)
    summary, config = read_json(os.path.join(dirs[0], "summary.json")), read_json(os.path.join(dirs[0], "config.json"))
    assert config["family"] == "minatar" and config["args"]["num_minibatches"] == 8 and summary["num_updates"] == 4 * 8


def test_bad_input(pj, tmp_path, capsys):
    cases = [
        (["--env-id", "MinAtar/Breakou"], ("unknown env id", "MinAtar games: MinAtar/Asterix")),
        (["--env-ids", "CartPole-v1", "MinAtar/Breakout", "--steps-per-task", "512"], ("cannot mix MinAtar",)),
        (["--env-id", "CartPol-v1"], ("CartPol-v1", "did you mean")),
        (["--num-envs", "-1"], ("--num-envs",)),
        (["--total-timesteps", "10"], ("--total-timesteps",)),
    ]
    for flags, fragments in cases:
        code, lines = call_main(pj, [*flags, "--device", "cpu", "--output-dir", tmp_path], capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines)
    assert not os.listdir(tmp_path)  # refused before anything is written


def test_script_never_imports_torch():
    import subprocess
    import sys

    from helpers import ALGOS_DIR

    code = ("import runpy, sys; sys.argv = ['ppo_jax.py', '--env-id', 'CartPol-v1', '--device', 'cpu']\n"
            "try:\n    runpy.run_path(sys.argv[0].replace('ppo_jax.py', r'%s'), run_name='__main__')\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch was imported'\n"
            % os.path.join(ALGOS_DIR, "ppo_jax.py"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
