"""algos/bbf_atari.py: the BBF mechanics (n/gamma annealing, shrink-and-perturb arithmetic on online and target
networks and the optimizer state, reset timing of both official snapshots (--reset-offset 0 and 1) with
no_resets_after, EMA, SPR loss with masking, DrQ augmentation, prioritized sampling and importance weights, grouped
draws (--batches-to-group), n-step returns computed at sampling time across an episode end, replay ratio), bad input,
and tiny end-to-end runs with their outputs."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, describe, load_script, read_scalars, run_script, script_path

BBF = script_path("bbf_atari")


@pytest.fixture(scope="module")
def bbf():
    return load_script("bbf_atari")


def tiny_args(bbf, **kw):
    return bbf.Args(width_scale=1, hidden_dim=16, **kw)


# --- annealing (spr_agent.py exponential_decay_scheduler) ---

def test_n_step_and_gamma_annealing(bbf):
    n = lambda s: bbf.anneal_n_step(s, 10_000, 10, 3)  # noqa: E731
    g = lambda s: bbf.anneal_gamma(s, 10_000, 0.97, 0.997)  # noqa: E731
    assert [n(0), n(2_500), n(5_000), n(7_500), n(10_000), n(50_000)] == [10, 7, 5, 4, 3, 3]
    # 10 * 0.3^0.25 = 7.40, 10 * 0.3^0.5 = 5.48, 10 * 0.3^0.75 = 4.05
    assert g(0) == pytest.approx(0.97, abs=1e-12)
    assert g(5_000) == pytest.approx(1 - 0.03 * 0.1**0.5, abs=1e-12)
    assert g(10_000) == pytest.approx(0.997, abs=1e-12) and g(30_000) == pytest.approx(0.997, abs=1e-12)
    assert all(g(s) < g(s + 1000) for s in range(0, 9_000, 1000))  # monotone within a cycle
    assert bbf.anneal_n_step(5, 0, 10, 3) == 3 and bbf.anneal_gamma(5, 0, 0.97, 0.997) == pytest.approx(0.997)


# --- resets ---

def test_shrink_and_perturb_arithmetic_target_and_optimizer(bbf):
    args = tiny_args(bbf)
    torch.manual_seed(0)
    nets = [bbf.BBFNetwork((4, 84, 84), 3, args) for _ in range(4)]
    online, target, fresh_online, fresh_target = nets
    with torch.no_grad():  # make the target differ from the online network
        for p in target.parameters():
            p.add_(0.3)
    optimizer = bbf.make_optimizer(online, args)
    online.projection.weight.sum().backward()
    optimizer.step()
    assert optimizer.state
    before = {"online": {k: v.clone() for k, v in online.state_dict().items()},
              "target": {k: v.clone() for k, v in target.state_dict().items()}}
    bbf.shrink_and_perturb(online, target, optimizer, fresh_online, fresh_target, 0.5, 0.5)
    for name, net, fresh in (("online", online, fresh_online), ("target", target, fresh_target)):
        after, fresh_sd = net.state_dict(), fresh.state_dict()
        checked = set()
        for key, value in after.items():
            if key == "support":
                continue
            module = key.split(".")[0]
            if module in ("encoder", "transition_model"):
                assert torch.equal(value, before[name][key] * 0.5 + fresh_sd[key] * 0.5), key
            else:
                assert module in ("projection", "predictor", "head"), key
                assert torch.equal(value, fresh_sd[key]), key
            checked.add(module)
        assert checked == {"encoder", "transition_model", "projection", "predictor", "head"}
    # each network gets its own fresh initialisation: online and target heads differ after the reset
    assert not torch.equal(online.head["value"].weight, target.head["value"].weight)
    assert not optimizer.state  # Adam moments and step counts start over (official optimizer.init)


def reset_steps(bbf, interval, offset, total=100_000, no_resets_after=100_000):
    """Env steps of the resets and of the skipped resets, with the first one scheduled as in run()."""
    next_reset, resets, skipped = interval + offset, [], []
    for step in range(1, total + 1):
        due_before = step >= next_reset + (offset > 0)
        do, next_reset = bbf.reset_due(step, next_reset, interval, no_resets_after, offset)
        (resets if do else skipped if due_before else []).append(step)
    return resets, skipped


@pytest.mark.parametrize("offset,expected", [
    # 1d4d2f1a: a reset once the clock reaches next_reset, first at 5000, skipped when the next one would be after
    # 100k: k * 5000 for k = 1..19 (k = 20 would need 105,000 <= 100,000)
    (0, list(range(5_000, 95_001, 5_000))),
    # 4c429948 (reset_offset = 1): next_reset starts at 5001 and a reset needs the clock to have *passed* it, so the
    # j-th reset is at j * 5001 + 1 (each interval one env step longer) while j * 5001 + 1 + 5000 <= 100,001: j <= 18
    (1, [j * 5_001 + 1 for j in range(1, 19)]),
])
def test_reset_timing_in_gradient_steps_and_no_resets_after(bbf, offset, expected):
    # RR 8, resets every 40k gradient steps -> every 5000 env steps on the env-step clock; 100k env steps.
    resets, skipped = reset_steps(bbf, round(40_000 / 8), offset)
    assert resets == expected
    assert len(resets) == {0: 19, 1: 18}[offset]  # none at 100k / 95,020: nothing left to recover
    assert skipped == {0: [100_000], 1: [95_020]}[offset]
    updates_between = {(b - a) * 8 for a, b in zip(resets, resets[1:])}
    assert updates_between == {0: {40_000}, 1: {40_008}}[offset]
    # BBF.gin as shipped (RR 2, reset_every = 20_000 env steps): 20k, 40k, 60k, 80k vs 20,002, 40,003, 60,004
    assert reset_steps(bbf, 20_000, offset)[0] == {0: [20_000, 40_000, 60_000, 80_000],
                                                   1: [20_002, 40_003, 60_004]}[offset]
    assert bbf.reset_due(80_000, 80_000, 5_000, 84_999) == (False, 85_000)
    assert bbf.reset_due(80_000, 80_000, 5_000, 85_000) == (True, 85_000)
    assert bbf.reset_due(79_999, 80_000, 5_000, 100_000) == (False, 80_000)  # not yet due
    assert bbf.reset_due(80_000, 80_000, 5_000, 100_000, 1) == (False, 80_000)  # 4c429948: due after 80,000
    assert bbf.reset_due(80_001, 80_000, 5_000, 85_000, 1) == (True, 85_001)  # limit 85,000 + offset


def test_ema_update(bbf):
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in a.parameters():
            p.fill_(1.0)
        for p in b.parameters():
            p.fill_(3.0)
    bbf.ema_update(a, b, 0.005)
    for p in a.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.995 * 1.0 + 0.005 * 3.0), atol=1e-7)
    for p in b.parameters():
        assert torch.equal(p, torch.full_like(p, 3.0))  # the online network is untouched


# --- losses, augmentation ---

def test_spr_loss_cosine_and_masking(bbf):
    e0, e1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    preds = torch.stack([torch.stack([e0, e0, 2 * e0]), torch.stack([e0, e0, e0])])  # (B=2, K=3, D=3)
    targs = torch.stack([torch.stack([5 * e0, e1, -e0]), torch.stack([e1, -e0, e1])])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss = bbf.spr_loss(preds, targs, mask)
    assert loss.shape == (2,)
    # sample 0: 2-2cos = 0 (same direction, any scale), 2 (orthogonal), 4 (opposite) -> mean 2
    # sample 1: step 0 orthogonal (2), steps 1 and 2 masked (0) -> 2 / 3 (the mean runs over all K steps)
    assert torch.allclose(loss, torch.tensor([2.0, 2.0 / 3.0]), atol=1e-6)
    x, y = torch.randn(4, 5, 7), torch.randn(4, 5, 7)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    assert torch.allclose(bbf.spr_loss(x, y, torch.ones(4, 5)), (2 - 2 * cos).mean(1), atol=1e-5)


def test_augmentation_pad_crop_and_intensity(bbf):
    torch.manual_seed(0)
    n, c, h, w = 64, 2, 12, 12
    x = torch.rand(n, c, h, w) + 0.5  # strictly positive, so each image's scale can be recovered
    out = bbf.augment(x)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="replicate")
    offsets = set()
    for i in range(n):
        matches = []
        for oy in range(9):
            for ox in range(9):
                crop = padded[i, :, oy:oy + h, ox:ox + w]
                scale = (out[i] / crop).mean()
                if torch.allclose(out[i], crop * scale, atol=1e-5):
                    matches.append((oy, ox, scale.item()))
        assert matches, f"image {i} is not a scaled crop of the padded input"
        oy, ox, scale = matches[0]
        assert 0.9 - 1e-6 <= scale <= 1.1 + 1e-6  # 1 + 0.05 * clip(N(0,1), -2, 2)
        offsets.add((oy, ox))
    assert max(max(o) for o in offsets) <= 7  # JAX randint(0, 8): offsets 0..7
    assert len(offsets) > 10  # one random offset per image


def test_c51_projection_keeps_mass_and_mean(bbf):
    support = torch.linspace(-10, 10, 51)
    probs = torch.softmax(torch.randn(4, 51), -1)
    rewards, discounts = torch.tensor([0.5, -1.0, 0.0, 3.0]), torch.tensor([0.9, 0.0, 1.0, 0.5])
    target = bbf.project_distribution(rewards[:, None] + discounts[:, None] * support, probs, support)
    assert torch.allclose(target.sum(-1), torch.ones(4), atol=1e-5)
    # a terminal transition puts all mass around the reward
    assert torch.allclose((target[1] * support).sum(), torch.tensor(-1.0), atol=1e-5)


# --- replay ---

def filled_buffer(bbf, rewards, terminated, horizon=10):
    rb = bbf.ReplayBuffer(1000, 1, (4, 2, 2), np.uint8, horizon)
    for t, (r, d) in enumerate(zip(rewards, terminated)):
        obs = np.full((1, 4, 2, 2), t, dtype=np.uint8)
        rb.add(obs, np.array([t % 3]), np.array([r], np.float32), np.array([d]), np.array([False]),
               np.array([t == 0]), np.array([True]))
    return rb


def test_n_step_return_computed_at_sampling_across_an_episode_end(bbf):
    rewards = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0] + [0.0] * 20
    terminated = [False, False, True] + [False] * 24
    rb = filled_buffer(bbf, rewards, terminated)
    rb.priorities[:] = 0.0
    rb.priorities[0, 0] = 1.0  # only row 0 can be drawn
    rng = np.random.default_rng(0)
    (states, actions, returns, discounts, next_states, same, weights), (rows, _) = rb.sample(2, rng, 5, 0.5, 5)
    assert (rows == 0).all()
    assert returns[0] == pytest.approx(1 + 0.5 * 2 + 0.25 * 4)  # stops at the terminal step 2
    assert discounts[0] == 0.0
    assert next_states[0, -1, 0, 0] == 3  # the observation after the terminal step
    assert same[0].tolist() == [1, 1, 1, 0, 0, 0]  # s_3.. come after the episode end
    assert states.shape == (2, 6, 4, 2, 2) and actions[0].tolist() == [0, 1, 2, 0, 1, 2]
    # Row 3 (after the terminal): no terminal ahead, so gamma^n; a new (annealed) n and gamma change the same data.
    rb.priorities[:] = 0.0
    rb.priorities[3, 0] = 1.0
    batch, _ = rb.sample(1, rng, 3, 0.9, 5)
    assert batch[2][0] == pytest.approx(8 + 0.9 * 16 + 0.81 * 32) and batch[3][0] == pytest.approx(0.9**3)
    batch, _ = rb.sample(1, rng, 2, 0.5, 5)
    assert batch[2][0] == pytest.approx(8 + 0.5 * 16) and batch[3][0] == pytest.approx(0.25)
    assert batch[4][0, -1, 0, 0] == 5


def test_prioritized_sampling_and_importance_weights(bbf):
    rb = filled_buffer(bbf, [0.0] * 40, [False] * 40, horizon=5)
    assert rb.sampleable() == 35
    assert np.all(rb.priorities[:40, 0] == 1.0)  # new rows get the max priority so far (initially 1)
    rb.valid[7, 0] = False
    rb.priorities[7, 0] = 0.0  # an auto-reset row: never sampled
    rows = np.array([0, 1, 2])
    rb.update_priorities(rows, np.zeros(3, dtype=np.int64), np.array([4.0, 16.0, 0.25]))
    assert rb.max_priority == 16.0
    assert rb.priorities[2, 0] == 0.25
    rng = np.random.default_rng(0)
    counts = np.zeros(rb.rows)
    for _ in range(300):
        r, e = rb.sample_indices(64, rng, prioritized=True)
        np.add.at(counts, r, 1)
    assert counts[7] == 0 and counts[35:].sum() == 0  # invalid and not-yet-sampleable rows
    total = 4 + 16 + 0.25 + 31 * 1.0  # rows 3..34 except 7 have priority 1
    freq = counts / counts.sum()
    assert freq[1] == pytest.approx(16 / total, rel=0.05)
    assert freq[0] == pytest.approx(4 / total, rel=0.08)
    assert freq[10] == pytest.approx(1 / total, rel=0.3)
    # importance weights: 1/sqrt(p) normalised by the batch max
    rb.priorities[:] = 0.0
    rb.priorities[[1, 2], 0] = [16.0, 0.25]
    batch, (r, _) = rb.sample(32, rng, 3, 0.99, 5, prioritized=True)
    w = batch[6]
    expected = 1 / np.sqrt(rb.priorities[r, 0] + 1e-10)
    assert np.allclose(w, expected / expected.max())
    assert set(np.round(w, 6).tolist()) <= {1.0, 0.125}  # p=0.25 -> 2, p=16 -> 0.25, over the max 2
    # uniform mode ignores priorities but still skips invalid rows
    r, _ = rb.sample_indices(2000, rng, prioritized=False)
    assert 7 not in set(r) and len(set(r)) == 34


def test_batches_to_group_one_stratified_draw_split_in_stratum_order(bbf):
    # BBF.gin's batches_to_group = 2: one draw of 2 x B with one n and gamma, importance weights normalised over the
    # whole draw, split in order into the two updates' batches (docs/bbf_atari.md, detail 5).
    rb = filled_buffer(bbf, [float(t) for t in range(25)], [False] * 25, horizon=5)  # rows 0..19 can be drawn
    rb.priorities[:25, 0] = 0.25
    rb.priorities[:4, 0] = 1.0  # mass 4 x 1 (rows 0-3) + 16 x 0.25 (rows 4-19) = 8: each half holds 4
    draw = rb.sample(16, np.random.default_rng(0), 3, 0.9, 5)
    (first, (rows1, _)), (second, (rows2, _)) = bbf.split_batches(*draw, 2)
    # stratum i of 16 is [0.5 i, 0.5 (i + 1)) of the mass: strata 0-7 fall in rows i // 2, strata 8-15 in row
    # 4 + 2 (i - 8) or the next one
    assert rows1.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(r in (4 + 2 * j, 5 + 2 * j) for j, r in enumerate(rows2.tolist()))
    # weights 1/sqrt(p): 1 for p = 1, 2 for p = 0.25; divided by the draw's max 2 (a batch on its own would give 1)
    assert np.allclose(first[6], 0.5) and np.allclose(second[6], 1.0)
    # one n = 3 and gamma = 0.9 for both: return t + 0.9 (t + 1) + 0.81 (t + 2) of reward r_t = t, discount 0.9^3
    for batch, rows in ((first, rows1), (second, rows2)):
        assert np.allclose(batch[2], rows + 0.9 * (rows + 1) + 0.81 * (rows + 2))
        assert np.allclose(batch[3], 0.729)
        assert batch[0].shape == (8, 6, 4, 2, 2) and all(len(x) == 8 for x in batch)
    # one group: the draw itself
    (whole, (rows, _)), = bbf.split_batches(*draw, 1)
    assert all(np.array_equal(a, b) for a, b in zip(whole, draw[0])) and np.array_equal(rows, draw[1][0])


# --- command line and end to end ---

def run_bbf(tmp_path, name, *flags, timeout=240):
    return run_script(BBF, ["--output-dir", str(tmp_path), "--run-name", name, "--device", "cpu", *flags],
                      cwd=str(tmp_path), timeout=timeout)


TINY = ["--env-id", "Pong-v5", "--width-scale", "1", "--hidden-dim", "16", "--batch-size", "4",
        "--learning-starts", "100", "--total-timesteps", "140", "--replay-ratio", "0.5", "--max-episode-steps", "60",
        "--buffer-size", "1000", "--jumps", "2", "--reset-every", "10", "--no-resets-after", "140",
        "--cycle-steps", "4", "--metrics-every", "5", "--metrics-batch-size", "8", "--log-every", "2",
        "--eval-episodes", "1", "--torch-threads", "1"]


def test_end_to_end_tiny_run(tmp_path):
    proc = run_bbf(tmp_path, "run", *TINY, "--save-model")
    assert proc.returncode == 0, describe(proc)
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert summary["global_step"] == 140
    # replay ratio 0.5 -> one gradient update every 2 env steps after learning starts: steps 101..140 -> 20
    assert summary["num_updates"] == 20
    # resets every 10 / 0.5 = 20 env steps: 20, 40, ..., 120 (140 would leave nothing before no_resets_after)
    assert summary["num_resets"] == 6
    assert len(summary["eval_returns"]) == 1 and math.isfinite(summary["eval_return_mean"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["replay_ratio"] == 0.5 and config["family"] == "atari"
    with open(run_dir / "episodes.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["global_step", "episodic_return", "episodic_length", "task"]
    assert len(rows) >= 2  # 60-step episodes: at least one finished
    scalars = read_scalars(str(run_dir))
    for key in ("bbf/n_step", "bbf/gamma", "bbf/resets", "bbf/spr_loss", "losses/td_loss", "charts/epsilon",
                "plasticity/srank", "plasticity/dormant_tau0", "plasticity/grad_inactive_tau0.1",
                "eval/episodic_return"):
        assert key in scalars, f"{key} not logged; got {sorted(scalars)}"
    assert {v for _, v in scalars["bbf/n_step"]} <= set(range(3, 11)) and max(v for _, v in scalars["bbf/n_step"]) > 3
    assert max(v for _, v in scalars["bbf/resets"]) == 6
    # the checkpoint evaluates on its own
    proc = run_bbf(tmp_path, "eval", *TINY, "--eval-checkpoint", str(run_dir / "model.pt"))
    assert proc.returncode == 0, describe(proc)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["status"] == "completed"


def test_grouped_batches_and_reset_offset_end_to_end(tmp_path):
    flags = TINY[:TINY.index("--replay-ratio")] + TINY[TINY.index("--replay-ratio") + 2:]
    proc = run_bbf(tmp_path, "group", *flags, "--replay-ratio", "2", "--reset-every", "40", "--batches-to-group", "2",
                   "--reset-offset", "1", "--metrics-every", "0", "--eval-episodes", "0", "--log-every", "1")
    assert proc.returncode == 0, describe(proc)
    summary = json.loads((tmp_path / "group" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_updates"] == 80  # env steps 101..140, 2 updates each
    # resets every 40 / 2 = 20 env steps, 4c429948's clock: 22, 43, 64, 85, 106 (127 would need 147 <= 140 + 1)
    assert summary["num_resets"] == 5
    # a group's two updates share the n of its draw, drawn at cycle steps 0, 2, 4, ...: never n(1) = 7 or n(3) = 4
    assert {v for _, v in read_scalars(str(tmp_path / "group"))["bbf/n_step"]} == {10, 5, 3}


def test_bad_input_is_one_line_error(tmp_path):
    proc = run_bbf(tmp_path, "bad", "--env-id", "CartPole-v1", timeout=120)
    assert_one_line_error(proc, "Atari", "CartPole-v1")


@pytest.mark.parametrize("changes,fragment", [
    (dict(env_id="Pongg-v5"), "did you mean: Pong-v5"),
    (dict(env_id="Pong-v5", n_step=12), "--n-step"),
    (dict(env_id="Pong-v5", min_gamma=0.999), "--min-gamma"),
    (dict(env_id="Pong-v5", buffer_size=10), "--buffer-size"),
    (dict(env_id="Pong-v5", replay_ratio=0.5, batches_to_group=2), "--batches-to-group"),
    (dict(env_id="Pong-v5", replay_ratio=8, batches_to_group=3), "--batches-to-group"),
    (dict(env_id="Pong-v5", batches_to_group=0), "--batches-to-group"),
    (dict(env_id="Pong-v5", reset_offset=-1), "--reset-offset"),
])
def test_bad_flags_are_user_errors(bbf, changes, fragment):
    with pytest.raises(bbf.UserError, match=fragment.replace("(", r"\(")):
        bbf.resolve_args(bbf.Args(**changes))


def test_non_finite_loss_is_diverged(tmp_path):
    proc = run_bbf(tmp_path, "div", *TINY[:-8], "--eval-episodes", "0", "--metrics-every", "0",
                   "--learning-rate", "1e30", "--no-prioritized", "--torch-threads", "1")
    assert proc.returncode == 3, describe(proc)
    assert "diverged" in proc.stderr
    summary = json.loads((tmp_path / "div" / "summary.json").read_text())
    assert summary["status"] == "diverged"
