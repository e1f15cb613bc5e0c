"""The MobileNetV3-Large backbone of SSDLite320 (Howard et al., 2019, section 6.3; torchvision's
`ssdlite320_mobilenet_v3_large`).

MobileNetV3-Large (hardswish, squeeze-excitation with a hard sigmoid, BatchNorm eps 0.001) with
the "reduced tail" of torchvision's COCO weights (the C4 and C5 stages at half width: 80 and 480
channels), then four SSDLite extra blocks (1x1 conv to half width, 3x3 depthwise stride 2, 1x1
conv; ReLU6). Six source maps, at 320 px:
  0: the expansion layer of the last stride-2 block (C4): 20x20x672 (stride 16)
  1: the last 1x1 conv (C5): 10x10x480 (stride 32)
  2-5: the extras: 5x5x512, 3x3x256, 2x2x256, 1x1x128
Inputs are normalized to [-1, 1] (the SSD's image_mean = image_std = 127.5). Convs are
initialized N(0, 0.03) with zero biases, torchvision's `_normal_init` for a backbone trained
from scratch (its COCO recipe).

Variables (inside the SSD, which shares its scope): "backbone" ("stem", "block0".."block14" each
with "expand" (when it widens), "depthwise", "se" (some), "project"; "last_conv") and "extras"
("extra{j}_project_in", "extra{j}_depthwise", "extra{j}_project_out", j = 0..3); params and
batch_stats.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from ssd_jax.backbones.layers import ConvBNAct, SqueezeExcitation

Dtype = Any

#: torchvision's `_normal_init`: N(0, 0.03) conv kernels (biases zero).
normal_003 = nn.initializers.normal(0.03)


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: v rounded to a multiple of `divisor`, at least divisor,
    not below 90% of v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class BlockConfig(NamedTuple):
    """One inverted-residual block (torchvision's `InvertedResidualConfig`)."""

    in_ch: int
    kernel: int
    expanded: int
    out_ch: int
    use_se: bool
    activation: str  # "relu" | "hardswish"
    stride: int


def large_blocks(reduced_tail: bool = True) -> tuple[BlockConfig, ...]:
    """MobileNetV3-Large's 15 blocks (torchvision `_mobilenet_v3_conf("mobilenet_v3_large")`);
    `reduced_tail` halves the C4/C5 widths (the paper's Table 6 note for detection)."""
    r = 2 if reduced_tail else 1
    re, hs = "relu", "hardswish"
    return tuple(BlockConfig(*c) for c in (
        (16, 3, 16, 16, False, re, 1),
        (16, 3, 64, 24, False, re, 2),  # C1
        (24, 3, 72, 24, False, re, 1),
        (24, 5, 72, 40, True, re, 2),  # C2
        (40, 5, 120, 40, True, re, 1),
        (40, 5, 120, 40, True, re, 1),
        (40, 3, 240, 80, False, hs, 2),  # C3
        (80, 3, 200, 80, False, hs, 1),
        (80, 3, 184, 80, False, hs, 1),
        (80, 3, 184, 80, False, hs, 1),
        (80, 3, 480, 112, True, hs, 1),
        (112, 3, 672, 112, True, hs, 1),
        (112, 5, 672, 160 // r, True, hs, 2),  # C4
        (160 // r, 5, 960 // r, 160 // r, True, hs, 1),
        (160 // r, 5, 960 // r, 160 // r, True, hs, 1),
    ))


class InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expand ("expand", when expanded != in_ch), k x k depthwise
    ("depthwise"), squeeze-excitation ("se", optional), linear 1x1 projection ("project"), and
    the identity shortcut when stride 1 and in_ch == out_ch.

    Returns (output, the expansion's output or None): SSDLite's first source map is the
    expansion of the last stride-2 block.
    """

    cfg: BlockConfig
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.97
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        c = self.cfg
        kw = dict(bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                  kernel_init=normal_003, axis_name=self.axis_name, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        y, expanded = x, None
        if c.expanded != c.in_ch:
            y = expanded = ConvBNAct(c.expanded, 1, activation=c.activation, name="expand",
                                     **kw)(y, train)
        y = ConvBNAct(c.expanded, c.kernel, c.stride, groups=c.expanded,
                      activation=c.activation, name="depthwise", **kw)(y, train)
        if c.use_se:
            y = SqueezeExcitation(make_divisible(c.expanded // 4), kernel_init=normal_003,
                                  dtype=self.dtype, param_dtype=self.param_dtype, name="se")(y)
        y = ConvBNAct(c.out_ch, 1, activation=None, name="project", **kw)(y, train)
        if c.stride == 1 and c.in_ch == c.out_ch:
            y = y + x
        return y, expanded


class MobileNetV3Large(nn.Module):
    """MobileNetV3-Large's features (torchvision `mobilenet_v3_large().features`): x [B,H,W,3]
    normalized -> (C4 expansion [B,H/16,W/16,672], last conv [B,H/32,W/32,6*C5])."""

    reduced_tail: bool = True
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.97
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
        kw = dict(bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                  axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = large_blocks(self.reduced_tail)
        c4 = max(i for i, b in enumerate(blocks) if b.stride > 1)
        x = ConvBNAct(blocks[0].in_ch, 3, 2, activation="hardswish", kernel_init=normal_003,
                      name="stem", **kw)(x, train)
        c4_map = None
        for i, cfg in enumerate(blocks):
            x, expanded = InvertedResidual(cfg, name=f"block{i}", **kw)(x, train)
            if i == c4:
                c4_map = expanded
        x = ConvBNAct(6 * blocks[-1].out_ch, 1, activation="hardswish", kernel_init=normal_003,
                      name="last_conv", **kw)(x, train)
        return c4_map, x


class SSDLiteExtras(nn.Module):
    """SSDLite's extra blocks (torchvision `_extra_block`): per width w, a 1x1 conv to w/2, a 3x3
    depthwise conv with stride 2, a 1x1 conv to w (each + BatchNorm + ReLU6); returns each
    block's output."""

    widths: tuple[int, ...] = (512, 256, 256, 128)
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.97
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> list[jnp.ndarray]:
        kw = dict(activation="relu6", bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                  kernel_init=normal_003, axis_name=self.axis_name, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        outs = []
        for j, w in enumerate(self.widths):
            mid = w // 2
            x = ConvBNAct(mid, 1, name=f"extra{j}_project_in", **kw)(x, train)
            x = ConvBNAct(mid, 3, 2, groups=mid, name=f"extra{j}_depthwise", **kw)(x, train)
            x = ConvBNAct(w, 1, name=f"extra{j}_project_out", **kw)(x, train)
            outs.append(x)
        return outs


class MobileNetV3SSDLiteBackbone(nn.Module):
    """SSDLite's MobileNetV3-Large backbone (torchvision `SSDLiteFeatureExtractorMobileNet`):
    x [B,320,320,3] in [-1, 1] -> 6 source maps 20x20x672, 10x10x480, 5x5x512, 3x3x256, 2x2x256,
    1x1x128 (with the reduced tail).

    Attributes:
      reduced_tail: half-width C4/C5 (torchvision's COCO weights and its from-scratch recipe);
        False for a full-width ImageNet MobileNetV3-Large.
      axis_name: with train=True, BatchNorm averages its batch statistics over this named axis
        (synchronized BN inside shard_map over "data"); None: local statistics.
    """

    reduced_tail: bool = True
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.97
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, base_train: bool | None = None
                 ) -> list[jnp.ndarray]:
        kw = dict(bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                  axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        c4, c5 = MobileNetV3Large(self.reduced_tail, name="backbone", **kw)(
            x, train if base_train is None else base_train)
        return [c4, c5, *SSDLiteExtras(name="extras", **kw)(c5, train)]
