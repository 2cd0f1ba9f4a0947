"""Tiny budgets for running every script in algos/ end to end (tests/test_standalone.py).

Each entry is a run of a few hundred steps that still reaches the learning updates, the diagnostics and the
evaluation. Every new script in algos/ must add an entry here (test_standalone.py fails until it does).
"""

TINY_ARGS = {
    "dqn.py": ["--env-id", "CartPole-v1", "--total-timesteps", "600", "--learning-starts", "200",
               "--buffer-size", "1000", "--batch-size", "32", "--eval-episodes", "2", "--metrics-every", "10",
               "--log-every", "10", "--device", "cpu"],
}
