"""visae.sae: the data-driven initialisation and short training runs on planted features.

Maths against slow references is in test_sae.py, checkpoints in test_sae_checkpoint.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sae_helpers import (
    nmse,
    one_thread,  # noqa: F401  (autouse fixture)
    planted,
    reference_codes,
)

from visae.errors import VisaeError
from visae.sae import SAE, SAEConfig


# --------------------------------------------------------------------------- init_from_sample
def test_init_from_sample_sets_the_normalisation_and_b_dec() -> None:
    """The one call leaves the normalised sample centred on b_dec's choice with unit mean
    square per dimension, whatever the raw offset and scale."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 6)) * 40 + 300
    x[:8] += 4000
    sae = SAE.create(SAEConfig(arch="topk", d=6, n_latents=12, k=2, b_dec_init="mean")).double()
    sae.init_from_sample(x)
    xn = sae.normalize(torch.from_numpy(x)).detach().numpy()
    assert float((xn**2).sum(axis=1).mean()) == pytest.approx(6.0, rel=1e-6)
    np.testing.assert_allclose(xn.mean(axis=0), 0, atol=1e-5)  # mean kept in float32
    np.testing.assert_allclose(sae.b_dec.detach().numpy(), 0, atol=1e-5)
    with pytest.raises(VisaeError, match=r"initialisation sample must be \[tokens, 6\]"):
        sae.init_from_sample(np.ones((5, 7)))


def test_batchtopk_init_from_sample_calibrates_l0_to_k() -> None:
    """Untrained, calibrated on the sample: the threshold rule fires ~k latents per token on
    fresh tokens of the same distribution."""
    d, n, k = 32, 256, 8
    sae = SAE.create(SAEConfig(arch="batchtopk", d=d, n_latents=n, k=k))
    gen = torch.Generator().manual_seed(2)
    scales = torch.rand(d, generator=gen) * 4
    sae.init_from_sample(torch.randn(8192, d, generator=gen) * scales + 3)
    fresh = torch.randn(4096, d, generator=gen) * scales + 3
    assert float((sae.encode(fresh) > 0).sum(dim=1).float().mean()) == pytest.approx(k, rel=0.1)


def heavy_tailed_sample(n_tokens: int, d: int, seed: int) -> torch.Tensor:
    """Planted sparse tokens with log-normal magnitudes and a few very long tokens, like ViT
    residual streams: pre-activation quantiles differ per latent and from a Gaussian's."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(4 * d, d, generator=torch.Generator().manual_seed(99))
    ids = torch.randint(0, 4 * d, (n_tokens, 4), generator=gen)
    mags = torch.exp(torch.randn(n_tokens, 4, generator=gen))
    x = (mags[..., None] * atoms[ids]).sum(dim=1) + 2.0
    x[::50] *= 8
    return x


def test_jumprelu_init_from_sample_starts_at_the_target_l0() -> None:
    d, n, target = 16, 128, 8
    sae = SAE.create(SAEConfig(arch="jumprelu", d=d, n_latents=n, jumprelu_target_l0=target))
    sample = heavy_tailed_sample(4096, d, seed=0)
    before = (sae.encode(sample) > 0).sum(dim=1).float().mean()
    sae.init_from_sample(sample)
    fired = sae.encode(sample) > 0
    m = round(4096 * target / n)
    assert torch.equal(fired.sum(dim=0), torch.full((n,), m))  # each latent: exactly m tokens
    assert float(fired.sum(dim=1).float().mean()) == pytest.approx(target, abs=1e-9)
    fresh = heavy_tailed_sample(4096, d, seed=1)
    assert float((sae.encode(fresh) > 0).sum(dim=1).float().mean()) == pytest.approx(
        target, rel=0.15
    )
    assert abs(float(before) - target) > 0.15 * target  # the Gaussian guess alone is off here
    # the encoder scale is the least-squares one: scaling the codes either way does worse
    x_norm = sae.normalize(sample)
    with torch.no_grad():
        recon = (sae._activate(sae._preacts(x_norm)) @ sae.W_dec).detach()
    b_dec = sae.b_dec.detach()
    errors = [float(((c * recon + b_dec - x_norm) ** 2).sum()) for c in (0.9, 1.0, 1.1)]
    assert errors[1] < min(errors[0], errors[2])
    assert nmse(sae, fresh) < 1


def test_jumprelu_trains_to_a_sparse_sae_with_the_defaults() -> None:
    """Default l0_coeff, bandwidth and target L0 (32), the trainer's default learning rate:
    a few hundred steps on planted features keep L0 within 2x of the target while the
    reconstruction improves several-fold (the old fixed 1e-3 threshold gave L0 ~ n/2)."""
    d, n = 32, 512
    batch = planted(d=d, n_true=128, active=8)
    sae = SAE.create(SAEConfig(arch="jumprelu", d=d, n_latents=n))
    sae.init_from_sample(torch.cat([batch(-i, 1024) for i in range(1, 5)]))
    held_out = batch(10**6, 2048)
    start = nmse(sae, held_out)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / math.sqrt(n / 2**14))
    for step in range(200):
        sae.train_step(opt, batch(step, 512))
    l0 = float(sae(held_out)[2]["l0"].float().mean())
    assert 16 <= l0 <= 64
    final = nmse(sae, held_out)
    assert final < 0.1 and final < start / 2


def test_relu_sae_starts_near_identity() -> None:
    """At initialisation a dense SAE reconstructs isotropic input better than its mean
    (unscaled, the tied encoder gives x_hat ~ (n / 2d) x, an NMSE near 9 at 8x)."""
    d, n = 64, 512
    sae = SAE.create(SAEConfig(arch="relu", d=d, n_latents=n))
    x = torch.randn(4096, d, generator=torch.Generator().manual_seed(0))
    sae.init_from_sample(x)
    assert nmse(sae, x) < 0.6


# --------------------------------------------------------------------------- training
def train_planted(
    cfg: SAEConfig, steps: int, lr: float = 3e-3, zipf: float = 0.0
) -> tuple[SAE, float, float]:
    """(SAE, held-out NMSE at the start, after `steps` Adam steps) on the planted data."""
    batch = planted(zipf=zipf)
    sae = SAE.create(cfg)
    sae.init_from_sample(torch.cat([batch(-i) for i in range(1, 5)]))
    held_out = batch(10_000, 1024)
    start = nmse(sae, held_out)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for step in range(steps):
        sae.train_step(opt, batch(step))
    return sae, start, nmse(sae, held_out)


def test_topk_training_and_bf16_track_each_other() -> None:
    """On a planted sparse dictionary the step really optimises, and the bf16 selection
    reaches the float32 result."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        cfg = SAEConfig(arch="topk", d=24, n_latents=96, k=3, compute_dtype=dtype)
        _, start, final = train_planted(cfg, 300)
        assert final < 0.15 and final < 0.2 * start
        results[dtype] = final
    assert results["bfloat16"] == pytest.approx(results["float32"], rel=0.1)


def prefix_nmse(sae: SAE, x: torch.Tensor, size: int) -> float:
    """NMSE of the reconstruction from latents < size only (normalised space, float64)."""
    xn = sae.normalize(x).detach().double()
    codes = reference_codes(sae, x)
    recon = codes[:, :size] @ sae.W_dec[:size].detach().double() + sae.b_dec.detach().double()
    return float(((recon - xn) ** 2).sum() / ((xn - xn.mean(dim=0)) ** 2).sum())


def test_matryoshka_training_puts_the_frequent_features_first() -> None:
    """Planted atoms of Zipf frequencies: a Matryoshka SAE reconstructs well from its first
    quarter of latents, where a plain TopK SAE of the same size does not, at about the same
    full-dictionary error; each longer prefix does better than the one inside it."""
    held_out = planted(zipf=1.0)(20_000, 1024)
    full = {}
    first_quarter = {}
    for name, fractions in (("matryoshka", (0.25, 0.5, 1.0)), ("plain", None)):
        cfg = SAEConfig(arch="topk", d=24, n_latents=96, k=3, matryoshka=fractions)
        sae, start, full[name] = train_planted(cfg, 300, zipf=1.0)
        assert full[name] < 0.15 and full[name] < 0.2 * start
        prefixes = [prefix_nmse(sae, held_out, size) for size in (24, 48, 96)]
        first_quarter[name] = prefixes[0]
        if fractions:
            assert prefixes[0] > prefixes[1] > prefixes[2]
    assert first_quarter["matryoshka"] < 0.5 * first_quarter["plain"]
    assert full["matryoshka"] < 1.5 * full["plain"]
