"""The model-backed part of the browser: a backbone and a downstream head that the image page's
edit panel runs, one forward pass per request, to show what editing SAE latents on that image
does to the head's output (`visae.intervene` does the edit, `visae.heads` the readout).

A `LiveModel` serves every analysis made with its backbone's weights (others stay read-only):
each analysis brings its own SAE (the checkpoint it records, or `sae` for a single one), its
layer, its latents' max activations (the unit of `set` values) and its store's dataset, where
the page's image is read from. Per image, the preprocessed pixels and the unedited output are
cached, so a request runs only the edited forward."""

from __future__ import annotations

import base64
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from visae.analysis.artifact import Analysis
from visae.errors import VisaeError
from visae.intervene import Edit, MaxActivations, Region, check_pair, intervene

if TYPE_CHECKING:
    from visae.backbones import Backbone, TokenLayout
    from visae.heads import Head
    from visae.sae import SAE

# the operations the panel offers: set in units of the latent's max activation, scale by a factor
EDIT_OPS = ("set", "scale", "ablate")
# bound on |value| (a multiple of the max for set, a factor for scale): far past any useful edit
VALUE_LIMIT = 10.0
MAX_LATENTS = 64
TOP_CLASSES = 5
# images whose pixels and unedited output are kept (an LRU: a page's image stays while edited)
CACHED_IMAGES = 16
# dense outputs are sent as uint8 levels 0..DENSE_LEVELS of a probability
DENSE_LEVELS = 255
REQUEST_FIELDS = ("image", "latents", "op", "value", "patches")


class RequestError(VisaeError):
    """A refused intervention request: a one-line message and the HTTP status to send it with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EditRequest:
    """One validated request of the edit panel (`parse_request`); `patches` empty: every token
    the analysis covers."""

    image: int
    latents: tuple[int, ...]
    op: str
    value: float
    patches: tuple[int, ...]


@dataclass
class _Target:
    """What editing one analysis needs, resolved once when the server starts."""

    analysis: Analysis
    sae: SAE
    sae_path: str
    layer: int
    layout: TokenLayout
    max_acts: MaxActivations
    load_image: Callable[[int], Image.Image]
    every_token: Region


def _int(value: Any, what: str) -> int:
    # bool is an int in Python; JSON true must not pass as image 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{what} must be an integer, not {value!r}")
    return value


def parse_request(body: Any, n_latents: int, n_patches: int) -> EditRequest:
    """Check a request document field by field against the analysis (latent and patch ranges);
    one `RequestError` naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request must be a JSON object")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(
            f"unknown request field {unknown[0]!r} (known: {', '.join(REQUEST_FIELDS)})"
        )
    if "image" not in body:
        raise RequestError("the request names no image")
    image = _int(body["image"], "image")
    latents_in = body.get("latents", [])
    if not isinstance(latents_in, list):
        raise RequestError("latents must be a list of latent ids")
    if len(latents_in) > MAX_LATENTS:
        raise RequestError(f"{len(latents_in)} latents in one edit; at most {MAX_LATENTS}")
    latents = tuple(_int(j, "latent") for j in latents_in)
    for j in latents:
        if not 0 <= j < n_latents:
            raise RequestError(f"latent {j} is out of range (0..{n_latents - 1})")
    if len(set(latents)) != len(latents):
        raise RequestError("latents must not repeat")
    op = body.get("op", "set")
    if op not in EDIT_OPS:
        raise RequestError(f"op must be one of {', '.join(EDIT_OPS)}, not {op!r}")
    value = body.get("value", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"value must be a number, not {value!r}")
    if not math.isfinite(value) or abs(value) > VALUE_LIMIT:
        raise RequestError(f"value {value:g} is outside -{VALUE_LIMIT:g}..{VALUE_LIMIT:g}")
    patches_in = body.get("patches", [])
    if not isinstance(patches_in, list):
        raise RequestError("patches must be a list of patch indices")
    patches = tuple(_int(p, "patch") for p in patches_in)
    for p in patches:
        if not 0 <= p < n_patches:
            raise RequestError(f"patch {p} is outside the grid (0..{n_patches - 1})")
    if len(set(patches)) != len(patches):
        raise RequestError("patches must not repeat")
    return EditRequest(image, latents, op, float(value), patches)


def _levels(prob: torch.Tensor) -> str:
    """A probability map as base64 uint8 levels 0..DENSE_LEVELS, row-major."""
    q = torch.round(prob.clamp(0, 1) * DENSE_LEVELS).to(torch.uint8).cpu().numpy()
    return base64.b64encode(np.ascontiguousarray(q).tobytes()).decode("ascii")


class LiveModel:
    """A backbone and a head for the browser's edit panel (module docstring). `sae` overrides
    the checkpoint an analysis records (moved since); it needs a single analysis of the model."""

    def __init__(
        self, backbone: Backbone, head: Head, *, sae: SAE | str | os.PathLike[str] | None = None
    ):
        self.backbone = backbone
        self.head = head
        self._sae = sae
        self._targets: dict[int, _Target] = {}
        self._cache: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        # one forward at a time: edits are hooks on the shared module, seen by any concurrent pass
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str,
        head: str,
        *,
        sae: str | os.PathLike[str] | None = None,
        device: str = "cpu",
    ) -> LiveModel:
        """The backbone `model` (a `load_backbone` name) on `device` and the head `head` (a
        `load_head` spec: classifier, saliency, probe:DIR)."""
        from visae.backbones import load_backbone
        from visae.devices import resolve_device
        from visae.heads import load_head

        backbone = load_backbone(model, device=str(resolve_device(device)))
        return cls(backbone, load_head(head, backbone), sae=sae)

    @property
    def analyses(self) -> list[int]:
        """Indices of the served analyses the panel can edit."""
        return sorted(self._targets)

    def bind(self, analyses: Sequence[Analysis]) -> None:
        """Resolve, for each analysis made with this backbone's weights, its SAE, layer, maxima
        and images; refuse when none is, or when one cannot be edited (one-line errors)."""
        weights = self.backbone.weights_hash
        ours = [i for i, a in enumerate(analyses) if a.meta["store"].get("weights_hash") == weights]
        if not ours:
            made = sorted({str(a.meta.get("backbone")) for a in analyses})
            raise VisaeError(
                f"no analysis was made with {self.backbone.name}'s weights (they are of "
                f"{', '.join(made)}): the edit panel needs the analysis's own model"
            )
        if self._sae is not None and len(ours) > 1:
            raise VisaeError(
                f"an SAE given for {len(ours)} analyses of {self.backbone.name} is ambiguous: "
                "serve one analysis, or let each use the SAE it records"
            )
        self._cache.clear()
        self._targets = {i: self._target(analyses[i]) for i in ours}

    def _target(self, a: Analysis) -> _Target:
        from visae.analysis.thumbs import image_loader
        from visae.sae import SAE
        from visae.store import ActivationStore, open_dataset

        given = self._sae
        if isinstance(given, SAE):
            sae, sae_path = given, str(given.checkpoint_info.get("path") or "the given SAE")
        elif given is not None:
            sae_path = str(given)
            sae = SAE.load(given)
        else:
            sae_path = a.meta["sae"].get("path")
            if not sae_path:
                raise VisaeError(f"analysis {a.path} records no SAE path: pass the SAE (--sae)")
            if not Path(sae_path).exists():
                raise VisaeError(f"SAE {sae_path} of analysis {a.path} is missing: pass it (--sae)")
            sae = SAE.load(sae_path)
        if sae.cfg.to_dict() != a.meta["sae"]["config"]:
            raise VisaeError(f"SAE {sae_path} is not the SAE of analysis {a.path} (config differs)")
        sae = sae.to(self.backbone.device).eval()
        layer = check_pair(self.backbone, sae, int(a.meta["layer"]))
        self.head.check_reads_after(layer)
        store = ActivationStore.open(a.meta["store"]["path"])
        dataset = open_dataset(store, progress=False)
        layout = self.backbone.layout(layer)
        if tuple(layout.grid) != a.grid:
            raise VisaeError(
                f"{self.backbone.name} layer {layer} has a {layout.grid} grid; analysis {a.path} "
                f"has {a.grid}"
            )
        with_cls = a.meta.get("tokens") in ("cls", "all") and layout.n_cls > 0
        every = (
            Region("all")
            if with_cls or layout.n_special == 0
            else Region("patches", tuple(range(layout.n_patches)))
        )
        return _Target(
            a,
            sae,
            sae_path,
            layer,
            layout,
            MaxActivations.from_analysis(a),
            image_loader(store.metadata(), dataset),
            every,
        )

    def info(self) -> dict[str, Any]:
        """What the app needs to draw the panel (sent in the served `index` document)."""
        head = self.head
        return {
            "model": self.backbone.name,
            "head": {"name": head.name, "kind": head.kind, "outputs": head.outputs},
            "analyses": {
                str(i): {"layer": t.layer, "sae": t.sae_path, "every_token": t.every_token.kind}
                for i, t in self._targets.items()
            },
            "ops": list(EDIT_OPS),
            "value_limit": VALUE_LIMIT,
            "max_latents": MAX_LATENTS,
        }

    def target(self, index: int) -> _Target:
        t = self._targets.get(index)
        if t is None:
            raise RequestError(
                f"analysis {index} has no edit panel (not made with this model)", 404
            )
        return t

    def edit_of(self, index: int, req: EditRequest) -> Edit | None:
        """The `Edit` a request asks for on analysis `index` (None: no latent, no edit)."""
        if not req.latents:
            return None
        t = self.target(index)
        region = Region("patches", req.patches) if req.patches else t.every_token
        if req.op == "ablate":
            return Edit(req.latents, "ablate", region=region)
        return Edit(req.latents, req.op, req.value, relative=req.op == "set", region=region)

    def _base(self, index: int, image: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(pixels, unedited output, whether both came from the cache); under the lock."""
        key = (index, image)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[0], hit[1], True
        t = self._targets[index]
        pixels = self.backbone.preprocess([t.load_image(image)]).to(self.backbone.device)
        before = self.head(self.backbone, pixels)
        self._cache[key] = (pixels, before)
        while len(self._cache) > CACHED_IMAGES:
            self._cache.popitem(last=False)
        return pixels, before, False

    def run(self, index: int, body: Any) -> dict[str, Any]:
        """Answer one request of the panel for analysis `index`: validate it, run the edited
        forward on its image, and report the head's output before and after."""
        t = self.target(index)
        a = t.analysis
        req = parse_request(body, a.n_latents, t.layout.n_patches)
        if req.image not in a.images:
            raise RequestError(f"image {req.image} is not in analysis {a.name}", 404)
        edit = self.edit_of(index, req)
        with self._lock:
            pixels, before, cached = self._base(index, req.image)
            start = time.perf_counter()
            if edit is None:
                after = before
            else:
                with intervene(self.backbone, t.sae, [edit], layer=t.layer, max_acts=t.max_acts):
                    after = self.head(self.backbone, pixels)
            seconds = time.perf_counter() - start
        max_patch = a.table["max_patch"]
        return {
            "analysis": index,
            "image": req.image,
            "edit": None if edit is None else edit.to_dict(),
            "label": "no edit" if edit is None else edit.label(),
            "units": [float(np.nan_to_num(max_patch[j])) for j in req.latents],
            "layer": t.layer,
            "seconds": round(seconds, 6),
            "cached": cached,
            "output": self.readout(before, after),
        }

    def readout(self, before: torch.Tensor, after: torch.Tensor) -> dict[str, Any]:
        """The head's output before and after, as the panel shows it: top classes with
        probabilities (classification), or maps (dense: a probability map, or the argmax class
        of each cell of a segmentation's logits)."""
        from visae.heads import logit_changes

        head = self.head
        if head.kind == "classification":
            return {
                "kind": "classification",
                "before": self._classes(before),
                "after": self._classes(after),
                "moved": logit_changes(
                    before, after, head.labels, min(TOP_CLASSES, len(head.labels))
                )[0],
            }
        b, a = before[0].float().cpu(), after[0].float().cpu()
        if b.shape[0] > 1:
            was, now = b.argmax(0), a.argmax(0)
            dtype = "<u1" if b.shape[0] <= 256 else "<u2"
            return {
                "kind": "dense",
                "map": "classes",
                "shape": list(was.shape),
                "labels": list(head.labels),
                "dtype": dtype,
                "before": base64.b64encode(was.numpy().astype(dtype).tobytes()).decode("ascii"),
                "after": base64.b64encode(now.numpy().astype(dtype).tobytes()).decode("ascii"),
                "changed": float((was != now).float().mean()),
            }
        pb, pa = (
            (b[0], a[0]) if head.outputs == "probabilities" else (b[0].sigmoid(), a[0].sigmoid())
        )
        return {
            "kind": "dense",
            "map": "probability",
            "shape": list(pb.shape),
            "labels": list(head.labels),
            "levels": DENSE_LEVELS,
            "before": _levels(pb),
            "after": _levels(pa),
            "mean_before": float(pb.mean()),
            "mean_after": float(pa.mean()),
            "max_change": float((pa - pb).abs().max()),
        }

    def _classes(self, scores_BC: torch.Tensor) -> list[dict[str, Any]]:
        """The `TOP_CLASSES` best classes: index, name, raw score, probability (the softmax of
        a classifier's logits; a multi-label probe's outputs are independent logistic ones, so
        each class's probability is the sigmoid of its own logit)."""
        from visae.heads import top_classes

        k = min(TOP_CLASSES, scores_BC.shape[1])
        rows = top_classes(scores_BC, self.head.labels, k, self.head.outputs)[0]
        if getattr(self.head, "probe_kind", None) == "cls":
            for row in rows:
                row["prob"] = 1 / (1 + math.exp(-row["score"]))
        return rows
