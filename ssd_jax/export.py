"""Export a trained detector for serving outside this package.

    predictor = inference.load_predictor(workdir=RUN)        # or torchvision_checkpoint=FILE
    paths = export.export(predictor, OUT, formats=("jax", "savedmodel"), platforms=("cpu",))

Every artifact is one function of the whole detector (network, box decoding, per-class NMS, the
label -> dataset id map), with the variables inside it and the predictor's detect settings:

    images uint8 [N, S, S, 3] RGB (S = the model's input side, N free)
      -> {"boxes": float32 [N, K, 4] normalized corners (xmin, ymin, xmax, ymax),
          "scores": float32 [N, K] (descending), "classes": int32 [N, K] (the training data's
          category ids; 0 in padding rows), "num_detections": int32 [N]}

Rows at or past num_detections are padding. The images are resized to S x S by the caller, as
`Predictor.prepare` does (`ssd_jax.image.resize`); `export.json` beside the artifacts holds what
a server needs to know: input size, class names and ids, detect settings, version and step.

Formats (`FORMATS`):
  jax: `jax.export` of the function with a symbolic batch, serialized to one file; loading it
    needs jax only (`jax.export.deserialize(blob).call(images)`), for each platform asked.
  savedmodel: a TF SavedModel with a `serving_default` signature, made by `jax2tf` (part of jax:
    no extra dependency; orbax-export is a wrapper of the same conversion), whose graph carries
    the function's StableHLO program (top-k taken by a sort: TF 2.21 cannot run lax.top_k's op
    with a symbolic batch); served by TF without jax.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ssd_jax.errors import UserError

FORMATS = ("jax", "savedmodel")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
#: The artifact of each format, in the export folder.
ARTIFACTS = {"jax": "ssd.jax", "savedmodel": "saved_model"}
METADATA = "export.json"
OUTPUTS = ("boxes", "scores", "classes", "num_detections")


def serving_fn(predictor: Any, sort_top_k: bool = False) -> Callable[[Any], dict[str, Any]]:
    """images uint8 [N, S, S, 3] -> the outputs of the module docstring (jax arrays): the
    predictor's jitted network + detect with its variables closed over, labels mapped to the
    training data's category ids (padding rows: 0). `sort_top_k`: detect's top-k as a sort
    (identical results; what TF can run with a symbolic batch, see `postprocess.top_k_by_sort`)."""
    import jax.numpy as jnp

    from ssd_jax import inference

    variables = predictor.variables
    fn = predictor.fn if not sort_top_k else inference.make_detect_fn(
        predictor.model, {**predictor.detect_kwargs, "sort_top_k": True})
    ids = np.asarray((0,) + tuple(int(c) for c in predictor.category_ids), np.int32)

    def serve(images):
        dets = fn(variables, images)
        return {"boxes": dets.boxes, "scores": dets.scores,
                "classes": jnp.asarray(ids)[dets.classes], "num_detections": dets.num_detections}

    return serve


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    platforms = tuple(platforms)
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise UserError(f"--platforms={','.join(platforms)}: choose from {', '.join(PLATFORMS)}")
    return platforms


def _input_spec(predictor: Any) -> Any:
    import jax
    import jax.numpy as jnp

    (n,) = jax.export.symbolic_shape("n")
    s = predictor.image_size
    return jax.ShapeDtypeStruct((n, s, s, 3), jnp.uint8)


def export_jax(predictor: Any, platforms: Sequence[str] = ("cpu",)) -> bytes:
    """The serialized `jax.export.Exported` of `serving_fn(predictor)` for `platforms`, batch
    polymorphic. Load: `jax.export.deserialize(bytearray(blob)).call(images)`."""
    import jax

    exported = jax.export.export(jax.jit(serving_fn(predictor)),
                                 platforms=_check_platforms(platforms))(_input_spec(predictor))
    return bytes(exported.serialize())


def save_savedmodel(predictor: Any, path: str, platforms: Sequence[str] = ("cpu",)) -> None:
    """A TF SavedModel at `path` (a new folder) with signature `serving_default`:
    images uint8 [N, S, S, 3] -> the four outputs, by `jax2tf.convert` of `serving_fn`."""
    tf = _import_tf()
    from jax.experimental import jax2tf

    s = predictor.image_size
    converted = jax2tf.convert(serving_fn(predictor, sort_top_k=True),
                               polymorphic_shapes=[f"(n, {s}, {s}, 3)"], with_gradient=False,
                               native_serialization_platforms=_check_platforms(platforms))
    module = tf.Module()
    module.detect = tf.function(
        lambda images: converted(images), autograph=False,
        input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8, name="images")])
    tf.saved_model.save(module, path, signatures={"serving_default": module.detect})


def _import_tf() -> Any:
    try:  # quiet, with the GPUs hidden from TensorFlow (they stay JAX's)
        from ssd_jax.data.tf_compat import tf
    except ImportError:
        raise UserError("--format=savedmodel needs TensorFlow (pip install tensorflow-cpu)") from None
    return tf


def metadata(predictor: Any, formats: Sequence[str], platforms: Sequence[str]) -> dict[str, Any]:
    """What export.json holds: how to feed the artifacts and read their outputs."""
    import ssd_jax

    return {
        "input": {"name": "images", "dtype": "uint8", "shape": ["N", predictor.image_size,
                                                                predictor.image_size, 3],
                  "layout": "RGB, resized to the input side by the caller (ssd_jax.image.resize)"},
        "outputs": {
            "boxes": "float32 [N, K, 4] normalized corners (xmin, ymin, xmax, ymax)",
            "scores": "float32 [N, K], descending",
            "classes": "int32 [N, K], category ids (see categories); 0 in padding rows",
            "num_detections": "int32 [N]: rows at or past it are padding",
            "K": int(_num_rows(predictor)),
        },
        "categories": [{"id": int(c), "name": str(n)}
                       for c, n in zip(predictor.category_ids, predictor.class_names)],
        "detect": {k: (float(v) if isinstance(v, float) else int(v))
                   for k, v in predictor.detect_kwargs.items()},
        "formats": {f: ARTIFACTS[f] for f in formats},
        "platforms": list(platforms),
        "dtype": str(np.dtype(predictor.model.dtype)),
        "ssd_jax_version": ssd_jax.__version__,
        "checkpoint_step": predictor.step,
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _num_rows(predictor: Any) -> int:
    """K: the rows of the detections (postprocess.detect's fixed size)."""
    import jax

    s = predictor.image_size
    out = jax.eval_shape(serving_fn(predictor), jax.ShapeDtypeStruct((1, s, s, 3), np.uint8))
    return out["scores"].shape[1]


def parse_formats(spec: Sequence[str] | str) -> tuple[str, ...]:
    """"jax,onnx" (or a list of such) -> ("jax", "onnx"), each checked against FORMATS."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        for f in (x.strip() for x in item.split(",")):
            if f and f not in out:
                out.append(f)
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise UserError(f"--format={','.join(out) or '(none)'}: "
                        f"{'unknown format ' + repr(bad[0]) if bad else 'no format given'}; "
                        f"choose one or more of {', '.join(FORMATS)}")
    return tuple(out)


def export(predictor: Any, out_dir: str, formats: Sequence[str] = ("jax",),
           platforms: Sequence[str] = ("cpu",)) -> dict[str, str]:
    """Write each format's artifact and export.json into `out_dir` (created if needed).

    Refuses (UserError) an artifact that is already there, before anything is written, so an
    earlier export is never overwritten halfway. Returns {format or "metadata": path}.
    """
    formats = parse_formats(formats)
    platforms = _check_platforms(platforms)
    if "savedmodel" in formats:
        _import_tf()
    os.makedirs(out_dir, exist_ok=True)
    paths = {f: os.path.join(out_dir, ARTIFACTS[f]) for f in formats}
    paths["metadata"] = os.path.join(out_dir, METADATA)
    for p in paths.values():
        if os.path.exists(p):
            raise UserError(f"--out={out_dir} already holds {os.path.basename(p)}: give another "
                            "--out or remove it")
    for f in formats:
        if f == "jax":
            blob = export_jax(predictor, platforms)
            with open(paths[f] + ".tmp", "wb") as fh:
                fh.write(blob)
            os.replace(paths[f] + ".tmp", paths[f])
        elif f == "savedmodel":
            tmp = paths[f] + ".tmp"
            if os.path.exists(tmp):
                import shutil
                shutil.rmtree(tmp)
            save_savedmodel(predictor, tmp, platforms)
            os.replace(tmp, paths[f])
    with open(paths["metadata"], "w") as fh:
        json.dump(metadata(predictor, formats, platforms), fh, indent=1)
    return paths
