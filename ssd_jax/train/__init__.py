"""The trainer, by job: `state` (TrainState, schedule, optimizer, init and resume), `step` (the
reusable training step and its data-parallel form), `hooks` (stop on signals, checkpoint only
finite parameters, the run's log file) and `loop` (`train_and_evaluate(config, workdir)`).

Nothing in the library imports this package: serving (`inference`, `export`) reads a run through
`ssd_jax.workdir`.
"""

from ssd_jax.train.loop import train_and_evaluate
from ssd_jax.train.state import (
    TrainState,
    create_optimizer,
    create_train_state,
    init_state,
    learning_rate_schedule,
    pretrained_backbone_hint,
    restore_or_init,
)
from ssd_jax.train.step import (
    Steps,
    augment_on_device,
    compile_steps,
    displayed_train_batch,
    eval_variables,
    make_steps,
    train_batch_spec,
    train_step,
)

__all__ = ["Steps", "TrainState", "augment_on_device", "compile_steps", "create_optimizer",
           "create_train_state", "displayed_train_batch", "eval_variables", "init_state",
           "learning_rate_schedule", "make_steps", "pretrained_backbone_hint", "restore_or_init",
           "train_and_evaluate", "train_batch_spec", "train_step"]
