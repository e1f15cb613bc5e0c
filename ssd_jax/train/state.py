"""The train state and what makes it: the learning-rate schedule, the optimizer, a fresh state
from the config (optionally from `config.init_checkpoint`), and the resume from a workdir."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from ssd_jax import config as config_lib
from ssd_jax import models
from ssd_jax import workdir as workdir_lib
from ssd_jax.errors import ConfigError, UserError, first_line

log = logging.getLogger(__name__)


class TrainState(struct.PyTreeNode):
    """Everything a resumed run needs; the data position is `step` (data order = f(seed, step)).

    Attributes:
      step: int32 scalar, number of optimizer updates done.
      params: float32 parameters.
      batch_stats: BatchNorm running statistics ({} for models without BatchNorm).
      opt_state: optax state.
      rng: PRNG key data [2] uint32 of the run (folded with the step and device where used).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def learning_rate_schedule(config: Any) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to 0 or piecewise x`lr_decay` at
    `lr_boundaries` (the paper: x0.1 at 80k and 100k)."""
    lr, warmup = config.learning_rate, int(config.warmup_steps)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(int(config.num_train_steps), warmup + 1), end_value=0.0)
    boundaries = {int(b): config.lr_decay for b in config.lr_boundaries}
    if warmup == 0:
        return optax.piecewise_constant_schedule(lr, boundaries)
    shifted = {b - warmup: s for b, s in boundaries.items() if b > warmup}
    return optax.join_schedules(
        [optax.linear_schedule(lr * config.warmup_start_factor, lr, warmup),
         optax.piecewise_constant_schedule(lr, shifted)], [warmup])


def _decay_mask(params: Any) -> Any:
    """Weight decay on conv kernels only (not biases, BatchNorm or the L2Norm scale)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def create_optimizer(config: Any) -> optax.GradientTransformation:
    """SGD with momentum and Caffe-style L2 decay (the paper), or AdamW; both decay kernels only.
    With config.trainable other than "all", the frozen parameters (`models.trainable_mask`) get
    a zero update (no step, no weight decay, no optimizer state): optax.multi_transform."""
    schedule = learning_rate_schedule(config)
    if config.optimizer == "sgd":
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
                         optax.sgd(schedule, momentum=config.momentum))
    else:
        tx = optax.adamw(schedule, weight_decay=config.weight_decay, mask=_decay_mask)
    if config.get("grad_clip_norm"):
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    trainable = config.get("trainable", "all")  # runs saved before the field trained everything
    if trainable != "all":
        def labels(params: Any) -> Any:
            return jax.tree.map(lambda t: "train" if t else "frozen",
                                models.trainable_mask(params, trainable))

        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, the run's key of TrainState.rng) from config.seed."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    return init_rng, state_rng


def init_state(model: models.SSD, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """A fresh TrainState of `model` for the optimizer `tx`, from `seed`: params float32 (and
    BatchNorm statistics), the optimizer's state, step 0, the run's key (`run_keys`)."""
    init_rng, state_rng = run_keys(seed)
    size = model.prior_spec.image_size
    # Compiled without backend optimization: the init program (a random initializer per leaf)
    # runs once, and optimizing it took ~9 s of a 2-core CPU's startup (3 s unoptimized).
    init = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3), jnp.uint8)))
    variables = init.lower(init_rng).compile({"xla_backend_optimization_level": 0})(init_rng)
    params = variables["params"]
    # One jitted tx.init: run eagerly, each zeros_like of each leaf shape compiles on its own
    # (about a hundred small compiles, 10-30 s on a 2-core CPU).
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=jax.jit(tx.init)(params), rng=jax.random.key_data(state_rng))


class Init(NamedTuple):
    """What `config.init_checkpoint` gives a fresh run: the weights and how their classes map."""

    pretrained: Any  # finetune.Pretrained
    plan: Any  # finetune.Plan


def load_init(config: Any, model: models.SSD, class_names: Sequence[str] | None = None
              ) -> Init | None:
    """`config.init_checkpoint` read and checked to fit `model` for the dataset's `class_names`
    (background excluded; None: the checkpoint's own classes), on shapes only: nothing compiles
    and nothing is written, so the trainer calls it before it touches the workdir. None when
    config.init_checkpoint is empty. ConfigError (one line) for a path that is not a checkpoint
    or a run with one, a config.init_class_map name in neither class list, or a checkpoint of
    another architecture (naming the first layer that does not fit)."""
    from ssd_jax import finetune

    path = config.init_checkpoint
    if not path:
        return None
    try:
        pretrained = finetune.load_pretrained(path)
    except UserError as e:
        raise ConfigError(f"config.{e}") from None
    try:
        how = finetune.plan(pretrained, class_names,
                            config_lib.class_map(config.get("init_class_map", "")))
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        name = "init_class_map" if config.get("init_class_map") else "init_checkpoint"
        raise ConfigError(f"config.{name}={config.get(name)}: {first_line(e)}") from None
    try:
        fresh = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
        jax.eval_shape(lambda v: finetune.fit_variables(v, pretrained, how), fresh)
    except ValueError as e:
        kind = f"a {pretrained.model} " if pretrained.model else ""
        raise ConfigError(f"config.init_checkpoint={path}: {kind}checkpoint that does not fit "
                          f"config.model.name={config.model.name}: {first_line(e)}"
                          ) from None
    return Init(pretrained, how)


def create_train_state(config: Any, model: models.SSD, tx: optax.GradientTransformation,
                       class_names: Sequence[str] | None = None,
                       init: Init | None = None, use_init_checkpoint: bool = True
                       ) -> TrainState:
    """`init_state` from `config.seed` (params float64 with config.dtype=float64), optionally
    starting from `config.init_checkpoint`: a converted backbone (its leaves override), a
    converted detector or a finished run (everything taken; classification heads trained on
    other classes keep the channels of the dataset's `class_names` found there, by name or by
    config.init_class_map; `ssd_jax.finetune`). `init`: `load_init`'s result, when the caller
    checked it already; use_init_checkpoint=False ignores config.init_checkpoint (a run about
    to resume from its own checkpoint)."""
    from ssd_jax import finetune

    state = init_state(model, tx, config.seed)
    params, batch_stats = state.params, state.batch_stats
    if use_init_checkpoint and init is None:
        init = load_init(config, model, class_names)
    if init is not None:
        fitted = finetune.fit_variables({"params": params, "batch_stats": batch_stats},
                                        init.pretrained, init.plan)
        params, batch_stats = fitted["params"], fitted["batch_stats"]
        log.info("initialized from %s", init.pretrained.source)
        for line in finetune.report_lines(init.plan):
            log.info("  %s", line)
    if config.get("dtype") == "float64":
        params, batch_stats = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                                           (params, batch_stats))
    if params is state.params and batch_stats is state.batch_stats:
        return state
    return state.replace(params=params, batch_stats=batch_stats,
                         opt_state=jax.jit(tx.init)(params))


#: The models whose recipes start from an ImageNet backbone, and the convert_torchvision --kind
#: and torchvision file that gives it.
PRETRAINED_BACKBONES = {"ssd300_vgg16": ("vgg16", "vgg16-397923af.pth"),
                        "ssd512_vgg16": ("vgg16", "vgg16-397923af.pth"),
                        "ssd300_resnet50": ("resnet50", "resnet50-0676ba61.pth")}


def pretrained_backbone_hint(config: Any, resuming: bool) -> str | None:
    """The warning for a fresh run of a model whose recipe starts from ImageNet weights with an
    empty config.init_checkpoint (its backbone would start from random weights), else None."""
    if resuming or config.init_checkpoint or config.model.name not in PRETRAINED_BACKBONES:
        return None
    kind, file = PRETRAINED_BACKBONES[config.model.name]
    return (f"config.init_checkpoint is empty: {config.model.name} starts from random weights, "
            f"while its recipe starts from ImageNet {kind} (python -m experiments.convert_torchvision "
            f"--kind={kind} --input={file} --output=CKPT, then --config.init_checkpoint=CKPT)")


def restore_or_init(manager: Any, state: TrainState,
                    sharding: jax.sharding.Sharding | None = None) -> TrainState:
    """The latest checkpoint's state if there is one (exact resume), else `state`; placed with
    `sharding` (e.g. replicated over the mesh of all processes) when given. The checkpoint is
    restored straight into that sharding, whatever process and device count wrote it.

    WorkdirMismatchError when the checkpoint does not fit `state` (another model or optimizer).
    """
    step = manager.latest_step()
    if step is None:
        return state if sharding is None else jax.device_put(state, sharding)
    restored = workdir_lib.restore_into(manager, step, state, sharding)
    log.info("resumed from checkpoint step %d", step)
    return restored
