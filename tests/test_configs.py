"""One training step (and the final evaluation) of every config, with tiny overrides.

The paper configs read VOC/COCO through TFDS, here `tfds.testing.mock_data`; they keep their
models (SSD300/SSD512 VGG16), optimizer (SGD, piecewise schedule with warmup) and metric.
"""

import functools
import importlib
import math

import pytest

from ssd_jax import config as config_lib
from ssd_jax import models, train

#: Every config; the two slowest one-step runs (SSDLite320's and SSD512's unoptimized train
#: steps, ~60 s each on 2 cores) are `long` (outside the 15-minute suite: `pytest -m long tests`);
#: their models are checked in the suite by tests/test_ssdlite.py and tests/test_models.py. So is
#: ssd300_coco (27 s): ssd300_voc runs its model and schedule, ssd300_resnet50_coco the COCO data
#: and metric, test_ssd300_coco_builds_torchvisions_coco_anchors its priors.
CONFIGS = ["default", "ssd300_voc", pytest.param("ssd512_voc", marks=pytest.mark.long),
           pytest.param("ssd300_coco", marks=pytest.mark.long),
           pytest.param("ssdlite320_coco", marks=pytest.mark.long), "ssd300_resnet50_coco"]


@pytest.fixture
def tfds_mock_2(monkeypatch):
    """tfds_mock with 2 examples per split: the final evaluation of a paper model at 512 px costs
    a forward pass per example on the CPU."""
    from tests.conftest import mock_tfds

    yield from mock_tfds(monkeypatch, num_examples=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_one_step_of_every_config(name, tmp_path, tfds_mock_2, monkeypatch):
    # one step runs: compile without XLA's backend optimizations (SSDLite's train step: 37 s -> a
    # few; the suite has a 15-minute budget)
    monkeypatch.setattr(train.step, "make_steps", functools.partial(
        train.step.make_steps, compiler_options={"xla_backend_optimization_level": 0}))
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    config.num_train_steps = 1
    config.batch_size = 1  # SSD512's step on 2 images took most of a minute (unoptimized)
    config.eval_batch_size = 1
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    config.num_eval_images_to_draw = 1
    config.dtype = "float32"  # bfloat16 convolutions are emulated (slow) on CPU
    if config.dataset.kind == "tfds":
        config.dataset.data_dir = str(tmp_path)
        config.dataset.eval_split = "validation"  # what the mock provides for every dataset
    else:
        config.dataset.num_train, config.dataset.num_eval = 8, 4
        config.dataset.num_test = 0
    state, metrics = train.train_and_evaluate(config, str(tmp_path / "work"))
    assert int(state.step) == 1
    key = "AP" if config.metric == "coco" else "mAP"
    assert key in metrics and (math.isnan(metrics[key]) or 0.0 <= metrics[key] <= 1.0)


def test_ssd300_coco_builds_torchvisions_coco_anchors():
    """The config's model has the anchors of torchvision's COCO ssd300_vgg16 itself (its own
    anchor generator, from the model builder), in the same order, and Caffe's mean."""
    import numpy as np
    import torch
    import torchvision

    from ssd_jax import priors

    config = importlib.import_module("experiments.configs.ssd300_coco").get_config()
    model = models.from_config(config, 91, axis_name="data")
    tv = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
                                                    num_classes=91)
    grid = [[f, f] for f in model.prior_spec.feature_map_sizes]
    ref = tv.anchor_generator._grid_default_boxes(grid, [300, 300], dtype=torch.float32).numpy()
    np.testing.assert_allclose(priors.generate_priors(model.prior_spec), ref, atol=1e-6)
    np.testing.assert_allclose(model.image_mean, np.asarray(tv.transform.image_mean) * 255, atol=0.01)


@pytest.mark.parametrize("name,spec", [("ssd300_voc", "SSD300_VOC"), ("ssd512_voc", "SSD512_VOC"),
                                       ("ssd512_coco", "SSD512_COCO")])
def test_paper_configs_build_their_papers_priors(name, spec):
    from ssd_jax import priors

    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    assert models.from_config(config, 21, axis_name="data").prior_spec == getattr(priors, spec)


def test_a_wrong_prior_spec_is_a_config_error(tmp_path):
    from ssd_jax.errors import ConfigError

    config = importlib.import_module("experiments.configs.ssd300_voc").get_config()
    config.dataset.data_dir = str(tmp_path)
    config.model.prior_spec = "ssd512_coco"  # 7 maps for a 6-map network
    with pytest.raises(ConfigError, match="config.model: prior_spec has 7 feature maps"):
        config_lib.validate(config)
    config.model.prior_spec = "ssd300"
    with pytest.raises(ConfigError, match="unknown prior spec 'ssd300'"):
        config_lib.validate(config)
