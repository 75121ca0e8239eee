"""Standard image sources: a folder of class folders (ImageFolder), Fashion-MNIST idx files,
the photos scikit-image ships, and subsets of any dataset."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visae.data.base import ImageDataset
from visae.errors import VisaeError

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)


def _hash_files(root: Path, rel_paths: Sequence[str], tag: str) -> str:
    """sha256 over every file's relative path and contents, in order."""
    h = hashlib.sha256(tag.encode())
    for rel in rel_paths:
        h.update(rel.encode() + b"\0")
        h.update(hashlib.sha256((root / rel).read_bytes()).digest())
    return h.hexdigest()


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise VisaeError(f"image file missing: {path}") from None
    except OSError as exc:
        raise VisaeError(f"cannot read image {path}: {exc}") from None


class ImageFolder:
    """`root/<class>/<image>` (torchvision's layout): label = the class folder name.

    Images directly in `root` (no class folder) are allowed and get no label. Files are listed
    once, sorted; the fingerprint hashes their contents (computed on first use, so the root is
    kept absolute: a change of working directory does not lose the images).
    """

    def __init__(self, root: str | Path, name: str | None = None):
        if not Path(root).is_dir():
            raise VisaeError(f"image folder not found: {root}")
        self.root = Path(root).absolute()
        self.files = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not self.files:
            raise VisaeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.name = name or f"imagefolder:{Path(root).name}"
        self.spec: str | None = f"imagefolder:{self.root.resolve()}"
        self.classes = sorted({f.split("/")[0] for f in self.files if "/" in f})
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> Image.Image:
        return _open_rgb(self.root / self.files[i])

    def metadata(self, i: int) -> dict[str, Any]:
        rel = self.files[i]
        return {"source": rel, "labels": [rel.split("/")[0]] if "/" in rel else []}

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _hash_files(self.root, self.files, "imagefolder")
        return self._fingerprint


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_idx(path: Path) -> np.ndarray:
    """Array stored in an idx file (optionally gzipped): unsigned-byte data only."""
    if not path.is_file():
        raise VisaeError(f"idx file not found: {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise VisaeError(f"{path} is not an idx file (bad magic)")
    if raw[2] != 0x08:
        raise VisaeError(f"{path}: only unsigned-byte idx data is supported (type {raw[2]:#x})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - offset != expected:
        raise VisaeError(
            f"{path}: header says {dims} ({expected} bytes), file has {len(raw) - offset}"
        )
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


class FashionMNIST:
    """Fashion-MNIST from its idx files (Debian `dataset-fashion-mnist`): 28x28 grey -> RGB."""

    def __init__(self, split: str = "test", root: str | Path = FASHION_MNIST_DIR):
        if split not in ("train", "test"):
            raise VisaeError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        prefix = "train" if split == "train" else "t10k"
        images_path = root / f"{prefix}-images-idx3-ubyte.gz"
        if not images_path.exists():
            raise VisaeError(
                f"Fashion-MNIST not found at {root}: install the Debian package "
                "dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)"
            )
        self.images = read_idx(images_path)
        self.labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        if self.images.ndim != 3 or self.labels.shape != (self.images.shape[0],):
            raise VisaeError(
                f"Fashion-MNIST {split}: images {self.images.shape} vs labels {self.labels.shape}"
            )
        if self.labels.max() >= len(FASHION_MNIST_CLASSES):
            raise VisaeError(f"Fashion-MNIST {split}: label {self.labels.max()} out of range")
        self.split = split
        self.name = f"fashion-mnist:{split}"
        self.spec = self.name if root.resolve() == FASHION_MNIST_DIR.resolve() else None
        h = hashlib.sha256(self.name.encode())
        h.update(self.images.tobytes())
        h.update(self.labels.tobytes())
        self._fingerprint = h.hexdigest()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i], "L").convert("RGB")

    def metadata(self, i: int) -> dict[str, Any]:
        label = int(self.labels[i])
        return {
            "source": f"{self.name}/{i}",
            "labels": [FASHION_MNIST_CLASSES[label]],
            "class_id": label,
        }

    @property
    def fingerprint(self) -> str:
        return self._fingerprint


# Real photographs among scikit-image's bundled data files (drawings, test patterns, scans of
# text-only pages and silhouettes left out); only those present on disk are used.
SKIMAGE_PHOTOS: dict[str, str] = {
    "astronaut.png": "astronaut",
    "brick.png": "brick wall",
    "camera.png": "cameraman",
    "cell.png": "cell (microscopy)",
    "chelsea.png": "cat",
    "coffee.png": "coffee cup",
    "coins.png": "coins",
    "grass.png": "grass",
    "gravel.png": "gravel",
    "hubble_deep_field.jpg": "galaxies",
    "ihc.png": "tissue (microscopy)",
    "moon.png": "moon surface",
    "motorcycle_left.png": "motorcycle",
    "motorcycle_right.png": "motorcycle",
    "retina.jpg": "retina",
    "rocket.jpg": "rocket",
}


class SkimagePhotos:
    """The photographs scikit-image ships in its package (no download)."""

    name = "skimage-photos"
    spec = "skimage"

    def __init__(self) -> None:
        from visae.data.backgrounds import skimage_data_dir

        self.root = skimage_data_dir()
        self.files = [f for f in SKIMAGE_PHOTOS if (self.root / f).is_file()]
        if not self.files:
            raise VisaeError(f"no scikit-image photos found in {self.root}")
        self._fingerprint = _hash_files(self.root, self.files, "skimage-photos")

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> Image.Image:
        return _open_rgb(self.root / self.files[i])

    def metadata(self, i: int) -> dict[str, Any]:
        f = self.files[i]
        return {"source": f"skimage/{f}", "labels": [SKIMAGE_PHOTOS[f]]}

    @property
    def fingerprint(self) -> str:
        return self._fingerprint


class Subset:
    """Chosen images of another dataset, in the given order. A subset of the first N images
    of a dataset with a spec has the spec `<spec>#N`."""

    def __init__(self, dataset: ImageDataset, indices: Sequence[int]):
        n = len(dataset)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise VisaeError(f"subset of {dataset.name}: indices {bad[:5]} out of range 0..{n - 1}")
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.name = f"{dataset.name}[{len(self.indices)}]"
        parent = getattr(dataset, "spec", None)
        first_n = self.indices == list(range(len(self.indices)))
        self.spec = f"{parent}#{len(self.indices)}" if parent and first_n else None
        h = hashlib.sha256(dataset.fingerprint.encode())
        h.update(np.asarray(self.indices, np.int64).tobytes())
        self._fingerprint = h.hexdigest()

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int) -> Image.Image:
        return self.dataset.image(self.indices[i])

    def metadata(self, i: int) -> dict[str, Any]:
        return self.dataset.metadata(self.indices[i]) | {"parent_index": self.indices[i]}

    @property
    def fingerprint(self) -> str:
        return self._fingerprint
