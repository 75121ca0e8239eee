"""TAPAScore: hand-built pairs against a hand computation (swap, add, removal-only, empty and
overlapping coalitions, leakage, per concept), the maxima on perfectly aligned codes with the
coalitions found by matching, frozen-like baselines near 0, and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from visae.errors import VisaeError
from visae.eval.matching import match_concepts
from visae.eval.tapa import ConceptTapa, tapa_score

# concept -> coalition: 0 and 1 share latent 1, concept 2 has an empty coalition
COALITIONS = {0: [0, 1], 1: [1, 2], 2: [], 3: [4], 4: [5]}
# pair: (old, new, first image's codes, second image's codes); b(z) = 1[z > 0]
PAIRS = [
    (0, 1, [1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 1]),  # swap, both sides move: +1, -1
    (0, 1, [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]),  # swap, nothing moves: 0, 0
    (None, 3, [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0.2, 0]),  # addition: +1, 0
    (3, 2, [0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]),  # swap into an empty coalition: 0, -1
    (4, None, [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]),  # removal missed: Delta_rem 0
    (3, -1, [0, 0, 0, 0, 1e-9, 0], [0, 0, 0, 0, 0, 0]),  # removal (1e-9 > 0 is on): -1
    (4, None, [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]),  # removal backwards: +1
    (3, None, [0, 0, 0, 0, 0.3, 0], [0, 0, 0, 0, 0, 0]),  # removal: -1
]
# first images' present concepts, for leakage (old and new are never counted)
PRESENT = {0: [0, 1, 3, 4], 1: [0, 2], 3: [3, 1]}


def hand_inputs() -> tuple[np.ndarray, np.ndarray, list, list, np.ndarray]:
    old = [p[0] for p in PAIRS]
    new = [p[1] for p in PAIRS]
    first = np.array([p[2] for p in PAIRS], dtype=np.float64)
    second = np.array([p[3] for p in PAIRS], dtype=np.float64)
    present = np.zeros((len(PAIRS), 5), dtype=bool)
    for pair, concepts in PRESENT.items():
        present[pair, concepts] = True
    return first, second, old, new, present


def test_hand_built_pairs_equal_the_hand_computation() -> None:
    first, second, old, new, present = hand_inputs()
    for a, b in ((first, second), (sp.csr_array(first), sp.csr_array(second))):
        result = tapa_score(a, b, old, new, COALITIONS, present)
        assert result.kind_P.tolist() == ["swap", "swap", "add", "swap"] + ["remove"] * 4
        # I_rem(0 -> 1) = {0}, I_add(0 -> 1) = {2}: latent 1, in both, never counts
        np.testing.assert_array_equal(result.delta_add_P, [1, 0, 1, 0, 0, 0, 0, 0])
        np.testing.assert_array_equal(result.delta_rem_P, [-1, 0, 0, -1, 0, -1, 1, -1])
        # swap/add: mean(Delta_add) - mean(Delta_rem) = 2/4 - (-2/4); removal: -(-1/4)
        assert result.swap_add == pytest.approx(1.0)
        assert result.removal == pytest.approx(0.25)
        assert (result.n_swap_add, result.n_removal) == (4, 4)
        # pair 0: others {3, 4} (1 is new): |Delta| 0 over {4}, 1 over {5}; pair 1: other {2}
        # has an empty coalition; pair 3: other {1}: latent 2 goes off, |-1|; the rest have
        # no other present concept
        np.testing.assert_array_equal(np.isnan(result.leakage_P), [0, 1, 1, 0, 1, 1, 1, 1])
        np.testing.assert_allclose(result.leakage_P[[0, 3]], [0.5, 1.0])
        assert result.leakage == pytest.approx(0.75)
        assert result.per_concept == {
            0: ConceptTapa(2, 1.0, 0, None),
            1: ConceptTapa(2, 1.0, 0, None),
            2: ConceptTapa(1, 1.0, 0, None),
            3: ConceptTapa(2, 1.0, 2, 1.0),
            4: ConceptTapa(0, None, 2, -0.5),
        }
    no_present = tapa_score(first, second, old, new, COALITIONS)
    assert no_present.leakage is None and np.isnan(no_present.leakage_P).all()


def test_kinds_are_reported_apart() -> None:
    first, second, old, new, _ = hand_inputs()
    removal_only = tapa_score(first[4:], second[4:], old[4:], new[4:], COALITIONS)
    assert removal_only.swap_add is None and removal_only.removal == pytest.approx(0.25)
    swaps_only = tapa_score(first[:4], second[:4], old[:4], new[:4], COALITIONS)
    assert swaps_only.removal is None and swaps_only.swap_add == pytest.approx(1.0)


def scenes(rng: np.random.Generator, n: int, n_concepts: int, n_noise: int):
    """Images with concepts on 30% of them; concept c fires one or both of latents 2c, 2c+1,
    and noise latents fire on 10% of images."""
    present = rng.random((n, n_concepts)) < 0.3
    which = rng.integers(1, 4, (n, n_concepts))  # bit 1: latent 2c, bit 2: latent 2c+1
    codes = np.zeros((n, 2 * n_concepts + n_noise))
    codes[:, 0 : 2 * n_concepts : 2] = present & (which & 1 > 0)
    codes[:, 1 : 2 * n_concepts : 2] = present & (which & 2 > 0)
    codes[:, 2 * n_concepts :] = rng.random((n, n_noise)) < 0.1
    return codes * rng.uniform(0.5, 2.0, codes.shape), present


def edit(rng: np.random.Generator, codes: np.ndarray, present: np.ndarray, swap: bool):
    """Pairs changing one present concept: the old one's latents go off, and for a swap one
    latent of an absent concept comes on; every other latent stays."""
    n = len(present)
    old = np.array([rng.choice(np.flatnonzero(row)) for row in present])
    second = codes.copy()
    second[np.arange(n), 2 * old] = 0
    second[np.arange(n), 2 * old + 1] = 0
    new = np.full(n, -1)
    if swap:
        new = np.array([rng.choice(np.flatnonzero(~row)) for row in present])
        second[np.arange(n), 2 * new + rng.integers(0, 2, n)] = 1.0
    return second, old, new


@pytest.mark.parametrize("swap", [True, False])
def test_aligned_codes_reach_the_maximum_and_frozen_like_codes_score_near_zero(swap: bool) -> None:
    rng = np.random.default_rng(0)
    n_concepts = 10
    codes, labels = scenes(rng, 1000, n_concepts, 100)
    coalitions = match_concepts(codes, labels).coalitions(3)
    assert all(set(coalitions[c]) == {2 * c, 2 * c + 1} for c in range(n_concepts))

    first, present = scenes(rng, 600, n_concepts, 100)
    keep = present.any(axis=1)
    first, present = first[keep], present[keep]
    second, old, new = edit(rng, first, present, swap)
    aligned = tapa_score(first, second, old, new, coalitions, present)
    assert (aligned.swap_add, aligned.removal) == ((2.0, None) if swap else (None, 1.0))
    assert aligned.leakage == 0.0
    assert all(
        (c.swap_add if swap else c.removal) == (2.0 if swap else 1.0)
        for c in aligned.per_concept.values()
    )

    # the same latent permutation on both images: coalitions point at unrelated latents
    perm = rng.permutation(first.shape[1])
    permuted = tapa_score(first[:, perm], second[:, perm], old, new, coalitions, present)
    # codes that ignore the edit (a few bits flip at random), coalitions matched on such codes
    random_codes = rng.random((1000, first.shape[1])) < 0.1
    random_coalitions = match_concepts(random_codes, labels).coalitions(3)
    ignores = rng.random(first.shape) < 0.1
    flips = ignores ^ (rng.random(first.shape) < 0.02)
    frozen = tapa_score(ignores, flips, old, new, random_coalitions, present)
    for result in (permuted, frozen):
        assert abs(result.swap_add if swap else result.removal) < 0.15


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"second": np.zeros((8, 5))},
            r"first-image codes \(8, 6\) and second-image codes \(8, 5\)",
        ),
        (
            {"old": [None] + [0] * 7, "new": [None] + [1] * 7},
            r"pair 0: old and new concept are both",
        ),
        ({"new": [1, 0, 3, 2, None, None, None, None]}, r"pair 1: old and new concept are the sam"),
        ({"new": [1, 1, 9, 2, None, None, None, None]}, r"pair 2: concept 9 has no matched coal"),
        ({"old": [0, 0, None, 3, -4, 3, 4, 3]}, r"pair 4: old concept -4 is not a concept index"),
        ({"old": [0, 0]}, r"2 old concepts for 8 pairs"),
        (
            {"coalitions": {**COALITIONS, 2: [6]}},
            r"coalition of concept 2 holds latent outside 0..5",
        ),
        (
            {"present": np.zeros((7, 5))},
            r"present concepts must be \[pairs=8, concepts\], got \(7, 5\)",
        ),
        ({"present": np.full((8, 5), 0.5)}, r"present concepts must be 0/1"),
        ({"first": np.full((8, 6), np.nan)}, r"first-image codes hold NaN or infinite values"),
        ({"first": np.zeros(6)}, r"first-image codes must be a 2-D \[pairs, latents\] array"),
    ],
)
def test_bad_input_gives_one_line_errors(change: dict, message: str) -> None:
    first, second, old, new, present = hand_inputs()
    args = {"first": first, "second": second, "old": old, "new": new}
    args |= {"coalitions": COALITIONS, "present": present} | change
    with pytest.raises(VisaeError, match=message) as err:
        tapa_score(
            args["first"],
            args["second"],
            args["old"],
            args["new"],
            args["coalitions"],
            args["present"],
        )
    assert "\n" not in str(err.value)
