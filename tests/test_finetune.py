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


@pytest.mark.parametrize("builder, size", [(models.compact_ssd, 128),
                                           (models.ssdlite320_mobilenet_v3, 320)],
                         ids=["3x3 heads", "SSDLite heads"])
def test_remapped_heads_predict_the_source_logits_of_the_mapped_classes(builder, size):
    source, target = builder(len(SOURCE) + 1), builder(len(TARGET) + 1)
    src_vars = models.init_variables(source, jax.random.key(0))
    fresh = models.init_variables(target, jax.random.key(1))
    mapping, _ = finetune.class_mapping(SOURCE, TARGET)
    params = finetune.remap_class_heads(fresh["params"], src_vars["params"], mapping,
                                        len(SOURCE) + 1)
    variables = {"params": params}
    if "batch_stats" in src_vars:  # per input channel: the source's, whole
        variables["batch_stats"] = src_vars["batch_stats"]
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, size, size, 3)), jnp.uint8)
    src_cls, src_box = source.apply(src_vars, images)
    cls, box = target.apply(variables, images)
    assert cls.shape == (2, src_cls.shape[1], len(TARGET) + 1)
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
