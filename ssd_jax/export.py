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
  onnx: `jax2onnx`'s conversion of the same function (NMS as ONNX Loop and TopK; the weights in
    ssd.onnx.data beside it), served by onnxruntime. tf2onnx cannot read jax2tf's XlaCallModule,
    so jax2onnx is the converter; it is installed with --no-deps (its orbax-checkpoint<0.11.37
    pin is for its examples only and would downgrade this project's orbax).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ssd_jax.errors import UserError

FORMATS = ("jax", "savedmodel", "onnx")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
#: The artifact of each format, in the export folder.
ARTIFACTS = {"jax": "ssd.jax", "savedmodel": "saved_model", "onnx": "ssd.onnx"}
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
    ids = predictor.category_of_label().astype(np.int32)

    def serve(images):
        dets = fn(variables, images)
        return {"boxes": dets.boxes, "scores": dets.scores,
                "classes": jnp.asarray(ids)[dets.classes], "num_detections": dets.num_detections}

    return serve


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    platforms = tuple(platforms)
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms:
        raise UserError(f"platforms={','.join(platforms)}: choose from {', '.join(PLATFORMS)}",
                        parameter="platforms")
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
    with _no_info_logs():
        tf.saved_model.save(module, path, signatures={"serving_default": module.detect})


def save_onnx(predictor: Any, path: str) -> None:
    """An ONNX model at `path` (weights in `path + ".data"` beside it): input `images` uint8
    [N, S, S, 3], outputs boxes, scores, classes, num_detections, made by jax2onnx from
    `serving_fn` (the whole function, NMS included: ONNX Loop/TopK, no approximation).

    Detect's compaction of candidate priors is switched off for ONNX (`max_candidate_priors=0`:
    tested identical results; its `nonzero` lowers to a scatter jax2onnx cannot convert), and
    `_jax2onnx_fixes` works around jax2onnx 0.17.1's bugs while converting.
    """
    import jax
    import jax.numpy as jnp

    _check_onnx()
    from jax2onnx import to_onnx

    from ssd_jax import inference

    dense = dataclasses.replace(predictor, fn=inference.make_detect_fn(
        predictor.model, {**predictor.detect_kwargs, "max_candidate_priors": 0,
                          "decode_per_image": True}))
    serve = serving_fn(dense)
    s = predictor.image_size
    for p in (path, path + ".data"):  # to_onnx refuses an existing weights file
        if os.path.exists(p):
            os.remove(p)
    for name in list(logging.root.manager.loggerDict):  # its modules set their own levels
        if name.split(".")[0] in ("jax2onnx", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
    with _no_info_logs(), _jax2onnx_fixes():
        to_onnx(lambda images: tuple(serve(images)[k] for k in OUTPUTS),
                [jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"N,{s},{s},3"), jnp.uint8)],
                model_name="ssd_jax_detector", opset=23, return_mode="file", output_path=path,
                input_names=["images"], output_names=list(OUTPUTS))
    _clean_onnx(path)


def _clean_onnx(path: str) -> None:
    """Rewrites the ONNX model at `path` (and its .data) so that `onnx.checker.check_model(path,
    full_check=True)` passes and onnxruntime loads it without a warning: jax2onnx 0.17.1 annotates
    intermediate values with the NHWC shapes of the JAX program where its graph holds NCHW
    tensors (the checker fails, onnxruntime printed 623 "Error merging shape info" warnings), and
    it leaves constants no node reads (loop bodies). The annotations (optional in ONNX) are
    dropped and inferred again by ONNX's shape inference, the unread initializers removed; the
    nodes and weights are untouched (the export tests compare the outputs with predict's)."""
    import onnx

    model = onnx.load(path)  # the weights too, into memory: the files are written anew

    def graphs(g):
        yield g
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from graphs(a.g)
                for sub in a.graphs:
                    yield from graphs(sub)

    read: set[str] = set()
    for g in graphs(model.graph):
        del g.value_info[:]
        for node in g.node:
            read.update(node.input)
        read.update(o.name for o in g.output)
    for g in graphs(model.graph):
        kept = [t for t in g.initializer if t.name in read]
        del g.initializer[:]
        g.initializer.extend(kept)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                              data_prop=True)
    data = os.path.basename(path) + ".data"
    for p in (path, os.path.join(os.path.dirname(path), data)):
        if os.path.exists(p):
            os.remove(p)  # onnx.save appends external data to an existing file
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=data)


@contextlib.contextmanager
def _no_info_logs():
    """The converters log their arguments and files at INFO on the root logger (which absl's
    commands show): not the user's concern while the export's own lines say what was written."""
    from absl import logging as absl_logging

    loggers = [logging.root, logging.getLogger("tensorflow")]
    levels = [lg.level for lg in loggers]
    verbosity = absl_logging.get_verbosity()
    for lg, level in zip(loggers, levels):
        lg.setLevel(max(level, logging.WARNING))
    absl_logging.set_verbosity(min(verbosity, absl_logging.WARNING))
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _jax2onnx_fixes():
    """jax2onnx 0.17.1 fails on three things this function uses; patched while converting, and
    restored after (each equality is tested on the converted model against predict):

    1. `lax.fori_loop` with traced bounds (the NMS's loop over active tiles): its plugin calls
       int() on the bound. Such loops go to jax's own fori_loop (a while_loop -> ONNX Loop).
    2. A symbolic batch in shapes built by some plugins (rem, pad, select): onnx_ir calls int() on
       jax's symbolic dimension. It becomes an ONNX symbolic dimension of the same name.
    3. `flax.linen.max_pool`: its plugin takes window_shape keyword-only, rejects padding pairs,
       and its lowering gives a MaxPool over 4 spatial dims that onnxruntime refuses. Pooling is
       done as a (1, k, k) window over [N*C, H, W] instead (a 2-D MaxPool; max is exact).
    """
    import jax
    import jax.numpy as jnp
    import onnx_ir._core as ir_core
    from jax._src.export import shape_poly
    from jax2onnx.plugins.flax.linen import max_pool as max_pool_plugin
    from jax2onnx.plugins.flax.linen import pool as pool_plugin
    from jax2onnx.plugins.jax.lax import fori_loop as fori_plugin

    fori = fori_plugin.ForiLoopPlugin
    saved = [(fori, "_fori_loop_binding", fori.__dict__["_fori_loop_binding"]),
             (ir_core, "_maybe_convert_to_symbolic_dim", ir_core._maybe_convert_to_symbolic_dim),
             (max_pool_plugin.MaxPoolPlugin, "_make_patch",
              max_pool_plugin.MaxPoolPlugin.__dict__["_make_patch"]),
             (pool_plugin.PoolPlugin, "get_monkey_patch",
              pool_plugin.PoolPlugin.__dict__["get_monkey_patch"])]
    static_binding = fori._fori_loop_binding.__func__

    def fori_binding(cls, lower, upper, body_fun, init_val):
        if isinstance(lower, jax.core.Tracer) or isinstance(upper, jax.core.Tracer):
            return cls._ORIG_FORI_LOOP(lower, upper, body_fun, init_val)
        return static_binding(cls, lower, upper, body_fun, init_val)

    to_dim = ir_core._maybe_convert_to_symbolic_dim

    def symbolic_dim(dim):
        if isinstance(dim, shape_poly._DimExpr):
            return ir_core.SymbolicDim(str(dim))
        return to_dim(dim)

    def max_pool(inputs, window_shape, strides=None, padding="VALID"):
        window, strides = tuple(window_shape), tuple(strides or (1,) * len(window_shape))
        n, h, w, c = inputs.shape
        pads = (jax.lax.padtype_to_pads((h, w), window, strides, padding)
                if isinstance(padding, str) else tuple(tuple(p) for p in padding))
        x = jnp.transpose(inputs, (0, 3, 1, 2)).reshape(n * c, h, w)
        y = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) + window, (1,) + strides,
                                  ((0, 0),) + tuple(pads))
        return jnp.transpose(y.reshape(n, c, y.shape[1], y.shape[2]), (0, 2, 3, 1))

    fori._fori_loop_binding = classmethod(fori_binding)
    ir_core._maybe_convert_to_symbolic_dim = symbolic_dim
    max_pool_plugin.MaxPoolPlugin._make_patch = classmethod(lambda cls, orig: max_pool)
    pool_plugin.PoolPlugin.get_monkey_patch = classmethod(lambda cls, orig: orig)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _check_onnx() -> None:
    """UserError unless jax2onnx, onnx and onnxruntime import (jax2onnx's optional plugins for
    libraries this project does not use log their absence: silenced)."""
    logging.getLogger("jax2onnx").setLevel(logging.ERROR)
    # onnx_ir notes each constant whose type it leaves to the runtime: not the user's concern
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    try:
        import jax2onnx  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise UserError(f"formats=onnx needs {e.name or 'jax2onnx'} (not installed): pip install "
                        "--no-deps jax2onnx==0.17.1 && pip install onnx onnx-ir onnxruntime "
                        "(README, 'Export for serving')", parameter="formats") from None


def _import_tf() -> Any:
    try:  # quiet, with the GPUs hidden from TensorFlow (they stay JAX's)
        from ssd_jax.data.tf_compat import tf
    except ImportError:
        raise UserError("formats=savedmodel needs TensorFlow (pip install tensorflow-cpu)",
                        parameter="formats") from None
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
        raise UserError(f"formats={','.join(out) or '(none)'}: "
                        f"{'unknown format ' + repr(bad[0]) if bad else 'no format given'}; "
                        f"choose one or more of {', '.join(FORMATS)}", parameter="formats")
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
    if "onnx" in formats:
        _check_onnx()
    os.makedirs(out_dir, exist_ok=True)
    paths = {f: os.path.join(out_dir, ARTIFACTS[f]) for f in formats}
    paths["metadata"] = os.path.join(out_dir, METADATA)
    for p in paths.values():
        if os.path.exists(p):
            raise UserError(f"out_dir={out_dir} already holds {os.path.basename(p)}: give "
                            "another folder or remove it", parameter="out_dir")
    written: list[str] = []
    try:
        for f in formats:
            _write(f, predictor, paths[f], platforms, written)
        with open(paths["metadata"] + ".tmp", "w") as fh:
            json.dump(metadata(predictor, formats, platforms), fh, indent=1)
        os.replace(paths["metadata"] + ".tmp", paths["metadata"])
    except BaseException:  # a failed or interrupted export leaves nothing half-done behind
        for p in written + [paths["metadata"] + ".tmp"]:
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.remove(p)
        raise
    return paths


def _write(fmt: str, predictor: Any, path: str, platforms: Sequence[str],
           written: list[str]) -> None:
    """One artifact at `path`, built under a temporary name and renamed into place; every path
    it creates is appended to `written` first (the caller removes them on failure)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    written.append(tmp)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    if fmt == "jax":
        blob = export_jax(predictor, platforms)
        with open(tmp, "wb") as fh:
            fh.write(blob)
        written.append(path)
        os.replace(tmp, path)
    elif fmt == "savedmodel":
        save_savedmodel(predictor, tmp, platforms)
        written.append(path)
        os.replace(tmp, path)
    elif fmt == "onnx":  # the model names its weights file: both are built in a folder, then moved
        os.makedirs(tmp)
        save_onnx(predictor, os.path.join(tmp, os.path.basename(path)))
        written += [path + ".data", path]
        if os.path.exists(os.path.join(tmp, os.path.basename(path) + ".data")):
            # written 0600 by onnx_ir; readable like the model beside it (a server's user)
            os.chmod(os.path.join(tmp, os.path.basename(path) + ".data"),
                     os.stat(os.path.join(tmp, os.path.basename(path))).st_mode & 0o777)
            os.replace(os.path.join(tmp, os.path.basename(path) + ".data"), path + ".data")
        os.replace(os.path.join(tmp, os.path.basename(path)), path)
        os.rmdir(tmp)
