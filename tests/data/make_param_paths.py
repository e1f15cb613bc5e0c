"""Writes tests/data/param_paths.json: the variable paths and shapes of the registered models.

Run once from the repository root (`python tests/data/make_param_paths.py`); test_models checks
that the models still produce exactly these paths and shapes (existing checkpoints keep loading).
"""

from __future__ import annotations

import json
import pathlib

import jax

from ssd_jax import models

#: name -> (builder name, num_classes, options)
CASES = {
    "ssd300_vgg16": ("ssd300_vgg16", 21, {}),
    "ssd512_vgg16": ("ssd512_vgg16", 21, {}),
    # the compact cases pin the former builder default's depths (the recipe's (0, 3, 1, 1) is the
    # default since issue 34): the same trees as when the file was written
    "compact_6": ("compact", 7, {"num_maps": 6, "depths": (0, 1, 1, 1)}),
    "compact_5": ("compact", 7, {"num_maps": 5, "depths": (0, 1, 1, 1)}),
    "compact_6_top_down": ("compact", 7, {"num_maps": 6, "top_down": True, "depths": (0, 1, 1, 1)}),
    "compact_5_top_down": ("compact", 7, {"num_maps": 5, "top_down": True, "depths": (0, 1, 1, 1)}),
    "compact_6_half": ("compact", 7, {"num_maps": 6, "width_mult": 0.5, "depths": (0, 1, 1, 1)}),
    "compact_5_top_down_half": ("compact", 7, {"num_maps": 5, "top_down": True,
                                               "width_mult": 0.5, "depths": (0, 1, 1, 1)}),
    "ssd300_resnet50": ("ssd300_resnet50", 81, {}),
}


def param_paths(name: str) -> dict[str, list[int]]:
    """'collection/module/.../leaf' -> shape of every variable of the case `name`."""
    builder, num_classes, options = CASES[name]
    model = models.build_model(builder, num_classes, **options)
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes)
    return {"/".join(k.key for k in path): list(leaf.shape) for path, leaf in flat}


if __name__ == "__main__":
    out = pathlib.Path(__file__).with_name("param_paths.json")
    out.write_text(json.dumps({name: param_paths(name) for name in CASES}, indent=1) + "\n")
    print(f"wrote {out}")
