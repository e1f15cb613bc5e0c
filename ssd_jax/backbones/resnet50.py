"""The ResNet-50 backbone of NVIDIA DeepLearningExamples' SSD300 (PyTorch/Detection/SSD,
`ResNet` + `SSD300._build_additional_features`), after "SSD: Single Shot MultiBox Detector"
(Liu et al., 2016) with the VGG16 replaced as in "Speed/accuracy trade-offs for modern
convolutional object detectors" (Huang et al., 2017).

torchvision's ResNet-50 (v1.5: the stride of a bottleneck sits in its 3x3 conv; BatchNorm eps
1e-5, torch momentum 0.1) through layer3: conv1 7x7/2 pad 3 + BN + ReLU, max pool 3x3/2 pad 1
(-inf padding), layer1 (3 blocks, 256 ch), layer2 (4, 512 ch, stride 2), layer3 (6, 1024 ch) with
the stride of layer3's first block set to 1 (its conv2 and its downsample conv; NVIDIA's change),
so the first source map keeps stride 8. Then NVIDIA's extra layers, each a 1x1 conv (no bias) +
BN + ReLU then a 3x3 conv (no bias) + BN + ReLU, stride 2 padding 1 for the first three and
stride 1 padding 0 for the last two. Six source maps, at 300 px:
  0: layer3: 38x38x1024 (stride 8)
  1-5: the extras: 19x19x512, 10x10x512, 5x5x256, 3x3x256, 1x1x256 (intermediate 1x1 widths
       256, 256, 128, 128, 128)
Inputs are ImageNet-normalized (the SSD's image_mean/image_std, IMAGENET_MEAN/IMAGENET_STD in
[0, 255] units), as torchvision's ImageNet weights expect. Convs are initialized as torchvision's
ResNet (Kaiming normal, fan_out) in the ResNet and Xavier-uniform in the extras (NVIDIA's
`_init_weights`); BatchNorm scale 1, bias 0. Padding is symmetric, as torch's (`ConvBNAct`).

Variables (inside the SSD, which shares its scope): "backbone" ("stem" = conv1 + bn1;
"layer1_0".."layer1_2", "layer2_0".."layer2_3", "layer3_0".."layer3_5", each with "conv1",
"conv2", "conv3" and, in the first block of a layer, "downsample"; each of those a ConvBNAct with
"conv" and "bn") and "extras" ("extra{j}_reduce" (1x1), "extra{j}_conv" (3x3), j = 0..4);
params and batch_stats. ssd_jax.convert.resnet50_backbone_from_torchvision fills "backbone" from
torchvision's ImageNet resnet50 weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ssd_jax.backbones.layers import ConvBNAct

Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform()

#: ResNet-50 through layer3, with NVIDIA's stride 1 in layer3: (width, blocks, stride) per layer;
#: a block outputs 4 * width channels.
RESNET50_LAYERS = ((64, 3, 1), (128, 4, 2), (256, 6, 1))
#: NVIDIA's extras: (intermediate 1x1 width, output width, stride, padding) per block.
EXTRAS = ((256, 512, 2, 1), (256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 1, 0),
          (128, 256, 1, 0))


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 `Bottleneck`: 1x1 conv to `width` ("conv1"), 3x3 conv with the
    stride ("conv2"), 1x1 conv to 4 * width ("conv3", no ReLU); the shortcut is the input or, with
    `downsample`, a strided 1x1 conv + BN ("downsample"); ReLU after the sum."""

    width: int
    stride: int = 1
    downsample: bool = False
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        kw = dict(bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                  axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        y = ConvBNAct(self.width, 1, name="conv1", **kw)(x, train)
        y = ConvBNAct(self.width, 3, self.stride, name="conv2", **kw)(y, train)
        y = ConvBNAct(4 * self.width, 1, activation=None, name="conv3", **kw)(y, train)
        if self.downsample:
            x = ConvBNAct(4 * self.width, 1, self.stride, activation=None, name="downsample",
                          **kw)(x, train)
        return nn.relu(y + x)


class ResNet50C4(nn.Module):
    """torchvision `resnet50` conv1..layer3 with layer3's stride set to 1: x [B,H,W,3]
    ImageNet-normalized -> [B,~H/8,~W/8,1024] (38x38 at 300 px)."""

    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        kw = dict(bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                  axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvBNAct(64, 7, 2, name="stem", **kw)(x, train)
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # -inf padding, as torch
        for layer, (width, blocks, stride) in enumerate(RESNET50_LAYERS, start=1):
            for i in range(blocks):
                x = Bottleneck(width, stride if i == 0 else 1, downsample=i == 0,
                               name=f"layer{layer}_{i}", **kw)(x, train)
        return x


class ResNetSSDExtras(nn.Module):
    """NVIDIA's extra layers: per block a 1x1 conv ("extra{j}_reduce") and a 3x3 conv
    ("extra{j}_conv"), each without bias + BN + ReLU; returns each block's output."""

    blocks: tuple[tuple[int, int, int, int], ...] = EXTRAS
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> list[jnp.ndarray]:
        kw = dict(bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                  kernel_init=xavier_uniform, axis_name=self.axis_name, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        outs = []
        for j, (mid, out, stride, padding) in enumerate(self.blocks):
            x = ConvBNAct(mid, 1, name=f"extra{j}_reduce", **kw)(x, train)
            x = ConvBNAct(out, 3, stride, padding=padding, name=f"extra{j}_conv", **kw)(x, train)
            outs.append(x)
        return outs


class ResNet50SSDBackbone(nn.Module):
    """NVIDIA's SSD300 ResNet-50 backbone: x [B,300,300,3] ImageNet-normalized -> 6 source maps
    38x38x1024, 19x19x512, 10x10x512, 5x5x256, 3x3x256, 1x1x256.

    Attributes:
      bn_epsilon, bn_momentum: BatchNorm's (torch's 1e-5 and 0.1 = flax momentum 0.9).
      axis_name: with train=True, BatchNorm averages its batch statistics over this named axis
        (synchronized BN inside shard_map over "data"); None: local statistics.
    """

    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, base_train: bool | None = None
                 ) -> list[jnp.ndarray]:
        kw = dict(bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                  axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        c4 = ResNet50C4(name="backbone", **kw)(x, train if base_train is None else base_train)
        return [c4, *ResNetSSDExtras(name="extras", **kw)(c4, train)]
