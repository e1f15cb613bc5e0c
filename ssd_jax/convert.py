"""torchvision weights -> ssd_jax variables, and orbax checkpoints of variables.

  from_torchvision_ssd(sd)            torchvision ssd300_vgg16 state dict -> (SSD, variables)
  from_torchvision_ssdlite(sd)        torchvision ssdlite320_mobilenet_v3_large -> (SSD, variables)
  from_torchvision_detector(sd)       either of the two, recognized from the keys
  vgg16_backbone_from_torchvision(sd) torchvision vgg16 state dict -> {"params": {"backbone": ...}}
  resnet50_backbone_from_torchvision(sd)  torchvision resnet50 state dict -> {"params": {"backbone":
                                      ...}, "batch_stats": {"backbone": ...}} (ssd300_resnet50)
  mobilenet_v3_backbone_from_torchvision(sd)  torchvision mobilenet_v3_large -> the backbone
                                      (params, batch_stats) of ssdlite320_mobilenet_v3(reduced_tail=False)
  save_checkpoint / load_checkpoint   orbax, atomic (+ a detector's model and class names)
  merge_params(initialized, loaded)   override the leaves present in `loaded` (e.g. a backbone)

State dicts map names to arrays (torch tensors or numpy arrays). torch is imported lazily, only
to read a .pth file; .safetensors files are read with `safetensors.numpy` (bfloat16 through
ml_dtypes, which jax installs), without torch. Conv kernels go from torch's
OIHW to Flax's HWIO; output channel order is kept, so the heads' [B,H,W,A*K] layout (anchor-major,
then K) is the same as torchvision's [B,A*K,H,W] and the prior order is unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (a jax dependency; registers bfloat16 with numpy)
import numpy as np

from ssd_jax import models
from ssd_jax.errors import MissingDependencyError
from ssd_jax.priors import SSD300_TORCHVISION, SSDLITE320

StateDict = Mapping[str, Any]
Variables = dict[str, Any]

# torchvision vgg16().features indices of conv1_1..conv5_3.
_VGG_FEATURE_CONVS = {
    "conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7, "conv3_1": 10, "conv3_2": 12,
    "conv3_3": 14, "conv4_1": 17, "conv4_2": 19, "conv4_3": 21, "conv5_1": 24, "conv5_2": 26,
    "conv5_3": 28,
}
_VGG_CHANNELS = {
    "conv1_1": (64, 3), "conv1_2": (64, 64), "conv2_1": (128, 64), "conv2_2": (128, 128),
    "conv3_1": (256, 128), "conv3_2": (256, 256), "conv3_3": (256, 256), "conv4_1": (512, 256),
    "conv4_2": (512, 512), "conv4_3": (512, 512), "conv5_1": (512, 512), "conv5_2": (512, 512),
    "conv5_3": (512, 512),
}


class StateDictError(ValueError):
    """A state dict lacks a key or has a tensor of the wrong shape (the message names the key), or a
    weights file is not a readable state dict (the message names the file)."""


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch
        v = v.detach().cpu().float().numpy()
    return np.asarray(v, dtype=np.float32)


def _get(sd: StateDict, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in sd:
        raise StateDictError(f"state dict has no key {key!r}")
    v = _to_numpy(sd[key])
    if shape is not None and tuple(v.shape) != tuple(shape):
        raise StateDictError(f"state dict key {key!r} has shape {tuple(v.shape)}, expected "
                             f"{tuple(shape)}")
    return v


def _conv(sd: StateDict, prefix: str, out_ch: int, in_ch: int, k: int) -> dict[str, Any]:
    """torch Conv2d `prefix`.weight [O,I,k,k] / .bias [O] -> Flax {"kernel" [k,k,I,O], "bias"}."""
    w = _get(sd, prefix + ".weight", (out_ch, in_ch, k, k))
    b = _get(sd, prefix + ".bias", (out_ch,))
    return {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0)), "bias": jnp.asarray(b)}


def _vgg_convs(sd: StateDict, prefixes: Mapping[str, str]) -> dict[str, Any]:
    """conv1_1..conv5_3 from the torch modules named in `prefixes` (our name -> torch prefix)."""
    return {name: _conv(sd, prefixes[name], *_VGG_CHANNELS[name], 3) for name in _VGG_CHANNELS}


def from_torchvision_ssd(state_dict: StateDict, dtype: Any = jnp.float32
                         ) -> tuple[models.SSD, Variables]:
    """A torchvision `ssd300_vgg16` state dict -> (our SSD300 with SSD300_TORCHVISION priors and
    torchvision's image mean, its variables {"params": ...}).

    The class count is read from the classification head. Raises StateDictError naming the key
    when a tensor is missing or mis-shaped.
    """
    sd = state_dict
    spec = SSD300_TORCHVISION
    bpl = spec.boxes_per_location
    in_channels = (512, 1024, 512, 256, 256, 256)

    cls0 = _get(sd, "head.classification_head.module_list.0.weight")
    if cls0.shape[0] % bpl[0]:
        raise StateDictError(
            f"state dict key 'head.classification_head.module_list.0.weight' has "
            f"{cls0.shape[0]} output channels, not a multiple of the {bpl[0]} boxes per location "
            f"of the first map")
    num_classes = cls0.shape[0] // bpl[0]

    indices = {name: f"backbone.features.{i}" for name, i in _VGG_FEATURE_CONVS.items()
               if i < 23}
    indices.update({"conv5_1": "backbone.extra.0.1", "conv5_2": "backbone.extra.0.3",
                    "conv5_3": "backbone.extra.0.5"})
    backbone = _vgg_convs(sd, indices)
    backbone["fc6"] = _conv(sd, "backbone.extra.0.7.1", 1024, 512, 3)
    backbone["fc7"] = _conv(sd, "backbone.extra.0.7.3", 1024, 1024, 1)

    extras = {}
    extra_shapes = [(256, 1024, 512), (128, 512, 256), (128, 256, 256), (128, 256, 256)]
    for i, (mid, cin, cout) in enumerate(extra_shapes):
        extras[f"conv{i + 8}_1"] = _conv(sd, f"backbone.extra.{i + 1}.0", mid, cin, 1)
        extras[f"conv{i + 8}_2"] = _conv(sd, f"backbone.extra.{i + 1}.2", cout, mid, 3)

    params: dict[str, Any] = {
        "backbone": backbone,
        "conv4_3_norm": {"scale": jnp.asarray(_get(sd, "backbone.scale_weight", (512,)))},
        "extras": extras,
    }
    for k, (a, cin) in enumerate(zip(bpl, in_channels, strict=True)):
        params[f"cls_head_{k}"] = _conv(
            sd, f"head.classification_head.module_list.{k}", a * num_classes, cin, 3)
        params[f"box_head_{k}"] = _conv(sd, f"head.regression_head.module_list.{k}", a * 4, cin, 3)

    model = models.ssd300_vgg16(num_classes, prior_spec=spec, dtype=dtype,
                                image_mean=models.TORCHVISION_MEAN)
    return model, {"params": params}


def _torch_shape(hwio: tuple[int, ...]) -> tuple[int, ...]:
    """The torch (OIHW) shape of a Flax HWIO kernel shape."""
    return (hwio[3], hwio[2], hwio[0], hwio[1])


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _at(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _fill_conv_bn(sd: StateDict, prefix: str, path: tuple[str, ...], shapes: Variables,
                  params: dict[str, Any], stats: dict[str, Any]) -> None:
    """torch Conv2dNormActivation `prefix` (.0 conv without bias, .1 BatchNorm2d) -> our
    ConvBNAct at `path` ("conv" kernel, "bn" scale/bias and batch statistics mean/var)."""
    kernel = _at(shapes["params"], path + ("conv", "kernel")).shape
    w = _get(sd, prefix + ".0.weight", _torch_shape(kernel))
    _put(params, path + ("conv", "kernel"), jnp.asarray(w.transpose(2, 3, 1, 0)))
    n = (kernel[-1],)
    _put(params, path + ("bn", "scale"), jnp.asarray(_get(sd, prefix + ".1.weight", n)))
    _put(params, path + ("bn", "bias"), jnp.asarray(_get(sd, prefix + ".1.bias", n)))
    _put(stats, path + ("bn", "mean"), jnp.asarray(_get(sd, prefix + ".1.running_mean", n)))
    _put(stats, path + ("bn", "var"), jnp.asarray(_get(sd, prefix + ".1.running_var", n)))


def _fill_conv(sd: StateDict, prefix: str, path: tuple[str, ...], shapes: Variables,
               params: dict[str, Any]) -> None:
    """torch Conv2d with bias `prefix` -> our nn.Conv at `path`."""
    kernel = _at(shapes["params"], path + ("kernel",)).shape
    w = _get(sd, prefix + ".weight", _torch_shape(kernel))
    _put(params, path + ("kernel",), jnp.asarray(w.transpose(2, 3, 1, 0)))
    _put(params, path + ("bias",), jnp.asarray(_get(sd, prefix + ".bias", (kernel[-1],))))


def _check_complete(filled: Variables, shapes: Variables) -> None:
    """Every variable of the model was converted (a converter bug otherwise, not the user's)."""
    got = jax.tree_util.tree_structure(filled)
    want = jax.tree_util.tree_structure({k: shapes[k] for k in filled})
    if got != want:
        raise AssertionError(f"converter left variables out: {want} vs {got}")


def from_torchvision_ssdlite(state_dict: StateDict, dtype: Any = jnp.float32
                             ) -> tuple[models.SSD, Variables]:
    """A torchvision `ssdlite320_mobilenet_v3_large` state dict -> (our
    `ssdlite320_mobilenet_v3` with SSDLITE320 priors, its variables {"params", "batch_stats"}).

    The class count is read from the classification head, the tail width (reduced: the COCO
    weights; full: an ImageNet backbone) from the last conv. torch layout: backbone.features.0 is
    MobileNetV3 up to the expansion of the last stride-2 block (C4), backbone.features.1 the rest
    (that block's depthwise/SE/projection at .1.0.{1,2,3}, two blocks, the last conv),
    backbone.extra.j the extra blocks, head.{classification,regression}_head.module_list.k the
    predictors (.0 depthwise conv + BN, .1 1x1 conv). Raises StateDictError naming the key when a
    tensor is missing or mis-shaped.
    """
    from ssd_jax.backbones.mobilenet_v3 import large_blocks

    sd = state_dict
    a = SSDLITE320.boxes_per_location[0]
    key = "head.classification_head.module_list.0.1.weight"
    cls0 = _get(sd, key)
    if cls0.shape[0] % a:
        raise StateDictError(f"state dict key {key!r} has {cls0.shape[0]} output channels, not a "
                             f"multiple of the {a} boxes per location of the first map")
    num_classes = cls0.shape[0] // a
    last = _get(sd, "backbone.features.1.3.0.weight")
    if last.shape[0] not in (480, 960):
        raise StateDictError(f"state dict key 'backbone.features.1.3.0.weight' has "
                             f"{last.shape[0]} output channels; MobileNetV3-Large's last conv "
                             f"has 480 (reduced tail) or 960")
    reduced_tail = last.shape[0] == 480
    model = models.ssdlite320_mobilenet_v3(num_classes, dtype=dtype, reduced_tail=reduced_tail)
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    blocks = large_blocks(reduced_tail)
    c4 = max(i for i, b in enumerate(blocks) if b.stride > 1)

    def block_prefixes(i: int, n: int) -> list[str]:
        if i < c4:
            return [f"backbone.features.0.{i + 1}.block.{j}" for j in range(n)]
        if i == c4:  # split: its expansion ends features.0, the rest starts features.1
            return ["backbone.features.0.13"] + [f"backbone.features.1.0.{j}" for j in range(1, n)]
        return [f"backbone.features.1.{i - c4}.block.{j}" for j in range(n)]

    _fill_mobilenet_v3(sd, blocks, "backbone.features.0.0", block_prefixes,
                       f"backbone.features.1.{len(blocks) - c4}", shapes, params, stats)
    for j in range(4):
        for t, part in enumerate(("project_in", "depthwise", "project_out")):
            _fill_conv_bn(sd, f"backbone.extra.{j}.{t}", ("extras", f"extra{j}_{part}"), shapes,
                          params, stats)
    for k in range(len(SSDLITE320.feature_map_sizes)):
        for ours, theirs in (("cls_head", "classification_head"), ("box_head", "regression_head")):
            prefix = f"head.{theirs}.module_list.{k}"
            _fill_conv_bn(sd, f"{prefix}.0", (f"{ours}_{k}", "depthwise"), shapes, params, stats)
            _fill_conv(sd, f"{prefix}.1", (f"{ours}_{k}", "pointwise"), shapes, params)
    variables = {"params": params, "batch_stats": stats}
    _check_complete(variables, shapes)
    return model, variables


def _fill_mobilenet_v3(sd: StateDict, blocks: Any, stem: str, block_prefixes: Any, last: str,
                       shapes: Variables, params: dict[str, Any], stats: dict[str, Any]) -> None:
    """MobileNetV3-Large's stem, inverted residual blocks (torch prefixes of block i's parts:
    `block_prefixes(i, number of parts)`) and last conv -> our "backbone" variables."""
    _fill_conv_bn(sd, stem, ("backbone", "stem"), shapes, params, stats)
    for i, cfg in enumerate(blocks):
        ours = ("backbone", f"block{i}")
        parts = (["expand"] if cfg.expanded != cfg.in_ch else []) + ["depthwise"] + \
            (["se"] if cfg.use_se else []) + ["project"]
        for part, prefix in zip(parts, block_prefixes(i, len(parts)), strict=True):
            if part == "se":
                for fc in ("fc1", "fc2"):
                    _fill_conv(sd, f"{prefix}.{fc}", ours + ("se", fc), shapes, params)
            else:
                _fill_conv_bn(sd, prefix, ours + (part,), shapes, params, stats)
    _fill_conv_bn(sd, last, ("backbone", "last_conv"), shapes, params, stats)


def mobilenet_v3_backbone_from_torchvision(state_dict: StateDict) -> Variables:
    """torchvision `mobilenet_v3_large` (ImageNet) state dict -> {"params": {"backbone": ...},
    "batch_stats": {"backbone": ...}} of `ssdlite320_mobilenet_v3(reduced_tail=False)`: the
    stem (features.0), the 15 inverted residual blocks (features.1..15: expand, depthwise,
    squeeze-excitation, project) and the last conv (features.16, 960 channels); the classifier is
    not used. torchvision's SSDLite builds its backbone from these weights (full width: the
    reduced tail is for training from scratch). The extras and heads are not in it: merge into
    fresh variables (config.init_checkpoint). Raises StateDictError naming a missing or
    mis-shaped key.
    """
    from ssd_jax.backbones.mobilenet_v3 import large_blocks

    model = models.ssdlite320_mobilenet_v3(2, reduced_tail=False)
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    blocks = large_blocks(False)
    _fill_mobilenet_v3(state_dict, blocks, "features.0",
                       lambda i, n: [f"features.{i + 1}.block.{j}" for j in range(n)],
                       f"features.{len(blocks) + 1}", shapes, params, stats)
    return {"params": params, "batch_stats": stats}


#: torchvision detectors this module converts: name -> (a key only its state dicts have, converter).
TORCHVISION_DETECTORS = {
    "ssd300_vgg16": ("backbone.scale_weight", from_torchvision_ssd),
    "ssdlite320_mobilenet_v3": ("head.classification_head.module_list.0.1.weight",
                                from_torchvision_ssdlite),
}


def torchvision_detector_name(state_dict: StateDict) -> str | None:
    """Which torchvision detector a state dict is ("ssd300_vgg16" or
    "ssdlite320_mobilenet_v3"), recognized from its keys; None for anything else."""
    for name, (key, _) in TORCHVISION_DETECTORS.items():
        if key in state_dict:
            return name
    return None


def from_torchvision_detector(state_dict: StateDict, dtype: Any = jnp.float32
                              ) -> tuple[str, models.SSD, Variables]:
    """A torchvision ssd300_vgg16 or ssdlite320_mobilenet_v3_large state dict, recognized from
    its keys -> (its name, our SSD, variables). StateDictError for anything else."""
    name = torchvision_detector_name(state_dict)
    if name is None:
        sample = ", ".join(list(state_dict)[:3]) or "none"
        raise StateDictError(f"its keys ({sample}, ...) are neither ssd300_vgg16's nor "
                             f"ssdlite320_mobilenet_v3_large's")
    model, variables = TORCHVISION_DETECTORS[name][1](state_dict, dtype=dtype)
    return name, model, variables


def vgg16_backbone_from_torchvision(state_dict: StateDict, include_fc: bool = True) -> Variables:
    """torchvision `vgg16` (ImageNet) state dict -> {"params": {"backbone": {...}}}.

    conv1_1..conv5_3 are copied. With `include_fc`, fc6/fc7 become the "reduced fc" of the paper:
    fc6 [4096, 25088] viewed as [4096, 512, 7, 7] keeps every 4th filter and every 3rd spatial tap
    -> [1024, 512, 3, 3] (used with dilation 6); fc7 [4096, 4096] keeps every 4th row and column
    -> [1024, 1024, 1, 1]; biases every 4th. Use include_fc=False for weights without a valid
    classifier (torchvision's IMAGENET1K_FEATURES). Merge into initialized variables with
    `merge_params`. Raises StateDictError naming a missing or mis-shaped key.
    """
    sd = state_dict
    indices = {name: f"features.{i}" for name, i in _VGG_FEATURE_CONVS.items()}
    backbone = _vgg_convs(sd, indices)
    if include_fc:
        fc6_w = _get(sd, "classifier.0.weight", (4096, 512 * 7 * 7))
        fc6_b = _get(sd, "classifier.0.bias", (4096,))
        fc7_w = _get(sd, "classifier.3.weight", (4096, 4096))
        fc7_b = _get(sd, "classifier.3.bias", (4096,))
        fc6_w = fc6_w.reshape(4096, 512, 7, 7)[::4, :, ::3, ::3]  # [1024, 512, 3, 3]
        fc7_w = fc7_w[::4, ::4][:, :, None, None]  # [1024, 1024, 1, 1]
        for key, v in (("classifier.0.weight", fc6_w), ("classifier.3.weight", fc7_w)):
            if not np.all(np.isfinite(v)):
                raise StateDictError(f"state dict key {key!r} has non-finite values (features-"
                                     f"only weights?); convert with include_fc=False")
        backbone["fc6"] = {"kernel": jnp.asarray(fc6_w.transpose(2, 3, 1, 0)),
                           "bias": jnp.asarray(fc6_b[::4])}
        backbone["fc7"] = {"kernel": jnp.asarray(fc7_w.transpose(2, 3, 1, 0)),
                           "bias": jnp.asarray(fc7_b[::4])}
    return {"params": {"backbone": backbone}}


def _conv_bn(sd: StateDict, conv: str, bn: str, out_ch: int, in_ch: int, k: int
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """torch Conv2d `conv` (no bias) + BatchNorm2d `bn` -> the params and batch_stats of a
    ConvBNAct: ({"conv": {"kernel" HWIO}, "bn": {"scale", "bias"}}, {"bn": {"mean", "var"}})."""
    w = _get(sd, conv + ".weight", (out_ch, in_ch, k, k))
    bn_params = {"scale": jnp.asarray(_get(sd, bn + ".weight", (out_ch,))),
                 "bias": jnp.asarray(_get(sd, bn + ".bias", (out_ch,)))}
    stats = {"mean": jnp.asarray(_get(sd, bn + ".running_mean", (out_ch,))),
             "var": jnp.asarray(_get(sd, bn + ".running_var", (out_ch,)))}
    return {"conv": {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0))}, "bn": bn_params}, {"bn": stats}


def resnet50_backbone_from_torchvision(state_dict: StateDict) -> Variables:
    """torchvision `resnet50` (ImageNet) state dict -> {"params": {"backbone": ...},
    "batch_stats": {"backbone": ...}} of `ResNet50SSDBackbone` (ssd300_resnet50).

    conv1/bn1 become "stem", layer{l}.{i} "layer{l}_{i}" (conv1..conv3 with bn1..bn3, and
    downsample.0/.1 as "downsample"), for layer1..layer3; layer4 and fc are not used. Kernels go
    OIHW -> HWIO, BatchNorm weight/bias -> scale/bias, running_mean/var -> mean/var (the
    stride-1 layer3 of the SSD uses the same weights). The extras and heads are not in it: merge
    both collections into freshly initialized variables with `merge_params`. Raises
    StateDictError naming a missing or mis-shaped key.
    """
    from ssd_jax.backbones.resnet50 import RESNET50_LAYERS

    sd = state_dict
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    params["stem"], stats["stem"] = _conv_bn(sd, "conv1", "bn1", 64, 3, 7)
    in_ch = 64
    for layer, (width, blocks, _) in enumerate(RESNET50_LAYERS, start=1):
        for i in range(blocks):
            prefix, name = f"layer{layer}.{i}", f"layer{layer}_{i}"
            block_params, block_stats = {}, {}
            for j, (out_ch, cin, k) in enumerate(
                    ((width, in_ch, 1), (width, width, 3), (4 * width, width, 1)), start=1):
                block_params[f"conv{j}"], block_stats[f"conv{j}"] = _conv_bn(
                    sd, f"{prefix}.conv{j}", f"{prefix}.bn{j}", out_ch, cin, k)
            if i == 0:
                block_params["downsample"], block_stats["downsample"] = _conv_bn(
                    sd, f"{prefix}.downsample.0", f"{prefix}.downsample.1", 4 * width, in_ch, 1)
            params[name], stats[name] = block_params, block_stats
            in_ch = 4 * width
    return {"params": {"backbone": params}, "batch_stats": {"backbone": stats}}


# ----------------------------------------------------------------------------- files


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict from a .safetensors file (read with `safetensors.numpy`, no torch needed) or a
    .pth/.pt file (torch.load, weights_only=True), as float32 numpy arrays. A checkpoint dict
    wrapping the weights under "model" or "state_dict" is unwrapped; non-tensor entries are dropped.

    Raises FileNotFoundError for a missing path and StateDictError (naming the file) for a file
    that cannot be read as such a state dict (the underlying error is chained as its cause).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such state dict file: {path!r}")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    return _load_torch(path)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        sd = load_file(path)
    except Exception as e:  # SafetensorError (bad header/data), TypeError (unknown dtype), OSError
        raise StateDictError(f"cannot read {path!r}: expected a .safetensors file of tensors "
                             f"({_reason(e)})") from e
    return {k: np.asarray(v).astype(np.float32) for k, v in sd.items()}


def _load_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch  # lazily: only reading a .pth file needs torch
    except ImportError as e:
        raise MissingDependencyError(
            f"reading {path!r} needs torch, which is not installed: pip install torch (or "
            "convert the file to .safetensors where torch is)") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage unpickles into anything: IndexError, KeyError, EOFError...
        raise StateDictError(f"cannot read {path!r}: expected a torch state dict saved with "
                             f"torch.save (.pth/.pt; loaded with weights_only=True) "
                             f"({_reason(e)})") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise StateDictError(f"{path!r} holds a {type(sd).__name__}, expected a state dict "
                             f"(a mapping of names to tensors)")
    return {k: _to_numpy(v) for k, v in sd.items() if hasattr(v, "shape")}


def _reason(e: BaseException, limit: int = 160) -> str:
    """One line about `e`: its type and the telling line of its message (for torch's weights-only
    unpickler, the line after "WeightsUnpickler error:"), at most `limit` characters."""
    msg, marker = str(e), "WeightsUnpickler error:"
    if marker in msg:
        msg = msg[msg.index(marker) + len(marker):]
    line = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    if len(line) > limit:
        line = line[:limit - 3] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


#: The file next to a checkpoint's arrays (inside its folder) that says what they are:
#: {"model": config.model.name, "class_names": [...] (background excluded)}.
CHECKPOINT_INFO = "ssd_jax_checkpoint.json"


def save_checkpoint(path: str, variables: Variables, model: str | None = None,
                    class_names: tuple[str, ...] | None = None) -> None:
    """Save a pytree of arrays with orbax (atomic: written to a temporary folder, then renamed);
    an existing checkpoint at `path` is replaced. A detector's `model` name and `class_names`
    (label i -> class_names[i-1]) go to CHECKPOINT_INFO in the folder, so that fine-tuning maps
    its classification heads to other classes by name (`ssd_jax.finetune`)."""
    from ssd_jax.workdir import keep_root_handlers, orbax_checkpoint

    ocp = orbax_checkpoint()
    path = os.path.abspath(path)
    with keep_root_handlers(), ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, jax.tree.map(jnp.asarray, variables), force=True)
        ckptr.wait_until_finished()
    if model is not None or class_names is not None:
        info = {"model": model, "class_names": None if class_names is None else list(class_names)}
        tmp = os.path.join(path, CHECKPOINT_INFO + ".tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, os.path.join(path, CHECKPOINT_INFO))


def checkpoint_info(path: str) -> dict[str, Any]:
    """The CHECKPOINT_INFO of the checkpoint at `path` ({} when it has none: backbone weights,
    or a checkpoint converted before the file existed)."""
    file = os.path.join(path, CHECKPOINT_INFO)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def load_checkpoint(path: str) -> Variables:
    """The pytree saved by `save_checkpoint` at `path` (nested dicts of numpy arrays), read by
    any process of any run: placed on this host (`workdir.abstract_on_this_host`), then fetched
    (the saved single-device sharding is a topology mismatch in a multi-process run, and a
    committed device array cannot be placed over its global mesh)."""
    from ssd_jax.workdir import abstract_on_this_host, keep_root_handlers, orbax_checkpoint

    ocp = orbax_checkpoint()
    path = os.path.abspath(path)
    with keep_root_handlers(), ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, abstract_on_this_host(ckptr.metadata(path)))
    return jax.device_get(restored)


def merge_params(initialized: Variables, loaded: Variables, _path: str = "") -> Variables:
    """A copy of `initialized` with every leaf present in `loaded` replaced (cast to the
    initialized dtype). `loaded` may be partial (e.g. only {"params": {"backbone": ...}}).

    Raises ValueError naming the path when a loaded leaf's shape differs or the path does not
    exist in `initialized`.
    """
    if not isinstance(loaded, Mapping):
        init_leaf = initialized
        if isinstance(init_leaf, Mapping):
            raise ValueError(f"checkpoint has an array at {_path or '/'} where the model has "
                             f"a subtree")
        if tuple(np.shape(loaded)) != tuple(np.shape(init_leaf)):
            raise ValueError(f"shape mismatch at {_path}: checkpoint {tuple(np.shape(loaded))}, "
                             f"model {tuple(np.shape(init_leaf))}")
        return jnp.asarray(loaded, dtype=getattr(init_leaf, "dtype", None))
    if not isinstance(initialized, Mapping):
        raise ValueError(f"checkpoint has a subtree at {_path} where the model has an array")
    merged = dict(initialized)
    for key, sub in loaded.items():
        path = f"{_path}/{key}"
        if key not in initialized:
            raise ValueError(f"checkpoint path {path} does not exist in the model; model keys "
                             f"there: {sorted(initialized)}")
        merged[key] = merge_params(initialized[key], sub, path)
    return merged
