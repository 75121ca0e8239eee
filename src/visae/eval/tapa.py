"""TAPAScore (Klotz et al. 2026, arXiv 2606.24716): do the latents matched to a concept switch
on and off when an image pair changes exactly that concept?

Inputs: the codes of both images of P pairs (x, x'), [P, L] each, dense or scipy.sparse,
binarised as b(z) = 1[z > 0] (the paper's rule here; matching's is z > 1e-8); per pair the old
and the new concept (-1 or None: none, for addition-only and removal-only pairs); the matched
coalitions M(c) (`MatchResult.coalitions(k)`: FBMP latents truncated to the best-F1 step, empty
when the concept's best F1 is 0).

Rules (METHODS.md, "Concept matching and TAPAScore"):
- I_rem = M(old) minus M(new), I_add = M(new) minus M(old) (M(none) = empty);
  Delta_S = max_{j in S} b(z'_j) - max_{j in S} b(z_j), and 0 for an empty S.
- Swap and addition pairs: TAPA = mean(Delta_add) - mean(Delta_rem) over them, in [-2, 2].
  Removal-only pairs (synCOCO): TAPA = -mean(Delta_rem), in [-1, 1]. Both kinds are reported
  apart, never mixed.
- Leakage (logged, not in the score): per pair, the mean |Delta_M(c)| over the concepts c
  present in the first image, other than old and new, with a non-empty coalition; undefined
  (NaN) for a pair with none; its mean over the pairs where it is defined.
- Per concept: the same two scores over the pairs whose old or new concept it is.
Every Delta is a gather of (pair, latent) bits from the sorted nonzero keys of the codes: no
[P, L] table beyond the codes themselves, nothing looped per pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from visae.errors import VisaeError


class _Bits:
    """b(z) = 1[z > 0] of a [P, L] code matrix, as sorted (pair * L + latent) keys."""

    def __init__(self, codes_PL: Any, what: str) -> None:
        if sp.issparse(codes_PL):
            csr = sp.csr_array(codes_PL, copy=True)
            csr.sum_duplicates()  # canonical: sorted columns per row, so the keys come sorted
            rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
            values, cols, shape = csr.data, csr.indices, csr.shape
        else:
            dense = np.asarray(codes_PL)
            if dense.ndim != 2:
                raise VisaeError(
                    f"{what} codes must be a 2-D [pairs, latents] array, got {dense.shape}"
                )
            rows, cols = np.nonzero(dense)
            values, shape = dense[rows, cols], dense.shape
        if values.dtype != bool and not np.isfinite(values).all():
            raise VisaeError(f"{what} codes hold NaN or infinite values")
        on = values > 0
        self.shape = shape
        self._keys = rows[on].astype(np.int64) * shape[1] + cols[on]

    def any_on(self, pairs_E: np.ndarray, latents_EK: np.ndarray) -> np.ndarray:
        """max_{j in S_e} b(z_pj) per entry e = (pair p, latent set S_e: a row of latents_EK,
        -1 = padding), as int8; 0 for an empty set."""
        if not len(self._keys):
            return np.zeros(len(pairs_E), dtype=np.int8)
        keys = pairs_E[:, None].astype(np.int64) * self.shape[1] + latents_EK
        at = np.searchsorted(self._keys, keys).clip(max=len(self._keys) - 1)
        return ((self._keys[at] == keys) & (latents_EK >= 0)).any(axis=1).astype(np.int8)


def _concept_ids(values: Any, n_pairs: int, what: str) -> np.ndarray:
    ids = np.array([-1 if v is None else v for v in values], dtype=np.int64).reshape(-1)
    if len(ids) != n_pairs:
        raise VisaeError(f"{len(ids)} {what} concepts for {n_pairs} pairs")
    bad = np.flatnonzero(ids < -1)
    if bad.size:
        raise VisaeError(f"pair {bad[0]}: {what} concept {ids[bad[0]]} is not a concept index")
    return ids


def _coalition_table(
    coalitions: Mapping[int, Any], n_latents: int
) -> tuple[np.ndarray, np.ndarray]:
    """Coalitions as a [concepts + 1, K] latent table padded with -1 (last row: the empty one
    of `none`), and which concept ids have a coalition at all."""
    sets = {int(c): np.unique(np.asarray(m, dtype=np.int64)) for c, m in coalitions.items()}
    if any(c < 0 for c in sets):
        raise VisaeError(f"coalition keys must be concept indices, got {min(sets)}")
    n_ids = max(sets, default=-1) + 1
    width = max((len(m) for m in sets.values()), default=0)
    table = np.full((n_ids + 1, max(width, 1)), -1, dtype=np.int64)
    known = np.zeros(n_ids + 1, dtype=bool)
    for c, m in sets.items():
        if m.size and (m[0] < 0 or m[-1] >= n_latents):
            raise VisaeError(f"coalition of concept {c} holds latent outside 0..{n_latents - 1}")
        table[c, : len(m)] = m
        known[c] = True
    return table, known


def _minus(a_PK: np.ndarray, b_PK: np.ndarray) -> np.ndarray:
    """Row-wise set difference of padded latent tables: a's latents not in b, rest -1."""
    inside = (a_PK[:, :, None] == b_PK[:, None, :]).any(axis=2)
    return np.where(inside, -1, a_PK)


@dataclass(frozen=True)
class ConceptTapa:
    """TAPAScore over the pairs whose old or new concept is this one (None: no such pair)."""

    n_swap_add: int
    swap_add: float | None
    n_removal: int
    removal: float | None


@dataclass(frozen=True)
class TapaResult:
    """TAPAScore of one set of codes on one set of pairs; per-pair arrays have suffix P."""

    kind_P: np.ndarray  # "swap", "add" or "remove"
    delta_add_P: np.ndarray  # Delta over I_add, in {-1, 0, 1}
    delta_rem_P: np.ndarray  # Delta over I_rem
    leakage_P: np.ndarray  # NaN where no other present concept has a coalition
    swap_add: float | None  # mean(Delta_add) - mean(Delta_rem) over swap and add pairs
    removal: float | None  # -mean(Delta_rem) over removal-only pairs
    leakage: float | None  # mean of leakage_P where defined
    per_concept: dict[int, ConceptTapa]

    @property
    def n_swap_add(self) -> int:
        return int(np.isin(self.kind_P, ("swap", "add")).sum())

    @property
    def n_removal(self) -> int:
        return int((self.kind_P == "remove").sum())


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def tapa_score(
    first_PL: Any,
    second_PL: Any,
    old_P: Sequence[int | None] | np.ndarray,
    new_P: Sequence[int | None] | np.ndarray,
    coalitions: Mapping[int, Any],
    present_PC: Any | None = None,
) -> TapaResult:
    """TAPAScore of pairs x -> x' changing one concept old -> new (module docstring for the
    rules). `present_PC`, the first images' binary concept labels [P, C], enables leakage."""
    first, second = _Bits(first_PL, "first-image"), _Bits(second_PL, "second-image")
    if first.shape != second.shape:
        raise VisaeError(
            f"first-image codes {first.shape} and second-image codes {second.shape} differ"
        )
    n_pairs, n_latents = first.shape
    if n_pairs == 0:
        raise VisaeError("no pairs to score")
    old, new = _concept_ids(old_P, n_pairs, "old"), _concept_ids(new_P, n_pairs, "new")
    for what, ids, bad in (
        ("old and new concept are both none", old, (old < 0) & (new < 0)),
        ("old and new concept are the same", old, (old >= 0) & (old == new)),
    ):
        if bad.any():
            p = int(np.flatnonzero(bad)[0])
            raise VisaeError(f"pair {p}: {what} ({ids[p]})")
    table, known = _coalition_table(coalitions, n_latents)
    none_row = len(table) - 1
    for ids in (old, new):
        missing = (ids >= none_row) | ((ids >= 0) & ~known[np.clip(ids, 0, none_row)])
        if missing.any():
            p = int(np.flatnonzero(missing)[0])
            raise VisaeError(f"pair {p}: concept {ids[p]} has no matched coalition")
    m_old = table[np.where(old >= 0, old, none_row)]
    m_new = table[np.where(new >= 0, new, none_row)]
    i_rem, i_add = _minus(m_old, m_new), _minus(m_new, m_old)
    pairs = np.arange(n_pairs)
    delta_rem = second.any_on(pairs, i_rem) - first.any_on(pairs, i_rem)
    delta_add = second.any_on(pairs, i_add) - first.any_on(pairs, i_add)
    kind = np.where(old < 0, "add", np.where(new < 0, "remove", "swap"))
    swap_add = kind != "remove"
    # Delta_add is 0 on removal-only pairs (I_add is empty): one formula gives both scores
    score_P = (delta_add - delta_rem).astype(np.float64)

    leakage_P = np.full(n_pairs, np.nan)
    if present_PC is not None:
        leakage_P = _leakage(first, second, present_PC, old, new, table, known)
    defined = ~np.isnan(leakage_P)

    per_concept: dict[int, ConceptTapa] = {}
    for c in np.unique(np.concatenate([old, new])):
        if c < 0:
            continue
        touch = (old == c) | (new == c)
        sa, rm = score_P[touch & swap_add], score_P[touch & ~swap_add]
        per_concept[int(c)] = ConceptTapa(len(sa), _mean(sa), len(rm), _mean(rm))
    return TapaResult(
        kind_P=kind,
        delta_add_P=delta_add,
        delta_rem_P=delta_rem,
        leakage_P=leakage_P,
        swap_add=_mean(score_P[swap_add]),
        removal=_mean(score_P[~swap_add]),
        leakage=_mean(leakage_P[defined]),
        per_concept=per_concept,
    )


def _leakage(
    first: _Bits,
    second: _Bits,
    present_PC: Any,
    old: np.ndarray,
    new: np.ndarray,
    table: np.ndarray,
    known: np.ndarray,
) -> np.ndarray:
    """Per pair, mean |Delta_M(c)| over the other present concepts with a non-empty coalition."""
    present = present_PC.toarray() if sp.issparse(present_PC) else np.asarray(present_PC)
    if present.ndim != 2 or present.shape[0] != len(old):
        raise VisaeError(
            f"present concepts must be [pairs={len(old)}, concepts], got {present.shape}"
        )
    if present.dtype != bool:
        if (~((present == 0) | (present == 1))).any():
            raise VisaeError("present concepts must be 0/1")
        present = present == 1
    pairs, concepts = np.nonzero(present)
    usable = concepts < len(table) - 1
    pairs, concepts = pairs[usable], concepts[usable]
    keep = known[concepts] & (table[concepts, 0] >= 0)
    keep &= (concepts != old[pairs]) & (concepts != new[pairs])
    pairs, concepts = pairs[keep], concepts[keep]
    # one row per (pair, concept) entry: the Delta gather, then a mean per pair
    latents_EK = table[concepts]
    abs_delta = np.abs(second.any_on(pairs, latents_EK) - first.any_on(pairs, latents_EK))
    counts = np.bincount(pairs, minlength=len(old))
    sums = np.bincount(pairs, weights=abs_delta, minlength=len(old))
    return np.divide(sums, counts, out=np.full(len(old), np.nan), where=counts > 0)
