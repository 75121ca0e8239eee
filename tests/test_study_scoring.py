"""The study's scoring: chance-anchored scores whose random responder sits at 0 and oracle at 1,
a noisy oracle in between, checked by simulated observers; the two-level bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from visae.errors import VisaeError
from visae.study.observers import click, pick
from visae.study.scoring import aggregate, anchored, localization_trial, map_value, naming_trial


def _maps(n: int, seed: int = 0) -> list[np.ndarray]:
    """Sparse SAE-like activation maps: a few patches of a 16x16 grid fire, one peak."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros((16, 16), np.float32)
        r, c = rng.integers(0, 16, 2)
        m[max(0, r - 2) : r + 3, max(0, c - 2) : c + 3] = rng.random((5, 5))[
            : min(16, r + 3) - max(0, r - 2), : min(16, c + 3) - max(0, c - 2)
        ]
        m[r, c] = 2.0
        out.append(m)
    return out


def _localization(skill: float, n: int = 4000, seed: int = 1) -> float:
    rng = np.random.default_rng(seed)
    scores = []
    for m in _maps(n):
        raw, chance = localization_trial(m, [click(m, skill, rng)])
        scores.append(anchored(raw, chance))
    return float(np.mean(scores))


def _naming(skill: float, n: int = 4000, choices: int = 4, seed: int = 2) -> float:
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(n):
        correct = int(rng.integers(0, choices))
        raw, chance = naming_trial(pick(correct, choices, skill, rng), correct, choices)
        scores.append(anchored(raw, chance))
    return float(np.mean(scores))


@pytest.mark.parametrize("protocol", [_localization, _naming])
def test_random_scores_zero_oracle_one_noisy_in_between(protocol) -> None:
    assert abs(protocol(0.0)) < 0.05
    assert protocol(1.0) == pytest.approx(1.0, abs=1e-9)
    assert 0.4 < protocol(0.5) < 0.6


def test_trial_scores_by_hand() -> None:
    m = np.zeros((2, 2))
    m[0, 1] = 4.0
    m[1, 1] = 1.0
    assert map_value(m, 0.75, 0.25) == 4.0 and map_value(m, 0.6, 0.9) == 1.0
    raw, chance = localization_trial(m, [(0.75, 0.25), (0.75, 0.75)])
    assert raw == pytest.approx((4 + 1) / 2 / 4) and chance == pytest.approx(5 / 4 / 4)
    assert naming_trial(2, 2, 5) == (1.0, 0.2)
    assert anchored(np.array([0.2, 1.0, 0.0]), np.array([0.2, 0.2, 0.2])).tolist() == [
        0.0,
        1.0,
        -0.25,
    ]
    assert np.isnan(anchored(np.array([1.0]), np.array([1.0]))[0])  # chance is already perfect


def test_bad_trials_are_one_line_errors() -> None:
    with pytest.raises(VisaeError, match="outside the image"):
        localization_trial(np.ones((2, 2)), [(1.2, 0.5)])
    with pytest.raises(VisaeError, match="does not fire"):
        localization_trial(np.zeros((2, 2)), [(0.5, 0.5)])
    with pytest.raises(VisaeError, match="at least one click"):
        localization_trial(np.ones((2, 2)), [])
    with pytest.raises(VisaeError, match="not one of 3 choices"):
        naming_trial(3, 0, 3)
    with pytest.raises(VisaeError, match="differ in length"):
        aggregate(np.ones(3), ["a"] * 2, ["f"] * 3)


def test_the_bootstrap_resamples_features_and_participants() -> None:
    rng = np.random.default_rng(0)
    features = [f"f{j}" for j in range(30) for _ in range(20)]
    participants = [f"p{i}" for _ in range(30) for i in range(20)]
    # per-feature true scores spread widely; participants add small noise
    truth = np.repeat(rng.uniform(0, 1, 30), 20)
    scores = truth + rng.normal(0, 0.05, len(truth))
    result = aggregate(scores, participants, features, boot=500)
    assert result.mean == pytest.approx(float(np.mean(scores)), abs=1e-9)
    assert result.n_features == 30 and result.n_participants == 20
    assert result.lo < truth.mean() < result.hi
    # the spread of features dominates: the interval is about that of 30 feature means
    se = truth.reshape(30, 20)[:, 0].std(ddof=1) / np.sqrt(30)
    assert 2.5 * se < result.hi - result.lo < 6 * se
    one = aggregate(np.full(6, 0.3), ["a", "b", "c"] * 2, ["f", "g"] * 3, boot=50)
    assert (one.mean, one.lo, one.hi) == pytest.approx((0.3, 0.3, 0.3))


def test_the_bootstrap_survives_a_sparse_design() -> None:
    # each participant answered a few features only (as when trials_per_participant is small):
    # many resamples draw features none of the drawn participants answered; they count for
    # nothing rather than dividing by zero
    features = [f"f{j}" for j in range(16)]
    participants = [f"p{j // 4}" for j in range(16)]
    scores = np.linspace(0, 1, 16)
    result = aggregate(scores, participants, features, boot=2000, seed=3)
    assert result.mean == pytest.approx(0.5)
    assert result.lo < 0.5 < result.hi and result.n_participants == 4
    alone = aggregate(np.array([0.7]), ["p"], ["f"], boot=20)
    assert (alone.mean, alone.lo, alone.hi) == pytest.approx((0.7, 0.7, 0.7))
