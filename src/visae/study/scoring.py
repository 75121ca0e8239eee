"""Scores of human interpretability trials (Colin et al.), chance-anchored so that every model
sits on one scale: S = (s - s_chance) / (s_max - s_chance), 0 for a random responder and 1 for
a perfect one, per trial; aggregated per feature, SAE and model with 95% bootstrap intervals
that resample participants and features (two levels), since both are samples.

Localizability: the participant clicks where they expect the feature to fire on a new image;
the raw score of a click is the feature's true activation there over its maximum on that image
(1 at the peak), several clicks averaged; chance is the expected raw score of a uniformly random
click, the map's mean over its maximum. Nameability: the participant picks which of N images
the feature fires on; raw 1 or 0, chance 1/N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from visae.errors import VisaeError


def map_value(activation: np.ndarray, x: float, y: float) -> float:
    """The activation map (`[h, w]` patches) at a click in image coordinates `x, y` in [0, 1)
    (the patch the click falls in)."""
    if not (0 <= x < 1 and 0 <= y < 1):
        raise VisaeError(f"click ({x:.3f}, {y:.3f}) is outside the image")
    h, w = activation.shape
    return float(activation[int(y * h), int(x * w)])


def localization_trial(
    activation: np.ndarray, clicks: Sequence[tuple[float, float]]
) -> tuple[float, float]:
    """(raw score, chance) of one localizability response (module docstring)."""
    peak = float(activation.max())
    if not peak > 0:
        raise VisaeError("the feature does not fire on the trial's image: nothing to localize")
    if not clicks:
        raise VisaeError("a localizability response needs at least one click")
    raw = float(np.mean([map_value(activation, x, y) for x, y in clicks])) / peak
    return raw, float(activation.mean()) / peak


def naming_trial(picked: int, correct: int, n_choices: int) -> tuple[float, float]:
    """(raw score, chance) of one pick among `n_choices` images."""
    if n_choices < 2:
        raise VisaeError(f"a naming trial needs at least 2 choices, not {n_choices}")
    if not (0 <= picked < n_choices and 0 <= correct < n_choices):
        raise VisaeError(f"pick {picked} or answer {correct} is not one of {n_choices} choices")
    return float(picked == correct), 1.0 / n_choices


def anchored(raw: np.ndarray, chance: np.ndarray, best: float = 1.0) -> np.ndarray:
    """S = (s - s_chance) / (s_max - s_chance); NaN where chance is already the best score
    (the trial cannot tell a person from a coin)."""
    raw, chance = np.asarray(raw, float), np.asarray(chance, float)
    span = best - chance
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(span > 1e-12, (raw - chance) / span, np.nan)


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n_participants: int
    n_features: int


def aggregate(
    scores: np.ndarray,
    participants: Sequence[str],
    features: Sequence[str],
    boot: int = 2000,
    seed: int = 0,
) -> Interval:
    """The mean anchored score (over features of the per-feature means) with a 95% two-level
    bootstrap interval: resample features, then participants, and keep the trials of both."""
    s = np.asarray(scores, float)
    if not (len(s) == len(participants) == len(features)):
        raise VisaeError("scores, participants and features differ in length")
    keep = np.isfinite(s)
    s = s[keep]
    p = np.asarray(participants, dtype=object)[keep]
    f = np.asarray(features, dtype=object)[keep]
    if len(s) == 0:
        raise VisaeError("no scorable trial")
    p_ids, p_idx = np.unique(p, return_inverse=True)
    f_ids, f_idx = np.unique(f, return_inverse=True)
    # trial sums and counts per (feature, participant) cell: a resample only reweights cells
    sums = np.zeros((len(f_ids), len(p_ids)))
    counts = np.zeros_like(sums)
    np.add.at(sums, (f_idx, p_idx), s)
    np.add.at(counts, (f_idx, p_idx), 1)

    def mean_of(fw: np.ndarray, pw: np.ndarray) -> float:
        total = (sums * pw[None]).sum(axis=1)
        n = (counts * pw[None]).sum(axis=1)
        # features drawn whose trials all came from participants not drawn have no mean
        has = (n > 0) & (fw > 0)
        return float(np.average(total[has] / n[has], weights=fw[has])) if has.any() else np.nan

    point = mean_of(np.ones(len(f_ids)), np.ones(len(p_ids)))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(boot):
        fw = np.bincount(rng.integers(0, len(f_ids), len(f_ids)), minlength=len(f_ids))
        pw = np.bincount(rng.integers(0, len(p_ids), len(p_ids)), minlength=len(p_ids))
        draws.append(mean_of(fw.astype(float), pw.astype(float)))
    draws_arr = np.asarray(draws)
    draws_arr = draws_arr[np.isfinite(draws_arr)]
    lo, hi = np.quantile(draws_arr, [0.025, 0.975]) if len(draws_arr) else (np.nan, np.nan)
    return Interval(
        point,
        float(lo),
        float(hi),
        len(p_ids),
        len(f_ids),
    )
