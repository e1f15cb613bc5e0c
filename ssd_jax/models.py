"""The SSD network as a Flax linen module (Liu et al., 2016, section 2.1 and Fig. 2).

    images [B,H,W,3] RGB in [0,255] -> (cls_logits [B,P,C], box_preds [B,P,4]), float32.

`SSD` composes, as torchvision's SSD does, a backbone module (normalized images -> the list of
source maps; see ssd_jax.backbones), the prior spec (ssd_jax.priors) and one 3x3 class head and
one 3x3 box head per source map. The normalization ((x - image_mean) / image_std) is a field of
the model, applied inside it. The registered builders:
  * `ssd300_vgg16`: the paper's SSD300 (and torchvision's ssd300_vgg16), VGG16SSDBackbone,
    6 source maps (38, 19, 10, 5, 3, 1 at 300 px).
  * `ssd512_vgg16`: SSD512 (Caffe ssd_pascal_512.py), VGG16SSDBackbone(highres=True), 7 maps
    (64, 32, 16, 8, 4, 2, 1 at 512 px).
  * `compact_ssd` ("compact"): CompactSSDBackbone, a narrow conv+BatchNorm network at 128 px
    with 6 source maps (32, 16, 8, 4, 2, 1; or 5 without the stride-4 map), cheap enough to
    train from scratch on a CPU (the embedded default).
  * `ssdlite320_mobilenet_v3`: torchvision's SSDLite320 (MobileNetV3SSDLiteBackbone with the
    SSDLiteHead), 6 maps (20, 10, 5, 3, 2, 1 at 320 px).
  * `ssd300_resnet50`: NVIDIA DeepLearningExamples' SSD300 with ResNet-50 (ResNet50SSDBackbone,
    the paper's 3x3 heads, SSD300_RESNET50 priors, ImageNet normalization), 6 maps (38, 19, 10,
    5, 3, 1 at 300 px).
The builders check the prior spec against the backbone's source maps by shape evaluation
(`check_prior_spec`); the module checks them again when it runs.

Priors and head outputs share one order (Caffe's and torchvision's): maps largest first, locations row-major,
the boxes of one location contiguous; a head's NHWC output [B,H,W,A*K] reshapes to [B,H*W*A,K].
Box predictions are offsets (dcx, dcy, dw, dh) against center-form priors (see box_coder).

Params are float32 (`param_dtype`); `dtype` is the compute dtype (bfloat16 on accelerators);
the outputs are always float32. BatchNorm (all but VGG16) keeps statistics in the "batch_stats"
collection: `model.apply(variables, x, train=True, mutable=["batch_stats"])`.

Variables: the SSD shares its scope with the backbone (`nn.share_scope`), so the backbone's
submodules ("backbone", and for VGG16 "conv4_3_norm" and "extras") sit next to the heads
"cls_head_k" and "box_head_k", the layout of the checkpoints written before backbones were
modules (tests/data/param_paths.json pins it).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssd_jax.backbones import (
    CompactSSDBackbone,
    MobileNetV3SSDLiteBackbone,
    ResNet50SSDBackbone,
    VGG16SSDBackbone,
)
from ssd_jax.backbones.compact import CompactNet
from ssd_jax.heads import SSDHead, SSDLiteHead
from ssd_jax.normalization import (
    CAFFE_MEAN,
    HALF_RANGE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHVISION_MEAN,
    UNIT_STD,
)
from ssd_jax.priors import (
    COMPACT6_PRIORS,
    COMPACT_PRIORS,
    SSD300_RESNET50,
    SSD300_VOC,
    SSD512_VOC,
    SSDLITE320,
    PriorSpec,
    prior_spec_by_name,
)

Dtype = Any
RGB = tuple[float, float, float]

#: What trains (SSD.trainable, config.trainable): everything; everything but the pretrained base
#: network (the "backbone" variables); the classification and box heads only.
TRAINABLE = ("all", "all_but_backbone", "heads")

__all__ = ["CAFFE_MEAN", "COMPACT6_PRIORS", "COMPACT_PRIORS", "DTYPES", "HALF_RANGE",
           "IMAGENET_MEAN", "IMAGENET_STD", "MODELS", "SSD", "TORCHVISION_MEAN", "TRAINABLE",
           "build_model", "check_prior_spec", "compact_ssd", "config_options", "flops_per_image",
           "from_config", "init_variables", "source_map_sizes", "ssd300_resnet50", "ssd300_vgg16",
           "ssd512_vgg16", "ssdlite320_mobilenet_v3", "trainable_mask"]


@functools.lru_cache(maxsize=64)
def source_map_sizes(backbone: nn.Module, image_size: int) -> tuple[int, ...]:
    """Side of each source map `backbone` produces from a square image of `image_size` pixels,
    by shape evaluation of the backbone on a [1,S,S,3] input (nothing is computed)."""
    backbone = backbone.clone(parent=None)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    maps = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x)[0], x)
    for k, m in enumerate(maps):
        if m.shape[1] != m.shape[2]:
            raise ValueError(f"source map {k} of {type(backbone).__name__} is not square at "
                             f"{image_size} px: {m.shape[1]}x{m.shape[2]}")
    return tuple(int(m.shape[1]) for m in maps)


def check_prior_spec(backbone: nn.Module, prior_spec: PriorSpec) -> None:
    """ValueError unless prior_spec's feature maps are the backbone's source maps (count and
    sides, at prior_spec.image_size)."""
    name, size = type(backbone).__name__, prior_spec.image_size
    got = source_map_sizes(backbone, size)
    spec = tuple(prior_spec.feature_map_sizes)
    if len(got) != len(spec):
        raise ValueError(f"prior_spec has {len(spec)} feature maps but the {name} network has "
                         f"{len(got)} source maps")
    if got != spec:
        raise ValueError(f"prior_spec.feature_map_sizes {spec} do not match the {name} "
                         f"network's source maps {got} at image_size {size}")


class SSD(nn.Module):
    """SSD: backbone (normalized images -> source maps) + per-map class and box heads.

    Attributes:
      backbone: a linen module, `backbone(x [B,S,S,3], train) -> [source maps [B,f_k,f_k,C_k]]`
        (ssd_jax.backbones); its variables share the SSD's scope.
      prior_spec: the priors; its map sizes and boxes per location must match the network.
      num_classes: C, counting the background class 0.
      head: `head(sources, num_classes, boxes_per_location, train) -> (cls, box)` (ssd_jax.heads);
        None: the paper's 3x3 conv heads (`SSDHead`). Its variables share the SSD's scope too.
      dtype: compute dtype of the heads (and of the images fed to the backbone, whose own dtype
        the builders set alike); params stay `param_dtype` (float32) and the outputs float32.
      image_mean, image_std: RGB in [0,255] units; the model feeds (images - mean) / std to the
        backbone (Caffe's mean for VGG16 and compact; TORCHVISION_MEAN for converted weights;
        127.5 and 127.5, i.e. [-1, 1], for MobileNetV3; IMAGENET_MEAN and IMAGENET_STD for
        ResNet-50).
      freeze_bn: BatchNorm layers (backbone and head) always normalize with their running
        statistics and never update them, also with train=True (their scale and bias still
        train); for fine-tuning with small per-device batches.
      trainable: which parts train (one of TRAINABLE): "all"; "all_but_backbone" (the
        pretrained base network, the "backbone" variables, is frozen); "heads" (only the
        cls_head_k / box_head_k). In training, the BatchNorm layers of the frozen parts normalize
        with their running statistics and leave them as they are, and with "heads" no gradient
        flows into the feature extractor; the optimizer freezes the parameters
        (`trainable_mask`). Inference is the same for every value.
    """

    backbone: nn.Module
    prior_spec: PriorSpec
    num_classes: int
    head: nn.Module | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    image_mean: RGB = CAFFE_MEAN
    image_std: RGB = UNIT_STD
    freeze_bn: bool = False
    trainable: str = "all"

    # The backbone shares the SSD's scope, where the name "backbone" is taken by a submodule of the
    # backbone (VGG16's conv1_1..fc7, the compact network), so the backbone module itself is
    # attached under another name, kept by adoption (`preserve_adopted_names`); so is the head.
    preserve_adopted_names = True

    def __post_init__(self):
        if self.backbone.name is None:
            object.__setattr__(self, "backbone", self.backbone.clone(name="source_maps"))
        if self.head is None:
            object.__setattr__(self, "head", SSDHead(dtype=self.dtype, param_dtype=self.param_dtype,
                                                     name="heads"))
        elif self.head.name is None:
            object.__setattr__(self, "head", self.head.clone(name="heads"))
        super().__post_init__()
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable={self.trainable!r}; valid: {', '.join(TRAINABLE)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, "
                             f"got {self.num_classes}")

    def setup(self):
        nn.share_scope(self, self.backbone)
        nn.share_scope(self, self.head)

    @property
    def image_size(self) -> int:
        """Input side in pixels (square images)."""
        return self.prior_spec.image_size

    @property
    def num_priors(self) -> int:
        return self.prior_spec.num_priors

    def with_bn_axis_name(self, axis_name: str | None) -> SSD:
        """This model with the BatchNorm of its backbone and head averaging train-mode batch
        statistics over the named axis `axis_name` (None: local); unchanged without BatchNorm."""
        changes = {}
        for part in ("backbone", "head"):
            module = getattr(self, part)
            if "axis_name" in {f.name for f in dataclasses.fields(module)}:
                changes[part] = module.clone(axis_name=axis_name)
        return self.clone(**changes) if changes else self

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """images [B,H,W,3] RGB in [0,255] (uint8 or float), H = W = prior_spec.image_size.

        Returns cls_logits float32 [B,P,C] and box_preds float32 [B,P,4] (encoded offsets),
        P = prior_spec.num_priors, in the prior order of `generate_priors(prior_spec)`.
        """
        size = self.prior_spec.image_size
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC RGB [B,H,W,3], got shape {images.shape}")
        if images.shape[1:3] != (size, size):
            raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} but "
                             f"prior_spec.image_size is {size}")
        x = images.astype(jnp.float32) - jnp.asarray(self.image_mean, jnp.float32)
        x = x / jnp.asarray(self.image_std, jnp.float32)  # exact for the unit std
        bn_train = train and not self.freeze_bn
        sources = self.backbone(x.astype(self.dtype), bn_train and self.trainable != "heads",
                                base_train=bn_train and self.trainable == "all")
        if self.trainable == "heads":  # the frozen feature extractor needs no gradient
            sources = [jax.lax.stop_gradient(s) for s in sources]

        spec = tuple(self.prior_spec.feature_map_sizes)
        if len(sources) != len(spec):
            raise ValueError(f"prior_spec has {len(spec)} feature maps but the "
                             f"{type(self.backbone).__name__} network has {len(sources)} "
                             f"source maps")
        for k, (src, f) in enumerate(zip(sources, spec, strict=True)):
            if src.shape[1:3] != (f, f):
                raise ValueError(f"source map {k} is {src.shape[1]}x{src.shape[2]} but "
                                 f"prior_spec.feature_map_sizes[{k}] is {f}")
        cls_logits, box_preds = self.head(sources, self.num_classes,
                                          self.prior_spec.boxes_per_location, bn_train)
        return cls_logits.astype(jnp.float32), box_preds.astype(jnp.float32)


def _checked(model: SSD) -> SSD:
    check_prior_spec(model.backbone, model.prior_spec)
    return model


def _prior_spec(spec: PriorSpec | str) -> PriorSpec:
    """A PriorSpec, or the preset of that name (`ssd_jax.priors.PRIOR_SPECS`)."""
    return prior_spec_by_name(spec) if isinstance(spec, str) else spec


def _rgb(value: Sequence[float], name: str) -> RGB:
    """Three floats (a config's list or tuple), else ValueError naming the option."""
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must be 3 values (R, G, B in [0, 255] units), got {value!r}")
    return values  # type: ignore[return-value]


def ssd300_vgg16(num_classes: int, prior_spec: PriorSpec | str = SSD300_VOC,
                 dtype: Dtype = jnp.float32, image_mean: Sequence[float] = CAFFE_MEAN,
                 image_std: Sequence[float] = UNIT_STD) -> SSD:
    """The paper's SSD300 (VGG16, 6 maps, 8732 priors with SSD300_VOC).

    prior_spec: a PriorSpec or a preset's name ("ssd300_voc", "ssd300_coco",
    "ssd300_torchvision"); image_mean, image_std: RGB, [0, 255] units (Caffe's mean, unit std).
    """
    return _checked(SSD(backbone=VGG16SSDBackbone(dtype=dtype), prior_spec=_prior_spec(prior_spec),
                        num_classes=num_classes, dtype=dtype,
                        image_mean=_rgb(image_mean, "image_mean"),
                        image_std=_rgb(image_std, "image_std")))


def ssd512_vgg16(num_classes: int, prior_spec: PriorSpec | str = SSD512_VOC,
                 dtype: Dtype = jnp.float32, image_mean: Sequence[float] = CAFFE_MEAN,
                 image_std: Sequence[float] = UNIT_STD) -> SSD:
    """The paper's SSD512 (VGG16, 7 maps, 24564 priors with SSD512_VOC or SSD512_COCO).

    prior_spec: a PriorSpec or a preset's name ("ssd512_voc", "ssd512_coco"); image_mean,
    image_std: RGB, [0, 255] units (Caffe's mean, unit std).
    """
    return _checked(SSD(backbone=VGG16SSDBackbone(highres=True, dtype=dtype),
                        prior_spec=_prior_spec(prior_spec), num_classes=num_classes, dtype=dtype,
                        image_mean=_rgb(image_mean, "image_mean"),
                        image_std=_rgb(image_std, "image_std")))


def compact_ssd(num_classes: int, dtype: Dtype = jnp.float32,
                prior_spec: PriorSpec | str | None = None, width_mult: float = 1.0,
                top_down: bool = False, num_maps: int = 6, freeze_bn: bool = False,
                depths: Sequence[int] = (0, 3, 1, 1)) -> SSD:
    """The compact conv+BN SSD at 128 px for CPU training from scratch.

    num_maps 6 (COMPACT6_PRIORS, strides 4..128, 3572 priors) or 5 (COMPACT_PRIORS, strides
    8..128, 1524 priors); an explicit prior_spec overrides it (the backbone then has as many
    source maps as the spec has feature maps). depths: the 3x3 stride-1 convs after each of the 4
    backbone stages' stride-2 conv (see `CompactNet`).
    """
    depths = tuple(depths)
    if len(depths) != len(CompactNet.widths) or not all(
            isinstance(d, int) and d >= 0 for d in depths):
        raise ValueError(f"compact_ssd: depths must be {len(CompactNet.widths)} whole numbers >= 0 "
                         f"(3x3 convs after each backbone stage's stride-2 conv), got {depths}")
    if isinstance(prior_spec, str):
        prior_spec = prior_spec_by_name(prior_spec)
    if prior_spec is None:
        if num_maps not in (5, 6):
            raise ValueError(f"compact_ssd: num_maps must be 5 or 6, got {num_maps}")
        prior_spec = COMPACT_PRIORS if num_maps == 5 else COMPACT6_PRIORS
    backbone = CompactSSDBackbone(width_mult=width_mult, depths=depths, top_down=top_down,
                                  num_maps=len(prior_spec.feature_map_sizes), dtype=dtype)
    return _checked(SSD(backbone=backbone, prior_spec=prior_spec, num_classes=num_classes,
                        dtype=dtype, freeze_bn=freeze_bn))


def ssdlite320_mobilenet_v3(num_classes: int, dtype: Dtype = jnp.float32,
                            freeze_bn: bool = False, reduced_tail: bool = True) -> SSD:
    """torchvision's ssdlite320_mobilenet_v3_large: MobileNetV3-Large (reduced tail) + SSDLite
    extras and heads, SSDLITE320 priors (3234 at 320 px), inputs scaled to [-1, 1]."""
    return _checked(SSD(backbone=MobileNetV3SSDLiteBackbone(reduced_tail=reduced_tail, dtype=dtype),
                        prior_spec=SSDLITE320, num_classes=num_classes,
                        head=SSDLiteHead(dtype=dtype), dtype=dtype, image_mean=HALF_RANGE,
                        image_std=HALF_RANGE, freeze_bn=freeze_bn))


def ssd300_resnet50(num_classes: int, dtype: Dtype = jnp.float32, freeze_bn: bool = False) -> SSD:
    """NVIDIA DeepLearningExamples' SSD300 with ResNet-50: ResNet50SSDBackbone (torchvision
    ResNet-50 through layer3 at stride 8 + NVIDIA's BN extras), the paper's 3x3 heads,
    SSD300_RESNET50 priors (8732 at 300 px; 4, 6, 6, 6, 4, 4 boxes per location) and ImageNet
    normalization."""
    return _checked(SSD(backbone=ResNet50SSDBackbone(dtype=dtype), prior_spec=SSD300_RESNET50,
                        num_classes=num_classes, dtype=dtype, image_mean=IMAGENET_MEAN,
                        image_std=IMAGENET_STD, freeze_bn=freeze_bn))


MODELS = {"ssd300_vgg16": ssd300_vgg16, "ssd512_vgg16": ssd512_vgg16, "compact": compact_ssd,
          "ssdlite320_mobilenet_v3": ssdlite320_mobilenet_v3, "ssd300_resnet50": ssd300_resnet50}


def build_model(name: str, num_classes: int, dtype: Dtype = jnp.float32, **options: Any) -> SSD:
    """The model registered as `name` (a key of MODELS: "ssd300_vgg16", "ssd512_vgg16",
    "compact", "ssdlite320_mobilenet_v3", "ssd300_resnet50").

    `options` go to the builder (e.g. width_mult=1.5 for "compact"); unknown ones are an error.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    builder = MODELS[name]
    known = set(inspect.signature(builder).parameters) - {"num_classes", "dtype"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"model {name!r} has no option {', '.join(unknown)}; "
                         f"its options: {', '.join(sorted(known)) or 'none'}")
    return builder(num_classes, dtype=dtype, **options)


#: config.dtype -> compute dtype. "float64" (params, optimizer state and compute in float64;
#: needs JAX_ENABLE_X64=1) is for tests: it shows which differences are float32 rounding.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}


def trainable_mask(params: Any, trainable: str) -> Any:
    """A tree like `params` (an SSD's params: "backbone", "extras", "conv4_3_norm", "cls_head_k",
    "box_head_k" at the top) of bools: True where the leaf trains under `trainable` (TRAINABLE)."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable={trainable!r}; valid: {', '.join(TRAINABLE)}")

    def trains(name: str) -> bool:
        if trainable == "heads":
            return name.startswith(("cls_head_", "box_head_"))
        return trainable == "all" or name != "backbone"

    return {name: jax.tree.map(functools.partial(lambda t, _: t, trains(name)), sub)
            for name, sub in params.items()}


def config_options(config: Any) -> dict[str, Any]:
    """config.model's fields other than `name`: keyword options of the model's builder."""
    return {k: v for k, v in config.model.items() if k != "name"}


def from_config(config: Any, num_classes: int, axis_name: str | None = None) -> SSD:
    """The SSD of `config.model` (`ssd_jax.config`) with `num_classes` (incl. background), in
    `config.dtype`. BatchNorm layers (if any) reduce their batch statistics over `axis_name`:
    the data axis inside a shard_mapped train step, None (the default) elsewhere."""
    model = build_model(config.model.name, num_classes, DTYPES[config.dtype],
                        **config_options(config))
    # runs saved before config.trainable existed trained everything
    model = model.clone(trainable=config.get("trainable", "all"))
    return model.with_bn_axis_name(axis_name)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: SSD, rng: jax.Array, batch: int) -> dict[str, Any]:
    size = model.prior_spec.image_size
    return model.init(rng, jnp.zeros((batch, size, size, 3), jnp.float32), train=False)


def init_variables(model: SSD, rng: jax.Array, batch: int = 1) -> dict[str, Any]:
    """Initialized variables ({"params": ..., maybe "batch_stats": ...}) of `model`, jitted
    (compiled once per model configuration)."""
    return _init(model, rng, batch)


def flops_per_image(model: SSD) -> float:
    """Multiply-accumulates of one forward pass per image (XLA's cost analysis of the forward
    compiled for the host CPU, flops / 2; on GPU the analysis leaves out cuDNN's convolutions);
    handy to compare models without timing."""
    size = model.prior_spec.image_size
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32, sharding=cpu)
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu),
                             jax.eval_shape(lambda: init_variables(model, jax.random.key(0))))
    lowered = jax.jit(lambda v, im: model.apply(v, im)).lower(variables, x)
    cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return float((cost or {}).get("flops", math.nan)) / 2.0
