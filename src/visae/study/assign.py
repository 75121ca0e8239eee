"""Which trials each participant gets, in which order: counterbalanced so that every feature x
protocol pair is answered by as many participants as any other, whatever the arrival order.

The study's main trials (its units) are put in one seeded order; participant n (0, 1, 2, ...
in arrival order) takes the next `trials_per_participant` units of that order, wrapping
around, so after `m` participants every unit has been assigned floor or ceil of
m * T / U times. Each participant's trials are then shuffled with their own seed, practice
first, attention checks at random places among the main trials (never first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from visae.study.trials import FeatureTrials, Plan

KINDS = ("practice", "main", "check")


@dataclass(frozen=True)
class Trial:
    """One trial as stored: what is shown and, for scoring, what is right (`payload`)."""

    kind: str  # practice | main | check
    protocol: str  # localize | name (a check is a localize trial with a known answer)
    sae: str = ""
    latent: int = -1
    payload: dict[str, Any] = field(default_factory=dict)


def _feature_trial(kind: str, protocol: str, t: FeatureTrials) -> Trial:
    payload: dict[str, Any] = {"references": list(t.references)}
    if protocol == "localize":
        payload["query"] = t.query
    else:
        payload |= {"choices": list(t.choices), "correct": t.correct}
    return Trial(kind, protocol, t.feature.sae, t.feature.latent, payload)


def check_trial(seed: int) -> Trial:
    """An instructed-response check: click inside the green circle drawn on a noise image.
    The circle (centre and radius in image fractions) is the known answer."""
    rng = np.random.default_rng(seed)
    r = float(rng.uniform(0.1, 0.16))
    cx, cy = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, 2))
    return Trial("check", "localize", payload={"circle": [cx, cy, r], "seed": seed})


def participant_trials(plan: Plan, index: int) -> list[Trial]:
    """The trials of the `index`-th participant (0-based, arrival order)."""
    spec = plan.spec
    units = plan.units
    order = np.random.default_rng(spec.seed).permutation(len(units))
    t = spec.trials_per_participant
    mine = [units[int(order[(index * t + i) % len(units)])] for i in range(t)]
    rng = np.random.default_rng([spec.seed, index])
    main = [_feature_trial("main", p, plan.features[f]) for f, p in mine]
    main = [main[int(k)] for k in rng.permutation(len(main))]
    for c in range(spec.attention_checks):
        at = int(rng.integers(1, len(main) + 1))
        main.insert(at, check_trial(spec.seed * 7_919 + index * 101 + c))
    protocols = spec.protocols
    practice = [
        _feature_trial("practice", protocols[k % len(protocols)], f)
        for k, f in enumerate(plan.practice)
    ]
    return practice + main


def circle_hit(circle: list[float], x: float, y: float) -> bool:
    cx, cy, r = circle
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
