"""Train SSD: `python -m experiments.train --workdir=DIR [--config=experiments/configs/X.py]`.

With no --config it runs the embedded default (synthetic data, compact model; a CPU is enough).
Any config field can be overridden: `--config.num_train_steps=100`. Running again with the same
workdir resumes exactly where the last checkpoint stopped. Several processes (TPU pods, SLURM, or
--coordinator_address/--num_processes/--process_id) train one data-parallel model.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "default.py")
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and pictures.")
config_flags.DEFINE_config_file("config", _DEFAULT, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-process runs).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data; JAX owns the accelerators
    import jax

    from ssd_jax import distributed, train_lib

    distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
