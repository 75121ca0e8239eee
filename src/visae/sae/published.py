"""Published vision SAEs by name: `SAE.load("saev/clip-b16-l10")` downloads the peer's file
from the hub once, converts it (`visae.sae.convert`) into visae's cache and loads it from there;
`visae sae list` shows them, and offline says which need a download.

Layers are visae's: layer i is the output of block i counted from 0 (saev's "layer 10 of 12",
the second to last, is visae's 10).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from visae.errors import VisaeError, first_line


@dataclass(frozen=True)
class Published:
    name: str
    repo: str
    file: str
    format: str
    backbone: str  # what to give `visae extract --model`
    layer: int
    tokens: str
    n_latents: int
    arch: str
    note: str = ""


SAEV_NOTE = (
    "saev trained it on (x - dataset mean) / scalar; those statistics are not in the file, so "
    "the imported SAE reads raw activations (see docs/interop.md)"
)

PUBLISHED = {
    p.name: p
    for p in (
        Published(
            "saev/clip-b16-l10",
            "osunlp/SAE_CLIP_24K_ViT-B-16_IN1K",
            "sae.pt",
            "saev",
            "openai/clip-vit-base-patch16",
            10,
            "patch",
            24576,
            "relu",
            SAEV_NOTE + "; trained on ImageNet-1k",
        ),
        Published(
            "saev/dinov2-b14-l10",
            "osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K",
            "sae.pt",
            "saev",
            "facebook/dinov2-base",
            10,
            "patch",
            24576,
            "relu",
            SAEV_NOTE + "; trained on ImageNet-1k (saev's notebook loads DINOv2 with registers)",
        ),
        Published(
            "saev/bioclip-b16-l10",
            "osunlp/SAE_BioCLIP_24K_ViT-B-16_iNat21",
            "sae.pt",
            "saev",
            "hf-hub:imageomics/bioclip (an OpenCLIP model)",
            10,
            "patch",
            24576,
            "relu",
            SAEV_NOTE + "; trained on iNat21",
        ),
    )
}


def cache_root() -> Path:
    from visae.data.default import cache_dir

    return Path(cache_dir()) / "published-saes"


def converted_path(name: str) -> Path:
    return cache_root() / name.replace("/", "--")


def rows() -> list[dict[str, Any]]:
    """Every published SAE with whether it is already converted here."""
    return [asdict(p) | {"cached": converted_path(p.name).is_dir()} for p in PUBLISHED.values()]


def fetch(name: str) -> Path:
    """The converted checkpoint folder of a published SAE, downloading it the first time."""
    entry = PUBLISHED.get(name)
    if entry is None:
        raise VisaeError(f"no published SAE named {name!r} (see visae sae list)")
    out = converted_path(name)
    if out.is_dir():
        return out
    from huggingface_hub import hf_hub_download

    from visae.sae.convert import import_sae

    try:
        local = hf_hub_download(entry.repo, entry.file)
    except Exception as e:  # hub clients raise many types; offline is the common one
        raise VisaeError(
            f"{name} needs a download of {entry.file} from the hub repo {entry.repo}, which "
            f"failed: {first_line(e)}"
        ) from None
    import_sae(local, out, format=entry.format)
    return out
