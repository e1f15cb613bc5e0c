"""The VGG16 backbone of SSD300 and SSD512 (Liu et al., 2016, section 3 and Fig. 2).

VGG16 conv1_1..conv5_3 with pool3 in ceil mode, pool5 3x3/s1/p1, fc6 = 3x3 conv 1024 dilation 6
and fc7 = 1x1 conv 1024 (the "reduced fc" layers); L2Norm on conv4_3 (scale 20); then the extra
feature layers: conv8..conv11 for SSD300 (source maps 38, 19, 10, 5, 3, 1 at 300 px), five
stride-2 blocks and a final 4x4 conv for SSD512 (Caffe ssd_pascal_512.py: 64, 32, 16, 8, 4, 2, 1
at 512 px). torchvision's ssd300_vgg16 is the SSD300 variant.

Variables (inside the SSD, which shares its scope): "backbone" (conv1_1..fc7), "conv4_3_norm"
(the L2Norm scale) and "extras" (conv8_1..conv12_2).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]

xavier_uniform = nn.initializers.xavier_uniform()
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision VGG
zeros = nn.initializers.zeros


def _pad(p: int) -> Padding:
    return ((p, p), (p, p))


def _pool_windows(x: jnp.ndarray) -> jnp.ndarray:
    """[B,H,W,C] -> [B,ceil(H/2),2,ceil(W/2),2,C]: the 2x2 windows, odd sides padded with -inf
    at the bottom/right (ceil mode)."""
    b, h, w, c = x.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=-jnp.inf)
    return x.reshape(b, (h + ph) // 2, 2, (w + pw) // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 stride-2 max pool [B,H,W,C] -> [B,ceil(H/2),ceil(W/2),C] in ceil mode (PyTorch's
    `max_pool2d(x, 2, 2, ceil_mode=True)`; `nn.max_pool` for even sides).

    A reshape and a max (no reduce_window), and a gradient that routes each output's cotangent to
    the first maximum of its window in row-major order (what `nn.max_pool`'s select_and_scatter
    and PyTorch do, ties included) with compares and selects: on GPU, XLA expands
    select_and_scatter into a windowed argmax and a scatter, which took ~16% of the SSD300 bf16
    train step on an H200 (issue 17's profile)."""
    return _pool_windows(x).max(axis=(2, 4))


def _max_pool_2x2_fwd(x: jnp.ndarray) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_2x2_bwd(res: tuple[jnp.ndarray, jnp.ndarray], g: jnp.ndarray
                      ) -> tuple[jnp.ndarray]:
    x, y = res
    eq = _pool_windows(x) == y[:, :, None, :, None, :]
    e00, e01, e10, e11 = eq[:, :, 0, :, 0], eq[:, :, 0, :, 1], eq[:, :, 1, :, 0], eq[:, :, 1, :, 1]
    first = (e00, e01 & ~e00, e10 & ~(e00 | e01), e11 & ~(e00 | e01 | e10))
    zero = jnp.zeros((), g.dtype)
    m00, m01, m10, m11 = (jnp.where(m, g, zero) for m in first)
    dx = jnp.stack([jnp.stack([m00, m01], axis=3), jnp.stack([m10, m11], axis=3)], axis=2)
    b, hp, _, wp, _, c = dx.shape
    return (dx.reshape(b, 2 * hp, 2 * wp, c)[:, :x.shape[1], :x.shape[2]],)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


class VGG16(nn.Module):
    """VGG16 conv1_1..conv5_3 + pool5 (3x3/s1/p1) + fc6 (3x3, dilation 6) + fc7 (1x1), ReLUs.

    Input: normalized float images [B,H,W,3]. Returns (conv4_3 [B,H/8,W/8,512] after ReLU,
    before L2Norm; fc7 [B,H/16,W/16,1024] after ReLU); pool3 uses ceil mode (75 -> 38 at 300 px).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _conv(self, x: jnp.ndarray, name: str, features: int, k: int = 3, p: int = 1,
              d: int = 1, init: nn.initializers.Initializer = kaiming_fan_out) -> jnp.ndarray:
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
            if stage < 4:
                x = max_pool_2x2(x)  # pool3 in ceil mode (75 -> 38 at 300 px)
        conv4_3 = x
        x = max_pool_2x2(x)
        for i in range(1, 4):
            x = self._conv(x, f"conv5_{i}", 512)
        x = nn.max_pool(x, (3, 3), (1, 1), padding=_pad(1))
        x = self._conv(x, "fc6", 1024, k=3, p=6, d=6, init=xavier_uniform)
        x = self._conv(x, "fc7", 1024, k=1, p=0, init=xavier_uniform)
        return conv4_3, x


class L2Norm(nn.Module):
    """x / max(||x||_2 over channels, eps) * scale, scale per channel (init 20), as torchvision.

    x [B,H,W,C] -> [B,H,W,C]. The normalization runs in float32 whatever the compute dtype; the
    output is cast back.
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
    3x3 s2 p1, then conv12 (1x1-128, 4x4 p1-256). fc7 [B,H,W,1024] -> the block outputs, largest
    first (SSD300 at 300 px: [B,10,10,512], [B,5,5,256], [B,3,3,256], [B,1,1,256]).
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


class VGG16SSDBackbone(nn.Module):
    """VGG16 + L2Norm(conv4_3) + extras: the source maps of SSD300 or SSD512 (`highres`).

    x [B,S,S,3] normalized -> [L2Norm(conv4_3) [B,S/8,S/8,512], fc7 [B,S/16,S/16,1024], extras...]:
    6 maps for SSD300 (38, 19, 10, 5, 3, 1 at S=300), 7 for SSD512 (64, ..., 1 at S=512).
    `train` and `base_train` are accepted for the backbone interface and unused (no BatchNorm).
    """

    highres: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, base_train: bool | None = None
                 ) -> list[jnp.ndarray]:
        del train, base_train
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv4_3, fc7 = VGG16(name="backbone", **kw)(x)
        sources = [L2Norm(param_dtype=self.param_dtype, name="conv4_3_norm")(conv4_3), fc7]
        return sources + VGGExtras(highres=self.highres, name="extras", **kw)(fc7)
