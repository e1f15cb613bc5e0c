"""ssd_jax.finetune: a detector's classification heads mapped to other classes by name (issue 35,
item 1). The channel layout is checked through the models' outputs, not through the formula:
the target model's logit of a mapped class equals the source model's logit of its source class
at every prior of every location."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import finetune, models

SOURCE = ("person", "car", "dog", "cat")
TARGET = ("Dog", "bicycle", " PERSON ")


def test_class_mapping_by_name_and_by_rename():
    mapping, report = finetune.class_mapping(SOURCE, TARGET)
    assert mapping == [0, 3, None, 1]
    assert report == {"mapped": ["dog -> Dog", "person ->  PERSON "], "new": ["bicycle"],
                      "dropped": ["car", "cat"]}
    mapping, report = finetune.class_mapping(SOURCE, TARGET, rename={"car": "bicycle"})
    assert mapping == [0, 3, 2, 1] and report["new"] == [] and report["dropped"] == ["cat"]
    with pytest.raises(ValueError, match="'truck' is not a class of the source checkpoint"):
        finetune.class_mapping(SOURCE, TARGET, rename={"truck": "bicycle"})
    with pytest.raises(ValueError, match="'boat' is not a class of the dataset"):
        finetune.class_mapping(SOURCE, TARGET, rename={"car": "boat"})


def _compact_with_ssdlite_heads(num_classes: int) -> models.SSD:
    """SSDLite's heads (depthwise 3x3 + BatchNorm, pointwise 1x1) on the compact network: the
    heads' layout at a fraction of SSDLite320's compile time."""
    from ssd_jax.heads import SSDLiteHead

    return models.compact_ssd(num_classes, width_mult=0.25).clone(head=SSDLiteHead(name="heads"))


@pytest.mark.parametrize("builder, size", [(models.compact_ssd, 128),
                                           (_compact_with_ssdlite_heads, 128)],
                         ids=["3x3 heads", "SSDLite heads"])
def test_remapped_heads_predict_the_source_logits_of_the_mapped_classes(builder, size):
    source, target = builder(len(SOURCE) + 1), builder(len(TARGET) + 1)
    assert ("pointwise" in jax.eval_shape(lambda: models.init_variables(
        target, jax.random.key(0)))["params"]["cls_head_0"]) == (builder is not models.compact_ssd)
    src_vars = models.init_variables(source, jax.random.key(0))
    fresh = models.init_variables(target, jax.random.key(1))
    mapping, _ = finetune.class_mapping(SOURCE, TARGET)
    params = finetune.remap_class_heads(fresh["params"], src_vars["params"], mapping,
                                        len(SOURCE) + 1)
    variables = {"params": params}
    if "batch_stats" in src_vars:  # per input channel: the source's, whole
        variables["batch_stats"] = src_vars["batch_stats"]
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, size, size, 3)), jnp.uint8)
    src_cls, src_box = jax.jit(source.apply)(src_vars, images)
    cls, box = jax.jit(target.apply)(variables, images)
    assert cls.shape == (1, src_cls.shape[1], len(TARGET) + 1)
    np.testing.assert_allclose(np.asarray(box), np.asarray(src_box), rtol=1e-5, atol=1e-5)
    for t, s in enumerate(mapping):
        if s is not None:  # background, Dog <- dog, PERSON <- person, at every prior
            np.testing.assert_allclose(cls[..., t], src_cls[..., s], rtol=1e-5, atol=1e-5)
    # the new class keeps its fresh channels: one per prior of each map
    for name, head in fresh["params"].items():
        if name.startswith("cls_head_"):
            leaf = head["kernel"] if "kernel" in head else head["pointwise"]["kernel"]
            got = params[name]["kernel"] if "kernel" in head else params[name]["pointwise"]["kernel"]
            a = leaf.shape[-1] // (len(TARGET) + 1)
            new = [p * (len(TARGET) + 1) + 2 for p in range(a)]
            np.testing.assert_array_equal(np.asarray(got)[..., new], np.asarray(leaf)[..., new])


def test_a_head_that_does_not_fit_is_named():
    source, target = models.compact_ssd(5, num_maps=6), models.compact_ssd(4, num_maps=5)
    src = jax.eval_shape(lambda: models.init_variables(source, jax.random.key(0)))["params"]
    dst = jax.eval_shape(lambda: models.init_variables(target, jax.random.key(0)))["params"]
    src = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), src)
    dst = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dst)
    mapping, _ = finetune.class_mapping(SOURCE, TARGET)
    with pytest.raises(ValueError, match=r"/cls_head_\d/(kernel|bias): class head shapes do not fit|"
                                         r"checkpoint head cls_head_5 does not exist"):
        finetune.remap_class_heads(dst, src, mapping, len(SOURCE) + 1)


# ----------------------------------------------------------------------------- freezing


def _config(**fields):
    from ssd_jax import config as config_lib

    config = config_lib.get_config()
    config.model.width_mult = 0.25
    for k, v in fields.items():
        config[k] = v
    return config


def _batch(rng, n=4, size=128):
    xy = rng.uniform(0.1, 0.4, (n, 1, 2)).astype(np.float32)
    return {"image": rng.integers(0, 256, (n, size, size, 3), np.uint8),
            "boxes": np.concatenate([xy, xy + 0.4], axis=-1),
            "labels": rng.integers(1, 4, (n, 1)).astype(np.int32)}


def _step_fn(config, model, tx):
    import functools

    from ssd_jax import priors, train

    return jax.jit(functools.partial(
        train.train_step, model=model, tx=tx, prior_boxes=priors.generate_priors(model.prior_spec),
        matching_iou=0.5))


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("trainable", ["all_but_backbone", "heads"])
def test_frozen_parts_stay_bit_identical_and_resume_is_exact(trainable, tmp_path):
    """config.trainable: after 3 steps of SGD with momentum and weight decay, every frozen
    parameter and BatchNorm statistic is bit-identical to its start and every other part moved;
    a checkpoint of step 2 restored and stepped once equals the uninterrupted step 3."""
    from ssd_jax import train
    from ssd_jax import workdir as workdir_lib

    config = _config(trainable=trainable, optimizer="sgd", learning_rate=0.05, warmup_steps=0)
    model = models.from_config(config, 4)
    assert model.trainable == trainable
    tx = train.create_optimizer(config)
    state0 = train.init_state(model, tx, seed=0)
    step = _step_fn(config, model, tx)
    rng = np.random.default_rng(0)
    batches = [_batch(rng) for _ in range(3)]
    states = [state0]
    for b in batches:
        states.append(step(states[-1], b)[0])
    mask = _leaves(models.trainable_mask(state0.params, trainable))
    before, after = _leaves(state0.params), _leaves(states[-1].params)
    frozen = [k for k, t in mask.items() if not t]
    trained = [k for k, t in mask.items() if t]
    assert frozen and trained
    for k in frozen:
        assert np.array_equal(before[k], after[k]), k
    # every trained layer moved (its kernel at least, by weight decay: a head whose map had no
    # positive or mined negative gets no gradient for its bias)
    layers = {k.split("]")[0] for k in trained}
    assert layers == {k.split("]")[0] for k in trained if not np.array_equal(before[k], after[k])}
    # the compact network's BatchNorm is all in "backbone": frozen under both settings
    stats0, stats3 = _leaves(state0.batch_stats), _leaves(states[-1].batch_stats)
    assert stats0 and all(np.array_equal(stats0[k], stats3[k]) for k in stats0)

    with workdir_lib.checkpoint_manager(str(tmp_path), keep=2) as manager:
        workdir_lib.save(manager, 2, states[2])
        restored = workdir_lib.restore_into(manager, 2, state0)
    resumed = step(restored, batches[2])[0]
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(states[3]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_frozen_base_keeps_its_batchnorm_statistics_while_the_extras_train():
    """SSDLite with trainable=all_but_backbone: the MobileNetV3 base's BatchNorm normalizes with
    its running statistics (its output equals inference mode's) and leaves them, the extras'
    and heads' BatchNorm update theirs."""
    import dataclasses

    from ssd_jax.priors import SSDLITE320

    full = models.ssdlite320_mobilenet_v3(3)
    # at 96 px (maps 6, 3, 2, 1, 1, 1): the same layers, a fraction of 320 px's compile time
    spec = dataclasses.replace(SSDLITE320, image_size=96,
                               feature_map_sizes=models.source_map_sizes(full.backbone, 96))
    model = full.clone(prior_spec=spec, trainable="all_but_backbone")
    # random values of the variables' shapes (compiling the initializers took 9 s): BatchNorm
    # variances positive
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if path[-1].key == "var"
                                    else rng.normal(0, 0.1, s.shape), s.dtype),
        jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0))))
    images = jnp.asarray(rng.integers(0, 256, (2, 96, 96, 3)), jnp.uint8)
    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images)
    old, new = variables["batch_stats"], updates["batch_stats"]
    for name in old:
        same = jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), old[name],
                                         new[name]))
        assert same == (name == "backbone"), name


# ----------------------------------------------------------------------------- from a run


def _fake_run(workdir, config, class_names, seed=3, save=True):
    """A finished run's workdir: run_info.json and (with `save`) checkpoint 5 of a train state."""
    from ssd_jax import train
    from ssd_jax import workdir as workdir_lib

    model = models.from_config(config, len(class_names) + 1)
    tx = train.create_optimizer(config)
    state = train.init_state(model, tx, seed=seed)
    workdir.mkdir(parents=True)
    workdir_lib.save_run_info(str(workdir), config, len(class_names) + 1, tuple(class_names))
    if save:
        with workdir_lib.checkpoint_manager(str(workdir)) as manager:
            workdir_lib.save(manager, 5, state)
    return model, {"params": state.params, "batch_stats": state.batch_stats}


def test_a_run_workdir_as_init_checkpoint_maps_its_classes(tmp_path):
    from ssd_jax import train

    source_model, source_vars = _fake_run(tmp_path / "source", _config(), SOURCE)
    # on the host: a multi-process trainer places them over a mesh that spans hosts, where a
    # committed device array cannot go (the two-process run: tests/test_multihost.py)
    loaded = finetune.load_pretrained(str(tmp_path / "source")).variables
    assert {type(x) for x in jax.tree.leaves(loaded)} == {np.ndarray}
    config = _config(init_checkpoint=str(tmp_path / "source"), init_class_map="car:bicycle")
    model = models.from_config(config, len(TARGET) + 1)
    state = train.create_train_state(config, model, train.create_optimizer(config), TARGET)
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 128, 128, 3)), jnp.uint8)
    src_cls, src_box = jax.jit(source_model.apply)(source_vars, images)
    cls, box = jax.jit(model.apply)({"params": state.params, "batch_stats": state.batch_stats},
                                    images)
    def rel_err(a, b):  # the two models compile to different programs: float32 rounding
        return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())

    assert rel_err(box, src_box) <= 1e-6
    for t, s in enumerate([0, 3, 2, 1]):  # Dog <- dog, bicycle <- car (the map), PERSON <- person
        assert rel_err(cls[..., t], src_cls[..., s]) <= 1e-6, t


# ----------------------------------------------------------------------------- bad input


def _refused(config, workdir):
    """train_and_evaluate's one-line ConfigError; nothing written to `workdir` (check_workdir
    creates the folder to probe that it is writable)."""
    from ssd_jax import train
    from ssd_jax.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        train.train_and_evaluate(config, str(workdir))
    # at most the checked folder, empty: no log, no run_info.json, no checkpoints/
    assert not workdir.exists() or not any(workdir.iterdir())
    message = str(e.value)
    assert "\n" not in message and message.startswith("config.init_c"), message
    return message


def test_bad_init_checkpoints_are_one_line_and_write_nothing(tmp_path):
    data = dict(num_train=8, num_eval=8, num_test=0, generate_processes=0)

    def config(**fields):
        c = _config(**fields)
        c.dataset.update(data)
        return c

    _fake_run(tmp_path / "source", _config(), SOURCE)
    source = str(tmp_path / "source")
    # the synthetic dataset's classes: circle, rectangle, ... (none is in SOURCE)
    msg = _refused(config(init_checkpoint=source, init_class_map="truck:circle"), tmp_path / "w1")
    assert "'truck' is not a class of the source checkpoint" in msg
    msg = _refused(config(init_checkpoint=source, init_class_map="car:lorry"), tmp_path / "w2")
    assert "'lorry' is not a class of the dataset" in msg
    msg = _refused(config(init_checkpoint=source, init_class_map="car"), tmp_path / "w3")
    assert "'car' is not 'old:new'" in msg

    # another architecture: the first layer that does not fit is named
    wider = config(init_checkpoint=source)
    wider.model.width_mult = 0.5
    msg = _refused(wider, tmp_path / "w4")
    assert "a compact checkpoint that does not fit" in msg and "/params/backbone/" in msg, msg

    # a run that has saved no checkpoint yet
    _fake_run(tmp_path / "unsaved", _config(), SOURCE, save=False)
    msg = _refused(config(init_checkpoint=str(tmp_path / "unsaved")), tmp_path / "w5")
    assert "a run workdir, but" in msg and "no checkpoint" in msg, msg

    # a folder that is neither a run nor a checkpoint
    (tmp_path / "empty").mkdir()
    msg = _refused(config(init_checkpoint=str(tmp_path / "empty")), tmp_path / "w6")
    assert "neither a run workdir" in msg
