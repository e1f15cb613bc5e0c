"""Shared test fixtures: random ground truth in the padded batch layout of DESIGN.md."""

from __future__ import annotations

import os

import numpy as np

# Tests run on the CPU with one device unless a test spawns its own subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:  # torch must load before TensorFlow in one process (the other order can segfault)
    import torch  # noqa: F401
except ImportError:
    pass


def random_boxes(rng: np.random.Generator, n: int, min_size: float = 0.03,
                 max_size: float = 0.6) -> np.ndarray:
    """n random normalized corner boxes, float32 [n, 4], inside the unit square."""
    wh = rng.uniform(min_size, max_size, size=(n, 2))
    lo = rng.uniform(0.0, 1.0, size=(n, 2)) * (1.0 - wh)
    return np.concatenate([lo, lo + wh], axis=1).astype(np.float32)


def random_gt_batch(rng: np.random.Generator, counts: list[int], max_boxes: int,
                    num_classes: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """Padded ground truth: boxes float32 [B, M, 4], labels int32 [B, M] (0 = padding)."""
    boxes = np.zeros((len(counts), max_boxes, 4), np.float32)
    labels = np.zeros((len(counts), max_boxes), np.int32)
    for i, n in enumerate(counts):
        boxes[i, :n] = random_boxes(rng, n)
        labels[i, :n] = rng.integers(1, num_classes, size=n)
    return boxes, labels
