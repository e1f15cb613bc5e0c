"""One process of a multi-process (or multi-device) tiny training, for tests/test_multihost.py.

    python -m tests.multihost_worker '{"processes": 2, "process_id": 0, "port": 1234,
        "devices": 1, "dtype": "float64", "steps": 3, "workdir": "...", "out": "....npz"}'

Trains `tests.test_train.tiny_config()` (optionally changed by "config": {"field": value}) with
`train.train_and_evaluate` and saves its final params, batch_stats and optimizer state (this
process's copy of each replicated leaf) and the final evaluation's mAP to "out". "devices" local
CPU devices per process (XLA's host platform device count); "dtype" float64 turns on 64-bit JAX
first; "late_process" enters training "late_seconds" after the others. The multi-process options
are those of `experiments.train` (`distributed.maybe_initialize`).
"""

import json
import os
import sys


def worker_config(args: dict):
    """`tests.test_train.tiny_config()` with the run's "steps", "dtype" and "config" overrides
    ({"dataset.num_test": 0, ...})."""
    from tests.test_train import tiny_config

    config = tiny_config()
    config.num_train_steps = int(args.get("steps", 3))
    config.dtype = args.get("dtype", "float32")
    for key, value in args.get("config", {}).items():
        *path, name = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[name] = value
    return config


def _die_at_step(step_module, step: int) -> None:
    import dataclasses
    import signal

    make_steps = step_module.make_steps

    class Dying:
        def __init__(self, train):
            self.train = train

        def __getattr__(self, name):  # .lower (the AOT compile) and the rest
            return getattr(self.train, name)

        def __call__(self, state, batch):
            if int(state.step) == step:
                print(f"killing myself before step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return self.train(state, batch)

    def patched(*args, **kwargs):
        steps = make_steps(*args, **kwargs)
        return dataclasses.replace(steps, train=Dying(steps.train))

    step_module.make_steps = patched


def main() -> None:
    args = json.loads(sys.argv[1])
    devices = int(args.get("devices", 1))
    flags = os.environ.get("XLA_FLAGS", "")
    if args.get("dtype") == "float64":  # unoptimized float64 steps run 3x slower than they compile
        flags = flags.replace("--xla_backend_optimization_level=0", "")
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    os.environ["XLA_FLAGS"] = flags
    import jax

    if args.get("dtype") == "float64":
        jax.config.update("jax_enable_x64", True)
    import logging

    import numpy as np
    from absl import logging as absl_logging

    # as the commands (absl.app): INFO lines on stderr (the tests wait for "step N/M") and in
    # train.log; the library logs through standard loggers, which a program configures
    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.root.setLevel(logging.INFO)

    from ssd_jax import distributed, models, train
    from ssd_jax.errors import LostProcessError, TrainingInterrupted

    n = int(args.get("processes", 1))
    if n > 1:
        distributed.maybe_initialize(f"localhost:{args['port']}", n, int(args["process_id"]))
    config = worker_config(args)
    if "die_at_step" in args and int(args.get("die_process", 0)) == int(args.get("process_id", 0)):
        # SIGKILL process "die_process" as it is about to run that step
        _die_at_step(train.step, int(args["die_at_step"]))
    if int(args.get("late_process", -1)) == int(args.get("process_id", 0)):
        # this process enters train_and_evaluate late: the others have created checkpoints/
        import time

        time.sleep(float(args["late_seconds"]))
    try:
        state, metrics = train.train_and_evaluate(config, args["workdir"])
    except LostProcessError as e:  # as the train command does (ssd_jax.cli.run)
        distributed.exit_lost(str(e))
    except TrainingInterrupted as e:  # as the train command does: 143 after SIGTERM
        print(f"\n{e}", flush=True)
        sys.exit(143 if e.signal_name == "SIGTERM" else 130)
    out = {"mAP": np.float64(metrics["mAP"])}
    for part in ("params", "batch_stats", "opt_state"):
        leaves = jax.tree.leaves(getattr(state, part))
        for j, x in enumerate(leaves):
            out[f"{part}/{j}"] = np.asarray(x.addressable_data(0))
    if args.get("save_init"):  # the state before training (the same seed): updates' sizes
        from ssd_jax.data import pipeline

        model = models.from_config(config, pipeline.get_dataset_info(config.dataset).num_classes,
                                   axis_name="data")
        init = train.create_train_state(config, model, train.create_optimizer(config))
        for part in ("params", "batch_stats", "opt_state"):
            for j, x in enumerate(jax.tree.leaves(getattr(init, part))):
                out[f"init_{part}/{j}"] = np.asarray(x)
    np.savez(args["out"], **out)
    print("trained", jax.process_index(), jax.process_count(), jax.device_count(), flush=True)


if __name__ == "__main__":
    main()
