"""Streaming per-latent statistics and top-N image lists.

Everything here sees one batch of SAE codes at a time and keeps state whose size depends on
the number of latents, N and the patch grid only, never on the number of images: the analysis
of a store of any size runs in bounded memory.

SAE codes are sparse: a batch arrives as each token's (value, latent) list, as
`SAE.encode_sparse` returns it (`PatchCodes`; not `visae.sae.sparse.SparseCodes`, which groups
a training batch's entries for the SAE's kernels), and every statistic, ranking score, patch
map and per-patch list is computed from those entries; no dense `[tokens, latents]` matrix is
made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class HistogramSpec:
    """Log-spaced bins for positive activations, fixed up front so one pass suffices.

    Activations below `lo` fall in the first bin and those above `hi` in the last one; the
    defaults span eight decades, wide enough for any SAE's code scale.
    """

    lo: float = 1e-4
    hi: float = 1e4
    bins_per_decade: int = 16

    @property
    def n_bins(self) -> int:
        return round(math.log10(self.hi / self.lo) * self.bins_per_decade)

    def edges(self) -> np.ndarray:
        return np.logspace(math.log10(self.lo), math.log10(self.hi), self.n_bins + 1)

    def bin_of(self, values: torch.Tensor) -> torch.Tensor:
        """Bin index of each (positive) value."""
        pos = (torch.log10(values.float()) - math.log10(self.lo)) * self.bins_per_decade
        return pos.floor_().clamp_(0, self.n_bins - 1).long()

    def to_dict(self) -> dict[str, float | int]:
        return {"lo": self.lo, "hi": self.hi, "bins_per_decade": self.bins_per_decade}


class PatchCodes:
    """The positive codes of a batch of images, in two views: per token, the `[tokens, m]`
    (values, latents) rows that `SAE.encode_sparse` returns (value 0 = padding), and the
    same entries flattened to parallel 1-D tensors (`image` = position in the batch, `patch`,
    `latent`, `value`). Tokens are the batch's patches, image-major."""

    def __init__(
        self, values: torch.Tensor, latents: torch.Tensor, n_images: int, n_latents: int
    ) -> None:
        n_rows, m = values.shape
        if n_images < 1 or n_rows % n_images:
            raise ValueError(f"{n_rows} token rows do not split into {n_images} images")
        self.n_images = n_images
        self.n_patches = n_rows // n_images
        self.n_latents = n_latents
        self.row_values = values.float()
        self.row_latents = latents.long()
        flat_values = self.row_values.reshape(-1)
        flat_latents = self.row_latents.reshape(-1)
        entry = torch.arange(n_rows * m, device=values.device)
        if not bool((flat_values > 0).all()):  # padding (ReLU, JumpReLU): drop it
            entry = (flat_values > 0).nonzero().squeeze(1)
            flat_values, flat_latents = flat_values[entry], flat_latents[entry]
        rows = entry // m
        self.image = rows // self.n_patches
        self.patch = rows - self.image * self.n_patches
        self.latent = flat_latents
        self.value = flat_values
        # (image, latent) of every entry as one index into an [images, latents] table
        self.key = self.image * n_latents + self.latent

    @classmethod
    def from_dense(cls, codes_BPL: torch.Tensor) -> PatchCodes:
        """From dense `[images, patches, latents]` codes (as `SAE.encode` returns them)."""
        b, p, n_lat = codes_BPL.shape
        flat = codes_BPL.reshape(b * p, n_lat)
        m = max(1, int((flat > 0).sum(1).max())) if flat.numel() else 1
        values, latents = flat.topk(min(m, n_lat), dim=1)
        return cls(values.clamp(min=0), latents, b, n_lat)

    def per_image(self, reduce: str) -> torch.Tensor:
        """`[images, latents]` max (`"amax"`) or sum (`"sum"`) of each latent over patches."""
        out = torch.zeros(self.n_images * self.n_latents, device=self.value.device)
        if reduce == "amax":
            out.scatter_reduce_(0, self.key, self.value, "amax")
        else:
            out.index_add_(0, self.key, self.value)
        return out.view(self.n_images, self.n_latents)

    def write_maps(
        self,
        out: torch.Tensor,
        images: torch.Tensor,
        latents: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """Write the activation maps of the (batch image, latent) pairs into
        `out[latent, slot, :]` of a `[latents, slots, patches]` tensor, replacing its content."""
        m = images.numel()
        if m == 0:
            return
        n_slots, p = out.shape[1], out.shape[2]
        target = latents * n_slots + slots
        rows = out.view(-1, p)
        rows.index_fill_(0, target, 0)
        lookup = torch.full(
            (self.n_images * self.n_latents,), -1, dtype=torch.long, device=self.value.device
        )
        lookup[images * self.n_latents + latents] = torch.arange(m, device=lookup.device)
        pair = lookup[self.key]
        hit = (pair >= 0).nonzero().squeeze(1)
        flat = target[pair[hit]] * p + self.patch[hit]
        rows.view(-1).index_put_((flat,), self.value[hit].to(out.dtype))

    def strongest(self, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each patch's `k` strongest latents for the given batch images: `(latents [m, P, k]`
        with -1 in unused slots, `values [m, P, k])`, strongest first, ties by lower latent."""
        p = self.n_patches
        rows = (images[:, None] * p + torch.arange(p, device=images.device)).reshape(-1)
        return top_rows(self.row_values[rows], self.row_latents[rows], k, p)


def top_rows(
    values: torch.Tensor, latents: torch.Tensor, k: int, group: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest positive entries of each `[rows, m]` row, ordered by value descending
    then latent ascending, padded with latent -1 / value 0; reshaped to `[rows / group, group,
    k]` (or `[rows, k]` for group 1)."""
    n_rows, m = values.shape
    order = torch.sort(latents, dim=1, stable=True).indices
    vals, lats = values.gather(1, order), latents.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    vals, lats = vals.gather(1, order), lats.gather(1, order)
    lats = torch.where(vals > 0, lats, -1)
    vals = vals.clamp(min=0)
    if m < k:
        pad = (0, k - m)
        lats = torch.nn.functional.pad(lats, pad, value=-1)
        vals = torch.nn.functional.pad(vals, pad, value=0.0)
    shape = (n_rows, k) if group == 1 else (n_rows // group, group, k)
    return lats.reshape(shape), vals.reshape(shape)


class TopN:
    """The N best (value, image) pairs of every latent, each with the latent's patch map.

    Kept sorted by value descending, ties broken by the lower image id, which makes the result
    independent of how the images are batched. Requires images to arrive in increasing id order
    (as `ActivationStore.ordered` yields them). Only images where the latent fires (value > 0)
    enter a list; unfilled entries hold value -inf and image -1.

    Maps live in per-latent slots that never move: a merge permutes only the small
    (value, image, slot) arrays and writes the maps of newly entered images into freed slots.
    """

    def __init__(self, n_latents: int, n: int, n_patches: int, device: str = "cpu") -> None:
        self.n = n
        self.values = torch.full((n_latents, n), -math.inf, device=device)
        self.images = torch.full((n_latents, n), -1, dtype=torch.long, device=device)
        self.slots = torch.arange(n, device=device).repeat(n_latents, 1)
        self._maps = torch.zeros((n_latents, n, n_patches), dtype=torch.float16, device=device)
        self._last_image = -1

    def update(
        self, image_ids: torch.Tensor, scores_BL: torch.Tensor, codes: PatchCodes
    ) -> torch.Tensor:
        """Merge one batch: `scores_BL` ranks the batch's images; `codes` gives their maps.

        Returns the ids of this batch's images that entered at least one list.
        """
        if image_ids.numel() == 0:
            return image_ids
        if int(image_ids[0]) <= self._last_image or bool((image_ids.diff() <= 0).any()):
            raise ValueError("TopN.update needs image ids in strictly increasing order")
        self._last_image = int(image_ids[-1])
        n = self.n
        floor = self.values[:, n - 1].clamp(min=0.0)
        changed = (scores_BL > floor).any(0).nonzero(as_tuple=True)[0]
        if changed.numel() == 0:
            return image_ids[:0]
        n_changed = changed.numel()
        # every latent changes in the first batches: plain slices then avoid gather copies
        sel: slice | torch.Tensor = slice(None) if n_changed == self.values.shape[0] else changed
        batch_vals = scores_BL[:, sel].T
        batch_vals = torch.where(batch_vals > 0, batch_vals, -math.inf)
        cand_vals = torch.cat([self.values[sel], batch_vals], dim=1)
        # stable sort: among equal values the buffer (lower ids) and then the batch's own order win
        order = torch.sort(cand_vals, dim=1, descending=True, stable=True).indices[:, :n]
        new_vals = cand_vals.gather(1, order)
        is_new = order >= n
        batch_pos = (order - n).clamp(min=0)
        old_pos = order.clamp(max=n - 1)
        new_ids = torch.where(is_new, image_ids[batch_pos], self.images[sel].gather(1, old_pos))
        new_ids = torch.where(new_vals > -math.inf, new_ids, -1)

        old_slots = self.slots[sel]
        kept = torch.zeros((n_changed, n + 1), dtype=torch.bool, device=order.device)
        kept.scatter_(1, torch.where(is_new, n, order), True)
        # the slots of dropped entries, lowest first, are handed to new entries in rank order
        freed = torch.sort(torch.where(kept[:, :n], n, old_slots), dim=1).values
        new_rank = (torch.cumsum(is_new, 1) - 1).clamp(min=0)
        new_slots = torch.where(is_new, freed.gather(1, new_rank), old_slots.gather(1, old_pos))
        rows, cols = (is_new & (new_ids >= 0)).nonzero(as_tuple=True)
        lat = changed[rows]
        bpos = batch_pos[rows, cols]
        codes.write_maps(self._maps, bpos, lat, new_slots[rows, cols])

        self.values[sel] = new_vals
        self.images[sel] = new_ids
        self.slots[sel] = new_slots
        entered = torch.bincount(bpos, minlength=image_ids.numel()) > 0
        return image_ids[entered]

    @property
    def maps(self) -> torch.Tensor:
        """`[n_latents, N, patches]` maps in rank order (zeros for unfilled entries)."""
        return self._maps.gather(1, self.slots[..., None].expand(-1, -1, self._maps.shape[2]))


class LatentStats:
    """Firing counts, sums, maxima and activation histograms per latent, over patch tokens
    (and over CLS tokens where the store has them)."""

    def __init__(
        self, n_latents: int, hist: HistogramSpec, with_cls: bool, device: str = "cpu"
    ) -> None:
        self.n_latents = n_latents
        self.hist_spec = hist
        self.with_cls = with_cls
        self.n_images = 0
        self.n_patch_tokens = 0
        zeros_l = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.fire_patch = zeros_l.clone()
        self.fire_image = zeros_l.clone()
        self.fire_cls = zeros_l.clone()
        self.sum_patch = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.sum_cls = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.max_patch = torch.zeros(n_latents, device=device)
        self.max_cls = torch.zeros(n_latents, device=device)
        self.hist = torch.zeros((n_latents, hist.n_bins), dtype=torch.long, device=device)

    def update(
        self, codes: PatchCodes, img_max_BL: torch.Tensor, cls_BL: torch.Tensor | None
    ) -> None:
        """Add one batch, given its sparse codes and per-image max over patches."""
        n_lat, nb = self.n_latents, self.hist_spec.n_bins
        self.fire_patch += torch.bincount(codes.latent, minlength=n_lat)
        self.hist += torch.bincount(
            codes.latent * nb + self.hist_spec.bin_of(codes.value), minlength=n_lat * nb
        ).view(n_lat, nb)
        self.sum_patch.index_add_(0, codes.latent, codes.value.double())
        self.max_patch = torch.maximum(self.max_patch, img_max_BL.amax(0))
        self.fire_image += (img_max_BL > 0).sum(0)
        if self.with_cls:
            if cls_BL is None:
                raise ValueError("LatentStats was built with CLS tokens but got none")
            self.fire_cls += (cls_BL > 0).sum(0)
            self.sum_cls += cls_BL.sum(0, dtype=torch.float64)
            self.max_cls = torch.maximum(self.max_cls, cls_BL.amax(0))
        self.n_images += codes.n_images
        self.n_patch_tokens += codes.n_images * codes.n_patches
