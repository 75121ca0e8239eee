"""What every image source offers the rest of visae: indexed images with metadata
and a fingerprint that identifies the exact set of images."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class ImageDataset(Protocol):
    """Indexed RGB images with per-image metadata.

    `fingerprint` changes whenever the images or their order change; stores record it
    so that appending images from a different dataset is refused.
    `metadata(i)` is JSON-able: at least `{"source": str}`, plus `labels` (list[str])
    where the dataset has them.

    The datasets of `visae.data` also have a `spec`: the `load_dataset` spec that reopens them
    from any working directory (absolute paths), or None where no spec can express them.
    Stores record it so that consumers find the images again; a dataset without the
    attribute is treated as having none.
    """

    name: str

    def __len__(self) -> int: ...

    def image(self, i: int) -> Image.Image: ...

    def metadata(self, i: int) -> dict[str, Any]: ...

    @property
    def fingerprint(self) -> str: ...
