"""Percentile-bootstrap intervals over items (latents, concepts), and the verdict built on
them: does a score separate two sets of items (trained vs untrained SAE latents)?

The bootstrap resamples the items with replacement, `n_resamples` times, and takes the
(1 - level)/2 and (1 + level)/2 quantiles of the statistic over the resamples (Efron's
percentile interval). Two samples are resampled independently of each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from visae.errors import VisaeError

Statistic = Callable[..., Any]
"""statistic(x, axis=-1): reduces the last axis, as np.mean and np.median do."""

# resampled items held at once (8 bytes each): bounded memory for any number of items
_BLOCK_ITEMS = 2**22


def bootstrap_ci(
    values: Any,
    statistic: Statistic = np.mean,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(statistic of `values`, lower, upper bound of its `level` percentile interval)."""
    x = _items(values, "values")
    _check(n_resamples, level)
    rng = np.random.default_rng(seed)
    lo, hi = _interval(_resampled(x, statistic, n_resamples, rng), level)
    return float(statistic(x, axis=-1)), lo, hi


def difference_ci(
    a_values: Any,
    b_values: Any,
    statistic: Statistic = np.mean,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(statistic(a) - statistic(b), lower, upper bound of its `level` percentile interval),
    a and b resampled independently."""
    a, b = _items(a_values, "a_values"), _items(b_values, "b_values")
    _check(n_resamples, level)
    rng = np.random.default_rng(seed)
    diff = _resampled(a, statistic, n_resamples, rng) - _resampled(b, statistic, n_resamples, rng)
    lo, hi = _interval(diff, level)
    return float(statistic(a, axis=-1) - statistic(b, axis=-1)), lo, hi


def separates(
    a_values: Any,
    b_values: Any,
    statistic: Statistic = np.mean,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> bool:
    """Whether the interval of statistic(a) - statistic(b) excludes 0: the "separates trained
    from untrained" verdict."""
    _, lo, hi = difference_ci(a_values, b_values, statistic, n_resamples, level, seed)
    return lo > 0 or hi < 0


def _items(values: Any, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise VisaeError(f"{name} must be one-dimensional, got shape {x.shape}")
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise VisaeError(
            f"{name} holds {bad} NaN or infinite value(s): drop undefined items "
            "(e.g. dead latents) first"
        )
    if len(x) < 2:
        raise VisaeError(f"{name} has {len(x)} item(s): a bootstrap needs at least 2")
    return x


def _check(n_resamples: int, level: float) -> None:
    if n_resamples < 1:
        raise VisaeError(f"n_resamples must be positive, not {n_resamples}")
    if not 0 < level < 1:
        raise VisaeError(f"level must be between 0 and 1, not {level}")


def _resampled(
    x: np.ndarray, statistic: Statistic, n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """[n_resamples] statistic of resamples of x, a block of resamples at a time."""
    out = np.empty(n_resamples)
    block = max(1, _BLOCK_ITEMS // len(x))
    for start in range(0, n_resamples, block):
        m = min(block, n_resamples - start)
        stats = np.asarray(statistic(x[rng.integers(0, len(x), size=(m, len(x)))], axis=-1))
        if stats.shape != (m,):
            raise VisaeError("statistic must reduce the last axis, as np.mean(x, axis=-1) does")
        out[start : start + m] = stats
    return out


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
