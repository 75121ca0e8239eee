"""ReLU SAE with an L1 penalty (the paper-era SAE of saev and Anthropic's early work)."""

from __future__ import annotations

import torch
from torch import Tensor

from visae.sae.config import SAEConfig
from visae.sae.model import SAE, LossOutput, WholeBatch
from visae.sae.sparse import SparseCodes


def dense_to_codes(dense: Tensor) -> tuple[SparseCodes, Tensor]:
    """Nonzero entries of dense codes [N, n] as (SparseCodes, differentiable values)."""
    rows, cols = dense.detach().nonzero(as_tuple=True)
    return SparseCodes(rows, cols, dense.shape[0], dense.shape[1]), dense[rows, cols]


class ReLUSAE(SAE):
    """codes = ReLU((x - b_dec) W_enc^T + b_enc); loss = recon + l1_coeff * L1.

    L1 is the sum of codes over latents averaged over tokens; with `decoder_norm_l1` each code is
    weighted by its decoder row's norm, so shrinking codes while growing rows does not pay when
    `normalize_decoder` is off.
    """

    arch = "relu"
    uses = frozenset({"l1_coeff", "decoder_norm_l1"})

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        with torch.no_grad():
            self.W_enc.mul_(self._initial_encoder_scale())

    def _initial_encoder_scale(self) -> float:
        """With unit encoder rows about half of all latents fire at ~N(0, 1) on normalised
        input, and the reconstruction sum(codes * atoms) ~ (n_latents / 2d) x: scaling the
        encoder by 2d / n_latents starts the dense SAE near x_hat = x instead of several times
        x (NMSE ~ (n/2d - 1)^2), which Adam's small steps take long to undo."""
        return min(1.0, 2 * self.d / self.n_latents)

    def _activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def _dense_codes(self, x_norm: Tensor) -> Tensor:
        return self._activate(self._preacts(x_norm))

    def _encode_sparse_codes(self, x_norm: Tensor) -> tuple[SparseCodes, Tensor]:
        return dense_to_codes(self._dense_codes(x_norm))

    def encode(self, x: Tensor) -> Tensor:
        return self._dense_codes(self.normalize(x))

    def _penalty(self, pre: Tensor, codes: Tensor, batch: WholeBatch) -> tuple[Tensor, float]:
        """(the rank's share of the sparsity penalty before its coefficient and scale, the
        coefficient)."""
        weighted = codes
        if self.cfg.decoder_norm_l1:
            weighted = codes * torch.linalg.vector_norm(self.W_dec, dim=1)
        return batch.mean(weighted.sum(dim=1)), self.cfg.l1_coeff

    def _loss(
        self, x_norm: Tensor, sparsity_scale: float, update: bool, batch: WholeBatch
    ) -> LossOutput:
        pre = self._preacts(x_norm)
        codes = self._activate(pre)
        x_hat = codes @ self.W_dec + self.b_dec
        recon = batch.mean((x_hat - x_norm).square().mean(dim=1))
        penalty, coeff = self._penalty(pre, codes, batch)
        sparsity = sparsity_scale * coeff * penalty
        if update:
            fired = (codes.detach() > 0).any(dim=0)
            every = torch.arange(self.n_latents, device=fired.device)
            self._record_batch(every, fired, batch)
        zero = recon.new_zeros(())
        nnz = int((codes.detach() > 0).sum())
        extra = {"sparsity_penalty": float(penalty.detach())}
        return self._output(
            recon + sparsity, recon, sparsity, zero, x_norm, recon, nnz, batch, extra
        )
