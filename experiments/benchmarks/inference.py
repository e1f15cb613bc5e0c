"""Suite `inference`: end-to-end inference of each model, images -> final fixed-size detections.

Ours: `ssd_jax.inference.make_detect_fn`'s jitted function (what `experiments.predict` runs) of
uint8 images already on the device: the network (model.apply), decode, per-class NMS and the
final top 200 (`postprocess.detect` with torchvision's settings, `TORCHVISION_DETECT`: score >
0.01, top 400 per class, NMS 0.45, 200 per image). The peer: torchvision's ssd300_vgg16 in eval
mode, `model(images)` end to end (its transform normalizes and resizes, which is the identity at
300x300, then backbone, head and `postprocess_detections`), on [0,1] float images already on its
device.

Both nets compute the same function: a seeded torchvision model whose classification head is
scaled so that background dominates (outputs shaped like a trained model's: a few hundred
candidates per image, a few dozen final detections, not the dense worst case of random logits)
is converted with `convert.from_torchvision_ssd`. bf16 runs our compute in bfloat16 (params and
outputs float32) and the peer under `torch.autocast(bfloat16)`.

SSDLite320 is timed the same way against torchvision's ssdlite320_mobilenet_v3_large (converted
with `convert.from_torchvision_ssdlite`, torchvision's SSDLite settings: score > 0.001, top 300,
NMS 0.55, 300 per image). ssd512_vgg16, ssd300_resnet50 and compact have no torchvision peer: ours only, on
random weights made trained-like the same way (class head scaled, background bias), with
torchvision's SSD300 settings.

    python -m experiments.benchmark --suite=inference [--inference_batches=1,32,64]
        [--inference_dtypes=fp32,bf16] [--inference_models=ssd300_vgg16,...] [--quick] [--nopeer]

Imports jax/numpy/absl, ssd_jax's core and ssd_jax.inference (numpy, Pillow) at module level,
torch lazily (for the weights and the peer); without torch the suite times ours on a randomly
initialized SSD300 of the same shape.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.benchmarks.common import (
    Row,
    achieved,
    dtype_items,
    int_items,
    time_jax,
    time_torch,
)
from ssd_jax import inference as ssd_inference
from ssd_jax import models, priors
from ssd_jax.errors import UserError

NUM_CLASSES = 91  # torchvision's COCO head
DETECT = dict(ssd_inference.TORCHVISION_DETECT)
HEAD_SCALE, BACKGROUND_BIAS = 0.3, 12.0  # trained-like class head (background dominates)

#: model -> (row label, torchvision builder or None, head scale, background bias). Randomly
#: initialized networks give nearly the same logits everywhere, so a setting yields all or no
#: candidates; these give some (SSDLite: the dense worst case, 300 per image; the row notes the
#: count, the same for ours and the peer).
INFERENCE_MODELS = {
    "ssd300_vgg16": ("SSD300", "ssd300_vgg16", HEAD_SCALE, BACKGROUND_BIAS),
    "ssd512_vgg16": ("SSD512", None, HEAD_SCALE, BACKGROUND_BIAS),
    "ssdlite320_mobilenet_v3": ("SSDLite320", "ssdlite320_mobilenet_v3_large", 40.0, 4.0),
    "ssd300_resnet50": ("SSD300-ResNet50", None, 0.15, BACKGROUND_BIAS),
    "compact": ("compact", None, 0.15, BACKGROUND_BIAS),
}

DEFAULT_BATCHES, DEFAULT_DTYPES = ["1", "32", "64"], ["fp32", "bf16"]


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list("inference_batches", DEFAULT_BATCHES, "inference suite: comma-separated "
                      "batch sizes (--quick: 1).", flag_values=fv)
    flags.DEFINE_list("inference_dtypes", DEFAULT_DTYPES, "inference suite: comma-separated "
                      "compute dtypes, fp32 and/or bf16 (--quick: fp32 unless given).",
                      flag_values=fv)
    flags.DEFINE_list("inference_models", list(INFERENCE_MODELS), "inference suite: "
                      f"comma-separated models ({', '.join(INFERENCE_MODELS)}).", flag_values=fv)


def torchvision_model(seed: int = 0, name: str = "ssd300_vgg16") -> Any:
    """Seeded torchvision peer of our model `name` (eval mode) with a background-dominant class
    head."""
    import torch
    import torchvision

    _, builder, scale, bias = INFERENCE_MODELS[name]
    torch.manual_seed(seed)
    model = getattr(torchvision.models.detection, builder)(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    with torch.no_grad():
        for head in model.head.classification_head.module_list:
            conv = head if isinstance(head, torch.nn.Conv2d) else head[-1]  # SSDLite: dw + 1x1
            conv.weight.mul_(scale)
            conv.bias.view(-1, NUM_CLASSES)[:, 0] += bias
    return model.eval()


def _trained_like(model: models.SSD, variables: Any, scale: float, bias: float) -> Any:
    """Random variables with the class heads' last layer scaled and the background biased."""
    params = dict(variables["params"])
    for k in range(len(model.prior_spec.feature_map_sizes)):
        head = dict(params[f"cls_head_{k}"])
        last = dict(head["pointwise"]) if "pointwise" in head else head
        last["kernel"] = last["kernel"] * scale
        last["bias"] = last["bias"].reshape(-1, NUM_CLASSES).at[:, 0].add(bias).reshape(-1)
        if "pointwise" in head:
            head["pointwise"] = last
        else:
            head = last
        params[f"cls_head_{k}"] = head
    return {**variables, "params": params}


def our_model(state_dict: Any | None, dtype: Any, name: str = "ssd300_vgg16"
              ) -> tuple[models.SSD, Any]:
    """Our model `name` with the converted torchvision weights (or, without a state dict,
    random ones made trained-like)."""
    if state_dict is not None:
        from ssd_jax import convert

        return convert.from_torchvision_detector(state_dict, dtype=dtype)[1:]
    if name == "ssd300_vgg16":
        model = models.ssd300_vgg16(NUM_CLASSES, prior_spec=priors.SSD300_TORCHVISION,
                                    dtype=dtype, image_mean=models.TORCHVISION_MEAN)
    else:
        model = models.build_model(name, NUM_CLASSES, dtype=dtype)
    _, _, scale, bias = INFERENCE_MODELS[name]
    return model, _trained_like(model, models.init_variables(model, jax.random.key(0)), scale,
                                bias)


def make_inference_fn(model: models.SSD, name: str = "ssd300_vgg16") -> Any:
    """jit(variables, uint8 images [B,S,S,3]) -> postprocess.Detections (fixed size): the
    function `python -m experiments.predict` runs, with torchvision's detection settings of the
    model (SSD300's for models torchvision does not have)."""
    return ssd_inference.make_detect_fn(model, ssd_inference.TORCHVISION_DETECT_OF.get(name, DETECT))


def images_batch(batch: int, seed: int = 0, size: int = 300) -> np.ndarray:
    """uint8 [B,S,S,3]: smooth random blobs (photo-like low frequencies) plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (batch, 10, 10, 3))
    cell = -(-size // 10)
    smooth = np.repeat(np.repeat(coarse, cell, axis=1), cell, axis=2)[:, :size, :size]
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def _time_peer(tv_model: Any, images: np.ndarray, bf16: bool, timing: dict) -> tuple[float, float]:
    """(seconds per call, detections per image) of torchvision's eval-mode model(images)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tv_model.to(device)
    x = list(torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).to(device))
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)

    def fn():
        with torch.no_grad(), autocast:
            return model(x)

    dets = fn()
    per_image = float(np.mean([len(d["scores"]) for d in dets]))
    return time_torch(fn, **timing), per_image


def run(args: Any) -> list[Row]:
    quick = getattr(args, "quick", False)
    asked_dtypes = getattr(args, "inference_dtypes", DEFAULT_DTYPES)
    batches = int_items(getattr(args, "inference_batches", DEFAULT_BATCHES), "inference_batches")
    dtypes = dtype_items(asked_dtypes, "inference_dtypes")
    if not batches or not dtypes:
        raise UserError("--inference_batches and --inference_dtypes need at least one entry")
    if quick:
        batches = [1]
        dtypes = dtypes[:1] if list(asked_dtypes) == DEFAULT_DTYPES else dtypes
    timing = (dict(warmup=1, min_time=0.0, min_iters=1) if quick
              else dict(warmup=2, min_time=2.0, min_iters=3))
    want_peer = getattr(args, "peer", True)

    names = [str(n) for n in getattr(args, "inference_models", None) or INFERENCE_MODELS]
    unknown = [n for n in names if n not in INFERENCE_MODELS]
    if unknown:
        raise UserError(f"--inference_models: {unknown[0]!r} is not a model; the models are "
                        f"{','.join(INFERENCE_MODELS)}")
    cases = getattr(args, "inference_cases", None)
    if cases:  # explicit (batch, dtype) pairs, e.g. the --targets rows
        batches = sorted({b for b, _ in cases})
        dtypes = list(dict.fromkeys(d for _, d in cases))
    rows = []
    for name in names:
        rows += _run_model(name, batches, dtypes, cases, want_peer, timing)
    return rows


def _run_model(name: str, batches: list[int], dtypes: list[str], cases: Any, want_peer: bool,
               timing: dict) -> list[Row]:
    label, builder, _, _ = INFERENCE_MODELS[name]
    tv_model, state_dict = None, None
    if builder is not None:
        try:
            tv_model = torchvision_model(name=name)
            state_dict = tv_model.state_dict()
        except ImportError as e:
            print(f"(inference: torch/torchvision unavailable ({e}); ours only, random weights)")
    rows = []
    for dtype_name in dtypes:
        dtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
        model, variables = our_model(state_dict, dtype, name)
        variables = jax.device_put(variables)
        infer = make_inference_fn(model, name)
        on_accelerator = jax.devices()[0].platform != "cpu"  # TFLOP/s against its peak
        macs = models.flops_per_image(model) if on_accelerator else 0.0
        for batch in batches:
            if cases and (batch, dtype_name) not in cases:
                continue
            host = images_batch(batch, size=model.prior_spec.image_size)
            images = jax.device_put(host)
            dets = jax.device_get(infer(variables, images))
            sec = time_jax(lambda f=infer, v=variables, x=images: f(v, x), **timing)
            peer, note = None, f"{np.mean(dets.num_detections):.0f} dets/img"
            if on_accelerator:
                note += f", {achieved(2 * macs * batch, sec, dtype_name)}"
            if want_peer and tv_model is not None:
                peer_sec, peer_dets = _time_peer(tv_model, host, dtype_name == "bf16", timing)
                peer = batch / peer_sec
                note += f" (torchvision {peer_dets:.0f})"
            rows.append(Row(f"inference e2e {label} {NUM_CLASSES} cls {dtype_name} batch {batch}",
                            batch / sec, peer, note=note))
    return rows
