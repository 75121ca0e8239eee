"""Linear probes trained on a store's frozen features: the downstream heads of saev-style
interventions (a linear probe on the CLS token, a linear segmentation head on patch tokens),
trained from the activations already stored, with no backbone forward.

Kinds:
- `cls`: image-level multi-label concept classifier on the (first) CLS token, one logistic
  output per concept.
- `patch`: per-patch linear segmentation, a softmax over `background` + C classes. The classes
  are the source's concepts with a name prefix (default `object:` where the source has such
  names, else all) at one taxonomy depth (default: the shallowest depth holding at least two
  classes, else the shallowest): the top level `object:animals`, `object:food`... of stamp
  scenes, the families `object:shapes/round`... of shape scenes, every COCO category. A patch
  carries a class when the class covers at least half of it (`ConceptLabels.patch_labels`);
  one carrying none is `background`; one carrying two or more (an exact half-half split, or
  overlapping COCO masks) is ambiguous: left out of training and of the metrics, and counted.

Training: images are split into training and held-out sets (`holdout`, `seed`); an edit image
of a scene pair goes with the scene it was made from (metadata `pair.image_a`), so no held-out
image has a near-copy in training. Features are standardised with statistics of the training
rows; the optimiser (full-batch L-BFGS, or minibatch Adam) minimises the mean cross-entropy
plus `weight_decay / 2 * ||W||^2` in standardised units (bias not decayed), from zero weights
and the training prevalences as biases. The standardisation is folded into the saved weights
(`W / s`, `b - (W / s) @ mu`), so a probe applies to raw tokens; held-out metrics are computed
with those folded weights on raw tokens.

A probe folder holds `probe.json` (format, schema version, kind, layer, width, output labels,
the store identity, the backbone name and weights hash, the config, the split, training
record and metrics) and `model.safetensors` (`weight` `[outputs, d]`, `bias` `[outputs]`,
float32), written whole by `atomic_directory`.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

import visae
from visae.atomic import atomic_directory, is_tmp_name, write_bytes, write_text
from visae.devices import resolve_device
from visae.errors import VisaeError
from visae.eval.sources import ConceptLabels, load_concepts
from visae.heads.base import Head
from visae.store.reader import ActivationStore

if TYPE_CHECKING:
    from visae.backbones import Backbone, TokenLayout

FORMAT = "visae.probe"
SCHEMA_VERSION = 1
INFO_NAME = "probe.json"
WEIGHTS_NAME = "model.safetensors"
OWN_FILES = (INFO_NAME, WEIGHTS_NAME)
PROBE_KINDS = ("cls", "patch")
OPTIMIZERS = ("lbfgs", "adam")
BACKGROUND = "background"
HEAD_KIND = {"cls": "classification", "patch": "dense"}
DEFAULT_STEPS = {"lbfgs": 200, "adam": 2000}
DEFAULT_LR = {"lbfgs": 1.0, "adam": 1e-2}
_TOLERANCE = 1e-9  # L-BFGS stops when the loss changes by less than this (relative)
_MIN_SCALE = 1e-6  # features with a smaller standard deviation are left unscaled
_AMBIGUOUS = -1


@dataclass(frozen=True)
class ProbeConfig:
    """Everything that determines a probe (all recorded in probe.json; each field's help is
    the CLI flag's help)."""

    kind: str = field(
        default="cls",
        metadata={"help": "cls: concepts from the CLS token; patch: segmentation of patches"},
    )
    layer: int | None = field(default=None, metadata={"help": "store layer (default: its last)"})
    concepts: str | None = field(
        default=None,
        metadata={
            "help": "concept source (visae.eval.sources): auto (default), scenes, coco, "
            "labels[:PREFIX], cub, imagefolder, hf, csv:FILE; patch needs masks (scenes, coco)"
        },
    )
    prefix: str | None = field(
        default=None,
        metadata={
            "help": "keep the concepts whose names start with this (default: all for cls; "
            "object: for patch where the source has such names, else all)"
        },
    )
    depth: int | None = field(
        default=None,
        metadata={
            "help": "keep the concepts at this taxonomy depth (object:a/b is 2; default: all "
            "for cls, the shallowest depth with at least two classes for patch)"
        },
    )
    min_positives: int = field(
        default=5, metadata={"help": "fewest positive store images for a concept to be kept"}
    )
    holdout: float = field(
        default=0.2, metadata={"help": "fraction of the images held out for the metrics"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the held-out split and of Adam"})
    optimizer: str = field(
        default="lbfgs", metadata={"help": "lbfgs (full batch) or adam (minibatches)"}
    )
    steps: int | None = field(
        default=None,
        metadata={"help": "L-BFGS iterations or Adam updates (default 200 and 2000)"},
    )
    lr: float | None = field(
        default=None, metadata={"help": "learning rate (default 1 for L-BFGS, 1e-2 for Adam)"}
    )
    batch_size: int = field(default=4096, metadata={"help": "rows per Adam update"})
    weight_decay: float = field(
        default=1e-4, metadata={"help": "L2 penalty on the weights, in standardised units"}
    )
    standardize: bool = field(
        default=True,
        metadata={"help": "standardise features on the training images (folded into the weights)"},
    )

    def __post_init__(self) -> None:
        if self.kind not in PROBE_KINDS:
            raise VisaeError(f"unknown probe kind {self.kind!r}: expected cls or patch")
        if self.optimizer not in OPTIMIZERS:
            raise VisaeError(f"unknown optimizer {self.optimizer!r}: expected lbfgs or adam")
        if not 0 < self.holdout < 1:
            raise VisaeError(f"holdout must be a fraction in (0, 1), not {self.holdout}")
        for name in ("min_positives", "batch_size"):
            if getattr(self, name) < 1:
                raise VisaeError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise VisaeError(f"steps must be at least 1, not {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise VisaeError(f"lr must be positive, not {self.lr}")
        if not self.weight_decay >= 0:
            raise VisaeError(f"weight_decay must be >= 0, not {self.weight_decay}")
        if self.depth is not None and self.depth < 1:
            raise VisaeError(f"depth must be at least 1, not {self.depth}")

    @property
    def n_steps(self) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.optimizer]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise VisaeError(f"unknown probe config fields {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------- the head


class ProbeHead(Head):
    """A trained probe as a downstream head: reads the tokens of `layer` during a backbone
    forward and gives logits, `[B, C]` from the CLS token (`cls`) or `[B, C + 1, h, w]` over
    the patch grid (`patch`, background first). Refuses a backbone of other weights than the
    store it was trained on (checked once per backbone object: the hash reads every weight)."""

    outputs = "logits"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, info: dict[str, Any]) -> None:
        self.info = info
        self.probe_kind = str(info["kind"])
        self.kind = HEAD_KIND[self.probe_kind]
        self.multilabel = self.probe_kind == "cls"
        self.layer = int(info["layer"])
        self.labels = list(info["classes"])
        self.path = Path(info["path"]) if info.get("path") else None
        self.name = f"probe:{self.path}" if self.path else f"probe ({self.probe_kind})"
        self.weights_hash = str(info["backbone"]["weights_hash"])
        self.weight = weight.detach().to(torch.float32).contiguous()
        self.bias = bias.detach().to(torch.float32).contiguous()
        self._checked: weakref.WeakSet[Backbone] = weakref.WeakSet()

    @property
    def d(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, tokens_BTD: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """The probe on recorded tokens `[B, T, D]` ordered as `layout` (CLS, registers,
        patches row-major): `[B, C]` or `[B, C + 1, h, w]`."""
        if tokens_BTD.ndim != 3 or tokens_BTD.shape[1:] != (layout.n_tokens, self.d):
            raise VisaeError(
                f"{self.name} needs tokens [B, {layout.n_tokens}, {self.d}] at layer "
                f"{self.layer}, got {list(tokens_BTD.shape)}"
            )
        weight = self.weight.to(tokens_BTD.device)
        bias = self.bias.to(tokens_BTD.device)
        if self.probe_kind == "cls":
            if layout.n_cls == 0:
                raise VisaeError(f"{self.name} reads the CLS token; layer {self.layer} has none")
            return tokens_BTD[:, 0].float() @ weight.T + bias
        if layout.n_patches == 0:
            raise VisaeError(f"{self.name} reads patch tokens; layer {self.layer} has none")
        h, w = layout.grid
        logits_BPK = tokens_BTD[:, layout.n_special :].float() @ weight.T + bias
        return logits_BPK.reshape(len(tokens_BTD), h, w, -1).permute(0, 3, 1, 2)

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse a backbone whose weights are not those of the store the probe was trained
        on (a probe reads one model's feature space)."""
        if backbone in self._checked:
            return
        have = backbone.weights_hash
        if have != self.weights_hash:
            raise VisaeError(
                f"{self.name} was trained on {self.info['backbone']['name']} (weights "
                f"{self.weights_hash[:12]}); backbone {backbone.name} has weights {have[:12]}"
            )
        self._checked.add(backbone)

    def _read(
        self, backbone: Backbone, recorded: torch.Tensor | None, output: object
    ) -> torch.Tensor:
        self.check_backbone(backbone)
        assert recorded is not None  # layer is never None for a probe
        return self.logits(recorded, backbone.layout(self.layer))

    def summary(self) -> str:
        return probe_summary(self.info)


@dataclass
class ProbeResult:
    """What `train_probe` wrote: the folder, its probe.json and the trained head."""

    path: Path
    info: dict[str, Any]
    head: ProbeHead

    @property
    def metrics(self) -> dict[str, Any]:
        return self.info["metrics"]

    def summary(self) -> str:
        return probe_summary(self.info)


def probe_summary(info: dict[str, Any]) -> str:
    """probe.json as text (what `visae probe info` and `visae probe train` print)."""
    kind, m = info["kind"], info["metrics"]
    held, base = m["heldout"], m["baseline"]
    store, backbone = info["store"], info["backbone"]
    classes = info["classes"]
    shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
    what = "multi-label concepts on the CLS token" if kind == "cls" else "patch segmentation"
    lines = [
        f"probe        {info.get('path', '')}",
        f"kind         {kind} ({what}), layer {info['layer']}, d={info['d']}",
        f"backbone     {backbone['name']}  (weights {backbone['weights_hash'][:16]})",
        f"store        {store['path']}  ({store['n_images']} images)",
        f"concepts     {info['concepts']['source']}",
        f"outputs      {len(classes)}: {shown}",
        f"split        {info['split']['n_train_images']} training, "
        f"{info['split']['n_heldout_images']} held-out images",
    ]
    if kind == "cls":
        lines.append(
            f"held-out     mean accuracy {_fmt(held['mean_accuracy'])}, balanced accuracy "
            f"{_fmt(held['mean_balanced_accuracy'])}, macro F1 {_fmt(held['macro_f1'])}"
        )
        lines.append(
            f"majority     mean accuracy {_fmt(base['mean_accuracy'])}, balanced accuracy "
            f"{_fmt(base['mean_balanced_accuracy'])}, macro F1 {_fmt(base['macro_f1'])}"
        )
        for row in held["per_class"]:
            lines.append(
                f"  {row['class']:<32} acc {_fmt(row['accuracy'])}  balanced "
                f"{_fmt(row['balanced_accuracy'])}  F1 {_fmt(row['f1'])}  "
                f"({row['positives']} positive)"
            )
    else:
        lines.append(
            f"held-out     {held['n_patches']} patches ({held['ambiguous_patches']} ambiguous "
            f"left out): accuracy {_fmt(held['accuracy'])}, mIoU {_fmt(held['miou'])}"
        )
        lines.append(
            f"majority     {base['class']}: accuracy {_fmt(base['accuracy'])}, "
            f"mIoU {_fmt(base['miou'])}"
        )
        for row in held["per_class"]:
            lines.append(f"  {row['class']:<32} IoU {_fmt(row['iou'])}  ({row['patches']} patches)")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------- choosing the classes


def concept_depth(name: str) -> int:
    """Taxonomy depth of a concept name: `object:a/b` is 2 (a name without `:` counts whole)."""
    head, sep, rest = name.partition(":")
    return (rest if sep else head).count("/") + 1


def select_classes(
    names: tuple[str, ...], kind: str, prefix: str | None, depth: int | None
) -> list[int]:
    """Columns of `names` the probe predicts (module docstring: the defaults)."""
    if prefix is None:
        prefix = (
            "object:" if kind == "patch" and any(n.startswith("object:") for n in names) else ""
        )
    chosen = [k for k, n in enumerate(names) if n.startswith(prefix)]
    if kind == "patch" and depth is None and chosen:
        depths = sorted({concept_depth(names[k]) for k in chosen})
        wide = [t for t in depths if sum(concept_depth(names[k]) == t for k in chosen) >= 2]
        depth = wide[0] if wide else depths[0]
    if depth is not None:
        chosen = [k for k in chosen if concept_depth(names[k]) == depth]
    if not chosen:
        at = f" at depth {depth}" if depth is not None else ""
        raise VisaeError(
            f"no concept starts with {prefix!r}{at} (concepts: {', '.join(names[:6])}"
            f"{', ...' if len(names) > 6 else ''})"
        )
    return chosen


# ---------------------------------------------------------------- the split


def split_images(
    metadata: list[dict[str, Any]], holdout: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) sorted store indices: groups of images (a scene with the edit
    images made from it) drawn in a seeded order until `holdout` of the images are held out."""
    n = len(metadata)
    store_of = {int(m.get("dataset_index", s)): s for s, m in enumerate(metadata)}
    group_N = np.arange(n)
    for s, m in enumerate(metadata):
        pair = m.get("pair")
        source = pair.get("image_a") if isinstance(pair, dict) else None
        if isinstance(source, int) and store_of.get(source, s) != s:
            group_N[s] = store_of[source]
    for _ in range(n):  # follow links to their root (edits point at scenes: one step)
        linked = group_N[group_N]
        if np.array_equal(linked, group_N):
            break
        group_N = linked
    groups, sizes = np.unique(group_N, return_counts=True)
    if len(groups) < 2:
        raise VisaeError(f"cannot hold out images: the store has {n} image(s) in one group")
    order = np.random.default_rng(seed).permutation(len(groups))
    cum = np.cumsum(sizes[order])
    k = int(np.searchsorted(cum, max(1, round(holdout * n))))  # first prefix reaching it
    k = min(max(k + 1, 1), len(groups) - 1)
    held = np.isin(group_N, groups[order[:k]])
    return np.flatnonzero(~held), np.flatnonzero(held)


# ---------------------------------------------------------------- features and targets


def _features(
    store: ActivationStore, layer: int, images: np.ndarray, tokens: str, bar: tqdm
) -> np.ndarray:
    """`[rows, D]` float32: the first CLS token per image, or every patch (image-major)."""
    per_image = 1 if tokens == "cls" else len(store.token_positions(layer, "patch"))
    out = np.empty((len(images) * per_image, store.d(layer)), dtype=np.float32)
    row = 0
    for ids, acts in store.ordered(layer, tokens=tokens, images=images):
        take = acts[:, :1] if tokens == "cls" else acts
        out[row : row + take.shape[0] * per_image] = take.reshape(-1, take.shape[-1])
        row += take.shape[0] * per_image
        bar.update(len(ids))
    return out


def _patch_targets(
    concepts: ConceptLabels, images: np.ndarray, layer: int, columns: list[int]
) -> np.ndarray:
    """`[images * patches]` int64: 0 background, k + 1 class k, -1 ambiguous (two or more)."""
    labels = concepts.patch_labels(images, layer)[:, columns].tocsr()
    count_R = np.diff(labels.indptr)
    target_R = np.zeros(labels.shape[0], dtype=np.int64)
    one = count_R == 1
    target_R[one] = labels.indices[labels.indptr[:-1][one]] + 1
    target_R[count_R > 1] = _AMBIGUOUS
    return target_R


# ---------------------------------------------------------------- optimisation


def _objective(
    kind: str,
    weight_KD: torch.Tensor,
    bias_K: torch.Tensor,
    x_RD: torch.Tensor,
    y_R: torch.Tensor,
    weight_decay: float,
) -> torch.Tensor:
    logits_RK = x_RD @ weight_KD.T + bias_K
    if kind == "cls":
        data = F.binary_cross_entropy_with_logits(logits_RK, y_R)
    else:
        data = F.cross_entropy(logits_RK, y_R)
    return data + 0.5 * weight_decay * (weight_KD**2).sum()


def _initial_bias(kind: str, y_R: torch.Tensor, n_out: int) -> torch.Tensor:
    """Biases giving the training prevalences (the optimum of a probe that ignores x)."""
    if kind == "cls":
        p_K = y_R.mean(0).clamp(1e-4, 1 - 1e-4)
        return torch.log(p_K / (1 - p_K))
    counts_K = torch.bincount(y_R, minlength=n_out).to(torch.float32)
    return torch.log((counts_K + 1) / (counts_K.sum() + n_out))


def _fit(
    kind: str,
    x_RD: torch.Tensor,
    y_R: torch.Tensor,
    n_out: int,
    config: ProbeConfig,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Weights and biases minimising the objective on standardised features, and a record."""
    weight_KD = torch.zeros(n_out, x_RD.shape[1], device=x_RD.device, requires_grad=True)
    bias_K = _initial_bias(kind, y_R, n_out).to(x_RD.device).requires_grad_(True)
    wd, lr, steps = config.weight_decay, config.learning_rate, config.n_steps
    bar = tqdm(
        total=steps, desc=f"probe {kind} ({config.optimizer})", unit="step", disable=not progress
    )
    done, converged = 0, False
    if config.optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            [weight_KD, bias_K],
            lr=lr,
            max_iter=1,
            max_eval=25,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = _objective(kind, weight_KD, bias_K, x_RD, y_R, wd)
            loss.backward()
            return loss

        previous = math.inf
        while done < steps and not converged:
            loss = float(opt.step(closure).detach())
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")
            converged = abs(previous - loss) <= _TOLERANCE * max(1.0, abs(loss))
            previous = loss
    else:
        opt = torch.optim.Adam([weight_KD, bias_K], lr=lr)
        generator = torch.Generator().manual_seed(config.seed)
        n = x_RD.shape[0]
        order, pos = torch.randperm(n, generator=generator), 0
        for done in range(1, steps + 1):
            if pos >= n:
                order, pos = torch.randperm(n, generator=generator), 0
            rows = order[pos : pos + config.batch_size].to(x_RD.device)
            pos += config.batch_size
            opt.zero_grad()
            loss_t = _objective(kind, weight_KD, bias_K, x_RD[rows], y_R[rows], wd)
            loss_t.backward()
            opt.step()
            bar.update(1)
            if done % 50 == 0:
                bar.set_postfix(loss=f"{float(loss_t.detach()):.4g}")
    bar.close()
    with torch.no_grad():
        final = float(_objective(kind, weight_KD, bias_K, x_RD, y_R, wd))
    if not math.isfinite(final):
        raise VisaeError(f"probe training diverged (loss {final}): lower the learning rate")
    record = {
        "optimizer": config.optimizer,
        "lr": lr,
        "max_steps": steps,
        "steps": done,
        "converged": converged,
        "final_loss": final,
    }
    return weight_KD.detach(), bias_K.detach(), record


def _fold(
    weight_KD: torch.Tensor, bias_K: torch.Tensor, mean_D: np.ndarray, scale_D: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights for raw tokens: `W (x - mu) / s + b = (W / s) x + (b - (W / s) mu)` (float64)."""
    w = weight_KD.cpu().to(torch.float64) / torch.from_numpy(scale_D)
    b = bias_K.cpu().to(torch.float64) - w @ torch.from_numpy(mean_D)
    return w.to(torch.float32), b.to(torch.float32)


# ---------------------------------------------------------------- metrics


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def binary_metrics(pred_NC: np.ndarray, true_NC: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Per-concept accuracy, balanced accuracy (None when one side is absent) and F1 (None
    when there are neither positives nor predicted positives), and their means."""
    tp = (pred_NC & true_NC).sum(0)
    tn = (~pred_NC & ~true_NC).sum(0)
    fp = (pred_NC & ~true_NC).sum(0)
    fn = (~pred_NC & true_NC).sum(0)
    rows = []
    for k, name in enumerate(names):
        pos, neg = tp[k] + fn[k], tn[k] + fp[k]
        balanced = 0.5 * (tp[k] / pos + tn[k] / neg) if pos and neg else None
        f1_den = 2 * tp[k] + fp[k] + fn[k]
        rows.append(
            {
                "class": name,
                "positives": int(pos),
                "accuracy": float((tp[k] + tn[k]) / pred_NC.shape[0]),
                "balanced_accuracy": None if balanced is None else float(balanced),
                "f1": float(2 * tp[k] / f1_den) if f1_den else None,
            }
        )
    return {
        "n_images": int(pred_NC.shape[0]),
        "mean_accuracy": _mean([r["accuracy"] for r in rows]),
        "mean_balanced_accuracy": _mean([r["balanced_accuracy"] for r in rows]),
        "macro_f1": _mean([r["f1"] for r in rows]),
        "per_class": rows,
    }


def segmentation_metrics(pred_R: np.ndarray, true_R: np.ndarray, names: list[str]) -> dict:
    """Patch accuracy and IoU per class (None where a class is neither present nor predicted)
    over the unambiguous patches (`true_R >= 0`), and mIoU over the classes with an IoU."""
    keep = true_R >= 0
    pred, true = pred_R[keep], true_R[keep]
    k = len(names)
    confusion = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    hits = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - hits
    rows = [
        {
            "class": name,
            "patches": int(confusion[c].sum()),
            "iou": float(hits[c] / union[c]) if union[c] else None,
        }
        for c, name in enumerate(names)
    ]
    return {
        "n_patches": int(keep.sum()),
        "ambiguous_patches": int((~keep).sum()),
        "accuracy": float((pred == true).mean()) if len(true) else None,
        "miou": _mean([r["iou"] for r in rows]),
        "per_class": rows,
    }


def _metrics(
    kind: str,
    weight: torch.Tensor,
    bias: torch.Tensor,
    outputs: list[str],
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    held: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """Held-out metrics of the folded weights on raw tokens, beside the majority rule learnt
    from the training targets, and the training accuracy."""
    (x_train, y_train, fit_rows), (x_held, y_held) = train, held

    def predict(x_RD: np.ndarray) -> np.ndarray:
        logits = torch.from_numpy(x_RD) @ weight.T + bias
        return (logits > 0).numpy() if kind == "cls" else logits.argmax(1).numpy()

    if kind == "cls":
        majority_C = y_train.mean(0) > 0.5
        base = binary_metrics(np.broadcast_to(majority_C, y_held.shape), y_held, outputs)
        base.pop("per_class")
        return {
            "heldout": binary_metrics(predict(x_held), y_held, outputs),
            "baseline": {"rule": "majority", **base},
            "train": {"mean_accuracy": float((predict(x_train) == y_train).mean())},
        }
    majority = int(np.bincount(y_train[fit_rows], minlength=len(outputs)).argmax())
    base = segmentation_metrics(np.full_like(y_held, majority), y_held, outputs)
    right = predict(x_train)[fit_rows] == y_train[fit_rows]
    return {
        "heldout": segmentation_metrics(predict(x_held), y_held, outputs),
        "baseline": {
            "rule": "majority",
            "class": outputs[majority],
            "accuracy": base["accuracy"],
            "miou": base["miou"],
        },
        "train": {"accuracy": float(right.mean())},
    }


# ---------------------------------------------------------------- training


def train_probe(
    store: ActivationStore | str | os.PathLike[str],
    config: ProbeConfig,
    out: str | os.PathLike[str],
    progress: bool = True,
    *,
    dataset: str | None = None,
    device: str = "cpu",
) -> ProbeResult:
    """Train a probe on `store`'s tokens at `config.layer` against a concept source, measure
    it on the held-out images and write the probe folder `out` (module docstring). `dataset`
    overrides the store's dataset spec for the sources that read its images (scenes, coco)."""
    out = Path(out)
    _check_replaceable(out)
    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store, progress=progress)
    torch_device = resolve_device(device)
    layer = store.layers[-1] if config.layer is None else int(config.layer)
    if layer not in store.layers:
        raise VisaeError(f"layer {layer} is not in store {store.path} (layers {store.layers})")
    tokens = config.kind
    store.token_positions(layer, tokens)  # refuses a store without CLS / patch tokens here
    concepts = load_concepts(config.concepts, store, dataset, min_positives=config.min_positives)
    if config.kind == "patch" and not concepts.has_masks:
        raise VisaeError(
            f"a patch probe needs a concept source with masks (scenes, coco); "
            f"{concepts.source!r} has none"
        )
    columns = select_classes(concepts.names, config.kind, config.prefix, config.depth)
    names = [concepts.names[k] for k in columns]
    outputs = names if config.kind == "cls" else [BACKGROUND, *names]
    train_N, held_N = split_images(store.metadata(), config.holdout, config.seed)

    bar = tqdm(total=store.n_images, desc="probe features", unit="img", disable=not progress)
    x_train = _features(store, layer, train_N, tokens, bar)
    x_held = _features(store, layer, held_N, tokens, bar)
    bar.close()
    if config.kind == "cls":
        y_train = concepts.labels_NC[train_N][:, columns]
        y_held = concepts.labels_NC[held_N][:, columns]
        fit_rows = np.arange(len(x_train))
    else:
        y_train = _patch_targets(concepts, train_N, layer, columns)
        y_held = _patch_targets(concepts, held_N, layer, columns)
        fit_rows = np.flatnonzero(y_train != _AMBIGUOUS)
    if not len(fit_rows):
        raise VisaeError("no training patch has an unambiguous class")

    x_fit = x_train[fit_rows]  # a copy: standardised in place
    if config.standardize:
        mean_D = x_fit.mean(0, dtype=np.float64)
        scale_D = x_fit.std(0, dtype=np.float64)
        scale_D[scale_D < _MIN_SCALE] = 1.0
    else:
        mean_D, scale_D = np.zeros(x_fit.shape[1]), np.ones(x_fit.shape[1])
    x_fit -= mean_D.astype(np.float32)
    x_fit /= scale_D.astype(np.float32)
    x_std = torch.from_numpy(x_fit).to(torch_device)
    y_fit = torch.from_numpy(y_train[fit_rows])
    y_fit = (y_fit.to(torch.float32) if config.kind == "cls" else y_fit).to(torch_device)
    del x_fit
    weight_KD, bias_K, record = _fit(config.kind, x_std, y_fit, len(outputs), config, progress)
    del x_std
    weight, bias = _fold(weight_KD, bias_K, mean_D, scale_D)

    metrics = _metrics(
        config.kind, weight, bias, outputs, (x_train, y_train, fit_rows), (x_held, y_held)
    )
    record |= {
        "n_rows": len(fit_rows),
        "ambiguous_patches": int(len(x_train) - len(fit_rows)),
        "standardized": config.standardize,
        "device": str(torch_device),
    }
    identity = store.identity()
    info = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "visae_version": visae.__version__,
        "kind": config.kind,
        "layer": layer,
        "d": store.d(layer),
        "classes": outputs,
        "concepts": {
            "source": concepts.source,
            "min_positives": concepts.min_positives,
            "excluded": list(concepts.excluded),
        },
        "store": identity,
        "backbone": {"name": identity["backbone"], "weights_hash": identity["weights_hash"]},
        "config": asdict(config),
        "split": {
            "n_train_images": len(train_N),
            "n_heldout_images": len(held_N),
            "heldout_images": held_N.tolist(),
        },
        "training": record,
        "metrics": metrics,
    }
    _write(out, info, weight, bias)
    info["path"] = str(out)
    return ProbeResult(out, info, ProbeHead(weight, bias, info))


# ---------------------------------------------------------------- files


def _check_replaceable(path: Path) -> None:
    """Refuse a destination that is a file, or a folder holding anything but a probe's files
    (a typo must never replace someone's folder)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise VisaeError(f"cannot write probe: {path} exists and is not a directory")
    own = set(OWN_FILES)
    foreign = sorted(
        name
        for name in os.listdir(path)
        if name not in own and not (is_tmp_name(name) and name[1:].rsplit(".", 1)[0] in own)
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise VisaeError(f"refusing to replace {path}: it holds {shown}, not part of a probe")


def _write(out: Path, info: dict[str, Any], weight: torch.Tensor, bias: torch.Tensor) -> None:
    try:
        text = json.dumps(info, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise VisaeError(f"probe record is not JSON-serialisable: {exc}") from None
    data = safetensors_bytes(
        {"weight": weight.contiguous(), "bias": bias.contiguous()},
        metadata={"format": "pt", "visae_schema": str(SCHEMA_VERSION)},
    )
    with atomic_directory(out) as tmp:
        write_bytes(tmp / WEIGHTS_NAME, data)
        write_text(tmp / INFO_NAME, text + "\n")


def load_probe(path: str | os.PathLike[str]) -> ProbeHead:
    """The probe in folder `path` as a head, validated against the format."""
    directory = Path(path).expanduser()
    info_path, weights_path = directory / INFO_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise VisaeError(f"no probe folder at {directory}")
    for p in (info_path, weights_path):
        if not p.is_file():
            raise VisaeError(f"{directory} is not a probe: {p.name} is missing")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VisaeError(f"cannot read {info_path}: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise VisaeError(f"{info_path} is not a visae probe (format {FORMAT!r})")
    schema = info.get("schema_version")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise VisaeError(f"{info_path} has no positive integer schema_version")
    if schema > SCHEMA_VERSION:
        raise VisaeError(
            f"{info_path} has schema version {schema}, newer than this visae "
            f"({visae.__version__}) reads ({SCHEMA_VERSION}); upgrade visae"
        )
    for key in ("kind", "layer", "d", "classes", "backbone", "store", "config", "metrics"):
        if key not in info:
            raise VisaeError(f"{info_path} lacks the field {key!r}")
    if info["kind"] not in PROBE_KINDS:
        raise VisaeError(f"{info_path}: unknown probe kind {info['kind']!r}")
    ProbeConfig.from_dict(info["config"])
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise VisaeError(f"cannot read {weights_path}: {exc}") from None
    want = {"weight": (len(info["classes"]), info["d"]), "bias": (len(info["classes"]),)}
    for name, shape in want.items():
        t = tensors.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != torch.float32:
            got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
            raise VisaeError(f"{weights_path}: {name} must be float32 {list(shape)}, is {got}")
    info["path"] = str(directory)
    return ProbeHead(tensors["weight"], tensors["bias"], info)
