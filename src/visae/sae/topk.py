"""TopK and BatchTopK SAEs (with optional Matryoshka objective and AuxK), sparse training step.

Codes are never negative: the top-k is taken on the pre-activations and only positive winners
are kept, which equals a ReLU before the top-k. The dense pre-activations are computed once per
batch without autograd (in bfloat16 when `compute_dtype` says so); the selected entries then
enter autograd through `GatherPreacts`, whose backward is k-sparse.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from visae.errors import VisaeError
from visae.sae.config import SAEConfig
from visae.sae.model import LOCAL, SAE, SAMPLE_CHUNK, LossOutput, WholeBatch, pad_rows
from visae.sae.sparse import (
    GatherPreacts,
    SparseCodes,
    batch_topk,
    codes_from_topk,
    decode_nested,
    decode_rows,
    sampled_dots,
)

# Residual mean square under which AuxK leaves a token out (see `_TopKFamily._auxk_loss`).
AUXK_MIN_RESIDUAL = 1e-12


class _TopKFamily(SAE):
    """Shared machinery: pre-activations, exact code values, sparse decode, loss, AuxK."""

    uses = frozenset({"k", "matryoshka", "auxk", "k_aux", "auxk_coeff", "compute_dtype"})

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self._scratch: Tensor | None = None

    # --- selection rules, per architecture
    def _select_train(
        self, pre: Tensor, batch: WholeBatch | None = None
    ) -> tuple[SparseCodes, Tensor]:
        """Training selection: (codes, the selected entries' values in `pre`), of the rank's
        part `pre` of `batch` (None: `pre` is the whole batch)."""
        raise NotImplementedError

    def _select_infer(self, pre: Tensor) -> tuple[SparseCodes, Tensor]:
        """Inference selection: (codes, the selected entries' values in `pre`)."""
        raise NotImplementedError

    def _after_batch(self, values: Tensor, batch: WholeBatch) -> None:
        """Per-architecture state update after a training batch (BatchTopK's threshold)."""

    # --- shared pieces
    def _compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.compute_dtype == "bfloat16" else self.W_enc.dtype

    @torch.no_grad()
    def _effective_bias(self) -> Tensor:
        """b_enc - W_enc @ b_dec, so that pre = x @ W_enc.T + bias with no [B, d] subtraction."""
        return self.b_enc - self.W_enc @ self.b_dec

    @torch.no_grad()
    def _dense_preacts(self, x_norm: Tensor, bias: Tensor, reuse: bool) -> Tensor:
        """[B, n_latents] pre-activations without autograd; the one dense matmul of a step.

        With `reuse`, the result is written into a kept buffer: allocating ~100 MB afresh every
        step costs page faults comparable to a quarter of the matmul on CPU.
        """
        dtype = self._compute_dtype()
        shape = (x_norm.shape[0], self.n_latents)
        out = None
        if reuse:
            buffer = self._scratch
            if (
                buffer is None
                or buffer.dtype != dtype
                or buffer.device != x_norm.device
                or buffer.shape[0] < shape[0]
            ):
                buffer = self._scratch = torch.empty(shape, dtype=dtype, device=x_norm.device)
            out = buffer[: shape[0]]
        return torch.addmm(
            bias.to(dtype), x_norm.to(dtype), self.W_enc.detach().to(dtype).t(), out=out
        )

    def release_scratch(self) -> None:
        """Free the kept pre-activation buffer (it is re-made on the next training batch)."""
        self._scratch = None

    def _code_values(
        self, x_norm: Tensor, codes: SparseCodes, selected: Tensor, bias: Tensor
    ) -> tuple[SparseCodes, Tensor]:
        """(codes, their ReLU'd values in autograd, with a sparse backward).

        In float32 the selected pre-activations are the values; after a bfloat16 selection they
        are recomputed exactly as per-entry dot products, so only the choice of latents sees
        the lower precision, and entries whose exact value is not positive are dropped (they
        would decode to nothing but count in L0 and in the dead-latent counters).
        """
        if selected.dtype == self.W_enc.dtype:
            exact = selected
        else:
            with torch.no_grad():
                exact = sampled_dots(codes.crow, codes.cols, x_norm, self.W_enc.detach())
                exact += bias[codes.cols]
            if not self.cfg.signed_topk:
                positive = exact > 0
                if not bool(positive.all()):
                    keep = positive.nonzero().squeeze(1)
                    codes, exact = codes.subset(keep), exact[keep]
        values = GatherPreacts.apply(exact, x_norm, self.W_enc, self.b_enc, self.b_dec, codes)
        return codes, values if self.cfg.signed_topk else torch.relu(values)

    def _encode_sparse_codes(self, x_norm: Tensor) -> tuple[SparseCodes, Tensor]:
        bias = self._effective_bias()
        pre = self._dense_preacts(x_norm, bias, reuse=False)
        codes, selected = self._select_infer(pre)
        return self._code_values(x_norm, codes, selected, bias)

    def _decode_codes(self, codes: SparseCodes, values: Tensor) -> Tensor:
        return decode_rows(values, self.W_dec, codes)

    def _loss(
        self, x_norm: Tensor, sparsity_scale: float, update: bool, batch: WholeBatch
    ) -> LossOutput:
        cfg = self.cfg
        bias = self._effective_bias()
        pre = self._dense_preacts(x_norm, bias, reuse=True)
        codes, values = self._code_values(x_norm, *self._select_train(pre, batch), bias)
        extra: dict[str, float] = {}
        sizes = cfg.matryoshka_sizes()
        if sizes:
            nested = decode_nested(values, self.W_dec, codes, sizes) + self.b_dec
            per_prefix = batch.mean((nested - x_norm[:, None, :]).square().mean(dim=2))
            recon = per_prefix.mean()
            x_hat, mse = nested[:, -1], per_prefix[-1]
            extra.update(
                {
                    f"recon_prefix_{size}": float(v.detach())
                    for size, v in zip(sizes, per_prefix, strict=True)
                }
            )
        else:
            x_hat = decode_rows(values, self.W_dec, codes) + self.b_dec
            recon = mse = batch.mean((x_hat - x_norm).square().mean(dim=1))
        auxk = self._auxk_loss(x_norm, x_hat, pre, bias, batch) if cfg.auxk else recon.new_zeros(())
        loss = recon + cfg.auxk_coeff * auxk
        fired = values.detach() > 0
        if update:
            self._record_batch(codes.cols, fired, batch)
            self._after_batch(values.detach(), batch)
        zero = recon.new_zeros(())
        return self._output(loss, recon, zero, auxk, x_norm, mse, int(fired.sum()), batch, extra)

    def _auxk_loss(
        self, x_norm: Tensor, x_hat: Tensor, pre: Tensor, bias: Tensor, batch: WholeBatch
    ) -> Tensor:
        """Gao et al.'s AuxK: the k_aux largest pre-activations of the dead latents (ReLU'd)
        reconstruct each token's residual r = x - x_hat (detached, no b_dec).

        The loss is their normalised MSE, per token then averaged: the mean over tokens of
        mean_d (aux_recon - r)^2 / mean_d r^2. Unnormalised, the term would shrink with the
        reconstruction error and stop reviving latents as training goes on. Tokens whose
        residual mean square is below `AUXK_MIN_RESIDUAL` (reconstructed to rounding error, in
        normalised units where a token's mean square is ~1) have nothing to explain and are
        left out of the mean (of the whole batch's live tokens); 0 when no token is left.
        """
        dead = self.dead_mask().nonzero().squeeze(1)
        if dead.numel() == 0:
            return x_hat.new_zeros(())
        k_aux = min(self.cfg.k_aux, int(dead.numel()))
        top = pre.index_select(1, dead).topk(k_aux, dim=1, sorted=False)
        codes, values = self._code_values(
            x_norm, *codes_from_topk(top.values, dead[top.indices], self.n_latents), bias
        )
        residual = (x_norm - x_hat).detach()
        residual_ms = residual.square().mean(dim=1)
        live = residual_ms > AUXK_MIN_RESIDUAL
        n_live = int(batch.ranks.all_sum(live.sum()))
        if n_live == 0:
            return x_hat.new_zeros(())
        error_ms = (decode_rows(values, self.W_dec, codes) - residual).square().mean(dim=1)
        weights = torch.where(live, 1.0 / residual_ms.clamp_min(AUXK_MIN_RESIDUAL), 0.0)
        return (error_ms * weights).sum() / n_live


class TopKSAE(_TopKFamily):
    """Keep each token's k largest positive pre-activations (Gao et al. 2024); with
    `signed_topk`, the k largest as they are, negative ones included (saev's rule)."""

    arch = "topk"
    uses = _TopKFamily.uses | {"signed_topk"}

    def _select_train(
        self, pre: Tensor, batch: WholeBatch | None = None
    ) -> tuple[SparseCodes, Tensor]:
        top = pre.topk(self.cfg.k, dim=1, sorted=False)
        return codes_from_topk(top.values, top.indices, self.n_latents, self.cfg.signed_topk)

    _select_infer = _select_train

    def encode_sparse(self, x: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """([N, k] values, [N, k] indices), largest first; value 0 where fewer than k are > 0."""
        codes, values = self._encode_sparse_codes(self.normalize(x))
        return pad_rows(codes, values, width=self.cfg.k)


class BatchTopKSAE(_TopKFamily):
    """Keep the k * B largest positive pre-activations of the whole batch (Bussmann et al.).

    That batch rule is for training only. Inference keeps every pre-activation above a
    threshold, so a token's code never depends on the other tokens of its batch: the threshold
    is calibrated by `init_from_sample` (or `calibrate_threshold`) and followed during
    training by an EMA of the smallest kept activation per batch. Encoding before it is set is
    an error, not a silent fall-back to the batch rule.
    """

    arch = "batchtopk"
    uses = _TopKFamily.uses | {"batchtopk_momentum"}

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def _select_train(
        self, pre: Tensor, batch: WholeBatch | None = None
    ) -> tuple[SparseCodes, Tensor]:
        """The k * B largest positive pre-activations of the whole batch: under data
        parallelism, each rank's candidates are its own k * B largest, and the ones it keeps
        those at or above the k * B-th largest of every rank's candidates."""
        whole = batch or WholeBatch(pre.shape[0], LOCAL)
        count = self.cfg.k * whole.n
        codes, flat_index = batch_topk(pre, min(count, pre.numel()))
        flat = pre.reshape(-1)
        if whole.ranks.distributed:
            mine = flat[flat_index].double()  # exact in every compute dtype
            candidates = whole.ranks.all_cat(mine)
            if candidates.numel() > count:
                cutoff = candidates.topk(count, sorted=False).values.min()
                keep = (mine >= cutoff).nonzero().squeeze(1)
                codes, flat_index = codes.subset(keep), flat_index[keep]
        return codes, flat[flat_index]

    def _select_infer(self, pre: Tensor) -> tuple[SparseCodes, Tensor]:
        if int(self.threshold_updates) == 0:
            raise VisaeError(
                "this BatchTopK SAE has no inference threshold yet: call "
                "sae.calibrate_threshold(batches) or sae.init_from_sample(sample) first"
            )
        flat = pre.reshape(-1)
        flat_index = (flat > self.threshold.to(pre.dtype)).nonzero().squeeze(1)
        rows = torch.div(flat_index, self.n_latents, rounding_mode="floor")
        codes = SparseCodes(rows, flat_index - rows * self.n_latents, pre.shape[0], self.n_latents)
        return codes, flat[flat_index]

    @torch.no_grad()
    def _after_batch(self, values: Tensor, batch: WholeBatch) -> None:
        positive = values[values > 0]
        inf = torch.tensor(float("inf"), dtype=self.threshold.dtype, device=values.device)
        smallest = batch.ranks.all_min(positive.min().to(inf.dtype) if positive.numel() else inf)
        if not bool(torch.isfinite(smallest)):
            return
        if int(self.threshold_updates) == 0:
            self.threshold.copy_(smallest)
        else:
            momentum = self.cfg.batchtopk_momentum
            self.threshold.mul_(momentum).add_((1 - momentum) * smallest)
        self.threshold_updates += 1

    def _init_from_data(self, sample: Tensor) -> None:
        """Calibrate the inference threshold on the sample, so that even the untrained SAE
        encodes token by token (at ~k active latents per token on data like the sample)."""
        self.calibrate_threshold(
            sample[start : start + SAMPLE_CHUNK] for start in range(0, len(sample), SAMPLE_CHUNK)
        )

    @torch.no_grad()
    def calibrate_threshold(self, batches: Iterable[Tensor | np.ndarray]) -> float:
        """Set the inference threshold to the mean batch-rule cutoff of the current weights
        over raw training-sized `batches`. The EMA kept during training averages cutoffs of
        weights that were still moving; in short runs it lags far enough that inference fires
        well under k latents per token. Returns the new threshold."""
        bias = self._effective_bias()
        cutoffs = []
        for x in batches:
            pre = self._dense_preacts(self.normalize(x), bias, reuse=False)
            _, selected = self._select_train(pre)
            positive = selected[selected > 0]
            if positive.numel():
                cutoffs.append(float(positive.min()))
        if not cutoffs:
            raise VisaeError("cannot calibrate the BatchTopK threshold: no positive activations")
        self.threshold.fill_(sum(cutoffs) / len(cutoffs))
        self.threshold_updates.clamp_(min=1)
        return float(self.threshold)

    def _state_metrics(self) -> dict[str, float]:
        return {"threshold": float(self.threshold)}
