"""Concept matching: score tables against per-pair loops, vectorised FBMP against the per-latent
loop (ties, duplicates, every beta), the stop rule, one-to-one baselines, NN-OMP, a planted
dictionary against random codes, exclusion of concepts without positives, and input errors."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import nnls

from visae.errors import VisaeError
from visae.eval import matching
from visae.eval.matching import (
    delta_match,
    fbmp,
    fbmp_reference,
    latent_scores,
    match_concepts,
    nn_omp,
)

BETAS = (0.25, 0.5, 1.0)


def random_codes(rng: np.random.Generator, n: int, n_latents: int) -> np.ndarray:
    """Binary codes with per-latent rates 2-30%, a never-firing and an always-firing latent,
    duplicate columns (exact ties) and a latent equal to another's complement."""
    rates = rng.uniform(0.02, 0.3, n_latents)
    z = rng.random((n, n_latents)) < rates
    z[:, 0] = False
    z[:, 1] = True
    z[:, 5] = z[:, 3]
    z[:, -1] = z[:, 3]
    z[:, 7] = ~z[:, 4]
    return z


def random_labels(rng: np.random.Generator, z: np.ndarray, n_concepts: int) -> np.ndarray:
    """Concepts on 5-40% of images, one an OR of two latents, one empty, one on every image."""
    y = rng.random((len(z), n_concepts)) < rng.uniform(0.05, 0.4, n_concepts)
    y[:, 0] = z[:, 3] | z[:, 6]
    y[:, 1] = False
    y[:, 2] = True
    return y


# ---------------------------------------------------------------- per-latent tables


def f_beta_loop(y: np.ndarray, z: np.ndarray, beta: float) -> float:
    tp = int((y & z).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / z.sum(), tp / y.sum()
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def jaccard_loop(y: np.ndarray, z: np.ndarray) -> float:
    on_y, on_z = set(np.flatnonzero(y)), set(np.flatnonzero(z))
    return len(on_y & on_z) / len(on_y | on_z) if on_y | on_z else 0.0


def nmi_loop(y: np.ndarray, z: np.ndarray) -> float:
    """sklearn's normalized_mutual_info_score (arithmetic) written out; 0 where a labelling is
    constant (sklearn: 1.0 when both are)."""
    n = len(y)
    py, pz, joint = (
        Counter(y.tolist()),
        Counter(z.tolist()),
        Counter(zip(y.tolist(), z.tolist(), strict=True)),
    )
    if len(py) == 1 or len(pz) == 1:
        return 0.0
    mi = sum(c / n * math.log(c * n / (py[a] * pz[b])) for (a, b), c in joint.items())
    hy = -sum(c / n * math.log(c / n) for c in py.values())
    hz = -sum(c / n * math.log(c / n) for c in pz.values())
    return mi / ((hy + hz) / 2)


@pytest.mark.parametrize("beta", BETAS)
def test_score_tables_equal_per_pair_loops(beta: float) -> None:
    rng = np.random.default_rng(0)
    z = random_codes(rng, 60, 24)
    y = random_labels(rng, z, 7)
    tables = latent_scores(z, y, beta)
    for c in range(y.shape[1]):
        for j in range(z.shape[1]):
            assert tables.f_beta_CL[c, j] == pytest.approx(f_beta_loop(y[:, c], z[:, j], beta))
            assert tables.jaccard_CL[c, j] == pytest.approx(jaccard_loop(y[:, c], z[:, j]))
            assert tables.nmi_CL[c, j] == pytest.approx(nmi_loop(y[:, c], z[:, j]), abs=1e-12)
    sparse = latent_scores(sp.csr_array(z), y.astype(np.int64), beta)
    for name in ("f_beta_CL", "jaccard_CL", "nmi_CL"):
        np.testing.assert_array_equal(getattr(sparse, name), getattr(tables, name))


def test_nmi_known_values() -> None:
    y = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    z = np.stack([y, ~y, np.array([1, 0, 1, 0, 1, 0], dtype=bool), np.ones(6, dtype=bool)], 1)
    nmi = latent_scores(z, y[:, None]).nmi_CL[0]
    # identical and complementary labellings: 1; one unit of overlap off: by hand; constant: 0
    p = np.array([2, 1, 1, 2]) / 6  # joint cells (y, z) of the third latent
    mi = sum(pi * math.log(pi / (1 / 4)) for pi in p)
    np.testing.assert_allclose(nmi, [1.0, 1.0, mi / math.log(2), 0.0], atol=1e-12)


# ---------------------------------------------------------------- FBMP


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    ("seed", "n", "n_latents", "n_concepts"),
    [
        (0, 80, 30, 6),
        (1, 150, 70, 8),
        (2, 60, 8, 5),  # fewer latents than 20 steps
        (3, 12, 40, 6),  # few images: many exact ties
    ],
)
def test_fbmp_equals_per_latent_loop(
    beta: float, seed: int, n: int, n_latents: int, n_concepts: int
) -> None:
    rng = np.random.default_rng(seed)
    z = random_codes(rng, n, n_latents)
    y = random_labels(rng, z, n_concepts)
    ref = fbmp_reference(z, y, beta)
    for codes in (z, sp.csr_array(z), z * rng.uniform(0.5, 2.0, z.shape)):
        path = fbmp(codes, y, beta)
        np.testing.assert_array_equal(path.latents_CS, ref.latents_CS)
        np.testing.assert_array_equal(path.rec_f1_CS, ref.rec_f1_CS)
    assert path.latents_CS.shape[1] == min(20, n_latents)
    # rec_F1 rises strictly at each recorded step and is flat after the stop
    for latents, rec in zip(path.latents_CS, path.rec_f1_CS, strict=True):
        steps = int((latents >= 0).sum())
        assert (latents[:steps] >= 0).all() and (latents[steps:] == -1).all()
        assert (np.diff(np.concatenate([[0.0], rec[:steps]])) > 0).all()
        assert (rec[steps:] == (rec[steps - 1] if steps else 0.0)).all()


def test_concept_blocks_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(12)
    z = random_codes(rng, 100, 30)
    y = random_labels(rng, z, 7)
    whole, tables = match_concepts(z, y), latent_scores(z, y)
    monkeypatch.setattr(matching, "_BLOCK", 60)  # two concepts per block
    blocked, blocked_tables = match_concepts(z, y), latent_scores(z, y)
    np.testing.assert_array_equal(blocked.fbmp.latents_CS, whole.fbmp.latents_CS)
    np.testing.assert_array_equal(blocked.fbmp.rec_f1_CS, whole.fbmp.rec_f1_CS)
    np.testing.assert_array_equal(blocked.topk_f1_CK, whole.topk_f1_CK)
    for name in whole.best:
        np.testing.assert_array_equal(blocked.best[name].latent_C, whole.best[name].latent_C)
    np.testing.assert_array_equal(blocked_tables.nmi_CL, tables.nmi_CL)


def test_fbmp_ties_go_to_the_lowest_latent() -> None:
    z = np.zeros((6, 4), dtype=bool)
    z[:3, [1, 2, 3]] = True  # three identical columns
    y = z[:, [1]].copy()
    for path in (fbmp(z, y), fbmp_reference(z, y)):
        assert path.latents_CS[0, 0] == 1 and path.rec_f1_CS[0, 0] == 1.0


def test_fbmp_stops_exactly_when_f1_does_not_strictly_improve() -> None:
    y = np.array([[1], [1], [0], [0], [0]], dtype=bool)
    z0 = np.array([1, 0, 0, 0, 0], dtype=bool)  # F1 2/3
    tie = np.array([0, 1, 1, 1, 0], dtype=bool)  # union F1 4/6 = 2/3: equal, not better
    gain = np.array([0, 1, 1, 0, 0], dtype=bool)  # union F1 4/5
    for fn in (fbmp, fbmp_reference):
        stopped = fn(np.stack([z0, tie], 1), y)
        np.testing.assert_array_equal(stopped.latents_CS, [[0, -1]])
        np.testing.assert_allclose(stopped.rec_f1_CS, [[2 / 3, 2 / 3]])
        went_on = fn(np.stack([z0, gain], 1), y)
        np.testing.assert_array_equal(went_on.latents_CS, [[0, 1]])
        np.testing.assert_allclose(went_on.rec_f1_CS, [[2 / 3, 4 / 5]])


def test_fbmp_selects_by_f_beta_but_records_f1() -> None:
    y = np.zeros((10, 1), dtype=bool)
    y[:4] = True
    precise = np.zeros(10, dtype=bool)
    precise[0] = True  # F1 0.4, F_0.25 0.85
    broad = np.zeros(10, dtype=bool)
    broad[1:7] = True  # F1 0.6, F_0.25 0.51
    z = np.stack([precise, broad], 1)
    assert fbmp(z, y, 1.0).latents_CS[0, 0] == 1
    low = fbmp(z, y, 0.25)
    assert low.latents_CS[0, 0] == 0
    assert low.rec_f1_CS[0, 0] == pytest.approx(0.4)


# ---------------------------------------------------------------- one-to-one baselines


def test_best_single_and_top_k_unions_equal_loops() -> None:
    rng = np.random.default_rng(4)
    z = random_codes(rng, 90, 30)
    y = random_labels(rng, z, 6)
    z[:3] = False
    y[:, 3] = np.arange(len(z)) < 3  # positives where no latent fires: every F1 and Jaccard is 0
    result = match_concepts(z, y, max_steps=5)
    loops = {
        "f1": lambda a, b: f_beta_loop(a, b, 1.0),
        "jaccard": jaccard_loop,
        "nmi": nmi_loop,
    }
    for row, c in enumerate(result.concepts_C):
        f1 = np.array([f_beta_loop(y[:, c], z[:, j], 1.0) for j in range(z.shape[1])])
        for name, loop in loops.items():
            table = np.array([loop(y[:, c], z[:, j]) for j in range(z.shape[1])])
            best = result.best[name]
            if table.max() > 0:
                assert best.latent_C[row] == int(np.argmax(table))
                assert best.f1_C[row] == pytest.approx(f1[best.latent_C[row]])
            else:
                assert best.latent_C[row] == -1 and best.f1_C[row] == 0
            assert best.score_C[row] == pytest.approx(table.max(), abs=1e-12)
        order = sorted(range(z.shape[1]), key=lambda j: (-f1[j], j))[:5]
        np.testing.assert_array_equal(result.topk_latents_CK[row], order)
        for k in range(1, 6):
            union = z[:, order[:k]].any(axis=1)
            assert result.topk_f1_CK[row, k - 1] == pytest.approx(f_beta_loop(y[:, c], union, 1))
    row = list(result.concepts_C).index(3)
    assert result.best["f1"].latent_C[row] == -1 and result.best["jaccard"].latent_C[row] == -1


def test_top_k_ties_go_to_the_lower_latent() -> None:
    rng = np.random.default_rng(11)
    patterns = rng.random((50, 5)) < 0.3
    z = patterns[:, rng.integers(0, 5, 300)]  # 300 latents, 5 distinct columns: ties everywhere
    y = rng.random((50, 1)) < 0.3
    f1 = latent_scores(z, y).f_beta_CL[0]
    order = sorted(range(300), key=lambda j: (-f1[j], j))[:20]
    np.testing.assert_array_equal(match_concepts(z, y).topk_latents_CK[0], order)


# ---------------------------------------------------------------- NN-OMP


def nn_omp_loop(a: np.ndarray, y: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """One concept, one latent at a time."""
    resid, chosen, scores = y.astype(float), [], []
    for _ in range(k):
        best, best_corr = -1, 1e-9 * math.sqrt(y.sum())
        for j in range(a.shape[1]):
            norm = np.linalg.norm(a[:, j])
            corr = a[:, j] @ resid / norm if norm > 0 and j not in chosen else 0.0
            if corr > best_corr:
                best, best_corr = j, corr
        if best < 0:
            break
        chosen.append(best)
        pred = a[:, chosen] @ nnls(a[:, chosen], y.astype(float))[0]
        resid = y - pred
        scores.append(f_beta_loop(y, pred > 0.5, 1.0))
    return chosen, scores


def test_nn_omp_equals_loop_and_stops_on_an_exact_fit() -> None:
    rng = np.random.default_rng(5)
    z = random_codes(rng, 70, 25)
    a = z * rng.uniform(0.2, 3.0, z.shape)
    y = random_labels(rng, z, 5)
    y[:, 4] = z[:, 9]
    a[:, 9] = z[:, 9]  # latent 9 is concept 4 exactly: one atom, then no positive correlation
    for codes in (a, sp.csr_array(a)):
        path = nn_omp(codes, y, max_atoms=6)
        for c in range(y.shape[1]):
            chosen, scores = nn_omp_loop(a, y[:, c], 6)
            steps = len(chosen)
            np.testing.assert_array_equal(path.latents_CK[c, :steps], chosen)
            assert (path.latents_CK[c, steps:] == -1).all()
            np.testing.assert_allclose(path.f1_CK[c, :steps], scores)
            assert (path.f1_CK[c, steps:] == (scores[-1] if scores else 0.0)).all()
    np.testing.assert_array_equal(path.latents_CK[4], [9, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(path.f1_CK[4], np.ones(6))


def test_nn_omp_refits_with_non_negative_weights() -> None:
    a = np.array([[3, 2, 0], [0, 0, 1], [0, 0, 0], [2, 0, 3], [2, 1, 1], [0, 0, 0]], float)
    y = np.array([[1], [1], [0], [1], [1], [1]])
    path = nn_omp(a, y, max_atoms=3)
    np.testing.assert_array_equal(path.latents_CK, [[0, 2, 1]])
    # every step predicts rows 0, 3, 4 (F1 6/8); with all three atoms the unconstrained fit
    # -a_0 + 2 a_1 + a_2 would also predict row 1 (F1 8/9), NNLS drops a_0 instead
    np.testing.assert_allclose(path.f1_CK, [[6 / 8, 6 / 8, 6 / 8]])


# ---------------------------------------------------------------- planted dictionary


def planted(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concept c is the OR of latents 2c and 2c+1 (each on about half of its positives, with a
    few misses and false alarms), beside 200 noise latents firing on 1-15% of images."""
    rng = np.random.default_rng(seed)
    n, n_concepts, n_noise = 800, 8, 200
    y = rng.random((n, n_concepts)) < rng.uniform(0.1, 0.3, n_concepts)
    half = rng.random((n, n_concepts)) < 0.5
    a, b = y & half, y & ~half
    noise = lambda p: rng.random((n, n_concepts)) < p  # noqa: E731
    a, b = (a & ~noise(0.01)) | noise(0.002), (b & ~noise(0.01)) | noise(0.002)
    dictionary = np.stack([a, b], axis=2).reshape(n, 2 * n_concepts)
    z = np.concatenate([dictionary, rng.random((n, n_noise)) < rng.uniform(0.01, 0.15, n_noise)], 1)
    values = z * rng.uniform(0.5, 1.5, z.shape)
    return values, y, z


def test_planted_dictionary_is_recovered_and_random_codes_are_not() -> None:
    values, y, _ = planted(6)
    result = match_concepts(values, y, omp=True)
    for c in range(y.shape[1]):
        assert set(result.matched_coalition(c, 3).tolist()) == {2 * c, 2 * c + 1}
        assert result.best["f1"].latent_C[c] in (2 * c, 2 * c + 1)
    assert result.match_score(2) > 0.97
    assert result.match_score(1) == pytest.approx(result.best_single_score("f1"))
    assert 0.6 < result.best_single_score("f1") < 0.72  # one half of each concept
    assert result.topk_score(2) > 0.97
    assert result.omp_score(2) > 0.9

    # each latent's column shuffled over images: same sparsity, no relation to the concepts
    rng = np.random.default_rng(7)
    shuffled = np.stack([rng.permutation(col) for col in values.T], axis=1)
    baseline = match_concepts(shuffled, y)
    prevalence = y.mean(axis=0)
    everything_f1 = float(np.mean(2 * prevalence / (1 + prevalence)))  # predict "all positive"
    assert abs(baseline.match_score(2) - everything_f1) < 0.1
    assert delta_match(result, baseline, 2) > 0.6
    assert delta_match(result, baseline, 2) == result.match_score(2) - baseline.match_score(2)


def test_matched_coalition_truncates_to_the_best_step_and_is_empty_at_f1_zero() -> None:
    _, y, z = planted(8)
    z[:5] = False
    y = np.concatenate([y, (np.arange(len(z)) < 5)[:, None]], axis=1)  # no latent hits it
    result = match_concepts(z, y)
    steps = (result.fbmp.latents_CS[0] >= 0).sum()
    assert steps == 2
    np.testing.assert_array_equal(result.matched_coalition(0, 1), result.fbmp.latents_CS[0, :1])
    np.testing.assert_array_equal(result.matched_coalition(0, 5), result.fbmp.latents_CS[0, :2])
    none = y.shape[1] - 1
    assert result.matched_coalition(none, 3).size == 0
    assert result.coalitions(3)[none].size == 0
    assert result.best["f1"].latent_C[none] == -1


# ---------------------------------------------------------------- exclusion and errors


def test_concepts_without_positives_are_listed_and_excluded() -> None:
    rng = np.random.default_rng(9)
    z = random_codes(rng, 80, 20)
    y = random_labels(rng, z, 5)  # column 1 is empty
    names = ["a", "b", "c", "d", "e"]
    result = match_concepts(z, y, names=names)
    assert result.excluded == (1,) and result.names[1] == "b"
    np.testing.assert_array_equal(result.concepts_C, [0, 2, 3, 4])
    scored = fbmp_reference(z, y[:, [0, 2, 3, 4]]).rec_f1_CS
    assert result.match_score(3) == pytest.approx(scored[:, 2].mean())
    assert result.match_score(99) == pytest.approx(scored[:, -1].mean())
    assert 1 not in result.coalitions(3)
    with pytest.raises(VisaeError, match=r"^concept 1 \(b\) has no positive image: excluded$"):
        result.matched_coalition(1, 3)


def test_continuous_codes_are_binarised_above_1e_8() -> None:
    codes = np.array([[2e-8, 1e-9], [0.0, 5.0], [3.0, 1e-8]])
    y = np.array([[1], [0], [1]])
    np.testing.assert_array_equal(
        latent_scores(codes, y).f_beta_CL, latent_scores(codes > 1e-8, y).f_beta_CL
    )
    assert latent_scores(codes, y).f_beta_CL[0, 0] == 1.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda z, y: fbmp(z[:-1], y), r"concept labels cover 40 images but the codes 39"),
        (
            lambda z, y: fbmp(z, y * 0.5),
            r"concept labels must be 0/1: image \d+, concept \d+ holds",
        ),
        (lambda z, y: fbmp(z, y[:, 0]), r"concept labels must be a 2-D \[images, concepts\] array"),
        (lambda z, y: fbmp(z[:, 0], y), r"codes must be a 2-D \[images, latents\] array"),
        (lambda z, y: fbmp(np.where(z, np.nan, 0), y), r"codes hold NaN or infinite values"),
        (lambda z, y: fbmp(z, y, beta=0), r"beta must be a positive number, got 0"),
        (lambda z, y: fbmp(z, y, max_steps=0), r"max_steps must be a positive integer, got 0"),
        (lambda z, y: nn_omp(z, y, max_atoms=1.5), r"max_atoms must be a positive integer"),
        (lambda z, y: match_concepts(z, y).match_score(0), r"k must be a positive integer, got 0"),
        (lambda z, y: match_concepts(z, y, names=["x"]), r"1 concept names for 3 label columns"),
        (lambda z, y: match_concepts(z, y).omp_score(1), r"NN-OMP was not run"),
        (lambda z, y: match_concepts(z, y).best_single_score("auc"), r"unknown criterion 'auc'"),
        (lambda z, y: match_concepts(z, y).matched_coalition(7, 3), r"concept 7 is not a label"),
        (lambda z, y: match_concepts(z, 0 * y), r"no concept has a positive image among the 40"),
        (
            lambda z, y: delta_match(match_concepts(z, y), match_concepts(z, y[:, :2]), 3),
            r"DeltaMATCH needs both results scored on the same concepts",
        ),
        (
            lambda z, y: delta_match(match_concepts(z, y), match_concepts(z, y, beta=0.5), 3),
            r"DeltaMATCH needs one beta, got 1.0 and 0.5",
        ),
    ],
)
def test_bad_input_gives_one_line_errors(call: Callable, message: str) -> None:
    rng = np.random.default_rng(10)
    z = rng.random((40, 12)) < 0.2
    y = (rng.random((40, 3)) < 0.3).astype(np.float64)
    with pytest.raises(VisaeError, match=message) as err:
        call(z, y)
    assert "\n" not in str(err.value)
