"""Monosemanticity Score (MS) of Pach et al. 2025, "Sparse Autoencoders Learn Monosemantic
Features in Vision-Language Models" (arXiv 2504.02821): how alike, under an independent image
encoder E, are the images a latent fires on, each pair weighted by how strongly it fires on both.

For latent k over N images with activations a_n:

    a~_n = (a_n - min a) / (max a - min a)      min-max over the N evaluated images
    p_n  = E(x_n) / ||E(x_n)||                  unit embeddings
    MS_k = sum_{n<m} a~_n a~_m cos(p_n, p_m) / sum_{n<m} a~_n a~_m

a weighted average of pair similarities over unordered pairs, no self pairs. Expanding
||sum_n a~_n p_n||^2 gives the exact linear-time form, for every latent at once two matrix
products and row norms:

    V = A~^T P  [L, E],   Q = sum_n a~_n^2,   S = sum_n a~_n,   MS = (||V||^2 - Q) / (S^2 - Q)

`monosemanticity` computes it in float64, a chunk of latents at a time (memory bounded by
`chunk_latents` x N, whatever the number of latents). It takes the image whose a~ is 1 (the
first maximum, n*) out of the sums first: with V' = V - p_n*, S' = S - 1, Q' = Q - 1,

    MS = (2 p_n*.V' + ||V'||^2 - Q') / (2 S' + S'^2 - Q')

which is the same number, but keeps its digits when one image carries most of a latent's
weight (one strong image and a few weak ones), where ||V||^2 - Q cancels. Sparse activations
(scipy.sparse or torch sparse, image-level SAE codes) are used as stored: a column with an
implicit zero and a positive maximum needs only its stored entries, since its implicit images
all have a~ = c = -min/(max - min), so V' = sum_{stored != n*} (a_n / (max - min)) p_n +
c (sum_n p_n - p_n*); other columns are made dense.

Undefined latents are reported apart, never as a number (NaN in `score` and `corrected`):
- dead: constant over the N images (max == min, including a latent that never fires); the
  reference's 0/0.
- single_image: above its minimum on one image only. Every pair then has weight 0: there is no
  pair to average over (0/0 again), whatever that image is.

Chance level and the corrected score: the chance level under E is the mean cosine of all
unordered pairs of distinct images, computed from the sum of the unit embeddings,

    chance = (||sum_n p_n||^2 - N) / (N (N - 1)),     corrected = (MS - chance) / (1 - chance).

A latent that fires on random images, independently of what they show, has exchangeable
weights (E[a~_n a~_m] the same for every pair), so its expected numerator over expected
denominator is the chance level, not 0. Embeddings of one model are often all alike (a mean
pairwise cosine of 0.92 is common for a ViT's CLS token), and then a raw MS of 0.93 says
nothing; the corrected score is 0 at chance, 1 when the weighted pairs are identical under E,
and negative when a latent prefers unlike images.

Raw-neuron baseline (Pach et al. compare SAE latents with the layer's d basis directions): it
is `monosemanticity(layer_activations_ND, embeddings_NE)`, no wrapper. Neurons take negative
values; METHODS.md applies no ReLU or absolute value, and min-max normalisation handles the
sign: a neuron's weight on an image is how far above its minimum over the images it is, so the
score is that of its positive direction (a neuron and its negation score differently).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from visae.errors import VisaeError
from visae.eval.bootstrap import bootstrap_ci

# one [N, chunk] float64 block of activations at most (a few such blocks live at once)
_CHUNK_BYTES = 2**27


@dataclass(frozen=True)
class MSResult:
    """Per-latent Monosemanticity Scores of L latents over `n_images` images.

    `score` and `corrected` are [L] float64, NaN exactly where the score is undefined
    (`dead` or `single_image`, both [L] bool); `chance` is the mean pairwise cosine of the
    images under E.
    """

    score: np.ndarray
    corrected: np.ndarray
    dead: np.ndarray
    single_image: np.ndarray
    chance: float
    n_images: int

    @property
    def live(self) -> np.ndarray:
        """[L] bool: latents with a score."""
        return ~(self.dead | self.single_image)

    def stats(
        self, top: int = 5, n_resamples: int = 2000, level: float = 0.95, seed: int = 0
    ) -> dict[str, Any]:
        """Mean +- std (population std) of the live latents' scores, raw and corrected, each
        mean with its percentile-bootstrap interval over latents (None below 2 live latents),
        the fractions undefined, and the `top` best and worst latents as (latent, score,
        corrected)."""
        live = np.flatnonzero(self.live)
        out: dict[str, Any] = {
            "n_images": self.n_images,
            "n_latents": len(self.score),
            "n_live": len(live),
            "fraction_dead": float(self.dead.mean()),
            "fraction_single_image": float(self.single_image.mean()),
            "chance": self.chance,
        }
        for key, values in (("score", self.score), ("corrected", self.corrected)):
            v = values[live]
            out[key] = {
                "mean": float(v.mean()) if len(v) else None,
                "std": float(v.std()) if len(v) else None,
                "mean_ci": (
                    list(bootstrap_ci(v, np.mean, n_resamples, level, seed)[1:])
                    if len(v) >= 2
                    else None
                ),
            }
        order = live[np.argsort(-self.score[live], kind="stable")]
        out["top"] = [(int(k), float(self.score[k]), float(self.corrected[k])) for k in order[:top]]
        out["bottom"] = [
            (int(k), float(self.score[k]), float(self.corrected[k])) for k in order[::-1][:top]
        ]
        return out

    def summary(
        self, top: int = 5, n_resamples: int = 2000, level: float = 0.95, seed: int = 0
    ) -> str:
        """Human-readable `stats` (what the CLI prints)."""
        s = self.stats(top, n_resamples, level, seed)
        lines = [
            f"images      {s['n_images']}",
            f"latents     {s['n_latents']}: {s['n_live']} live, "
            f"{s['fraction_dead']:.1%} dead (constant), "
            f"{s['fraction_single_image']:.1%} above their minimum on one image only",
            f"chance      {s['chance']:.4f} (mean pairwise cosine of the images under E)",
        ]
        for key, name in (("score", "MS"), ("corrected", "corrected")):
            m = s[key]
            if m["mean"] is None:
                lines.append(f"{name:<11} undefined: no live latent")
                continue
            ci = m["mean_ci"]
            interval = f", {level:.0%} CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
            lines.append(f"{name:<11} {m['mean']:.4f} +- {m['std']:.4f}{interval}")
        for key in ("top", "bottom"):
            cells = ", ".join(f"{k} ({v:.3f}, corr {c:.3f})" for k, v, c in s[key])
            lines.append(f"{key:<11} {cells or '-'}")
        return "\n".join(lines)


def chance_level(embeddings_NE: np.ndarray | Tensor) -> float:
    """Mean cosine over unordered pairs of distinct images, in O(N E): what a latent whose
    weights do not depend on the images scores in expectation."""
    return _chance(_unit_rows(embeddings_NE))


def monosemanticity(
    acts_NL: Any,
    embeddings_NE: np.ndarray | Tensor,
    *,
    chunk_latents: int | None = None,
    progress: bool = True,
) -> MSResult:
    """MS of every latent (column of `acts_NL`) over N images, exact, in float64.

    `acts_NL`: numpy or torch, dense, or a scipy.sparse / torch sparse matrix (used as stored).
    `embeddings_NE`: E's embedding of each image (any nonzero scale). `chunk_latents`: latents
    per chunk (default: a [N, chunk] float64 block of 128 MiB). Computed on the CPU.
    """
    p_NE = _unit_rows(embeddings_NE)
    n = p_NE.shape[0]
    chance = _chance(p_NE)
    if 1.0 - chance < 1e-9:
        raise VisaeError(
            "embeddings_NE: every image has the same direction (chance level 1): E cannot tell "
            "the images apart"
        )
    if chunk_latents is not None and chunk_latents < 1:
        raise VisaeError(f"chunk_latents must be positive, not {chunk_latents}")
    acts = _Acts(acts_NL, n)
    chunk = chunk_latents or max(1, _CHUNK_BYTES // (8 * n))
    sum_p_E = p_NE.sum(0)
    starts = range(0, acts.n_latents, chunk)
    bar = tqdm(
        starts, desc="monosemanticity", unit="chunk", disable=not progress or len(starts) < 2
    )
    parts = [acts.terms(i, min(i + chunk, acts.n_latents), p_NE, sum_p_E) for i in bar]
    num, den, dead, n_pos = (torch.cat(t) for t in zip(*parts, strict=True))
    defined = ~dead & (n_pos >= 2)
    score = torch.where(defined, num / torch.where(defined, den, 1.0), math.nan).numpy()
    return MSResult(
        score=score,
        corrected=(score - chance) / (1.0 - chance),
        dead=dead.numpy(),
        single_image=(~dead & (n_pos == 1)).numpy(),
        chance=chance,
        n_images=n,
    )


def monosemanticity_pairs(acts_NL: Any, embeddings_NE: Any) -> np.ndarray:
    """The O(N^2) pair-loop reference (tests and benchmarks only): [L] float64, NaN where no
    pair has positive weight (a constant latent, or one above its minimum on one image)."""
    a = np.asarray(acts_NL, dtype=np.float64)
    e = np.asarray(embeddings_NE, dtype=np.float64)
    p = e / np.linalg.norm(e, axis=1, keepdims=True)
    cos = p @ p.T
    n, n_lat = a.shape
    out = np.full(n_lat, np.nan)
    for k in range(n_lat):
        lo, hi = a[:, k].min(), a[:, k].max()
        if hi == lo:
            continue
        w = ((a[:, k] - lo) / (hi - lo)).tolist()
        num = den = 0.0
        for i in range(n):
            row = cos[i].tolist()
            for j in range(i + 1, n):
                wij = w[i] * w[j]
                num += wij * row[j]
                den += wij
        if den > 0:
            out[k] = num / den
    return out


def _unit_rows(embeddings_NE: np.ndarray | Tensor) -> Tensor:
    """[N, E] float64 unit rows; bad input refused with the reason."""
    e = torch.as_tensor(embeddings_NE).detach().to("cpu", torch.float64)
    if e.dim() != 2:
        raise VisaeError(f"embeddings_NE must be [images, dim], got shape {tuple(e.shape)}")
    if e.shape[0] < 2:
        raise VisaeError(f"the score needs pairs of images, got {e.shape[0]} image(s)")
    if not torch.isfinite(e).all():
        raise VisaeError("embeddings_NE holds non-finite values (NaN or inf)")
    norm = torch.linalg.vector_norm(e, dim=1)
    zero = torch.nonzero(norm == 0)
    if len(zero):
        raise VisaeError(f"embeddings_NE row {int(zero[0])} is zero: it has no direction")
    return e / norm[:, None]


def _chance(p_NE: Tensor) -> float:
    n = p_NE.shape[0]
    s = p_NE.sum(0)
    return float(((s @ s) - n) / (n * (n - 1)))


class _Acts:
    """The activations, dense or as column-sorted stored entries, read a chunk of columns at
    a time as float64."""

    def __init__(self, acts_NL: Any, n_images: int) -> None:
        self.sparse = hasattr(acts_NL, "tocsc") or (
            isinstance(acts_NL, Tensor) and acts_NL.layout != torch.strided
        )
        if self.sparse:
            self.colptr, self.rows, self.vals, shape = _csc(acts_NL)
            if not torch.isfinite(self.vals).all():
                raise VisaeError("acts_NL holds non-finite values (NaN or inf)")
        else:
            self.dense = acts_NL if isinstance(acts_NL, Tensor) else np.asarray(acts_NL)
            if (
                self.dense.dtype.is_complex
                if isinstance(self.dense, Tensor)
                else self.dense.dtype.kind not in "biuf"
            ):
                raise VisaeError(f"acts_NL must be real numbers, not {self.dense.dtype}")
            shape = tuple(self.dense.shape)
        if len(shape) != 2:
            raise VisaeError(f"acts_NL must be [images, latents], got shape {shape}")
        if shape[0] != n_images:
            raise VisaeError(
                f"acts_NL has {shape[0]} rows (images) but embeddings_NE has {n_images}"
            )
        if shape[1] == 0:
            raise VisaeError("acts_NL has no latents (columns)")
        self.n_images, self.n_latents = shape

    def terms(self, start: int, stop: int, p_NE: Tensor, sum_p_E: Tensor) -> tuple[Tensor, ...]:
        """(numerator, denominator, dead, images above the minimum) of columns start:stop."""
        if not self.sparse:
            if isinstance(self.dense, Tensor):
                x = self.dense[:, start:stop].detach().to("cpu", torch.float64, copy=True)
            else:
                x = torch.from_numpy(np.array(self.dense[:, start:stop], dtype=np.float64))
            if not torch.isfinite(x).all():
                raise VisaeError("acts_NL holds non-finite values (NaN or inf)")
            return _dense_terms(x, p_NE)
        return _sparse_terms(
            self.colptr[start : stop + 1], self.rows, self.vals, self.n_images, p_NE, sum_p_E
        )


def _csc(acts: Any) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
    """(column pointer, row of each entry, its value as float64, shape) of a sparse matrix,
    duplicates summed; the caller's matrix is left as it was."""
    if isinstance(acts, Tensor):
        if acts.dim() != 2:
            raise VisaeError(f"acts_NL must be [images, latents], got shape {tuple(acts.shape)}")
        t = acts.detach().cpu()
        if t.layout == torch.sparse_coo:
            t = t.coalesce()
        if t.dtype.is_complex:
            raise VisaeError(f"acts_NL must be real numbers, not {t.dtype}")
        with warnings.catch_warnings():  # "CSR support is in beta": a one-time notice, not ours
            warnings.simplefilter("ignore", UserWarning)
            csc = t.to_sparse_csc()
        return (
            csc.ccol_indices().long(),
            csc.row_indices().long(),
            csc.values().to(torch.float64),
            tuple(t.shape),
        )
    csc = acts.tocsc(copy=True)
    csc.sum_duplicates()
    if csc.data.dtype.kind not in "biuf":
        raise VisaeError(f"acts_NL must be real numbers, not {csc.data.dtype}")
    return (
        torch.from_numpy(csc.indptr.astype(np.int64)),
        torch.from_numpy(csc.indices.astype(np.int64)),
        torch.from_numpy(csc.data.astype(np.float64)),
        tuple(csc.shape),
    )


def _dense_terms(x_NC: Tensor, p_NE: Tensor) -> tuple[Tensor, ...]:
    """Terms of the columns of a float64 block (overwritten: it becomes a~ without n*)."""
    lo, hi = x_NC.amin(0), x_NC.amax(0)
    dead = lo == hi
    at_NC = x_NC.sub_(lo).div_(torch.where(dead, 1.0, hi - lo))
    n_pos = (at_NC > 0).sum(0)
    top_C = at_NC.argmax(0)
    at_NC[top_C, torch.arange(at_NC.shape[1])] = 0.0
    v_CE = at_NC.T @ p_NE
    s, q = at_NC.sum(0), (at_NC * at_NC).sum(0)
    num = 2 * (p_NE[top_C] * v_CE).sum(1) + (v_CE * v_CE).sum(1) - q
    return num, 2 * s + s * s - q, dead, n_pos


def _sparse_terms(
    colptr: Tensor, rows: Tensor, vals: Tensor, n: int, p_NE: Tensor, sum_p_E: Tensor
) -> tuple[Tensor, ...]:
    """Terms of the columns whose stored entries are colptr[0]:colptr[-1]: from the entries
    where a column has an implicit zero and a positive maximum, from a dense copy otherwise."""
    first, last = int(colptr[0]), int(colptr[-1])
    rows, vals = rows[first:last], vals[first:last]
    n_col = len(colptr) - 1
    count = colptr.diff()
    col = torch.repeat_interleave(torch.arange(n_col), count)
    implicit = count < n
    hi = torch.full((n_col,), -math.inf, dtype=torch.float64).scatter_reduce(0, col, vals, "amax")
    lo = torch.full((n_col,), math.inf, dtype=torch.float64).scatter_reduce(0, col, vals, "amin")
    hi = torch.where(implicit, hi.clamp(min=0.0), hi)
    lo = torch.where(implicit, lo.clamp(max=0.0), lo)
    dead = lo == hi
    span = torch.where(dead, 1.0, hi - lo)
    fast = implicit & (hi > 0)
    num = torch.zeros(n_col, dtype=torch.float64)
    den = torch.zeros(n_col, dtype=torch.float64)
    n_pos = torch.zeros(n_col, dtype=torch.long)

    if fast.any():
        c = torch.where(fast, -lo / span, 0.0)  # a~ of every implicit image
        n_impl = (n - count).to(torch.float64)
        at = (vals - lo[col]) / span[col]
        pos = torch.arange(len(vals))
        is_top = fast[col] & (vals == hi[col])
        top = torch.full((n_col,), len(vals)).scatter_reduce(0, col[is_top], pos[is_top], "amin")
        top = torch.where(fast, top, 0)
        keep = fast[col]
        keep[top[fast]] = False
        with warnings.catch_warnings():  # "CSR support is in beta": a one-time notice, not ours
            warnings.simplefilter("ignore", UserWarning)
            w = torch.sparse_csr_tensor(
                colptr - first,
                rows,
                torch.where(keep, vals / span[col], 0.0),
                (n_col, n),
                check_invariants=False,
            )
            p_top = p_NE[rows[top]]
            v_CE = w @ p_NE + c[:, None] * (sum_p_E - p_top)
        at_kept = torch.where(keep, at, 0.0)
        s = torch.zeros(n_col, dtype=torch.float64).index_add_(0, col, at_kept) + n_impl * c
        q = torch.zeros(n_col, dtype=torch.float64).index_add_(0, col, at_kept * at_kept)
        q += n_impl * c * c
        num = 2 * (p_top * v_CE).sum(1) + (v_CE * v_CE).sum(1) - q
        den = 2 * s + s * s - q
        n_pos = torch.zeros(n_col, dtype=torch.long).index_add_(0, col, (at > 0).long())
        n_pos += torch.where(c > 0, n - count, 0)

    slow = torch.nonzero(~fast & ~dead).flatten()
    if len(slow):
        where = torch.full((n_col,), -1).index_copy_(0, slow, torch.arange(len(slow)))
        mine = where[col] >= 0
        x_NC = torch.zeros(n, len(slow), dtype=torch.float64)
        x_NC[rows[mine], where[col[mine]]] = vals[mine]
        s_num, s_den, _, s_pos = _dense_terms(x_NC, p_NE)
        num[slow], den[slow], n_pos[slow] = s_num, s_den, s_pos
    return num, den, dead, n_pos
