"""What an edit did to a head, as text and as a before/after picture: shared by the CLI, the
study's examples and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def describe(head: Any, before: torch.Tensor, after: torch.Tensor, top: int) -> str:
    """The head's output before and after, as text."""
    if head.kind == "classification":
        from visae.heads.classifier import logit_changes, top_classes

        lines = []
        for name, scores in (("before", before), ("after", after)):
            # a multi-label head's probabilities are one sigmoid per label, not a softmax
            probs = (scores.sigmoid(), "probabilities") if head.multilabel else (scores, "logits")
            cells = ", ".join(
                f"{c['name']} {c['prob']:.3f}"
                for c in top_classes(probs[0], head.labels, top, outputs=probs[1])[0]
            )
            lines.append(f"{name:<7} {cells}")
        moved = logit_changes(before, after, head.labels, top)[0]
        lines.append(
            "moved   "
            + ", ".join(f"{c['name']} {c['before']:+.2f} -> {c['after']:+.2f}" for c in moved)
        )
        return "\n".join(lines)
    if before.shape[1] > 1:  # a segmentation: which class each patch gets
        was, now = before.argmax(1), after.argmax(1)
        changed = (was != now).float().mean()
        names = head.labels
        counts = ", ".join(
            f"{names[c]} {int((was == c).sum())} -> {int((now == c).sum())}"
            for c in torch.unique(torch.cat([was.flatten(), now.flatten()])).tolist()
        )
        return (
            f"{head.name}: {float(changed):.1%} of patches change class; "
            f"patches per class: {counts}"
        )
    diff = (after - before).abs()
    return (
        f"{head.name}: mean |change| {float(diff.mean()):.4f}, max {float(diff.max()):.4f}; "
        f"mean before {float(before.mean()):.4f}, after {float(after.mean()):.4f}"
    )


def plot_before_after(
    head: Any,
    view: Any,
    before: torch.Tensor,
    after: torch.Tensor,
    title: str,
    out: Path,
    top: int,
) -> Path:
    """The model's view of the image beside the head's output before and after the edit."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visae.atomic import write_bytes

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=100)
    axes[0].imshow(view)
    axes[0].set_title("input (model view)", fontsize=9)
    axes[0].axis("off")
    if head.kind == "classification":
        from visae.heads.classifier import top_classes

        for ax, name, scores in ((axes[1], "before", before), (axes[2], "after", after)):
            if head.multilabel:
                cls = top_classes(scores.sigmoid(), head.labels, top, outputs="probabilities")[0]
            else:
                cls = top_classes(scores, head.labels, top)[0]
            ax.barh([c["name"][:28] for c in cls][::-1], [c["prob"] for c in cls][::-1])
            ax.set_xlim(0, 1)
            ax.set_title(f"{head.name} {name}", fontsize=9)
            ax.tick_params(labelsize=7)
    else:
        classes = before.shape[1] > 1
        vmax = float(max(before.max(), after.max()))
        for ax, name, maps in ((axes[1], "before", before), (axes[2], "after", after)):
            ax.imshow(view)
            grid = (maps[0].argmax(0) if classes else maps[0, 0]).float().cpu().numpy()
            style = (
                {"cmap": "tab20", "vmin": 0, "vmax": 19, "interpolation": "nearest"}
                if classes
                else {"cmap": "magma", "vmin": 0, "vmax": vmax}
            )
            extent = (0, view.size[0], view.size[1], 0)
            ax.imshow(np.asarray(grid), alpha=0.55, extent=extent, **style)
            ax.set_title(f"{head.name} {name}", fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(out, buf.getvalue())
    return out
