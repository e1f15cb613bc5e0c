"""Write a PNG grid of augmented training samples with their boxes and class names.

    python -m experiments.show_data --out=samples.png
    python -m experiments.show_data --config=experiments/configs/ssd300_voc.py --out=voc.png

With no --config it shows the embedded default (synthetic shapes). The input side is
--image_size, else the model's prior spec input size when the config names a model, else 300.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", _DEFAULT, "Configuration file (uses config.dataset).")
flags.DEFINE_string("out", "samples.png", "Output PNG path.")
flags.DEFINE_integer("num_images", 16, "Number of samples in the grid.")
flags.DEFINE_integer("image_size", 0, "Input side; 0 = from the config's model, else 300.")
flags.DEFINE_integer("step", 0, "Training step whose batch is shown.")
flags.DEFINE_boolean("eval", False, "Show the (non-augmented) eval pipeline instead.")


def _image_size(config) -> int:
    if FLAGS.image_size:
        return FLAGS.image_size
    name = str(config.get("model", {}).get("name", ""))
    if name == "compact":
        from ssd_jax.models import COMPACT_PRIORS

        return COMPACT_PRIORS.image_size
    return 512 if "512" in name else 300


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from ssd_jax.data import pipeline, visualize

    config = FLAGS.config
    size = _image_size(config)
    info = pipeline.get_dataset_info(config.dataset)
    max_boxes = int(config.get("max_boxes", 100))
    if FLAGS.eval:
        batch = next(iter(pipeline.create_eval_iterator(
            config.dataset, image_size=size, batch_size=FLAGS.num_images, max_boxes=max_boxes)))
    else:
        batch = next(pipeline.create_train_iterator(
            config.dataset, image_size=size, batch_size=FLAGS.num_images, max_boxes=max_boxes,
            seed=int(config.get("seed", 0)), start_step=FLAGS.step))
    visualize.save_sample_grid(batch, info.class_names, FLAGS.out, max_images=FLAGS.num_images)
    logging.info("wrote %s (%d images of %dx%d; input repairs: %s)", FLAGS.out,
                 FLAGS.num_images, size, size, pipeline.get_stats() or "none")
    print(FLAGS.out)


if __name__ == "__main__":
    app.run(main)
