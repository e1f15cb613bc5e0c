"""Suite `export`: latency of each exported artifact (ssd_jax.export) against predict's function.

For each model and batch size: `experiments.predict`'s jitted network + detect (the reference),
the jax artifact (`jax.export` program, deserialized and called as a server would: bytes ->
`deserialize(...).call(images)`), the TF SavedModel's `serving_default` (TensorFlow runs the
same program through XlaCallModule) and the ONNX model in onnxruntime (CPU provider, its default
threads); each row is left out where its runtime is not installed.
Milliseconds per batch of uint8 images already in host memory; lower is better. The models are
randomly initialized with a trained-like class head (a few dozen detections per image, as in the
inference suite).

    python -m experiments.benchmark --suite=export [--export_models=compact,ssd300_vgg16]
        [--export_batches=1,8] [--quick]
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags

from experiments.benchmarks import inference as inference_suite
from experiments.benchmarks.common import Row, int_items, items, time_jax
from ssd_jax import export as ssd_export
from ssd_jax import inference as ssd_inference
from ssd_jax.errors import UserError


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_list("export_models", ["compact", "ssd300_vgg16"], "export suite: models "
                      f"({', '.join(inference_suite.INFERENCE_MODELS)}; --quick: compact).",
                      flag_values=fv)
    flags.DEFINE_list("export_batches", ["1", "8"], "export suite: batch sizes (--quick: 1).",
                      flag_values=fv)


def _predictor(name: str) -> ssd_inference.Predictor:
    model, variables = inference_suite.our_model(None, jnp.float32, name)
    detect = dict(ssd_inference.TORCHVISION_DETECT_OF.get(name, inference_suite.DETECT))
    n = model.num_classes
    return ssd_inference.Predictor(model, jax.device_put(variables),
                                   tuple(f"class_{i}" for i in range(1, n)), tuple(range(1, n)),
                                   detect, ssd_inference.make_detect_fn(model, detect))


def _savedmodel(predictor: ssd_inference.Predictor, folder: str) -> Any:
    """The SavedModel's serving function, or None without TensorFlow."""
    try:
        from ssd_jax.data.tf_compat import tf
    except ImportError:
        return None
    path = os.path.join(folder, "saved_model")
    ssd_export.save_savedmodel(predictor, path)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return lambda images: serve(images=tf.constant(images))


def _onnx(predictor: ssd_inference.Predictor, folder: str) -> Any:
    """The ONNX model's onnxruntime session as a function, or None without the converter."""
    try:
        ssd_export._check_onnx()
    except UserError:
        return None
    import onnxruntime as ort

    path = os.path.join(folder, "ssd.onnx")
    ssd_export.save_onnx(predictor, path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})


def run(args: Any) -> list[Row]:
    names = ["compact"] if args.quick else items(args.export_models)
    batches = [1] if args.quick else int_items(args.export_batches, "--export_batches")
    unknown = [n for n in names if n not in inference_suite.INFERENCE_MODELS]
    if unknown:
        raise UserError(f"--export_models={unknown[0]}: choose from "
                        f"{', '.join(inference_suite.INFERENCE_MODELS)}")
    timing = dict(min_time=0.3, min_iters=2) if args.quick else dict(min_time=2.0, min_iters=3)
    rows = []
    for name in names:
        predictor = _predictor(name)
        label = inference_suite.INFERENCE_MODELS[name][0]
        artifact = jax.export.deserialize(bytearray(ssd_export.export_jax(predictor)))
        with tempfile.TemporaryDirectory() as folder:
            tf_serve = _savedmodel(predictor, folder)
            onnx_serve = _onnx(predictor, folder)
            for b in batches:
                rows += _rows(label, b, predictor, artifact, tf_serve, onnx_serve, timing)
    return rows


def _rows(label: str, b: int, predictor: Any, artifact: Any, tf_serve: Any, onnx_serve: Any,
          timing: dict[str, Any]) -> list[Row]:
    images = inference_suite.images_batch(b, size=predictor.image_size)
    ref = time_jax(lambda: predictor(images), **timing)
    rows = [Row(f"export/predict jit {label} b={b}", ref * 1e3, unit="ms/batch",
                note="the reference: experiments.predict's function")]
    t = time_jax(lambda: artifact.call(images), **timing)
    rows.append(Row(f"export/jax artifact {label} b={b}", t * 1e3, unit="ms/batch",
                    note=f"{t / ref:.2f}x predict's latency"))
    if tf_serve is not None:
        t = time_jax(lambda: [v.numpy() for v in tf_serve(images).values()], **timing)
        rows.append(Row(f"export/savedmodel {label} b={b}", t * 1e3, unit="ms/batch",
                        note=f"{t / ref:.2f}x predict's latency (TensorFlow)"))
    if onnx_serve is not None:
        t = time_jax(lambda: onnx_serve(images), **timing)
        rows.append(Row(f"export/onnx {label} b={b}", t * 1e3, unit="ms/batch",
                        note=f"{t / ref:.2f}x predict's latency (onnxruntime)"))
    return rows
