"""ssd300_resnet50 (NVIDIA DeepLearningExamples' SSD300-ResNet50 layout): the converted
torchvision ResNet-50 gives torchvision's stride-8 layer3 map, the model's shapes, the
converted backbone merging into fresh variables, errors on bad state dicts, the CLI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import convert, models
from ssd_jax.backbones import ResNet50SSDBackbone
from tests.conftest import randomize_batchnorm

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tv_resnet():
    """A seeded torchvision resnet50 in eval mode whose BatchNorm layers have random running
    statistics and affine parameters (so BN is not the identity and a swapped mean/var or
    scale/bias would show)."""
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet50(weights=None), seed=1)


@pytest.fixture(scope="module")
def model():
    return models.ssd300_resnet50(81)


@pytest.fixture(scope="module")
def shapes(model):
    return jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))


def test_layer3_map_matches_torchvision(tv_resnet):
    variables = convert.resnet50_backbone_from_torchvision(tv_resnet.state_dict())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, 300, 300, 3)).astype(np.float32)
    mean, std = np.asarray(models.IMAGENET_MEAN), np.asarray(models.IMAGENET_STD)
    x = ((images - mean) / std).astype(np.float32)

    m = tv_resnet
    layer3 = m.layer3[0]
    layer3.conv2.stride, layer3.downsample[0].stride = (1, 1), (1, 1)  # NVIDIA's stride 8
    try:
        ref_net = torch.nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2,
                                      m.layer3)
        with torch.no_grad():
            ref = ref_net(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    finally:
        layer3.conv2.stride, layer3.downsample[0].stride = (2, 2), (2, 2)
    assert ref.shape == (1, 38, 38, 1024)

    # The backbone alone, with the converted "backbone" variables and freshly initialized extras.
    backbone = ResNet50SSDBackbone()
    init = jax.eval_shape(lambda: backbone.init(jax.random.key(0), jnp.zeros((1, 300, 300, 3))))
    fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init)
    fresh["batch_stats"] = jax.tree.map(jnp.ones_like, fresh["batch_stats"])  # valid variances
    merged = convert.merge_params(dict(fresh), variables)
    maps = jax.jit(lambda v, x: backbone.apply(v, x))(merged, jnp.asarray(x))
    assert maps[0].shape == ref.shape
    err = _rel_err(maps[0], ref)
    print(f"max relative error of the 38x38x1024 map: {err:.2e}")
    assert err <= 1e-4


def test_model_shapes(model, shapes):
    assert model.num_priors == 8732
    assert model.image_mean == models.IMAGENET_MEAN and model.image_std == models.IMAGENET_STD
    assert tuple(model.prior_spec.boxes_per_location) == (4, 6, 6, 6, 4, 4)
    x = jax.ShapeDtypeStruct((2, 300, 300, 3), jnp.float32)
    cls, box = jax.eval_shape(model.apply, shapes, x)
    assert cls.shape == (2, 8732, 81) and box.shape == (2, 8732, 4)
    maps = jax.eval_shape(lambda v, x: ResNet50SSDBackbone().apply(v, x),
                          {k: {"backbone": v["backbone"], "extras": v["extras"]}
                           for k, v in shapes.items()}, x)
    assert [m.shape[1:] for m in maps] == [
        (38, 38, 1024), (19, 19, 512), (10, 10, 512), (5, 5, 256), (3, 3, 256), (1, 1, 256)]
    assert models.build_model("ssd300_resnet50", 81, freeze_bn=True).freeze_bn


def test_params_count_is_nvidias(shapes):
    # NVIDIA's SSD300 (ssd/model.py: torchvision resnet50 children[:7], BN extras, 3x3 heads
    # with bias) at 81 classes, counted with torch: 22,894,902 parameters (BN scale/bias
    # included, running statistics not).
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
    assert n == 22_894_902


def test_converted_backbone_merges_into_fresh_variables(tv_resnet, shapes):
    converted = convert.resnet50_backbone_from_torchvision(tv_resnet.state_dict())
    assert set(converted) == {"params", "batch_stats"}
    for collection in ("params", "batch_stats"):
        got = jax.tree.map(np.shape, converted[collection]["backbone"])
        want = jax.tree.map(lambda s: s.shape, shapes[collection]["backbone"])
        assert got == want, collection
    merged = jax.eval_shape(lambda s: convert.merge_params(s, converted), shapes)
    assert jax.tree.structure(merged) == jax.tree.structure(shapes)
    # The stem and a stride-1 layer3 downsample land where the model expects them.
    sd = tv_resnet.state_dict()
    np.testing.assert_array_equal(converted["params"]["backbone"]["stem"]["conv"]["kernel"],
                                  sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        converted["batch_stats"]["backbone"]["layer3_0"]["downsample"]["bn"]["var"],
        sd["layer3.0.downsample.1.running_var"].numpy())


def test_bad_resnet50_state_dict_names_the_key(tv_resnet):
    sd = dict(tv_resnet.state_dict())
    missing = dict(sd)
    del missing["layer2.3.bn2.running_var"]
    with pytest.raises(convert.StateDictError, match=r"layer2\.3\.bn2\.running_var"):
        convert.resnet50_backbone_from_torchvision(missing)
    bad = dict(sd)
    bad["layer3.0.downsample.0.weight"] = torch.zeros(1024, 512, 3, 3)
    with pytest.raises(convert.StateDictError,
                       match=r"layer3\.0\.downsample\.0\.weight.*\(1024, 512, 3, 3\)"):
        convert.resnet50_backbone_from_torchvision(bad)
    # layer4 and fc are not needed.
    trimmed = {k: v for k, v in sd.items() if not k.startswith(("layer4", "fc"))}
    convert.resnet50_backbone_from_torchvision(trimmed)


def test_convert_cli_resnet50(tv_resnet, tmp_path):
    from experiments import convert_torchvision

    pth = tmp_path / "resnet50.pth"
    torch.save(tv_resnet.state_dict(), pth)
    out = convert_torchvision.main(["--kind=resnet50", f"--input={pth}",
                                    f"--output={tmp_path / 'out'}"])
    loaded = convert.load_checkpoint(out)
    expected = convert.resnet50_backbone_from_torchvision(tv_resnet.state_dict())
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    np.testing.assert_array_equal(loaded["params"]["backbone"]["layer2_1"]["conv2"]["conv"]["kernel"],
                                  expected["params"]["backbone"]["layer2_1"]["conv2"]["conv"]["kernel"])
    np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["stem"]["bn"]["mean"],
                                  expected["batch_stats"]["backbone"]["stem"]["bn"]["mean"])


def test_init_checkpoint_sets_params_and_batch_stats(tv_resnet, model, tmp_path):
    # config.init_checkpoint = the converted backbone: create_train_state merges both collections.
    import ml_collections
    import optax

    from ssd_jax import train

    converted = convert.resnet50_backbone_from_torchvision(tv_resnet.state_dict())
    convert.save_checkpoint(str(tmp_path / "ckpt"), converted)
    config = ml_collections.ConfigDict({"seed": 0, "init_checkpoint": str(tmp_path / "ckpt")})
    state = train.create_train_state(config, model, optax.sgd(0.1))
    for collection in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state, collection)["backbone"],
                     converted[collection]["backbone"])
    assert set(state.batch_stats) == {"backbone", "extras"}
    assert np.all(np.asarray(state.batch_stats["extras"]["extra0_conv"]["bn"]["var"]) == 1.0)
