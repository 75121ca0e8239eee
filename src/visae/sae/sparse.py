"""Sparse kernels for the TopK family: one dense matmul per step, everything else k-sparse.

A TopK training step's only dense product is the encoder's `x @ W_enc.T`. The gradient that
reaches the pre-activations is nonzero at the selected latents only, so W_enc's gradient is a
gather-sum over the batch, the decoder is a gather-sum over dictionary rows (never a
`[batch, k, d]` tensor), and b_dec's gradient through the encoder is the batch sum of that
sparse gradient times W_enc (one matrix-vector product). `torch.nn.functional.embedding_bag`
(weighted sum of rows, mode "sum") and `torch.sparse.sampled_addmm` (dot products at the
selected positions) do the work; two `torch.autograd.Function`s wire them into autograd.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class SparseCodes:
    """Positive codes of a batch as entries (rows[m], cols[m]) grouped by row.

    `crow` is the CSR row pointer ([n_rows + 1]). The column-sorted view used for the
    dictionary-shaped gradients is computed once, on first use, and shared by both kernels.
    """

    def __init__(
        self, rows: Tensor, cols: Tensor, n_rows: int, n_cols: int, crow: Tensor | None = None
    ) -> None:
        self.rows = rows
        self.cols = cols
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.crow = _pointer(torch.bincount(rows, minlength=n_rows)) if crow is None else crow
        self._by_col: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def nnz(self) -> int:
        return int(self.rows.numel())

    def subset(self, keep: Tensor) -> SparseCodes:
        """The entries at increasing positions `keep` (still grouped by row)."""
        return SparseCodes(self.rows[keep], self.cols[keep], self.n_rows, self.n_cols)

    def col_order(self) -> tuple[Tensor, Tensor, Tensor]:
        """(permutation sorting the entries by column, column pointer [n_cols + 1], the rows
        in that order)."""
        if self._by_col is None:
            perm = _stable_argsort(self.cols, self.n_cols)
            ptr = _pointer(torch.bincount(self.cols, minlength=self.n_cols))
            self._by_col = perm, ptr, self.rows[perm]
        return self._by_col

    def to_dense(self, values: Tensor) -> Tensor:
        """[n_rows, n_cols] codes (differentiable in `values`)."""
        dense = values.new_zeros(self.n_rows, self.n_cols)
        return dense.index_put((self.rows, self.cols), values)


_PORTABLE_ONLY = False

# Elements gathered per chunk by the portable sampled dot products: two [chunk, d] gathers of
# at most 2^22 values (16 MB each in float32) whatever the batch.
GATHER_CHUNK_ELEMENTS = 1 << 22


@contextlib.contextmanager
def portable_kernels() -> Iterator[None]:
    """Use the device-independent kernels on CPU too, within the block.

    Off the CPU they are always used; on CPU this lets the tests check them against the CPU
    kernels and against dense references, which a machine without an accelerator could not
    otherwise do.
    """
    global _PORTABLE_ONLY
    previous, _PORTABLE_ONLY = _PORTABLE_ONLY, True
    try:
        yield
    finally:
        _PORTABLE_ONLY = previous


def _cpu_kernels(t: Tensor) -> bool:
    """True where the CPU-only kernels apply: CSR `sampled_addmm` (verified on CPU only, with
    the unsorted column indices used here) and numpy's radix sort."""
    return t.device.type == "cpu" and not _PORTABLE_ONLY


def _stable_argsort(keys: Tensor, n_keys: int) -> Tensor:
    """Stable argsort of integer keys in [0, n_keys).

    On CPU with keys that fit int16, numpy's single-threaded radix sort (~1.5 ms for 131k keys):
    torch's parallel radix sort synchronises its threads several times per call, and each
    barrier can wait a whole scheduler tick when other processes share the cores. Elsewhere
    torch's own stable sort, on the keys' device.
    """
    if _cpu_kernels(keys) and n_keys <= np.iinfo(np.int16).max:
        order = np.argsort(keys.numpy().astype(np.int16), kind="stable")
        return torch.from_numpy(order)
    return torch.argsort(keys, stable=True)


def _pointer(counts: Tensor) -> Tensor:
    ptr = counts.new_zeros(counts.numel() + 1)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


def bag_sum(table: Tensor, index: Tensor, ptr: Tensor, weights: Tensor) -> Tensor:
    """out[b] = sum_{m in bag b} weights[m] * table[index[m]]; bags are ranges of `ptr`."""
    return F.embedding_bag(
        index, table, offsets=ptr[:-1], per_sample_weights=weights.to(table.dtype), mode="sum"
    )


def sampled_dots(ptr: Tensor, cols: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """out[m] = <left[bag(m)], right[cols[m]]> for entries grouped into bags by `ptr`.

    On CPU a sampled dense-dense product (`torch.sparse.sampled_addmm` on a CSR mask); on any
    other device, or under `portable_kernels()`, gathered rows and row-wise dot products in
    chunks of bounded size: plain indexing, correct by construction on every backend.
    """
    if cols.numel() == 0:
        return left.new_zeros(0)
    if not _cpu_kernels(left):
        return _gathered_dots(ptr, cols, left, right)
    with warnings.catch_warnings():  # "CSR support is in beta": a one-time notice, not ours
        warnings.simplefilter("ignore", UserWarning)
        mask = torch.sparse_csr_tensor(
            ptr,
            cols,
            left.new_zeros(cols.numel()),
            size=(ptr.numel() - 1, right.shape[0]),
            check_invariants=False,
        )
        return torch.sparse.sampled_addmm(mask, left, right.t(), beta=0.0).values()


def _gathered_dots(ptr: Tensor, cols: Tensor, left: Tensor, right: Tensor) -> Tensor:
    nnz = cols.numel()
    bags = torch.arange(ptr.numel() - 1, device=cols.device)
    rows = torch.repeat_interleave(bags, ptr[1:] - ptr[:-1], output_size=nnz)
    out = left.new_empty(nnz)
    step = max(1, GATHER_CHUNK_ELEMENTS // max(1, left.shape[1]))
    for start in range(0, nnz, step):
        stop = min(start + step, nnz)
        out[start:stop] = torch.linalg.vecdot(left[rows[start:stop]], right[cols[start:stop]])
    return out


def column_sums(codes: SparseCodes, grad: Tensor, table: Tensor) -> Tensor:
    """[n_cols, d]: sum over entries of column j of grad[m] * table[rows[m]]."""
    perm, ptr, rows = codes.col_order()
    return bag_sum(table, rows, ptr, grad[perm])


class GatherPreacts(torch.autograd.Function):
    """Selected pre-activations `(x - b_dec) @ W_enc.T + b_enc` at the codes' entries.

    Forward returns the precomputed `values` (the dense pre-activations were computed once,
    without autograd); backward produces the sparse gradients of x, W_enc, b_enc and b_dec.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        values: Tensor,
        x: Tensor,
        w_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        codes: SparseCodes,
    ) -> Tensor:
        ctx.codes = codes  # type: ignore[attr-defined]
        ctx.save_for_backward(x, w_enc, b_dec)
        return values.clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        codes: SparseCodes = ctx.codes  # type: ignore[attr-defined]
        x, w_enc, b_dec = ctx.saved_tensors  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad = grad.to(w_enc.dtype)
        col_total = w_enc.new_zeros(codes.n_cols).index_add_(0, codes.cols, grad)
        grad_x = grad_w = grad_b_enc = grad_b_dec = None
        if need[1]:
            grad_x = bag_sum(w_enc, codes.cols, codes.crow, grad).to(x.dtype)
        if need[2]:
            grad_w = column_sums(codes, grad, x.to(w_enc.dtype))
            grad_w.addr_(col_total, b_dec, alpha=-1.0)
        if need[3]:
            grad_b_enc = col_total
        if need[4]:
            grad_b_dec = -(col_total @ w_enc)
        return None, grad_x, grad_w, grad_b_enc, grad_b_dec, None


class SparseDecode(torch.autograd.Function):
    """Sum of decoder rows weighted by the codes, per bag of entries (no bias).

    Bags are contiguous entry ranges given by `ptr`: one bag per token for the plain
    reconstruction, one per (token, Matryoshka segment) for the nested ones.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        values: Tensor,
        w_dec: Tensor,
        codes: SparseCodes,
        ptr: Tensor,
        bag_of: Tensor,
    ) -> Tensor:
        ctx.codes = codes  # type: ignore[attr-defined]
        ctx.save_for_backward(values, w_dec, ptr, bag_of)
        return bag_sum(w_dec, codes.cols, ptr, values)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        codes: SparseCodes = ctx.codes  # type: ignore[attr-defined]
        values, w_dec, ptr, bag_of = ctx.saved_tensors  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad = grad.contiguous()
        grad_values = grad_w = None
        if need[0]:
            grad_values = sampled_dots(ptr, codes.cols, grad, w_dec).to(values.dtype)
        if need[1]:
            perm, col_ptr, rows = codes.col_order()
            bags = rows if bag_of is codes.rows else bag_of[perm]
            grad_w = bag_sum(grad, bags, col_ptr, values[perm])
        return grad_values, grad_w, None, None, None


def decode_rows(values: Tensor, w_dec: Tensor, codes: SparseCodes) -> Tensor:
    """[n_rows, d] reconstruction (without b_dec), differentiable in values and W_dec."""
    out: Tensor = SparseDecode.apply(values, w_dec, codes, codes.crow, codes.rows)
    return out


def decode_nested(
    values: Tensor, w_dec: Tensor, codes: SparseCodes, sizes: tuple[int, ...]
) -> Tensor:
    """[n_rows, len(sizes), d]: reconstructions from latents < sizes[i] (without b_dec).

    Entries are regrouped into (token, segment) bags with one stable sort, decoded in one
    gather-sum, and accumulated over segments; each latent is read once, not once per prefix.
    """
    n_seg = len(sizes)
    bounds = torch.tensor(sizes[:-1], dtype=codes.cols.dtype, device=codes.cols.device)
    segment = torch.bucketize(codes.cols, bounds, right=True)
    bag = codes.rows * n_seg + segment
    order = torch.argsort(bag, stable=True)
    regrouped = SparseCodes(codes.rows[order], codes.cols[order], codes.n_rows, codes.n_cols)
    bag_sorted = bag[order]
    ptr = _pointer(torch.bincount(bag_sorted, minlength=codes.n_rows * n_seg))
    parts: Tensor = SparseDecode.apply(values[order], w_dec, regrouped, ptr, bag_sorted)
    return parts.view(codes.n_rows, n_seg, -1).cumsum(dim=1)


def codes_from_topk(
    values: Tensor, indices: Tensor, n_cols: int, signed: bool = False
) -> tuple[SparseCodes, Tensor]:
    """SparseCodes of the positive entries of a per-row top-k (every entry when `signed`), and
    those entries' values."""
    n_rows, k = indices.shape
    flat_values = values.reshape(-1)
    cols = indices.reshape(-1)
    positive = flat_values > 0 if not signed else torch.ones_like(flat_values, dtype=torch.bool)
    if bool(positive.all()):
        device = indices.device
        rows = torch.arange(n_rows * k, device=device).div_(k, rounding_mode="floor")
        crow = torch.arange(0, n_rows * k + 1, k, device=device)
        return SparseCodes(rows, cols, n_rows, n_cols, crow), flat_values
    keep = positive.nonzero().squeeze(1)
    rows = keep.div(k, rounding_mode="floor")
    return SparseCodes(rows, cols[keep], n_rows, n_cols), flat_values[keep]


def batch_topk(pre: Tensor, count: int) -> tuple[SparseCodes, Tensor]:
    """The `count` largest positive entries of the whole batch `pre` [B, n], exactly.

    A flat top-k over B*n entries is slow on CPU, so a lower bound of the count-th largest value
    is taken first from per-block maxima (each one is an entry of `pre`, so at least `count`
    entries reach it); the entries above that bound form a small superset to select from.
    Returns the codes and the flat indices (row * n + col) of the kept entries.
    """
    n_rows, n_cols = pre.shape
    flat = pre.reshape(-1)
    floor = torch.zeros((), dtype=pre.dtype, device=pre.device)
    block = max(1, n_cols // (4 * max(1, count // max(1, n_rows))))
    usable = (n_cols // block) * block
    if 0 < count <= n_rows * (n_cols // block):
        maxima = pre[:, :usable].reshape(n_rows, -1, block).amax(dim=2).reshape(-1)
        bound = maxima.topk(count, sorted=False).values.min()
        floor = torch.maximum(floor, bound)
    candidates = (flat > floor) if bool(floor <= 0) else (flat >= floor)
    index = candidates.nonzero().squeeze(1)
    if index.numel() > count:
        index = index[flat[index].topk(count, sorted=False).indices]
    index = index.sort().values
    rows = torch.div(index, n_cols, rounding_mode="floor")
    return SparseCodes(rows, index - rows * n_cols, n_rows, n_cols), index
