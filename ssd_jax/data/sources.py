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

Over 500 lines on purpose: the four dataset kinds share one contract (`Table`, its repairs and
their counts), and each reader is about 100 lines; a split by kind would scatter that contract.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Any

import numpy as np

from ssd_jax.config import KIND_COMMON, KIND_FIELDS, KINDS
from ssd_jax.data.tf_compat import tf
from ssd_jax.errors import ConfigError, DataError
from ssd_jax.image import image_id_from_name

log = logging.getLogger(__name__)

_MIN_BOX_SIDE = 1e-4  # boxes thinner than this (normalized) after clipping are degenerate
#: repair counters that drop an annotated box, and what each means
_BOX_DROPS = {
    "boxes_degenerate_dropped": "zero-area, negative or non-finite after clipping to the image",
    "annotations_invalid_dropped": "unknown category id or a bbox without 4 numbers",
    "annotations_unknown_class_dropped": "class name not in config.dataset.class_names",
}


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
    category_ids: tuple[int, ...] = ()  # the dataset's id of label i at [i-1] (COCO's own ids)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_id)

    def check_usable(self, what: str) -> None:
        """DataError when no box (or under 1% of the annotated boxes) survived the repairs."""
        kept = len(self.labels)
        dropped = {k: v for k, v in self.stats.items() if k in _BOX_DROPS and v}
        annotated = kept + sum(dropped.values())
        if annotated == 0 and kept == 0:
            raise DataError(f"{what}: no image has an annotated object; a detector cannot learn "
                            f"from {len(self)} images without boxes")
        if kept == 0 or kept < 0.01 * annotated:
            named = ", ".join(f"{v} {_BOX_DROPS[k]}" for k, v in dropped.items())
            raise DataError(f"{what}: only {kept} of {annotated} annotated boxes are usable "
                            f"(dropped: {named}). Check the box format: COCO bbox is [x, y, "
                            f"width, height] in pixels; VOC bndbox is xmin/ymin/xmax/ymax in pixels.")


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
        self.missing_example = ""  # the first image path looked for and not found
        self.size_mismatch_example = ""  # the first image whose pixels are not its declared size

    def image_size(self, path: str, width: float, height: float) -> tuple[float, float] | None:
        """(width, height) to normalize the image's boxes by: the declared size when the file's
        upright pixels have it (1 px of rounding allowed) or cannot be read from its header
        (decoding then fails or not at run time, counted there), the file's own when nothing is
        declared (None: unreadable, counted). None and counted (`images_size_mismatch_skipped`)
        when the pixels are another size: boxes drawn on other pixels than the ones trained on
        land in the wrong place (a declared 180x240 where the upright photo is 240x180 means the
        annotation tool drew on the photo without its EXIF rotation). Reads every image's header
        (0.03-0.09 ms each on the README's CPU: ~4-11 s for COCO's 118k)."""
        real_w, real_h = _image_size(path)
        if width <= 0 or height <= 0:
            if real_w <= 0:
                self.stats["undecodable_images_skipped"] += 1
                return None
            return real_w, real_h
        if real_w > 0 and (abs(real_w - width) > 1 or abs(real_h - height) > 1):
            self.stats["images_size_mismatch_skipped"] += 1
            if not self.size_mismatch_example:
                self.size_mismatch_example = (
                    f"{path}: declared {width:g}x{height:g}, upright pixels {real_w:g}x{real_h:g}")
            return None
        return width, height

    def size_warnings(self, what: str) -> list[str]:
        n = self.stats["images_size_mismatch_skipped"]
        if not n:
            return []
        return [f"{what}: {n} images skipped whose pixels are not the width x height the "
                f"annotations declare, so their boxes would land in the wrong place (first: "
                f"{self.size_mismatch_example}). A transposed size means the annotation tool drew "
                "on the photo without its EXIF rotation, which every viewer and ssd_jax apply: "
                "annotate the upright image (or strip the EXIF orientation from the files the "
                "annotations were drawn on)"]

    def missing(self, path: str) -> None:
        """Counts an annotated image whose file is not there (the first is named on failure)."""
        self.stats["missing_image_files"] += 1
        self.missing_example = self.missing_example or path

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
            example = (f"; e.g. {self.missing_example} is not there" if self.missing_example
                       else f"; e.g. {self.size_mismatch_example}" if self.size_mismatch_example
                       else "")
            raise DataError(f"{what}: no usable images ({_describe(self.stats)}){example}")
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


def _describe(stats: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(stats.items()) if v) or "nothing repaired"


def field(cfg: Any, name: str) -> Any:
    """``config.dataset.<name>``; ConfigError if the config does not declare it (every field has
    its default in `ssd_jax.config.get_config()`, none here)."""
    try:
        return cfg[name]
    except (KeyError, AttributeError, TypeError):
        raise ConfigError(f"config.dataset.{name} is missing: start from the dataset of "
                          "ssd_jax.config.get_config(), which declares every field") from None


def validate_dataset_config(cfg: Any, splits: tuple[str, ...] = ("train", "eval")) -> None:
    """ConfigError naming the field when `cfg` (config.dataset) cannot give data for `splits`;
    checks the fields of its kind only, and that the files and folders it names exist."""
    kind = field(cfg, "kind")
    if kind not in KINDS:
        raise ConfigError(f"config.dataset.kind={kind!r} is unknown; choose one of {KINDS}")
    for name in KIND_COMMON + KIND_FIELDS[kind]:
        field(cfg, name)

    def need(name: str, hint: str = "") -> str:
        value = field(cfg, name)
        if value in (None, ""):
            raise ConfigError(f"config.dataset.{name} is required for kind={kind!r}{hint}")
        return value

    if bool(field(cfg, "augment_on_device")) and int(field(cfg, "canvas_size")) < 32:
        raise ConfigError("config.dataset.canvas_size must be >= 32 (the side of the canvas each "
                          "image is placed on before the device augments it), got "
                          f"{field(cfg, 'canvas_size')}")
    if kind == "synthetic":
        for name in ("num_train", "num_eval", "image_size"):
            if int(field(cfg, name)) < 1:
                raise ConfigError(f"config.dataset.{name} must be >= 1, got {field(cfg, name)}")
        for name in ("num_test", "test_seed", "generate_processes"):
            if int(field(cfg, name)) < 0:
                raise ConfigError(f"config.dataset.{name} must be >= 0, got {field(cfg, name)}")
        from ssd_jax.data import synthetic  # numpy and Pillow only

        try:
            max_size = float(field(cfg, "max_object_size"))
        except (TypeError, ValueError):
            raise ConfigError("config.dataset.max_object_size must be a number, got "
                              f"{field(cfg, 'max_object_size')!r}") from None
        try:  # (MIN_OBJECT_SIZE, 1], and room for a whole-pixel shape at image_size
            synthetic.check_max_object_size(max_size, int(field(cfg, "image_size")))
        except ValueError as e:  # its messages start with "max_object_size"
            raise ConfigError(f"config.dataset.{e}") from None
    elif kind == "tfds":
        need("name", " (e.g. voc/2007+voc/2012 or coco/2017)")
        data_dir = need("data_dir", " (the folder `tfds build NAME --data_dir=DIR` wrote)")
        if not tf.io.gfile.isdir(data_dir):
            raise ConfigError(f"config.dataset.data_dir={data_dir!r} does not exist")
    elif kind == "coco_json":
        eval_hint = (" (evaluation runs during and after training: a held-out split, or the "
                     "training files to check the fit)")
        for split in splits:
            ann = need(f"{split}_annotations", eval_hint if split == "eval" else "")
            images = need(f"{split}_images", eval_hint if split == "eval" else "")
            if not tf.io.gfile.exists(ann) or tf.io.gfile.isdir(ann):
                raise ConfigError(f"config.dataset.{split}_annotations={ann!r}: no such file")
            if not tf.io.gfile.isdir(images):
                raise ConfigError(f"config.dataset.{split}_images={images!r}: no such folder")
    elif kind == "voc_xml":
        root = need("root")
        if not tf.io.gfile.isdir(root):
            raise ConfigError(f"config.dataset.root={root!r}: no such folder")
        for split in (f"{s}_split" for s in splits):
            path = os.path.join(root, "ImageSets", "Main", f"{need(split)}.txt")
            if not tf.io.gfile.exists(path):
                raise ConfigError(f"config.dataset.{split}={field(cfg, split)!r}: {path} not found")




def _list_dir(path: str) -> set[str]:
    if not tf.io.gfile.isdir(path):
        raise FileNotFoundError(f"image folder not found: {path}")
    return set(tf.io.gfile.listdir(path))


class _ImageFolder:
    """Which relative file names exist under `root`, subfolders included ("train/0001.jpg", as
    CVAT, Label Studio and other COCO exports write file_name): one listing per folder."""

    def __init__(self, root: str):
        self.root = root
        self._listings = {"": _list_dir(root)}  # a missing root is an error of its own

    def __contains__(self, name: str) -> bool:
        folder, base = os.path.split(os.path.normpath(name))
        if folder not in self._listings:
            path = os.path.join(self.root, folder)
            self._listings[folder] = set(tf.io.gfile.listdir(path)) \
                if tf.io.gfile.isdir(path) else set()
        return base in self._listings[folder]


# ------------------------------------------------------------------------------------------
# synthetic


def synthetic_classes() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The synthetic dataset's class names and their ids (1..6), known without generating it."""
    from ssd_jax.data import synthetic

    names = tuple(synthetic.CLASS_NAMES)
    return names, tuple(range(1, len(names) + 1))


def _synthetic_args(cfg: Any, split: str,
                    store_size: int | None = None) -> tuple[int, str, int, int, float, str]:
    """(seed, generator split, number of images, side, max_object_size, cache file or "") of a
    synthetic split. The cache file's name holds every value that changes the arrays (a
    max_object_size other than the default included)."""
    from ssd_jax.data import synthetic

    seed = int(field(cfg, "test_seed" if split == "test" else "seed"))
    n = int(field(cfg, f"num_{split}"))
    size = int(field(cfg, "image_size"))
    max_size = float(field(cfg, "max_object_size"))
    syn_split = {"train": "train", "eval": "val", "test": "test"}[split]
    cache_dir = field(cfg, "cache_dir")
    at = f"_at{store_size}" if store_size and store_size != size else ""
    small = f"_max{max_size!r}" if max_size != synthetic.DEFAULT_MAX_OBJECT_SIZE else ""
    cache = os.path.join(cache_dir, f"synthetic_{seed}_{syn_split}_{n}_{size}{small}{at}.npz") \
        if cache_dir else ""
    return seed, syn_split, n, size, max_size, cache


def start_synthetic(cfg: Any, split: str, store_size: int | None = None) -> Any:
    """Starts generating a synthetic split in config.dataset.generate_processes worker processes
    (`ssd_jax.data.synthetic.SplitJob`; images kept at `store_size` if given) and returns the job
    for `synthetic_table`, or None when the split comes from the cache (nothing to generate)."""
    from ssd_jax.data import synthetic

    seed, syn_split, n, size, max_size, cache = _synthetic_args(cfg, split, store_size)
    if cache and tf.io.gfile.exists(cache):
        return None
    return synthetic.SplitJob(seed, syn_split, n, image_size=size,
                              processes=int(field(cfg, "generate_processes")),
                              store_size=store_size, max_object_size=max_size)


def synthetic_table(cfg: Any, split: str, job: Any = None, store_size: int | None = None) -> Table:
    """`generate_split` of ssd_jax.data.synthetic held in memory; split is 'train', 'eval' (the
    validation split, seed config.dataset.seed) or 'test' (held out, seed config.dataset.test_seed),
    with shapes up to config.dataset.max_object_size of the side.
    `job`: the `start_synthetic(cfg, split, store_size)` job already generating it (else it is
    generated now); `store_size`: the side the images are kept at (default: as generated).
    """
    seed, syn_split, n, size, _, cache = _synthetic_args(cfg, split, store_size)
    data = None
    if cache and tf.io.gfile.exists(cache):
        with tf.io.gfile.GFile(cache, "rb") as f:
            data = dict(np.load(io.BytesIO(f.read())))
    if data is None:
        job = job if job is not None else start_synthetic(cfg, split, store_size)
        data = job.result()
        if cache:
            tf.io.gfile.makedirs(os.path.dirname(cache))
            buf = io.BytesIO()
            np.savez(buf, **data)
            with tf.io.gfile.GFile(cache, "wb") as f:
                f.write(buf.getvalue())
    names, category_ids = synthetic_classes()
    builder = _TableBuilder(keep_crowd=True)
    for i in range(n):
        k = int(data["num_boxes"][i])
        builder.add(int(data["image_id"][i]), "", data["boxes"][i, :k], data["labels"][i, :k])
    table = builder.build(names, what=f"synthetic {split}")
    table.category_ids = category_ids
    table.paths = None
    table.images = np.ascontiguousarray(data["image"])
    return table


# ------------------------------------------------------------------------------------------
# COCO json


def coco_json_table(annotations: str, images_dir: str, *, keep_crowd: bool) -> Table:
    """COCO-format `annotations` (json) + `images_dir`. Category ids (sorted) map to labels 1..K;
    `Table.category_ids` keeps the ids, `Table.image_id` the file's image ids. A record missing
    a COCO key or holding a value of the wrong type is a DataError naming the file."""
    try:
        return _coco_json_table(annotations, images_dir, keep_crowd=keep_crowd)
    except (DataError, FileNotFoundError):
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise DataError(f"{annotations}: not a well-formed COCO annotation file ({what}); each "
                        "image needs id, file_name (width, height), each annotation image_id, "
                        "category_id, bbox [x, y, w, h], each category id, name") from None


def _coco_json_table(annotations: str, images_dir: str, *, keep_crowd: bool) -> Table:
    if not tf.io.gfile.exists(annotations):
        raise FileNotFoundError(f"COCO annotation file not found: {annotations}")
    with tf.io.gfile.GFile(annotations, "r") as f:
        try:
            coco = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{annotations}: not valid JSON ({e})") from None
    if not isinstance(coco, dict) or "images" not in coco or "categories" not in coco:
        raise DataError(f"{annotations}: not a COCO annotation file (needs 'images', 'categories')")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
    names = tuple(c["name"] for c in cats)
    present = _ImageFolder(images_dir)
    per_image: dict[int, list[dict]] = {}
    for a in coco.get("annotations", []):
        per_image.setdefault(a["image_id"], []).append(a)
    builder = _TableBuilder(keep_crowd=keep_crowd)
    pixel_extent, widths = 0.0, []
    n_boxes = n_past_edge = n_as_corners = 0  # for the [x0, y0, x1, y1] warning
    for img in coco["images"]:
        fname = img["file_name"]
        if fname not in present:
            builder.missing(os.path.join(images_dir, fname))
            continue
        size = builder.image_size(os.path.join(images_dir, fname),
                                  float(img.get("width") or 0), float(img.get("height") or 0))
        if size is None:
            continue
        w, h = size
        boxes, labels, crowd = [], [], []
        for a in per_image.get(img["id"], []):
            bbox = a.get("bbox", ())
            if a.get("category_id") not in cat_to_label or len(bbox) != 4:
                builder.stats["annotations_invalid_dropped"] += 1
                continue
            try:
                x, y, bw, bh = (float(v) for v in bbox)
            except (TypeError, ValueError):
                builder.stats["annotations_invalid_dropped"] += 1
                continue
            boxes.append([x / w, y / h, (x + bw) / w, (y + bh) / h])
            n_boxes += 1
            n_past_edge += (x + bw > w + 1) or (y + bh > h + 1)
            n_as_corners += (x < bw <= w + 1) and (y < bh <= h + 1)
            labels.append(cat_to_label[a["category_id"]])
            crowd.append(bool(a.get("iscrowd", 0)))
            if np.isfinite([x, y, bw, bh]).all():
                pixel_extent = max(pixel_extent, abs(x), abs(y), abs(x + bw), abs(y + bh))
        widths.append(min(w, h))
        builder.add(img["id"], os.path.join(images_dir, fname), boxes, labels, iscrowd=crowd)
    table = builder.build(names, what=f"{annotations}")
    table.category_ids = tuple(int(c["id"]) for c in cats)
    table.warnings += _normalized_warning(annotations, pixel_extent, widths, len(table.labels))
    table.warnings += _corners_warning(annotations, n_boxes, n_past_edge, n_as_corners)
    table.warnings += builder.size_warnings(annotations)
    return table


def _corners_warning(what: str, n: int, past_edge: int, as_corners: int) -> list[str]:
    """A warning when COCO bboxes look written as corners [x0, y0, x1, y1] instead of
    [x, y, width, height] (a common export mistake): read as COCO's, many reach past the image
    edge (each by about its own offset), and read as corners, nearly every one fits its image."""
    if n >= 5 and past_edge >= 0.2 * n and as_corners >= 0.95 * n:
        return [f"{what}: {past_edge} of {n} boxes reach past the image edge, and {as_corners} "
                "read as [x0, y0, x1, y1] corners inside their image: COCO's bbox is [x, y, width, "
                "height] (write width = x1 - x0, height = y1 - y0)"]
    return []


def _normalized_warning(what: str, pixel_extent: float, sides: list[float], n: int) -> list[str]:
    """A warning when every pixel coordinate fits in [0, 1.5] on images hundreds of pixels wide:
    the boxes were likely written normalized instead of in pixels."""
    if n and pixel_extent <= 1.5 and sides and float(np.median(sides)) >= 100:
        return [f"{what}: every box coordinate is <= {pixel_extent:.2g} on images about "
                f"{np.median(sides):.0f} px wide: the boxes look normalized, but this format takes "
                "pixels (multiply them by the image width/height)"]
    return []


def _image_size(path: str) -> tuple[float, float]:
    """(width, height) of the upright image (its EXIF orientation applied, as the decoders
    do) from the image header, (0, 0) if unreadable."""
    from PIL import Image

    from ssd_jax.image import TRANSPOSED_ORIENTATIONS

    opener = tf.io.gfile.GFile if "://" in path else open  # open: 3x faster for local files
    try:
        with opener(path, "rb") as f, Image.open(f) as im:
            w, h = float(im.width), float(im.height)
            return (h, w) if im.getexif().get(0x0112, 1) in TRANSPOSED_ORIENTATIONS else (w, h)
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
        raise DataError(f"config.dataset.root={root}: no object names found in Annotations/ for "
                        f"splits {splits}; set config.dataset.class_names")
    return tuple(sorted(names))


def _voc_ids(root: str, split: str) -> list[str]:
    path = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"VOC split file not found: {path}")
    with tf.io.gfile.GFile(path, "r") as f:
        return [line.split()[0] for line in f if line.strip()]


def voc_xml_table(root: str, split: str, class_names: tuple[str, ...], *,
                  use_difficult: bool = True) -> Table:
    """Pascal VOC folder -> Table. Pixel boxes (1-based, inclusive) -> normalized corners."""
    ann_dir = os.path.join(root, "Annotations")
    if not tf.io.gfile.isdir(ann_dir):
        raise FileNotFoundError(f"VOC annotation folder not found: {ann_dir}")
    present = _list_dir(os.path.join(root, "JPEGImages"))
    to_label = {n: i + 1 for i, n in enumerate(class_names)}
    builder = _TableBuilder(keep_crowd=True)
    pixel_extent, sides = 0.0, []
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
            builder.missing(os.path.join(root, "JPEGImages", fname))
            continue
        image_path = os.path.join(root, "JPEGImages", fname)
        try:
            w = float(tree.findtext("size/width") or 0)
            h = float(tree.findtext("size/height") or 0)
        except ValueError:
            w = h = 0.0
        size = builder.image_size(image_path, w, h)
        if size is None:
            continue
        w, h = size
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
            if np.isfinite([x0, y0, x1, y1]).all():
                pixel_extent = max(pixel_extent, abs(x0), abs(y0), abs(x1), abs(y1))
        sides.append(min(w, h))
        builder.add(image_id_from_name(stem), image_path, boxes, labels, difficult=difficult)
    table = builder.build(class_names, what=f"{root} split {split}")
    table.category_ids = tuple(range(1, len(class_names) + 1))
    table.warnings += _normalized_warning(f"{root} split {split}", pixel_extent, sides,
                                          len(table.labels))
    table.warnings += builder.size_warnings(f"{root} split {split}")
    return table


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
    """A TFDS example in the source contract: the same numpy repair (`repair_boxes`) and image
    id rule (`image_id_from_name`) as the table sources, run through tf.numpy_function."""
    objects = ex["objects"]
    bbox = tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4])
    n = tf.shape(bbox)[0]
    boxes = tf.gather(bbox, [1, 0, 3, 2], axis=1)  # (ymin,xmin,ymax,xmax) -> corners
    labels = tf.cast(objects["label"], tf.int32) + 1
    difficult = tf.cast(objects.get("is_difficult", tf.zeros([n], tf.bool)), tf.bool)
    iscrowd = tf.cast(objects.get("is_crowd", tf.zeros([n], tf.bool)), tf.bool)

    def repair(boxes, iscrowd, difficult):
        stats: Counter = Counter()
        fixed, keep = repair_boxes(boxes, stats)
        out = np.zeros_like(boxes)
        out[keep] = fixed
        keep &= (keep_crowd | ~iscrowd) & (use_difficult | ~difficult)
        return (out, keep, np.int32(stats["boxes_clipped"]),
                np.int32(stats["boxes_degenerate_dropped"]))

    boxes, keep, n_clipped, n_dropped = tf.numpy_function(
        repair, [boxes, iscrowd, difficult], [tf.float32, tf.bool, tf.int32, tf.int32],
        stateful=False)
    boxes = tf.reshape(boxes, [-1, 4])
    keep = tf.reshape(keep, [-1])
    if "image/id" in ex:
        image_id = tf.cast(ex["image/id"], tf.int64)
    else:  # VOC: the digits of the file name (2008_000123.jpg -> 2008000123)
        image_id = tf.numpy_function(
            lambda f: np.int64(image_id_from_name(f.decode())), [ex["image/filename"]], tf.int64,
            stateful=False)
        image_id = tf.reshape(image_id, [])
    return {
        "encoded": ex["image"], "image_id": image_id,
        "boxes": tf.boolean_mask(boxes, keep), "labels": tf.boolean_mask(labels, keep),
        "difficult": tf.boolean_mask(difficult, keep), "iscrowd": tf.boolean_mask(iscrowd, keep),
        "stat_boxes_clipped": tf.reshape(n_clipped, []),
        "stat_boxes_degenerate_dropped": tf.reshape(n_dropped, []),
    }


def tfds_source(cfg: Any) -> TfdsSource:
    import tensorflow_datasets as tfds

    name = field(cfg, "name")
    names = tuple(n.strip() for n in (name.split("+") if isinstance(name, str) else name))
    data_dir = field(cfg, "data_dir") or None
    builders, class_names = [], None
    for n in names:
        try:
            builder = tfds.builder(n, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 - tfds raises several types for unknown names
            raise ConfigError(f"config.dataset.name: unknown TFDS dataset {n!r} ({e})") from None
        _check_prepared(builder, n, data_dir, [field(cfg, f"{s}_split") for s in ("train", "eval")])
        feat = builder.info.features["objects"]["label"]
        names_n = tuple(feat.names)
        if class_names is not None and names_n != class_names:
            raise ConfigError(f"config.dataset.name: TFDS datasets {names} have different classes")
        class_names = names_n
        builders.append(builder)
    return TfdsSource(names, data_dir, class_names, tuple(builders))


def _check_prepared(builder: Any, name: str, data_dir: str | None, splits: list[str]) -> None:
    """A ConfigError naming the folder and the `tfds build` command when `data_dir` holds no
    prepared `name` (TFDS's own AssertionError is a 40-line traceback), or naming the splits it
    has when a configured split is not one of them. `as_dataset` only opens the file list."""
    for split in splits:
        try:
            builder.as_dataset(split=split)
        except AssertionError:
            raise ConfigError(
                f"config.dataset.data_dir={data_dir!r} holds no prepared {name!r} (looked for "
                f"{builder.data_path}); prepare it once with `tfds build {name} "
                f"--data_dir={data_dir}`") from None
        except (ValueError, KeyError) as e:
            have = ", ".join(sorted(builder.info.splits)) or "none"
            raise ConfigError(f"TFDS {name!r} has no split {split!r} (config.dataset.*_split; "
                              f"its splits: {have}): {e}") from None


def category_ids_of(class_names: tuple[str, ...], tfds_names: tuple[str, ...] = ()) -> tuple[int, ...]:
    """The dataset ids of labels 1..K: COCO's own category ids for TFDS coco (matched by name
    against COCO's 91-entry list), else the labels themselves."""
    from ssd_jax import coco

    if any(n.startswith("coco") for n in tfds_names):
        by_name = {c.replace("_", " "): i for i, c in enumerate(coco.COCO_CATEGORIES_91)}
        ids = [by_name.get(c.replace("_", " ")) for c in class_names]
        if all(i is not None for i in ids):
            return tuple(int(i) for i in ids)
        log.warning("TFDS %s class names do not all match COCO's; category ids are the labels",
                        tfds_names)
    return tuple(range(1, len(class_names) + 1))


# ------------------------------------------------------------------------------------------
# entry point

def has_test_split(cfg: Any) -> bool:
    """Whether config.dataset has a held-out test split besides 'eval': kind=synthetic with
    num_test > 0. (For the other kinds the eval split is the dataset's own test set.)"""
    return field(cfg, "kind") == "synthetic" and int(field(cfg, "num_test")) > 0


def load_source(cfg: Any, split: str, job: Any = None,
                store_size: int | None = None) -> Table | TfdsSource:
    """The source of `split` ('train', 'eval', or 'test' where `has_test_split`) for dataset
    config `cfg` (config.dataset).

    `job`, `store_size`: a synthetic split's generation already started (`start_synthetic`) and
    the side its images are kept at.

    Raises ConfigError / DataError / FileNotFoundError naming the field or path when the dataset
    is unusable (a table split without a usable box included). Not cached: the input pipeline
    object (`ssd_jax.data.pipeline.InputPipeline`) holds the sources it built.
    """
    if split not in ("train", "eval", "test"):
        raise ValueError(f"split must be 'train', 'eval' or 'test', got {split!r}")
    if split == "test" and not has_test_split(cfg):
        raise ConfigError("only kind=synthetic with config.dataset.num_test > 0 has a 'test' split "
                          "besides 'eval'; use the eval split")
    validate_dataset_config(cfg, (split if split != "test" else "eval",))
    kind = field(cfg, "kind")
    keep_crowd = split != "train"
    if kind == "synthetic":
        src = synthetic_table(cfg, split, job, store_size)
    elif kind == "coco_json":
        src = coco_json_table(field(cfg, f"{split}_annotations"), field(cfg, f"{split}_images"),
                              keep_crowd=keep_crowd)
    elif kind == "voc_xml":
        root = field(cfg, "root")
        names = tuple(str(n) for n in field(cfg, "class_names"))
        if not names:
            splits = [field(cfg, "train_split"), field(cfg, "eval_split")]
            names = voc_class_names(root, [s for s in splits if _voc_split_exists(root, s)])
        use_difficult = bool(field(cfg, "use_difficult")) or split == "eval"
        src = voc_xml_table(root, field(cfg, f"{split}_split"), names, use_difficult=use_difficult)
    else:
        src = tfds_source(cfg)
    if isinstance(src, Table):
        what = f"config.dataset ({kind}, {split} split)"
        src.check_usable(what)
        log.info("dataset %s/%s: %d images, %d boxes, %d classes; repairs: %s", kind, split,
                     len(src), len(src.labels), len(src.class_names), _describe(src.stats))
    return src


def _voc_split_exists(root: str, split: str) -> bool:
    return tf.io.gfile.exists(os.path.join(root, "ImageSets", "Main", f"{split}.txt"))
