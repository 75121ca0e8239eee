"""Image sources for visae: concept scenes with exact labels (the default), and readers for
standard formats (ImageFolder, Fashion-MNIST, CUB-200-2011 attributes, COCO instances,
Hugging Face datasets)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from visae.data.base import ImageDataset
from visae.data.coco import CocoDataset
from visae.data.cub import Cub200Dataset
from visae.data.default import DEFAULT_SCENES, cache_dir, cached_scenes, default_scenes
from visae.data.hf import HFDataset
from visae.data.scene_dataset import SceneDataset
from visae.data.scenes import (
    PAIR_KINDS,
    SceneConfig,
    SceneGenerator,
    ScenePair,
    generate_scenes,
)
from visae.data.standard import FashionMNIST, ImageFolder, SkimagePhotos, Subset
from visae.data.taxonomy import Taxonomy
from visae.errors import VisaeError
from visae.geometry import preprocessing_box

DATASET_SPECS_HELP = """dataset specs:
  scenes                  the default concept scenes (rendered once, cached)
  scenes:shapes           the same scenes with procedural shapes instead of photo objects
  scenes:DIR              a scene folder written by `visae scenes`
  fashion-mnist[:train|test]   Fashion-MNIST (Debian dataset-fashion-mnist; default test)
  skimage                 the photos bundled with scikit-image
  cub:DIR                 CUB-200-2011 folder (images.txt, attributes/...)
  coco:FILE.json[:IMGDIR] COCO instances file (images default to the file's folder)
  imagefolder:DIR or DIR  folder of class folders (a scene folder is recognised)
  hf:DIR|REPO_ID[:SPLIT]  Hugging Face dataset: save_to_disk folder, folder of parquet files,
                          or hub id (downloaded; needs pyarrow: pip install 'visae[hf]')
  any spec + '#N'         only the first N images"""

__all__ = [
    "DATASET_SPECS_HELP",
    "DEFAULT_SCENES",
    "PAIR_KINDS",
    "CocoDataset",
    "Cub200Dataset",
    "FashionMNIST",
    "HFDataset",
    "ImageDataset",
    "ImageFolder",
    "SceneConfig",
    "SceneDataset",
    "SceneGenerator",
    "ScenePair",
    "SkimagePhotos",
    "Subset",
    "Taxonomy",
    "cache_dir",
    "cached_scenes",
    "default_scenes",
    "generate_scenes",
    "load_dataset",
    "preprocessing_box",
]


def load_dataset(spec: str, progress: bool = True) -> ImageDataset:
    """Open a dataset from a spec string (see `DATASET_SPECS_HELP`).

    The dataset's `spec` attribute is the canonical form of `spec`, which reopens the same
    images from any working directory: absolute paths, the split chosen, `#N` kept; the
    default scenes stay `scenes`.
    """
    base, sep, limit = spec.rpartition("#")
    if not sep:
        return _load(spec.strip(), progress)
    dataset = load_dataset(base, progress)
    try:
        n = int(limit)
    except ValueError:
        raise VisaeError(f"dataset spec {spec!r}: the part after '#' must be a count") from None
    if n < 1:
        raise VisaeError(f"dataset spec {spec!r}: count must be >= 1")
    return Subset(dataset, range(min(n, len(dataset))))


def _load(spec: str, progress: bool) -> ImageDataset:
    kind, _, arg = spec.partition(":")
    if spec in ("scenes", "scenes:shapes"):
        if spec == "scenes":
            scenes = default_scenes(progress=progress)
        else:
            scenes = cached_scenes(replace(DEFAULT_SCENES, objects="shapes"), progress=progress)
        scenes.spec = spec  # rendered again from the spec where the cache is gone
        return scenes
    if kind == "scenes":
        return SceneDataset.load(arg)
    if kind == "fashion-mnist":
        return FashionMNIST(arg or "test")
    if spec == "skimage":
        return SkimagePhotos()
    if kind == "cub":
        return Cub200Dataset(arg)
    if kind == "coco":
        json_end = arg.find(".json")
        if json_end < 0:
            raise VisaeError(f"dataset spec {spec!r}: expected coco:FILE.json[:IMAGE_DIR]")
        ann, rest = arg[: json_end + 5], arg[json_end + 5 :]
        return CocoDataset(ann, rest[1:] if rest.startswith(":") else None)
    if kind == "imagefolder":
        return ImageFolder(arg)
    if kind == "hf":
        location, _, split = arg.partition(":")
        if not location:
            raise VisaeError(f"dataset spec {spec!r}: expected hf:DIR_OR_REPO_ID[:SPLIT]")
        return HFDataset(location, split or None)
    path = Path(spec)
    if path.is_dir():
        if (path / "scenes.json").is_file():
            return SceneDataset.load(path)
        return ImageFolder(path)
    if "/" in spec or spec.startswith("."):
        raise VisaeError(f"dataset folder {spec} does not exist")
    raise VisaeError(
        f"unknown dataset spec {spec!r} (see `visae extract --help` for the accepted specs)"
    )
