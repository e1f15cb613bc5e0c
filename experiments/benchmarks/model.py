"""Model suite: forward and train-step throughput of each registered model.

The train step is the product's: `train.make_steps(config, model, tx).train` (the shard_mapped,
jitted step that `train_and_evaluate` runs: `match_batch`, forward, `multibox_loss` with hard
negative mining, value + grad, SGD momentum + weight decay, state donated) with the optimizer of
`train.create_optimizer`, under the training fields of experiments/configs/ssd300_voc.py
(`voc_train_config`), on synthetic data already on the device. The peer is torchvision's
ssd300_vgg16 at the same batch: backbone + head forward (no post-processing) and the train step
`model(images, targets)` loss + backward + SGD. The peer of ssdlite320_mobilenet_v3 is
torchvision's ssdlite320_mobilenet_v3_large (320 px), timed the same way; ssd512_vgg16,
ssd300_resnet50 and the compact model have none (torchvision ships none of them), and their
rows note their cost relative to SSD300 when it runs too. Each forward row notes the model's
priors, parameters and multiply-adds per image (`models.flops_per_image`). With SSD300 in fp32,
one more row times `augment.augment_batch` (every step on, 512 px canvases -> 300, 64 padded
boxes as ssd300_voc's) at the same batch: the device mode's augmentation, as a share of the train
step.

    python -m experiments.benchmark --suite=model [--model_batch=8] [--dtype=bf16] [--nopeer]
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import flags

from experiments.benchmarks.common import (
    Row,
    achieved,
    dtype_items,
    int_items,
    items,
    time_jax,
    time_torch,
)
from ssd_jax import models, train
from ssd_jax.errors import UserError

MODEL_NAMES = ("ssd300_vgg16", "ssd512_vgg16", "ssdlite320_mobilenet_v3", "ssd300_resnet50",
               "compact")
#: Our model -> (torchvision.models.detection builder, its input side): the peers.
PEERS = {"ssd300_vgg16": ("ssd300_vgg16", 300),
         "ssdlite320_mobilenet_v3": ("ssdlite320_mobilenet_v3_large", 320)}
NUM_CLASSES = 21
MAX_BOXES = 8


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list("model_batch", None, "model suite: comma-separated images per step "
                      "(default 2 on CPU, 1,32,64 on accelerators; 1 with --quick).", flag_values=fv)
    flags.DEFINE_list("model_dtypes", None, "model suite: comma-separated fp32,bf16 (default: "
                      "--dtype on CPU or with --quick, both on accelerators).", flag_values=fv)
    flags.DEFINE_list("model_names", list(MODEL_NAMES), "model suite: comma-separated models to "
                      f"time ({', '.join(MODEL_NAMES)}).", flag_values=fv)
    if "dtype" not in fv:  # another suite may share the flag
        flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "model suite: compute dtype when "
                          "--model_dtypes is not given, on CPU or with --quick (params stay "
                          "float32).", flag_values=fv)


def _synthetic(batch: int, size: int, seed: int = 0):
    """uint8 images [B,S,S,3], corner boxes [B,M,4] in [0,1], labels [B,M] (some padding)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    xy = rng.uniform(0.0, 0.6, (batch, MAX_BOXES, 2))
    wh = rng.uniform(0.05, 0.4, (batch, MAX_BOXES, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, 1.0)], axis=-1).astype(np.float32)
    labels = rng.integers(1, NUM_CLASSES, (batch, MAX_BOXES)).astype(np.int32)
    labels[:, MAX_BOXES // 2:] = 0  # half padding
    return images, boxes, labels


class _Config(dict):
    """Attribute access over a dict: what the trainer reads of a ConfigDict, without ml_collections
    (absent on a bare accelerator host)."""

    __getattr__ = dict.__getitem__


#: The fields of experiments/configs/ssd300_voc.py that the train step and optimizer read
#: (tests/test_benchmark.py checks that they still agree).
VOC_TRAIN_FIELDS = dict(
    seed=0, init_checkpoint="", matching_iou=0.5, neg_pos_ratio=3.0, loc_weight=1.0,
    optimizer="sgd", learning_rate=1e-3, schedule="piecewise", lr_boundaries=(80_000, 100_000),
    lr_decay=0.1, warmup_steps=1000, warmup_start_factor=1.0 / 3, momentum=0.9,
    weight_decay=5e-4, num_train_steps=120_000, grad_clip_norm=0.0,
)


def voc_train_config(name: str, dtype_name: str) -> _Config:
    """The SSD300 VOC recipe's step-relevant config for model `name` in fp32 or bf16 compute."""
    # detect: the eval step beside the train step is built, never run here (the paper's values)
    return _Config(VOC_TRAIN_FIELDS, model=_Config(name=name),
                   dataset=_Config(augment_on_device=False),
                   detect=_Config(score_threshold=0.01, pre_nms_top_k=400, iou_threshold=0.45,
                                  max_detections=200),
                   dtype="bfloat16" if dtype_name == "bf16" else "float32")


#: The canvas the device-mode rows resample from (the VOC/COCO configs' canvas_size).
AUGMENT_CANVAS = 512
#: Padded boxes per image of that row: ssd300_voc's max_boxes (the crop sampler tests each of its
#: 6 x 50 patches against every one of them).
AUGMENT_MAX_BOXES = 64


def _time_augment(size: int, batch: int, timing: dict) -> float:
    """Seconds per call of `augment.augment_batch` (every step on) from uint8 canvases of
    AUGMENT_CANVAS px to `size`: what the device mode adds to each train step."""
    import jax.numpy as jnp

    from ssd_jax import device_augment as augment

    images, _, _ = _synthetic(batch, AUGMENT_CANVAS)
    rng = np.random.default_rng(1)
    lo = rng.uniform(0.0, 0.6, (batch, AUGMENT_MAX_BOXES, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(0.05, 0.4, lo.shape)], -1).astype(np.float32)
    labels = np.zeros((batch, AUGMENT_MAX_BOXES), np.int32)
    labels[:, :3] = 1  # VOC's mean: ~3 objects, the rest padding
    sizes = np.tile(np.asarray([[375, 500]], np.int32), (batch, 1))
    keys = augment.example_keys(jax.random.key(0), jnp.arange(batch, dtype=jnp.uint32))
    fn = jax.jit(lambda k, *a: augment.augment_batch(k, *a, out_size=size))
    args = jax.device_put((keys, images, sizes, boxes, labels))
    return time_jax(lambda: fn(*args), **timing)


def describe(model: models.SSD, variables: Any, macs: float) -> str:
    """'P priors, N.NM params, G.G GMAC/img' of `model` (`macs`: `models.flops_per_image`)."""
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    return f"{model.num_priors} priors, {n / 1e6:.1f}M params, {macs / 1e9:.2f} GMAC/img"


def train_step(config: Any, model: models.SSD, batch: int) -> Any:
    """`run_step()`: one product train step of `model` under `config` on a synthetic batch
    already on the device (the state donated and kept); returns the loss."""
    images, boxes, labels = _synthetic(batch, model.prior_spec.image_size)
    tx = train.create_optimizer(config)
    steps = train.make_steps(config, model, tx, jax.make_mesh((1,), ("data",)))
    state = [jax.device_put(train.create_train_state(config, model, tx), steps.replicated)]
    data = steps.global_batch({"image": images, "boxes": boxes, "labels": labels},
                              ("image", "boxes", "labels"))

    def run_step():
        state[0], metrics = steps.train(state[0], data)
        return metrics["loss"]

    return run_step


def _time_ours(name: str, batch: int, dtype_name: str, timing: dict
               ) -> tuple[float, float, str, str]:
    """(forward, train step) seconds per call of our model `name`, its description, and the
    train step's achieved TFLOP/s (counted as three forward passes)."""
    config = voc_train_config(name, dtype_name)
    model = models.from_config(config, NUM_CLASSES, axis_name="data")
    images, _, _ = _synthetic(batch, model.prior_spec.image_size)

    plain = model.with_bn_axis_name(None)  # the forward runs outside shard_map
    variables = models.init_variables(plain, jax.random.key(0))
    macs = models.flops_per_image(plain)  # one compile of the forward's cost analysis
    about = describe(plain, variables, macs)
    fwd = jax.jit(lambda v, x: plain.apply(v, x))
    dev_images = jax.device_put(images)
    t_fwd = time_jax(lambda: fwd(variables, dev_images), **timing)

    run_step = train_step(config, model, batch)
    t_step = time_jax(run_step, **timing)
    rate = ""
    if jax.devices()[0].platform != "cpu":  # against an accelerator's peak; on CPU: images/s
        # forward + backward ~ 3 forwards (the backward computes two convolutions per forward one)
        flops = 3 * 2 * macs * batch
        rate = achieved(flops, t_step, dtype_name) + " (step ~ 3 forwards)"
    return t_fwd, t_step, about, rate


def _time_torchvision(name: str, batch: int, bf16: bool,
                      timing: dict) -> tuple[float, float | None]:
    """(forward, train step) seconds per call of torchvision's peer of our model `name`; the
    train step is None where torchvision cannot train at this batch (SSDLite at batch 1: its
    BatchNorm on the 1x1 extra maps raises "Expected more than 1 value per channel")."""
    import torch
    import torchvision

    builder, size = PEERS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, builder)(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES).to(device)
    images_np, boxes_np, labels_np = _synthetic(batch, size)
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).float().div(255).to(device)
    image_list = list(images)
    targets = []
    for b, lab in zip(boxes_np, labels_np, strict=True):
        keep = lab > 0
        targets.append({"boxes": torch.from_numpy(b[keep] * size).to(device),
                        "labels": torch.from_numpy(lab[keep]).long().to(device)})
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)

    model.eval()
    normalized = torch.stack([model.transform.normalize(im) for im in image_list])

    def forward():
        with torch.no_grad(), autocast:
            return model.head(list(model.backbone(normalized).values()))

    t_fwd = time_torch(forward, **timing)

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            losses = model(image_list, targets)
        loss = sum(losses.values())
        loss.backward()
        opt.step()
        return loss

    try:
        t_step = time_torch(train_step, **timing)
    except ValueError as e:
        if "more than 1 value per channel" not in str(e):
            raise
        return t_fwd, None
    return t_fwd, t_step


def run(args: Any) -> list[Row]:
    """Forward and train-step rows for every (batch, dtype) and model asked for, with the
    torchvision peers."""
    quick = getattr(args, "quick", False)
    on_cpu = jax.devices()[0].platform == "cpu"
    batches = int_items(getattr(args, "model_batch", None), "model_batch") or (
        [1] if quick else ([2] if on_cpu else [1, 32, 64]))
    dtypes = dtype_items(getattr(args, "model_dtypes", None), "model_dtypes") or (
        [getattr(args, "dtype", "fp32")] if on_cpu or quick else ["fp32", "bf16"])
    names = items(getattr(args, "model_names", MODEL_NAMES))
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown or not names:
        what = f"{unknown[0]!r} is not a model" if unknown else "no model given"
        raise UserError(f"--model_names: {what}; the models are {','.join(MODEL_NAMES)}")
    cases = getattr(args, "model_cases", None) or [(b, d) for d in dtypes for b in batches]
    rows = []
    for batch, dtype_name in cases:
        rows += _run_one(args, names, batch, dtype_name, quick)
    return rows


def _run_one(args: Any, names: list[str], batch: int, dtype_name: str, quick: bool) -> list[Row]:
    timing = (dict(warmup=1, min_time=0.2, min_iters=1) if quick
              else dict(warmup=2, min_time=2.0, min_iters=3))
    tag = f"b={batch} {dtype_name}"

    rows = []
    ssd300_step = None
    for name in names:
        t_fwd, t_step, about, rate = _time_ours(name, batch, dtype_name, timing)
        peer = (None, None)
        if getattr(args, "peer", True) and name in PEERS:
            try:
                peer = _time_torchvision(name, batch, dtype_name == "bf16", timing)
            except ImportError as e:
                print(f"(torchvision peer skipped: {e})")
        note = ""
        if name == "ssd300_vgg16":
            ssd300_step = t_step
        elif ssd300_step is not None:
            note = f"train step {ssd300_step / t_step:.1f}x SSD300's images/s"
        note = ", ".join(x for x in (rate, note) if x)
        if peer[0] and peer[1] is None:
            note = ", ".join(x for x in (note, "torchvision cannot train it at batch 1 (BatchNorm "
                                         "over one value)") if x)
        rows.append(Row(f"model/forward {name} {tag}", batch / t_fwd,
                        batch / peer[0] if peer[0] else None, note=about))
        rows.append(Row(f"model/train_step {name} {tag}", batch / t_step,
                        batch / peer[1] if peer[1] else None, note=note))
        if name == "ssd300_vgg16" and dtype_name == "fp32":
            try:
                t_aug = _time_augment(300, batch, timing)
            except ImportError as e:  # dm-pix (the HSV conversions) absent, e.g. a bare GPU image
                print(f"(augment_batch row skipped: {e})")
                continue
            rows.append(Row(f"model/augment_batch {AUGMENT_CANVAS}->300 {tag}", batch / t_aug,
                            note=f"the device mode's augmentation: {100 * t_aug / t_step:.1f}% "
                                 "of the SSD300 train step"))
    return rows
