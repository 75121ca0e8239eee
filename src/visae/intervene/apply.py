"""Editing SAE latents inside a model's forward pass, through the backbone's edit hook at the
SAE's layer.

Error mode (default, saev): x' = (x - x_hat) + decode(codes') = x + decode(codes') - decode(codes),
computed as x + (codes' - codes)[edited] @ W_dec[edited] * scale (the SAE's normalisation
scale): only the edited latents change the stream, and with no code changed x' is x bit for
bit. Replace mode (Pach et al.'s steering): x' = decode(codes') on each edit's region, the
reconstruction error dropped there, so those tokens change even when the edit changes no code;
it is labelled as such wherever it is reported.

Several interventions compose: nest the context managers (different SAEs or layers); at one
layer the innermost runs first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from visae.errors import VisaeError
from visae.intervene.edits import Edit

if TYPE_CHECKING:
    from visae.backbones import Backbone
    from visae.sae import SAE

MODES = ("error", "replace")


@dataclass(frozen=True)
class MaxActivations:
    """Per latent, its largest observed activation on patch tokens and on the CLS token (from
    an analysis artifact), the unit of relative edit values."""

    patch: np.ndarray
    cls: np.ndarray | None = None

    @classmethod
    def from_analysis(cls, analysis: Any) -> MaxActivations:
        from visae.analysis import Analysis

        a = analysis if isinstance(analysis, Analysis) else Analysis.load(analysis)
        table = a.table
        cls_max = table.get("max_cls")
        has_cls = cls_max is not None and np.isfinite(cls_max).any()
        return cls(np.nan_to_num(table["max_patch"]), np.nan_to_num(cls_max) if has_cls else None)


def check_pair(
    backbone: Backbone, sae: SAE, layer: int | None = None, weights_hash: str | None = None
) -> int:
    """The layer to edit: the SAE's own (or `layer`), refusing an SAE trained on another
    model's activations or of another width. `weights_hash`: the backbone's, when the caller
    has it already (hashing the weights takes ~0.1 s)."""
    info = sae.checkpoint_info
    trained_on = (info.get("store") or {}).get("weights_hash")
    have = weights_hash or backbone.weights_hash if trained_on else None
    if trained_on and trained_on != have:
        raise VisaeError(
            f"the SAE was trained on activations of another model (weights {trained_on[:12]}) "
            f"than {backbone.name} ({str(have)[:12]})"
        )
    if layer is None:
        if info.get("layer") is None:
            raise VisaeError("the SAE does not record its layer: pass the layer to edit")
        layer = int(info["layer"])
    if not 0 <= layer < backbone.n_layers:
        raise VisaeError(f"layer {layer} is out of range for {backbone.name}")
    if backbone.d(layer) != sae.d:
        raise VisaeError(
            f"SAE width d={sae.d} does not match {backbone.name} layer {layer} "
            f"(d={backbone.d(layer)})"
        )
    trained_layer = info.get("layer")
    if trained_layer is not None and int(trained_layer) != layer:
        raise VisaeError(f"the SAE was trained on layer {trained_layer}, not layer {layer}")
    trained_layout = (((info.get("store") or {}).get("layers") or {}).get(str(layer)) or {}).get(
        "layout"
    )
    grid = list(backbone.layout(layer).grid)
    if trained_layout and list(trained_layout["grid"]) != grid:
        size = backbone.preprocessing["output_size"][0]
        rows, cols = trained_layout["grid"]
        raise VisaeError(
            f"the SAE was trained on a {rows}x{cols} token grid; {backbone.name} gives "
            f"{grid[0]}x{grid[1]} ({size} px): extract with --image-size {size}"
        )
    return layer


class Editor:
    """The edit function for one SAE and its edits at one layer (`fn(x [B, T, d]) -> x'`)."""

    def __init__(
        self,
        backbone: Backbone,
        sae: SAE,
        edits: Sequence[Edit],
        *,
        layer: int | None = None,
        mode: str = "error",
        max_acts: MaxActivations | None = None,
        weights_hash: str | None = None,
        every_token: bool = False,
    ) -> None:
        if mode not in MODES:
            raise VisaeError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.layer = check_pair(backbone, sae, layer, weights_hash)
        self.sae, self.mode, self.edits = sae, mode, list(edits)
        layout = backbone.layout(self.layer)
        self.layout = layout
        for e in self.edits:
            e.check(sae.n_latents)
            if e.relative and max_acts is None:
                raise VisaeError(f"edit {e.label()} is relative to the max: give an analysis")
        if max_acts is not None and len(max_acts.patch) != sae.n_latents:
            raise VisaeError(
                f"the analysis has maxima for {len(max_acts.patch)} latents, the SAE has "
                f"{sae.n_latents}: an analysis of another SAE"
            )
        self.max_acts = max_acts
        from visae.pairing import trained_tokens

        # every_token: region `all` means every token, CLS included, whatever the SAE saw
        # (Pach et al.'s steering edit)
        # (the CLS token then takes the patch maximum as its unit when it has none of its own)
        self.every_token = every_token
        kinds = None if every_token else trained_tokens(sae)
        self._positions = [
            torch.from_numpy(
                e.region.token_positions(layout.n_cls, layout.n_special, layout.n_patches, kinds)
            )
            for e in self.edits
        ]

    def _value(self, e: Edit, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
        """[R, m] target values of the edit's latents at its tokens."""
        latents = list(e.latents)
        if not e.relative:
            return torch.full((len(positions), len(latents)), e.value, device=device)
        assert self.max_acts is not None
        is_cls = positions < self.layout.n_cls
        patch_max = torch.as_tensor(self.max_acts.patch[latents], dtype=torch.float32)
        if bool(is_cls.any()) and not (self.every_token and self.max_acts.cls is None):
            if self.max_acts.cls is None:
                raise VisaeError("relative edit of the CLS token: the analysis has no CLS maxima")
            cls_max = torch.as_tensor(self.max_acts.cls[latents], dtype=torch.float32)
            unit = torch.where(is_cls[:, None], cls_max[None], patch_max[None])
        else:
            unit = patch_max[None].expand(len(positions), -1)
        return (e.value * unit).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        out = x.clone()
        sae = self.sae
        for e, pos in zip(self.edits, self._positions, strict=True):
            pos = pos.to(x.device)
            xs = out[:, pos].reshape(-1, d)
            # each token's active latents only: no dense [tokens, n_latents] code matrix
            values, indices = sae.encode_sparse(xs)
            latents = torch.tensor(e.latents, device=values.device)
            hit = indices[:, :, None] == latents[None, None, :]
            before = (values[:, :, None] * hit).sum(dim=1)
            target = self._value(e, pos, values.device).repeat(b, 1)
            if e.op == "ablate":
                after = torch.zeros_like(before)
            elif e.op == "set":
                after = target
            elif e.op == "scale":
                after = before * target
            else:
                after = before + target
            w = sae.W_dec[latents] * sae.norm_scale
            if self.mode == "replace":
                new = (sae.decode_sparse(values, indices) + (after - before) @ w).to(x.dtype)
            elif bool((after != before).any()):
                new = xs + ((after - before) @ w).to(x.dtype)
            else:
                new = xs
            out[:, pos] = new.reshape(b, len(pos), d)
        return out


@contextlib.contextmanager
def intervene(
    backbone: Backbone,
    sae: SAE,
    edits: Sequence[Edit],
    *,
    layer: int | None = None,
    mode: str = "error",
    max_acts: MaxActivations | None = None,
    weights_hash: str | None = None,
) -> Iterator[Editor]:
    """`with intervene(backbone, sae, edits): out = backbone.forward(pixels)` runs the model
    with the edits applied at the SAE's layer (module docstring)."""
    editor = Editor(
        backbone, sae, edits, layer=layer, mode=mode, max_acts=max_acts, weights_hash=weights_hash
    )
    with backbone.edit(editor.layer, editor):
        yield editor
