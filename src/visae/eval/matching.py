"""Concept matching (Klotz et al. 2026, arXiv 2606.24716): how well single latents and small
coalitions of latents reproduce binary concept labels, exactly and for every latent at once.

Inputs: image-level codes Z [N images, L latents], dense or scipy.sparse (scipy comes with
scikit-image, a visae dependency), binarised as z_j = 1[code_j > 1e-8] (the paper's rule; a
bool array is taken as it is), and binary concept labels Y [N, C]. Every count is a matrix
product of binary matrices: TP = Y^T Z, beside the positives per latent and per concept; FBMP
updates its residuals' counts with sparse products of the positives each step covers.

Rules (METHODS.md, "Concept matching and TAPAScore"):
- F_beta(y, z) = (1 + beta^2) TP / (beta^2 |y| + |z|), and 0 where undefined (|y| = |z| = 0).
  Jaccard = TP / |y or z|, 0 where undefined. NMI = MI / ((H(y) + H(z)) / 2): sklearn's
  `normalized_mutual_info_score` with its default arithmetic normalisation, and 0 where either
  labelling is constant (sklearn returns 1 when both are).
- One-to-one baselines: the best single latent per concept by F1, by Jaccard and by NMI; the
  union (OR) of the top-k latents by individual F1 (ties to the lower index), k = 1..K; NN-OMP
  on continuous codes (`nn_omp`).
- FBMP, per concept: residual r = y, union R = empty; up to min(max_steps, L) steps:
  j* = argmax_j F_beta(r, z_j), ties to the lowest latent index; if F1(y, R or z_j*) does not
  strictly exceed F1(y, R) (0 for R empty), stop and do not record j*; else R |= z_j*,
  r &= ~z_j*. rec_F1[concept, step] is the F1 after each step, carried forward after the stop.
  The selection uses F_beta, the stop test and rec_F1 use F1, whatever beta.
- MATCHScore@k = mean over concepts of rec_F1 after at most k steps. Concepts with no positive
  image are excluded and listed, never scored 0. DeltaMATCH = MATCHScore(trained) -
  MATCHScore(baseline codes: a frozen SAE's, or random activations).
- Matched coalition of a concept: its FBMP latents up to k_eff = min(argmax rec_F1 + 1, k);
  none when its best F1 is 0 (the published code returns an arbitrary latent there).

Ties are exact: counts are integers, each F is one correctly rounded division of exactly
represented numbers (for beta in {0.25, 0.5, 1}), so equal scores are equal floats and distinct
ones (counts below 2^24) are distinct floats; np.argmax then picks the lowest index, as the
per-latent loop `fbmp_reference` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.optimize import nnls

from visae.errors import VisaeError

BINARY_THRESHOLD = 1e-8
CRITERIA = ("f1", "jaccard", "nmi")
OMP_THRESHOLD = 0.5
_BLOCK = 1 << 22  # concept x latent entries per block: bounds every [C, L] table in memory


# ---------------------------------------------------------------- inputs


def _check_finite(values: np.ndarray, what: str) -> None:
    if values.dtype != bool and not np.isfinite(values).all():
        raise VisaeError(f"{what} hold NaN or infinite values")


class _BinaryCodes:
    """Binary codes held for the operations matching needs: counts against many binary vectors
    at once (one matrix product), the same for vectors with few positives (a sparse product
    whose cost is their positives x L), and a few columns as dense booleans."""

    def __init__(self, codes_NL: Any) -> None:
        if sp.issparse(codes_NL):
            csr = sp.csr_array(codes_NL)
            _check_finite(csr.data, "codes")
            binary = csr if csr.dtype == bool else csr > BINARY_THRESHOLD
        else:
            dense = np.asarray(codes_NL)
            _check_finite(dense, "codes")
            binary = dense if dense.dtype == bool else dense > BINARY_THRESHOLD
        if binary.ndim != 2:
            raise VisaeError(f"codes must be a 2-D [images, latents] array, got {binary.shape}")
        self.n, self.n_latents = binary.shape
        if self.n == 0 or self.n_latents == 0:
            raise VisaeError(f"codes have shape {binary.shape}: no images or no latents")
        # float32 sums of 0/1 products are exact integers below 2^24, in any summation order
        self._dtype = np.float32 if self.n < 2**24 else np.float64
        self.count_L = np.asarray(binary.sum(axis=0)).ravel().astype(np.int64)
        self._sparse = sp.issparse(binary)
        if self._sparse:
            self._csr_NL = binary.astype(self._dtype)
            self._csc = binary.tocsc()
        else:
            self._dense_NL = binary.astype(self._dtype)
            self._bool_NL = binary

    def tp(self, vectors_CN: np.ndarray) -> np.ndarray:
        """|v_c and z_j| for every vector and latent, [C, L] float64: one matrix product."""
        if self._sparse:
            return self.tp_few(vectors_CN)
        return (vectors_CN.astype(self._dtype) @ self._dense_NL).astype(np.float64)

    def tp_few(self, vectors_CN: np.ndarray) -> np.ndarray:
        """`tp` as a sparse product: the sum of Z's rows where each vector is on."""
        product = sp.csr_array(vectors_CN, dtype=self._dtype) @ (
            self._csr_NL if self._sparse else self._dense_NL
        )
        return (product.toarray() if sp.issparse(product) else product).astype(np.float64)

    def columns(self, latents: np.ndarray) -> np.ndarray:
        """The latents' binary columns as rows, [len(latents), N] bool."""
        if self._sparse:
            return self._csc[:, latents].toarray().T
        return self._bool_NL[:, latents].T


def _labels(labels_NC: Any, n: int) -> np.ndarray:
    """Concept labels as a bool [N, C] array; anything but 0/1 is refused."""
    y = labels_NC.toarray() if sp.issparse(labels_NC) else np.asarray(labels_NC)
    if y.ndim != 2:
        raise VisaeError(f"concept labels must be a 2-D [images, concepts] array, got {y.shape}")
    if y.shape[0] != n:
        raise VisaeError(f"concept labels cover {y.shape[0]} images but the codes {n}")
    if y.dtype == bool:
        return y
    bad = ~((y == 0) | (y == 1))
    if bad.any():
        i, c = np.argwhere(bad)[0]
        raise VisaeError(f"concept labels must be 0/1: image {i}, concept {c} holds {y[i, c]!r}")
    return y == 1


def _check_beta(beta: float) -> None:
    if not (np.isfinite(beta) and beta > 0):
        raise VisaeError(f"beta must be a positive number, got {beta!r}")


def _check_steps(steps: int, what: str = "max_steps") -> None:
    if int(steps) != steps or steps < 1:
        raise VisaeError(f"{what} must be a positive integer, got {steps!r}")


# ---------------------------------------------------------------- scores from counts


def _f_beta(tp: Any, n_true: Any, n_pred: Any, beta: float) -> np.ndarray:
    """F_beta = (1 + b^2) TP / (b^2 |true| + |pred|) from counts, float64; 0 where undefined."""
    b2 = beta * beta
    num = (1.0 + b2) * np.asarray(tp, dtype=np.float64)
    den = b2 * np.asarray(n_true, dtype=np.float64) + np.asarray(n_pred, dtype=np.float64)
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape))
    return np.divide(num, den, out=out, where=den > 0)


def _jaccard(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray) -> np.ndarray:
    den = n_true + n_pred - tp
    return np.divide(tp, den, out=np.zeros(np.broadcast_shapes(tp.shape, den.shape)), where=den > 0)


def _entropy(k: np.ndarray, n: int) -> np.ndarray:
    """Entropy (nats) of a binary labelling with k positives among n."""
    out = np.zeros(k.shape)
    for cell in (k, n - k):
        p = cell / n
        out -= np.where(cell > 0, p * np.log(np.where(cell > 0, p, 1.0)), 0.0)
    return out


def _nmi(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray, n: int) -> np.ndarray:
    """NMI of two binary labellings from the 2x2 contingency counts, arithmetic normalisation.

    Each cell's log term takes log(n_ab * n / (n_a * n_b)) of exact integers, so independent
    labellings give MI = 0 exactly, not rounding noise."""
    cells = (tp, n_true - tp, n_pred - tp, n - n_true - n_pred + tp)
    margins = (
        (n_true, n_pred),
        (n_true, n - n_pred),
        (n - n_true, n_pred),
        (n - n_true, n - n_pred),
    )
    mi = np.zeros(np.broadcast_shapes(tp.shape, n_true.shape, n_pred.shape))
    for cell, (row, col) in zip(cells, margins, strict=True):
        on = cell > 0
        ratio = np.where(on, cell * n, 1.0) / np.where(on, row * col, 1.0)
        mi += np.where(on, cell / n * np.log(ratio), 0.0)
    den = (_entropy(n_true, n) + _entropy(n_pred, n)) / 2
    ok = (mi > 0) & (den > 0)
    return np.divide(mi, den, out=np.zeros(mi.shape), where=ok)


def _blocks(Z: _BinaryCodes, Y_NC: np.ndarray) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """(concept slice, its labels [c, N], TP [c, L]) per block of concepts, bounding memory."""
    step = max(1, _BLOCK // Z.n_latents)
    for start in range(0, Y_NC.shape[1], step):
        block = slice(start, min(start + step, Y_NC.shape[1]))
        y_CN = np.ascontiguousarray(Y_NC[:, block].T)
        yield block, y_CN, Z.tp(y_CN)


# ---------------------------------------------------------------- per-latent tables


@dataclass(frozen=True)
class LatentScores:
    """Every latent against every concept, [concepts, latents] tables (0 where undefined)."""

    f_beta_CL: np.ndarray
    jaccard_CL: np.ndarray
    nmi_CL: np.ndarray
    beta: float


def latent_scores(codes_NL: Any, labels_NC: Any, beta: float = 1.0) -> LatentScores:
    """F_beta, Jaccard and NMI of every latent against every concept (full [C, L] tables: for
    many concepts x latents, `match_concepts` keeps only what it needs, block by block)."""
    _check_beta(beta)
    Z = _BinaryCodes(codes_NL)
    Y_NC = _labels(labels_NC, Z.n)
    f, jac, nmi = [], [], []
    for _, y_CN, tp in _blocks(Z, Y_NC):
        n_true = y_CN.sum(axis=1, dtype=np.int64)[:, None].astype(np.float64)
        n_pred = Z.count_L[None, :].astype(np.float64)
        f.append(_f_beta(tp, n_true, n_pred, beta))
        jac.append(_jaccard(tp, n_true, n_pred))
        nmi.append(_nmi(tp, n_true, n_pred, Z.n))
    return LatentScores(np.vstack(f), np.vstack(jac), np.vstack(nmi), beta)


# ---------------------------------------------------------------- FBMP


class FBMPPath(NamedTuple):
    """FBMP per concept: the latent chosen at each step (-1 after the stop) and the F1 of the
    union after each step (carried forward after the stop)."""

    latents_CS: np.ndarray
    rec_f1_CS: np.ndarray


def _fbmp(Z: _BinaryCodes, Y_NC: np.ndarray, beta: float, max_steps: int) -> FBMPPath:
    """FBMP for every concept at once. The counts TP(r, z_j) of every residual with every latent
    come from one product at the start; a step that accepts z* removes the newly covered
    positives d = r and z* from r, and TP(r and not z*, Z) = TP(r, Z) - TP(d, Z) is one sparse
    product costing |d| x L: over the whole run, each positive image's row of Z once."""
    n_steps = min(max_steps, Z.n_latents)
    latents = np.full((Y_NC.shape[1], n_steps), -1, dtype=np.int64)
    rec = np.zeros((Y_NC.shape[1], n_steps))
    per_block = max(1, _BLOCK // Z.n_latents)
    for start in range(0, Y_NC.shape[1], per_block):
        y_CN = np.ascontiguousarray(Y_NC[:, start : start + per_block].T)
        rows = slice(start, start + len(y_CN))
        n_true = y_CN.sum(axis=1, dtype=np.int64)
        resid_CN, union_CN = y_CN.copy(), np.zeros_like(y_CN)
        n_resid, f1 = n_true.copy(), np.zeros(len(y_CN))
        # a concept without positives has F1 0 for every union: it stops at step 1 either way
        active = np.flatnonzero(n_true > 0)
        tp_CL = Z.tp(y_CN[active])  # rows follow `active`
        for step in range(n_steps):
            if not active.size:
                break
            scores = _f_beta(tp_CL, n_resid[active, None], Z.count_L[None, :], beta)
            best = scores.argmax(axis=1)  # the first maximum: ties go to the lowest latent
            z_CN = Z.columns(best)
            cand_CN = union_CN[active] | z_CN
            cand_f1 = _f_beta(
                (cand_CN & y_CN[active]).sum(axis=1), n_true[active], cand_CN.sum(axis=1), 1.0
            )
            better = cand_f1 > f1[active]
            keep = active[better]
            covered_CN = resid_CN[keep] & z_CN[better]
            union_CN[keep] = cand_CN[better]
            resid_CN[keep] &= ~z_CN[better]
            n_resid[keep] -= covered_CN.sum(axis=1)
            f1[keep] = cand_f1[better]
            latents[start + keep, step] = best[better]
            rec[rows, step:] = f1[:, None]
            active, tp_CL = keep, tp_CL[better] - Z.tp_few(covered_CN)
    return FBMPPath(latents, rec)


def fbmp(codes_NL: Any, labels_NC: Any, beta: float = 1.0, max_steps: int = 20) -> FBMPPath:
    """Fully-Binary Matching Pursuit for every concept (module docstring for the rules): each
    step scores every latent against every active concept's residual at once."""
    _check_beta(beta)
    _check_steps(max_steps)
    Z = _BinaryCodes(codes_NL)
    return _fbmp(Z, _labels(labels_NC, Z.n), beta, max_steps)


def fbmp_reference(
    codes_NL: Any, labels_NC: Any, beta: float = 1.0, max_steps: int = 20
) -> FBMPPath:
    """FBMP the published way, one F-score per latent per step in a Python loop: the slow,
    obviously-correct form the tests and the benchmark compare `fbmp` with."""
    _check_beta(beta)
    _check_steps(max_steps)
    codes = codes_NL.toarray() if sp.issparse(codes_NL) else np.asarray(codes_NL)
    Z_LN = np.ascontiguousarray((codes if codes.dtype == bool else codes > BINARY_THRESHOLD).T)
    Y_NC = _labels(labels_NC, Z_LN.shape[1])

    def f_score(truth: np.ndarray, pred: np.ndarray, beta: float) -> float:
        b2 = beta * beta
        tp = int(np.count_nonzero(truth & pred))
        den = b2 * int(np.count_nonzero(truth)) + int(np.count_nonzero(pred))
        return (1.0 + b2) * tp / den if den > 0 else 0.0

    n_steps = min(max_steps, len(Z_LN))
    latents = np.full((Y_NC.shape[1], n_steps), -1, dtype=np.int64)
    rec = np.zeros((Y_NC.shape[1], n_steps))
    for c in range(Y_NC.shape[1]):
        y = Y_NC[:, c]
        resid, union, f1 = y.copy(), np.zeros_like(y), 0.0
        for step in range(n_steps):
            best_j, best_f = 0, -1.0
            for j in range(len(Z_LN)):
                f = f_score(resid, Z_LN[j], beta)
                if f > best_f:
                    best_j, best_f = j, f
            cand = union | Z_LN[best_j]
            cand_f1 = f_score(y, cand, 1.0)
            if not cand_f1 > f1:
                break
            union, resid, f1 = cand, resid & ~Z_LN[best_j], cand_f1
            latents[c, step] = best_j
            rec[c, step:] = f1
    return FBMPPath(latents, rec)


# ---------------------------------------------------------------- NN-OMP


class OMPPath(NamedTuple):
    """NN-OMP per concept: the atom added at each step (-1 after the stop) and the F1 of the
    thresholded prediction with the atoms so far (carried forward after the stop)."""

    latents_CK: np.ndarray
    f1_CK: np.ndarray


def nn_omp(codes_NL: Any, labels_NC: Any, max_atoms: int = 20) -> OMPPath:
    """Non-negative orthogonal matching pursuit on continuous codes, a one-to-few baseline.

    Per concept y (0/1): residual r = y; each step adds the unselected latent with the largest
    positive correlation a_j.r / ||a_j|| (ties to the lower index; positive meaning above 1e-9
    ||y||, so rounding noise after an exact fit adds nothing; none left: stop), refits
    y ~ A_S w with w >= 0 (scipy.optimize.nnls) on the selected set S, and scores
    F1(y, A_S w > 0.5): the least-squares fit of a 0/1 target cut at its midpoint. The F1 is
    not monotone in the number of atoms and is kept as it comes. Correlations for every latent
    and active concept are one matrix product per step."""
    _check_steps(max_atoms, "max_atoms")
    dense = None if sp.issparse(codes_NL) else np.asarray(codes_NL, dtype=np.float64)
    if dense is not None and (dense.ndim != 2 or 0 in dense.shape):
        raise VisaeError(
            f"codes must be a non-empty 2-D [images, latents] array, got {dense.shape}"
        )
    # held sparse either way: SAE codes are, and products then cost their nonzeros only
    A = sp.csc_array(codes_NL if dense is None else dense, dtype=np.float64)
    _check_finite(A.data, "codes")
    norms_L = np.sqrt(np.asarray(A.multiply(A).sum(axis=0)).ravel())
    Y = _labels(labels_NC, A.shape[0]).astype(np.float64)
    n_concepts, n_steps = Y.shape[1], min(max_atoms, A.shape[1])
    latents = np.full((n_concepts, n_steps), -1, dtype=np.int64)
    f1 = np.zeros((n_concepts, n_steps))
    resid_NC = Y.copy()
    inv_norm_L = np.divide(1.0, norms_L, out=np.zeros_like(norms_L), where=norms_L > 0)
    floor_C = 1e-9 * np.sqrt(Y.sum(axis=0))
    active = np.flatnonzero(Y.sum(axis=0) > 0)
    for step in range(n_steps):
        if not active.size:
            break
        corr_CL = (A.T @ resid_NC[:, active]).T * inv_norm_L
        corr_CL[np.arange(len(active))[:, None], latents[active, :step]] = 0.0  # selected
        ok = corr_CL > floor_C[active, None]
        has = ok.any(axis=1)
        active = active[has]
        best = np.where(ok[has], corr_CL[has], -np.inf).argmax(axis=1)
        latents[active, step] = best
        for c in active:
            basis = A[:, latents[c, : step + 1]].toarray()
            pred = basis @ nnls(basis, Y[:, c])[0]
            resid_NC[:, c] = Y[:, c] - pred
            on = pred > OMP_THRESHOLD
            f1[c, step:] = _f_beta(np.count_nonzero(on & (Y[:, c] > 0)), Y[:, c].sum(), on.sum(), 1)
    return OMPPath(latents, f1)


# ---------------------------------------------------------------- one-to-one baselines


@dataclass(frozen=True)
class BestSingle:
    """The best single latent per scored concept under one criterion, its score and its F1;
    latent -1 (score 0, F1 0) where every latent scores 0 on the concept: none is matched."""

    latent_C: np.ndarray
    score_C: np.ndarray
    f1_C: np.ndarray


def _one_to_one(
    Z: _BinaryCodes, Y_NC: np.ndarray, top_k: int
) -> tuple[dict[str, BestSingle], np.ndarray, np.ndarray]:
    """Best single latent by each criterion, and the top-k-by-F1 unions with their F1."""
    n_concepts, k = Y_NC.shape[1], min(top_k, Z.n_latents)
    best = {
        name: (np.full(n_concepts, -1), np.zeros(n_concepts), np.zeros(n_concepts))
        for name in CRITERIA
    }
    top_CK = np.zeros((n_concepts, k), dtype=np.int64)
    for block, y_CN, tp in _blocks(Z, Y_NC):
        n_true = y_CN.sum(axis=1, dtype=np.int64)[:, None].astype(np.float64)
        n_pred = Z.count_L[None, :].astype(np.float64)
        f1 = _f_beta(tp, n_true, n_pred, 1.0)
        tables = {"f1": f1, "jaccard": _jaccard(tp, n_true, n_pred)}
        tables["nmi"] = _nmi(tp, n_true, n_pred, Z.n)
        rows = np.arange(len(y_CN))
        for name, table in tables.items():
            j = table.argmax(axis=1)
            score = table[rows, j]
            latent, value, its_f1 = best[name]
            latent[block] = np.where(score > 0, j, -1)
            value[block] = score
            its_f1[block] = np.where(score > 0, f1[rows, j], 0.0)
        top_CK[block] = np.argsort(-f1, axis=1, kind="stable")[:, :k]
    union_f1 = np.zeros((n_concepts, k))
    for c in range(n_concepts):
        union_NK = np.logical_or.accumulate(Z.columns(top_CK[c]).T, axis=1)
        tp_K = (union_NK & Y_NC[:, c, None]).sum(axis=0)
        union_f1[c] = _f_beta(tp_K, Y_NC[:, c].sum(), union_NK.sum(axis=0), 1.0)
    return {name: BestSingle(*arrays) for name, arrays in best.items()}, top_CK, union_f1


# ---------------------------------------------------------------- all of it


def _at_k(table_CK: np.ndarray, k: int) -> np.ndarray:
    """The column after at most k steps (the last one when k exceeds the steps run)."""
    _check_steps(k, "k")
    return table_CK[:, min(k, table_CK.shape[1]) - 1]


@dataclass(frozen=True)
class MatchResult:
    """Concept matching of one set of codes. Per-concept arrays (suffix C) run over the scored
    concepts, `concepts_C`, the label columns with a positive image; the others are `excluded`."""

    names: tuple[str, ...]  # every label column's name
    concepts_C: np.ndarray  # the scored label columns, ascending
    excluded: tuple[int, ...]  # label columns without a positive image: listed, never scored
    n_latents: int
    beta: float  # FBMP's selection beta
    fbmp: FBMPPath
    best: dict[str, BestSingle]  # by "f1", "jaccard", "nmi"
    topk_latents_CK: np.ndarray  # latents by descending individual F1
    topk_f1_CK: np.ndarray  # F1 of the OR of the first k of them
    omp: OMPPath | None  # NN-OMP on the continuous codes, when asked for

    def match_score(self, k: int) -> float:
        """MATCHScore@k: mean FBMP rec_F1 after at most k steps."""
        return float(_at_k(self.fbmp.rec_f1_CS, k).mean())

    def best_single_score(self, criterion: str = "f1") -> float:
        """Mean F1 of the best single latent chosen by `criterion` (MATCHScore top-1 for F1)."""
        if criterion not in self.best:
            raise VisaeError(f"unknown criterion {criterion!r}: one of {', '.join(CRITERIA)}")
        return float(self.best[criterion].f1_C.mean())

    def topk_score(self, k: int) -> float:
        """Mean F1 of the union of each concept's top-k latents by individual F1."""
        return float(_at_k(self.topk_f1_CK, k).mean())

    def omp_score(self, k: int) -> float:
        """Mean NN-OMP F1 with at most k atoms."""
        if self.omp is None:
            raise VisaeError("NN-OMP was not run: match_concepts(..., omp=True)")
        return float(_at_k(self.omp.f1_CK, k).mean())

    def _row(self, concept: int) -> int:
        if concept in self.excluded:
            raise VisaeError(
                f"concept {concept} ({self.names[concept]}) has no positive image: excluded"
            )
        row = int(np.searchsorted(self.concepts_C, concept))
        if row == len(self.concepts_C) or self.concepts_C[row] != concept:
            raise VisaeError(f"concept {concept} is not a label column (0..{len(self.names) - 1})")
        return row

    def matched_coalition(self, concept: int, k: int) -> np.ndarray:
        """M(concept): FBMP latents up to k_eff = min(argmax rec_F1 + 1, k). Empty when the
        concept's best F1 is 0: FBMP records no step then (F1 never rises above 0)."""
        _check_steps(k, "k")
        row = self._row(concept)
        k_eff = min(int(self.fbmp.rec_f1_CS[row].argmax()) + 1, k)
        chosen = self.fbmp.latents_CS[row, :k_eff]
        return chosen[chosen >= 0]

    def coalitions(self, k: int) -> dict[int, np.ndarray]:
        """M(c) for every scored concept, the input of `visae.eval.tapa.tapa_score`."""
        return {int(c): self.matched_coalition(int(c), k) for c in self.concepts_C}


def match_concepts(
    codes_NL: Any,
    labels_NC: Any,
    *,
    beta: float = 1.0,
    max_steps: int = 20,
    names: Sequence[str] | None = None,
    omp: bool = False,
) -> MatchResult:
    """FBMP (selection by F_beta) and the one-to-one baselines for every concept with a
    positive image; `omp` adds NN-OMP on the codes as given (meaningful for continuous codes).
    `max_steps` bounds FBMP, the top-k unions and NN-OMP alike."""
    _check_beta(beta)
    _check_steps(max_steps)
    Z = _BinaryCodes(codes_NL)
    Y_NC = _labels(labels_NC, Z.n)
    all_names = tuple(str(c) for c in range(Y_NC.shape[1])) if names is None else tuple(names)
    if len(all_names) != Y_NC.shape[1]:
        raise VisaeError(f"{len(all_names)} concept names for {Y_NC.shape[1]} label columns")
    positives = Y_NC.sum(axis=0)
    concepts = np.flatnonzero(positives > 0)
    if not concepts.size:
        raise VisaeError(f"no concept has a positive image among the {Z.n} images")
    Ys = Y_NC[:, concepts]
    best, top_CK, union_f1 = _one_to_one(Z, Ys, max_steps)
    return MatchResult(
        names=all_names,
        concepts_C=concepts,
        excluded=tuple(int(c) for c in np.flatnonzero(positives == 0)),
        n_latents=Z.n_latents,
        beta=float(beta),
        fbmp=_fbmp(Z, Ys, beta, max_steps),
        best=best,
        topk_latents_CK=top_CK,
        topk_f1_CK=union_f1,
        omp=nn_omp(codes_NL, Ys, max_steps) if omp else None,
    )


def delta_match(trained: MatchResult, baseline: MatchResult, k: int) -> float:
    """DeltaMATCHScore@k = MATCHScore@k(trained) - MATCHScore@k(baseline), on the same concepts
    and beta (the baseline: a frozen SAE's codes, or random activations)."""
    if not np.array_equal(trained.concepts_C, baseline.concepts_C):
        raise VisaeError("DeltaMATCH needs both results scored on the same concepts")
    if trained.beta != baseline.beta:
        raise VisaeError(f"DeltaMATCH needs one beta, got {trained.beta} and {baseline.beta}")
    return trained.match_score(k) - baseline.match_score(k)
