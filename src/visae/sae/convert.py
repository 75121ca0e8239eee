"""Published SAE checkpoints in, visae's out (and visae's to SAELens): `import_sae`,
`export_saelens`.

Every peer's SAE is some `f = act((x - c) @ W_enc + b_enc)`, `x_hat = f @ W_dec + b_dec` on
raw activations, so each becomes a visae SAE with identity input normalisation, its encoder
bias folded where the peer does not subtract `b_dec` first (visae always does:
`b_enc' = b_enc + b_dec @ W_enc` gives the same pre-activations), and its activation rule mapped
onto visae's: ReLU, TopK (the peers' TopK->ReLU and ReLU->TopK keep the same values), saev's
TopK without a ReLU as `signed_topk`, a global inference threshold as BatchTopK, per-latent
thresholds as JumpReLU. What a format cannot say (saev's input statistics, a transcoder's
target) is recorded in the provenance or refused with a one-line error. Torch files are read
with `weights_only=True` only: a file that needs pickle is refused, never unpickled.

Layouts, as read from each peer's source (version or commit in docs/interop.md):
- saev `sae.pt`: one JSON header line, then `torch.save(state_dict)`; W_enc [d, n], W_dec
  [n, d]. No "schema" (0.1.0, the paper's) or schema 1: `(x - b_dec) @ W_enc + b_enc`; schema
  >= 2: `x @ W_enc + b_enc`. Activation Relu, TopK (top k of the raw pre-activations, no ReLU)
  or BatchTopK (inference: above the scalar `activation.threshold`).
- SAELens `cfg.json` + `sae_weights.safetensors`: W_enc [d, n]; `apply_b_dec_to_input`;
  architectures standard, topk (optionally rescaled by the decoder norms), jumprelu
  (`ReLU(h) * (h > threshold)`; BatchTopK-trained SAEs are saved this way).
- dictionary_learning / sae-for-vlm `ae.pt` + `config.json` ({"trainer": {"dict_class"...}}):
  BatchTopKSAE and AutoEncoderTopK (encoder.weight [n, d], decoder.weight [d, n], b_dec, k,
  threshold), (Matryoshka|Matroyshka)BatchTopKSAE (W_enc [d, n], W_dec [n, d], group_sizes),
  AutoEncoder (ReLU; decoder bias `bias`); all `ReLU((x - b_dec) ...)`.
- EleutherAI sparsify `cfg.json` + `sae.safetensors`: encoder.weight [n, d], W_dec [n, d],
  `topk(ReLU((x - b_dec) @ W_enc.T + b_enc))`.
- overcomplete: a state dict of `encoder.final_block.0.{weight,bias}` and
  `dictionary.{_weights,multiplier}` (+ `thresholds`, log values, for JumpSAE); no b_dec, the
  dictionary's rows L2-normalised times exp(multiplier). Its own save pickles the module.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from visae.errors import VisaeError, first_line

FORMATS = ("saev", "saelens", "dictionary_learning", "sparsify", "overcomplete")
MIN_THRESHOLD = 1e-30  # a JumpReLU threshold <= 0 fires on every positive pre-activation


@dataclass
class Weights:
    """A peer SAE in visae's layout: W_enc and W_dec [n, d] (rows per latent), b_enc [n],
    b_dec [d], pre-activations `(x - b_dec) @ W_enc.T + b_enc` on raw inputs."""

    arch: str
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    k: int | None = None
    threshold: Tensor | None = None  # BatchTopK: scalar; JumpReLU: [n]
    signed_topk: bool = False
    matryoshka: tuple[float, ...] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, getattr(self, name).detach().to(torch.float32).contiguous())
        n, d = self.W_enc.shape
        shapes = {"W_dec": (n, d), "b_enc": (n,), "b_dec": (d,)}
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise VisaeError(
                    f"{self.source.get('path', 'checkpoint')}: {name} has shape "
                    f"{tuple(getattr(self, name).shape)}, expected {shape} for W_enc {(n, d)}"
                )


def fold_centering(W_enc_rows: Tensor, b_enc: Tensor, center: Tensor, b_dec: Tensor) -> Tensor:
    """The encoder bias under visae's `(x - b_dec)` for a peer that subtracts `center`
    instead (zero when it subtracts nothing)."""
    return b_enc + (b_dec - center) @ W_enc_rows.T


# ------------------------------------------------------------------------ reading files


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VisaeError(f"{path} is not readable JSON: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise VisaeError(f"{path} does not hold a JSON object")
    return data


def _safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise VisaeError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise VisaeError(f"cannot read {path}: {first_line(e)}") from None


def load_tensors(source: Any, where: str) -> dict[str, Tensor]:
    """A torch file (a path or an open binary stream) holding a flat dict of tensors, read with
    `weights_only=True`; anything that would need pickle is refused."""
    head = _peek(source)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # a torch zip archive, a legacy pickle
        raise VisaeError(f"cannot read {where}: not a torch file")
    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise VisaeError(
            f"{where} pickles Python objects (e.g. a whole module saved with torch.save(model)); "
            "visae reads tensors only and never unpickles: save model.state_dict() instead"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise VisaeError(f"cannot read {where} as a torch file: {first_line(e)}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()
    ):
        raise VisaeError(f"{where} is not a flat dict of tensors (a training checkpoint?)")
    return data


def _peek(source: Any) -> bytes:
    if isinstance(source, io.IOBase):
        at = source.tell()
        head = source.read(4)
        source.seek(at)
        return bytes(head)
    try:
        with open(source, "rb") as f:
            return f.read(4)
    except OSError as e:
        raise VisaeError(f"cannot read {source}: {e.strerror}") from None


def _need(tensors: dict[str, Tensor], names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise VisaeError(f"{where} lacks the tensor {missing[0]!r} (has {sorted(tensors)})")


# ------------------------------------------------------------------------ the formats


def read_saev(path: Path) -> Weights:
    file = path / "sae.pt" if path.is_dir() else path
    try:
        with open(file, "rb") as f:
            line = f.readline()
            try:
                header = json.loads(line)
            except ValueError:
                raise VisaeError(
                    f"{file} is not a saev checkpoint (its first line is not a JSON header)"
                ) from None
            tensors = load_tensors(io.BytesIO(f.read()), str(file))
    except OSError as e:
        raise VisaeError(f"cannot read {file}: {e.strerror}") from None
    if not isinstance(header, dict):
        raise VisaeError(f"{file}: the saev header is not a JSON object")
    _need(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), str(file))
    schema = header.get("schema")
    cfg = header.get("cfg", header) if schema is not None else header
    act_cls, params = "Relu", {}
    if schema is not None:
        activation = cfg.get("activation")
        if isinstance(activation, dict):
            act_cls, params = activation.get("cls", "Relu"), activation.get("params", {}) or {}
        elif header.get("cls") in ("Relu", "TopK", "BatchTopK"):  # schema 1, "format 1A"
            act_cls, params = header["cls"], cfg
    W_enc = tensors["W_enc"].T
    b_dec = tensors["b_dec"]
    subtracts = schema is None or schema == 1  # from schema 2 on saev encodes x, not x - b_dec
    center = b_dec if subtracts else torch.zeros_like(b_dec)
    b_enc = fold_centering(W_enc, tensors["b_enc"], center, b_dec)
    source = {
        "format": "saev",
        "schema": schema,
        "commit": header.get("commit"),
        "header": cfg,
        "input_normalisation": "not stored by saev: its paper-era SAEs were trained on "
        "(x - dataset mean) / scalar computed from their activations",
    }
    common = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": tensors["W_dec"], "b_dec": b_dec}
    if act_cls == "Relu":
        return Weights("relu", **common, source=source)
    k = params.get("top_k", cfg.get("top_k"))
    if act_cls not in ("TopK", "BatchTopK") or not isinstance(k, int):
        raise VisaeError(f"{file}: saev activation {act_cls!r} (top_k {k!r}) is not supported")
    if act_cls == "BatchTopK" and "activation.threshold" in tensors:
        threshold = tensors["activation.threshold"].reshape(())
        return Weights("batchtopk", **common, k=k, threshold=threshold, source=source)
    # TopK, and BatchTopK saved before its threshold existed (it encoded as per-sample TopK):
    # the k largest raw pre-activations, negative ones included
    return Weights("topk", **common, k=k, signed_topk=True, source=source)


SAELENS_RUNTIME_NORMS = ("constant_norm_rescale", "layer_norm")


def read_saelens(path: Path) -> Weights:
    cfg = _json(path / "cfg.json")
    tensors = _safetensors(path / "sae_weights.safetensors")
    where = str(path)
    _need(tensors, ("W_enc", "W_dec", "b_dec"), where)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k")
    act = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    if act == "topk":  # SAELens before 6.0
        arch, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k")
    norm = cfg.get("normalize_activations")
    norm = "expected_average_only_in" if norm is True else norm or "none"
    if norm in SAELENS_RUNTIME_NORMS:
        raise VisaeError(
            f"{where}: normalize_activations={norm!r} rescales every token at run time, which "
            "visae's fixed input normalisation cannot express"
        )
    if norm not in ("none", "expected_average_only_in"):
        raise VisaeError(f"{where}: normalize_activations={norm!r} is not supported")
    W_enc = tensors["W_enc"].T
    W_dec = tensors["W_dec"]
    b_dec = tensors["b_dec"]
    if "b_enc" not in tensors:
        raise VisaeError(f"{where}: SAELens architecture {arch!r} (no b_enc) is not supported")
    b_enc = tensors["b_enc"]
    scale = tensors.get("finetuning_scaling_factor", tensors.get("scaling_factor"))
    if scale is not None:  # (f * s) @ W_dec
        W_dec = W_dec * scale[:, None]
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=1)  # h * |W_dec row|, decoded as (f / |row|) @ W_dec
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    center = b_dec if cfg.get("apply_b_dec_to_input", True) else torch.zeros_like(b_dec)
    b_enc = fold_centering(W_enc, b_enc, center, b_dec)
    source = {
        "format": "saelens",
        "sae_lens_version": meta.get("sae_lens_version", cfg.get("sae_lens_version")),
        "architecture": arch,
        "training_architecture": meta.get("training_architecture"),
        "hook_name": meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point"))),
        "model_name": meta.get("model_name", cfg.get("model_name")),
        "normalize_activations": norm,
    }
    common = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "source": source}
    input_scale = _saelens_input_scale(path, norm)
    if input_scale is not None:
        source["input_scale"] = input_scale
    if arch == "standard":
        return Weights("relu", **common)
    if arch == "topk":
        if not isinstance(k, int):
            raise VisaeError(f"{where}: a topk SAELens SAE needs an integer k in cfg.json")
        return Weights("topk", **common, k=k)
    if arch == "jumprelu":
        if "threshold" in tensors:
            threshold = tensors["threshold"]
        elif "log_threshold" in tensors:
            threshold = tensors["log_threshold"].exp()
        else:
            raise VisaeError(f"{where}: a jumprelu SAE needs its threshold tensor")
        return Weights("jumprelu", **common, threshold=threshold)
    raise VisaeError(f"{where}: SAELens architecture {arch!r} is not supported")


def _saelens_input_scale(path: Path, norm: str) -> float | None:
    """SAELens's `expected_average_only_in` multiplies inputs by a factor that a finished run
    folds into its weights (and then says "none"); one still saying it needs the factor."""
    if norm != "expected_average_only_in":
        return None
    scaler = path / "activation_scaler.json"
    if not scaler.is_file():
        raise VisaeError(
            f"{path}: normalize_activations='expected_average_only_in' but no "
            "activation_scaler.json gives its scaling factor"
        )
    factor = _json(scaler).get("scaling_factor")
    if not isinstance(factor, int | float) or not factor > 0:
        raise VisaeError(f"{scaler}: scaling_factor must be a positive number")
    return float(factor)


DL_TOPK = ("BatchTopKSAE", "AutoEncoderTopK")
DL_MATRYOSHKA = ("MatryoshkaBatchTopKSAE", "MatroyshkaBatchTopKSAE")  # sae-for-vlm's spelling


def read_dictionary_learning(path: Path) -> Weights:
    file = path / "ae.pt" if path.is_dir() else path
    folder = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    config = _json(folder / "config.json")
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    dict_class = trainer.get("dict_class")
    tensors = load_tensors(file, str(file))
    source = {"format": "dictionary_learning", "dict_class": dict_class, "trainer": trainer}
    where = str(file)
    if dict_class in DL_TOPK:
        _need(tensors, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"), where)
        common = {
            "W_enc": tensors["encoder.weight"],
            "b_enc": tensors["encoder.bias"],
            "W_dec": tensors["decoder.weight"].T,
            "b_dec": tensors["b_dec"],
            "k": int(tensors["k"]),
            "source": source,
        }
        if dict_class == "AutoEncoderTopK":
            return Weights("topk", **common)
        _need(tensors, ("threshold",), where)
        return Weights("batchtopk", **common, threshold=tensors["threshold"].reshape(()))
    if dict_class in DL_MATRYOSHKA:
        _need(tensors, ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"), where)
        sizes = tensors["group_sizes"].to(torch.int64)
        n = int(sizes.sum())
        fractions = tuple(float(int(c)) / n for c in sizes.cumsum(0))
        return Weights(
            "batchtopk",
            W_enc=tensors["W_enc"].T,
            b_enc=tensors["b_enc"],
            W_dec=tensors["W_dec"],
            b_dec=tensors["b_dec"],
            k=int(tensors["k"]),
            threshold=tensors["threshold"].reshape(()),
            matryoshka=fractions,
            source=source,
        )
    if dict_class == "AutoEncoder":
        _need(tensors, ("encoder.weight", "encoder.bias", "decoder.weight", "bias"), where)
        return Weights(
            "relu",
            W_enc=tensors["encoder.weight"],
            b_enc=tensors["encoder.bias"],
            W_dec=tensors["decoder.weight"].T,
            b_dec=tensors["bias"],
            source=source,
        )
    raise VisaeError(f"{folder / 'config.json'}: dict_class {dict_class!r} is not supported")


def read_sparsify(path: Path) -> Weights:
    cfg = _json(path / "cfg.json")
    tensors = _safetensors(path / "sae.safetensors")
    where = str(path)
    for flag in ("skip_connection", "transcode", "signed"):
        if cfg.get(flag):
            raise VisaeError(f"{where}: sparsify {flag}=true is not an SAE visae can represent")
    if cfg.get("activation", "topk") != "topk":
        raise VisaeError(f"{where}: sparsify activation {cfg.get('activation')!r} is not supported")
    _need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where)
    k = cfg.get("k")
    if not isinstance(k, int):
        raise VisaeError(f"{where}/cfg.json: k must be an integer")
    return Weights(
        "topk",
        W_enc=tensors["encoder.weight"],
        b_enc=tensors["encoder.bias"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        k=k,
        source={"format": "sparsify", "cfg": cfg},
    )


OVERCOMPLETE_KEYS = {
    "encoder.final_block.0.weight",
    "encoder.final_block.0.bias",
    "dictionary._weights",
    "dictionary.multiplier",
}


def read_overcomplete(path: Path, arch: str | None = None, k: int | None = None) -> Weights:
    """An overcomplete state dict; its file does not say the SAE's class, so `arch` (relu or
    topk, with `k`) does, except for a JumpSAE's (its thresholds are in the file)."""
    tensors = load_tensors(path, str(path))
    keys = set(tensors)
    jump = keys == OVERCOMPLETE_KEYS | {"thresholds"}
    if keys != OVERCOMPLETE_KEYS and not jump:
        raise VisaeError(
            f"{path}: not the state dict of an overcomplete SAE with a linear encoder "
            f"(keys {sorted(keys)})"
        )
    weights = tensors["dictionary._weights"]
    atoms = weights / (weights.norm(dim=1, keepdim=True) + 1e-8)
    atoms = atoms * tensors["dictionary.multiplier"].exp()
    common = {
        "W_enc": tensors["encoder.final_block.0.weight"],
        "b_enc": tensors["encoder.final_block.0.bias"],
        "W_dec": atoms,
        "b_dec": torch.zeros(atoms.shape[1]),
        "source": {"format": "overcomplete", "arch": "jump" if jump else arch},
    }
    if jump:
        return Weights("jumprelu", **common, threshold=tensors["thresholds"].exp())
    if arch == "relu":
        return Weights("relu", **common)
    if arch == "topk" and isinstance(k, int):
        return Weights("topk", **common, k=k)
    raise VisaeError(
        f"{path}: an overcomplete state dict does not say its SAE's class; give --arch relu or "
        "--arch topk --k K (BatchTopK's running threshold is not in the state dict)"
    )


READERS = {
    "saev": read_saev,
    "saelens": read_saelens,
    "dictionary_learning": read_dictionary_learning,
    "sparsify": read_sparsify,
}


def detect_format(path: Path) -> str:
    """Which peer wrote `path` (a checkpoint folder or file), from the files it holds."""
    if path.is_dir():
        if (path / "sae_weights.safetensors").is_file():
            return "saelens"
        if (path / "sae.safetensors").is_file():
            return "sparsify"
        if (path / "ae.pt").is_file():
            return "dictionary_learning"
        if (path / "sae.pt").is_file():
            return "saev"
        raise VisaeError(f"{path}: no checkpoint of a known format ({', '.join(FORMATS)})")
    if not path.is_file():
        raise VisaeError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"{":
        return "saev"
    if path.name.startswith("ae") and (path.parent / "config.json").is_file():
        return "dictionary_learning"
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.json").is_file():
        return "dictionary_learning"
    return "overcomplete"


def read_weights(
    path: str | Path, format: str | None = None, arch: str | None = None, k: int | None = None
) -> Weights:
    """A peer checkpoint in visae's layout (format detected when not given)."""
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise VisaeError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    weights = read_overcomplete(path, arch, k) if fmt == "overcomplete" else READERS[fmt](path)
    weights.source["path"] = str(path.resolve())
    return weights


# ------------------------------------------------------------------------ to and from visae


def to_sae(weights: Weights) -> Any:
    """The visae SAE computing exactly what the peer's does (up to float rounding)."""
    from visae.sae.config import SAEConfig
    from visae.sae.registry import ARCHS  # the classes register themselves when visae.sae loads

    assert_finite(weights)
    n, d = weights.W_enc.shape
    kw: dict[str, Any] = {"arch": weights.arch, "d": d, "n_latents": n, "normalize_decoder": False}
    if weights.arch in ("topk", "batchtopk"):
        if weights.k is None or not 1 <= weights.k <= n:
            raise VisaeError(f"k={weights.k} must be between 1 and the {n} latents")
        kw |= {"k": weights.k, "matryoshka": weights.matryoshka, "auxk": False}
        kw |= {"signed_topk": True} if weights.signed_topk else {}
    if weights.arch == "jumprelu":
        kw["jumprelu_target_l0"] = min(SAEConfig.jumprelu_target_l0, n - 1)
    cfg = SAEConfig(**kw)
    sae = ARCHS.get(cfg.arch)(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(weights, name))
        if weights.arch == "jumprelu":
            assert weights.threshold is not None
            sae.log_threshold.copy_(weights.threshold.float().clamp_min(MIN_THRESHOLD).log())
        if weights.arch == "batchtopk":
            assert weights.threshold is not None
            sae.threshold.fill_(float(weights.threshold))
            sae.threshold_updates.fill_(1)
    scale = weights.source.get("input_scale")
    sae.set_normalization(torch.zeros(d), 1.0 / scale if scale else 1.0)
    return sae


def import_sae(
    path: str | Path,
    out: str | Path | None = None,
    format: str | None = None,
    arch: str | None = None,
    k: int | None = None,
) -> Any:
    """Read a peer checkpoint as a visae SAE; with `out`, also save it there (safetensors +
    config.json, the source format and file recorded as its provenance)."""
    weights = read_weights(path, format, arch, k)
    sae = to_sae(weights)
    if out is not None:
        sae.save(out, provenance=_jsonable(weights.source))
    return sae


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def export_saelens(sae: Any, out: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """`out/cfg.json` + `out/sae_weights.safetensors` in SAELens 6's inference format, visae's
    input normalisation folded into the weights: W_enc / scale, W_dec * scale,
    b_dec * scale + mean, so that SAELens's `(x - b_dec) @ W_enc + b_enc` is visae's
    pre-activation exactly. BatchTopK goes out as SAELens saves its own: JumpReLU with a
    constant threshold."""
    from safetensors.torch import save as safetensors_bytes

    from visae.atomic import atomic_directory, write_bytes, write_text

    cfg = sae.cfg
    if cfg.arch == "topk" and cfg.signed_topk:
        raise VisaeError("a signed TopK SAE (saev's rule) has no SAELens architecture")
    mean = sae.norm_mean.detach().float()
    scale = float(sae.norm_scale)
    b_dec = sae.b_dec.detach().float()
    tensors = {
        "W_enc": (sae.W_enc.detach().float().T / scale).contiguous(),
        "b_enc": sae.b_enc.detach().float().clone(),
        "W_dec": (sae.W_dec.detach().float() * scale).contiguous(),
        "b_dec": b_dec * scale + mean,
    }
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
    meta = {"sae_lens_version": "6.0.0", "exported_by": "visae"} | dict(metadata or {})
    body: dict[str, Any] = {
        "architecture": arch[cfg.arch],
        "d_in": cfg.d,
        "d_sae": cfg.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    if cfg.arch == "topk":
        body |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    if cfg.arch == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().float().clone()
    if cfg.arch == "batchtopk":
        tensors["threshold"] = torch.full((cfg.n_latents,), float(sae.threshold))
        meta["training_architecture"] = "batchtopk"
    with atomic_directory(Path(out)) as tmp:
        write_bytes(tmp / "sae_weights.safetensors", safetensors_bytes(tensors))
        write_text(tmp / "cfg.json", json.dumps(body, indent=2) + "\n")
    return Path(out)


def assert_finite(weights: Weights) -> None:
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if not bool(torch.isfinite(getattr(weights, name)).all()):
            raise VisaeError(f"{weights.source.get('path')}: {name} holds non-finite values")
    if weights.threshold is not None and not math.isfinite(float(weights.threshold.max())):
        raise VisaeError(f"{weights.source.get('path')}: the threshold is not finite")
