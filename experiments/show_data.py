"""Write a PNG grid of augmented training samples (or eval images) with their boxes and names.

    python -m experiments.show_data --out=samples.png
    python -m experiments.show_data --config=ssd300_voc --config.dataset.data_dir=DIR --out=voc.png

With no --config it shows the embedded default (synthetic shapes): only the --num_images images
drawn are generated (the first ones of the split), not the whole training set. The input side is
--image_size, else the config's model input size.
"""

import os

from absl import flags

from ssd_jax import cli
from ssd_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined by `run`, so that importing several commands in one
    process never clashes on names like --workdir)."""
    flags.DEFINE_string("out", "samples.png", "Output PNG path.")
    flags.DEFINE_integer("num_images", 16, "Number of samples in the grid.")
    flags.DEFINE_integer("image_size", 0, "Input side; 0 = the config's model input size.")
    flags.DEFINE_integer("step", 0, "Training step whose augmentation is shown (for synthetic data, "
                         "of the --num_images images generated, not the run's batch of that step).")
    flags.DEFINE_boolean("eval", False, "Show the (non-augmented) eval pipeline instead.")

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def main(argv, config):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.num_images < 1:
        raise UserError(f"--num_images must be >= 1, got {FLAGS.num_images}")
    if FLAGS.image_size < 0:
        raise UserError(f"--image_size must be >= 0 (0: the model's), got {FLAGS.image_size}")
    if os.path.isdir(FLAGS.out):
        raise UserError(f"--out={FLAGS.out} is a folder; give a .png file path")
    cli.import_tensorflow_quietly()  # the data (TensorFlow sees no GPU)
    from ssd_jax import config as config_lib
    from ssd_jax import models, train
    from ssd_jax.data import pipeline, visualize

    if config.dataset.kind == "synthetic":  # generate only what is drawn
        config.dataset.num_train = min(config.dataset.num_train, FLAGS.num_images)
        config.dataset.num_eval = min(config.dataset.num_eval, FLAGS.num_images)
        config.dataset.num_test = 0
    config_lib.validate(config)
    size = FLAGS.image_size or models.from_config(config, 2, axis_name="data").prior_spec.image_size
    data = pipeline.InputPipeline(config.dataset)
    info = data.info()
    if FLAGS.eval:
        batch = next(iter(data.eval_iterator(image_size=size, batch_size=FLAGS.num_images,
                                             max_boxes=config.max_boxes)))
    else:
        batch = next(data.train_iterator(image_size=size, batch_size=FLAGS.num_images,
                                         max_boxes=config.max_boxes, seed=config.seed,
                                         start_step=FLAGS.step))
        # the device mode ships canvases: augment them as the train step does
        batch = train.displayed_train_batch(config, batch, size)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    visualize.save_sample_grid(batch, info.class_names, FLAGS.out, max_images=FLAGS.num_images)
    print(f"wrote {FLAGS.out} ({FLAGS.num_images} {'eval' if FLAGS.eval else 'training'} images "
          f"of {size}x{size}; input: {data.summary()})")


def run():
    """The `ssd-show-data` console script."""
    define_flags()
    cli.run(main, configs_dir=CONFIGS, default_config="default")


if __name__ == "__main__":
    run()
