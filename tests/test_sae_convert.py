"""Peers' SAE checkpoints imported into visae: for each format a checkpoint written byte for
byte in the peer's documented layout (the peers' packages pull transformer-lens, nnsight,
torchvision...; none installs beside CPU torch here), and the peer's own encode/decode written
out from its source as the reference; the imported SAE must reproduce it on random inputs. Then
the SAELens export, round trips, the registry of published SAEs, and refusals."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from visae.errors import VisaeError
from visae.sae import SAE, SAEConfig
from visae.sae.convert import export_saelens, import_sae

D, N, K = 16, 48, 5
torch.manual_seed(0)


def _rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape) * scale


def _x(n: int = 64) -> torch.Tensor:
    return _rand(n, D, scale=2.0) + 0.5


def _topk_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(h)
    idx = h.topk(k, dim=1).indices
    return out.scatter(1, idx, h.gather(1, idx))


def _check(sae: SAE, encode, decode, x: torch.Tensor) -> torch.Tensor:
    """The imported SAE's codes and reconstruction equal the peer's."""
    want = encode(x)
    got = sae.encode(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert torch.allclose(sae.decode(want), decode(want), atol=1e-5, rtol=1e-5)
    x_hat, _, _ = sae(x)
    assert torch.allclose(x_hat, decode(want), atol=1e-4, rtol=1e-5)
    return want


# ------------------------------------------------------------------------ saev


def _write_saev(path: Path, header: dict, state: dict) -> Path:
    """saev's dump: one JSON line, then torch.save of the state dict into the same file."""
    with open(path, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        torch.save(state, f)
    return path


def _saev_state() -> dict:
    return {
        "W_enc": _rand(D, N, scale=0.3),
        "b_enc": _rand(N, scale=0.2) - 0.4,
        "W_dec": _rand(N, D, scale=0.3),
        "b_dec": _rand(D, scale=0.5),
    }


@pytest.mark.parametrize("schema", [None, 1, 5])
def test_saev_relu_with_and_without_b_dec_subtraction(tmp_path: Path, schema) -> None:
    st = _saev_state()
    if schema is None:  # saev 0.1.0, the paper's
        header = {
            "d_vit": D,
            "exp_factor": 3,
            "sparsity_coeff": 4e-4,
            "n_reinit_samples": 0,
            "ghost_grads": False,
            "remove_parallel_grads": True,
            "normalize_w_dec": True,
            "seed": 0,
        }
    elif schema == 1:
        header = {"schema": 1, "cls": "Relu", "cfg": {"d_vit": D, "exp_factor": 3, "seed": 0}}
    else:
        header = {
            "schema": 5,
            "cfg": {
                "d_model": D,
                "d_sae": N,
                "activation": {"cls": "Relu", "params": {"key": "relu"}},
            },
            "commit": "3d73f1f",
            "lib": "0.1.0",
        }
    path = _write_saev(tmp_path / "sae.pt", header, st)
    sae = import_sae(path, tmp_path / "out")
    subtract = schema in (None, 1)

    def encode(x):
        h = (x - st["b_dec"] * subtract) @ st["W_enc"] + st["b_enc"]
        return torch.relu(h)

    _check(sae, encode, lambda f: f @ st["W_dec"] + st["b_dec"], _x())
    again = SAE.load(tmp_path / "out")
    assert again.checkpoint_info["metadata"]["provenance"]["format"] == "saev"
    x = _x()
    assert torch.equal(again.encode(x), sae.encode(x))


def test_saev_topk_lets_negative_values_through(tmp_path: Path) -> None:
    st = _saev_state()
    st["b_enc"] -= 3.0  # most pre-activations negative: k of them must still come out
    header = {
        "schema": 5,
        "cfg": {
            "d_model": D,
            "d_sae": N,
            "activation": {"cls": "TopK", "params": {"key": "top-k", "top_k": K}},
        },
    }
    sae = import_sae(_write_saev(tmp_path / "sae.pt", header, st))
    assert sae.cfg.arch == "topk" and sae.cfg.signed_topk and sae.cfg.k == K

    def encode(x):
        return _topk_mask(x @ st["W_enc"] + st["b_enc"], K)

    codes = _check(sae, encode, lambda f: f @ st["W_dec"] + st["b_dec"], _x())
    assert (codes < 0).any() and ((codes != 0).sum(1) == K).all()


def test_saev_batchtopk_threshold_and_its_older_files(tmp_path: Path) -> None:
    st = _saev_state() | {"activation.threshold": torch.tensor(0.35)}
    header = {
        "schema": 5,
        "cfg": {
            "d_model": D,
            "d_sae": N,
            "activation": {"cls": "BatchTopK", "params": {"top_k": K, "momentum": 0.1}},
        },
    }
    sae = import_sae(_write_saev(tmp_path / "a.pt", header, st))
    assert sae.cfg.arch == "batchtopk"

    def encode(x):
        h = x @ st["W_enc"] + st["b_enc"]
        return torch.where(h > 0.35, h, torch.zeros_like(h))

    _check(sae, encode, lambda f: f @ st["W_dec"] + st["b_dec"], _x())
    del st["activation.threshold"]  # before saev kept a threshold: per-sample TopK, no ReLU
    old = import_sae(_write_saev(tmp_path / "b.pt", header, st))
    assert old.cfg.arch == "topk" and old.cfg.signed_topk


# ------------------------------------------------------------------------ SAELens


def _write_saelens(folder: Path, cfg: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors")
    )
    return folder


def _saelens_tensors() -> dict:
    return {
        "W_enc": _rand(D, N, scale=0.3),
        "b_enc": _rand(N, scale=0.2),
        "W_dec": _rand(N, D, scale=0.3),
        "b_dec": _rand(D, scale=0.5),
    }


def _v6(arch: str, **extra) -> dict:
    return {
        "architecture": arch,
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "hook_name": "blocks.10.hook_resid_post",
            "model_name": "vit",
        },
    } | extra


def _saelens_reference(cfg: dict, t: dict, scale: float = 1.0):
    """SAELens 6's forward: process_sae_in, the architecture's encode, decode."""
    apply = cfg.get("apply_b_dec_to_input", True)

    def pre(x):
        x = x * scale
        return (x - t["b_dec"] * apply) @ t["W_enc"] + t["b_enc"]

    norms = t["W_dec"].norm(dim=1)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    arch = cfg["architecture"]

    def encode(x):
        h = pre(x)
        if arch == "standard":
            return torch.relu(h)
        if arch == "jumprelu":
            return torch.relu(h) * (h > t["threshold"])
        if rescale:
            h = h * norms
        idx = h.topk(cfg["k"], dim=1).indices
        return torch.zeros_like(h).scatter(1, idx, torch.relu(h.gather(1, idx)))

    def decode(f):
        if rescale:
            f = f / norms
        return (f @ t["W_dec"] + t["b_dec"]) / scale

    return encode, decode


@pytest.mark.parametrize(
    "cfg",
    [
        _v6("standard", apply_b_dec_to_input=False),
        _v6("standard", apply_b_dec_to_input=True),
        _v6("topk", k=K, apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=True),
        _v6("jumprelu", apply_b_dec_to_input=False),
        # before 6.0: flat keys, TopK as an activation function
        {
            "architecture": "standard",
            "d_in": D,
            "d_sae": N,
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": K},
            "apply_b_dec_to_input": True,
            "hook_name": "blocks.10.hook_resid_post",
            "sae_lens_training_version": "4.4.5",
        },
    ],
    ids=["standard", "standard-bdec", "topk-rescaled", "jumprelu", "pre6-topk"],
)
def test_saelens_architectures(tmp_path: Path, cfg: dict) -> None:
    t = _saelens_tensors()
    if cfg["architecture"] == "jumprelu":
        t["threshold"] = torch.rand(N) * 0.3
    sae = import_sae(_write_saelens(tmp_path / "sae", cfg, t))
    ref = dict(cfg)
    if cfg.get("activation_fn_str") == "topk":
        ref |= {"architecture": "topk", "k": K}
    _check(sae, *_saelens_reference(ref, t), _x())


def test_saelens_input_scaling_and_refusals(tmp_path: Path) -> None:
    t = _saelens_tensors()
    folder = _write_saelens(
        tmp_path / "scaled", _v6("standard", normalize_activations="expected_average_only_in"), t
    )
    with pytest.raises(VisaeError, match=r"no activation_scaler\.json"):
        import_sae(folder)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.25}))
    sae = import_sae(folder)
    _check(sae, *_saelens_reference(_v6("standard"), t, scale=0.25), _x())
    for cfg, message in (
        (_v6("standard", normalize_activations="layer_norm"), "rescales every token"),
        (_v6("gated"), "architecture 'gated' is not supported"),
    ):
        folder = _write_saelens(
            tmp_path / cfg["architecture"] / cfg["normalize_activations"], cfg, t
        )
        with pytest.raises(VisaeError, match=message):
            import_sae(folder)


# ------------------------------------------------------------------------ dictionary_learning


def _write_dl(folder: Path, dict_class: str, state: dict, file: str = "ae.pt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "trainer": {
                    "trainer_class": dict_class.replace("SAE", "Trainer"),
                    "dict_class": dict_class,
                    "activation_dim": D,
                    "dict_size": N,
                    "k": K,
                    "layer": "",
                    "lm_name": "",
                }
            }
        )
    )
    (folder / file).parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in state.items()}, folder / file)
    return folder


def _dl_topk_state(threshold: float) -> dict[str, torch.Tensor]:
    """A dictionary_learning TopK/BatchTopK state dict (its `threshold` -1: never calibrated)."""
    return {
        "b_dec": _rand(D, scale=0.5),
        "k": torch.tensor(K, dtype=torch.int32),
        "threshold": torch.tensor(threshold),
        "decoder.weight": _rand(D, N, scale=0.3),
        "encoder.weight": _rand(N, D, scale=0.3),
        "encoder.bias": _rand(N, scale=0.2),
    }


@pytest.mark.parametrize("threshold", [0.3, -1.0])  # -1: never calibrated, plain ReLU
def test_dictionary_learning_batchtopk(tmp_path: Path, threshold: float) -> None:
    st = _dl_topk_state(threshold)
    sae = import_sae(_write_dl(tmp_path / "run", "BatchTopKSAE", st))

    def encode(x):
        a = torch.relu((x - st["b_dec"]) @ st["encoder.weight"].T + st["encoder.bias"])
        return a * (a > threshold)

    _check(sae, encode, lambda f: f @ st["decoder.weight"].T + st["b_dec"], _x())


def test_dictionary_learning_topk_and_sae_for_vlm_matryoshka(tmp_path: Path) -> None:
    st = _dl_topk_state(-1.0)
    sae = import_sae(_write_dl(tmp_path / "topk", "AutoEncoderTopK", st))

    def encode(x):
        a = torch.relu((x - st["b_dec"]) @ st["encoder.weight"].T + st["encoder.bias"])
        return _topk_mask(a, K)

    _check(sae, encode, lambda f: f @ st["decoder.weight"].T + st["b_dec"], _x())
    m = {
        "W_enc": _rand(D, N, scale=0.3),
        "b_enc": _rand(N, scale=0.2),
        "W_dec": _rand(N, D, scale=0.3),
        "b_dec": _rand(D, scale=0.5),
        "k": torch.tensor(K, dtype=torch.int32),
        "threshold": torch.tensor(0.2),
        "group_sizes": torch.tensor([6, 12, 30]),
    }
    folder = _write_dl(tmp_path / "vlm", "MatroyshkaBatchTopKSAE", m, "checkpoints/ae_100000.pt")
    sae = import_sae(folder / "checkpoints" / "ae_100000.pt")
    assert sae.cfg.matryoshka == (6 / 48, 18 / 48, 1.0) and sae.cfg.arch == "batchtopk"

    def encode_m(x):
        a = torch.relu((x - m["b_dec"]) @ m["W_enc"] + m["b_enc"])
        return a * (a > 0.2)

    _check(sae, encode_m, lambda f: f @ m["W_dec"] + m["b_dec"], _x())
    torch.save({"ae": st, "step": 3}, tmp_path / "topk" / "ae.pt")  # a training backup
    with pytest.raises(VisaeError, match="not a flat dict of tensors"):
        import_sae(tmp_path / "topk")


# ------------------------------------------------------------------------ sparsify


def test_sparsify_relu_then_topk(tmp_path: Path) -> None:
    folder = tmp_path / "layers.10"
    folder.mkdir()
    t = {
        "encoder.weight": _rand(N, D, scale=0.3),
        "encoder.bias": _rand(N, scale=0.2) - 0.3,
        "W_dec": _rand(N, D, scale=0.3),
        "b_dec": _rand(D, scale=0.5),
    }
    save_file(t, str(folder / "sae.safetensors"))
    cfg = {
        "activation": "topk",
        "expansion_factor": 3,
        "normalize_decoder": True,
        "num_latents": N,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = import_sae(folder)

    def encode(x):
        pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
        return _topk_mask(pre, K)

    _check(sae, encode, lambda f: f @ t["W_dec"] + t["b_dec"], _x())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"skip_connection": True}))
    with pytest.raises(VisaeError, match="skip_connection=true is not an SAE"):
        import_sae(folder)


# ------------------------------------------------------------------------ overcomplete


def test_overcomplete_state_dicts_and_pickled_modules(tmp_path: Path) -> None:
    st = {
        "encoder.final_block.0.weight": _rand(N, D, scale=0.3),
        "encoder.final_block.0.bias": _rand(N, scale=0.2),
        "dictionary._weights": _rand(N, D),
        "dictionary.multiplier": torch.tensor(0.3),
    }
    path = tmp_path / "topk.pt"
    torch.save(st, path)
    with pytest.raises(VisaeError, match="does not say its SAE's class"):
        import_sae(path)
    sae = import_sae(path, arch="topk", k=K)
    w = st["dictionary._weights"]
    atoms = w / (w.norm(dim=1, keepdim=True) + 1e-8) * st["dictionary.multiplier"].exp()

    def pre(x):
        return x @ st["encoder.final_block.0.weight"].T + st["encoder.final_block.0.bias"]

    _check(sae, lambda x: _topk_mask(torch.relu(pre(x)), K), lambda z: z @ atoms, _x())
    jump = st | {"thresholds": torch.full((N,), -1.5)}
    torch.save(jump, tmp_path / "jump.pt")
    sae = import_sae(tmp_path / "jump.pt")

    def encode_jump(x):
        z = torch.relu(pre(x))
        return torch.where(z < jump["thresholds"].exp(), torch.zeros_like(z), z)

    _check(sae, encode_jump, lambda z: z @ atoms, _x())
    torch.save(torch.nn.Linear(D, N), tmp_path / "module.pt")  # what overcomplete's tests do
    with pytest.raises(VisaeError, match=r"pickles Python objects .* never unpickles"):
        import_sae(tmp_path / "module.pt")


# ------------------------------------------------------------------------ out to SAELens


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_export_to_saelens_and_back(tmp_path: Path, arch: str) -> None:
    cfg = SAEConfig(arch=arch, d=D, n_latents=N, k=K, jumprelu_target_l0=K)
    sae = SAE.create(cfg)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(_rand(N, D, scale=0.3))
        sae.b_enc.copy_(_rand(N, scale=0.2))
        sae.b_dec.copy_(_rand(D, scale=0.3))
    sae.set_normalization(_rand(D), 2.5)
    if arch == "batchtopk":
        sae.threshold.fill_(0.25)
        sae.threshold_updates.fill_(1)
    if arch == "jumprelu":
        with torch.no_grad():
            sae.log_threshold.copy_((torch.rand(N) * 0.3 + 0.05).log())
    out = export_saelens(sae, tmp_path / "saelens", {"model_name": "dinov2-s"})
    exported = json.loads((out / "cfg.json").read_text())
    from safetensors.torch import load_file

    t = load_file(str(out / "sae_weights.safetensors"))
    assert exported["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    x = _x()
    encode, decode = _saelens_reference(exported, t)
    assert torch.allclose(encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(decode(sae.encode(x)), sae.decode(sae.encode(x)), atol=1e-4)
    back = import_sae(out)
    assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(back.decode(back.encode(x)), sae.decode(sae.encode(x)), atol=1e-4)


def test_convert_commands_and_published_names(tmp_path: Path, capsys) -> None:
    from visae.cli import main
    from visae.sae.published import PUBLISHED, converted_path

    st = _saev_state()
    header = {
        "schema": 5,
        "cfg": {"d_model": D, "d_sae": N, "activation": {"cls": "TopK", "params": {"top_k": K}}},
    }
    path = _write_saev(tmp_path / "sae.pt", header, st)
    assert main(["convert", str(path), "--out", str(tmp_path / "v")]) == 0
    assert "topk (k=5, signed), d=16, 48 latents, from saev" in capsys.readouterr().out
    assert (
        main(["convert", str(tmp_path / "v"), "--to", "saelens", "--out", str(tmp_path / "s")]) == 2
    )
    assert "signed TopK SAE (saev's rule) has no SAELens architecture" in capsys.readouterr().err
    relu = _write_saev(tmp_path / "relu.pt", {"d_vit": D, "exp_factor": 3}, st)
    assert main(["convert", str(relu), "--to", "saelens", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "sae_weights.safetensors").is_file()
    assert main(["sae", "list"]) == 0
    listing = capsys.readouterr().out
    assert "saev/clip-b16-l10" in listing and "osunlp/SAE_CLIP_24K_ViT-B-16_IN1K" in listing
    assert "needs a download" in listing
    with pytest.raises(VisaeError, match=r"saev/clip-b16-l10 needs a download of sae\.pt from"):
        SAE.load("saev/clip-b16-l10")  # the tests run offline
    import_sae(relu, converted_path("saev/clip-b16-l10"))  # as a finished download leaves it
    assert SAE.load("saev/clip-b16-l10").n_latents == N
    assert "converted here" in (main(["sae", "list"]), capsys.readouterr().out)[1]
    assert set(PUBLISHED) >= {"saev/clip-b16-l10", "saev/dinov2-b14-l10"}
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["convert", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "cannot read" in capsys.readouterr().err
    buf = io.BytesIO()
    torch.save({"W": torch.zeros(2)}, buf)
    (tmp_path / "odd.pt").write_bytes(buf.getvalue())
    with pytest.raises(VisaeError, match="not the state dict of an overcomplete SAE"):
        import_sae(tmp_path / "odd.pt")
