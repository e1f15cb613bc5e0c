"""tf.data input pipeline: training and evaluation batches as dicts of numpy arrays.

    data = InputPipeline(config.dataset)
    info = data.info()
    it = data.train_iterator(image_size=300, batch_size=32, max_boxes=100, seed=0)
    ev = data.eval_iterator(image_size=300, batch_size=32, max_boxes=100)

Boxes are corner form (xmin, ymin, xmax, ymax) normalized to [0, 1]; labels 1..C-1, 0 = padding.

Determinism and resume. The training stream is a function of (seed, step):

* Table sources (synthetic, coco_json, voc_xml) have random access. Element j of the per-host
  batch at step k is global element g = k * batch_size * process_count + process_index *
  batch_size + j; with N images, epoch = g // N and the image is
  `index_shuffle(g % N, seed=[seed, epoch], max_index=N-1)`; its augmentation seed is
  (seed, g). `start_step=k` starts the stream at step k without touching the skipped steps, and
  the global batch does not depend on process_count. An image that cannot be decoded is replaced
  by the next one of the same epoch's permutation (up to 8 tries, then a blank negative), so every
  position still yields one example and positions never shift.
* TFDS sources (tfrecords, no random access) are read in file order (shuffle_files=False), then
  `shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()`, which is deterministic
  for a seed; `start_step=k` skips k * batch_size records *before* images are decoded (images stay
  encoded until after the skip, so skipping costs reading, not decoding), and the augmentation
  seed is fold_in((seed, process_index), position in the stream). Each host reads
  `tfds.even_splits(split, process_count)[process_index]`. An undecodable image is replaced
  by a blank negative in its position (again, no shift).

Decoding: training decodes JPEGs with TensorFlow's in-graph decoder (`decode_train_image`: no
Python, no GIL, ~1.8x Pillow here), evaluation with Pillow (`decode_image`), the decoder predict
uses, so an evaluated file and a predicted one are the same pixels.

Bad input: annotation problems are repaired when the source is built (see sources.py); TFDS
boxes are clipped / dropped in the graph. At run time undecodable images are skipped (training:
replaced as above; eval: their slot becomes a masked padding example), grayscale/RGBA/CMYK images
converted to RGB and boxes past max_boxes truncated. Everything is counted in the pipeline's
`stats` (and each iterator's `.stats`); the training loop reports them at each evaluation.

Over 500 lines on purpose: training and evaluation batches share the loading, skipping and
counting of examples, one concept (the input pipeline) with its tf.data plumbing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from ssd_jax.data import host_augment, sources
from ssd_jax.data.tf_compat import tf

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
_FALLBACK_TRIES = 8


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """num_classes counts background; class_names excludes it (label i -> class_names[i-1]);
    category_ids[i-1] is the dataset's own id of label i (COCO-JSON: the file's category ids)."""

    num_classes: int
    class_names: tuple[str, ...]
    num_train: int | None
    num_eval: int | None
    category_ids: tuple[int, ...] = ()


class InputPipeline:
    """The data of one `config.dataset`: its sources (built once, on first use), the batches,
    and a count of every repair and skip.

        data = InputPipeline(config.dataset)
        info = data.info()
        train = data.train_iterator(image_size=300, batch_size=32, max_boxes=100, seed=0)
        evals = data.eval_iterator(image_size=300, batch_size=32, max_boxes=100)
        data.stats        # Counter: boxes_clipped, images_skipped_undecodable, ...

    The config is checked on construction (`sources.validate_dataset_config`): a mistake is a
    ConfigError naming the field before anything is read.
    """

    def __init__(self, dataset_cfg: Any, splits: tuple[str, ...] = ("train", "eval")):
        sources.validate_dataset_config(dataset_cfg, splits)
        self.cfg = dataset_cfg
        self.splits = tuple(splits)  # ("eval",): evaluation of a checkpoint, no training data
        self.stats: Counter = Counter()  # all splits together
        self.split_stats: dict[str, Counter] = {}  # per split: 'train', 'eval', 'test'
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        self._sources: dict[str, sources.Table | sources.TfdsSource] = {}
        self._jobs: dict[str, Any] = {}
        self._store_sizes: dict[str, int] = {}
        self._info: DatasetInfo | None = None

    def start_loading(self, splits: tuple[str, ...] | None = None,
                      train_image_size: int | None = None) -> None:
        """Begins generating the synthetic `splits` (default: this pipeline's) in the background
        (config.dataset.generate_processes worker processes), so that the caller can compile
        meanwhile; `source` then takes the result. A no-op for the other kinds, which read their
        files when first used.

        train_image_size: the model's input side. When the training augmentation has no geometry
        but flips (host mode, no zoom-out, no crop), training resizes every image to exactly that
        side each epoch; the training table is then kept at that side instead, resized once with
        the evaluation's resize (the default's 16000 images: 0.79 GB instead of 1.77 GB at 192 px).
        """
        if sources.field(self.cfg, "kind") != "synthetic":
            return
        if train_image_size and _flip_only(self.cfg) and \
                train_image_size < int(sources.field(self.cfg, "image_size")):
            self._store_sizes["train"] = int(train_image_size)
        for split in splits if splits is not None else self.splits:
            if split not in self._sources and split not in self._jobs:
                job = sources.start_synthetic(self.cfg, split, self._store_sizes.get(split))
                if job is not None:
                    self._jobs[split] = job

    def close(self) -> None:
        """Stops background generation still running (`start_loading`)."""
        for job in self._jobs.values():
            job.cancel()
        self._jobs = {}

    def source(self, split: str) -> sources.Table | sources.TfdsSource:
        """The source of 'train' or 'eval' (TFDS: one source for both); its repairs are counted
        once, its warnings logged once."""
        if split == "test" and not sources.has_test_split(self.cfg):
            return sources.load_source(self.cfg, split)  # the ConfigError that says why
        key = split if sources.field(self.cfg, "kind") != "tfds" else "tfds"
        if key not in self._sources:
            src = sources.load_source(self.cfg, split, job=self._jobs.pop(split, None),
                                      store_size=self._store_sizes.get(split))
            if isinstance(src, sources.Table):
                self.count(src.stats, split)
                for w in src.warnings:
                    log.warning("%s", w)
                self.warnings += src.warnings
            self._sources[key] = src
        return self._sources[key]

    def count(self, counts: dict[str, int], split: str) -> None:
        """Add `split`'s repair/skip counts (thread-safe: tf.data iterators report from their
        threads)."""
        counts = {k: int(v) for k, v in counts.items() if v}
        if counts:
            with self._lock:
                self.stats.update(counts)
                self.split_stats.setdefault(split, Counter()).update(counts)

    def summary(self) -> str:
        """One line: every repair and skip counted so far, split by split ('train: boxes_clipped
        3; eval: missing_image_files 1'), or 'nothing repaired or skipped'."""
        with self._lock:
            parts = [f"{split}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if v)
                     for split, c in self.split_stats.items() if any(c.values())]
        return "; ".join(parts) or "nothing repaired or skipped"

    def info(self) -> DatasetInfo:
        """Classes, ids and sizes of the dataset (num_eval None if unknown)."""
        if self._info is not None:
            return self._info
        if sources.field(self.cfg, "kind") == "synthetic":
            # From the config: the images are generated when a split is first read, which lets
            # training compile its steps before 1.8 GB of images are in memory.
            names, category_ids = sources.synthetic_classes()
            num_train = int(sources.field(self.cfg, "num_train")) if "train" in self.splits else None
            self._info = DatasetInfo(len(names) + 1, names, num_train,
                                     int(sources.field(self.cfg, "num_eval")), category_ids)
            return self._info
        train = self.source("train" if "train" in self.splits else "eval")
        if isinstance(train, sources.TfdsSource):
            num_train = train.num_examples(sources.field(self.cfg, "train_split"))
            num_eval = train.num_examples(sources.field(self.cfg, "eval_split"))
            category_ids = sources.category_ids_of(tuple(train.class_names), train.names)
        else:
            num_train = len(train) if "train" in self.splits else None
            num_eval = len(self.source("eval"))
            category_ids = train.category_ids
        names = tuple(train.class_names)
        self._info = DatasetInfo(len(names) + 1, names, num_train, num_eval, tuple(category_ids))
        return self._info

    def train_iterator(self, *, image_size: int, batch_size: int, max_boxes: int, seed: int,
                       start_step: int = 0, process_index: int = 0,
                       process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Endless augmented training batches for this host.

        Yields {"image": uint8 [b,S,S,3], "boxes": float32 [b,M,4] normalized corners,
        "labels": int32 [b,M] (0 = padding)}, b = batch_size (per host), S = image_size,
        M = max_boxes. The batch at step k is a function of (seed, k); start_step=k resumes
        exactly. The iterator's `.stats` counts what this stream repaired (also added to
        `self.stats`).
        """
        ds = self.train_dataset(image_size=image_size, batch_size=batch_size,
                                max_boxes=max_boxes, seed=seed, start_step=start_step,
                                process_index=process_index, process_count=process_count)
        return _StatsIterator(ds, self, "train")

    def train_dataset(self, *, image_size: int, batch_size: int, max_boxes: int, seed: int,
                      start_step: int = 0, process_index: int = 0,
                      process_count: int = 1) -> tf.data.Dataset:
        """The tf.data.Dataset behind `train_iterator`; its batches also carry int32 [b]
        `stat_<name>` counters (STAT_NAMES)."""
        return _make_train_dataset(self, image_size=image_size, batch_size=batch_size,
                                   max_boxes=max_boxes, seed=seed, start_step=start_step,
                                   process_index=process_index, process_count=process_count)

    def eval_iterator(self, *, image_size: int, batch_size: int, max_boxes: int,
                      process_index: int = 0, process_count: int = 1,
                      split: str = "eval") -> EvalIterator:
        """Resized (no augmentation) batches of this host's share of the 'eval' split (or of the
        held-out 'test' split where `has_test_split`); see `EvalIterator`."""
        return _make_eval_iterator(self, image_size=image_size, batch_size=batch_size,
                                   max_boxes=max_boxes, process_index=process_index,
                                   process_count=process_count, split=split)

    @property
    def has_test_split(self) -> bool:
        """A held-out 'test' split besides 'eval' (synthetic data with num_test > 0)."""
        return sources.has_test_split(self.cfg)


def get_dataset_info(dataset_cfg: Any) -> DatasetInfo:
    """`InputPipeline(dataset_cfg).info()`."""
    return InputPipeline(dataset_cfg).info()


def create_train_iterator(dataset_cfg: Any, **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
    """`InputPipeline(dataset_cfg).train_iterator(**kwargs)` (a pipeline of its own)."""
    return InputPipeline(dataset_cfg).train_iterator(**kwargs)


def create_eval_iterator(dataset_cfg: Any, **kwargs: Any) -> EvalIterator:
    """`InputPipeline(dataset_cfg).eval_iterator(**kwargs)` (a pipeline of its own)."""
    return InputPipeline(dataset_cfg).eval_iterator(**kwargs)


# ------------------------------------------------------------------------------------------
# decoding

# Per-example counters carried through tf.data as int32 fields "stat_<name>" and summed into
# InputPipeline.stats on the host (they never reach the caller's batches).
STAT_NAMES = ("images_skipped_undecodable", "images_converted_to_rgb", "boxes_clipped",
              "boxes_degenerate_dropped", "boxes_truncated")


def _stats(**values: Any) -> dict[str, tf.Tensor]:
    return {f"stat_{k}": tf.cast(values.get(k, 0), tf.int32) for k in STAT_NAMES}


def _bytes(b: Any) -> bytes:
    """A scalar string tensor's value inside tf.numpy_function: bytes in a tf.data graph, a 0-d
    object array when run eagerly (whose bytes() would be the array's buffer, not the string)."""
    return b.item() if isinstance(b, np.ndarray) else bytes(b)


def decode_image(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded JPEG/PNG/GIF/BMP/WebP/TIFF -> (uint8 [H,W,3] RGB, bool: converted from another
    layout: grayscale, alpha, palette, CMYK, 16-bit).

    `ssd_jax.image.decode_image_and_mode` (Pillow) through tf.numpy_function: the decoder that
    prediction uses, so evaluation and `experiments.predict` see the same pixels of a file
    (TensorFlow's and Pillow's JPEG decoders differ by a few levels). Undecodable data raises
    (callers catch it with tf.data's ignore_errors).
    """
    from ssd_jax import image as image_lib

    def decode(b):
        img, mode = image_lib.decode_image_and_mode(_bytes(b))
        return img, np.bool_(mode != "RGB")

    rgb, converted = tf.numpy_function(decode, [data], [tf.uint8, tf.bool], stateful=False)
    rgb.set_shape([None, None, 3])
    return rgb, tf.reshape(converted, [])


def decode_train_image(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`decode_image` for training: a baseline or progressive JPEG with 1 or 3 components (what
    photo datasets hold) is decoded by TensorFlow's own decoder, in the graph (no Python, no GIL:
    1473 against Pillow's 803 img/s on the 2-core CPU of the README); any other file (PNG, CMYK
    JPEG, a photo with an EXIF orientation to apply, ...) goes through `decode_image`. The two
    JPEG decoders differ by a few levels per pixel, noise under any augmentation, which is why
    only training uses this: evaluation and prediction keep Pillow's pixels. Same contract and
    errors as `decode_image`.
    """
    from ssd_jax import image as image_lib

    def jpeg():
        components = tf.io.extract_jpeg_shape(data)[2]
        # a photo with an EXIF orientation (a phone held upright) goes through Pillow, which
        # turns it upright (TensorFlow's decoder ignores the tag); the header probe is Pillow's
        orientation = tf.numpy_function(
            lambda b: np.int32(image_lib.exif_orientation(_bytes(b))), [data], tf.int32,
            stateful=False)
        fast = ((components == 3) | (components == 1)) & (tf.reshape(orientation, []) == 1)
        return tf.cond(
            fast,
            lambda: (tf.io.decode_jpeg(data, channels=3), components == 1),
            lambda: decode_image(data))

    rgb, converted = tf.cond(tf.strings.substr(data, 0, 3) == b"\xff\xd8\xff", jpeg,
                             lambda: decode_image(data))
    rgb.set_shape([None, None, 3])
    return rgb, converted


class _TableTF:
    """A Table's arrays as TF tensors, and by-index example loading."""

    def __init__(self, table: sources.Table, decode=decode_image):
        self.n = len(table)
        self.decode = decode
        self.row_splits = tf.constant(table.row_splits, tf.int64)
        self.boxes = tf.constant(table.boxes.reshape(-1, 4), tf.float32)
        self.labels = tf.constant(table.labels, tf.int32)
        self.difficult = tf.constant(table.difficult, tf.bool)
        self.iscrowd = tf.constant(table.iscrowd, tf.bool)
        self.image_id = tf.constant(table.image_id, tf.int64)
        # In-memory images stay in their numpy array, gathered by index through numpy_function:
        # tf.constant of the array (1.8 GB for the default's 16000 images) held another copy and
        # peaked at two more while converting (measured: +3.5 GB RSS each time it was built).
        self.images = table.images
        self.paths = None if table.paths is None else tf.constant(
            [str(p) for p in table.paths], tf.string)

    def load(self, idx: tf.Tensor) -> dict[str, tf.Tensor]:
        """Example `idx` in the source contract, plus stat_* fields."""
        if self.images is not None:
            images = self.images
            image = tf.numpy_function(lambda i: images[i], [idx], tf.uint8, stateful=False)
            image.set_shape(images.shape[1:])
            converted = tf.constant(False)
        else:
            image, converted = self.decode(tf.io.read_file(self.paths[idx]))
        s, e = self.row_splits[idx], self.row_splits[idx + 1]
        return {"image": image, "boxes": self.boxes[s:e], "labels": self.labels[s:e],
                "difficult": self.difficult[s:e], "iscrowd": self.iscrowd[s:e],
                "image_id": self.image_id[idx], **_stats(images_converted_to_rgb=converted)}


def _decode_tfds(ex: dict[str, tf.Tensor], decode=decode_image) -> dict[str, tf.Tensor]:
    image, converted = decode(ex["encoded"])
    out = {k: v for k, v in ex.items() if k != "encoded"}
    out["image"] = image
    out["stat_images_converted_to_rgb"] = tf.cast(converted, tf.int32)
    return {**_stats(), **out}


def _blank_example(**fields: tf.Tensor) -> dict[str, tf.Tensor]:
    """A grey 8x8 image without objects: stands in for an undecodable one."""
    return {"image": tf.fill([8, 8, 3], tf.constant(128, tf.uint8)),
            "boxes": tf.zeros([0, 4]), "labels": tf.zeros([0], tf.int32),
            "difficult": tf.zeros([0], tf.bool), "iscrowd": tf.zeros([0], tf.bool),
            "image_id": tf.constant(-1, tf.int64), **fields}


def _pad(x: tf.Tensor, m: int) -> tf.Tensor:
    x = x[:m]
    pad = [[0, m - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
    out = tf.pad(x, pad)
    out.set_shape([m, *x.shape[1:]])
    return out


def _flip_only(cfg: Any) -> bool:
    """Training resamples each whole image to the model's side (no zoom-out, no crop, host mode)."""
    return not any(bool(sources.field(cfg, f)) for f in
                   ("augment_on_device", "augment_expand", "augment_crop"))


def _no_autograph(fn):
    """`fn` traced as written: its control flow is already tf.cond / Python on static values, and
    AutoGraph's source conversion of the augmentation cost ~2.5 s of every pipeline's start."""
    return tf.autograph.experimental.do_not_convert(fn)


#: Hosts with at most this many cores run the pipelines without tf.data's autotuning (below).
_NO_AUTOTUNE_MAX_CORES = 16


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    # tf.data's autotuning runs a model thread that sleeps up to 60 s between optimizations, and
    # an iterator's destructor waited for it: the default run's process ended up to 45 s after its
    # "Done" line (gdb: the main thread in RootDataset::Iterator::~Iterator, the model thread in
    # Model::OptimizeLoop's timed wait). Without autotuning, AUTOTUNE parallelism is min(16,
    # cores) and prefetch buffers still grow on demand: on a host of up to 16 cores that is all
    # of them, what autotuning's CPU budget allowed. Bigger hosts keep autotuning.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (cores or 1) <= _NO_AUTOTUNE_MAX_CORES:
        options.autotune.enabled = False
    return options


def _pop_stats(batch: dict[str, np.ndarray]) -> dict[str, int]:
    return {k[5:]: int(batch.pop(k).sum()) for k in list(batch) if k.startswith("stat_")}


# ------------------------------------------------------------------------------------------
# training


def _make_train_dataset(data: InputPipeline, *, image_size: int, batch_size: int, max_boxes: int,
                        seed: int, start_step: int, process_index: int,
                        process_count: int) -> tf.data.Dataset:
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, "
                         f"{process_count}")
    if batch_size < 1 or max_boxes < 1 or image_size < 1:
        raise ValueError("batch_size, max_boxes and image_size must be positive")
    cfg = data.cfg
    src = data.source("train")
    b, size = int(batch_size), int(image_size)
    if isinstance(src, sources.TfdsSource):
        ds = _tfds_train_examples(cfg, src, b, seed, start_step, process_index, process_count)
    else:
        ds = _table_train_examples(src, b, seed, start_step, process_index, process_count)

    # the paper's augmentation, each step switchable (config.dataset.augment_<step>: bool)
    steps = {k: bool(sources.field(cfg, f"augment_{k}"))
             for k in ("photometric", "expand", "crop", "flip")}
    max_expand = float(sources.field(cfg, "max_expand"))

    on_device = bool(sources.field(cfg, "augment_on_device"))
    canvas = int(sources.field(cfg, "canvas_size"))

    def prepare(ex):
        """The augmented example, padded; in the device mode only the image on its canvas, its
        size there, the unaugmented boxes and the example's index: the jitted train step
        augments (ssd_jax.device_augment.augment_batch)."""
        if on_device:
            image, hw = host_augment.fit_to_canvas(ex["image"], canvas)
            boxes, labels = tf.reshape(ex["boxes"], [-1, 4]), ex["labels"]
            out = {"image": image, "image_size": hw, "index": ex["index"]}
        else:
            image, boxes, labels = host_augment.train_augment(
                ex["image"], ex["boxes"], ex["labels"], ex["seed"], size=size,
                max_expand=max_expand, **steps)
            out = {"image": image}
        out.update({"boxes": _pad(boxes, max_boxes), "labels": _pad(labels, max_boxes)})
        out.update({k: v for k, v in ex.items() if k.startswith("stat_")})
        out["stat_boxes_truncated"] = tf.maximum(tf.shape(boxes)[0] - max_boxes, 0)
        return out

    ds = ds.map(_no_autograph(prepare), num_parallel_calls=AUTOTUNE, deterministic=True)
    if on_device:  # the image goes to the top-left of its canvas as the batch is assembled
        shapes = {k: v.shape for k, v in ds.element_spec.items()}
        shapes["image"] = tf.TensorShape([canvas, canvas, 3])
        ds = ds.padded_batch(b, padded_shapes=shapes, drop_remainder=True)
    else:
        ds = ds.batch(b, drop_remainder=True)
    return ds.prefetch(AUTOTUNE).with_options(_options())


def _train_fields(ex: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """The fields augmentation needs; `seed` int64 [2] is the example's augmentation seed, and
    `index` (uint32, its second element) the key the device-side augmentation folds in."""
    keep = ("image", "boxes", "labels")
    index = tf.cast(tf.math.floormod(seed[1], tf.constant(2**32, tf.int64)), tf.uint32)
    return {**{k: ex[k] for k in keep}, "seed": seed, "index": index,
            **{k: ex[k] for k in ex if k.startswith("stat_")}}


def _table_train_examples(table: sources.Table, b: int, seed: int, start_step: int,
                          process_index: int, process_count: int) -> tf.data.Dataset:
    t = _TableTF(table, decode=decode_train_image)
    n = t.n

    def candidates(local):
        step, j = local // b, local % b
        g = step * b * process_count + process_index * b + j
        epoch, pos = g // n, g % n
        tries = tf.range(_FALLBACK_TRIES, dtype=tf.int64)
        order = tf.random.experimental.index_shuffle(
            (pos + tries) % n, seed=tf.stack([tf.constant(seed, tf.int64), epoch]),
            max_index=n - 1)
        return g, order

    def load_first(g, order):
        """The first decodable image of `order` (else a blank), as one element."""
        seed_g = tf.stack([tf.constant(seed, tf.int64), g])

        def load(idx, attempt):
            ex = t.load(idx)
            ex["stat_images_skipped_undecodable"] = tf.cast(attempt, tf.int32)
            return _train_fields(ex, seed_g)

        blank = _train_fields(
            _blank_example(**_stats(images_skipped_undecodable=_FALLBACK_TRIES)), seed_g)
        tries = tf.data.Dataset.from_tensor_slices((order, tf.range(_FALLBACK_TRIES)))
        ds = tries.map(_no_autograph(load)).ignore_errors().concatenate(tf.data.Dataset.from_tensors(blank))
        return ds.take(1)

    ds = tf.data.Dataset.range(start_step * b, 2**62)
    if t.images is not None:
        # In-memory images (synthetic) cannot fail to decode: the first candidate is the
        # example, loaded by a plain map. The interleave of one small dataset per example below
        # cost ~1 ms of CPU per image (measured with the default's 128 px table), ~10% of the
        # 2-core train step's CPU; the examples and their seeds are the same either way.
        def load_direct(local):
            g, order = candidates(local)
            ex = t.load(order[0])
            ex["stat_images_skipped_undecodable"] = tf.constant(0, tf.int32)
            return _train_fields(ex, tf.stack([tf.constant(seed, tf.int64), g]))

        return ds.map(_no_autograph(load_direct), num_parallel_calls=AUTOTUNE,
                      deterministic=True)
    ds = ds.map(_no_autograph(candidates))
    return ds.interleave(_no_autograph(load_first), cycle_length=4, block_length=1,
                         num_parallel_calls=AUTOTUNE, deterministic=True)


def _tfds_train_examples(cfg: Any, src: sources.TfdsSource, b: int, seed: int, start_step: int,
                         process_index: int, process_count: int) -> tf.data.Dataset:
    split = sources.field(cfg, "train_split")
    ds = src.dataset(split, process_index=process_index, process_count=process_count,
                     keep_crowd=False, use_difficult=bool(sources.field(cfg, "use_difficult")))
    buffer = int(sources.field(cfg, "shuffle_buffer"))
    ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().skip(start_step * b)

    def decode_one(i, ex):
        """Decoded example, or a blank if the image does not decode: one element either way,
        so positions (and resume) never shift."""
        seed_i = tf.random.experimental.stateless_fold_in(
            tf.constant([seed, process_index], tf.int64), i)
        blank = _blank_example(**{**{k: v for k, v in ex.items() if k.startswith("stat_")},
                                  **_stats(images_skipped_undecodable=1)})
        one = tf.data.Dataset.from_tensors(ex).map(
            functools.partial(_decode_tfds, decode=decode_train_image)).ignore_errors()
        one = one.concatenate(tf.data.Dataset.from_tensors({**_stats(), **blank}))
        return one.take(1).map(lambda e: _train_fields(e, seed_i))

    return ds.interleave(_no_autograph(decode_one), cycle_length=4, block_length=1,
                         num_parallel_calls=AUTOTUNE, deterministic=True)


class _StatsIterator:
    """Iterates a batched dataset as numpy dicts, moving stat_* fields into `.stats` and the
    owning pipeline's `stats`."""

    def __init__(self, ds: tf.data.Dataset, owner: InputPipeline, split: str):
        self.dataset = ds
        self._it = ds.as_numpy_iterator()
        self._owner = owner
        self._split = split
        self.stats: Counter = Counter()

    def __iter__(self) -> _StatsIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        counts = _pop_stats(batch)
        self.stats.update({k: v for k, v in counts.items() if v})
        self._owner.count(counts, self._split)
        return batch


# ------------------------------------------------------------------------------------------
# evaluation


class EvalIterator:
    """Re-iterable eval batches; each iteration is one full pass over this host's images.

    Batches: {"image": uint8 [b,S,S,3], "boxes": float32 [b,M,4], "labels": int32 [b,M],
    "difficult", "iscrowd": bool [b,M], "image_size": int32 [b,2] (original height, width),
    "image_id": int64 [b], "mask": bool [b] (False for padding)}. Every host yields the same
    number of batches (`len(self)`); each decodable image appears exactly once over all hosts,
    undecodable ones are skipped and counted.
    """

    def __init__(self, dataset: tf.data.Dataset, num_batches: int, num_examples: int,
                 owner: InputPipeline, split: str):
        self.dataset = dataset
        self._owner = owner
        self._split = split
        self._counted = False  # the owner's stats count the eval images once, not once per pass
        self.num_batches = num_batches
        self.num_examples = num_examples  # images assigned to this host
        self.stats: Counter = Counter()  # what the last pass repaired and skipped

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.stats = Counter()
        for batch in self.dataset.as_numpy_iterator():
            counts = _pop_stats(batch)
            self.stats.update({k: v for k, v in counts.items() if v})
            if not self._counted:
                self._owner.count(counts, self._split)
            yield batch
        self._counted = True


def _make_eval_iterator(data: InputPipeline, *, image_size: int, batch_size: int, max_boxes: int,
                        process_index: int, process_count: int,
                        split: str = "eval") -> EvalIterator:
    if not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, "
                         f"{process_count}")
    src = data.source(split)
    b, size, m = int(batch_size), int(image_size), int(max_boxes)
    if isinstance(src, sources.TfdsSource):
        tfds_split = sources.field(data.cfg, "eval_split")
        total = src.num_examples(tfds_split, count=True)
        examples = src.dataset(tfds_split, process_index=process_index,
                               process_count=process_count, keep_crowd=True)
        local = src.num_examples(_host_split(tfds_split, process_index, process_count),
                                 count=True)
        load = _decode_tfds
    else:
        t = _TableTF(src)
        total = len(src)
        indices = np.array_split(np.arange(total), process_count)[process_index]
        local = len(indices)
        examples = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64))
        load = t.load

    def prepare(ex):
        shape = tf.shape(ex["image"])
        n = tf.shape(ex["boxes"])[0]
        out = {"image": host_augment.eval_resize(ex["image"], size),
               "boxes": _pad(ex["boxes"], m), "labels": _pad(ex["labels"], m),
               "difficult": _pad(ex["difficult"], m), "iscrowd": _pad(ex["iscrowd"], m),
               "image_size": tf.cast(shape[:2], tf.int32), "image_id": ex["image_id"],
               "mask": tf.constant(True)}
        out.update({k: v for k, v in ex.items() if k.startswith("stat_")})
        out["stat_boxes_truncated"] = tf.maximum(n - m, 0)
        return out

    def load_or_skip(x):
        """One prepared example, or a masked padding one (counted) if the image is undecodable."""
        one = tf.data.Dataset.from_tensors(x).map(
            _no_autograph(lambda x: prepare(load(x)))).ignore_errors()
        return one.concatenate(tf.data.Dataset.from_tensors(
            {**pad, "stat_images_skipped_undecodable": tf.constant(1)})).take(1)

    pad = {"image": tf.zeros([size, size, 3], tf.uint8), "boxes": tf.zeros([m, 4]),
           "labels": tf.zeros([m], tf.int32), "difficult": tf.zeros([m], tf.bool),
           "iscrowd": tf.zeros([m], tf.bool), "image_size": tf.zeros([2], tf.int32),
           "image_id": tf.constant(-1, tf.int64), "mask": tf.constant(False), **_stats()}
    num_batches = math.ceil(math.ceil(total / process_count) / b)
    if isinstance(src, sources.Table) and src.images is not None:
        # in-memory images cannot fail to decode: a plain map (the interleave of one small
        # dataset per example costs ~1 ms of CPU per image)
        ds = examples.map(_no_autograph(lambda x: prepare(load(x))), num_parallel_calls=AUTOTUNE,
                          deterministic=True)
    else:
        ds = examples.interleave(_no_autograph(load_or_skip), cycle_length=4, block_length=1,
                                 num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
    ds = ds.take(num_batches * b).batch(b, drop_remainder=True).prefetch(AUTOTUNE)
    return EvalIterator(ds.with_options(_options()), num_batches, local, data, split)


def _host_split(split: str, process_index: int, process_count: int) -> str:
    import tensorflow_datasets as tfds

    return tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
