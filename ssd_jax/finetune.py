"""Starting from a detector trained on other classes: its classification heads' output channels
mapped to the target classes by name, the rest of its weights as they are.

An SSD classification head predicts, at each location, A priors x C classes; its output
channels are laid out per prior, then class: channel ``a * C + c`` is class c (0 = background) of
prior a (the order `heads._flatten` reshapes ``[B, H, W, A*C]`` to ``[B, H*W*A, C]`` by, as
Caffe and torchvision). Moving a class from the source's C_s to the target's C_t therefore moves
A channels, one per prior: ``a * C_s + s -> a * C_t + t`` for every a. The kernel's and the
bias's last axis are those channels (the paper's 3x3 head; SSDLite's pointwise 1x1 conv; its
depthwise part and BatchNorm act per input channel and carry over whole).

    mapping, report = class_mapping(source_names, target_names, rename={"automobile": "car"})
    params = remap_class_heads(fresh_params, loaded_params, mapping, len(source_names) + 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def class_mapping(source_names: Sequence[str], target_names: Sequence[str],
                  rename: Mapping[str, str] | None = None
                  ) -> tuple[list[int | None], dict[str, list[str]]]:
    """For each target label t in 0..K_t (0 = background, then `target_names`): the source label
    whose channels it starts from, or None (freshly initialized).

    Background maps to background. A target class takes the source class of the same name
    (case-insensitive, surrounding spaces ignored), or the source class `rename` maps to it
    ({source name: target name}, for the classes whose names differ). Returns (mapping, report)
    with report["mapped"] ("source -> target"), report["new"] (target classes without a source)
    and report["dropped"] (source classes no target takes). ValueError names a `rename` entry
    whose source is not a source class or whose target is not a target class.
    """
    def key(name: str) -> str:
        return str(name).strip().lower()

    source = {key(n): i + 1 for i, n in enumerate(source_names)}
    target = {key(n): i + 1 for i, n in enumerate(target_names)}
    pairs = {}  # target label -> source label
    for old, new in (rename or {}).items():
        if key(old) not in source:
            raise ValueError(f"class map {old!r} -> {new!r}: {old!r} is not a class of the source "
                             f"checkpoint ({_some(source_names)})")
        if key(new) not in target:
            raise ValueError(f"class map {old!r} -> {new!r}: {new!r} is not a class of the "
                             f"dataset ({_some(target_names)})")
        pairs[target[key(new)]] = source[key(old)]
    for name, t in target.items():
        if t not in pairs and name in source:
            pairs[t] = source[name]
    mapping: list[int | None] = [0] + [pairs.get(t) for t in range(1, len(target_names) + 1)]
    taken = set(pairs.values())
    report = {
        "mapped": [f"{source_names[s - 1]} -> {target_names[t - 1]}" for t, s in sorted(pairs.items())],
        "new": [target_names[t - 1] for t in range(1, len(target_names) + 1) if t not in pairs],
        "dropped": [n for i, n in enumerate(source_names) if i + 1 not in taken],
    }
    return mapping, report


def _some(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(map(str, list(names)[:n]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def remap_channels(fresh: Any, loaded: Any, mapping: Sequence[int | None], num_source: int) -> Any:
    """`fresh` (a target head's kernel [..., A*C_t] or bias [A*C_t]) with the channels of every
    mapped class replaced by `loaded`'s (the source head's [..., A*C_s]): channel a*C_t + t gets
    a*C_s + mapping[t] for each prior a; channels of unmapped classes keep `fresh`'s values."""
    num_target = len(mapping)
    fresh, loaded = jnp.asarray(fresh), jnp.asarray(loaded)
    a = fresh.shape[-1] // num_target
    if fresh.shape[-1] != a * num_target or loaded.shape[-1] != a * num_source or \
            fresh.shape[:-1] != loaded.shape[:-1]:
        raise ValueError(f"class head shapes do not fit {a} priors: checkpoint {loaded.shape} "
                         f"for {num_source} classes, model {fresh.shape} for {num_target}")
    t_idx = np.array([t for t, s in enumerate(mapping) if s is not None], np.int32)
    s_idx = np.array([s for s in mapping if s is not None], np.int32)
    f = fresh.reshape(*fresh.shape[:-1], a, num_target)
    src = loaded.reshape(*loaded.shape[:-1], a, num_source).astype(fresh.dtype)
    return f.at[..., t_idx].set(src[..., s_idx]).reshape(fresh.shape)


#: the leaves of a classification head whose last axis is its A*C output channels
_CLASS_CHANNEL_LEAVES = {("kernel",), ("bias",), ("pointwise", "kernel"), ("pointwise", "bias")}


def remap_class_heads(fresh: Mapping[str, Any], loaded: Mapping[str, Any],
                      mapping: Sequence[int | None], num_source: int) -> dict[str, Any]:
    """`loaded` (a source detector's params, other classes) fitted to the model of `fresh` (the
    target's freshly initialized params): every ``cls_head_k`` subtree's output-channel leaves
    are `remap_channels`-ed into the fresh ones, its other leaves (SSDLite's depthwise conv)
    taken as they are; everything outside the classification heads is taken from `loaded`
    unchanged. ValueError names the first head that does not fit."""
    out = dict(loaded)
    for name, sub in loaded.items():
        if not name.startswith("cls_head_"):
            continue
        if name not in fresh:
            raise ValueError(f"checkpoint head {name} does not exist in the model (its heads: "
                             f"{sorted(k for k in fresh if k.startswith('cls_head_'))})")

        out[name] = _remap_head(fresh[name], sub, (name,), mapping, num_source)
    return out


def _remap_head(fresh: Any, loaded: Any, path: tuple[str, ...], mapping: Sequence[int | None],
                num_source: int) -> Any:
    if isinstance(loaded, Mapping):
        return {k: _remap_head(fresh[k], v, path + (k,), mapping, num_source)
                for k, v in loaded.items()}
    if path[1:] in _CLASS_CHANNEL_LEAVES:
        try:
            return remap_channels(fresh, loaded, mapping, num_source)
        except ValueError as e:
            raise ValueError(f"/{'/'.join(path)}: {e}") from None
    return loaded
