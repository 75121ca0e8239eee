"""Statistics computed from a sample of activations: input normalisation and b_dec init."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from visae.errors import VisaeError


def as_tensor(sample: Tensor | np.ndarray, name: str = "sample") -> Tensor:
    """A 2-D float tensor view of `sample`, refusing anything else with a clear message."""
    tensor = torch.as_tensor(sample)
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise VisaeError(
            f"{name} must be a non-empty [tokens, d] array, got shape {tuple(tensor.shape)}"
        )
    if not tensor.is_floating_point():
        tensor = tensor.double()
    return tensor


def normalization_from_sample(sample: Tensor | np.ndarray) -> tuple[Tensor, float]:
    """(mean [d], scale) such that E ||(x - mean) / scale||^2 = d over the sample.

    scale = sqrt(E ||x - mean||^2 / d): after normalisation each dimension has unit mean
    square on average, whatever the layer's magnitude. Accumulated in float64.
    """
    x = as_tensor(sample).double()
    mean = x.mean(dim=0)
    mean_sq_norm = float(((x - mean) ** 2).sum(dim=1).mean())
    scale = math.sqrt(mean_sq_norm / x.shape[1])
    if not math.isfinite(scale) or scale <= 0:
        raise VisaeError(
            f"cannot normalise: the sample's spread is {scale} (all tokens identical or non-finite)"
        )
    return mean.float(), scale


def geometric_median(
    sample: Tensor | np.ndarray, *, max_iter: int = 500, tol: float = 1e-9
) -> Tensor:
    """Point minimising the sum of Euclidean distances to the rows (Weiszfeld's iteration).

    Robust to the heavy-tailed token norms of ViT residual streams, which is why it is the
    default b_dec initialisation. Distances are floored at 1e-12 so an iterate landing on a
    data point stays finite. Float64 throughout; returned in the sample's float dtype.
    """
    x = as_tensor(sample)
    x64 = x.double()
    median = x64.mean(dim=0)
    for _ in range(max_iter):
        weights = 1.0 / torch.linalg.vector_norm(x64 - median, dim=1).clamp_min(1e-12)
        updated = weights @ x64 / weights.sum()
        shift = float(torch.linalg.vector_norm(updated - median))
        median = updated
        if shift <= tol * (1.0 + float(torch.linalg.vector_norm(median))):
            break
    return median.to(x.dtype)
