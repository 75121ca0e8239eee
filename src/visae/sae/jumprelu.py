"""JumpReLU SAE (Rajamanoharan et al. 2024): learnt per-latent thresholds, L0 penalty.

codes = z * H(z - theta) with z the pre-activations and theta = exp(log_threshold) > 0. The
step function has no useful derivative, so theta gets a straight-through pseudo-gradient with
a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps:
  d JumpReLU / d theta = -(theta / eps) K((z - theta) / eps)
  d H(z - theta) / d theta = -(1 / eps) K((z - theta) / eps)
while z gets H(z - theta) from the JumpReLU and nothing from the L0 step.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import Tensor, nn

from visae.sae.config import SAEConfig
from visae.sae.model import WholeBatch
from visae.sae.relu import ReLUSAE

# Smallest initial threshold, in normalised pre-activation units (where a unit encoder row gives
# pre-activations of about unit spread): thresholds must stay positive, or negative codes leak.
MIN_THRESHOLD = 1e-3


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 for -1/2 < u < 1/2, else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """z * H(z - theta) with the straight-through gradient for theta."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, z: Tensor, theta: Tensor, bandwidth: float
    ) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors  # type: ignore[attr-defined]
        eps: float = ctx.bandwidth  # type: ignore[attr-defined]
        grad_z = grad * (z > theta).to(z.dtype)
        grad_theta = (-(theta / eps) * rectangle((z - theta) / eps) * grad).sum(dim=0)
        return grad_z, grad_theta, None


class StepFunction(torch.autograd.Function):
    """H(z - theta), for the L0 count, with the straight-through gradient for theta only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, z: Tensor, theta: Tensor, bandwidth: float
    ) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[None, Tensor, None]:
        z, theta = ctx.saved_tensors  # type: ignore[attr-defined]
        eps: float = ctx.bandwidth  # type: ignore[attr-defined]
        grad_theta = (-(1.0 / eps) * rectangle((z - theta) / eps) * grad).sum(dim=0)
        return None, grad_theta, None


class JumpReLUSAE(ReLUSAE):
    """Learnt thresholds; loss = recon + l0_coeff * L0 (expected active latents per token).

    Sparse from the start: the encoder starts at unit rows (as the TopK family) and each
    latent's threshold at the pre-activation quantile that fires it on
    `jumprelu_target_l0 / n_latents` of the tokens: of N(0, 1) pre-activations at creation, of
    the sample's real ones after `init_from_sample`.
    """

    arch = "jumprelu"
    uses = frozenset({"l0_coeff", "jumprelu_bandwidth", "jumprelu_target_l0"})

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        rate = cfg.jumprelu_target_l0 / cfg.n_latents
        gaussian_quantile = NormalDist().inv_cdf(1 - rate)
        self.log_threshold = nn.Parameter(
            torch.full((cfg.n_latents,), math.log(max(gaussian_quantile, MIN_THRESHOLD)))
        )

    def _initial_encoder_scale(self) -> float:
        """Unit rows: only ~target_l0 latents fire, so the dense SAE's 2d/n shrink would start
        the reconstruction near zero."""
        return 1.0

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def _activate(self, pre: Tensor) -> Tensor:
        out: Tensor = JumpReLUFunction.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        return out

    def _penalty(self, pre: Tensor, codes: Tensor, batch: WholeBatch) -> tuple[Tensor, float]:
        steps = StepFunction.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        return batch.mean(steps.sum(dim=1)), self.cfg.l0_coeff

    @torch.no_grad()
    def _init_from_data(self, sample: Tensor) -> None:
        """Thresholds from the sample's pre-activations, then one scale for the encoder.

        Per latent, the threshold lies halfway between the m-th and (m+1)-th largest of its
        pre-activations, m = N * target_l0 / n_latents, so exactly m of the sample's tokens fire
        it (floored at `MIN_THRESHOLD` for latents positive on fewer). Then the encoder rows,
        biases and thresholds are multiplied by the one factor c that minimises the sample's
        squared reconstruction error: which latents fire does not change, but codes start at
        the right size instead of overshooting on high-norm tokens, which fire many latents.
        """
        n_tokens = sample.shape[0]
        m = max(1, round(n_tokens * self.cfg.jumprelu_target_l0 / self.n_latents))
        keep = min(m + 1, n_tokens)
        top: Tensor | None = None
        for chunk in self._sample_chunks(sample):
            pre = self._preacts(chunk)
            pool = pre if top is None else torch.cat([top, pre])
            top = pool.topk(min(keep, pool.shape[0]), dim=0).values
        assert top is not None
        cut = top[m - 1 : m + 1].mean(dim=0) if keep == m + 1 else top[-1]
        self.log_threshold.copy_(cut.clamp_min(MIN_THRESHOLD).log())
        cross = squares = 0.0
        for chunk in self._sample_chunks(sample):
            recon = self._activate(self._preacts(chunk)) @ self.W_dec
            cross += float(torch.linalg.vecdot(recon.double(), (chunk - self.b_dec).double()).sum())
            squares += float(recon.double().square().sum())
        if squares > 0 and cross > 0:
            scale = cross / squares
            self.W_enc.mul_(scale)
            self.b_enc.mul_(scale)
            self.log_threshold.add_(math.log(scale))
