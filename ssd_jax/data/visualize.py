"""Pictures: batches (ground truth or predictions) as a PNG grid, detections drawn on an image,
precision/recall curves. Pillow and matplotlib only (no TensorFlow)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

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
    # a Figure of its own (Agg canvas): no pyplot state, no global backend change, so a notebook
    # that calls this keeps its inline plots
    fig = Figure(figsize=(3.2 * ncols, 3.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cmap = colormaps["tab20"]
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
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5,
                                       edgecolor=color))
            name = class_names[label - 1] if 0 < label <= len(class_names) else str(label)
            text = name if scores is None else f"{name} {float(scores[i][j]):.2f}"
            ax.text(x0, y0, text, fontsize=7, color="white", va="bottom",
                    bbox=dict(facecolor=color, alpha=0.8, pad=1, lw=0))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
            (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0), (170, 255, 195))


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    class_names: Sequence[str]) -> Image.Image:
    """The image with pixel corner boxes [N,4], 'name score' captions; colors by class."""
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    h, w = image.shape[:2]
    width = max(1, round(max(h, w) / 300))
    try:
        font = ImageFont.load_default(size=max(10, round(max(h, w) / 40)))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for box, label, score in zip(boxes, labels, scores):
        color = _PALETTE[int(label) % len(_PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
        name = class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(label)
        text = f"{name} {float(score):.2f}"
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y0 - th - 4 if y0 - th - 4 >= 0 else min(y1 + 1, h - th - 4)
        tx = max(0.0, min(x0, w - 1 - tw - 4))  # a box at the right edge: caption moved inside
        draw.rectangle((tx, ty, tx + tw + 4, ty + th + 4), fill=color)
        draw.text((tx + 2, ty + 2 - tb[1]), text, fill=(0, 0, 0) if sum(color) > 400 else
                  (255, 255, 255), font=font)
    return pil


def plot_pr_curves(class_names: Sequence[str], precision: Sequence[Any], recall: Sequence[Any],
                   aps: Sequence[float], path: str, title: str = "") -> str:
    """One precision/recall subplot per class (matplotlib, Agg), AP in the title; saved to path."""
    from matplotlib.figure import Figure

    n = len(class_names)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.6 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        p, r = precision[k], recall[k]
        if p is not None and len(p):
            # the envelope (what AP integrates) and the raw curve
            env = np.maximum.accumulate(np.asarray(p)[::-1])[::-1]
            ax.plot(r, p, color="0.7", lw=0.8)
            ax.step(r, env, where="post", color="tab:blue", lw=1.4)
        ap = aps[k]
        ax.set_title(f"{class_names[k]}: {'n/a' if math.isnan(ap) else f'{ap:.3f}'}",
                     fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("recall", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("precision", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
