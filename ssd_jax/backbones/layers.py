"""Building blocks shared by the BatchNorm backbones and heads (torchvision's
`Conv2dNormActivation` and `SqueezeExcitation`), in linen, NHWC.

Padding is symmetric, (kernel - 1) // 2 * dilation on each side, as torch's: XLA's "SAME" pads
a stride-2 conv on an even input only at the bottom/right, which would shift every map by half a
pixel against converted torchvision weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

#: torchvision's default conv init for MobileNetV3 and ResNet (kaiming normal, fan_out).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "hardswish": nn.hard_swish,  # x * relu6(x + 3) / 6, torch's Hardswish
}


def batch_norm(epsilon: float, momentum: float, axis_name: str | None, train: bool,
               dtype: Dtype, param_dtype: Dtype, name: str = "bn") -> nn.BatchNorm:
    """BatchNorm over N, H, W: running statistics unless `train`; in train mode the batch
    statistics are averaged over `axis_name` (synchronized BN) when given.

    `momentum` is flax's (the running average keeps `momentum` of the old value): torch's 0.1 is
    0.9 here, 0.03 is 0.97. use_fast_variance=False: var = E[(x - mean)^2] (E[x^2] - E[x]^2
    cancels on large activations and made 8-device and 1-device steps differ by up to 1%).
    """
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                        use_fast_variance=False, axis_name=axis_name if train else None,
                        dtype=dtype, param_dtype=param_dtype, name=name)


class DepthwiseConv(nn.Module):
    """Depthwise k x k conv without bias: "kernel" [k,k,1,C] (nn.Conv's layout and init for
    feature_group_count=C), computed as a sum of k*k shifted, per-channel scaled copies of the
    padded input. XLA:CPU runs a grouped convolution 13-35x slower than this (forward; 4-13x for
    the gradients; measured on a 2-core AMD EPYC for MobileNetV3's shapes), and it is one fused
    elementwise loop on an accelerator; the result is identical.

    Attributes: kernel, stride, dilation, padding (each side), kernel_init, dtype, param_dtype.
    """

    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    padding: int = 1
    kernel_init: Initializer = kaiming_fan_out
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k, s, d, p = self.kernel, self.stride, self.dilation, self.padding
        w = self.param("kernel", self.kernel_init, (k, k, 1, x.shape[-1]), self.param_dtype)
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        h_out = (x.shape[1] + 2 * p - d * (k - 1) - 1) // s + 1
        w_out = (x.shape[2] + 2 * p - d * (k - 1) - 1) // s + 1
        out = None
        for i in range(k):
            for j in range(k):
                tap = jax.lax.slice(xp, (0, i * d, j * d, 0),
                                    (xp.shape[0], i * d + s * (h_out - 1) + 1,
                                     j * d + s * (w_out - 1) + 1, xp.shape[3]), (1, s, s, 1))
                out = tap * w[i, j, 0] if out is None else out + tap * w[i, j, 0]
        return out


class ConvBNAct(nn.Module):
    """Conv (no bias) + BatchNorm + activation ("conv", "bn"): [B,H,W,C] -> [B,H',W',features].

    Attributes:
      features, kernel, stride, groups, dilation: the conv (groups = C for depthwise).
      padding: on each side; None: (kernel - 1) // 2 * dilation (torch's "same" for odd kernels
        at stride 1), 0 e.g. for the valid 3x3 convs of the ResNet-50 SSD's last extras.
      activation: "relu", "relu6", "hardswish" or None (linear, e.g. MobileNet's projections).
      bn_epsilon, bn_momentum: BatchNorm's (flax momentum convention, see `batch_norm`).
    """

    features: int
    kernel: int = 3
    stride: int = 1
    groups: int = 1
    dilation: int = 1
    padding: int | None = None
    activation: str | None = "relu"
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    kernel_init: Initializer = kaiming_fan_out
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        p = (self.kernel - 1) // 2 * self.dilation if self.padding is None else self.padding
        if self.groups > 1 and self.groups == x.shape[-1] == self.features:  # depthwise
            x = DepthwiseConv(self.kernel, self.stride, self.dilation, p, self.kernel_init,
                              self.dtype, self.param_dtype, name="conv")(x)
        else:
            x = nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.stride,) * 2,
                        padding=((p, p), (p, p)), kernel_dilation=(self.dilation,) * 2,
                        feature_group_count=self.groups, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                        name="conv")(x)
        x = batch_norm(self.bn_epsilon, self.bn_momentum, self.axis_name, train, self.dtype,
                       self.param_dtype)(x)
        return x if self.activation is None else ACTIVATIONS[self.activation](x)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al.; MobileNetV3's variant, torchvision's
    `SqueezeExcitation` with a hard sigmoid): x * hardsigmoid(fc2(relu(fc1(mean_hw(x))))), fc1
    and fc2 1x1 convs with bias ("fc1" to `squeeze` channels, "fc2" back)."""

    squeeze: int
    kernel_init: Initializer = kaiming_fan_out
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        s = nn.relu(nn.Conv(self.squeeze, (1, 1), name="fc1", **kw)(s))
        s = nn.Conv(x.shape[-1], (1, 1), name="fc2", **kw)(s)
        return x * nn.hard_sigmoid(s)
