"""The SSD network as a Flax linen module (Liu et al., 2016, section 2.1 and Fig. 2).

    images [B,H,W,3] RGB in [0,255] -> (cls_logits [B,P,C], box_preds [B,P,4]), float32.

Three architectures share one `SSD` module:
  * "vgg16": the paper's SSD300 (and torchvision's ssd300_vgg16): VGG16 conv1_1..conv5_3 with pool3
    in ceil mode, pool5 3x3/s1/p1, fc6 = 3x3 conv 1024 dilation 6, fc7 = 1x1 conv 1024, L2Norm on
    conv4_3 (scale 20), extras conv8..conv11; 6 source maps (38, 19, 10, 5, 3, 1 at 300 px).
  * "vgg16_512": SSD512 (Caffe ssd_pascal_512.py): the same backbone, five stride-2 extras and a
    final 4x4 conv; 7 source maps (64, 32, 16, 8, 4, 2, 1 at 512 px).
  * "compact": a narrow conv+BatchNorm network at 128 px with 6 source maps (32, 16, 8, 4, 2, 1;
    or 5 without the stride-4 map), cheap enough to train from scratch on a CPU (the embedded
    default).

Priors and head outputs share one order (Caffe's and torchvision's): maps largest first, locations row-major,
the boxes of one location contiguous; a head's NHWC output [B,H,W,A*K] reshapes to [B,H*W*A,K].
Box predictions are offsets (dcx, dcy, dw, dh) against center-form priors (see box_coder).

Params are float32 (`param_dtype`); `dtype` is the compute dtype (bfloat16 on accelerators);
the outputs are always float32. BatchNorm (compact only) keeps statistics in the "batch_stats"
collection: `model.apply(variables, x, train=True, mutable=["batch_stats"])`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssd_jax.priors import SSD300_VOC, SSD512_VOC, PriorSpec

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]

#: Caffe's SSD mean (RGB) in [0, 255] pixel units.
CAFFE_MEAN = (123.0, 117.0, 104.0)
#: torchvision's ssd300_vgg16 mean ([0.48235, 0.45882, 0.40784] * 255): exact for converted weights.
TORCHVISION_MEAN = (0.48235 * 255.0, 0.45882 * 255.0, 0.40784 * 255.0)

ARCHS = ("vgg16", "vgg16_512", "compact")

_COMPACT_SCALES = (0.06, 0.16, 0.34, 0.52, 0.70, 0.88)

#: Priors of the compact model: 128 px, 5 maps (strides 8..128); the smallest prior side is 6% of
#: the image, so objects from ~5% to ~70% of the image side each have a well-overlapping prior.
COMPACT_PRIORS = PriorSpec(
    image_size=128,
    feature_map_sizes=(16, 8, 4, 2, 1),
    steps=(8, 16, 32, 64, 128),
    min_sizes=tuple(s * 128 for s in _COMPACT_SCALES[:-1]),
    max_sizes=tuple(s * 128 for s in _COMPACT_SCALES[1:]),
    aspect_ratios=((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0,), (2.0,)),
)

#: Priors of the compact model with a sixth, stride-4 source map (32x32, two aspect-1 boxes of
#: 4% and 5.7% of the image): objects of 5-8% of the image side get priors whose centres are at
#: most 1.6% of the image away (a stride-8 grid leaves 38% of them without a prior at IoU 0.5).
COMPACT6_PRIORS = PriorSpec(
    image_size=128,
    feature_map_sizes=(32, 16, 8, 4, 2, 1),
    steps=(4, 8, 16, 32, 64, 128),
    min_sizes=tuple(s * 128 for s in (0.04, 0.08) + _COMPACT_SCALES[1:-1]),
    max_sizes=tuple(s * 128 for s in (0.08,) + _COMPACT_SCALES[1:]),
    aspect_ratios=((),) + COMPACT_PRIORS.aspect_ratios,
)

xavier_uniform = nn.initializers.xavier_uniform()
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision VGG
zeros = nn.initializers.zeros


def _pad(p: int) -> Padding:
    return ((p, p), (p, p))


def _conv_out(n: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _pool_ceil_out(n: int, k: int, s: int) -> int:
    return -(-(n - k) // s) + 1


def expected_feature_map_sizes(arch: str, image_size: int, num_maps: int | None = None
                               ) -> tuple[int, ...]:
    """Side of each source map that `arch` produces from a square image of `image_size` pixels.

    num_maps: "compact" only, 5 (default: strides 8..128) or 6 (adds the stride-4 map).
    """
    if arch in ("vgg16", "vgg16_512"):
        n = image_size // 2 // 2  # pool1, pool2 (floor)
        n = _pool_ceil_out(n, 2, 2)  # pool3, ceil mode
        sizes = [n]
        n = n // 2  # pool4; pool5 3x3/s1/p1 and fc6 (pad 6, dilation 6) keep the size
        sizes.append(n)
        if arch == "vgg16":
            for _ in range(2):
                n = _conv_out(n, 3, 2, 1)
                sizes.append(n)
            for _ in range(2):
                n = _conv_out(n, 3, 1, 0)
                sizes.append(n)
        else:
            for _ in range(4):
                n = _conv_out(n, 3, 2, 1)
                sizes.append(n)
            n = _conv_out(n, 4, 1, 1)
            sizes.append(n)
        return tuple(sizes)
    if arch == "compact":
        n = image_size
        sizes = []
        for _ in range(7):
            n = _conv_out(n, 3, 2, 1)
            sizes.append(n)
        return tuple(sizes[-(num_maps or 5):])
    raise ValueError(f"unknown SSD arch {arch!r}; valid: {', '.join(ARCHS)}")


def _max_pool_ceil(x: jnp.ndarray, k: int, s: int) -> jnp.ndarray:
    """Max pool with PyTorch's ceil_mode=True (extra -inf padding at the bottom/right)."""
    h, w = x.shape[1], x.shape[2]
    ph = (_pool_ceil_out(h, k, s) - 1) * s + k - h
    pw = (_pool_ceil_out(w, k, s) - 1) * s + k - w
    return nn.max_pool(x, (k, k), (s, s), padding=((0, ph), (0, pw)))


class VGG16Backbone(nn.Module):
    """VGG16 conv1_1..conv5_3 + pool5 (3x3/s1/p1) + fc6 (3x3, dilation 6) + fc7 (1x1), ReLUs.

    Input: normalized float images [B,H,W,3]. Returns (conv4_3 [B,H/8,W/8,512] after ReLU,
    before L2Norm; fc7 [B,H/16,W/16,1024] after ReLU); pool3 uses ceil mode (75 -> 38 at 300 px).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _conv(self, x, name, features, k=3, p=1, d=1, init=kaiming_fan_out):
        x = nn.Conv(features, (k, k), padding=_pad(p), kernel_dilation=(d, d), dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=init, bias_init=zeros,
                    name=name)(x)
        return nn.relu(x)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        stages = ((1, 64, 2), (2, 128, 2), (3, 256, 3), (4, 512, 3))
        for stage, features, repeats in stages:
            for i in range(1, repeats + 1):
                x = self._conv(x, f"conv{stage}_{i}", features)
            if stage == 3:
                x = _max_pool_ceil(x, 2, 2)
            elif stage < 3:
                x = nn.max_pool(x, (2, 2), (2, 2))
        conv4_3 = x
        x = nn.max_pool(x, (2, 2), (2, 2))
        for i in range(1, 4):
            x = self._conv(x, f"conv5_{i}", 512)
        x = nn.max_pool(x, (3, 3), (1, 1), padding=_pad(1))
        x = self._conv(x, "fc6", 1024, k=3, p=6, d=6, init=xavier_uniform)
        x = self._conv(x, "fc7", 1024, k=1, p=0, init=xavier_uniform)
        return conv4_3, x


class L2Norm(nn.Module):
    """x / max(||x||_2 over channels, eps) * scale, scale per channel (init 20), as torchvision.

    The normalization runs in float32 whatever the compute dtype; the output is cast back.
    """

    scale_init: float = 20.0
    eps: float = 1e-12  # torch.nn.functional.normalize
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.constant(self.scale_init), (x.shape[-1],),
                           self.param_dtype)
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        return (xf / jnp.maximum(norm, self.eps) * scale).astype(x.dtype)


class VGGExtras(nn.Module):
    """Extra feature layers after fc7 (ReLU after every conv), each block 1x1 then 3x3 or 4x4.

    SSD300 (highres=False): conv8 (1x1-256, 3x3 s2 p1-512), conv9 (1x1-128, 3x3 s2 p1-256),
    conv10 and conv11 (1x1-128, 3x3 p0-256). SSD512 (highres=True, Caffe): conv8..conv11 all
    3x3 s2 p1, then conv12 (1x1-128, 4x4 p1-256). Returns the block outputs, largest first.
    """

    highres: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        if self.highres:
            blocks = [(256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1),
                      (128, 256, 3, 2, 1), (128, 256, 4, 1, 1)]
        else:
            blocks = [(256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0),
                      (128, 256, 3, 1, 0)]
        outs = []
        for i, (mid, out, k, s, p) in enumerate(blocks):
            n = i + 8
            x = nn.relu(nn.Conv(mid, (1, 1), padding="VALID", dtype=self.dtype,
                                param_dtype=self.param_dtype, kernel_init=xavier_uniform,
                                bias_init=zeros, name=f"conv{n}_1")(x))
            x = nn.relu(nn.Conv(out, (k, k), strides=(s, s), padding=_pad(p), dtype=self.dtype,
                                param_dtype=self.param_dtype, kernel_init=xavier_uniform,
                                bias_init=zeros, name=f"conv{n}_2")(x))
            outs.append(x)
        return outs


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm + ReLU."""

    features: int
    kernel: int = 3
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        p = (self.kernel - 1) // 2
        x = nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.stride,) * 2,
                    padding=_pad(p), use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=kaiming_fan_out, name="conv")(x)
        # use_fast_variance=False: var = E[(x - mean)^2], not E[x^2] - E[x]^2, whose cancellation
        # on raw-pixel-scale activations made 8-device and 1-device steps differ by up to 1%.
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         use_fast_variance=False, axis_name=self.axis_name if train else None,
                         dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x)


class CompactBackbone(nn.Module):
    """Narrow conv+BN backbone and extras: 7 stride-2 stages, the last `num_sources` are the
    source maps.

    128 px -> 64 (24 ch) -> 32 (48) -> 16 (96) -> 8 (192) -> 4, 2, 1 (128 each, after a 1x1-64
    bottleneck); sources 32, 16, 8, 4, 2, 1 (num_sources=6) or 16, ..., 1 (5). About 0.12 GMAC per
    128 px image with the heads. top_down: FPN-style fusion into the stage sources (see below).
    """

    widths: Sequence[int] = (24, 48, 96, 192)
    extra_width: int = 128
    num_extras: int = 3
    num_sources: int = 5
    top_down: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> list[jnp.ndarray]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name)
        outs = []
        for i, w in enumerate(self.widths):
            x = ConvBN(w, 3, 2, name=f"stage{i + 1}_down", **kw)(x, train)
            if i > 0:
                x = ConvBN(w, 3, 1, name=f"stage{i + 1}_conv", **kw)(x, train)
            if i >= len(self.widths) + self.num_extras - self.num_sources:
                outs.append(x)
        num_stage_sources = len(outs)
        for j in range(self.num_extras):
            x = ConvBN(self.extra_width // 2, 1, 1, name=f"extra{j + 1}_1", **kw)(x, train)
            x = ConvBN(self.extra_width, 3, 2, name=f"extra{j + 1}_2", **kw)(x, train)
            outs.append(x)
        if self.top_down:
            # Top-down fusion (FPN-style): each source map of the backbone stages gets the next
            # coarser (already fused) map, 1x1-projected to its width and upsampled 2x (nearest),
            # added before a 3x3 ConvBN.
            for k in reversed(range(num_stage_sources)):
                coarse = ConvBN(outs[k].shape[-1], 1, 1, name=f"lateral{k}", **kw)(outs[k + 1], train)
                b, h, w, c = coarse.shape
                up = jnp.broadcast_to(coarse[:, :, None, :, None, :], (b, h, 2, w, 2, c))
                outs[k] = ConvBN(outs[k].shape[-1], 3, 1, name=f"fuse{k}", **kw)(
                    outs[k] + up.reshape(b, 2 * h, 2 * w, c), train)
        return outs


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
    """SSD: backbone + source maps + per-map 3x3 class and box heads.

    Attributes:
      num_classes: C, counting the background class 0.
      prior_spec: the priors; its map sizes and boxes per location must match the network.
      arch: "vgg16" (SSD300), "vgg16_512" (SSD512) or "compact".
      dtype: compute dtype; params stay `param_dtype` (float32) and the outputs float32.
      image_mean: RGB mean in [0,255] units subtracted inside the model.
      width_mult: "compact" only: multiplies every backbone width (1.0 -> 24, 48, 96, 192).
      bn_axis_name: "compact" only: with train=True, BatchNorm averages its batch statistics
        over this named axis (synchronized BN inside shard_map/pmap over "data"); None: local.
    """

    num_classes: int
    prior_spec: PriorSpec = SSD300_VOC
    arch: str = "vgg16"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    image_mean: tuple[float, float, float] = CAFFE_MEAN
    width_mult: float = 1.0
    top_down: bool = False
    bn_axis_name: str | None = None

    def __post_init__(self):
        super().__post_init__()
        expected = expected_feature_map_sizes(self.arch, self.prior_spec.image_size,
                                              len(self.prior_spec.feature_map_sizes))
        spec = tuple(self.prior_spec.feature_map_sizes)
        if len(expected) != len(spec):
            raise ValueError(
                f"prior_spec has {len(spec)} feature maps but the {self.arch!r} network has "
                f"{len(expected)} source maps"
            )
        if expected != spec:
            raise ValueError(
                f"prior_spec.feature_map_sizes {spec} do not match the {self.arch!r} network's "
                f"source maps {expected} at image_size {self.prior_spec.image_size}"
            )
        if self.num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, "
                             f"got {self.num_classes}")

    @property
    def image_size(self) -> int:
        """Input side in pixels (square images)."""
        return self.prior_spec.image_size

    @property
    def num_priors(self) -> int:
        return self.prior_spec.num_priors

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
        x = x.astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.arch in ("vgg16", "vgg16_512"):
            conv4_3, fc7 = VGG16Backbone(name="backbone", **kw)(x)
            sources = [L2Norm(param_dtype=self.param_dtype, name="conv4_3_norm")(conv4_3), fc7]
            sources += VGGExtras(highres=self.arch == "vgg16_512", name="extras", **kw)(fc7)
        else:
            m = self.width_mult
            sources = CompactBackbone(
                widths=tuple(max(8, round(w * m)) for w in CompactBackbone.widths),
                extra_width=max(8, round(CompactBackbone.extra_width * m)),
                num_sources=len(self.prior_spec.feature_map_sizes), top_down=self.top_down,
                axis_name=self.bn_axis_name, name="backbone", **kw)(x, train)

        bpl = self.prior_spec.boxes_per_location
        cls_out, box_out = [], []
        for k, (src, a) in enumerate(zip(sources, bpl, strict=True)):
            f = self.prior_spec.feature_map_sizes[k]
            if src.shape[1:3] != (f, f):
                raise ValueError(f"source map {k} is {src.shape[1]}x{src.shape[2]} but "
                                 f"prior_spec.feature_map_sizes[{k}] is {f}")
            # The class and box heads are two 3x3 convs (parameters "cls_head_k" and "box_head_k",
            # as in the paper and torchvision) computed as one conv of the concatenated kernels.
            n_cls = a * self.num_classes
            kc, bc = HeadParams(n_cls, param_dtype=self.param_dtype, name=f"cls_head_{k}")(src)
            kb, bb = HeadParams(a * 4, param_dtype=self.param_dtype, name=f"box_head_{k}")(src)
            kernel = jnp.concatenate([kc, kb], axis=-1).astype(self.dtype)
            y = jax.lax.conv_general_dilated(src.astype(self.dtype), kernel, (1, 1), _pad(1),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = y + jnp.concatenate([bc, bb]).astype(self.dtype)
            c, b = y[..., :n_cls], y[..., n_cls:]
            batch = src.shape[0]
            cls_out.append(c.reshape(batch, -1, self.num_classes))
            box_out.append(b.reshape(batch, -1, 4))
        cls_logits = jnp.concatenate(cls_out, axis=1).astype(jnp.float32)
        box_preds = jnp.concatenate(box_out, axis=1).astype(jnp.float32)
        return cls_logits, box_preds


def ssd300_vgg16(num_classes: int, prior_spec: PriorSpec = SSD300_VOC,
                 dtype: Dtype = jnp.float32, image_mean: tuple[float, float, float] = CAFFE_MEAN
                 ) -> SSD:
    """The paper's SSD300 (VGG16, 6 maps, 8732 priors with SSD300_VOC)."""
    return SSD(num_classes=num_classes, prior_spec=prior_spec, arch="vgg16", dtype=dtype,
               image_mean=image_mean)


def ssd512_vgg16(num_classes: int, prior_spec: PriorSpec = SSD512_VOC,
                 dtype: Dtype = jnp.float32) -> SSD:
    """The paper's SSD512 (VGG16, 7 maps, 24564 priors with SSD512_VOC)."""
    return SSD(num_classes=num_classes, prior_spec=prior_spec, arch="vgg16_512", dtype=dtype)


def compact_ssd(num_classes: int, dtype: Dtype = jnp.float32,
                prior_spec: PriorSpec | None = None, width_mult: float = 1.0,
                top_down: bool = False, num_maps: int = 6) -> SSD:
    """The compact conv+BN SSD at 128 px for CPU training from scratch.

    num_maps 6 (COMPACT6_PRIORS, strides 4..128, 3572 priors) or 5 (COMPACT_PRIORS, strides
    8..128, 1524 priors); an explicit prior_spec overrides it.
    """
    if prior_spec is None:
        if num_maps not in (5, 6):
            raise ValueError(f"compact_ssd: num_maps must be 5 or 6, got {num_maps}")
        prior_spec = COMPACT_PRIORS if num_maps == 5 else COMPACT6_PRIORS
    return SSD(num_classes=num_classes, prior_spec=prior_spec, arch="compact", dtype=dtype,
               width_mult=width_mult, top_down=top_down)


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
