"""visae.eval.monosemanticity and visae.eval.bootstrap: the linear-time MS against the pair loop
and a hand computation, its invariances and undefined cases, chunked and sparse input, the
chance level, and the bootstrap's coverage and verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sae_helpers import one_thread  # noqa: F401  (autouse fixture)

from visae.errors import VisaeError
from visae.eval.bootstrap import bootstrap_ci, difference_ci, separates
from visae.eval.monosemanticity import (
    chance_level,
    monosemanticity,
    monosemanticity_pairs,
)


def hard_acts(n: int, n_lat: int, seed: int) -> np.ndarray:
    """Random activations with every case the linear form must get right: negative values,
    ties, sparse columns, one strong image among tiny ones, two tied maxima, dead columns
    (constant, never firing) and columns above their minimum on a single image."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n_lat))
    special = [
        np.full(n, 3.5),  # dead: constant
        np.zeros(n),  # dead: never fires
        np.eye(n)[n // 2] * 2.0,  # one image
        -1.0 + np.eye(n)[0] * 0.5,  # one image, negative values
        np.round(rng.normal(size=n)),  # ties everywhere
        np.where(rng.random(n) < 0.2, rng.exponential(size=n), 0.0),  # sparse, >= 0
        np.where(rng.random(n) < 0.5, -rng.exponential(size=n), 0.0),  # sparse, <= 0
        np.eye(n)[0] + 1e-12 * (np.arange(n) % 3 == 1),  # one strong image, tiny others
        np.eye(n)[0] + np.eye(n)[n - 1],  # two tied maxima
        np.where(rng.random(n) < 0.5, rng.normal(size=n), 0.0),  # sparse, both signs
        np.eye(n)[0] - np.eye(n)[n - 1],  # one image above 0, one below: zeros weigh 1/2
    ]
    for j, column in enumerate(special[:n_lat]):
        a[:, j] = column
    return a


@pytest.mark.parametrize(
    ("n", "n_lat", "dim"), [(2, 11, 3), (7, 11, 4), (60, 15, 16), (300, 12, 8)]
)
def test_linear_form_equals_pair_loop(n: int, n_lat: int, dim: int) -> None:
    acts = hard_acts(n, n_lat, seed=n)
    emb = np.random.default_rng(n + 1).normal(size=(n, dim)) + 0.5
    ref = monosemanticity_pairs(acts, emb)
    res = monosemanticity(acts, emb, progress=False)
    np.testing.assert_array_equal(np.isnan(ref), ~res.live)
    np.testing.assert_allclose(res.score, ref, rtol=1e-6, atol=1e-12)
    # the two named cases are told apart; never-firing columns are dead, not single-image
    assert res.dead[:2].all() and not res.single_image[:2].any()
    if n > 2:
        assert res.single_image[2:4].all() and not res.dead[2:4].any()
        assert res.live[[7, 8, 10]].all()
    else:  # two images: one pair, and one of its images has a~ = 0
        assert not res.live.any()


def test_one_strong_image_keeps_its_digits() -> None:
    """The plain (||V||^2 - Q) / (S^2 - Q) loses ~1e-4 of relative accuracy here."""
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(200, 8)) + 2.0
    acts = np.zeros((200, 1))
    acts[0] = 1.0
    acts[1:20, 0] = 1e-12 * rng.random(19)
    ref = monosemanticity_pairs(acts, emb)
    np.testing.assert_allclose(monosemanticity(acts, emb).score, ref, rtol=1e-9)


def test_hand_computed() -> None:
    # p1 = (1, 0), p2 = (0, 1), p3 = (1, 1)/sqrt(2), given at other scales
    emb = np.array([[3.0, 0.0], [0.0, 0.5], [2.0, 2.0]])
    # latent 0: a~ = (1, 0, 1/2): only pair (1, 3) has weight, cos 1/sqrt(2); latent 1: dead
    res = monosemanticity(np.array([[3.0, 5.0], [1.0, 5.0], [2.0, 5.0]]), emb)
    chance = (0 + 2 / math.sqrt(2)) / 3
    assert res.chance == pytest.approx(chance, rel=1e-14)
    assert res.score[0] == pytest.approx(1 / math.sqrt(2), rel=1e-14)
    assert res.corrected[0] == pytest.approx((1 / math.sqrt(2) - chance) / (1 - chance))
    assert np.isnan(res.score[1]) and np.isnan(res.corrected[1])
    assert res.dead.tolist() == [False, True] and res.single_image.tolist() == [False, False]
    # four images, a~ = (1, 1/2, 1/2, 0): weights 1/2 (1,2), 1/2 (1,3), 1/4 (2,3)
    emb4 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    c13 = c23 = 1 / math.sqrt(2)
    expected = (0.5 * 0.0 + 0.5 * c13 + 0.25 * c23) / 1.25
    res4 = monosemanticity(np.array([[4.0], [2.0], [2.0], [0.0]]), emb4)
    assert res4.score[0] == pytest.approx(expected, rel=1e-14)


def test_invariances() -> None:
    rng = np.random.default_rng(5)
    n, n_lat = 80, 10
    acts = hard_acts(n, n_lat, seed=5)
    emb = rng.normal(size=(n, 12)) + 1.0
    base = monosemanticity(acts, emb).score
    scale, shift = rng.uniform(0.01, 100, size=n_lat), rng.normal(size=n_lat) * 50
    np.testing.assert_allclose(monosemanticity(acts * scale + shift, emb).score, base, rtol=1e-8)
    rows = rng.uniform(0.1, 10, size=(n, 1))
    np.testing.assert_allclose(monosemanticity(acts, emb * rows).score, base, rtol=1e-10)


def test_identical_images_score_one() -> None:
    rng = np.random.default_rng(6)
    emb = rng.normal(size=(50, 16))
    emb[:6] = rng.uniform(0.5, 3, size=(6, 1)) * emb[0]  # same direction, other scales
    acts = np.zeros((50, 1))
    acts[:6, 0] = rng.uniform(0.1, 4, size=6)
    res = monosemanticity(acts, emb)
    assert res.score[0] == pytest.approx(1.0, abs=1e-12)
    assert res.corrected[0] == pytest.approx(1.0, abs=1e-12)


def test_chance_level() -> None:
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(40, 6)) + 1.5  # alike embeddings: chance well above 0
    p = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    pairs = [p[i] @ p[j] for i in range(40) for j in range(i + 1, 40)]
    assert chance_level(emb) == pytest.approx(np.mean(pairs), rel=1e-12)
    assert chance_level(torch.tensor(emb)) == pytest.approx(np.mean(pairs), rel=1e-12)


def test_random_latents_score_chance_not_zero() -> None:
    """Latents whose activations ignore the images: raw MS ~ chance, corrected ~ 0."""
    rng = np.random.default_rng(8)
    emb = rng.normal(size=(60, 8)) + 2.0
    res = monosemanticity(rng.random((60, 2000)), emb)
    assert res.chance > 0.7
    se = res.corrected.std() / math.sqrt(2000)
    assert abs(res.score.mean() - res.chance) < 0.01
    assert abs(res.corrected.mean()) < 4 * se


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_and_sparse_equal_dense(chunk: int) -> None:
    acts = hard_acts(70, 14, seed=9)
    acts[:, 11:] = np.where(acts[:, 11:] > 0.6, acts[:, 11:], 0.0)  # sparse, >= 0
    emb = np.random.default_rng(10).normal(size=(70, 5))
    with_zeros = sp.csc_matrix(acts)
    with_zeros.data[::7] = 0.0  # explicit zeros are stored entries like any other
    rows, cols = np.nonzero(acts)
    duplicated = sp.coo_matrix(  # a COO duplicate adds to its entry, as scipy defines it
        (np.r_[acts[rows, cols], 1.0], (np.r_[rows, 0], np.r_[cols, 9])), shape=acts.shape
    )
    summed = acts.copy()
    summed[0, 9] += 1.0
    cases = {  # name: (input, the dense matrix it stands for)
        "numpy": (acts, acts),
        "torch dense": (torch.tensor(acts), acts),
        "scipy csr": (sp.csr_matrix(acts), acts),
        "scipy csc, explicit zeros": (with_zeros, with_zeros.toarray()),
        "scipy coo, duplicates": (duplicated, summed),
        "torch coo": (torch.tensor(acts).to_sparse(), acts),
        "torch csr": (torch.tensor(acts).to_sparse_csr(), acts),
    }
    for name, (x, dense) in cases.items():
        expected = monosemanticity(dense, emb, chunk_latents=1000)
        res = monosemanticity(x, emb, chunk_latents=chunk, progress=False)
        np.testing.assert_array_equal(res.dead, expected.dead, err_msg=name)
        np.testing.assert_array_equal(res.single_image, expected.single_image, err_msg=name)
        np.testing.assert_allclose(res.score, expected.score, rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(
        monosemanticity(acts, emb).score, monosemanticity_pairs(acts, emb), rtol=1e-6, atol=1e-12
    )


def test_input_not_modified() -> None:
    acts = torch.randn(20, 4, dtype=torch.float64)
    keep = acts.clone()
    monosemanticity(acts, torch.randn(20, 3))
    assert torch.equal(acts, keep)


def test_bad_input() -> None:
    emb = np.random.default_rng(11).normal(size=(10, 4))
    acts = np.random.default_rng(12).normal(size=(10, 3))
    cases = [
        ((acts[:9], emb), "acts_NL has 9 rows"),
        ((acts[:, 0], emb), r"acts_NL must be \[images, latents\]"),
        ((acts[:, :0], emb), "no latents"),
        ((np.where(np.eye(10, 3) > 0, np.nan, acts), emb), "non-finite"),
        ((acts, np.vstack([emb[:9], np.zeros(4)])), "row 9 is zero"),
        ((acts[:1], emb[:1]), "pairs of images"),
        ((acts, np.ones((10, 4))), "same direction"),
    ]
    for args, message in cases:
        with pytest.raises(VisaeError, match=message):
            monosemanticity(*args)
    with pytest.raises(VisaeError, match="chunk_latents"):
        monosemanticity(acts, emb, chunk_latents=0)


def test_summary() -> None:
    acts = hard_acts(60, 30, seed=13)
    res = monosemanticity(acts, np.random.default_rng(14).normal(size=(60, 8)))
    s = res.stats(top=3)
    live = res.score[res.live]
    assert s["n_live"] == len(live) == 30 - 4
    assert s["fraction_dead"] == pytest.approx(2 / 30)
    assert s["fraction_single_image"] == pytest.approx(2 / 30)
    assert s["score"]["mean"] == pytest.approx(live.mean())
    assert s["score"]["std"] == pytest.approx(live.std())
    lo, hi = s["score"]["mean_ci"]
    assert lo < live.mean() < hi
    assert [k for k, _, _ in s["top"]] == list(np.argsort(-np.nan_to_num(res.score, nan=-9))[:3])
    assert s["bottom"][0][1] == pytest.approx(live.min())
    text = res.summary()
    assert "dead" in text and "chance" in text and "95% CI" in text


def test_bootstrap_coverage() -> None:
    """The 95% interval of the mean covers the true mean in ~95% of samples."""
    covered = 0
    for seed in range(200):
        sample = np.random.default_rng(1000 + seed).normal(1.0, 2.0, size=50)
        _, lo, hi = bootstrap_ci(sample, n_resamples=1000, seed=seed)
        covered += lo <= 1.0 <= hi
    assert 0.9 <= covered / 200 <= 0.99


def test_bootstrap_estimate_and_statistic() -> None:
    x = np.random.default_rng(15).exponential(size=101)
    est, lo, hi = bootstrap_ci(x, np.median, n_resamples=500)
    assert est == np.median(x) and lo < est < hi
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)


def test_separates() -> None:
    rng = np.random.default_rng(16)
    same_a, same_b = rng.normal(size=200), rng.normal(size=200)
    assert not separates(same_a, same_b)
    far = rng.normal(1.0, 1.0, size=200)
    assert separates(far, same_b) and separates(same_b, far)
    est, lo, hi = difference_ci(far, same_b)
    assert est == pytest.approx(far.mean() - same_b.mean()) and 0 < lo < est < hi


def test_bootstrap_bad_input() -> None:
    with pytest.raises(VisaeError, match="values holds 1 NaN"):
        bootstrap_ci([1.0, np.nan, 2.0])
    with pytest.raises(VisaeError, match="at least 2"):
        bootstrap_ci([1.0])
    with pytest.raises(VisaeError, match="b_values has 1 item"):
        separates([1.0, 2.0], [3.0])
    with pytest.raises(VisaeError, match="one-dimensional"):
        bootstrap_ci(np.ones((3, 2)))
    with pytest.raises(VisaeError, match="level"):
        bootstrap_ci([1.0, 2.0], level=95)
    with pytest.raises(VisaeError, match="reduce the last axis"):
        bootstrap_ci([1.0, 2.0], statistic=lambda x, axis: x)
