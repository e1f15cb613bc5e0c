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

Where the weights come from (`load_pretrained`): a checkpoint written by
`experiments.convert_torchvision` (its class names in `convert.CHECKPOINT_INFO`; COCO's 91-slot
layout for torchvision's COCO detectors, whose "N/A" slots no class takes) or a finished run's
workdir (its latest checkpoint; the class names of its run_info.json). `fit_variables` then
builds the target model's variables from them: the trainer does this for
`config.init_checkpoint`, first on shapes only (`jax.eval_shape`) before it writes anything.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.errors import UserError, first_line

#: the name of torchvision's unused COCO category slots: never mapped, never "dropped"
UNUSED_SLOT = "N/A"


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

    source = {key(n): i + 1 for i, n in enumerate(source_names) if n != UNUSED_SLOT}
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
        "dropped": [n for i, n in enumerate(source_names)
                    if i + 1 not in taken and n != UNUSED_SLOT],
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
                      mapping: Sequence[int | None], num_source: int, prefix: str = ""
                      ) -> dict[str, Any]:
    """`loaded` (a source detector's params, other classes) fitted to the model of `fresh` (the
    target's freshly initialized params): every ``cls_head_k`` subtree's output-channel leaves
    are `remap_channels`-ed into the fresh ones, its other leaves (SSDLite's depthwise conv)
    taken as they are; everything outside the classification heads is taken from `loaded`
    unchanged. ValueError names the first head that does not fit (its path after `prefix`,
    e.g. "/params")."""
    out = dict(loaded)
    for name, sub in loaded.items():
        if not name.startswith("cls_head_"):
            continue
        if name not in fresh:
            raise ValueError(f"checkpoint head {name} does not exist in the model (its heads: "
                             f"{sorted(k for k in fresh if k.startswith('cls_head_'))})")

        out[name] = _remap_head(fresh[name], sub, (name,), mapping, num_source, prefix)
    return out


def _remap_head(fresh: Any, loaded: Any, path: tuple[str, ...], mapping: Sequence[int | None],
                num_source: int, prefix: str) -> Any:
    if isinstance(loaded, Mapping):
        return {k: _remap_head(fresh[k], v, path + (k,), mapping, num_source, prefix)
                for k, v in loaded.items()}
    if path[1:] in _CLASS_CHANNEL_LEAVES:
        try:
            return remap_channels(fresh, loaded, mapping, num_source)
        except ValueError as e:
            raise ValueError(f"{prefix}/{'/'.join(path)}: {e}") from None
    return loaded


# ----------------------------------------------------------------------------- from files


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Weights to start from. variables: {"params", maybe "batch_stats"} (host arrays);
    class_names: of its classification heads (background excluded), None when unknown (backbone
    weights, or a detector converted before checkpoints carried them); model: its
    config.model.name where known; source: what it is, for messages ("run DIR, step N")."""

    variables: dict[str, Any]
    class_names: tuple[str, ...] | None
    model: str | None
    source: str

    @property
    def has_class_heads(self) -> bool:
        return any(k.startswith("cls_head_") for k in self.variables["params"])


def load_pretrained(path: str) -> Pretrained:
    """The weights at `path`: a finished run's workdir (its latest checkpoint) or a checkpoint
    folder of `convert.save_checkpoint`. UserError (parameter "init_checkpoint") for a workdir
    without a checkpoint, a folder that is neither, or a checkpoint that does not read."""
    from ssd_jax import convert, inference
    from ssd_jax import workdir as workdir_lib

    def error(what: str) -> UserError:
        return UserError(f"init_checkpoint={path}: {what}", parameter="init_checkpoint")

    if not os.path.exists(path):
        raise error("no such file or folder")
    if workdir_lib.read_run_info(path) is not None:
        try:
            run = inference.load_run(path)
        except UserError as e:  # no checkpoint yet; a checkpoint that does not fit its model
            raise error(f"a run workdir, but {str(e).split(': ', 1)[-1]}; give a run that has "
                        "saved a checkpoint (or a converted checkpoint)") from None
        # on the host: the trainer places them over its mesh, which in a multi-process run
        # spans hosts (a committed device array cannot be placed there)
        return Pretrained(jax.device_get(run.variables), tuple(run.class_names),
                          run.config.model.name, f"run {run.workdir}, step {run.step}")
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
        raise error("neither a run workdir (run_info.json) nor a checkpoint folder (python -m "
                    "experiments.convert_torchvision writes one)")
    try:
        loaded = convert.load_checkpoint(path)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise error(f"cannot read the checkpoint ({first_line(e)})") from None
    variables = {"params": loaded.get("params", loaded)}
    if loaded.get("batch_stats"):
        variables["batch_stats"] = loaded["batch_stats"]
    info = convert.checkpoint_info(path)
    names = info.get("class_names")
    if names is None and _num_classes(variables) == 91:
        from ssd_jax.coco import COCO_CATEGORIES_91  # converted before the names were saved

        names = COCO_CATEGORIES_91[1:]
    return Pretrained(variables, None if names is None else tuple(names), info.get("model"),
                      f"checkpoint {os.path.abspath(path)}")


def _num_classes(variables: Mapping[str, Any]) -> int | None:
    """Classes (incl. background) of a detector's heads, from cls_head_0 and box_head_0's
    channel counts (A*C and A*4); None without heads."""
    params = variables["params"]
    if "cls_head_0" not in params or "box_head_0" not in params:
        return None
    cls_ch = _last_axis(params["cls_head_0"])
    box_ch = _last_axis(params["box_head_0"])
    return cls_ch * 4 // box_ch if box_ch and (cls_ch * 4) % box_ch == 0 else None


def _last_axis(head: Mapping[str, Any]) -> int:
    leaf = head.get("bias") if "bias" in head else head.get("pointwise", {}).get("bias")
    return int(np.shape(leaf)[-1]) if leaf is not None else 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """How `fit_variables` builds the target's classification heads: mapping (per target label,
    the source label or None, as `class_mapping`), None to take the heads as they are (same
    classes) or when the checkpoint has none; report: mapped / new / dropped class names."""

    mapping: list[int | None] | None
    num_source: int
    report: dict[str, list[str]]


def plan(pretrained: Pretrained, target_names: Sequence[str] | None,
         rename: Mapping[str, str] | None = None) -> Plan:
    """The class mapping from `pretrained`'s heads to the dataset's `target_names` (None: the
    checkpoint's own classes, heads taken as they are). ValueError for a `rename` name in
    neither list, or heads of unknown classes that differ in count from the target's."""
    if not pretrained.has_class_heads:
        if rename:
            raise ValueError(f"a class map was given, but {pretrained.source} has no "
                             "classification heads (backbone weights)")
        return Plan(None, 0, {})
    num_source = _num_classes(pretrained.variables) or 0
    names = pretrained.class_names
    if names is None or target_names is None:
        if rename:
            raise ValueError(f"a class map was given, but the class names of "
                             f"{pretrained.source if names is None else 'the dataset'} are "
                             "unknown")
        if target_names is not None and len(target_names) + 1 != num_source:
            raise ValueError(f"{pretrained.source} has heads for {num_source - 1} classes whose "
                             f"names it does not carry, the dataset has {len(target_names)}: "
                             "convert it again with experiments.convert_torchvision "
                             "--class_names=... (a checkpoint then names its classes)")
        return Plan(None, num_source, {})
    if len(names) + 1 != num_source:
        raise ValueError(f"{pretrained.source} names {len(names)} classes but its heads have "
                         f"{num_source - 1}")
    mapping, report = class_mapping(names, target_names, rename)
    if list(mapping) == list(range(num_source)):
        return Plan(None, num_source, report)  # the same classes in the same order
    return Plan(mapping, num_source, report)


def fit_variables(fresh: Mapping[str, Any], pretrained: Pretrained, how: Plan) -> dict[str, Any]:
    """The target model's variables: `fresh` (its initialized {"params", maybe "batch_stats"})
    with every leaf of `pretrained` taken (cast to fresh's dtype), the classification heads'
    class channels remapped by `how`. ValueError names the first layer that does not fit (a
    checkpoint of another architecture). Traceable: `jax.eval_shape` checks the fit on shapes."""
    from ssd_jax.convert import merge_params

    out = dict(fresh)
    # params first: a checkpoint of another architecture is named by a layer's weights, whatever
    # order the collections were read in (jax.device_get sorts dict keys)
    for collection in sorted(pretrained.variables, key=lambda c: c != "params"):
        tree = pretrained.variables[collection]
        if collection == "batch_stats" and not fresh.get("batch_stats"):
            continue  # BatchNorm statistics of a model that has no BatchNorm (freeze_bn models do)
        if collection not in fresh:
            raise ValueError(f"checkpoint collection {collection!r} does not exist in the model")
        heads = {k: v for k, v in tree.items() if k.startswith("cls_head_")}
        rest = {k: v for k, v in tree.items() if k not in heads}
        # the network first: a checkpoint of another architecture is named by its first layer
        out[collection] = merge_params(fresh[collection], rest, f"/{collection}")
        if collection == "params" and how.mapping is not None:
            heads = remap_class_heads(fresh["params"], heads, how.mapping, how.num_source,
                                      prefix="/params")
        out[collection] = merge_params(out[collection], heads, f"/{collection}")
    return out


def report_lines(how: Plan) -> list[str]:
    """The log lines of a Plan: the classes mapped, new and dropped."""
    if not how.report:
        return []
    r = how.report
    return [f"classes mapped ({len(r['mapped'])}): {_some(r['mapped'], 20) or 'none'}",
            f"new classes, fresh rows ({len(r['new'])}): {_some(r['new'], 20) or 'none'}",
            f"checkpoint classes dropped ({len(r['dropped'])}): {_some(r['dropped'], 12) or 'none'}"]
