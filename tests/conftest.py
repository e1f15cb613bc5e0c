"""Shared test fixtures: random ground truth in the padded batch layout (boxes [B,M,4] normalized
corners, labels [B,M] with 0 = padding), and dataset configs built from the one schema."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

import numpy as np
import pytest

# Tests run on the CPU with one device unless a test spawns its own subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests compile far more than they run: without XLA's backend (LLVM) optimizations a program
# compiles several times faster (convolutions and matmuls still run in oneDNN/Eigen). Inherited
# by the subprocesses tests start; a test that sets XLA_FLAGS itself replaces it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()

# One persistent XLA compilation cache for the session: both xdist workers and every subprocess a
# test starts (they inherit the environment) reuse a program another test compiled (the tiny
# config's train and eval steps are compiled by dozens of tests and command-line runs). A cache
# hit is the same executable, so results are unchanged; removed when the session ends.
# The controller process sets it before it starts the workers, which inherit it.
_CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # else the user's own: kept
if _CACHE_OWNER:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"ssd_jax_tests_xla_cache_{os.getpid()}")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


def pytest_sessionfinish(session, exitstatus):
    if _CACHE_OWNER:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

try:  # torch and torchvision (which loads triton) must load before TensorFlow in one process:
    # the other order segfaults (a test module that imports TF ahead of a torchvision one did)
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:
    pass


def dataset_config(**fields):
    """config.dataset of experiments/configs/default.py (every field of every kind declared)
    with `fields` changed: the only way a dataset config is built in the tests."""
    from experiments.configs import default

    cfg = default.get_config().dataset
    for name, value in fields.items():
        if name not in cfg:
            raise KeyError(f"config.dataset has no field {name!r}")
        cfg[name] = value
    return cfg


def random_boxes(rng: np.random.Generator, n: int, min_size: float = 0.03,
                 max_size: float = 0.6) -> np.ndarray:
    """n random normalized corner boxes, float32 [n, 4], inside the unit square."""
    wh = rng.uniform(min_size, max_size, size=(n, 2))
    lo = rng.uniform(0.0, 1.0, size=(n, 2)) * (1.0 - wh)
    return np.concatenate([lo, lo + wh], axis=1).astype(np.float32)


def random_gt_batch(rng: np.random.Generator, counts: list[int], max_boxes: int,
                    num_classes: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """Padded ground truth: boxes float32 [B, M, 4], labels int32 [B, M] (0 = padding)."""
    boxes = np.zeros((len(counts), max_boxes, 4), np.float32)
    labels = np.zeros((len(counts), max_boxes), np.int32)
    for i, n in enumerate(counts):
        boxes[i, :n] = random_boxes(rng, n)
        labels[i, :n] = rng.integers(1, num_classes, size=n)
    return boxes, labels


@pytest.fixture
def tfds_mock(monkeypatch):
    """tfds.testing.mock_data (5 examples per split) with consistent sequence lengths (tfds' random
    generator draws a different length per field of a Sequence) and boxes with min <= max
    (required to encode them); a third of the boxes are degenerate (zero width)."""
    yield from mock_tfds(monkeypatch, num_examples=5)


def mock_tfds(monkeypatch, num_examples: int):
    """The body of the `tfds_mock` fixture with `num_examples` per split (a generator)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import features as tfds_features
    from tensorflow_datasets.testing import mocking

    gen = mocking.RandomFakeGenerator
    monkeypatch.setattr(gen, "__init__",
                        functools.partialmethod(gen.__init__, constant_dynamic_shape=True))
    orig = gen._generate_random_obj

    def random_obj(self, feature, tensor_info, rng):
        x = orig(self, feature, tensor_info, rng)
        if isinstance(feature, tfds_features.BBoxFeature):
            x = x.reshape(-1, 4)
            x = np.concatenate([np.minimum(x[:, :2], x[:, 2:]), np.maximum(x[:, :2], x[:, 2:])], 1)
            x[::3, 3] = x[::3, 1]
        return x

    monkeypatch.setattr(gen, "_generate_random_obj", random_obj)
    with tfds.testing.mock_data(num_examples=num_examples):
        yield


def randomize_batchnorm(model, seed: int):
    """`model` (torch) in eval mode with every BatchNorm2d's running statistics and affine
    parameters random (at init BN is the identity, which would hide a swapped mean/var or
    scale/bias in a conversion)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model.eval()


#: a 3-class dataset named with COCO names, and their indices in torchvision's 91-slot layout
FINETUNE_CLASSES = ("person", "car", "dog")
FINETUNE_COCO_INDICES = (0, 1, 3, 18)  # background, person, car, dog


def finetuned_from_torchvision(tv_model, tmp_path, model_fields: dict, images: np.ndarray):
    """issue 35, item 4: `tv_model`'s state dict saved as a .pth, converted by
    `experiments.convert_torchvision` (which writes COCO's class names), loaded by the trainer's
    `create_train_state` as config.init_checkpoint of a model for FINETUNE_CLASSES; returns that
    model's (class logits, box outputs) on `images` (uint8 NHWC) at step 0."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import torch

    from experiments import convert_torchvision
    from ssd_jax import config as config_lib
    from ssd_jax import models, train

    pth = tmp_path / "detector.pth"
    torch.save(tv_model.state_dict(), pth)
    ckpt = convert_torchvision.main([f"--input={pth}", f"--output={tmp_path / 'converted'}"])
    config = config_lib.get_config()
    config.model = ml_collections.ConfigDict(model_fields)
    config.init_checkpoint = ckpt
    model = models.from_config(config, len(FINETUNE_CLASSES) + 1)
    state = train.create_train_state(config, model, train.create_optimizer(config),
                                     FINETUNE_CLASSES)
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return jax.jit(model.apply)(variables, jnp.asarray(images))
