"""SSD prediction heads (Liu et al., 2016, section 2.1 "Convolutional predictors for detection").

    head(sources [B,f_k,f_k,C_k] per map, num_classes C, boxes_per_location (A_k per map), train)
      -> (cls_logits [B,P,C], box_preds [B,P,4]) in the head's dtype, P = sum_k f_k^2 A_k.

For each source map a class predictor (A_k * C outputs per location) and a box predictor
(A_k * 4 offsets per location). A head's NHWC output [B,H,W,A*K] reshapes to [B,H*W*A,K]: the
prior order of ssd_jax.priors (locations row-major, the boxes of one location contiguous), which
is also torchvision's channel layout, so converted weights keep their order.

  * `SSDHead`: the paper's heads, one 3x3 conv each (torchvision `SSDHead`).
  * `SSDLiteHead`: MobileNetV2's SSDLite heads (torchvision `SSDLiteHead`): a 3x3 depthwise
    conv + BatchNorm + ReLU6, then a 1x1 conv with bias.

The SSD module shares its scope with its head, so the predictors of map k are the variables
"cls_head_k" and "box_head_k" at the top of the SSD's variables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
#: torchvision's `_normal_init` of the SSDLite heads and extras: N(0, 0.03), zero bias.
normal_003 = nn.initializers.normal(0.03)


class HeadParams(nn.Module):
    """The parameters of one 3x3 prediction head on a source map, laid out as `nn.Conv`'s
    ("kernel" [3,3,C_in,N] Xavier-uniform, "bias" [N] zeros); `SSDHead` applies the class and box
    heads of a map as one convolution."""

    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, src: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        kernel = self.param("kernel", xavier_uniform, (3, 3, src.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", zeros, (self.features,), self.param_dtype)
        return kernel, bias


def _flatten(y: jnp.ndarray, k: int) -> jnp.ndarray:
    """[B,H,W,A*K] -> [B,H*W*A,K]."""
    return y.reshape(y.shape[0], -1, k)


class SSDHead(nn.Module):
    """The paper's heads: a 3x3 conv (padding 1) per map for the classes and one for the boxes
    ("cls_head_k", "box_head_k": Xavier-uniform kernels, zero biases), computed as one conv of
    the concatenated kernels."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sources: Sequence[jnp.ndarray], num_classes: int,
                 boxes_per_location: Sequence[int], train: bool = False
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        del train  # no BatchNorm
        cls_out, box_out = [], []
        for k, (src, a) in enumerate(zip(sources, boxes_per_location, strict=True)):
            n_cls = a * num_classes
            kc, bc = HeadParams(n_cls, param_dtype=self.param_dtype, name=f"cls_head_{k}")(src)
            kb, bb = HeadParams(a * 4, param_dtype=self.param_dtype, name=f"box_head_{k}")(src)
            kernel = jnp.concatenate([kc, kb], axis=-1).astype(self.dtype)
            y = jax.lax.conv_general_dilated(src.astype(self.dtype), kernel, (1, 1),
                                             ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = y + jnp.concatenate([bc, bb]).astype(self.dtype)
            cls_out.append(_flatten(y[..., :n_cls], num_classes))
            box_out.append(_flatten(y[..., n_cls:], 4))
        return jnp.concatenate(cls_out, axis=1), jnp.concatenate(box_out, axis=1)


class SeparablePredictor(nn.Module):
    """One SSDLite predictor: 3x3 depthwise conv (no bias) + BatchNorm + ReLU6 ("depthwise":
    "conv", "bn"), then a 1x1 conv with bias ("pointwise") to `features` outputs."""

    features: int
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.97
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        from ssd_jax.backbones.layers import ConvBNAct

        x = ConvBNAct(x.shape[-1], 3, groups=x.shape[-1], activation="relu6",
                      bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                      kernel_init=normal_003, axis_name=self.axis_name, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="depthwise")(x, train)
        return nn.Conv(self.features, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=normal_003, bias_init=zeros, name="pointwise")(x)


class SSDLiteHead(nn.Module):
    """SSDLite heads (torchvision `SSDLiteHead`): per map, a `SeparablePredictor` for the classes
    ("cls_head_k") and one for the boxes ("box_head_k"). BatchNorm eps 0.001, momentum 0.03 in
    torch's convention (0.97 here), as torchvision's ssdlite320_mobilenet_v3_large.

    Attributes:
      axis_name: with train=True, BatchNorm averages its batch statistics over this named axis
        (synchronized BN inside shard_map over "data"); None: local statistics.
    """

    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.97
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sources: Sequence[jnp.ndarray], num_classes: int,
                 boxes_per_location: Sequence[int], train: bool = False
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
        kw = dict(bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                  axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        cls_out, box_out = [], []
        for k, (src, a) in enumerate(zip(sources, boxes_per_location, strict=True)):
            c = SeparablePredictor(a * num_classes, name=f"cls_head_{k}", **kw)(src, train)
            b = SeparablePredictor(a * 4, name=f"box_head_{k}", **kw)(src, train)
            cls_out.append(_flatten(c, num_classes))
            box_out.append(_flatten(b, 4))
        return jnp.concatenate(cls_out, axis=1), jnp.concatenate(box_out, axis=1)
