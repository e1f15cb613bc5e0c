"""Draw batches (ground truth or predictions) as a PNG grid."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def save_sample_grid(
    batch: Mapping[str, np.ndarray], class_names: Sequence[str], path: str, *,
    scores: np.ndarray | None = None, score_threshold: float = 0.0, max_images: int = 16,
    ncols: int = 4,
) -> None:
    """Write a grid of images with their boxes and class names to `path` (PNG).

    Args:
      batch: "image" uint8 [b,S,S,3] RGB; "boxes" float [b,M,4] normalized corners
        (xmin, ymin, xmax, ymax); "labels" int [b,M] (0 = padding, label i -> class_names[i-1]);
        optional "mask" bool [b] (False entries are skipped) and "scores" float [b,M].
      class_names: names without background.
      scores: float [b,M] detection scores (overrides batch["scores"]); boxes with a score
        <= score_threshold are not drawn, and the score is printed after the name.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(batch["image"])
    boxes = np.asarray(batch["boxes"])
    labels = np.asarray(batch["labels"])
    scores = batch.get("scores") if scores is None else scores
    keep = np.arange(len(images))
    if "mask" in batch:
        keep = keep[np.asarray(batch["mask"], bool)]
    keep = keep[:max_images]
    n = max(len(keep), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, keep, strict=False):
        h, w = images[i].shape[:2]
        ax.imshow(images[i])
        for j in np.nonzero(labels[i] > 0)[0]:
            if scores is not None and scores[i][j] <= score_threshold:
                continue
            x0, y0, x1, y1 = boxes[i, j] * [w, h, w, h]
            label = int(labels[i, j])
            color = cmap((label - 1) % 20)
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5,
                                       edgecolor=color))
            name = class_names[label - 1] if 0 < label <= len(class_names) else str(label)
            text = name if scores is None else f"{name} {float(scores[i][j]):.2f}"
            ax.text(x0, y0, text, fontsize=7, color="white", va="bottom",
                    bbox=dict(facecolor=color, alpha=0.8, pad=1, lw=0))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
