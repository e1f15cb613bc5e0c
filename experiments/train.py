"""Train SSD: `python -m experiments.train --workdir=DIR [--config=NAME_OR_FILE]`.

With no --config it runs the embedded default (synthetic data, compact model; a CPU is enough).
`--config=ssd300_voc` names a file of experiments/configs/, or give a path. Any field can be
overridden (`--config.num_train_steps=100`); `--print_config` lists them with their comments.
Running again with the same workdir resumes exactly where the last checkpoint stopped (a changed
model, data or optimizer is refused, naming the fields). Several processes (TPU pods, SLURM, or
--coordinator_address/--num_processes/--process_id) train one data-parallel model.
"""

import os

from absl import flags, logging

from ssd_jax import cli
from ssd_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined by `run`, so that importing several commands in one
    process never clashes on names like --workdir)."""
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and pictures.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
    flags.DEFINE_integer("process_id", None, "Index of this process (multi-process runs).")

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def main(argv, config):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise UserError("--workdir is required: the folder for checkpoints, logs and pictures")
    import jax

    from ssd_jax import distributed, train
    cli.import_tensorflow_quietly()  # the data (TensorFlow sees no GPU)

    distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    train.train_and_evaluate(config, FLAGS.workdir)


def run():
    """The `ssd-train` console script."""
    define_flags()
    cli.run(main, configs_dir=CONFIGS, default_config="default")


if __name__ == "__main__":
    run()
