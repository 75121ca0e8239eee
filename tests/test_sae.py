"""visae.sae: the registry, configs, and the maths of every architecture against slow
references (inference rules, the sparse step on both kernel sets, bf16, AuxK, JumpReLU).

Initialisation and training runs are in test_sae_training.py, checkpoints in
test_sae_checkpoint.py; shared helpers live in sae_helpers.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sae_helpers import (
    make_sae,
    one_thread,  # noqa: F401  (autouse fixture)
    raw_batch,
    reference_auxk,
    reference_codes,
    reference_decode,
    reference_preacts,
    reference_train_codes,
)

from visae.errors import VisaeError
from visae.sae import (
    ARCHS,
    SAE,
    Registry,
    SAEConfig,
    TopKSAE,
    geometric_median,
    normalization_from_sample,
)
from visae.sae import sparse as sparse_module
from visae.sae.jumprelu import JumpReLUFunction, StepFunction
from visae.sae.sparse import _stable_argsort, batch_topk, portable_kernels, sampled_dots

ARCH_NAMES = ARCHS.names()


# --------------------------------------------------------------------------- registry, config
def test_registry_refuses_a_repeated_name_and_lists_the_known_ones() -> None:
    registry: Registry[int] = Registry("widget")
    registry.register("a", 1)
    registry.register("b", 2)
    with pytest.raises(VisaeError, match=r"^widget 'a' is already registered"):
        registry.register("a", 3)
    assert registry.get("a") == 1 and registry.names() == ("a", "b")
    with pytest.raises(VisaeError, match=r"^unknown widget 'c'; expected one of \('a', 'b'\)$"):
        registry.get("c")


def test_an_sae_class_cannot_take_an_existing_architecture_name() -> None:
    with pytest.raises(VisaeError, match="SAE architecture 'topk' is already registered"):

        class Impostor(TopKSAE):
            arch = "topk"

    assert SAE.create(SAEConfig(arch="topk", d=4, n_latents=8, k=2)).__class__ is TopKSAE


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"arch": "gated"}, r"unknown SAE architecture 'gated'; expected one of \('relu'"),
        ({"arch": "topk", "k": 0}, "k=0"),
        ({"arch": "topk", "n_latents": 8, "k": 9}, "k=9"),
        ({"arch": "topk", "matryoshka": (0.5, 0.25, 1.0)}, "matryoshka"),
        ({"arch": "topk", "matryoshka": (0.5, 0.9)}, "must end with 1"),
        ({"arch": "relu", "matryoshka": (0.5, 1.0)}, r"matryoshka is implemented for \('topk'"),
        ({"arch": "relu", "auxk": True}, "auxk is implemented for"),
        ({"arch": "jumprelu", "compute_dtype": "bfloat16"}, "compute_dtype='bfloat16' is impl"),
        ({"arch": "topk", "b_dec_init": "median"}, "b_dec_init"),
        ({"arch": "jumprelu", "jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
        ({"arch": "jumprelu", "jumprelu_target_l0": 0}, "jumprelu_target_l0=0"),
        ({"arch": "jumprelu", "n_latents": 16, "jumprelu_target_l0": 16}, "below n_latents"),
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
    with pytest.raises(VisaeError, match="lr"):
        SAEConfig.from_dict({**cfg.to_dict(), "lr": 1e-3})


def test_importing_visae_for_its_version_loads_no_torch() -> None:
    code = "import sys, visae; assert visae.__version__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- inference rules
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_encode_and_decode_match_the_slow_reference(arch: str) -> None:
    sae = make_sae(arch, 8, 40, 5)
    x = raw_batch(25, 8)
    expected = reference_codes(sae, x)
    assert (expected > 0).any() and (expected == 0).any()
    codes = sae.encode(x)
    torch.testing.assert_close(codes, expected, rtol=1e-10, atol=1e-12)
    x_hat, forward_codes, aux = sae(x)
    torch.testing.assert_close(forward_codes, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x_hat, reference_decode(sae, expected), rtol=1e-10, atol=1e-10)
    assert torch.equal(aux["l0"], (expected > 0).sum(dim=1))
    values, indices = sae.encode_sparse(x)
    assert (values[:, :-1] >= values[:, 1:]).all()
    torch.testing.assert_close(
        torch.zeros_like(expected).scatter_add(1, indices, values), expected, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(sae.decode_sparse(values, indices), x_hat, rtol=1e-10, atol=1e-10)
    with pytest.raises(VisaeError, match=r"\[tokens, 8\]"):
        sae.encode(torch.zeros(3, 7))


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


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_architecture_encodes_token_by_token_after_init_from_sample(
    arch: str, tmp_path
) -> None:
    """A saved-and-loaded, untrained SAE (BatchTopK included, whose training rule is a batch
    rule): a token's code is the same alone, in any batch, whatever the other tokens are."""
    d, n = 16, 64
    gen = torch.Generator().manual_seed(4)
    sample = torch.randn(2000, d, generator=gen) * 3 + 1
    sae = SAE.create(SAEConfig(arch=arch, d=d, n_latents=n, k=4, jumprelu_target_l0=4))
    sae.init_from_sample(sample.numpy().astype(np.float16))  # numpy, half precision: accepted
    loaded = SAE.load(sae.save(tmp_path / "sae"))
    patches = torch.randn(40, d, generator=gen) * 3 + 1
    cls_like = torch.randn(8, d, generator=gen) * 12 + 5  # other statistics, as CLS tokens
    x = torch.cat([patches, cls_like])
    codes = loaded.encode(x)
    assert float((codes > 0).sum(dim=1).float().mean()) > 1
    for i in range(len(x)):
        alone = loaded.encode(x[i : i + 1])[0]
        assert torch.equal(alone > 0, codes[i] > 0), i
        torch.testing.assert_close(alone, codes[i], rtol=1e-5, atol=1e-6)
    other = torch.cat([patches[:10], torch.randn(30, d, generator=gen) * 20])
    torch.testing.assert_close(loaded.encode(other)[:10], codes[:10], rtol=1e-5, atol=1e-6)
    assert torch.equal(loaded.encode(other)[:10] > 0, codes[:10] > 0)


def test_batchtopk_encoding_without_a_threshold_is_refused_but_training_works() -> None:
    sae = SAE.create(SAEConfig(arch="batchtopk", d=8, n_latents=32, k=3))
    x = torch.randn(64, 8)
    with pytest.raises(VisaeError, match=r"calibrate_threshold.*init_from_sample") as err:
        sae.encode(x)
    assert "\n" not in str(err.value)
    for call in (sae.encode_sparse, sae.forward):
        with pytest.raises(VisaeError, match="no inference threshold"):
            call(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    out = sae.train_step(opt, x)  # the batch rule: exactly k * B entries
    assert out.l0 == pytest.approx(3.0)
    assert sae.encode(x).shape == (64, 32)  # the first training batch set the threshold


def test_batchtopk_threshold_is_an_ema_of_the_batch_cutoffs() -> None:
    d, n, k, b = 12, 64, 4, 32
    sae = SAE.create(SAEConfig(arch="batchtopk", d=d, n_latents=n, k=k, batchtopk_momentum=0.9))
    batches = [torch.randn(b, d, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    smallest = []
    for x in batches:
        pre = reference_preacts(sae, x).reshape(-1)
        top = pre.topk(k * b).values
        smallest.append(float(top[top > 0].min()))
        out = sae.loss(x, update_state=True)
        assert out.l0 * b == k * b  # exactly k * B active over the batch
    expected = smallest[0]
    for value in smallest[1:]:
        expected = 0.9 * expected + 0.1 * value
    assert float(sae.threshold) == pytest.approx(expected, rel=1e-5)
    x = torch.randn(50, d)
    torch.testing.assert_close(sae.encode(x), reference_codes(sae, x).float())


def test_batchtopk_calibrated_threshold_gives_k_on_average() -> None:
    """After calibration the inference rule fires ~k latents per token on data like the
    calibration batches, whatever stale value the training EMA held."""
    cfg = SAEConfig(arch="batchtopk", d=32, n_latents=256, k=8)
    sae = SAE.create(cfg)
    x = torch.randn(8 * 512, 32, generator=torch.Generator().manual_seed(1))
    sae.threshold.fill_(10.0)
    sae.threshold_updates.fill_(5)
    assert sae(x)[2]["l0"].float().mean() < 1
    threshold = sae.calibrate_threshold(x[i : i + 512] for i in range(0, len(x), 512))
    cutoffs = [
        float(reference_preacts(sae, x[i : i + 512]).reshape(-1).topk(8 * 512).values.min())
        for i in range(0, len(x), 512)
    ]
    assert threshold == pytest.approx(sum(cutoffs) / len(cutoffs), rel=1e-5)
    assert float(sae(x)[2]["l0"].float().mean()) == pytest.approx(8, rel=0.15)


def test_batchtopk_survives_all_zero_and_all_negative_batches() -> None:
    sae = SAE.create(SAEConfig(arch="batchtopk", d=6, n_latents=24, k=3))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    with torch.no_grad():
        sae.b_enc.fill_(-5.0)
    out = sae.train_step(opt, torch.zeros(16, 6))  # pre-activations all -5: nothing fires
    assert out.l0 == 0 and math.isfinite(float(out.loss.detach()))
    assert int(sae.threshold_updates) == 0
    with pytest.raises(VisaeError, match="no positive activations"):
        sae.calibrate_threshold([torch.zeros(16, 6)])
    with torch.no_grad():
        sae.b_enc.fill_(0.0)
    out = sae.train_step(opt, torch.zeros(16, 6))
    assert math.isfinite(float(out.loss.detach()))


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


# --------------------------------------------------------------------------- sparse step maths
def reference_objective(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain dense autograd re-implementation of the TopK-family objective.

    Returns the loss and the gradients of W_enc, b_enc, W_dec, b_dec, computed on copies of
    the SAE's parameters, with the per-prefix Matryoshka losses computed by a slow loop and
    AuxK normalised per token (Gao et al.).
    """
    cfg = sae.cfg
    w_enc, b_enc, w_dec, b_dec = (
        p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    )
    xn = (x - sae.norm_mean) / sae.norm_scale
    pre = (xn - b_dec) @ w_enc.T + b_enc
    mask = (reference_train_codes(sae, x) > 0).to(pre.dtype)
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
        per_token = ((aux_codes @ w_dec - residual) ** 2).mean(dim=1)
        auxk = (per_token / (residual**2).mean(dim=1)).mean()
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


@pytest.mark.parametrize("kernels", ["cpu", "portable"])
@pytest.mark.parametrize(("arch", "b", "d", "n", "k", "matryoshka", "n_dead"), GRAD_CASES)
def test_sparse_step_gradients_match_dense_reference(
    arch: str,
    b: int,
    d: int,
    n: int,
    k: int,
    matryoshka: tuple | None,
    n_dead: int,
    kernels: str,
) -> None:
    """The sparse step's loss and four gradients equal dense autograd, with the CPU kernels and
    with the device-independent ones that every other device runs."""
    sae = make_sae(arch, d, n, k, matryoshka=matryoshka, k_aux=6, dead_after_tokens=100)
    dead = torch.randperm(n, generator=torch.Generator().manual_seed(5))[:n_dead]
    sae.tokens_since_fired[dead] = 100
    x = raw_batch(b, d)
    ref = reference_objective(sae, x)
    sae.zero_grad(set_to_none=True)
    if kernels == "portable":
        with portable_kernels():
            out = sae.loss(x, update_state=False)
            out.loss.backward()
    else:
        out = sae.loss(x, update_state=False)
        out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), ref["loss"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.auxk, ref["auxk"], rtol=1e-10, atol=1e-12)
    assert out.nmse == pytest.approx(float(ref["nmse"]), rel=1e-9)
    assert out.l0 == pytest.approx(float(ref["l0"]))
    if n_dead:
        assert float(ref["auxk"]) > 0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        got = getattr(sae, name).grad
        torch.testing.assert_close(got, ref[name], rtol=1e-9, atol=1e-11, msg=name)
    if matryoshka:
        prefixes = [out.extra[f"recon_prefix_{s}"] for s in sae.cfg.matryoshka_sizes()]
        np.testing.assert_allclose(prefixes, ref["prefix"].numpy(), rtol=1e-6)


def test_portable_kernels_equal_the_cpu_kernels_and_a_float64_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7, 2])  # empty bags included
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    cols = torch.randint(0, 50, (int(counts.sum()),), generator=gen)  # unsorted within bags
    left = torch.randn(len(counts), 9, generator=gen, dtype=torch.float64)
    right = torch.randn(50, 9, generator=gen, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
    expected = torch.tensor(
        [float(left[r] @ right[c]) for r, c in zip(rows, cols, strict=True)], dtype=torch.float64
    )
    cpu = sampled_dots(ptr, cols, left, right)
    with portable_kernels():
        portable = sampled_dots(ptr, cols, left, right)
        keys = torch.randint(0, 100, (500,), generator=gen)
        order = _stable_argsort(keys, 100)
    torch.testing.assert_close(cpu, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(portable, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(order, torch.from_numpy(np.argsort(keys.numpy(), kind="stable")))
    assert torch.equal(_stable_argsort(keys, 100), order)
    assert not sparse_module._PORTABLE_ONLY  # the block restores the CPU kernels


def test_portable_dots_are_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded memory: with a tiny chunk the gathered path still gives every entry."""
    monkeypatch.setattr(sparse_module, "GATHER_CHUNK_ELEMENTS", 20)
    gen = torch.Generator().manual_seed(1)
    ptr = torch.tensor([0, 4, 9, 15])
    cols = torch.randint(0, 30, (15,), generator=gen)
    left, right = torch.randn(3, 8, generator=gen), torch.randn(30, 8, generator=gen)
    with portable_kernels():
        got = sampled_dots(ptr, cols, left, right)
    torch.testing.assert_close(got, sampled_dots(ptr, cols, left, right))


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


# --------------------------------------------------------------------------- bfloat16
def test_bfloat16_selection_uses_exact_values_and_matches_reference_gradients() -> None:
    d, n, k, b = 32, 256, 8, 64
    cfg = {"arch": "topk", "d": d, "n_latents": n, "k": k}
    fp32 = SAE.create(SAEConfig(**cfg))
    bf16 = SAE.create(SAEConfig(**cfg, compute_dtype="bfloat16"))
    bf16.load_state_dict(fp32.state_dict())
    x = torch.randn(b, d)
    values, indices = bf16.encode_sparse(x)
    xn = bf16.normalize(x)
    exact = torch.relu(reference_preacts(bf16, x).gather(1, indices)).float()
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


@pytest.mark.parametrize("kernels", ["cpu", "portable"])
def test_bfloat16_drops_entries_whose_exact_value_is_not_positive(kernels: str) -> None:
    """Tokens share a large component that the encoder bias cancels: in bfloat16 the
    cancellation leaves errors far larger than the exact pre-activations (~0.02), so about
    half of the bf16-selected entries are <= 0 exactly. They must not be codes, nor count in
    L0 or as firing (with either kernel set for the exact recomputation)."""
    context = portable_kernels() if kernels == "portable" else contextlib.nullcontext()
    with context:
        check_bfloat16_drops_non_positive_entries()


def check_bfloat16_drops_non_positive_entries() -> None:
    d, n = 16, 64
    sae = SAE.create(SAEConfig(arch="topk", d=d, n_latents=n, k=n, compute_dtype="bfloat16"))
    gen = torch.Generator().manual_seed(0)
    common = torch.full((d,), 8.0)
    x = common + 5e-3 * torch.randn(32, d, generator=gen)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(n, d, generator=gen))
        sae.b_enc.copy_(-(sae.W_enc.double() @ common.double()).float())
    sae.set_normalization(torch.zeros(d), 1.0)
    exact = reference_preacts(sae, x)
    bf16_pre = torch.addmm(
        sae.b_enc.detach().bfloat16(), x.bfloat16(), sae.W_enc.detach().bfloat16().t()
    ).double()
    selected = bf16_pre > 0
    assert float((selected & (exact <= 0)).double().mean()) > 0.1  # the case under test occurs
    expected = torch.where(selected & (exact > 0), exact, 0.0)
    codes = sae.encode(x).double()
    torch.testing.assert_close(codes, expected, rtol=0, atol=5e-5)  # float32 sums of ~30s
    clear = exact.abs() > 1e-4  # signs that float32 rounding cannot flip
    assert torch.equal((codes > 0)[clear], (expected > 0)[clear])
    active = (codes > 0).sum(dim=1)
    assert float(active.double().mean()) < 0.75 * float(selected.sum(dim=1).double().mean())
    assert torch.equal(sae(x)[2]["l0"], active)
    values, _ = sae.encode_sparse(x)
    assert torch.equal((values > 0).sum(dim=1), active)
    out = sae.loss(x, update_state=True)
    assert out.l0 == pytest.approx(float(active.double().mean()))
    out.loss.backward()
    assert torch.isfinite(sae.W_enc.grad).all()
    never = ~(codes > 0).any(dim=0)
    assert never.any() and (selected[:, never]).any()  # chosen in bf16, never really positive
    assert (sae.tokens_since_fired[never] == len(x)).all()  # so not counted as firing


# --------------------------------------------------------------------------- AuxK
def test_auxk_loss_is_gao_et_al_per_token_normalised_mse() -> None:
    """Against a token-by-token float64 loop, on tokens whose residuals differ by orders of
    magnitude (where per-token and whole-batch normalisation disagree) and one token
    reconstructed exactly (0/0 per token: left out of the mean, not a NaN)."""
    d, n = 8, 48
    sae = make_sae("topk", d, n, 3, k_aux=5, dead_after_tokens=10)
    sae.tokens_since_fired[torch.arange(0, n, 2)] = 10  # every other latent is dead
    x = raw_batch(30, d)
    x[1:8] = (x[1:8] - sae.norm_mean) * 20 + sae.norm_mean  # long tokens, large residuals
    with torch.no_grad():
        # token 0 sits at b_dec, and a negative bias leaves it without codes: x_hat = x there
        x[0] = sae.denormalize(sae.b_dec.detach())
        sae.b_enc.sub_(sae.b_enc.max() + 0.01)
    xn = sae.normalize(x).detach()
    x_hat = reference_train_codes(sae, x) @ sae.W_dec.double().detach() + sae.b_dec.detach()
    residual_ms = (xn - x_hat).square().mean(dim=1)
    assert float(residual_ms[0]) < 1e-24
    assert float(residual_ms[1:].max() / residual_ms[1:].min()) > 100
    expected = reference_auxk(sae, x)
    got = float(sae.loss(x, update_state=False).auxk)
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-10)
    whole_batch = reference_auxk(sae, x, per_token=False)
    assert abs(whole_batch - expected) > 0.05 * expected  # the data tells the two apart


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
    positive = (reference_preacts(sae, x)[:, :4] > 0).any(dim=0)
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


# --------------------------------------------------------------------------- JumpReLU, ReLU
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


def test_relu_l1_penalty_scaling_and_decoder_norm_weighting() -> None:
    sae = make_sae("relu", 6, 20, l1_coeff=0.02, decoder_norm_l1=True, normalize_decoder=False)
    x = raw_batch(30, 6)
    codes = torch.relu(reference_preacts(sae, x))
    weighted = (codes * sae.W_dec.detach().norm(dim=1)).sum(dim=1).mean()
    full = sae.loss(x, update_state=False)
    assert float(full.sparsity) == pytest.approx(0.02 * float(weighted))
    half = sae.loss(x, sparsity_scale=0.5, update_state=False)
    assert float((full.loss - half.loss).detach()) == pytest.approx(0.5 * 0.02 * float(weighted))
    plain = make_sae("relu", 6, 20, l1_coeff=0.02)
    assert float(plain.loss(x).sparsity) == pytest.approx(0.02 * float(codes.sum(dim=1).mean()))


# --------------------------------------------------------------------------- decoder constraint
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_decoder_rows_stay_unit_norm_and_parallel_gradient_is_removed(arch: str) -> None:
    sae = SAE.create(SAEConfig(arch=arch, d=10, n_latents=40, k=4, jumprelu_target_l0=8))
    x = torch.randn(64, 10) * 3
    sae.init_from_sample(x)
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
