"""Training and evaluation of SSD: a data-parallel step over all devices of all hosts.

The per-device step is written pmap-style with named-axis collectives over the mesh axis
``"data"`` and mapped with ``jax.shard_map`` under ``jax.jit`` (the maintained successor of
``jax.pmap``): params are replicated, the batch is sharded, the state buffers are donated. The
loss is normalized by the GLOBAL number of positives (``multibox_loss(..., axis_name="data")``
psums the loss sums and the positive count), so a step gives the same result on 1 or N devices.
Because the params enter the step replicated, the gradient JAX computes for them is already the
all-reduced gradient of the global loss (the transpose of the implicit broadcast of a replicated
value is a psum over ``"data"``): no separate ``pmean`` of the gradients is needed, and adding one
would be an identity. BatchNorm layers (the compact model) use ``axis_name="data"`` so their
batch statistics are the global batch's.

``train_and_evaluate(config, workdir)`` is callable from a notebook; ``experiments/train.py`` is
its command line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ssd_jax import distributed, evaluation, matching, models, postprocess, priors
from ssd_jax import loss as loss_lib
from ssd_jax.cli import release_freed_memory
from ssd_jax.errors import (
    ConfigError,
    LostProcessError,
    TrainingInterrupted,
    UserError,
    WorkdirMismatchError,
)

if TYPE_CHECKING:  # the steps read a config by attribute only: no ml_collections on a bare host
    import ml_collections

METRICS = evaluation.METRICS
#: config.dtype -> compute dtype. "float64" (params, optimizer state and compute in float64;
#: needs JAX_ENABLE_X64=1) is for tests: it shows which differences are float32 rounding.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}


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


# ----------------------------------------------------------------------------- config checks


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    num_processes: int | None = None, check_data: bool = True,
                    purpose: str = "train") -> None:
    """Raise ConfigError naming the field for a config that cannot run; called before any compile.

    With `check_data` (needs TensorFlow), config.dataset is checked too: the fields its kind
    needs and the files and folders they name. `purpose="eval"` checks only what evaluating a
    saved checkpoint needs (the eval split, eval_batch_size, the metric), so a run trained
    elsewhere (other devices, training data not copied) can be evaluated.
    """
    if purpose not in ("train", "eval"):
        raise ValueError(f"purpose must be 'train' or 'eval', got {purpose!r}")
    training = purpose == "train"
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_processes = jax.process_count() if num_processes is None else num_processes
    if check_data:
        from ssd_jax.data import sources

        sources.validate_dataset_config(config.dataset, ("train", "eval") if training else ("eval",))
    if config.model.name not in models.MODELS:
        raise ConfigError(f"config.model.name={config.model.name!r} is unknown; "
                          f"choose one of {tuple(models.MODELS)}")
    try:  # builds the module description only (checks its options and prior spec); no compile
        models.build_model(config.model.name, 2, **_model_options(config))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None
    if config.dtype not in DTYPES:
        raise ConfigError(f"config.dtype={config.dtype!r} is unknown; choose one of {tuple(DTYPES)}")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("config.dtype=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 (a dtype for "
                          "precision checks; train in float32 or bfloat16)")
    if config.metric not in METRICS:
        raise ConfigError(f"config.metric={config.metric!r} is unknown; choose one of {METRICS}")
    for name in ("batch_size", "eval_batch_size") if training else ("eval_batch_size",):
        value = config.get(name)
        if not isinstance(value, int) or value <= 0 or value % num_devices:
            raise ConfigError(
                f"config.{name}={value!r} must be a positive multiple of the device count "
                f"({num_devices}); the global batch is split evenly over all devices")
        if (value // num_processes) % (num_devices // num_processes):
            raise ConfigError(f"config.{name}={value} does not split evenly over "
                              f"{num_processes} processes")
    for name in ("num_train_steps", "log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        if int(config.get(name)) < 0:
            raise ConfigError(f"config.{name} must be >= 0, got {config.get(name)}")
    if int(config.log_every_steps) == 0:
        raise ConfigError("config.log_every_steps must be >= 1")
    if training and not float(config.lost_process_timeout) > 0:
        raise ConfigError(f"config.lost_process_timeout must be > 0 seconds, got "
                          f"{config.lost_process_timeout}")
    if config.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"config.optimizer={config.optimizer!r} must be 'sgd' or 'adamw'")
    if config.schedule not in ("cosine", "piecewise"):
        raise ConfigError(f"config.schedule={config.schedule!r} must be 'cosine' or 'piecewise'")
    if int(config.max_boxes) < 1:
        raise ConfigError(f"config.max_boxes must be >= 1, got {config.max_boxes}")
    bounds = tuple(config.lr_boundaries)
    if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bounds) or \
            list(bounds) != sorted(bounds):
        raise ConfigError(f"config.lr_boundaries={bounds!r} must be increasing positive step "
                          "numbers, e.g. --config.lr_boundaries=80000,100000")
    if training and config.init_checkpoint and not os.path.exists(config.init_checkpoint):
        raise ConfigError(f"config.init_checkpoint={config.init_checkpoint!r} does not exist")


# ----------------------------------------------------------------------------- model, optimizer


def _model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.model's fields other than `name`: keyword options of the model's builder."""
    return {k: v for k, v in config.model.items() if k != "name"}


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 axis_name: str | None = "data") -> models.SSD:
    """The SSD of `config.model.name` with `num_classes` (incl. background) in `config.dtype`.

    BatchNorm layers (if any) reduce their batch statistics over `axis_name`: the data axis in
    the shard_mapped train step, None for plain inference outside it.
    """
    model = models.build_model(config.model.name, num_classes, DTYPES[config.dtype],
                               **_model_options(config))
    return model.with_bn_axis_name(axis_name)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
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


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum and Caffe-style L2 decay (the paper), or AdamW; both decay kernels only."""
    schedule = learning_rate_schedule(config)
    if config.optimizer == "sgd":
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
                         optax.sgd(schedule, momentum=config.momentum))
    else:
        tx = optax.adamw(schedule, weight_decay=config.weight_decay, mask=_decay_mask)
    if config.get("grad_clip_norm"):
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx


def create_train_state(config: ml_collections.ConfigDict, model: models.SSD,
                       tx: optax.GradientTransformation) -> TrainState:
    """A fresh state from `config.seed` (params float32; float64 with config.dtype=float64),
    optionally starting from `config.init_checkpoint` (e.g. the converted VGG16 backbone: leaves
    present there override)."""
    init_rng, state_rng = _run_keys(config.seed)
    size = model.prior_spec.image_size
    # Compiled without backend optimization: the init program (a random initializer per leaf)
    # runs once, and optimizing it took ~9 s of a 2-core CPU's startup (3 s unoptimized).
    init = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3), jnp.uint8)))
    variables = init.lower(init_rng).compile({"xla_backend_optimization_level": 0})(init_rng)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if config.init_checkpoint:
        from ssd_jax import convert

        try:
            loaded = convert.load_checkpoint(config.init_checkpoint)
            loaded_params = loaded.get("params", loaded)
            params = convert.merge_params(params, loaded_params)
            if "batch_stats" in loaded and batch_stats:
                batch_stats = convert.merge_params(batch_stats, loaded["batch_stats"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ConfigError(f"config.init_checkpoint={config.init_checkpoint}: not an ssd_jax "
                              f"checkpoint that fits config.model ({first}); convert torchvision "
                              "weights with `python -m experiments.convert_torchvision`") from None
        logging.info("initialized from %s", config.init_checkpoint)
    if config.get("dtype") == "float64":
        params, batch_stats = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                                           (params, batch_stats))
    # One jitted tx.init: run eagerly, each zeros_like of each leaf shape compiles on its own
    # (about a hundred small compiles, 10-30 s on a 2-core CPU).
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=jax.jit(tx.init)(params), rng=jax.random.key_data(state_rng))


# ----------------------------------------------------------------------------- steps


def _apply(model: models.SSD, params: Any, batch_stats: Any, images: jax.Array, train: bool):
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    if train and batch_stats:
        (cls, box), updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return cls, box, updates["batch_stats"]
    cls, box = model.apply(variables, images, train=train)
    return cls, box, batch_stats


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.SSD,
               tx: optax.GradientTransformation, prior_boxes: np.ndarray,
               config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on this device's shard of the batch (runs inside shard_map over "data").

    batch: "image" uint8 [b,S,S,3], "boxes" float32 [b,M,4] normalized corners, "labels" int32
    [b,M] (0 = padding). With config.dataset.augment_on_device the images are canvases uint8
    [b,C,C,3] with "image_size" int32 [b,2] and "index" uint32 [b], augmented here first
    (`augment_on_device`). Returns the new (replicated) state and metrics summed over the global
    batch.
    """
    if config.dataset.augment_on_device:
        batch = augment_on_device(batch, state.rng, config, model.prior_spec.image_size)
    cls_t, box_t = matching.match_batch(batch["boxes"], batch["labels"], prior_boxes,
                                        config.matching_iou)

    def loss_fn(params):
        cls, box, new_stats = _apply(model, params, state.batch_stats, batch["image"], train=True)
        value, aux = loss_lib.multibox_loss(cls, box, cls_t, box_t,
                                            neg_pos_ratio=config.neg_pos_ratio,
                                            loc_weight=config.loc_weight, axis_name="data")
        return value, (aux, new_stats)

    (value, (aux, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    images = jax.lax.psum(batch["image"].shape[0], "data")
    metrics = {
        "loss": value, "conf_loss": aux["conf_loss"], "loc_loss": aux["loc_loss"],
        "positives_per_image": aux["num_pos"] / images,
        "grad_norm": optax.global_norm(grads),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state)
    return new_state, metrics


def _run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, the run's key of TrainState.rng) from config.seed."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    return init_rng, state_rng


def displayed_train_batch(config: ml_collections.ConfigDict, batch: dict[str, Any],
                          image_size: int) -> dict[str, np.ndarray]:
    """A batch of the training iterator as the model sees it: in the device mode
    (config.dataset.augment_on_device) the host's canvases go through the train step's
    augmentation with the run's key (`augment_on_device`), so a picture of it shows what step N
    trains on; in the host mode the batch is already that."""
    if not config.dataset.augment_on_device:
        return batch
    rng = jax.random.key_data(_run_keys(config.seed)[1])
    out = jax.device_get(augment_on_device(batch, rng, config, image_size))
    return {**{k: v for k, v in batch.items() if k not in ("image_size", "index")}, **out}


def augment_on_device(batch: dict[str, jax.Array], rng: jax.Array,
                      config: ml_collections.ConfigDict, image_size: int) -> dict[str, jax.Array]:
    """The paper's augmentation of a canvas batch inside the train step (`ssd_jax.augment`): each
    example's key is the run's key (`rng`, key data) folded with the example's global index, so
    the batch does not depend on the device or process count, and a resumed run repeats it."""
    from ssd_jax import augment

    d = config.dataset
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), _AUGMENT_STREAM)
    images, boxes, labels = augment.augment_batch(
        augment.example_keys(key, batch["index"]), batch["image"], batch["image_size"],
        batch["boxes"], batch["labels"], out_size=image_size, photometric=d.augment_photometric,
        expand=d.augment_expand, max_expand=d.max_expand, crop=d.augment_crop,
        flip=d.augment_flip)
    return {"image": images, "boxes": boxes, "labels": labels}


_AUGMENT_STREAM = 0xA06  # separates the augmentation keys from any other use of the run's key


def train_batch_spec(config: ml_collections.ConfigDict, image_size: int
                     ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of each field of the global training batch the loop feeds `train`."""
    b, m = config.batch_size, config.max_boxes
    spec = {"boxes": ((b, m, 4), jnp.float32), "labels": ((b, m), jnp.int32)}
    if config.dataset.augment_on_device:
        c = config.dataset.canvas_size
        return {"image": ((b, c, c, 3), jnp.uint8), **spec,
                "image_size": ((b, 2), jnp.int32), "index": ((b,), jnp.uint32)}
    return {"image": ((b, image_size, image_size, 3), jnp.uint8), **spec}


def eval_step(variables: dict[str, Any], images: jax.Array, *, model: models.SSD,
              prior_boxes: np.ndarray, config: ml_collections.ConfigDict) -> postprocess.Detections:
    """Detections of this device's shard: images uint8 [b,S,S,3] -> `Detections` (fixed size).

    variables: {"params": ..., "batch_stats": ... ({} without BatchNorm)}, e.g. `eval_variables(
    state)` in training or a loaded checkpoint's variables in experiments/evaluate.py.
    """
    cls, box, _ = _apply(model, variables["params"], variables.get("batch_stats", {}), images,
                         train=False)
    d = config.detect
    return postprocess.detect(cls, box, prior_boxes, score_threshold=d.score_threshold,
                              pre_nms_top_k=d.pre_nms_top_k, iou_threshold=d.iou_threshold,
                              max_detections=d.max_detections)


def eval_variables(state: TrainState) -> dict[str, Any]:
    """The variables the eval step and inference take, from a train state."""
    return {"params": state.params, "batch_stats": state.batch_stats}


@dataclasses.dataclass
class Steps:
    """The jitted, shard_mapped steps over `mesh` and the shardings that feed them.

    `train(state, batch) -> (state, metrics)`; `eval(variables, images) -> Detections` (variables
    replicated, images sharded over "data"; `train` is None for an eval-only `make_eval_steps`).
    """

    mesh: jax.sharding.Mesh
    train: Any
    eval: Any
    replicated: NamedSharding
    data: NamedSharding

    def global_batch(self, local: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, jax.Array]:
        """Per-host numpy batch -> global arrays sharded over "data" (explicit transfer)."""
        return {k: jax.make_array_from_process_local_data(self.data, local[k]) for k in keys}

    def predict_fn(self) -> Any:
        """(variables, eval batch of this host) -> the batch's Detections, as jax arrays still
        being computed (`evaluation.Evaluator` takes this host's rows when it needs them)."""
        def predict(variables, local):
            return self.eval(variables, self.global_batch(local, ("image",))["image"])

        return predict


def make_eval_steps(config: ml_collections.ConfigDict, model: models.SSD,
                    mesh: jax.sharding.Mesh | None = None,
                    compiler_options: dict[str, Any] | None = None) -> Steps:
    """The shard_mapped eval step alone (no optimizer): evaluation of a saved checkpoint.
    `compiler_options` go to `jax.jit` (tests compile unoptimized: {"xla_backend_optimization_level": 0})."""
    mesh = mesh or jax.make_mesh((jax.device_count(),), ("data",))
    prior_boxes = priors.generate_priors(model.prior_spec)
    evaluate = jax.shard_map(
        functools.partial(eval_step, model=model, prior_boxes=prior_boxes, config=config),
        mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    return Steps(mesh=mesh, train=None, eval=jax.jit(evaluate, compiler_options=compiler_options),
                 replicated=NamedSharding(mesh, P()), data=NamedSharding(mesh, P("data")))


def make_steps(config: ml_collections.ConfigDict, model: models.SSD,
               tx: optax.GradientTransformation, mesh: jax.sharding.Mesh | None = None,
               compiler_options: dict[str, Any] | None = None) -> Steps:
    """shard_map the per-device steps over a Mesh of all devices of all processes."""
    steps = make_eval_steps(config, model, mesh, compiler_options)
    prior_boxes = priors.generate_priors(model.prior_spec)
    train = jax.shard_map(
        functools.partial(train_step, model=model, tx=tx, prior_boxes=prior_boxes, config=config),
        mesh=steps.mesh, in_specs=(P(), P("data")), out_specs=(P(), P()))
    return dataclasses.replace(steps, train=jax.jit(train, donate_argnums=0,
                                                    compiler_options=compiler_options))


def compile_steps(steps: Steps, state: TrainState, config: ml_collections.ConfigDict,
                  image_size: int) -> None:
    """Compile the train and eval steps now, for the global batch shapes the loop feeds them
    (jit caches the executables: the loop's first calls do not compile again)."""
    def batch(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=steps.data)

    s = image_size
    steps.train.lower(state, {k: batch(*v) for k, v in train_batch_spec(config, s).items()}
                      ).compile()
    steps.eval.lower(eval_variables(state),
                     batch((config.eval_batch_size, s, s, 3), jnp.uint8)).compile()


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """Orbax manager under WORKDIR/checkpoints: atomic saves (temp dir + rename), keep the last K."""
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


#: The models whose recipes start from an ImageNet backbone, and the convert_torchvision --kind
#: and torchvision file that gives it.
PRETRAINED_BACKBONES = {"ssd300_vgg16": ("vgg16", "vgg16-397923af.pth"),
                        "ssd512_vgg16": ("vgg16", "vgg16-397923af.pth"),
                        "ssd300_resnet50": ("resnet50", "resnet50-0676ba61.pth")}


def pretrained_backbone_hint(config: ml_collections.ConfigDict, resuming: bool) -> str | None:
    """The warning for a fresh run of a model whose recipe starts from ImageNet weights with an
    empty config.init_checkpoint (its backbone would start from random weights), else None."""
    if resuming or config.init_checkpoint or config.model.name not in PRETRAINED_BACKBONES:
        return None
    kind, file = PRETRAINED_BACKBONES[config.model.name]
    return (f"config.init_checkpoint is empty: {config.model.name} starts from random weights, "
            f"while its recipe starts from ImageNet {kind} (python -m experiments.convert_torchvision "
            f"--kind={kind} --input={file} --output=CKPT, then --config.init_checkpoint=CKPT)")


def restore_or_init(manager: ocp.CheckpointManager, state: TrainState,
                    sharding: jax.sharding.Sharding | None = None) -> TrainState:
    """The latest checkpoint's state if there is one (exact resume), else `state`; placed with
    `sharding` (e.g. replicated over the mesh of all processes) when given. The checkpoint is
    restored straight into that sharding, whatever process and device count wrote it.

    WorkdirMismatchError when the checkpoint does not fit `state` (another model or optimizer).
    """
    step = manager.latest_step()
    if step is None:
        return state if sharding is None else jax.device_put(state, sharding)
    if sharding is None:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    else:  # a device_put of restored arrays to a multi-process sharding is a cross-host transfer
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise WorkdirMismatchError(
            f"the checkpoint of step {step} in {manager.directory} does not fit the model and "
            f"optimizer of this config ({first}). Use a new --workdir, or the config the run "
            "was started with.") from None
    logging.info("resumed from checkpoint step %d", step)
    return restored


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState) -> None:
    step = int(jax.device_get(state.step))
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


RUN_INFO = "run_info.json"

#: config fields a resumed run may change: run length, logging, eval and checkpoint cadence, and
#: what evaluation reports (a field or a group; everything else must equal the workdir's run).
RESUMABLE_FIELDS = ("num_train_steps", "log_every_steps", "eval_every_steps", "lost_process_timeout",
                    "checkpoint_every_steps", "keep_checkpoints", "num_eval_images_to_draw",
                    "draw_score_threshold", "eval_batch_size", "metric", "detect",
                    "init_checkpoint",  # only read when there is no checkpoint yet
                    "dataset.cache_dir", "dataset.data_dir")  # where data lives, not what it is


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """'field: <saved> in the workdir, <now> now' for each field outside RESUMABLE_FIELDS whose
    value differs (fields the saved run did not have are not compared)."""
    import json

    from ssd_jax.data.sources import PATH_FIELDS, normalize_path

    old = _flatten(saved)
    new = _flatten(json.loads(config.to_json_best_effort()))
    for name in PATH_FIELDS:  # 'coco/val/' and '/abs/coco/val' name one folder
        for values in (old, new):
            if isinstance(values.get(f"dataset.{name}"), str):
                values[f"dataset.{name}"] = normalize_path(values[f"dataset.{name}"])
    diffs = []
    for key in sorted(old):
        if any(key == f or key.startswith(f + ".") for f in RESUMABLE_FIELDS):
            continue
        if key not in new:
            diffs.append(f"{key}: {old[key]!r} in the workdir, not in this config")
        elif new[key] != old[key]:
            diffs.append(f"{key}: {old[key]!r} in the workdir, {new[key]!r} now")
    return diffs


def read_run_info(workdir: str) -> dict[str, Any] | None:
    """WORKDIR/run_info.json as a dict, or None when there is none."""
    import json

    path = os.path.join(workdir, RUN_INFO)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            info = json.load(f)
        if not isinstance(info, dict) or not isinstance(info.get("config"), dict) or \
                "num_classes" not in info or "class_names" not in info:
            raise ValueError("missing config, num_classes or class_names")
    except (ValueError, UnicodeDecodeError) as e:
        raise WorkdirMismatchError(f"{path} is damaged ({e}); it is written only by a training "
                                   "run: restore it or use a new --workdir") from None
    return info


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Before a run touches `workdir`: it must be a writable folder (or creatable), and a run
    already there must have the same config but for RESUMABLE_FIELDS (else
    WorkdirMismatchError listing the fields that differ). Writes nothing but the folder."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirMismatchError(f"--workdir={workdir} is a file; give a folder")
    info = read_run_info(workdir) if os.path.isdir(workdir) else None
    if info is not None:
        diffs = config_differences(info.get("config", {}), config)
        if diffs:
            shown = "\n  ".join(diffs[:12]) + ("\n  ..." if len(diffs) > 12 else "")
            raise WorkdirMismatchError(
                f"--workdir={workdir} holds a run with another config; to resume it, use the "
                f"same values (they are in {os.path.join(workdir, RUN_INFO)}); for a new run, "
                f"use a new --workdir. Fields that differ:\n  {shown}")
    try:
        os.makedirs(workdir, exist_ok=True)
        import uuid

        probe = os.path.join(workdir, f".write_probe_{jax.process_index()}_{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise WorkdirMismatchError(f"--workdir={workdir}: cannot write there "
                                   f"({e.strerror or e}); choose a folder you can write") from None


def _topology() -> dict[str, int]:
    return {"processes": jax.process_count(), "devices": jax.device_count()}


def _previous_topology(workdir: str) -> dict[str, int] | None:
    """The process and device counts of the last start of the run in WORKDIR (run_info.json)."""
    return (read_run_info(workdir) or {}).get("topology")


def save_run_info(workdir: str, config: ml_collections.ConfigDict, num_classes: int,
                  class_names: tuple[str, ...], category_ids: tuple[int, ...] = ()) -> None:
    """WORKDIR/run_info.json: the config, class names and the dataset's category ids, so
    predict/evaluate rebuild the model and report results in the dataset's ids."""
    import json

    import ssd_jax

    if jax.process_index() != 0:
        return
    info = {"config": json.loads(config.to_json_best_effort()), "num_classes": num_classes,
            "class_names": list(class_names),
            "category_ids": [int(c) for c in category_ids] or list(range(1, num_classes)),
            "ssd_jax_version": ssd_jax.__version__, "topology": _topology()}
    tmp = os.path.join(workdir, RUN_INFO + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(workdir, RUN_INFO))


# ----------------------------------------------------------------------------- the loop


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def _last_checkpoint(manager: ocp.CheckpointManager) -> str:
    step = manager.latest_step()
    return (f"the last checkpoint is step {step} in {manager.directory}" if step is not None
            else "no checkpoint was written yet (a rerun starts from step 0)")


class _StopRequested(KeyboardInterrupt):
    """A stop asked for by a signal, raised by `_StopOnInterrupt.check` at a step boundary: the
    train state is that of the step reached, so it can be saved."""


class _StopOnInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM (what `timeout`, SLURM, Kubernetes, docker and preemptible
    cloud VMs send) during training: a flag the loop checks once per step, so the stop lands at a
    step boundary, where the state can be saved, and is never swallowed by a callback it happens
    to land in (JAX's GC callback ignores a KeyboardInterrupt); a second signal interrupts at once.
    Only in the main thread (signal handlers live there).

    Several processes (jax.distributed with its preemption service, on by default): SIGTERM is
    left to JAX's preemption notifier, which tells every process; `check(step)` then stops all of
    them at the same step (`multihost_utils.reached_preemption_sync_point`, called at every step
    by every process), where they save that step together. Ctrl-C stops each process where it is
    (they keep the last periodic checkpoint)."""

    def __init__(self):
        import signal
        import threading

        from jax._src import distributed as jax_distributed

        self.requested: str | None = None  # the name of the signal that asked for the stop
        self._previous: dict[int, Any] = {}
        self.synced = jax_distributed.global_state.preemption_sync_manager is not None
        signals = (signal.SIGINT,) if self.synced else (signal.SIGINT, signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal

        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def check(self, step: int | None = None) -> None:
        """Raises _StopRequested when a signal asked for a stop; with several processes, also
        at the step all of them agreed on after a preemption notice (call with every step)."""
        if self.requested:
            raise _StopRequested
        if self.synced and step is not None:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = "SIGTERM"
                raise _StopRequested

    def restore(self) -> None:
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class _WorkdirLog:
    """Every log record of the run (orbax's INFO lines included) into WORKDIR/train.log."""

    def __init__(self, workdir: str):
        import logging as py_logging

        i = jax.process_index()
        self.path = os.path.join(workdir, "train.log" if i == 0 else f"train.{i}.log")
        self.handler = py_logging.FileHandler(self.path)
        self.handler.setFormatter(py_logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
        self.logger = py_logging.getLogger("absl")
        self.logger.addHandler(self.handler)

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> tuple[TrainState, dict[str, Any]]:
    """Train (resuming from WORKDIR if it holds a checkpoint) and evaluate.

    Returns the final state (replicated over the mesh) and the final evaluation metrics. Writes
    WORKDIR/checkpoints (orbax), run_info.json, train.log, TensorBoard events and PNGs of
    validation detections. Everything the user can get wrong is checked before anything is
    written or compiled: the config (ConfigError), the workdir (WorkdirMismatchError: another
    run's config, not writable) and the data (DataError: no usable box).
    """
    from clu import metric_writers  # imports TensorFlow: keep the module importable without it

    from ssd_jax.data import pipeline, sources

    config = config.copy_and_resolve_references()  # the caller's config stays as it was
    sources.resolve_paths(config.dataset)  # run_info.json holds paths valid from any folder
    validate_config(config)
    workdir = os.path.abspath(workdir)
    check_workdir(workdir, config)
    is_lead = jax.process_index() == 0
    data = pipeline.InputPipeline(config.dataset)
    info = data.info()  # reads the annotations: DataError here, before any compile
    log = _WorkdirLog(workdir)
    samples_png = os.path.join(workdir, "samples")
    manager = checkpoint_manager(workdir, config)
    if is_lead:
        print(f"workdir {workdir}\n  checkpoints: {manager.directory}\n"
              f"  TensorBoard: tensorboard --logdir {workdir}\n  pictures: {samples_png}\n"
              f"  log: {log.path}", flush=True)
    def lost(message: str) -> str:
        return (f"{message}; {_last_checkpoint(manager)}; run the same commands again on every "
                "host to resume from it")

    # multi-process runs: a lost process stops the others (distributed.Watchdog)
    watchdog = distributed.Watchdog(timeout=config.lost_process_timeout,
                                    on_lost=lambda m: distributed.exit_lost(lost(m)))
    try:
        return _train(config, workdir, data, info, manager, samples_png, metric_writers,
                      evaluation)
    except Exception as e:
        # a collective that failed because another process is gone (gloo: "connection reset")
        message = None if isinstance(e, UserError) or jax.process_count() == 1 else \
            watchdog.lost_now()
        if message is not None:
            raise LostProcessError(lost(message)) from None
        raise
    finally:
        watchdog.stop()
        data.close()
        manager.close()
        log.close()


def _train(config, workdir, data, info, manager, samples_png, metric_writers, evaluation):
    is_lead = jax.process_index() == 0
    model = create_model(config, info.num_classes)
    size = model.prior_spec.image_size
    # the synthetic images are generated in worker processes while the steps compile
    data.start_loading(train_image_size=size)
    tx = create_optimizer(config)
    steps = make_steps(config, model, tx)
    n_proc = jax.process_count()
    local_batch, local_eval_batch = config.batch_size // n_proc, config.eval_batch_size // n_proc
    hint = pretrained_backbone_hint(config, resuming=manager.latest_step() is not None)
    if hint:
        logging.warning(hint)
    state = restore_or_init(manager, create_train_state(config, model, tx), steps.replicated)
    compile_steps(steps, state, config, size)
    # XLA's compiles leave ~0.5 GB of freed heap: back to the OS before the data is read (the
    # synthetic images are generated meanwhile into a buffer this process touches only when it
    # reads them), so the two never add up in the peak.
    release_freed_memory()
    eval_batches = data.eval_iterator(
        image_size=size, batch_size=local_eval_batch, max_boxes=config.max_boxes,
        process_index=jax.process_index(), process_count=n_proc)
    evaluator = evaluation.Evaluator(steps.predict_fn(), eval_batches,
                                     num_classes=info.num_classes, metric=config.metric,
                                     class_names=info.class_names,
                                     num_draw=config.num_eval_images_to_draw)
    previous = _previous_topology(workdir)
    save_run_info(workdir, config, info.num_classes, info.class_names, info.category_ids)
    start_step = int(jax.device_get(state.step))
    if start_step > 0 and previous and previous != _topology():
        logging.warning(
            "resuming step %d on %d process(es) with %d device(s) in all; the run was last "
            "started on %d process(es) with %d device(s). The global batch and its order are the "
            "same, split differently: the result equals an uninterrupted run up to float32 "
            "rounding, not bit for bit (README: multi-host)", start_step, jax.process_count(),
            jax.device_count(), previous["processes"], previous["devices"])
    train_iter: Iterator[dict[str, np.ndarray]] = data.train_iterator(
        image_size=size, batch_size=local_batch, max_boxes=config.max_boxes,
        seed=config.seed, start_step=start_step, process_index=jax.process_index(),
        process_count=n_proc)

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_lead)
    if start_step == 0:
        writer.write_hparams({k: v for k, v in config.to_dict().items()
                              if isinstance(v, int | float | str | bool)})
    os.makedirs(samples_png, exist_ok=True)
    schedule = learning_rate_schedule(config)
    total = int(config.num_train_steps)
    logging.info("training %s on %s (%d classes) for %d steps, batch %d over %d devices; "
                 "starting at step %d", config.model.name, config.dataset.kind, info.num_classes,
                 total, config.batch_size, jax.device_count(), start_step)
    train_keys = tuple(train_batch_spec(config, size))
    metrics_sum: dict[str, jax.Array] | None = None
    n_summed, t_last, step_last = 0, time.perf_counter(), start_step
    t_start = t_last
    last_eval: dict[str, Any] = {}

    def report_input(step: int) -> None:
        writer.write_scalars(step, {f"input/{split}/{k}": v
                                    for split, counts in data.split_stats.items()
                                    for k, v in counts.items()})
        logging.info("input at step %d: %s", step, data.summary())

    def run_eval(step: int) -> dict[str, Any]:
        result = evaluator.run(eval_variables(state))
        writer.write_scalars(step, _scalars(result, "eval"))
        report_input(step)
        samples = evaluator.samples
        if samples is not None and is_lead:
            from PIL import Image

            from ssd_jax.data import visualize

            path = os.path.join(samples_png, f"detections_step{step:07d}.png")
            visualize.save_sample_grid(samples, info.class_names, path,
                                       score_threshold=config.draw_score_threshold)
            picture = np.asarray(Image.open(path).convert("RGB"))
            writer.write_images(step, {"eval/detections": picture[None]})
        return result

    done = start_step
    if start_step > total:
        logging.warning("the workdir's checkpoint (step %d) is past config.num_train_steps=%d: "
                        "nothing to train; evaluating that checkpoint", start_step, total)
    stop = _StopOnInterrupt()
    try:
        for step in range(start_step, total):
            stop.check(step)
            local = next(train_iter)
            batch = steps.global_batch(local, train_keys)
            with jax.transfer_guard("disallow"):
                state, metrics = steps.train(state, batch)
            metrics_sum = metrics if metrics_sum is None else jax.tree.map(jnp.add, metrics_sum,
                                                                           metrics)
            n_summed += 1
            done = step + 1
            if done % config.log_every_steps == 0 or done == total:
                summed = jax.device_get(metrics_sum)
                means = {f"train/{k}": float(v) / n_summed for k, v in summed.items()}
                if not math.isfinite(means["train/loss"]):
                    raise NonFiniteLossError(
                        f"non-finite training loss {means['train/loss']} in steps "
                        f"{done - n_summed + 1}..{done}; stopping: {_last_checkpoint(manager)}. "
                        "Lower config.learning_rate or set config.grad_clip_norm.")
                now = time.perf_counter()
                rate = (done - step_last) * config.batch_size / max(now - t_last, 1e-9)
                means["train/learning_rate"] = float(schedule(step))
                means["train/images_per_sec"] = rate
                writer.write_scalars(done, means)
                eta = (total - done) * config.batch_size / max(rate, 1e-9)
                logging.info("step %d/%d (%.0f%%) loss %.4f (conf %.4f, loc %.4f) %.1f img/s "
                             "ETA %s", done, total, 100 * done / total, means["train/loss"],
                             means["train/conf_loss"], means["train/loc_loss"], rate,
                             _fmt_duration(eta))
                metrics_sum, n_summed, t_last, step_last = None, 0, now, done
            if config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0 \
                    and done < total:
                _check_finite_then_save(manager, state, done)
            if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total:
                last_eval = run_eval(done)
                logging.info("eval at step %d: %s", done, _summary(last_eval, config.metric))

        if start_step < total and manager.latest_step() != total:
            _check_finite_then_save(manager, state, total)
        stop.check()
        last_eval = run_eval(max(total, start_step))
    except KeyboardInterrupt as e:
        saved = ""
        agreed = n_proc == 1 or (stop.synced and stop.requested == "SIGTERM")
        if isinstance(e, _StopRequested) and agreed and done > 0 \
                and manager.latest_step() != done:
            # at a step boundary: `state` is step `done`'s; keep the work done since the last
            # checkpoint (several processes save together at the step they agreed on; after
            # Ctrl-C each would stop at its own step: they keep the last periodic checkpoint)
            try:
                _check_finite_then_save(manager, state, done)
                saved = " (saved now)"
            except NonFiniteLossError as bad:
                saved = f" ({bad})"
        by = f" by {stop.requested}" if stop.requested else ""
        if agreed and n_proc > 1:
            by += " (a preemption notice to one of the processes: all stopped at this step)"
        raise TrainingInterrupted(
            f"interrupted{by} at step {done}; "
            f"{_last_checkpoint(manager)}{saved}; run the same command to resume",
            signal_name=stop.requested or "SIGINT") from None
    finally:
        stop.restore()
    logging.info("final eval at step %d: %s", max(total, start_step),
                 _summary(last_eval, config.metric))
    final = f"validation {_summary(last_eval, config.metric)}"
    if data.has_test_split:
        test_batches = data.eval_iterator(
            image_size=size, batch_size=local_eval_batch, max_boxes=config.max_boxes,
            process_index=jax.process_index(), process_count=n_proc, split="test")
        tester = evaluation.Evaluator(steps.predict_fn(), test_batches,
                                      num_classes=info.num_classes, metric=config.metric,
                                      class_names=info.class_names, num_draw=0)
        test = tester.run(eval_variables(state))
        writer.write_scalars(max(total, start_step), _scalars(test, "test"))
        logging.info("held-out test split at step %d: %s", max(total, start_step),
                     _summary(test, config.metric))
        final = f"held-out test {_summary(test, config.metric)}; {final}"
        last_eval = {**last_eval, "test": test}
    writer.flush()
    elapsed = time.perf_counter() - t_start
    if is_lead:
        warnings = "".join(f"\n  warning: {w}" for w in data.warnings)
        print(f"\nDone in {_fmt_duration(elapsed)}: {final}\n"
              f"  input: {data.summary()}{warnings}\n"
              f"  checkpoints: {manager.directory}\n"
              f"  TensorBoard: tensorboard --logdir {workdir}\n"
              f"  sample pictures: {samples_png}", flush=True)
    return state, last_eval


def _check_finite_then_save(manager: ocp.CheckpointManager, state: TrainState, step: int) -> None:
    leaves = jax.tree.leaves(state.params)
    # numpy on the host copies: jnp.isfinite per leaf compiled one program per leaf shape (~9 s
    # for the 267 leaves of SSDLite on a 2-core CPU, at every checkpoint)
    finite = all(bool(np.isfinite(x).all()) for x in jax.device_get(leaves))
    if not finite:
        raise NonFiniteLossError(
            f"parameters became non-finite by step {step}; not saving: "
            f"{_last_checkpoint(manager)}.")
    save_checkpoint(manager, state)


def _scalars(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite number entries of an evaluator's result, as TensorBoard scalars PREFIX/name."""
    return {f"{prefix}/{k}": v for k, v in result.items()
            if isinstance(v, int | float) and not math.isnan(v)}


def _summary(result: dict[str, Any], metric: str) -> str:
    key = "AP" if metric == "coco" else "mAP"
    value = result.get(key)
    return f"{metric} {key} = {value:.4f}" if isinstance(value, float) else str(result)
