"""Dataset sources behind one example contract.

Every source yields examples (as TF tensors inside tf.data) of the form

    image       uint8 [H,W,3] RGB
    boxes       float32 [N,4] corner form (xmin, ymin, xmax, ymax), normalized to [0, 1]
    labels      int32 [N] in 1..C-1 (0 is background, never a label)
    difficult   bool [N]
    iscrowd     bool [N] (COCO crowd regions; always False elsewhere; never in training)
    image_id    int64 []

and names its classes (`class_names`, without background; label i is class_names[i-1]).

Kinds (`config.dataset.kind`):
  * `synthetic`: ssd_jax.data.synthetic shapes, generated once into memory (optional .npz cache).
  * `coco_json`: a COCO-format annotation file and an image folder.
  * `voc_xml`: a Pascal VOC-style folder (Annotations/*.xml, JPEGImages/, ImageSets/Main/*.txt).
  * `tfds`: TFDS `voc/2007`, `voc/2012`, `coco/2017`; several joined with "+" (the paper's 07+12
    is name="voc/2007+voc/2012", train_split="trainval").

The first three are *tables*: annotations held in memory as numpy arrays (ragged by row_splits),
images decoded on demand by index, so the pipeline has random access. Annotation problems are
repaired here once and counted (`Table.stats`): out-of-range boxes clipped, degenerate boxes
dropped, annotations of missing image files dropped, images without objects kept as negatives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Any

import numpy as np
from absl import logging

from ssd_jax.data.tf_compat import tf

KINDS = ("synthetic", "coco_json", "voc_xml", "tfds")
_MIN_BOX_SIDE = 1e-4  # boxes thinner than this (normalized) after clipping are degenerate


@dataclasses.dataclass
class Table:
    """Annotations of N images, boxes ragged by `row_splits` [N+1].

    Either `paths` (str [N], image files) or `images` (uint8 [N,S,S,3], in memory) is set.
    boxes float32 [T,4] normalized corners; labels int32 [T]; difficult, iscrowd bool [T];
    image_id int64 [N].
    """

    class_names: tuple[str, ...]
    image_id: np.ndarray
    row_splits: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    iscrowd: np.ndarray
    paths: np.ndarray | None = None
    images: np.ndarray | None = None
    stats: Counter = dataclasses.field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.image_id)


class _TableBuilder:
    """Collects per-image annotations, repairing boxes and counting what it repaired."""

    def __init__(self, *, keep_crowd: bool):
        self.keep_crowd = keep_crowd
        self.ids: list[int] = []
        self.paths: list[str] = []
        self.splits = [0]
        self.boxes: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.difficult: list[np.ndarray] = []
        self.iscrowd: list[np.ndarray] = []
        self.stats: Counter = Counter()

    def add(self, image_id: int, path: str, boxes, labels, difficult=None, iscrowd=None) -> None:
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        n = len(boxes)
        labels = np.asarray(labels, np.int32).reshape(n)
        difficult = np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool)
        iscrowd = np.zeros(n, bool) if iscrowd is None else np.asarray(iscrowd, bool)
        if not self.keep_crowd and iscrowd.any():
            self.stats["crowd_boxes_excluded"] += int(iscrowd.sum())
            keep = ~iscrowd
            boxes, labels, difficult, iscrowd = boxes[keep], labels[keep], difficult[keep], iscrowd[keep]
        boxes, keep = repair_boxes(boxes, self.stats)
        labels, difficult, iscrowd = labels[keep], difficult[keep], iscrowd[keep]
        if len(boxes) == 0:
            self.stats["images_without_objects"] += 1
        self.ids.append(int(image_id))
        self.paths.append(path)
        self.boxes.append(boxes)
        self.labels.append(labels)
        self.difficult.append(difficult)
        self.iscrowd.append(iscrowd)
        self.splits.append(self.splits[-1] + len(boxes))

    def build(self, class_names: tuple[str, ...], *, what: str) -> Table:
        if not self.ids:
            raise ValueError(f"{what}: no usable images")
        cat = lambda xs, dt, shape: (np.concatenate(xs).astype(dt) if xs else np.zeros(shape, dt))
        return Table(
            class_names=tuple(class_names),
            image_id=np.asarray(self.ids, np.int64),
            row_splits=np.asarray(self.splits, np.int64),
            boxes=cat(self.boxes, np.float32, (0, 4)).reshape(-1, 4),
            labels=cat(self.labels, np.int32, (0,)),
            difficult=cat(self.difficult, bool, (0,)),
            iscrowd=cat(self.iscrowd, bool, (0,)),
            paths=np.asarray(self.paths, object),
            stats=self.stats,
        )


def repair_boxes(boxes: np.ndarray, stats: Counter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clip normalized corner boxes [N,4] to [0,1] and drop degenerate ones (also NaN).

    Returns (boxes [K,4], keep mask [N]); counts `boxes_clipped`, `boxes_degenerate_dropped`.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    clipped = np.clip(np.nan_to_num(boxes), 0.0, 1.0)
    keep = finite & (clipped[:, 2] - clipped[:, 0] > _MIN_BOX_SIDE) & (
        clipped[:, 3] - clipped[:, 1] > _MIN_BOX_SIDE)
    if stats is not None:
        stats["boxes_clipped"] += int((keep & (clipped != boxes).any(axis=1)).sum())
        stats["boxes_degenerate_dropped"] += int((~keep).sum())
    return clipped[keep], keep


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
    return default if value is None else value


def _require(cfg: Any, name: str, kind: str) -> Any:
    value = _get(cfg, name)
    if value in (None, ""):
        raise ValueError(f"config.dataset.{name} is required for kind={kind!r}")
    return value


def _list_dir(path: str) -> set[str]:
    if not tf.io.gfile.isdir(path):
        raise FileNotFoundError(f"image folder not found: {path}")
    return set(tf.io.gfile.listdir(path))


# ------------------------------------------------------------------------------------------
# synthetic


def synthetic_table(cfg: Any, split: str) -> Table:
    """`generate_split` of ssd_jax.data.synthetic held in memory; split is 'train' or 'eval'."""
    from ssd_jax.data import synthetic

    seed = int(_get(cfg, "seed", 0))
    n = int(_get(cfg, f"num_{split}", 256 if split == "train" else 64))
    size = int(_get(cfg, "image_size", 256))
    syn_split = "train" if split == "train" else "val"
    cache_dir = _get(cfg, "cache_dir", "")
    data = None
    cache = os.path.join(cache_dir, f"synthetic_{seed}_{syn_split}_{n}_{size}.npz") if cache_dir else ""
    if cache and tf.io.gfile.exists(cache):
        with tf.io.gfile.GFile(cache, "rb") as f:
            data = dict(np.load(io.BytesIO(f.read())))
    if data is None:
        data = synthetic.generate_split(seed, syn_split, n, image_size=size)
        if cache:
            tf.io.gfile.makedirs(cache_dir)
            buf = io.BytesIO()
            np.savez(buf, **data)
            with tf.io.gfile.GFile(cache, "wb") as f:
                f.write(buf.getvalue())
    names = tuple(synthetic.CLASS_NAMES)
    builder = _TableBuilder(keep_crowd=True)
    for i in range(n):
        k = int(data["num_boxes"][i])
        builder.add(int(data["image_id"][i]), "", data["boxes"][i, :k], data["labels"][i, :k])
    table = builder.build(names, what=f"synthetic {split}")
    table.paths = None
    table.images = np.ascontiguousarray(data["image"])
    return table


# ------------------------------------------------------------------------------------------
# COCO json


def coco_json_table(annotations: str, images_dir: str, *, keep_crowd: bool) -> Table:
    """COCO-format `annotations` (json) + `images_dir`. Category ids (sorted) map to 1..K."""
    if not tf.io.gfile.exists(annotations):
        raise FileNotFoundError(f"COCO annotation file not found: {annotations}")
    with tf.io.gfile.GFile(annotations, "r") as f:
        try:
            coco = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{annotations}: not valid JSON ({e})") from e
    if not isinstance(coco, dict) or "images" not in coco or "categories" not in coco:
        raise ValueError(f"{annotations}: not a COCO annotation file (needs 'images', 'categories')")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
    names = tuple(c["name"] for c in cats)
    present = _list_dir(images_dir)
    per_image: dict[int, list[dict]] = {}
    for a in coco.get("annotations", []):
        per_image.setdefault(a["image_id"], []).append(a)
    builder = _TableBuilder(keep_crowd=keep_crowd)
    for img in coco["images"]:
        fname = img["file_name"]
        if fname not in present:
            builder.stats["missing_image_files"] += 1
            continue
        w, h = float(img.get("width") or 0), float(img.get("height") or 0)
        if w <= 0 or h <= 0:
            w, h = _image_size(os.path.join(images_dir, fname))
            if w <= 0:
                builder.stats["undecodable_images_skipped"] += 1
                continue
        boxes, labels, crowd = [], [], []
        for a in per_image.get(img["id"], []):
            if a.get("category_id") not in cat_to_label or len(a.get("bbox", ())) != 4:
                builder.stats["annotations_invalid_dropped"] += 1
                continue
            x, y, bw, bh = (float(v) for v in a["bbox"])
            boxes.append([x / w, y / h, (x + bw) / w, (y + bh) / h])
            labels.append(cat_to_label[a["category_id"]])
            crowd.append(bool(a.get("iscrowd", 0)))
        builder.add(img["id"], os.path.join(images_dir, fname), boxes, labels, iscrowd=crowd)
    return builder.build(names, what=f"{annotations}")


def _image_size(path: str) -> tuple[float, float]:
    """(width, height) from the image header, (0, 0) if unreadable."""
    from PIL import Image

    try:
        with tf.io.gfile.GFile(path, "rb") as f, Image.open(f) as im:
            return float(im.width), float(im.height)
    except Exception:  # noqa: BLE001 - any unreadable file is "no size"
        return 0.0, 0.0


# ------------------------------------------------------------------------------------------
# VOC xml


def voc_class_names(root: str, splits: list[str]) -> tuple[str, ...]:
    """Sorted object names found in the annotations of `splits` (VOC's 20 classes come out in
    the standard order, which is alphabetical)."""
    names: set[str] = set()
    for split in splits:
        for stem in _voc_ids(root, split):
            path = os.path.join(root, "Annotations", stem + ".xml")
            if tf.io.gfile.exists(path):
                try:
                    tree = ET.fromstring(tf.io.gfile.GFile(path, "rb").read())
                except ET.ParseError:
                    continue
                names.update((o.findtext("name") or "").strip() for o in tree.iter("object"))
    names.discard("")
    if not names:
        raise ValueError(f"{root}: no object names found in Annotations/ for splits {splits}")
    return tuple(sorted(names))


def _voc_ids(root: str, split: str) -> list[str]:
    path = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"VOC split file not found: {path}")
    with tf.io.gfile.GFile(path, "r") as f:
        return [line.split()[0] for line in f if line.strip()]


def _image_id(stem: str) -> int:
    digits = re.sub(r"\D", "", stem)
    if digits and len(digits) < 18:
        return int(digits)
    return int.from_bytes(hashlib.sha1(stem.encode()).digest()[:7], "big")


def voc_xml_table(root: str, split: str, class_names: tuple[str, ...], *,
                  use_difficult: bool = True) -> Table:
    """Pascal VOC folder -> Table. Pixel boxes (1-based, inclusive) -> normalized corners."""
    ann_dir = os.path.join(root, "Annotations")
    if not tf.io.gfile.isdir(ann_dir):
        raise FileNotFoundError(f"VOC annotation folder not found: {ann_dir}")
    present = _list_dir(os.path.join(root, "JPEGImages"))
    to_label = {n: i + 1 for i, n in enumerate(class_names)}
    builder = _TableBuilder(keep_crowd=True)
    for stem in _voc_ids(root, split):
        path = os.path.join(ann_dir, stem + ".xml")
        try:
            tree = ET.fromstring(tf.io.gfile.GFile(path, "rb").read())
        except (tf.errors.NotFoundError, ET.ParseError):
            builder.stats["annotations_unreadable_skipped"] += 1
            continue
        fname = tree.findtext("filename") or stem + ".jpg"
        if fname not in present:
            fname = stem + ".jpg"
        if fname not in present:
            builder.stats["missing_image_files"] += 1
            continue
        image_path = os.path.join(root, "JPEGImages", fname)
        try:
            w = float(tree.findtext("size/width") or 0)
            h = float(tree.findtext("size/height") or 0)
        except ValueError:
            w = h = 0.0
        if w <= 0 or h <= 0:
            w, h = _image_size(image_path)
            if w <= 0:
                builder.stats["undecodable_images_skipped"] += 1
                continue
        boxes, labels, difficult = [], [], []
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            diff = (obj.findtext("difficult") or "0").strip() == "1"
            if name not in to_label:
                builder.stats["annotations_unknown_class_dropped"] += 1
                continue
            if diff and not use_difficult:
                continue
            try:
                x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}")) for k in
                                  ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                builder.stats["annotations_invalid_dropped"] += 1
                continue
            boxes.append([(x0 - 1) / w, (y0 - 1) / h, x1 / w, y1 / h])
            labels.append(to_label[name])
            difficult.append(diff)
        builder.add(_image_id(stem), image_path, boxes, labels, difficult=difficult)
    return builder.build(class_names, what=f"{root} split {split}")


# ------------------------------------------------------------------------------------------
# TFDS


@dataclasses.dataclass
class TfdsSource:
    """One or more TFDS datasets ("+"-joined `name`) read sequentially; images decoded late."""

    names: tuple[str, ...]
    data_dir: str | None
    class_names: tuple[str, ...]
    builders: tuple[Any, ...]

    def num_examples(self, split: str, *, count: bool = False) -> int | None:
        """Examples in `split` (TFDS split syntax) over all datasets; from the metadata, else
        (count=True) by reading the records, else None."""
        try:
            return sum(int(b.info.splits[split].num_examples) for b in self.builders)
        except (KeyError, ValueError):
            if not count:
                return None
        import tensorflow_datasets as tfds

        total = 0
        for b in self.builders:
            ds = b.as_dataset(split=split, decoders=tfds.decode.PartialDecoding(
                {"image/filename": True}))
            total += int(ds.reduce(0, lambda n, _: n + 1))
        return total

    def dataset(self, split: str, *, process_index: int = 0, process_count: int = 1,
                keep_crowd: bool, use_difficult: bool = True) -> tf.data.Dataset:
        """Examples with `image` still encoded (string) in `encoded`; boxes in our contract,
        clipped to [0,1], degenerate ones dropped (counted in `stat_*` fields)."""
        import tensorflow_datasets as tfds

        parts = []
        for builder in self.builders:
            sub = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
            ds = builder.as_dataset(split=sub, shuffle_files=False,
                                    decoders={"image": tfds.decode.SkipDecoding()})
            parts.append(ds.map(lambda ex: _standardize_tfds(ex, keep_crowd, use_difficult)))
        ds = parts[0]
        for p in parts[1:]:
            ds = ds.concatenate(p)
        return ds


def _standardize_tfds(ex: dict, keep_crowd: bool, use_difficult: bool) -> dict:
    objects = ex["objects"]
    bbox = tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4])
    n = tf.shape(bbox)[0]
    boxes = tf.gather(bbox, [1, 0, 3, 2], axis=1)  # (ymin,xmin,ymax,xmax) -> corners
    labels = tf.cast(objects["label"], tf.int32) + 1
    difficult = tf.cast(objects.get("is_difficult", tf.zeros([n], tf.bool)), tf.bool)
    iscrowd = tf.cast(objects.get("is_crowd", tf.zeros([n], tf.bool)), tf.bool)
    clipped = tf.clip_by_value(boxes, 0.0, 1.0)
    finite = tf.reduce_all(tf.math.is_finite(boxes), axis=1)
    keep = finite & (clipped[:, 2] - clipped[:, 0] > _MIN_BOX_SIDE) & (
        clipped[:, 3] - clipped[:, 1] > _MIN_BOX_SIDE)
    n_clipped = tf.reduce_sum(tf.cast(keep & tf.reduce_any(clipped != boxes, axis=1), tf.int32))
    n_dropped = n - tf.reduce_sum(tf.cast(keep, tf.int32))
    boxes = clipped
    if not keep_crowd:
        keep &= ~iscrowd
    if not use_difficult:
        keep &= ~difficult
    if "image/id" in ex:
        image_id = tf.cast(ex["image/id"], tf.int64)
    else:  # VOC: digits of the file name (2008_000123.jpg -> 2008000123)
        fname = ex["image/filename"]
        digits = tf.strings.substr(tf.strings.regex_replace(
            tf.strings.regex_replace(fname, r"\.[^.]*$", ""), r"\D", ""), 0, 17)
        image_id = tf.cond(tf.strings.length(digits) > 0,
                           lambda: tf.strings.to_number(digits, tf.int64),
                           lambda: tf.strings.to_hash_bucket_fast(fname, 2**53))
    return {
        "encoded": ex["image"], "image_id": image_id,
        "boxes": tf.boolean_mask(boxes, keep), "labels": tf.boolean_mask(labels, keep),
        "difficult": tf.boolean_mask(difficult, keep), "iscrowd": tf.boolean_mask(iscrowd, keep),
        "stat_boxes_clipped": n_clipped, "stat_boxes_degenerate_dropped": n_dropped,
    }


def tfds_source(cfg: Any) -> TfdsSource:
    import tensorflow_datasets as tfds

    name = _require(cfg, "name", "tfds")
    names = tuple(n.strip() for n in (name.split("+") if isinstance(name, str) else name))
    data_dir = _get(cfg, "data_dir") or None
    builders, class_names = [], None
    for n in names:
        try:
            builder = tfds.builder(n, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 - tfds raises several types for unknown names
            raise ValueError(f"config.dataset.name: unknown TFDS dataset {n!r} ({e})") from e
        feat = builder.info.features["objects"]["label"]
        names_n = tuple(feat.names)
        if class_names is not None and names_n != class_names:
            raise ValueError(f"TFDS datasets {names} have different class names")
        class_names = names_n
        builders.append(builder)
    return TfdsSource(names, data_dir, class_names, tuple(builders))


# ------------------------------------------------------------------------------------------
# entry point

_CACHE: dict[tuple[str, str], Any] = {}


def _cfg_key(cfg: Any) -> str:
    if hasattr(cfg, "to_json"):
        return cfg.to_json()
    return json.dumps(dict(cfg), sort_keys=True, default=str)


def load_source(cfg: Any, split: str) -> Table | TfdsSource:
    """The source of `split` ('train' or 'eval') for dataset config `cfg` (cached per config).

    Raises ValueError / FileNotFoundError naming the field or path when the dataset is unusable.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    kind = _get(cfg, "kind")
    if kind not in KINDS:
        raise ValueError(f"config.dataset.kind must be one of {KINDS}, got {kind!r}")
    key = (_cfg_key(cfg), split if kind != "tfds" else "")
    if key in _CACHE:
        return _CACHE[key]
    keep_crowd = split == "eval"
    if kind == "synthetic":
        src = synthetic_table(cfg, split)
    elif kind == "coco_json":
        src = coco_json_table(_require(cfg, f"{split}_annotations", kind),
                              _require(cfg, f"{split}_images", kind), keep_crowd=keep_crowd)
    elif kind == "voc_xml":
        root = _require(cfg, "root", kind)
        if not tf.io.gfile.isdir(root):
            raise FileNotFoundError(f"config.dataset.root: VOC folder not found: {root}")
        names = _get(cfg, "class_names")
        if names:
            names = tuple(names)
        else:
            splits = [_get(cfg, "train_split", "trainval"), _get(cfg, "eval_split", "test")]
            names = voc_class_names(root, [s for s in splits if _voc_split_exists(root, s)])
        split_name = _get(cfg, f"{split}_split", "trainval" if split == "train" else "test")
        use_difficult = bool(_get(cfg, "use_difficult", True)) or split == "eval"
        src = voc_xml_table(root, split_name, names, use_difficult=use_difficult)
    else:
        src = tfds_source(cfg)
    if isinstance(src, Table):
        repaired = {k: v for k, v in src.stats.items() if v}
        logging.info("dataset %s/%s: %d images, %d boxes, %d classes; repairs: %s", kind, split,
                     len(src), len(src.labels), len(src.class_names), repaired or "none")
    _CACHE[key] = src
    return src


def _voc_split_exists(root: str, split: str) -> bool:
    return tf.io.gfile.exists(os.path.join(root, "ImageSets", "Main", f"{split}.txt"))
