"""Export a trained SSD for serving: a serialized JAX program, a TF SavedModel, ONNX (ssd_jax.export).

    python -m experiments.export --workdir=RUN_DIR --out=EXPORT_DIR --format=jax,savedmodel,onnx
    python -m experiments.export --workdir=RUN_DIR --step=2000 --out=EXPORT_DIR --format=jax
        --platforms=cpu,cuda,tpu
    python -m experiments.export --torchvision_checkpoint=ssd300_vgg16_coco-b556d3b4.pth
        --out=EXPORT_DIR --format=jax

Written to --out: one artifact per format (ssd.jax, saved_model/, ssd.onnx + ssd.onnx.data) and
export.json (input size, class names and ids, detect settings, version, checkpoint step). The work
is `ssd_jax.export.export`; this file holds the flags and the printing.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from ssd_jax import cli
from ssd_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined by `run`: several commands can be imported in one process)."""
    cli.define_predictor_flags()
    for name in cli.PREDICTOR_FLAGS:
        flags.declare_key_flag(name)
    flags.DEFINE_string("out", None, "Output folder for the artifacts and export.json.")
    flags.DEFINE_multi_string("format", None, "jax, savedmodel, onnx (comma separated or "
                              "repeated).")
    flags.DEFINE_list("platforms", ["cpu"], "Platforms the jax and savedmodel programs are "
                      "lowered for: cpu, cuda, rocm, tpu (comma separated); the artifact runs on "
                      "any of them (ONNX is platform-free).")


def main(argv: Sequence[str]) -> None:
    from ssd_jax import export, inference

    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.out or not FLAGS.format:
        raise UserError("--out and --format are required (--help lists the flags)")
    formats = export.parse_formats(FLAGS.format)  # checked before the checkpoint is read
    if "savedmodel" in formats:
        cli.import_tensorflow_quietly()
    predictor = inference.load_predictor(FLAGS.workdir, FLAGS.torchvision_checkpoint, FLAGS.step,
                                         FLAGS.dtype)
    paths = export.export(predictor, FLAGS.out, formats, FLAGS.platforms)
    step = "" if predictor.step is None else f" (step {predictor.step})"
    print(f"exported the {predictor.image_size} px detector{step} for "
          f"{','.join(FLAGS.platforms)}:")
    for name, path in paths.items():
        print(f"  {name}: {path}")


def run() -> None:
    """The `ssd-export` console script."""
    define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
