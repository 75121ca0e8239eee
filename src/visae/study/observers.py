"""Simulated observers, the scoring's validity check: a random responder must score 0, an oracle
(who reads the true activation map, or knows the right image) 1, and a noisy oracle in
between, on the same trials a person would get."""

from __future__ import annotations

import numpy as np


def click(activation: np.ndarray, skill: float, rng: np.random.Generator) -> tuple[float, float]:
    """A click in [0, 1)^2: with probability `skill` at the centre of the map's peak patch
    (the oracle), else uniformly at random."""
    h, w = activation.shape
    if rng.random() < skill:
        row, col = np.unravel_index(int(np.argmax(activation)), activation.shape)
        return (col + 0.5) / w, (row + 0.5) / h
    return float(rng.random()), float(rng.random())


def pick(correct: int, n_choices: int, skill: float, rng: np.random.Generator) -> int:
    """With probability `skill` the right image (the oracle), else one uniformly at random."""
    if rng.random() < skill:
        return correct
    return int(rng.integers(0, n_choices))
