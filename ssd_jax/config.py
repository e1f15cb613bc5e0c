"""The config schema: every field of a run with its default and what it does, the fields each
dataset kind reads, the validation, and the fields a resumed run may change.

`get_config()` is the embedded default (the compact SSD on the synthetic shapes, minutes on a
2-core CPU); `experiments/configs/*.py` start from it and change a few fields, and any field is
overridden on the command line (`--config.num_train_steps=100`). How each default was chosen is
in experiments/RESULTS.md; the comments here say what a field does.

    config = ssd_jax.config.get_config()
    config.dataset.kind = "coco_json"; ...
    ssd_jax.config.validate(config)          # ConfigError naming the field, before any compile
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from ssd_jax.errors import ConfigError

if TYPE_CHECKING:  # imported by get_config only: the trainer's modules run on a bare host too
    import ml_collections

KINDS = ("synthetic", "coco_json", "voc_xml", "tfds")
#: fields of config.dataset each kind reads (every kind also reads KIND_COMMON)
KIND_FIELDS = {
    "synthetic": ("seed", "num_train", "num_eval", "num_test", "test_seed", "image_size",
                  "max_object_size", "cache_dir", "generate_processes"),
    "tfds": ("name", "data_dir", "train_split", "eval_split", "shuffle_buffer", "use_difficult"),
    "coco_json": ("train_annotations", "train_images", "eval_annotations", "eval_images"),
    "voc_xml": ("root", "train_split", "eval_split", "class_names", "use_difficult"),
}
KIND_COMMON = ("kind", "augment_photometric", "augment_expand", "max_expand", "augment_crop",
               "augment_flip", "augment_on_device", "canvas_size")
#: config.dataset fields that name files or folders: stored absolute (`resolve_paths`)
PATH_FIELDS = ("data_dir", "cache_dir", "train_annotations", "train_images", "eval_annotations",
               "eval_images", "root")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")

#: config fields a resumed run may change: run length, logging, eval and checkpoint cadence, and
#: what evaluation reports (a field or a group; everything else must equal the workdir's run).
RESUMABLE_FIELDS = ("num_train_steps", "log_every_steps", "eval_every_steps", "lost_process_timeout",
                    "checkpoint_every_steps", "keep_checkpoints", "num_eval_images_to_draw",
                    "draw_score_threshold", "eval_batch_size", "metric", "detect",
                    "init_checkpoint", "init_class_map",  # read when there is no checkpoint yet
                    "dataset.cache_dir", "dataset.data_dir")  # where data lives, not what it is


def get_config() -> ml_collections.ConfigDict:
    """The embedded default, every field declared once."""
    import ml_collections

    config = ml_collections.ConfigDict()

    # Model: a name from ssd_jax.models.MODELS; its prior spec fixes the input size.
    config.model = ml_collections.ConfigDict()
    config.model.name = "compact"      # a name of ssd_jax.models.MODELS (README: the models table)
    # Options of the "compact" builder (ssd_jax.models.compact_ssd); the other configs replace
    # config.model with their builder's options (the VGG16 builders: prior_spec, image_mean, image_std).
    config.model.freeze_bn = False     # BatchNorm keeps its running statistics in training (True:
                                       # for fine-tuning with small per-device batches)
    config.model.width_mult = 1.0      # multiplies every channel count
    config.model.depths = (0, 3, 1, 1)  # stride-1 3x3 convs after each backbone stage's stride-2 one
    config.model.top_down = False      # FPN-style fusion of the deeper maps into the source maps
    config.model.num_maps = 6          # source maps: 6 (strides 4..128, 3572 priors) or 5 (8..128)

    # Data: ssd_jax.data.pipeline reads config.dataset. Every field of every kind is declared
    # here (the fields of the other kinds are ignored); `validate` checks the ones the chosen
    # kind needs, so any kind can be set from the command line:
    #   --config.dataset.kind=coco_json --config.dataset.train_annotations=A.json ...
    config.dataset = ml_collections.ConfigDict()
    config.dataset.kind = "synthetic"  # synthetic | tfds | coco_json | voc_xml
    # kind=synthetic: ssd_jax.data.synthetic shapes, generated once and held in memory.
    config.dataset.seed = 0            # (synthetic) the images' seed (independent of config.seed)
    config.dataset.num_train = 16000   # (synthetic) training images (1.8 GB at 192 px)
    config.dataset.num_eval = 500      # (synthetic) validation images (a disjoint split)
    config.dataset.num_test = 1000     # (synthetic) held-out test images, evaluated once after
                                       # training; 0 = none
    config.dataset.test_seed = 1       # (synthetic) the test images' own seed
    config.dataset.image_size = 192    # (synthetic) side of the generated images
    config.dataset.max_object_size = 0.70  # (synthetic) largest shape side, fraction of the image
                                           # side (log-uniform from 0.05)
    config.dataset.cache_dir = ""      # (synthetic) folder for an .npz cache of the images; "" = none
    config.dataset.generate_processes = 2  # (synthetic) worker processes generating the images
                                           # while training compiles (0: in this process; the
                                           # images are the same either way)
    # kind=tfds: TFDS datasets prepared with `tfds build NAME --data_dir=DIR`.
    config.dataset.name = ""           # (tfds) e.g. "voc/2007+voc/2012" (joined) or "coco/2017"
    config.dataset.data_dir = ""       # (tfds) the folder the TFDS data was prepared in
    config.dataset.shuffle_buffer = 10_000  # (tfds) examples in the training shuffle buffer
    # kind=tfds and kind=voc_xml: split names.
    config.dataset.train_split = "trainval"  # (tfds, voc_xml) TFDS split or ImageSets/Main/<name>.txt
    config.dataset.eval_split = "test"       # (tfds, voc_xml) the evaluation split
    # kind=coco_json: COCO-format annotation files and image folders.
    config.dataset.train_annotations = ""  # (coco_json) training annotation .json
    config.dataset.train_images = ""       # (coco_json) folder of the training images
    config.dataset.eval_annotations = ""   # (coco_json) evaluation annotation .json
    config.dataset.eval_images = ""        # (coco_json) folder of the evaluation images
    # kind=voc_xml: a Pascal VOC-style folder.
    config.dataset.root = ""           # (voc_xml) folder with Annotations/, JPEGImages/, ImageSets/Main/
    config.dataset.class_names = ()    # (voc_xml) class names; () = the sorted names found in the XML
    config.dataset.use_difficult = True  # (tfds, voc_xml) train on objects marked difficult (eval
                                         # always ignores them, as the VOC devkit)
    # The paper's augmentation, each step switchable (the default keeps flips and photometric
    # distortion; the VOC/COCO configs use the full set).
    config.dataset.augment_photometric = True  # brightness, contrast, saturation, hue
    config.dataset.augment_expand = False      # zoom out with p 0.5 onto a mean-filled canvas
    config.dataset.max_expand = 4.0            # largest zoom-out ratio (the paper's 4)
    config.dataset.augment_crop = False        # min-IoU random crop (Caffe's 6 samplers x 50 trials)
    config.dataset.augment_flip = True         # horizontal flip with p 0.5
    # Where the augmentation runs: False = tf.data on the host CPU (ssd_jax.data.host_augment);
    # True = the host only decodes and places each image on a canvas, the jitted train step
    # augments on the accelerator (ssd_jax.device_augment).
    config.dataset.augment_on_device = False
    config.dataset.canvas_size = 192           # (augment_on_device) side of the uint8 canvas the
                                               # host places each image on (top-left; scaled down
                                               # only if larger); >= the largest image side
    config.max_boxes = 16              # ground truth per image, padded with label 0 ("no box")

    # Optimization.
    config.num_train_steps = 7500      # optimizer updates
    config.batch_size = 8              # global batch, split over all devices of all hosts
    config.optimizer = "adamw"         # "sgd" (momentum, Caffe-style L2) or "adamw"
    config.learning_rate = 1e-2        # peak learning rate
    config.schedule = "cosine"         # "cosine" (to 0 at the end) or "piecewise" (x lr_decay)
    config.warmup_steps = 500          # linear warmup from warmup_start_factor * lr
    config.warmup_start_factor = 0.0   # (piecewise schedule) first warmup lr = factor * lr
    config.lr_boundaries = ()          # (piecewise schedule) steps where lr is multiplied by lr_decay
    config.lr_decay = 0.1              # (piecewise schedule) the factor at each boundary
    config.momentum = 0.9              # (sgd) momentum
    config.weight_decay = 5e-4         # on conv kernels only (not biases, BN or L2Norm scales)
    config.grad_clip_norm = 0.0        # global-norm gradient clipping; 0 = off
    config.dtype = "float32"           # compute dtype: float32 | bfloat16 (params stay float32)
    config.seed = 0                    # init, data order and augmentation: a function of (seed, step)
    config.init_checkpoint = ""        # where the weights start: a converted checkpoint
                                       # (experiments.convert_torchvision) or a finished run's
                                       # workdir (its latest step); "" = random init. Heads
                                       # trained on other classes keep the rows of the classes
                                       # whose names match (ssd_jax.finetune)
    config.init_class_map = ""         # (init_checkpoint) "old:new,..." checkpoint class -> dataset
                                       # class, for the names that differ ("" = by name only)
    config.trainable = "all"           # all | all_but_backbone | heads: the rest is frozen (no
                                       # update, no weight decay, BatchNorm statistics fixed)

    # The loss (ssd_jax.loss.multibox_loss) and matching.
    config.matching_iou = 0.3          # prior <-> ground truth IoU for a positive (the paper: 0.5)
    config.neg_pos_ratio = 3.0         # hard negatives per positive, per image
    config.loc_weight = 1.0            # alpha of the paper's L = (L_conf + alpha L_loc) / N

    # Evaluation and detection (ssd_jax.postprocess.detect).
    config.metric = "voc07"            # voc07 (11-point mAP) | voc (area mAP) | coco (AP@[.5:.95])
    config.eval_batch_size = 64        # global eval batch; the last partial batch is padded + masked
    config.detect = ml_collections.ConfigDict()
    config.detect.score_threshold = 0.01  # detections below this score are dropped before NMS
    config.detect.pre_nms_top_k = 200  # candidates per class before NMS (paper: 400 for SSD300)
    config.detect.iou_threshold = 0.3  # NMS IoU (the paper: 0.45)
    config.detect.max_detections = 100  # kept per image after NMS (paper: 200)
    config.num_eval_images_to_draw = 8  # validation images drawn with predictions (TensorBoard, PNG)
    config.draw_score_threshold = 0.3  # detections drawn on those images score above this

    # Bookkeeping.
    config.log_every_steps = 200       # progress line + TensorBoard scalars every N steps
    config.eval_every_steps = 2000     # evaluation (mAP, pictures) every N steps; 0 = only at the end
    config.checkpoint_every_steps = 2000  # orbax checkpoint every N steps (and at the end); 0 = end only
    config.keep_checkpoints = 3        # checkpoints kept (the oldest are deleted)
    config.lost_process_timeout = 60.0  # (multi-process runs) seconds without a sign of life from
                                        # a process after which the others stop with a message
    return config


# ----------------------------------------------------------------------------- dataset paths


def normalize_path(path: str) -> str:
    """`path` absolute and normalized (no trailing slash, no `..`); "" and URLs (gs://...) as
    they are."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_paths(dataset: Any) -> None:
    """Every PATH_FIELDS entry of config.dataset `dataset`, in place, by `normalize_path`."""
    for name in PATH_FIELDS:
        if name in dataset and isinstance(dataset[name], str):
            dataset[name] = normalize_path(dataset[name])


# ----------------------------------------------------------------------------- validation


def validate(config: Any, num_devices: int | None = None, num_processes: int | None = None,
             check_data: bool = True, purpose: str = "train") -> None:
    """Raise ConfigError naming the field for a config that cannot run; called before any compile.

    With `check_data` (needs TensorFlow), config.dataset is checked too: the fields its kind
    needs and the files and folders they name. `purpose="eval"` checks only what evaluating a
    saved checkpoint needs (the eval split, eval_batch_size, the metric), so a run trained
    elsewhere (other devices, training data not copied) can be evaluated. Device and process
    counts default to JAX's.
    """
    import jax

    from ssd_jax import models
    from ssd_jax.evaluation import METRICS

    if purpose not in ("train", "eval"):
        raise ValueError(f"purpose must be 'train' or 'eval', got {purpose!r}")
    training = purpose == "train"
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_processes = jax.process_count() if num_processes is None else num_processes
    if check_data:
        from ssd_jax.data import sources

        sources.validate_dataset_config(config.dataset, ("train", "eval") if training else ("eval",))
    if config.model.name not in models.MODELS:
        raise ConfigError(f"config.model.name={config.model.name!r} is unknown; "
                          f"choose one of {tuple(models.MODELS)}")
    try:  # builds the module description only (checks its options and prior spec); no compile
        models.build_model(config.model.name, 2, **models.config_options(config))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None
    if config.dtype not in DTYPE_NAMES:
        raise ConfigError(f"config.dtype={config.dtype!r} is unknown; choose one of {DTYPE_NAMES}")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("config.dtype=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 (a dtype for "
                          "precision checks; train in float32 or bfloat16)")
    if config.metric not in METRICS:
        raise ConfigError(f"config.metric={config.metric!r} is unknown; choose one of {METRICS}")
    for name in ("batch_size", "eval_batch_size") if training else ("eval_batch_size",):
        value = config.get(name)
        if not isinstance(value, int) or value <= 0 or value % num_devices:
            raise ConfigError(
                f"config.{name}={value!r} must be a positive multiple of the device count "
                f"({num_devices}); the global batch is split evenly over all devices")
        if (value // num_processes) % (num_devices // num_processes):
            raise ConfigError(f"config.{name}={value} does not split evenly over "
                              f"{num_processes} processes")
    for name in ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        if int(config.get(name)) < 0:
            raise ConfigError(f"config.{name} must be >= 0, got {config.get(name)}")
    if int(config.log_every_steps) == 0:
        raise ConfigError("config.log_every_steps must be >= 1")
    if training and not float(config.lost_process_timeout) > 0:
        raise ConfigError(f"config.lost_process_timeout must be > 0 seconds, got "
                          f"{config.lost_process_timeout}")
    if config.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"config.optimizer={config.optimizer!r} must be 'sgd' or 'adamw'")
    if config.schedule not in ("cosine", "piecewise"):
        raise ConfigError(f"config.schedule={config.schedule!r} must be 'cosine' or 'piecewise'")
    if int(config.max_boxes) < 1:
        raise ConfigError(f"config.max_boxes must be >= 1, got {config.max_boxes}")
    bounds = tuple(config.lr_boundaries)
    if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bounds) or \
            list(bounds) != sorted(bounds):
        raise ConfigError(f"config.lr_boundaries={bounds!r} must be increasing positive step "
                          "numbers, e.g. --config.lr_boundaries=80000,100000")
    if training and config.init_checkpoint and not os.path.exists(config.init_checkpoint):
        raise ConfigError(f"config.init_checkpoint={config.init_checkpoint!r} does not exist")
    if config.get("trainable", "all") not in models.TRAINABLE:
        raise ConfigError(f"config.trainable={config.trainable!r} is unknown; choose one of "
                          f"{models.TRAINABLE}")
    if training and config.get("trainable", "all") != "all" and not config.init_checkpoint:
        raise ConfigError(f"config.trainable={config.trainable!r} freezes part of a randomly "
                          "initialized model: give config.init_checkpoint (the weights to "
                          "start from), or config.trainable=all")
    if config.get("init_class_map"):
        class_map(config.init_class_map)
        if not config.init_checkpoint:
            raise ConfigError(f"config.init_class_map={config.init_class_map!r} needs "
                              "config.init_checkpoint (the checkpoint whose classes it renames)")


def class_map(text: str) -> dict[str, str]:
    """config.init_class_map "old:new,old2:new2" -> {"old": "new", ...}; ConfigError naming the
    entry that is not "old:new"."""
    pairs = {}
    for entry in str(text).split(","):
        if not entry.strip():
            continue
        old, sep, new = entry.partition(":")
        if not sep or not old.strip() or not new.strip() or ":" in new:
            raise ConfigError(f"config.init_class_map: {entry.strip()!r} is not 'old:new' (a "
                              f"checkpoint class, a colon, a dataset class; entries separated "
                              f"by commas)")
        pairs[old.strip()] = new.strip()
    return pairs


# ----------------------------------------------------------------------------- resuming


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(saved: dict[str, Any], config: Any) -> list[str]:
    """'field: <saved> in the workdir, <now> now' for each field outside RESUMABLE_FIELDS whose
    value differs (fields the saved run did not have are not compared; dataset paths are
    compared normalized: 'coco/val/' and '/abs/coco/val' name one folder)."""
    old = _flatten(saved)
    new = _flatten(json.loads(config.to_json_best_effort()))
    for name in PATH_FIELDS:
        for values in (old, new):
            if isinstance(values.get(f"dataset.{name}"), str):
                values[f"dataset.{name}"] = normalize_path(values[f"dataset.{name}"])
    diffs = []
    for key in sorted(old):
        if any(key == f or key.startswith(f + ".") for f in RESUMABLE_FIELDS):
            continue
        if key not in new:
            diffs.append(f"{key}: {old[key]!r} in the workdir, not in this config")
        elif new[key] != old[key]:
            diffs.append(f"{key}: {old[key]!r} in the workdir, {new[key]!r} now")
    return diffs
