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

import torch
from torch import Tensor, nn

from visae.sae.config import SAEConfig
from visae.sae.relu import ReLUSAE


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
    """Learnt thresholds; loss = recon + l0_coeff * L0 (expected active latents per token)."""

    arch = "jumprelu"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(
            torch.full((cfg.n_latents,), math.log(cfg.jumprelu_threshold_init))
        )

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def _activate(self, pre: Tensor) -> Tensor:
        out: Tensor = JumpReLUFunction.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        return out

    def _penalty(self, pre: Tensor, codes: Tensor) -> tuple[Tensor, float]:
        steps = StepFunction.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        return steps.sum(dim=1).mean(), self.cfg.l0_coeff
