"""Shared by the visae.sae tests: randomised SAEs, planted data and slow dense references."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from visae.sae import SAE, SAEConfig


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: threads only add synchronisation, which a busy 2-core machine makes slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_sae(arch: str, d: int, n: int, k: int = 4, *, seed: int = 0, **kw: object) -> SAE:
    """An SAE in float64 with every parameter randomised (not at its special init), and a
    BatchTopK inference threshold set, so every architecture can encode."""
    if arch == "jumprelu":
        kw.setdefault("jumprelu_target_l0", min(32, n // 4))
    sae = SAE.create(SAEConfig(arch=arch, d=d, n_latents=n, k=k, seed=seed, **kw)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.5)
        sae.W_enc.mul_(0.7)
        if arch == "jumprelu":
            sae.log_threshold.fill_(math.log(0.3))
        if arch == "batchtopk":
            sae.threshold.fill_(0.4)
            sae.threshold_updates.fill_(1)
    sae.set_normalization(torch.randn(d, generator=gen, dtype=torch.float64), 2.5)
    return sae


def raw_batch(b: int, d: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=gen, dtype=torch.float64) * 2.5 + 0.3


def planted(
    d: int = 24, n_true: int = 48, active: int = 3, seed: int = 7, zipf: float = 0.0
) -> Callable[..., torch.Tensor]:
    """batch(step, size): tokens that are sums of `active` of `n_true` planted unit atoms
    (magnitudes uniform in [0.5, 2.5]; atom i drawn with weight (i + 1)^-zipf) plus an offset
    of 5; the same step gives the same batch. The default seed differs from the SAEs' (0): an
    SAE initialised with the same generator would start at the planted atoms."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_true, d, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    weights = torch.arange(1, n_true + 1, dtype=torch.float64) ** -zipf

    def batch(step: int, size: int = 256) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + step)
        ids = torch.multinomial(weights, size * active, replacement=True, generator=g)
        mags = torch.rand(size, active, generator=g) * 2 + 0.5
        return (mags[..., None] * atoms[ids.view(size, active)]).sum(dim=1) + 5.0

    return batch


def nmse(sae: SAE, x: torch.Tensor) -> float:
    """SSE / SSE of the mean, in float64, of the SAE's raw-space reconstruction."""
    with torch.no_grad():
        x_hat = sae(x)[0].double()
    x = x.double()
    return float(((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def reference_preacts(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """(x_norm - b_dec) @ W_enc.T + b_enc in float64, written out from the definitions."""
    xn = (x.double() - sae.norm_mean.double()) / sae.norm_scale.double()
    return ((xn - sae.b_dec.double()) @ sae.W_enc.double().T + sae.b_enc.double()).detach()


def reference_codes(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Inference codes one token at a time, in float64: each architecture's rule as the paper
    states it (no batch-level state, no sparse kernels)."""
    cfg = sae.cfg
    rows = []
    for pre in reference_preacts(sae, x):
        if cfg.arch == "relu":
            code = pre.clamp_min(0)
        elif cfg.arch == "jumprelu":
            code = pre * (pre > sae.log_threshold.double().exp())
        elif cfg.arch == "topk":
            order = sorted(range(len(pre)), key=lambda j: -float(pre[j]))[: cfg.k]
            code = torch.zeros_like(pre)
            for j in order:
                code[j] = max(float(pre[j]), 0.0)
        elif cfg.arch == "batchtopk":
            code = pre * (pre > float(sae.threshold))
        else:
            raise AssertionError(f"no reference for {cfg.arch}")
        rows.append(code)
    return torch.stack(rows)


def reference_decode(sae: SAE, codes: torch.Tensor) -> torch.Tensor:
    x_hat = codes.double() @ sae.W_dec.double() + sae.b_dec.double()
    return (x_hat * sae.norm_scale.double() + sae.norm_mean.double()).detach()


def reference_auxk(sae: SAE, x: torch.Tensor, *, per_token: bool = True) -> float:
    """Gao et al.'s AuxK loss token by token in float64: the k_aux largest dead
    pre-activations (ReLU'd) reconstruct the residual r, scored by mean_d (aux - r)^2 /
    mean_d r^2, averaged over the tokens whose residual is not zero. `per_token=False`: the
    whole batch's error over the whole batch's residual mean square instead."""
    xn = ((x.double() - sae.norm_mean.double()) / sae.norm_scale.double()).detach()
    x_hat = (reference_train_codes(sae, x) @ sae.W_dec.double() + sae.b_dec.double()).detach()
    dead = [j for j in range(sae.n_latents) if bool(sae.dead_mask()[j])]
    k_aux = min(sae.cfg.k_aux, len(dead))
    errors, residuals = [], []
    for pre, xi, x_hat_i in zip(reference_preacts(sae, x), xn, x_hat, strict=True):
        chosen = sorted(dead, key=lambda j: -float(pre[j]))[:k_aux]
        aux = torch.zeros_like(xi)
        for j in chosen:
            aux += max(float(pre[j]), 0.0) * sae.W_dec.double()[j].detach()
        residual = xi - x_hat_i
        errors.append(float((aux - residual).square().mean()))
        residuals.append(float(residual.square().mean()))
    if not per_token:
        return sum(errors) / sum(residuals)
    terms = [e / r for e, r in zip(errors, residuals, strict=True) if r > 1e-12]
    return sum(terms) / len(terms) if terms else 0.0


def reference_train_codes(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Training codes of the TopK family in float64 (BatchTopK: the batch rule)."""
    pre = reference_preacts(sae, x)
    k = sae.cfg.k
    if sae.cfg.arch == "topk":
        mask = torch.zeros_like(pre).scatter(1, pre.topk(k, dim=1).indices, 1.0)
    else:
        flat = pre.reshape(-1)
        chosen = flat.topk(k * x.shape[0]).indices
        mask = torch.zeros_like(flat).index_fill(0, chosen, 1.0).view_as(pre)
    return torch.relu(pre) * mask
