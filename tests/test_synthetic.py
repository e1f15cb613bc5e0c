"""Tests of the procedural shapes dataset (ssd_jax.data.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ssd_jax.data import synthetic

S = 256


@pytest.fixture(scope="module")
def val_annotations() -> list[dict]:
    """Boxes and labels (no images) of val examples 0..499 at the default size."""
    out = []
    for i in range(500):
        ex = synthetic.generate_example(0, "val", i)
        out.append({"boxes": ex["boxes"], "labels": ex["labels"]})
    return out


def test_class_names_and_num_classes() -> None:
    assert len(synthetic.CLASS_NAMES) >= 5
    assert len(set(synthetic.CLASS_NAMES)) == len(synthetic.CLASS_NAMES)
    assert synthetic.NUM_CLASSES == len(synthetic.CLASS_NAMES) + 1


def test_example_format() -> None:
    ex = synthetic.generate_example(3, "train", 7)
    n = ex["labels"].shape[0]
    assert ex["image"].shape == (S, S, 3) and ex["image"].dtype == np.uint8
    assert ex["boxes"].shape == (n, 4) and ex["boxes"].dtype == np.float32
    assert ex["labels"].dtype == np.int32
    assert ex["difficult"].shape == (n,) and ex["difficult"].dtype == bool
    assert not ex["difficult"].any()
    assert isinstance(ex["image_id"], int)


def test_deterministic() -> None:
    a = synthetic.generate_example(5, "train", 11)
    b = synthetic.generate_example(5, "train", 11)
    for key in ("image", "boxes", "labels", "difficult"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["image_id"] == b["image_id"]


def test_different_index_split_seed_give_different_images() -> None:
    base = synthetic.generate_example(0, "train", 0)["image"]
    others = [
        synthetic.generate_example(0, "train", 1)["image"],
        synthetic.generate_example(0, "val", 0)["image"],
        synthetic.generate_example(1, "train", 0)["image"],
    ]
    for other in others:
        assert np.mean(base != other) > 0.5


def test_image_ids_unique_across_splits() -> None:
    train = synthetic.generate_split(0, "train", 3, image_size=64)["image_id"]
    val = synthetic.generate_split(0, "val", 3, image_size=64)["image_id"]
    np.testing.assert_array_equal(train, [0, 1, 2])
    assert len(set(train.tolist()) | set(val.tolist())) == 6


def _check_tight(seed: int, split: str, index: int, image_size: int) -> None:
    ex, owner = synthetic.generate_example_with_masks(seed, split, index, image_size)
    boxes, labels = ex["boxes"], ex["labels"]
    n = labels.shape[0]
    assert owner.shape == (image_size, image_size)
    assert owner.min() >= -1 and owner.max() < n
    px = boxes.astype(np.float64) * image_size
    np.testing.assert_allclose(px, np.round(px), atol=1e-3)  # exact to the pixel grid
    px = np.round(px).astype(int)
    for k in range(n):
        x0, y0, x1, y1 = px[k]
        assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
        mask = owner == k
        inside = mask[y0:y1, x0:x1]
        assert inside.sum() == mask.sum() > 0, f"object {k}: visible mask leaves its box"
        assert inside[0].any() and inside[-1].any(), f"object {k}: box not tight in y"
        assert inside[:, 0].any() and inside[:, -1].any(), f"object {k}: box not tight in x"


def test_boxes_tight_around_visible_masks() -> None:
    for i in range(30):
        _check_tight(0, "val", i, S)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    split=st.sampled_from(["train", "val"]),
    index=st.integers(0, 10**6),
    image_size=st.sampled_from([96, 128, 300]),
)
def test_boxes_tight_any_size(seed: int, split: str, index: int, image_size: int) -> None:
    _check_tight(seed, split, index, image_size)


def test_labels_counts_and_sizes(val_annotations: list[dict]) -> None:
    counts = np.array([a["labels"].shape[0] for a in val_annotations])
    assert counts.min() >= 1 and counts.max() <= synthetic.MAX_OBJECTS
    assert counts.mean() > 3.0  # mostly multi-object images
    assert np.bincount(counts, minlength=9)[1:].min() > 0  # every count 1..8 occurs
    labels = np.concatenate([a["labels"] for a in val_annotations])
    assert labels.min() >= 1 and labels.max() <= synthetic.NUM_CLASSES - 1
    boxes = np.concatenate([a["boxes"] for a in val_annotations])
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    wh = boxes[:, 2:] - boxes[:, :2]
    assert wh.min() >= 0.04 - 1e-6 and wh.max() <= 0.75
    longest = wh.max(1)
    assert np.mean(longest < 0.12) > 0.1  # small objects are common
    assert np.mean(longest > 0.4) > 0.05  # and large ones too


def test_class_balance(val_annotations: list[dict]) -> None:
    labels = np.concatenate([a["labels"] for a in val_annotations])
    freq = np.bincount(labels, minlength=synthetic.NUM_CLASSES)[1:]
    assert freq.min() >= 0.8 * freq.mean() and freq.max() <= 1.2 * freq.mean(), freq


def test_objects_overlap_sometimes(val_annotations: list[dict]) -> None:
    def any_overlap(b: np.ndarray) -> bool:
        lt = np.maximum(b[:, None, :2], b[None, :, :2])
        rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), -1)
        np.fill_diagonal(inter, 0)
        return bool((inter > 0).any())

    frac = np.mean([any_overlap(a["boxes"]) for a in val_annotations])
    assert 0.2 < frac < 0.95


def test_colour_does_not_decide_class() -> None:
    colours: dict[int, list[np.ndarray]] = {}
    for i in range(60):
        ex, owner = synthetic.generate_example_with_masks(1, "train", i, 128)
        for k, label in enumerate(ex["labels"]):
            colours.setdefault(int(label), []).append(ex["image"][owner == k].mean(0))
    assert set(colours) == set(range(1, synthetic.NUM_CLASSES))
    for label, cs in colours.items():
        assert np.stack(cs).std(0).min() > 40, (label, np.stack(cs).std(0))


def test_generate_split_layout() -> None:
    n, size = 6, 64
    split = synthetic.generate_split(2, "train", n, image_size=size)
    m = synthetic.MAX_OBJECTS
    assert split["image"].shape == (n, size, size, 3) and split["image"].dtype == np.uint8
    assert split["boxes"].shape == (n, m, 4) and split["boxes"].dtype == np.float32
    assert split["labels"].shape == (n, m) and split["labels"].dtype == np.int32
    assert split["num_boxes"].shape == (n,) and split["num_boxes"].dtype == np.int32
    assert split["image_id"].shape == (n,) and split["image_id"].dtype == np.int64
    for i in range(n):
        ex = synthetic.generate_example(2, "train", i, image_size=size)
        k = ex["labels"].shape[0]
        assert split["num_boxes"][i] == k
        np.testing.assert_array_equal(split["image"][i], ex["image"])
        np.testing.assert_array_equal(split["boxes"][i, :k], ex["boxes"])
        np.testing.assert_array_equal(split["labels"][i, :k], ex["labels"])
        assert (split["labels"][i, k:] == 0).all() and (split["boxes"][i, k:] == 0).all()
        assert (split["labels"][i, :k] > 0).all()
        assert split["image_id"][i] == ex["image_id"]


@pytest.mark.parametrize("processes", [1, 3])
def test_worker_processes_give_the_same_split(processes) -> None:
    """generate_split in worker processes (a shared buffer) equals the in-process loop, bit for
    bit, including the padding; an uneven share (7 over 3) covers every example once."""
    n, size = 7, 64
    here = synthetic.generate_split(3, "val", n, image_size=size)
    there = synthetic.generate_split(3, "val", n, image_size=size, processes=processes)
    assert set(there) == set(here)
    for k in here:
        assert there[k].dtype == here[k].dtype and there[k].shape == here[k].shape, k
        np.testing.assert_array_equal(there[k], here[k], err_msg=k)


def test_a_failing_worker_is_an_error(monkeypatch) -> None:
    import sys

    monkeypatch.setattr(sys, "executable", sys.executable + "-missing-interpreter")
    with pytest.raises((RuntimeError, OSError)):
        synthetic.generate_split(0, "train", 4, image_size=64, processes=2)
    monkeypatch.setattr(sys, "executable", "false")  # starts, exits 1
    with pytest.raises(RuntimeError, match="worker process failed"):
        synthetic.generate_split(0, "train", 4, image_size=64, processes=2)


def test_workers_stop_when_their_parent_dies(tmp_path) -> None:
    """A process killed while its workers generate leaves nothing running behind it."""
    import os
    import subprocess
    import sys
    import time

    script = (
        "import os, sys\n"
        "from ssd_jax.data import synthetic\n"
        "job = synthetic.SplitJob(0, 'train', 100000, image_size=64, processes=2)\n"
        "print(' '.join(str(p.pid) for p, _ in job._workers), flush=True)\n"
        "os.kill(os.getpid(), 9)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out

    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(running(p) for p in pids)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        synthetic.generate_example(0, "validation", 0)
    with pytest.raises(ValueError):
        synthetic.generate_example(-1, "train", 0)


def test_test_split_is_its_own_stream() -> None:
    """The held-out split shares no image and no id with train or val, for the same seed."""
    test = synthetic.generate_split(0, "test", 6, image_size=64)
    for split in ("train", "val"):
        other = synthetic.generate_split(0, split, 6, image_size=64)
        assert not set(test["image_id"]) & set(other["image_id"])
        for img in test["image"]:
            assert not any(np.array_equal(img, o) for o in other["image"])
    assert list(test["image_id"]) == [200_000_000 + i for i in range(6)]


def test_render_preview(tmp_path) -> None:
    path = tmp_path / "preview.png"
    synthetic.render_preview(str(path), seed=0, n=4, image_size=64)
    with Image.open(path) as im:
        assert im.size == (2 * 64 + 3 * 4, 2 * 64 + 3 * 4)


# ----------------------------------------------------------------------------- max_object_size


def test_max_object_size_bounds_every_shape() -> None:
    """With max_object_size=0.2 no full shape has a side over 0.2 of the image (so neither has a
    visible mask or box), and the sizes still spread from small to near the bound."""
    size, limit = 128, 0.2
    rng = np.random.default_rng(0)
    for label in range(1, synthetic.NUM_CLASSES):  # full (unoccluded) shapes, every class
        masks = [synthetic._shape_mask(rng, label, size, limit) for _ in range(60)]
        sides = [max(m.shape) for m in masks if m is not None]
        assert len(sides) > 40 and max(sides) <= limit * size, (label, max(sides))
    longest = []
    for i in range(12):
        ex, owner = synthetic.generate_example_with_masks(0, "train", i, size, max_object_size=limit)
        wh = ex["boxes"][:, 2:] - ex["boxes"][:, :2]
        assert wh.max() <= limit + 1e-6
        for k in range(len(ex["labels"])):
            rows, cols = np.nonzero(owner == k)
            assert max(np.ptp(rows), np.ptp(cols)) + 1 <= limit * size
        longest += wh.max(1).tolist()
    assert min(longest) < 0.1 and max(longest) > 0.15, longest


def test_default_max_object_size_is_unchanged() -> None:
    """The default is 0.70 (the constant of earlier versions: same draws, same images); another
    value gives other images, in worker processes the same as in this process."""
    assert synthetic.DEFAULT_MAX_OBJECT_SIZE == 0.70
    for seed, split, index in [(0, "val", 0), (3, "train", 7), (1, "test", 2)]:
        a = synthetic.generate_example(seed, split, index, 96)
        b = synthetic.generate_example(seed, split, index, 96, max_object_size=0.70)
        small = synthetic.generate_example(seed, split, index, 96, max_object_size=0.2)
        for key in ("image", "boxes", "labels"):
            np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(a["image"], small["image"])
    here = synthetic.generate_split(4, "train", 3, image_size=64, max_object_size=0.2)
    there = synthetic.generate_split(4, "train", 3, image_size=64, processes=2,
                                     max_object_size=0.2)
    for k in here:
        np.testing.assert_array_equal(there[k], here[k], err_msg=k)
    assert (here["boxes"][..., 2:] - here["boxes"][..., :2]).max() <= 0.2 + 1e-6


@pytest.mark.parametrize("value", [0.05, 0.01, 0.0, -0.3, 1.01, float("nan")])
def test_bad_max_object_size(value: float) -> None:
    with pytest.raises(ValueError, match=r"max_object_size must be in \(0.05, 1\]"):
        synthetic.generate_example(0, "train", 0, 64, max_object_size=value)
    with pytest.raises(ValueError, match="max_object_size"):
        synthetic.SplitJob(0, "train", 2, image_size=64, max_object_size=value)


def test_max_object_size_too_small_for_the_image() -> None:
    # 0.06 * 32 px rounds down to 1 px, under the 2 px shortest side a shape must have
    with pytest.raises(ValueError, match="max_object_size=0.06 is too small for image_size=32"):
        synthetic.generate_example(0, "train", 0, 32, max_object_size=0.06)
    # a whole-pixel size exists, but no polygon rasterizes to it: an error, not an endless loop
    with pytest.raises(RuntimeError, match="max_object_size=0.051 at image_size=192"):
        synthetic.generate_split(0, "train", 2, image_size=192, max_object_size=0.051)
    synthetic.generate_example(0, "train", 0, 64, max_object_size=1.0)  # the upper bound is valid
