"""The library used directly, as a JAX user writing their own loop would (issue 34, item 7):
`detect` under jit with its settings, eager calls that compile once, the training step with
plain arguments on one device, `Predictor.predict` on one image or several."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssd_jax import loss, matching, models, postprocess, priors, train


class _Compiles(logging.Handler):
    """Counts jax's "Compiling ..." log records (jax.log_compiles)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("Compiling"):
            self.count += 1


def _compiles(fn) -> int:
    handler = _Compiles()
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(handler)
    try:
        with jax.log_compiles():
            jax.block_until_ready(fn())
    finally:
        jax_logger.removeHandler(handler)
    return handler.count


def _outputs(seed: int = 0, classes: int = 5):
    pri = priors.generate_priors(models.compact_ssd(classes).prior_spec)
    rng = np.random.default_rng(seed)
    cls = jnp.asarray(rng.normal(0, 3, (2, len(pri), classes)), jnp.float32)
    box = jnp.asarray(rng.normal(0, 0.5, (2, len(pri), 4)), jnp.float32)
    return cls, box, pri


def test_jit_detect_binds_the_static_settings():
    """`jax.jit(detect)(..., max_detections=100)` fails on traced settings; `jit_detect` binds
    them, equals the eager call, and is one cached function per settings."""
    cls, box, pri = _outputs()
    with pytest.raises(Exception):  # noqa: B017 - jax's error type for a traced shape
        jax.jit(postprocess.detect)(cls, box, pri, max_detections=100)
    fn = postprocess.jit_detect(max_detections=100, iou_threshold=0.5)
    assert fn is postprocess.jit_detect(iou_threshold=0.5, max_detections=100)
    got = fn(cls, box, pri)
    want = postprocess.detect(cls, box, pri, max_detections=100, iou_threshold=0.5)
    assert got.boxes.shape == (2, 100, 4)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    static = jax.jit(postprocess.detect, static_argnames=postprocess.DETECT_SETTINGS)
    np.testing.assert_array_equal(static(cls, box, pri, max_detections=100,
                                         iou_threshold=0.5).scores, got.scores)
    with pytest.raises(TypeError, match="no setting"):
        postprocess.jit_detect(max_detection=100)


def test_eager_detect_and_loss_compile_once():
    """Outside jit, `detect` and `multibox_loss` built their closures per call and compiled
    again every time (2.1 s and 0.4 s per call); the second identical call compiles nothing."""
    cls, box, pri = _outputs(1)
    gt_boxes = np.array([[[0.1, 0.1, 0.5, 0.6]], [[0.3, 0.2, 0.9, 0.7]]], np.float32)
    cls_t, box_t = matching.match_batch(gt_boxes, np.array([[1], [2]], np.int32), pri, 0.5)
    call_detect = lambda: postprocess.detect(cls, box, pri, max_detections=50)  # noqa: E731
    call_loss = lambda: loss.multibox_loss(cls, box, cls_t, box_t)  # noqa: E731
    call_detect()
    call_loss()
    assert _compiles(call_detect) == 0
    assert _compiles(call_loss) == 0
    # under jit (and grad) the loss is the same function
    value, _ = call_loss()
    np.testing.assert_allclose(jax.jit(lambda *a: loss.multibox_loss(*a)[0])(cls, box, cls_t, box_t),
                               value, rtol=1e-6)
    grad = jax.grad(lambda c: loss.multibox_loss(c, box, cls_t, box_t)[0])(cls)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0


def test_the_training_step_with_plain_arguments_trains_on_one_device():
    """`train.train_step` outside shard_map (axis_name=None) with a model, an optimizer and
    priors: the loss of a fixed batch goes down and BatchNorm statistics move; the same step
    is what the trainer shard_maps (tests/test_train.py checks 1 = 8 devices)."""
    model = models.compact_ssd(num_classes=4)
    tx = optax.adam(1e-3)
    state = train.init_state(model, tx, seed=0)
    step = jax.jit(functools.partial(
        train.train_step, model=model, tx=tx, prior_boxes=priors.generate_priors(model.prior_spec),
        matching_iou=0.5))
    rng = np.random.default_rng(0)
    xy = rng.uniform(0.1, 0.4, (4, 1, 2)).astype(np.float32)
    batch = {"image": rng.integers(0, 256, (4, 128, 128, 3), np.uint8),
             "boxes": np.concatenate([xy, xy + 0.4], axis=-1),
             "labels": np.array([[1], [2], [3], [1]], np.int32)}
    stats0 = jax.tree.leaves(state.batch_stats)[0]
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 8 and np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0], losses
    assert not np.array_equal(np.asarray(stats0), np.asarray(jax.tree.leaves(state.batch_stats)[0]))
