"""The streaming family (algos/stream_q.py, algos/stream_ac.py) carries the stream-x pieces twice, by design
(standalone scripts): ObGD, sparse initialisation, the parameter-free LayerNorm, the Welford statistics, the
observation normaliser, the reward scaler and the time feature. The copies must not drift apart (as MinAtarVecEnv in
tests/test_minatar.py); their behaviour is tested against hand computations in tests/test_stream_q.py and
tests/test_stream_ac.py."""

from __future__ import annotations

import inspect
import re

from helpers import load_script

SHARED = ["LayerNormNoAffine", "sparse_init_", "ObGD", "SampleMeanStd", "ObservationNormalizer", "RewardScaler",
          "time_feature"]


def normalised(source: str) -> str:
    return re.sub(r"docs/stream_(q|ac)\.md", "DOCS", source)


def test_the_stream_x_pieces_are_identical_in_both_scripts():
    q, ac = load_script("stream_q"), load_script("stream_ac")
    for name in SHARED:
        assert normalised(inspect.getsource(getattr(q, name))) == normalised(inspect.getsource(getattr(ac, name))), name


def test_both_scripts_default_to_the_official_stream_x_settings():
    q, ac = load_script("stream_q").Args(), load_script("stream_ac").Args()
    for args in (q, ac):
        assert (args.learning_rate, args.gamma, args.trace_lambda, args.sparsity) == (1.0, 0.99, 0.8, 0.9)
        assert args.optimizer == "obgd" and args.layer_norm and args.sparse_init and args.num_envs == 1
        assert args.normalize_observations and args.scale_rewards and args.truncation_bootstraps
    assert q.kappa == 2.0 and (ac.kappa_policy, ac.kappa_value, ac.entropy_coef) == (3.0, 2.0, 0.01)
