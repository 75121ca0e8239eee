"""Learning-rate and sparsity-coefficient schedules, as pure functions of the step so that a
resumed run follows exactly the same curve."""

from __future__ import annotations

import math

LR_DECAYS = ("cosine", "linear", "constant")


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, decay: str, decay_start: float
) -> float:
    """Multiplier of the base learning rate at `step` (0-based): linear warm-up from ~0 to 1
    over `warmup_steps`, flat, then decay to 0 from `decay_start` (a fraction of the run)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    start = max(warmup_steps, int(decay_start * total_steps))
    if step < start or total_steps <= start:
        return 1.0
    progress = min(1.0, (step - start) / (total_steps - start))
    if decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def sparsity_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the L1/L0 coefficient: linear from 1/warmup to exactly 1 at the end of the
    warm-up, and 1 for every later step (the full penalty does reach the loss)."""
    if warmup_steps <= 0 or step >= warmup_steps - 1:
        return 1.0
    return (step + 1) / warmup_steps
