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
The builders check the prior spec against the backbone's source maps by shape evaluation
(`check_prior_spec`); the module checks them again when it runs.

Priors and head outputs share one order (Caffe's and torchvision's): maps largest first, locations row-major,
the boxes of one location contiguous; a head's NHWC output [B,H,W,A*K] reshapes to [B,H*W*A,K].
Box predictions are offsets (dcx, dcy, dw, dh) against center-form priors (see box_coder).

Params are float32 (`param_dtype`); `dtype` is the compute dtype (bfloat16 on accelerators);
the outputs are always float32. BatchNorm (compact only) keeps statistics in the "batch_stats"
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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssd_jax.backbones import CompactSSDBackbone, VGG16SSDBackbone
from ssd_jax.priors import COMPACT6_PRIORS, COMPACT_PRIORS, SSD300_VOC, SSD512_VOC, PriorSpec

Dtype = Any
RGB = tuple[float, float, float]

__all__ = ["CAFFE_MEAN", "COMPACT6_PRIORS", "COMPACT_PRIORS", "MODELS", "SSD", "TORCHVISION_MEAN",
           "build_model", "check_prior_spec", "compact_ssd", "flops_per_image", "init_variables",
           "source_map_sizes", "ssd300_vgg16", "ssd512_vgg16"]

#: Caffe's SSD mean (RGB) in [0, 255] pixel units.
CAFFE_MEAN = (123.0, 117.0, 104.0)
#: torchvision's ssd300_vgg16 mean ([0.48235, 0.45882, 0.40784] * 255): exact for converted weights.
TORCHVISION_MEAN = (0.48235 * 255.0, 0.45882 * 255.0, 0.40784 * 255.0)
#: Unit std: Caffe's and torchvision's SSD300 divide [0,255] pixels by nothing (torchvision's
#: image_std 1/255 on [0,1] inputs is the same).
UNIT_STD = (1.0, 1.0, 1.0)

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


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


class HeadParams(nn.Module):
    """The parameters of one 3x3 prediction head on a source map, laid out as `nn.Conv`'s
    ("kernel" [3,3,C_in,N] Xavier-uniform, "bias" [N] zeros); `SSD` applies the class and box
    heads of a map as one convolution."""

    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, src: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        kernel = self.param("kernel", xavier_uniform, (3, 3, src.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", zeros, (self.features,), self.param_dtype)
        return kernel, bias


class SSD(nn.Module):
    """SSD: backbone (normalized images -> source maps) + per-map 3x3 class and box heads.

    Attributes:
      backbone: a linen module, `backbone(x [B,S,S,3], train) -> [source maps [B,f_k,f_k,C_k]]`
        (ssd_jax.backbones); its variables share the SSD's scope.
      prior_spec: the priors; its map sizes and boxes per location must match the network.
      num_classes: C, counting the background class 0.
      dtype: compute dtype of the heads (and of the images fed to the backbone, whose own dtype
        the builders set alike); params stay `param_dtype` (float32) and the outputs float32.
      image_mean, image_std: RGB in [0,255] units; the model feeds (images - mean) / std to the
        backbone (Caffe's mean for VGG16 and compact; TORCHVISION_MEAN for converted weights).
    """

    backbone: nn.Module
    prior_spec: PriorSpec
    num_classes: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    image_mean: RGB = CAFFE_MEAN
    image_std: RGB = UNIT_STD

    # The backbone shares the SSD's scope, where the name "backbone" is taken by a submodule of the
    # backbone (VGG16's conv1_1..fc7, the compact network), so the backbone module itself is
    # attached under another name, kept by adoption (`preserve_adopted_names`).
    preserve_adopted_names = True

    def __post_init__(self):
        if self.backbone.name is None:
            object.__setattr__(self, "backbone", self.backbone.clone(name="source_maps"))
        super().__post_init__()
        if self.num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, "
                             f"got {self.num_classes}")

    def setup(self):
        nn.share_scope(self, self.backbone)

    @property
    def image_size(self) -> int:
        """Input side in pixels (square images)."""
        return self.prior_spec.image_size

    @property
    def num_priors(self) -> int:
        return self.prior_spec.num_priors

    def with_bn_axis_name(self, axis_name: str | None) -> SSD:
        """This model with its backbone's BatchNorm averaging train-mode batch statistics over
        the named axis `axis_name` (None: local); unchanged if the backbone has no BatchNorm."""
        if "axis_name" not in {f.name for f in dataclasses.fields(self.backbone)}:
            return self
        return self.clone(backbone=self.backbone.clone(axis_name=axis_name))

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
        sources = self.backbone(x.astype(self.dtype), train)

        spec = tuple(self.prior_spec.feature_map_sizes)
        if len(sources) != len(spec):
            raise ValueError(f"prior_spec has {len(spec)} feature maps but the "
                             f"{type(self.backbone).__name__} network has {len(sources)} "
                             f"source maps")
        bpl = self.prior_spec.boxes_per_location
        cls_out, box_out = [], []
        for k, (src, a, f) in enumerate(zip(sources, bpl, spec, strict=True)):
            if src.shape[1:3] != (f, f):
                raise ValueError(f"source map {k} is {src.shape[1]}x{src.shape[2]} but "
                                 f"prior_spec.feature_map_sizes[{k}] is {f}")
            # The class and box heads are two 3x3 convs (parameters "cls_head_k" and "box_head_k",
            # as in the paper and torchvision) computed as one conv of the concatenated kernels.
            n_cls = a * self.num_classes
            kc, bc = HeadParams(n_cls, param_dtype=self.param_dtype, name=f"cls_head_{k}")(src)
            kb, bb = HeadParams(a * 4, param_dtype=self.param_dtype, name=f"box_head_{k}")(src)
            kernel = jnp.concatenate([kc, kb], axis=-1).astype(self.dtype)
            y = jax.lax.conv_general_dilated(src.astype(self.dtype), kernel, (1, 1),
                                             ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = y + jnp.concatenate([bc, bb]).astype(self.dtype)
            c, b = y[..., :n_cls], y[..., n_cls:]
            batch = src.shape[0]
            cls_out.append(c.reshape(batch, -1, self.num_classes))
            box_out.append(b.reshape(batch, -1, 4))
        cls_logits = jnp.concatenate(cls_out, axis=1).astype(jnp.float32)
        box_preds = jnp.concatenate(box_out, axis=1).astype(jnp.float32)
        return cls_logits, box_preds


def _checked(model: SSD) -> SSD:
    check_prior_spec(model.backbone, model.prior_spec)
    return model


def ssd300_vgg16(num_classes: int, prior_spec: PriorSpec = SSD300_VOC,
                 dtype: Dtype = jnp.float32, image_mean: RGB = CAFFE_MEAN) -> SSD:
    """The paper's SSD300 (VGG16, 6 maps, 8732 priors with SSD300_VOC)."""
    return _checked(SSD(backbone=VGG16SSDBackbone(dtype=dtype), prior_spec=prior_spec,
                        num_classes=num_classes, dtype=dtype, image_mean=image_mean))


def ssd512_vgg16(num_classes: int, prior_spec: PriorSpec = SSD512_VOC,
                 dtype: Dtype = jnp.float32) -> SSD:
    """The paper's SSD512 (VGG16, 7 maps, 24564 priors with SSD512_VOC)."""
    return _checked(SSD(backbone=VGG16SSDBackbone(highres=True, dtype=dtype),
                        prior_spec=prior_spec, num_classes=num_classes, dtype=dtype))


def compact_ssd(num_classes: int, dtype: Dtype = jnp.float32,
                prior_spec: PriorSpec | None = None, width_mult: float = 1.0,
                top_down: bool = False, num_maps: int = 6) -> SSD:
    """The compact conv+BN SSD at 128 px for CPU training from scratch.

    num_maps 6 (COMPACT6_PRIORS, strides 4..128, 3572 priors) or 5 (COMPACT_PRIORS, strides
    8..128, 1524 priors); an explicit prior_spec overrides it (the backbone then has as many
    source maps as the spec has feature maps).
    """
    if prior_spec is None:
        if num_maps not in (5, 6):
            raise ValueError(f"compact_ssd: num_maps must be 5 or 6, got {num_maps}")
        prior_spec = COMPACT_PRIORS if num_maps == 5 else COMPACT6_PRIORS
    backbone = CompactSSDBackbone(width_mult=width_mult, top_down=top_down,
                                  num_maps=len(prior_spec.feature_map_sizes), dtype=dtype)
    return _checked(SSD(backbone=backbone, prior_spec=prior_spec, num_classes=num_classes,
                        dtype=dtype))


MODELS = {"ssd300_vgg16": ssd300_vgg16, "ssd512_vgg16": ssd512_vgg16, "compact": compact_ssd}


def build_model(name: str, num_classes: int, dtype: Dtype = jnp.float32, **options: Any) -> SSD:
    """The model registered as `name` ("ssd300_vgg16", "ssd512_vgg16" or "compact").

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


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: SSD, rng: jax.Array, batch: int) -> dict[str, Any]:
    size = model.prior_spec.image_size
    return model.init(rng, jnp.zeros((batch, size, size, 3), jnp.float32), train=False)


def init_variables(model: SSD, rng: jax.Array, batch: int = 1) -> dict[str, Any]:
    """Initialized variables ({"params": ..., maybe "batch_stats": ...}) of `model`, jitted
    (compiled once per model configuration)."""
    return _init(model, rng, batch)


def flops_per_image(model: SSD) -> float:
    """Multiply-accumulates of one forward pass per image (XLA's cost analysis of the lowered
    forward, flops / 2); handy to compare models without timing."""
    size = model.prior_spec.image_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    cost = jax.jit(lambda v, im: model.apply(v, im)).lower(variables, x).cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", math.nan)) / 2.0
