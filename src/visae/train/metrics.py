"""Reconstruction metrics of an SAE over a stream of activations, accumulated in float64 so
that NMSE stays exact over millions of tokens."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from visae.errors import VisaeError
from visae.sae import SAE

DENSE_FREQUENCY = 0.01


@dataclass
class ReconAccumulator:
    """Running sums for NMSE, explained variance, L0, dead/dense fractions and cosine."""

    d: int
    n_latents: int
    n: int = 0
    sse: float = 0.0
    nnz: int = 0
    cos_sum: float = 0.0
    sum_x: np.ndarray = field(init=False)
    sum_x2: np.ndarray = field(init=False)
    sum_r: np.ndarray = field(init=False)
    fired: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.sum_x = np.zeros(self.d, np.float64)
        self.sum_x2 = np.zeros(self.d, np.float64)
        self.sum_r = np.zeros(self.d, np.float64)
        self.fired = np.zeros(self.n_latents, np.int64)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        """One batch, on any device: reduced there (in float64 where the device has it), and
        only the `[d]` and `[n_latents]` sums come back to the CPU."""
        wide = torch.float32 if x.device.type == "mps" else torch.float64
        x64, r64 = x.to(wide), x.to(wide) - x_hat.to(wide)
        self.n += x.shape[0]
        self.sse += float((r64 * r64).sum())
        self.sum_x += x64.sum(0).cpu().double().numpy()
        self.sum_x2 += (x64 * x64).sum(0).cpu().double().numpy()
        self.sum_r += r64.sum(0).cpu().double().numpy()
        active = codes > 0
        self.nnz += int(active.sum())
        self.fired += active.sum(0).cpu().numpy()
        cos = torch.nn.functional.cosine_similarity(x64, x_hat.to(wide), dim=1, eps=1e-12)
        self.cos_sum += float(cos.sum())

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise VisaeError("no tokens to evaluate")
        sse_mean = float((self.sum_x2 - self.sum_x**2 / self.n).sum())
        var_resid = float(self.sse - (self.sum_r**2).sum() / self.n)
        freq = self.fired / self.n
        return {
            "tokens": self.n,
            "mse": self.sse / (self.n * self.d),
            "nmse": self.sse / sse_mean,
            "explained_variance": 1.0 - var_resid / sse_mean,
            "l0": self.nnz / self.n,
            "dead_fraction": float((self.fired == 0).mean()),
            "dense_fraction": float((freq > DENSE_FREQUENCY).mean()),
            "cosine": self.cos_sum / self.n,
        }


@torch.no_grad()
def evaluate(sae: SAE, batches: Iterable[np.ndarray]) -> dict[str, float]:
    """Metrics of `sae` over raw `[N, d]` batches: NMSE = SSE / SSE of predicting the mean,
    explained variance, L0, dead (never fired here) and dense (> 1% of tokens) fractions,
    and the mean cosine between inputs and reconstructions."""
    acc = ReconAccumulator(sae.d, sae.n_latents)
    was_training = sae.training
    sae.eval()
    try:
        for batch in batches:
            x = torch.as_tensor(batch, dtype=torch.float32, device=sae.W_dec.device)
            if x.ndim != 2 or x.shape[1] != sae.d:
                raise VisaeError(
                    f"SAE width d={sae.d} does not match activations of shape {tuple(x.shape)}"
                )
            x_hat, codes, _ = sae(x)
            acc.add(x, x_hat.float(), codes)
    finally:
        sae.train(was_training)
    return acc.result()
