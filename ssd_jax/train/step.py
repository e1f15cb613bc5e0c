"""The SSD training step, reusable on its own, and its data-parallel form.

`train_step(state, batch, model=..., tx=..., prior_boxes=...)` is one optimizer update with
plain arguments: call it under `jax.jit` on one device (axis_name=None), or inside a shard_map
over a mesh axis (axis_name="data": the loss is normalized by the GLOBAL positive count and the
gradient of the replicated params is already the all-reduced one). `make_steps(config, ...)`
is the trainer's: the step shard_mapped over a Mesh of all devices of all hosts (``jax.pmap``'s
maintained successor), jitted with the state donated, beside the evaluation step of
`ssd_jax.inference`.

    step = jax.jit(functools.partial(train_step, model=model, tx=tx, prior_boxes=priors))
    state, metrics = step(state, {"image": images, "boxes": boxes, "labels": labels})
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from ssd_jax import loss as loss_lib
from ssd_jax import matching, models, priors, run_eval
from ssd_jax.train.state import TrainState, run_keys


def _apply(model: models.SSD, params: Any, batch_stats: Any, images: jax.Array):
    """The network in training mode: (cls, box, new batch_stats)."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
        (cls, box), updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return cls, box, updates["batch_stats"]
    cls, box = model.apply(variables, images, train=True)
    return cls, box, batch_stats


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: models.SSD,
               tx: optax.GradientTransformation, prior_boxes: Any, matching_iou: float = 0.5,
               neg_pos_ratio: float = 3.0, loc_weight: float = 1.0, axis_name: str | None = None,
               augment: Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]] | None
               = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update: match, multibox loss, gradient, `tx`.

    batch: "image" uint8 [b,S,S,3], "boxes" float32 [b,M,4] normalized corners, "labels" int32
    [b,M] (0 = padding). prior_boxes: [P,4] center form (`priors.generate_priors`). `augment`
    (optional): (batch, the run's key data) -> batch of "image", "boxes", "labels", run first
    (the device augmentation, `augment_on_device`). axis_name: the mesh axis when called inside
    shard_map (the loss is then normalized over all devices and BatchNorm statistics need a
    model built with the same axis); None on one device. Returns the new state and metrics
    (loss, conf_loss, loc_loss, positives_per_image, grad_norm) of the global batch.
    """
    if augment is not None:
        batch = {**batch, **augment(batch, state.rng)}
    cls_t, box_t = matching.match_batch(batch["boxes"], batch["labels"], prior_boxes, matching_iou)

    def loss_fn(params):
        cls, box, new_stats = _apply(model, params, state.batch_stats, batch["image"])
        value, aux = loss_lib.multibox_loss(cls, box, cls_t, box_t, neg_pos_ratio=neg_pos_ratio,
                                            loc_weight=loc_weight, axis_name=axis_name)
        return value, (aux, new_stats)

    (value, (aux, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    images = batch["image"].shape[0]
    if axis_name is not None:
        images = jax.lax.psum(images, axis_name)
    metrics = {
        "loss": value, "conf_loss": aux["conf_loss"], "loc_loss": aux["loc_loss"],
        "positives_per_image": aux["num_pos"] / images,
        "grad_norm": optax.global_norm(grads),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state)
    return new_state, metrics


def augment_on_device(batch: dict[str, jax.Array], rng: jax.Array,
                      config: Any, image_size: int) -> dict[str, jax.Array]:
    """The paper's augmentation of a canvas batch inside the train step (`ssd_jax.device_augment`): each
    example's key is the run's key (`rng`, key data) folded with the example's global index, so
    the batch does not depend on the device or process count, and a resumed run repeats it."""
    from ssd_jax import device_augment as augment

    d = config.dataset
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), _AUGMENT_STREAM)
    images, boxes, labels = augment.augment_batch(
        augment.example_keys(key, batch["index"]), batch["image"], batch["image_size"],
        batch["boxes"], batch["labels"], out_size=image_size, photometric=d.augment_photometric,
        expand=d.augment_expand, max_expand=d.max_expand, crop=d.augment_crop,
        flip=d.augment_flip)
    return {"image": images, "boxes": boxes, "labels": labels}


_AUGMENT_STREAM = 0xA06  # separates the augmentation keys from any other use of the run's key


def displayed_train_batch(config: Any, batch: dict[str, Any],
                          image_size: int) -> dict[str, np.ndarray]:
    """A batch of the training iterator as the model sees it: in the device mode
    (config.dataset.augment_on_device) the host's canvases go through the train step's
    augmentation with the run's key (`augment_on_device`), so a picture of it shows what step N
    trains on; in the host mode the batch is already that."""
    if not config.dataset.augment_on_device:
        return batch
    rng = jax.random.key_data(run_keys(config.seed)[1])
    out = jax.device_get(augment_on_device(batch, rng, config, image_size))
    return {**{k: v for k, v in batch.items() if k not in ("image_size", "index")}, **out}


def train_batch_spec(config: Any, image_size: int
                     ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of each field of the global training batch the loop feeds `train`."""
    b, m = config.batch_size, config.max_boxes
    spec = {"boxes": ((b, m, 4), jnp.float32), "labels": ((b, m), jnp.int32)}
    if config.dataset.augment_on_device:
        c = config.dataset.canvas_size
        return {"image": ((b, c, c, 3), jnp.uint8), **spec,
                "image_size": ((b, 2), jnp.int32), "index": ((b,), jnp.uint32)}
    return {"image": ((b, image_size, image_size, 3), jnp.uint8), **spec}


def eval_variables(state: TrainState) -> dict[str, Any]:
    """The variables the eval step and inference take, from a train state."""
    return {"params": state.params, "batch_stats": state.batch_stats}


@dataclasses.dataclass
class Steps(run_eval.EvalStep):
    """The trainer's jitted, shard_mapped steps over `mesh` and the shardings that feed them:
    `train(state, batch) -> (state, metrics)` beside the evaluation step (`EvalStep.eval`)."""

    train: Any = None


def make_steps(config: Any, model: models.SSD, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh | None = None,
               compiler_options: dict[str, Any] | None = None) -> Steps:
    """`train_step` with the config's settings (and the device augmentation when
    config.dataset.augment_on_device) shard_mapped over a Mesh of all devices of all processes,
    beside `run_eval.make_eval_step`. `model` is built with BatchNorm over "data"
    (`models.from_config(config, n, axis_name="data")`)."""
    eval_step = run_eval.make_eval_step(model, dict(config.detect), mesh, compiler_options)
    size = model.prior_spec.image_size
    augment = None
    if config.dataset.augment_on_device:
        augment = lambda batch, rng: augment_on_device(batch, rng, config, size)  # noqa: E731
    step = functools.partial(
        train_step, model=model, tx=tx, prior_boxes=priors.generate_priors(model.prior_spec),
        matching_iou=config.matching_iou, neg_pos_ratio=config.neg_pos_ratio,
        loc_weight=config.loc_weight, axis_name="data", augment=augment)
    train = jax.shard_map(step, mesh=eval_step.mesh, in_specs=(P(), P("data")),
                          out_specs=(P(), P()))
    return Steps(mesh=eval_step.mesh, eval=eval_step.eval, replicated=eval_step.replicated,
                 data=eval_step.data,
                 train=jax.jit(train, donate_argnums=0, compiler_options=compiler_options))


def compile_steps(steps: Steps, state: TrainState, config: Any,
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
