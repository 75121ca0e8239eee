"""Means with bootstrap intervals and the verdict they support, for the VLM's rates."""

from __future__ import annotations

from typing import Any

import numpy as np


def mean_interval(values: Any, boot: int, rng: np.random.Generator) -> dict[str, float]:
    """Mean over units with a 95% bootstrap interval over units (NaN when there are none)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    means = x[rng.integers(0, len(x), (boot, len(x)))].mean(axis=1)
    return {
        "mean": float(x.mean()),
        "lo": float(np.quantile(means, 0.025)),
        "hi": float(np.quantile(means, 0.975)),
        "n": len(x),
    }


def verdict(diff: dict[str, float]) -> str:
    """What the interval of a paired difference (model - baseline) says."""
    if not diff["n"] or not np.isfinite(diff["lo"]):
        return "not measured"
    if diff["lo"] > 0:
        return "above baseline"
    if diff["hi"] < 0:
        return "below baseline"
    return "indistinguishable from baseline"
