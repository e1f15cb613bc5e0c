"""The compact backbone: a narrow conv+BatchNorm network at 128 px, cheap enough to train SSD
from scratch on a CPU (the embedded default model).

Seven stride-2 stages, 128 px -> 64 (24 ch) -> 32 (48) -> 16 (96) -> 8 (192) -> 4, 2, 1 (128
each, after a 1x1 bottleneck); the last `num_maps` are the source maps: 32, 16, 8, 4, 2, 1
(num_maps=6) or 16, ..., 1 (5). About 0.12 GMAC per 128 px image with the heads. `width_mult`
scales every width; `top_down` adds an FPN-style fusion into the stage source maps.

Variables (inside the SSD, which shares its scope): "backbone" (params and batch_stats of
stage{i}_down/_conv, extra{j}_1/_2, lateral{k}, fuse{k}, each a "conv" and a "bn").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBN(nn.Module):
    """Conv (no bias, "same" padding) + BatchNorm + ReLU: [B,H,W,C] -> [B,H/s,W/s,features]."""

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
                    padding=((p, p), (p, p)), use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=kaiming_fan_out, name="conv")(x)
        # use_fast_variance=False: var = E[(x - mean)^2], not E[x^2] - E[x]^2, whose cancellation
        # on raw-pixel-scale activations made 8-device and 1-device steps differ by up to 1%.
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         use_fast_variance=False, axis_name=self.axis_name if train else None,
                         dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x)


class CompactNet(nn.Module):
    """The compact conv+BN network and its extras: 7 stride-2 stages, the last `num_sources` are
    the source maps (widths as given; `CompactSSDBackbone` derives them from `width_mult`).

    depths: per backbone stage, the 3x3 stride-1 ConvBNs after its stride-2 one (named
    stage{i}_conv, stage{i}_conv2, ...).

    top_down: each source map of the backbone stages gets the next coarser (already fused) map,
    1x1-projected to its width and upsampled 2x (nearest), added before a 3x3 ConvBN.
    """

    widths: Sequence[int] = (24, 48, 96, 192)
    depths: Sequence[int] = (0, 1, 1, 1)
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
            for k in range(self.depths[i]):
                suffix = "" if k == 0 else str(k + 1)
                x = ConvBN(w, 3, 1, name=f"stage{i + 1}_conv{suffix}", **kw)(x, train)
            if i >= len(self.widths) + self.num_extras - self.num_sources:
                outs.append(x)
        num_stage_sources = len(outs)
        for j in range(self.num_extras):
            x = ConvBN(self.extra_width // 2, 1, 1, name=f"extra{j + 1}_1", **kw)(x, train)
            x = ConvBN(self.extra_width, 3, 2, name=f"extra{j + 1}_2", **kw)(x, train)
            outs.append(x)
        if self.top_down:
            for k in reversed(range(num_stage_sources)):
                coarse = ConvBN(outs[k].shape[-1], 1, 1, name=f"lateral{k}", **kw)(outs[k + 1], train)
                b, h, w, c = coarse.shape
                up = jnp.broadcast_to(coarse[:, :, None, :, None, :], (b, h, 2, w, 2, c))
                outs[k] = ConvBN(outs[k].shape[-1], 3, 1, name=f"fuse{k}", **kw)(
                    outs[k] + up.reshape(b, 2 * h, 2 * w, c), train)
        return outs


class CompactSSDBackbone(nn.Module):
    """The compact SSD backbone: x [B,128,128,3] normalized -> `num_maps` source maps
    [B,32,32,48*m] (num_maps=6 only), [B,16,16,96*m], [B,8,8,192*m], then [B,4,4,128*m],
    [B,2,2,128*m], [B,1,1,128*m] (m = width_mult, each width at least 8).

    Attributes:
      width_mult: multiplies every width (1.0 -> stages 24, 48, 96, 192; extras 128).
      top_down: FPN-style fusion into the stage source maps (see `CompactNet`).
      num_maps: 6 (strides 4..128) or 5 (strides 8..128) source maps.
      axis_name: with train=True, BatchNorm averages its batch statistics over this named axis
        (synchronized BN inside shard_map/pmap over "data"); None: local statistics.
    """

    width_mult: float = 1.0
    depths: Sequence[int] = CompactNet.depths
    top_down: bool = False
    num_maps: int = 6
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, base_train: bool | None = None
                 ) -> list[jnp.ndarray]:
        # the extras are part of the "backbone" variables here: base_train sets the whole network
        train = train if base_train is None else base_train
        m = self.width_mult
        return CompactNet(
            widths=tuple(max(8, round(w * m)) for w in CompactNet.widths),
            extra_width=max(8, round(CompactNet.extra_width * m)), depths=tuple(self.depths),
            num_sources=self.num_maps, top_down=self.top_down, axis_name=self.axis_name,
            dtype=self.dtype, param_dtype=self.param_dtype, name="backbone")(x, train)
