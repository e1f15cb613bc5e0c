"""Procedural shapes detection dataset: deterministic by seed, no download.

Each image is a textured, cluttered background (gradients, stripes, blotches, pixel noise, random
lines, scribbles and small irregular blobs that are *not* labelled) with 1-8 labelled shapes of
six classes (``CLASS_NAMES``) in random colours, sizes, rotations and positions (the longest side
of a shape's full box log-uniform in 5-70% of the image side; ``max_object_size`` lowers the 70%).
Shapes may overlap each other and be truncated by the image border, but every labelled shape stays
substantially visible: at least half of its area, at least 60% of it inside the image, and a
visible box side of at least 4% of the image side. Placements that would break this are re-sampled.

The class is decided by shape only: colours are drawn independently of the class.

Conventions (those of every ssd_jax API):
  * images are RGB uint8 [S, S, 3];
  * boxes are corner form (xmin, ymin, xmax, ymax) normalized to [0, 1], tight around the *visible*
    pixels of each shape and exact to the pixel grid: ``xmin = min_col / S``,
    ``xmax = (max_col + 1) / S`` (same for y with rows);
  * labels are 1..NUM_CLASSES-1 (label of ``CLASS_NAMES[i]`` is ``i + 1``); 0 is background and,
    in padded arrays, "no box".

Randomness: one ``np.random.default_rng(SeedSequence([tag, seed, split_code, index]))`` per example,
so an example depends on (seed, split, index) only; train, val and test use different streams
(the training config gives the test split a seed of its own besides: config.dataset.test_seed). The pixel
noise is a random crop of a constant tile (fixed seed), which is what keeps generation near 3 ms
per 256x256 image on one core. Thread-safe (scratch buffers are per thread).

`generate_example_with_masks` also returns the per-pixel owner map (visible mask of each object),
for tests and debugging; `render_preview` draws a grid of examples with their boxes to a PNG.

Over 500 lines on purpose: the renderer and the worker processes that run it share the split's
seeding rule, which must stay one definition (the images are the same in-process or in workers).
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import subprocess
import sys
import tempfile
import threading
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES: tuple[str, ...] = ("circle", "rectangle", "triangle", "star", "cross", "ring")
NUM_CLASSES: int = len(CLASS_NAMES) + 1  # + background (label 0)
MAX_OBJECTS: int = 8  # padding size of generate_split; an image has 1..MAX_OBJECTS objects

_SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}
_STREAM_TAG = 0x55D5_1A7A  # separates this generator's streams from other users of the same seed
_VAL_ID_OFFSET = 100_000_000  # image_id = index (train) or _VAL_ID_OFFSET + index (val)
_TEST_ID_OFFSET = 200_000_000  # image_id = _TEST_ID_OFFSET + index (test)
_ID_OFFSETS: dict[str, int] = {"train": 0, "val": _VAL_ID_OFFSET, "test": _TEST_ID_OFFSET}

# Geometry limits, as fractions of the image side.
# The longest side of a shape's full (unoccluded) box is log-uniform in [MIN_OBJECT_SIZE,
# max_object_size] (an argument: config.dataset.max_object_size, default DEFAULT_MAX_OBJECT_SIZE).
MIN_OBJECT_SIZE: float = 0.05
DEFAULT_MAX_OBJECT_SIZE: float = 0.70
_MIN_FULL_SIDE = 0.045  # shortest side of a shape's full box
_MIN_VISIBLE_SIDE = 0.04  # shortest side of a shape's visible box
_MIN_VISIBLE_FRACTION = 0.5  # visible area / full area after occlusion by later shapes
_MIN_INSIDE_FRACTION = 0.6  # area inside the image / full area (truncation at the border)
_PLACEMENT_ATTEMPTS = 24
# Shape draws in a row outside the size limits before giving up (a max_object_size barely above
# MIN_OBJECT_SIZE leaves polygons no pixel size that fits; the default rejects under 1% of draws).
_MAX_SHAPE_DRAWS = 1000
_MIN_COLOR_DISTANCE = 90.0  # RGB euclidean distance to what a shape is drawn over


def check_max_object_size(max_object_size: float, image_size: int) -> None:
    """ValueError unless MIN_OBJECT_SIZE < max_object_size <= 1 and, at `image_size`, a shape's
    full box can be at most max_object_size and at least _MIN_FULL_SIDE of the side in whole
    pixels (else no shape would ever be accepted)."""
    if not MIN_OBJECT_SIZE < max_object_size <= 1.0:  # also rejects NaN
        raise ValueError(f"max_object_size must be in ({MIN_OBJECT_SIZE}, 1] (a fraction of the "
                         f"image side), got {max_object_size}")
    if math.floor(max_object_size * image_size) < math.ceil(_MIN_FULL_SIDE * image_size):
        raise ValueError(f"max_object_size={max_object_size} is too small for image_size="
                         f"{image_size}: shapes need a box side of at least "
                         f"{math.ceil(_MIN_FULL_SIDE * image_size)} px")


def _check_args(seed: int, split: str, index: int, image_size: int,
                max_object_size: float = DEFAULT_MAX_OBJECT_SIZE) -> None:
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    if seed < 0 or not 0 <= index < _VAL_ID_OFFSET:
        raise ValueError(f"need seed >= 0 and 0 <= index < {_VAL_ID_OFFSET}, got {seed}, {index}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    check_max_object_size(max_object_size, image_size)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence([_STREAM_TAG, int(seed), _SPLIT_CODES[split], int(index)])
    )


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Background and distractors


@functools.cache
def _noise_tile(size: int) -> np.ndarray:
    """A constant standard-normal field float32 [2S, 2S]; images take random crops of it.

    Drawing fresh per-pixel noise dominated the generation time; a fixed tile (computed once from
    a fixed seed, so still deterministic) cropped at a random offset looks the same.
    """
    tile = np.random.default_rng(_STREAM_TAG).standard_normal((2 * size, 2 * size), np.float32)
    tile.flags.writeable = False
    return tile


_WORKSPACE = threading.local()


def _workspace(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-thread scratch buffers: basis float32 [3, S, S], rgb float32 [3, S*S], uint8 [3, S*S].

    Reused across calls: allocating ~3 MB of temporaries per image made glibc return and re-map
    the memory every call, and the page faults cost more than the arithmetic.
    """
    bufs = getattr(_WORKSPACE, "bufs", None)
    if bufs is None or bufs[0].shape[1] != size:
        bufs = (
            np.empty((3, size, size), np.float32),
            np.empty((3, size * size), np.float32),
            np.empty((3, size * size), np.uint8),
        )
        _WORKSPACE.bufs = bufs
    return bufs


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, np.ndarray]:
    """A textured RGB background of side S: gradient + stripes/blotches/checker + pixel noise.

    Returns (image, noise): noise float32 [S, S] is the pixel noise (sigma in [0, 10]) that the
    objects get too; it lives in the per-thread workspace, valid until the next call.
    """
    basis, rgb, rgb_u8 = _workspace(size)
    proj, noise, texture = basis[0], basis[1], basis[2]
    oy, ox = (int(v) for v in rng.integers(0, size + 1, size=2))
    sigma = np.float32(rng.uniform(0.0, 10.0))
    np.multiply(_noise_tile(size)[oy : oy + size, ox : ox + size], sigma, out=noise)

    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    theta = rng.uniform(0.0, 2.0 * math.pi)
    cx, cy = math.cos(theta), math.sin(theta)
    lo = min(0.0, cx) + min(0.0, cy)  # x*cx + y*cy spans [lo, lo + |cx| + |cy|] on [0,1]^2
    scale = 1.0 / (abs(cx) + abs(cy))
    np.add.outer(coords * np.float32(cy * scale), coords * np.float32(cx * scale), out=proj)
    proj -= np.float32(lo * scale)  # now in [0, 1]
    c0, c1 = _random_color(rng), _random_color(rng)
    delta = (c1 - c0) * rng.uniform(0.2, 0.8)  # keep gradients moderate

    amp = np.zeros(3)
    kind = rng.integers(0, 4)
    if kind == 1:  # stripes of random orientation and period
        phi = rng.uniform(0.0, math.pi)
        freq = 2.0 * math.pi * size / rng.uniform(3.0, 24.0)
        np.add.outer(
            coords * np.float32(math.sin(phi) * freq),
            coords * np.float32(math.cos(phi) * freq),
            out=texture,
        )
        np.sin(texture, out=texture)
        if rng.random() < 0.5:
            np.sign(texture, out=texture)
        amp = rng.uniform(-40.0, 40.0, size=3)
    elif kind == 2:  # smooth blotches: low-resolution noise upsampled
        cells = int(rng.integers(3, 13))
        low = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
        blot = Image.fromarray(low, mode="F").resize((size, size), Image.Resampling.BILINEAR)
        texture[...] = np.asarray(blot)
        amp = rng.uniform(-50.0, 50.0, size=3)
    elif kind == 3:  # checkerboard of random cell size
        cell = int(rng.integers(4, 33))
        sign = ((np.arange(size) // cell) % 2).astype(np.float32) * 2.0 - 1.0
        np.multiply.outer(sign, sign, out=texture)
        amp = rng.uniform(-25.0, 25.0, size=3)
    else:
        texture[...] = 0.0

    # Mix the planes into RGB: [3, K] x [K, S*S] (einsum: no BLAS threads to wake).
    mix = np.stack([delta, np.ones(3), amp], axis=1).astype(np.float32)
    np.einsum("ck,kp->cp", mix, basis.reshape(3, size * size), out=rgb)
    rgb += (c0 + 0.5).astype(np.float32)[:, None]
    np.clip(rgb, 0.0, 255.0, out=rgb)
    np.copyto(rgb_u8, rgb, casting="unsafe")
    planes = [Image.frombytes("L", (size, size), p.tobytes()) for p in rgb_u8]
    return Image.merge("RGB", planes), noise


def _draw_distractors(rng: np.random.Generator, image: Image.Image) -> None:
    """Unlabelled clutter in place: straight lines, scribbles and small irregular blobs."""
    size = image.width
    draw = ImageDraw.Draw(image)

    def color() -> tuple[int, int, int]:
        return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]

    for _ in range(int(rng.integers(0, 7))):  # straight lines, often long
        p = rng.uniform(-0.1, 1.1, size=4) * size
        draw.line([float(v) for v in p], fill=color(), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 3))):  # scribbles: random-walk polylines
        n = int(rng.integers(3, 8))
        start = rng.uniform(0, size, size=2)
        steps = rng.normal(0.0, 0.06 * size, size=(n, 2))
        pts = np.cumsum(np.vstack([start, steps]), axis=0)
        draw.line([tuple(float(v) for v in pt) for pt in pts], fill=color(), width=1)
    for _ in range(int(rng.integers(0, 5))):  # small irregular blobs (2-4.5% of the side)
        n = int(rng.integers(6, 12))
        r = rng.uniform(0.01, 0.0225) * size
        ang = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=n))
        rad = r * rng.uniform(0.35, 1.0, size=n)
        c = rng.uniform(0, size, size=2)
        pts = np.stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)], axis=1)
        draw.polygon([tuple(float(v) for v in pt) for pt in pts], fill=color())


# ---------------------------------------------------------------------------------------------
# Shapes


def _unit_polygon(rng: np.random.Generator, name: str) -> np.ndarray:
    """Vertices [V, 2] (x, y) of a shape around the origin, before rotation and scaling."""
    if name == "rectangle":
        aspect = rng.uniform(1.0, 2.2)
        return np.array([[-aspect, -1], [aspect, -1], [aspect, 1], [-aspect, 1]], np.float64) / 2
    if name == "triangle":  # near-equilateral
        ang = math.pi / 2 + np.arange(3) * (2 * math.pi / 3) + rng.uniform(-0.14, 0.14, size=3)
        rad = rng.uniform(0.9, 1.1, size=3)
        return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    if name == "star":  # five points
        inner = rng.uniform(0.38, 0.5)
        ang = -math.pi / 2 + np.arange(10) * (math.pi / 5)
        rad = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    if name == "cross":  # plus sign with equal arms
        t = rng.uniform(0.17, 0.26)
        return np.array(
            [[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t],
             [t, 1], [-t, 1], [-t, t], [-1, t], [-1, -t], [-t, -t]],
            np.float64,
        )  # fmt: skip
    raise ValueError(name)


def _shape_mask(rng: np.random.Generator, label: int, image_size: int,
                max_object_size: float = DEFAULT_MAX_OBJECT_SIZE) -> np.ndarray | None:
    """Rasterizes one shape at a random size, rotation and subpixel phase.

    Returns its mask, bool [h, w] cropped tight to the shape (so h, w are its full box sides in
    pixels), or None if the sampled shape violates the size limits (the caller re-samples):
    longest side over max_object_size * image_size, or shortest under _MIN_FULL_SIDE of it.
    """
    name = CLASS_NAMES[label - 1]
    side = math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(max_object_size))) * image_size
    phase = rng.uniform(0.0, 1.0, size=2)
    if name in ("circle", "ring"):
        r = side / 2.0
        n = int(math.ceil(side)) + 2
        grid = np.arange(n, dtype=np.float32) + 0.5 - (n / 2.0 + phase[:, None])  # [2, n]
        d2 = grid[1][:, None] ** 2 + grid[0][None, :] ** 2
        mask = d2 <= r * r
        if name == "ring":
            mask &= d2 >= (r * rng.uniform(0.45, 0.65)) ** 2
    else:
        verts = _unit_polygon(rng, name)
        rot = rng.uniform(0.0, 2.0 * math.pi)
        c, s = math.cos(rot), math.sin(rot)
        verts = verts @ np.array([[c, s], [-s, c]])
        extent = (verts.max(0) - verts.min(0)).max()
        verts = verts * (side / extent)
        verts -= verts.min(0)
        verts += 1.0 + phase
        n = int(math.ceil(side)) + 3
        canvas = Image.new("L", (n, n), 0)
        # Pillow's integer coordinates are pixel centres: shift continuous coords by -0.5.
        ImageDraw.Draw(canvas).polygon([(x - 0.5, y - 0.5) for x, y in verts], fill=1)
        mask = np.asarray(canvas).astype(bool)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = bottom - top, right - left
    if max(h, w) > max_object_size * image_size or min(h, w) < _MIN_FULL_SIDE * image_size:
        return None
    return np.ascontiguousarray(mask[top:bottom, left:right])


def _visible_box(m: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) exclusive pixel box of a bool mask [h, w]; None if empty."""
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


class _Object:
    """A placed shape: its full mask and where it lies (clipped to the image)."""

    def __init__(self, label: int, mask: np.ndarray, y0: int, x0: int, size: int, color: Any):
        self.label = label
        self.full_area = int(mask.sum())
        h, w = mask.shape
        self.ya, self.yb = max(y0, 0), min(y0 + h, size)
        self.xa, self.xb = max(x0, 0), min(x0 + w, size)
        self.clip = mask[self.ya - y0 : self.yb - y0, self.xa - x0 : self.xb - x0]
        self.visible = int(self.clip.sum())
        self.color = color

    @property
    def region(self) -> tuple[slice, slice]:
        return slice(self.ya, self.yb), slice(self.xa, self.xb)


def _side_ok(box: tuple[int, int, int, int] | None, image_size: int) -> bool:
    if box is None:
        return False
    top, left, bottom, right = box
    return min(bottom - top, right - left) >= _MIN_VISIBLE_SIDE * image_size


def _occlusion_loss(
    cand: _Object, owner: np.ndarray, objects: list[_Object], size: int
) -> np.ndarray | None:
    """Pixels each earlier object would lose under `cand`, int [len(objects)].

    None if drawing `cand` on top would leave some earlier object not substantially visible.
    """
    under = owner[cand.region][cand.clip]
    under = under[under >= 0]
    lost = np.bincount(under, minlength=len(objects))
    for j in np.flatnonzero(lost):
        obj = objects[j]
        if obj.visible - lost[j] < _MIN_VISIBLE_FRACTION * obj.full_area:
            return None
        vis = owner[obj.region] == j
        # Clear the candidate's pixels inside obj's region.
        ya, yb = max(obj.ya, cand.ya), min(obj.yb, cand.yb)
        xa, xb = max(obj.xa, cand.xa), min(obj.xb, cand.xb)
        cut = cand.clip[ya - cand.ya : yb - cand.ya, xa - cand.xa : xb - cand.xa]
        vis[ya - obj.ya : yb - obj.ya, xa - obj.xa : xb - obj.xa] &= ~cut
        if not _side_ok(_visible_box(vis), size):
            return None
    return lost


def _pick_color(
    rng: np.random.Generator,
    image: np.ndarray,
    cand: _Object,
    objects: list[_Object],
    lost: np.ndarray,
) -> np.ndarray:
    """A random colour that contrasts with what `cand` is drawn over.

    Compared with the mean of the pixels under it (subsampled) and with the colours of the objects
    it overlaps (`lost` > 0).
    """
    ys, xs = cand.region
    under_px = image[ys.start : ys.stop : 3, xs.start : xs.stop : 3][cand.clip[::3, ::3]]
    refs = [under_px.mean(0)] if under_px.size else []
    refs += [objects[j].color for j in np.flatnonzero(lost)]
    if not refs:
        return _random_color(rng)
    ref = np.stack(refs)  # [R, 3]
    best, best_d = None, -1.0
    for _ in range(8):
        color = _random_color(rng)
        d = float(np.sqrt(((ref - color) ** 2).sum(-1)).min())
        if d >= _MIN_COLOR_DISTANCE:
            return color
        if d > best_d:
            best, best_d = color, d
    return best  # type: ignore[return-value]


def _paint(rng: np.random.Generator, image: np.ndarray, obj: _Object, noise: np.ndarray) -> None:
    """Fills obj's visible pixels of uint8 `image` [S, S, 3] in place.

    Colour: obj.color plus a mild linear gradient in a random direction, plus the image's noise.
    """
    h, w = obj.clip.shape
    ang = rng.uniform(0.0, 2.0 * math.pi)
    gx, gy = np.float32(math.cos(ang) / max(h, w)), np.float32(math.sin(ang) / max(h, w))
    t = np.arange(w, dtype=np.float32)[None, :] * gx + np.arange(h, dtype=np.float32)[:, None] * gy
    t = t[obj.clip]  # [P], in about [-1, 1]
    n = noise[obj.region][obj.clip]  # [P]
    delta = rng.uniform(-35.0, 35.0, size=3).astype(np.float32)
    fill = np.empty((t.shape[0], 3), np.float32)
    for ch in range(3):
        np.multiply(t, delta[ch], out=fill[:, ch])
        fill[:, ch] += n
    fill += obj.color + np.float32(0.5)
    np.clip(fill, 0.0, 255.0, out=fill)
    image[obj.region][obj.clip] = fill.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Public API


def _render(
    rng: np.random.Generator, image_size: int, max_object_size: float = DEFAULT_MAX_OBJECT_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns image uint8 [S,S,3], boxes float32 [N,4], labels int32 [N], owner int8 [S,S].

    ``owner[y, x]`` is the index (into boxes/labels) of the object visible at that pixel, or -1.
    max_object_size: the largest longest side of a shape's full box, a fraction of S.
    """
    size = image_size
    pil, noise = _background(rng, size)
    _draw_distractors(rng, pil)
    image = np.array(pil)  # uint8 [S,S,3], writable
    owner = np.full((size, size), -1, np.int8)
    objects: list[_Object] = []

    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        label = int(rng.integers(1, NUM_CLASSES))
        mask = None
        for attempt in range(_PLACEMENT_ATTEMPTS):
            if attempt % 6 == 0:  # a new size/rotation every few attempts
                mask = None
            draws = 0
            while mask is None:
                if draws == _MAX_SHAPE_DRAWS:
                    raise RuntimeError(
                        f"max_object_size={max_object_size} at image_size={size}: no "
                        f"{CLASS_NAMES[label - 1]} of a size that fits in {draws} draws "
                        f"(shapes are {MIN_OBJECT_SIZE}..max_object_size of the side); raise it")
                mask = _shape_mask(rng, label, size, max_object_size)
                draws += 1
            h, w = mask.shape
            # Mostly fully inside the image; sometimes truncated by the border.
            slack = 0.0 if rng.random() < 0.7 else 0.3
            y0 = int(rng.integers(-int(slack * h), size - h + int(slack * h) + 1))
            x0 = int(rng.integers(-int(slack * w), size - w + int(slack * w) + 1))
            cand = _Object(label, mask, y0, x0, size, None)
            if cand.visible < _MIN_INSIDE_FRACTION * cand.full_area:
                continue
            if not _side_ok(_visible_box(cand.clip), size):
                continue
            lost = _occlusion_loss(cand, owner, objects, size)
            if lost is None:
                continue
            cand.color = _pick_color(rng, image, cand, objects, lost)
            for obj, n_lost in zip(objects, lost.tolist(), strict=True):
                obj.visible -= n_lost
            owner[cand.region][cand.clip] = len(objects)
            _paint(rng, image, cand, noise)
            objects.append(cand)
            break

    if not objects:  # practically unreachable: a lone fully-inside shape always fits
        raise RuntimeError("synthetic generator placed no object")

    boxes = np.zeros((len(objects), 4), np.float32)
    for k, obj in enumerate(objects):
        box = _visible_box(owner[obj.region] == k)
        assert box is not None
        top, left, bottom, right = box
        boxes[k] = (obj.xa + left, obj.ya + top, obj.xa + right, obj.ya + bottom)
    boxes /= np.float32(size)
    labels = np.array([o.label for o in objects], np.int32)
    return image, boxes, labels, owner


def generate_example_with_masks(
    seed: int, split: str, index: int, image_size: int = 256,
    max_object_size: float = DEFAULT_MAX_OBJECT_SIZE,
) -> tuple[dict[str, Any], np.ndarray]:
    """Like `generate_example`, plus ``owner`` int8 [S, S]: the object index visible at each pixel.

    ``owner == k`` is the visible mask of object k (row k of boxes/labels); -1 where no labelled
    object is visible. Meant for tests and debugging.
    """
    max_object_size = float(max_object_size)
    _check_args(seed, split, index, image_size, max_object_size)
    image, boxes, labels, owner = _render(_rng(seed, split, index), image_size, max_object_size)
    image_id = index + _ID_OFFSETS[split]
    example = {
        "image": image,
        "boxes": boxes,
        "labels": labels,
        "difficult": np.zeros(labels.shape, bool),
        "image_id": image_id,
    }
    return example, owner


def generate_example(seed: int, split: str, index: int, image_size: int = 256,
                     max_object_size: float = DEFAULT_MAX_OBJECT_SIZE) -> dict[str, Any]:
    """One example, deterministic in (seed, split, index); no two splits share an image.

    Args:
      seed: non-negative dataset seed.
      split: "train", "val" or "test".
      index: example index in [0, 1e8).
      image_size: side S of the square image.
      max_object_size: the largest longest side of a shape's full (unoccluded) box, a fraction
        of S in (MIN_OBJECT_SIZE, 1]; the sides are log-uniform from MIN_OBJECT_SIZE. The default
        (DEFAULT_MAX_OBJECT_SIZE) gives the images of earlier versions bit for bit; another value
        gives other images (a visible box is never larger than its shape's full box).

    Returns:
      {"image": uint8 [S, S, 3] RGB,
       "boxes": float32 [N, 4] corner (xmin, ymin, xmax, ymax) normalized to [0, 1], tight to the
                visible pixels of each object (xmin = min_col / S, xmax = (max_col + 1) / S),
       "labels": int32 [N] in 1..NUM_CLASSES-1,
       "difficult": bool [N] (all False),
       "image_id": int (index for train, 100_000_000 + index for val, 200_000_000 + index for
                   test: unique across splits)},
      with 1 <= N <= MAX_OBJECTS; objects listed back to front (drawing order).
    """
    return generate_example_with_masks(seed, split, index, image_size, max_object_size)[0]


def _split_layout(num_examples: int, image_size: int) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    """(name, dtype, shape, byte offset) of each array of `generate_split`, packed in one buffer."""
    n, s = num_examples, image_size
    fields = [("image", np.uint8, (n, s, s, 3)), ("boxes", np.float32, (n, MAX_OBJECTS, 4)),
              ("labels", np.int32, (n, MAX_OBJECTS)), ("num_boxes", np.int32, (n,)),
              ("image_id", np.int64, (n,))]
    out, offset = [], 0
    for name, dtype, shape in fields:
        out.append((name, np.dtype(dtype), shape, offset))
        offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 64) * 64
    return out


def _split_arrays(buffer: Any, num_examples: int, image_size: int) -> dict[str, np.ndarray]:
    layout = _split_layout(num_examples, image_size)
    return {name: np.frombuffer(buffer, dtype, int(np.prod(shape)), offset).reshape(shape)
            for name, dtype, shape, offset in layout}


def _split_nbytes(num_examples: int, image_size: int) -> int:
    name, dtype, shape, offset = _split_layout(num_examples, image_size)[-1]
    return offset + int(np.prod(shape)) * dtype.itemsize


def _fill(arrays: dict[str, np.ndarray], seed: int, split: str, lo: int, hi: int,
          image_size: int, parent: int | None = None,
          max_object_size: float = DEFAULT_MAX_OBJECT_SIZE) -> None:
    """Examples lo..hi-1 of a split into `arrays` (the layout of `generate_split`); images whose
    array is smaller than `image_size` are resized to it with `ssd_jax.image.resize`."""
    from ssd_jax import image as image_lib  # numpy and Pillow only

    store = arrays["image"].shape[1]
    for i in range(lo, hi):
        if parent is not None and os.getppid() != parent:
            raise SystemExit("ssd_jax synthetic worker: the process that started it is gone")
        ex = generate_example(seed, split, i, image_size, max_object_size)
        n = ex["labels"].shape[0]
        arrays["image"][i] = ex["image"] if store == image_size else image_lib.resize(
            ex["image"], store)
        arrays["boxes"][i, :n] = ex["boxes"]
        arrays["labels"][i, :n] = ex["labels"]
        arrays["num_boxes"][i] = n
        arrays["image_id"][i] = ex["image_id"]


def _worker_main() -> None:
    """Entry of a worker process (`SplitJob`): fills examples [lo, hi) of the split into the
    shared buffer it inherited as file descriptor `fd`."""
    (fd, seed, split, lo, hi, num_examples, image_size, store_size, max_object_size,
     parent) = sys.argv[1:]
    nbytes = _split_nbytes(int(num_examples), int(store_size))
    with mmap.mmap(int(fd), nbytes) as buffer:
        arrays = _split_arrays(buffer, int(num_examples), int(store_size))
        _fill(arrays, int(seed), split, int(lo), int(hi), int(image_size), parent=int(parent),
              max_object_size=float(max_object_size))
        del arrays


class SplitJob:
    """`generate_split` running in the background: `result()` waits for its arrays.

    With processes >= 1 (and Linux's memfd_create), that many worker processes each render a
    contiguous share of the examples straight into one shared anonymous buffer (no copies, no
    file, nothing left behind if this process dies: a worker exits when its parent is gone).
    The workers are fresh interpreters that import only numpy and Pillow (never the caller's
    `__main__`). Otherwise (processes=0) `result()` generates in this process. Same arrays, bit
    for bit, either way: each example depends on (seed, split, index) only.
    """

    def __init__(self, seed: int, split: str, num_examples: int, image_size: int = 256,
                 processes: int = 0, store_size: int | None = None,
                 max_object_size: float = DEFAULT_MAX_OBJECT_SIZE):
        max_object_size = float(max_object_size)
        _check_args(seed, split, 0, image_size, max_object_size)
        self.store_size = int(store_size or image_size)
        if not 1 <= self.store_size <= image_size:
            raise ValueError(f"store_size must be in 1..image_size, got {store_size}")
        self.args = (int(seed), split, int(num_examples), int(image_size))
        self.max_object_size = max_object_size
        self._arrays: dict[str, np.ndarray] | None = None
        self._workers: list[tuple[subprocess.Popen, Any]] = []
        n = int(num_examples)
        processes = min(int(processes), n)
        if processes < 1 or not hasattr(os, "memfd_create"):
            return
        nbytes = _split_nbytes(n, self.store_size)
        fd = os.memfd_create("ssd_jax_synthetic")
        try:
            os.ftruncate(fd, nbytes)
            self._buffer = mmap.mmap(fd, nbytes)
            package_root = os.path.dirname(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            bounds = [n * k // processes for k in range(processes + 1)]
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                err = tempfile.TemporaryFile()
                cmd = [sys.executable, "-c",
                       "from ssd_jax.data.synthetic import _worker_main; _worker_main()",
                       str(fd), str(seed), split, str(lo), str(hi), str(n), str(image_size),
                       str(self.store_size), repr(max_object_size), str(os.getpid())]
                self._workers.append((subprocess.Popen(
                    cmd, pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=err), err))
        except BaseException:
            self.cancel()
            raise
        finally:
            os.close(fd)  # the workers hold their own copies; the mapping keeps the buffer

    def result(self) -> dict[str, np.ndarray]:
        """The arrays of `generate_split` (waits for the workers; RuntimeError if one failed)."""
        if self._arrays is not None:
            return self._arrays
        seed, split, n, size = self.args
        if not self._workers:
            arrays = {name: np.zeros(shape, dtype)
                      for name, dtype, shape, _ in _split_layout(n, self.store_size)}
            _fill(arrays, seed, split, 0, n, size, max_object_size=self.max_object_size)
        else:
            try:
                for proc, err in self._workers:
                    if proc.wait() != 0:
                        err.seek(0)
                        tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
                        raise RuntimeError(
                            f"a synthetic-data worker process failed (exit {proc.returncode}) "
                            f"generating {split} images: " + " | ".join(tail))
            except BaseException:
                self.cancel()
                raise
            for _, err in self._workers:
                err.close()
            self._workers = []
            arrays = _split_arrays(self._buffer, n, self.store_size)
        self._arrays = arrays
        return arrays

    def cancel(self) -> None:
        """Stops the workers (if any are still running)."""
        for proc, err in self._workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()
        self._workers = []


def generate_split(
    seed: int, split: str, num_examples: int, image_size: int = 256, processes: int = 0,
    store_size: int | None = None, max_object_size: float = DEFAULT_MAX_OBJECT_SIZE,
) -> dict[str, np.ndarray]:
    """Examples 0..num_examples-1 of a split, stacked and padded to MAX_OBJECTS boxes.

    processes >= 1 renders them in that many worker processes (`SplitJob`); the arrays are the
    same bit for bit. store_size < image_size keeps each image resized to that side
    (`ssd_jax.image.resize`, the evaluation's bilinear resize) instead: a training table held at
    the model's input size. max_object_size: as in `generate_example`.

    Returns:
      {"image": uint8 [N, S, S, 3] (S = store_size or image_size),
       "boxes": float32 [N, MAX_OBJECTS, 4] normalized corners, zero rows for padding,
       "labels": int32 [N, MAX_OBJECTS], 0 for padding (padding always after the real boxes),
       "num_boxes": int32 [N],
       "image_id": int64 [N]}.
    """
    return SplitJob(seed, split, num_examples, image_size, processes, store_size,
                    max_object_size).result()


def render_preview(
    path: str, seed: int = 0, n: int = 16, split: str = "val", image_size: int = 256,
    max_object_size: float = DEFAULT_MAX_OBJECT_SIZE,
) -> None:
    """Writes a PNG grid of the first `n` examples of a split with boxes and class names drawn."""
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    pad = 4
    sheet = Image.new("RGB", (cols * (image_size + pad) + pad, rows * (image_size + pad) + pad))
    palette = [(255, 0, 0), (0, 255, 0), (0, 128, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]
    for i in range(n):
        ex = generate_example(seed, split, i, image_size, max_object_size)
        tile = Image.fromarray(ex["image"])
        draw = ImageDraw.Draw(tile)
        for box, label in zip(ex["boxes"], ex["labels"], strict=True):
            x0, y0, x1, y1 = (box * image_size).tolist()
            color = palette[(int(label) - 1) % len(palette)]
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=1)
            text = CLASS_NAMES[int(label) - 1]
            tw = draw.textlength(text)
            ty = y0 - 11 if y0 >= 11 else min(y1, image_size - 11)  # above, else below the box
            draw.rectangle([x0, ty, x0 + tw + 2, ty + 10], fill=(0, 0, 0))
            draw.text((x0 + 1, ty), text, fill=color)
        r, c = divmod(i, cols)
        sheet.paste(tile, (pad + c * (image_size + pad), pad + r * (image_size + pad)))
    sheet.save(path)
