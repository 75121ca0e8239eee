"""What an edit of SAE latents says: which latents, what to do to them, by how much, and where
(which tokens of the stream), parsed from the CLI's `LATENTS=VALUE` form.

Operations on a latent's code c (after the SAE's own encoding, e.g. its top-k):
- `set`: c' = v (the latent is made active even where the SAE left it at 0);
- `scale`: c' = v * c (0 stays 0: only where the latent fires);
- `add`: c' = c + v;
- `ablate`: c' = 0.
A value is absolute, or relative: in units of the latent's maximum observed activation (from
an analysis artifact: `max_patch` for patch tokens, `max_cls` for the CLS token), e.g. saev's
-2x max. A region chooses the tokens: every token the SAE reads (its patch tokens for a patch
SAE), the CLS token only, a list of patches, or a pixel mask mapped onto the patch grid (a
patch is in when the mask covers at least half of it, the rule concept labels use).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visae.errors import VisaeError

OPS = ("set", "scale", "add", "ablate")
REGION_KINDS = ("all", "cls", "patches")
MASK_COVER = 0.5

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_VALUE = re.compile(rf"^(?P<op>[x+]?)(?P<num>{_NUMBER})(?P<max>max)?$")


@dataclass(frozen=True)
class Region:
    """Which tokens an edit touches: `all`, `cls`, or `patches` (row-major patch indices)."""

    kind: str = "all"
    patches: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in REGION_KINDS:
            raise VisaeError(
                f"region kind must be one of {', '.join(REGION_KINDS)}, not {self.kind!r}"
            )
        if self.kind == "patches" and not self.patches:
            raise VisaeError("a patches region needs at least one patch")

    def token_positions(
        self, n_cls: int, n_special: int, n_patches: int, trained_on: str | None = None
    ) -> np.ndarray:
        """Positions in the model's token sequence [CLS, registers, patches]. `all` is every
        token of the kinds the SAE was trained on (`trained_on`: patch, cls, all; None: all):
        an SAE never saw the other kinds, and its codes there mean nothing."""
        if self.kind == "cls" or (self.kind == "all" and trained_on == "cls"):
            if not n_cls:
                raise VisaeError("region cls: this layer has no CLS token")
            return np.zeros(1, np.int64)
        if self.kind == "all":
            if trained_on == "patch":
                return n_special + np.arange(n_patches, dtype=np.int64)
            return np.arange(n_special + n_patches, dtype=np.int64)
        bad = [p for p in self.patches if not 0 <= p < n_patches]
        if bad:
            raise VisaeError(f"region patch {bad[0]} out of range 0..{n_patches - 1}")
        return n_special + np.asarray(sorted(set(self.patches)), dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "patches": list(self.patches)}


def region_from_mask(
    mask: np.ndarray, grid: tuple[int, int], box: Sequence[float] | None = None
) -> Region:
    """The patches a pixel mask `[H, W]` (bool, or nonzero = in) covers at least half of; the
    grid tiles `box` (x0, y0, x1, y1) of the image, the whole image by default."""
    from visae.data.masks import patch_fractions

    m = np.asarray(mask)
    if m.ndim != 2 or 0 in m.shape:
        raise VisaeError(f"a region mask must be a 2-D image, got shape {m.shape}")
    layers = (m != 0).astype(np.uint8)
    frac = patch_fractions(layers, 2, grid, box)[:, 1]
    patches = tuple(int(p) for p in np.flatnonzero(frac >= MASK_COVER - 1e-6))
    if not patches:
        raise VisaeError("the region mask covers no patch at least half (empty region)")
    return Region("patches", patches)


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A PNG (or any image) as a bool mask: pixels brighter than half are in. `size` (W, H):
    the image it must match."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
    except (OSError, ValueError) as e:
        raise VisaeError(f"cannot read region mask {path}: {e}") from None
    if size is not None and (grey.shape[1], grey.shape[0]) != tuple(size):
        raise VisaeError(
            f"region mask {path} is {grey.shape[1]}x{grey.shape[0]}, the image {size[0]}x{size[1]}"
        )
    return grey > 127


@dataclass(frozen=True)
class Edit:
    """One operation on some latents in one region (module docstring)."""

    latents: tuple[int, ...]
    op: str
    value: float = 0.0
    relative: bool = False
    region: Region = Region()

    def __post_init__(self) -> None:
        if not self.latents:
            raise VisaeError("an edit needs at least one latent")
        if self.op not in OPS:
            raise VisaeError(f"edit op must be one of {', '.join(OPS)}, not {self.op!r}")
        if not np.isfinite(self.value):
            raise VisaeError(f"edit value must be finite, not {self.value}")
        if any(j < 0 for j in self.latents):
            raise VisaeError(f"latent {min(self.latents)} is negative")
        if len(set(self.latents)) != len(self.latents):
            raise VisaeError(f"edit names a latent twice: {list(self.latents)}")

    def check(self, n_latents: int) -> None:
        bad = [j for j in self.latents if j >= n_latents]
        if bad:
            raise VisaeError(f"edit names latent {bad[0]}, out of range 0..{n_latents - 1}")

    def label(self) -> str:
        lat = ",".join(str(j) for j in self.latents)
        unit = " x max" if self.relative else ""
        where = "" if self.region.kind == "all" else f" on {self.region.kind}"
        if self.op == "ablate":
            return f"{lat} ablated{where}"
        return f"{lat} {self.op} {self.value:g}{unit}{where}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "latents": list(self.latents),
            "op": self.op,
            "value": self.value,
            "relative": self.relative,
            "region": self.region.to_dict(),
        }


def parse_edit(text: str, region: Region | None = None) -> Edit:
    """`LATENTS=VALUE`: LATENTS `123` or `123,456`; VALUE `0` or `ablate` (ablate), `F` (set
    to F), `xF` (scale by F), `+F` / `+-F` (add F); a `max` suffix makes F relative to the
    latent's maximum observed activation (`123=-2max`, `123=x0.5`, `45=+1max`)."""
    lat_text, sep, value = text.partition("=")
    if not sep:
        raise VisaeError(f"edit {text!r}: expected LATENTS=VALUE, e.g. 123=0 or 123=x2")
    try:
        latents = tuple(int(x) for x in lat_text.split(","))
    except ValueError:
        raise VisaeError(f"edit {text!r}: latents must be integers separated by commas") from None
    region = region or Region()
    value = value.strip()
    if value == "ablate":
        return Edit(latents, "ablate", region=region)
    m = _VALUE.match(value)
    if not m:
        raise VisaeError(
            f"edit {text!r}: value must be ablate, F, xF or +F, optionally followed by max"
        )
    num = float(m["num"])
    op = {"x": "scale", "+": "add", "": "set"}[m["op"]]
    relative = m["max"] is not None
    if op == "set" and num == 0 and not relative:
        return Edit(latents, "ablate", region=region)
    if op == "scale" and relative:
        raise VisaeError(f"edit {text!r}: a scale factor has no unit (drop 'max')")
    return Edit(latents, op, num, relative, region)


def parse_region(text: str) -> Region:
    """CLI regions: `all`, `cls`, `patches:1,2,3` (a mask file is read with `load_mask`)."""
    if text in ("all", "cls"):
        return Region(text)
    kind, _, rest = text.partition(":")
    if kind == "patches" and rest:
        try:
            return Region("patches", tuple(int(x) for x in rest.split(",")))
        except ValueError:
            pass
    raise VisaeError(f"region {text!r}: expected all, cls, patches:I,J,... or a mask image file")
