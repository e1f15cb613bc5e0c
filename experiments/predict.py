"""Run a trained SSD on image files: one PNG with the detections drawn per image, plus COCO results.

    python -m experiments.predict --workdir=RUN_DIR --images=photos/,extra.jpg --out=OUT_DIR
    python -m experiments.predict --workdir=RUN_DIR --images=val/ --out=OUT --annotations=val.json
    python -m experiments.predict --torchvision_checkpoint=ssd300_vgg16_coco-b556d3b4.pth
        --images=photos/ --out=OUT_DIR --min_score=0.4
    python -m experiments.predict --torchvision_checkpoint=ssdlite320_mobilenet_v3_large_coco-a79551df.pth
        --images=photos/ --out=OUT_DIR

Written to --out: <name>.png per image (detections scoring >= --min_score), detections.json (COCO
results in the training data's category ids; image ids from --annotations when given), and
skipped.json when some image could not be read. The work is `ssd_jax.inference.predict_files`;
this file holds the flags and the printing. TensorFlow is not imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags

from ssd_jax import cli
from ssd_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined by `run`, so that importing several commands in one
    process never clashes on names like --workdir)."""
    cli.define_predictor_flags()
    for name in cli.PREDICTOR_FLAGS:
        flags.declare_key_flag(name)
    flags.DEFINE_multi_string("images", None, "Image files and/or folders; comma separated or repeated.")
    flags.DEFINE_string("out", None, "Output folder for the PNGs and detections.json.")
    flags.DEFINE_string("annotations", None, "A COCO-JSON file listing the images: detections.json "
                        "then uses its image ids (as pycocotools' loadRes expects).")
    flags.DEFINE_integer("batch_size", 8, "Images per jitted call (fixed; the last batch is padded).")
    flags.DEFINE_float("min_score", 0.3, "Smallest score drawn on the PNGs (the JSON keeps all).")


def main(argv: Sequence[str]) -> None:
    from ssd_jax import inference

    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.images or not FLAGS.out:
        raise UserError("--images and --out are required (--help lists the flags)")
    paths = inference.list_images(FLAGS.images)
    if not paths:
        raise UserError(f"--images={','.join(FLAGS.images)}: no image files found there")
    predictor = inference.load_predictor(FLAGS.workdir, FLAGS.torchvision_checkpoint, FLAGS.step,
                                         FLAGS.dtype)
    res = inference.predict_files(predictor, paths, FLAGS.out, batch_size=FLAGS.batch_size,
                                  min_score=FLAGS.min_score, annotations=FLAGS.annotations)
    n_img = len(paths) - len(res.skipped)
    print(f"{len(res.results)} detections in {n_img} images -> "
          f"{os.path.join(FLAGS.out, 'detections.json')}; {len(res.pngs)} PNGs in {FLAGS.out}")
    if res.skipped:
        print(f"skipped {len(res.skipped)} unreadable image(s) (listed in "
              f"{os.path.join(FLAGS.out, 'skipped.json')}):")
        for p, e in res.skipped:
            print(f"  {p}: {e}")
    for p, e in res.draw_failed:
        print(f"could not draw {p} (its detections are in the JSON): {e}")


def run() -> None:
    """The `ssd-predict` console script."""
    define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
