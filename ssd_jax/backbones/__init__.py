"""SSD backbones: linen modules mapping images to the source feature maps of the heads.

A backbone is called as `backbone(x, train)` with normalized float images x [B,H,W,3] (the SSD
module subtracts the mean and divides by the std first) and returns the source maps, largest
first: a list of [B,H_k,W_k,C_k]. `train` switches BatchNorm to batch statistics (backbones
without BatchNorm ignore it). The keyword `base_train` (None: `train`) sets it for the
pretrained base network alone (the "backbone" variables: VGG16, MobileNetV3, ResNet-50, the
compact network with its extras) when it differs from the SSD layers added on top: the base's
BatchNorm keeps its running statistics while the extras' train (fine-tuning with a frozen
backbone). A backbone with BatchNorm has an `axis_name` attribute: the named
axis over which train-mode batch statistics are averaged (synchronized BN), None for local.

The SSD module shares its variable scope with its backbone (`nn.share_scope`), so a backbone's
submodules sit at the top of the SSD variables next to the heads ("cls_head_k", "box_head_k"),
and the checkpoints of the models from before backbones were modules keep their paths.
"""

from ssd_jax.backbones.compact import CompactSSDBackbone
from ssd_jax.backbones.mobilenet_v3 import MobileNetV3SSDLiteBackbone
from ssd_jax.backbones.resnet50 import ResNet50SSDBackbone
from ssd_jax.backbones.vgg16 import VGG16SSDBackbone

__all__ = ["CompactSSDBackbone", "MobileNetV3SSDLiteBackbone", "ResNet50SSDBackbone",
           "VGG16SSDBackbone"]
