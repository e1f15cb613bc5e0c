"""ssd_jax.models: shapes, prior counts, dtypes, spec checks, init, and layers against torch."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import models
from ssd_jax.backbones import CompactSSDBackbone, VGG16SSDBackbone, vgg16
from ssd_jax.backbones.compact import CompactNet
from ssd_jax.priors import SSD300_TORCHVISION, SSD300_VOC, SSD512_VOC, generate_priors


def _out_shapes(model: models.SSD, batch: int = 2):
    size = model.prior_spec.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    (outs, variables) = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x), images)
    return outs, variables


@pytest.mark.parametrize(
    "factory, num_priors",
    [(lambda: models.ssd300_vgg16(21), 8732), (lambda: models.ssd512_vgg16(21), 24564),
     (lambda: models.ssd300_vgg16(91, SSD300_TORCHVISION), 8732)],
)
def test_vgg_ssd_shapes_and_prior_counts(factory, num_priors):
    model = factory()
    (cls_logits, box_preds), variables = _out_shapes(model)
    assert cls_logits.shape == (2, num_priors, model.num_classes)
    assert box_preds.shape == (2, num_priors, 4)
    assert cls_logits.dtype == box_preds.dtype == jnp.float32
    assert generate_priors(model.prior_spec).shape == (num_priors, 4)
    assert set(variables) == {"params"}  # VGG models have no batch_stats
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


def test_ssd300_param_count_matches_torchvision():
    # torchvision's ssd300_vgg16(num_classes=91) has 35,641,826 parameters (its docs table).
    _, variables = _out_shapes(models.ssd300_vgg16(91, SSD300_TORCHVISION), batch=1)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(variables)) == 35_641_826


@pytest.fixture(scope="module")
def compact():
    model = models.compact_ssd(6)
    variables = models.init_variables(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    return model, variables, jnp.asarray(images)


def test_compact_shapes_priors_and_batch_norm(compact):
    model, variables, images = compact
    assert model.prior_spec is models.COMPACT6_PRIORS
    assert model.prior_spec.image_size == model.image_size == 128
    num_priors = generate_priors(model.prior_spec).shape[0]
    cls_logits, box_preds = jax.jit(model.apply)(variables, images)
    assert cls_logits.shape == (2, num_priors, 6) and box_preds.shape == (2, num_priors, 4)
    assert cls_logits.dtype == jnp.float32
    assert np.all(np.isfinite(cls_logits)) and np.all(np.isfinite(box_preds))
    # train=True updates the batch statistics; eval uses the running averages.
    (train_out, _), updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)
    assert train_out.shape == cls_logits.shape
    old = jax.tree.leaves(variables["batch_stats"])
    new = jax.tree.leaves(updates["batch_stats"])
    assert len(old) == len(new) > 0
    assert any(not np.allclose(a, b) for a, b in zip(old, new, strict=True))


def test_compact_synced_batch_norm_equals_global_batch(compact):
    # Two shards of one image with BN stats averaged over "data" == one batch of two images.
    model, variables, images = compact
    synced = model.with_bn_axis_name("data")
    assert synced.backbone.axis_name == "data" and model.backbone.axis_name is None
    vgg = models.ssd300_vgg16(21)
    assert vgg.with_bn_axis_name("data") is vgg  # no BatchNorm

    def train_apply(m, x):
        return m.apply(variables, x, train=True, mutable=["batch_stats"])

    (cls_g, _), stats_g = jax.jit(lambda x: train_apply(model, x))(images)
    (cls_s, _), stats_s = jax.jit(jax.vmap(lambda x: train_apply(synced, x), axis_name="data"))(
        images[:, None])
    np.testing.assert_allclose(cls_s[:, 0], cls_g, rtol=1e-4, atol=1e-4)
    for g, s in zip(jax.tree.leaves(stats_g), jax.tree.leaves(stats_s), strict=True):
        np.testing.assert_allclose(s[0], g, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s[1], g, rtol=1e-4, atol=1e-5)


def test_compact_smallest_prior_covers_small_objects():
    spec = models.COMPACT6_PRIORS
    # objects down to ~5% of the image side need a prior near that size
    assert spec.min_sizes[0] / spec.image_size <= 0.07
    assert spec.max_sizes[-1] / spec.image_size >= 0.7


def test_compact6_priors_cover_the_synthetic_objects():
    # Best IoU of each synthetic object with any prior, in plain numpy (independent of box_ops).
    from ssd_jax.data import synthetic

    boxes = np.concatenate([synthetic.generate_example(0, "val", i, 128)["boxes"]
                            for i in range(120)]).astype(np.float64)
    side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    small = side < 0.08

    def best_iou(spec):
        p = generate_priors(spec).astype(np.float64)
        c = np.concatenate([p[:, :2] - p[:, 2:] / 2, p[:, :2] + p[:, 2:] / 2], axis=1)
        lt = np.maximum(boxes[:, None, :2], c[None, :, :2])
        rb = np.minimum(boxes[:, None, 2:], c[None, :, 2:])
        inter = np.prod(np.clip(rb - lt, 0.0, None), axis=-1)
        area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        return (inter / (area(boxes)[:, None] + area(c)[None] - inter)).max(1)

    assert small.sum() > 50
    five, six = best_iou(models.COMPACT_PRIORS), best_iou(models.COMPACT6_PRIORS)
    # The stride-4 map gives nearly every object, small ones included, a prior at IoU 0.4 ...
    assert np.mean(six >= 0.4) >= 0.97 and np.mean(six[small] >= 0.4) >= 0.97
    # ... where the 5-map priors leave about half of the small objects without one.
    assert np.mean(five[small] >= 0.4) < 0.7


def test_bfloat16_compute_gives_float32_outputs(compact):
    model, variables, images = compact
    bf16 = models.compact_ssd(6, dtype=jnp.bfloat16)
    cls16, box16 = jax.jit(bf16.apply)(variables, images)
    assert cls16.dtype == box16.dtype == jnp.float32
    assert np.all(np.isfinite(cls16)) and np.all(np.isfinite(box16))
    _, shapes16 = _out_shapes(bf16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes16))
    cls32, _ = jax.jit(model.apply)(variables, images)
    rel = np.abs(np.asarray(cls16) - np.asarray(cls32)).max() / np.abs(np.asarray(cls32)).max()
    assert rel < 0.1


def test_spec_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"CompactSSDBackbone network's source maps "
                                         r"\(75, 38, 19, 10, 5, 3\)"):
        models.compact_ssd(3, prior_spec=SSD300_VOC)
    wrong_size = dataclasses.replace(models.COMPACT_PRIORS, image_size=160)
    with pytest.raises(ValueError, match=r"\(16, 8, 4, 2, 1\).*\(20, 10, 5, 3, 2\)"):
        models.compact_ssd(3, prior_spec=wrong_size)
    with pytest.raises(ValueError, match="7 feature maps.*VGG16SSDBackbone network has 6 source maps"):
        models.ssd300_vgg16(21, prior_spec=SSD512_VOC)
    # An SSD built directly (not by a builder) is checked when it runs.
    direct = models.SSD(backbone=CompactSSDBackbone(num_maps=5), prior_spec=models.COMPACT6_PRIORS,
                        num_classes=3)
    with pytest.raises(ValueError, match="6 feature maps.*CompactSSDBackbone network has 5 source"):
        models.init_variables(direct, jax.random.key(0))
    direct = models.SSD(backbone=CompactSSDBackbone(num_maps=5), prior_spec=wrong_size, num_classes=3)
    with pytest.raises(ValueError, match=r"source map 0 is 20x20 but prior_spec.feature_map_sizes\[0\]"):
        jax.eval_shape(lambda: direct.init(jax.random.key(0), jnp.zeros((1, 160, 160, 3))))
    model = models.compact_ssd(3)
    with pytest.raises(ValueError, match="96x96 but prior_spec.image_size is 128"):
        model.init(jax.random.key(0), jnp.zeros((1, 96, 96, 3)))


def test_build_model():
    ssd300 = models.build_model("ssd300_vgg16", 21, jnp.float32)
    assert isinstance(ssd300.backbone, VGG16SSDBackbone) and not ssd300.backbone.highres
    ssd512 = models.build_model("ssd512_vgg16", 21, jnp.bfloat16)
    assert ssd512.dtype == ssd512.backbone.dtype == jnp.bfloat16 and ssd512.backbone.highres
    assert isinstance(models.build_model("compact", 6, jnp.float32).backbone, CompactSSDBackbone)
    with pytest.raises(ValueError, match="ssd300_vgg16, ssd512_vgg16, compact"):
        models.build_model("ssd300", 21, jnp.float32)
    wide = models.build_model("compact", 6, width_mult=1.5, num_maps=6, top_down=True)
    assert (wide.backbone.width_mult, wide.backbone.top_down, wide.backbone.num_maps,
            wide.prior_spec) == (1.5, True, 6, models.COMPACT6_PRIORS)
    with pytest.raises(ValueError, match="no option width_mult"):
        models.build_model("ssd300_vgg16", 21, width_mult=2.0)
    with pytest.raises(ValueError, match="num_maps must be 5 or 6"):
        models.build_model("compact", 6, num_maps=7)


def test_compact_depths_add_stride_1_convs_where_asked():
    deeper = models.compact_ssd(4, depths=(0, 2, 1, 1))
    variables = jax.eval_shape(lambda: models.init_variables(deeper, jax.random.key(0)))
    convs = sorted(k for k in variables["params"]["backbone"] if "_conv" in k)
    assert convs == ["stage2_conv", "stage2_conv2", "stage3_conv", "stage4_conv"]
    kernel = variables["params"]["backbone"]["stage2_conv2"]["conv"]["kernel"]
    assert kernel.shape == (3, 3, 48, 48)
    base = jax.eval_shape(lambda: models.init_variables(models.compact_ssd(4, depths=(0, 1, 1, 1)),
                                                         jax.random.key(0)))
    assert "stage2_conv2" not in base["params"]["backbone"]
    # the builder's default is the embedded default recipe's depth (config.model.depths)
    from ssd_jax import config as config_lib

    assert tuple(config_lib.get_config().model.depths) == (0, 3, 1, 1)
    default = jax.eval_shape(lambda: models.init_variables(models.compact_ssd(4), jax.random.key(0)))
    assert "stage2_conv3" in default["params"]["backbone"]
    for bad in [(0, 1, 1), (0, -1, 1, 1), (0, 1.5, 1, 1)]:
        with pytest.raises(ValueError, match="depths must be 4 whole numbers"):
            models.compact_ssd(4, depths=bad)


@pytest.mark.parametrize("num_maps,top_down", [(5, False), (5, True), (6, True)])
def test_compact_variants(num_maps, top_down):
    model = models.compact_ssd(4, num_maps=num_maps, top_down=top_down)
    spec = model.prior_spec
    assert len(spec.feature_map_sizes) == num_maps
    assert spec.feature_map_sizes[0] == 128 // (4 if num_maps == 6 else 8)
    variables = models.init_variables(model, jax.random.key(1))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), np.uint8))
    cls, box = jax.jit(model.apply)(variables, images)
    assert cls.shape == (2, spec.num_priors, 4) and box.shape == (2, spec.num_priors, 4)
    fused = sorted(k for k in variables["params"]["backbone"] if k.startswith("fuse"))
    assert fused == ([f"fuse{k}" for k in range(num_maps - 3)] if top_down else [])
    if top_down:
        # The largest map's predictions see the coarsest backbone stage through the fusion:
        # changing its last conv changes the outputs of the first map's priors.
        n0 = spec.feature_map_sizes[0] ** 2 * spec.boxes_per_location[0]
        params = jax.tree_util.tree_map(lambda x: x, variables["params"])
        last = f"stage{len(CompactNet.widths)}_conv"
        params["backbone"][last]["conv"]["kernel"] = 2.0 * params["backbone"][last]["conv"]["kernel"]
        cls2, _ = jax.jit(model.apply)({**variables, "params": params}, images)
        assert not np.allclose(cls2[:, :n0], cls[:, :n0], atol=1e-4)


def test_extras_and_heads_init_xavier_uniform_zero_bias():
    extras = vgg16.VGGExtras()
    params = extras.init(jax.random.key(0), jnp.zeros((1, 19, 19, 1024)))["params"]
    k = np.asarray(params["conv8_2"]["kernel"])  # [3,3,256,512]
    limit = math.sqrt(6.0 / (9 * 256 + 9 * 512))
    assert np.abs(k).max() <= limit and np.abs(k).max() > 0.95 * limit
    assert np.std(k) == pytest.approx(limit / math.sqrt(3), rel=0.02)
    assert all(np.all(np.asarray(p["bias"]) == 0) for p in params.values())


def test_compact_head_init(compact):
    _, variables, _ = compact
    head = variables["params"]["cls_head_0"]
    k = np.asarray(head["kernel"])
    limit = math.sqrt(6.0 / (9 * k.shape[2] + 9 * k.shape[3]))
    assert np.abs(k).max() <= limit
    assert np.all(np.asarray(head["bias"]) == 0)


# ---------------------------------------------------------------- layers against torch


def test_l2norm_matches_torchvision():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 5, 16)).astype(np.float32)
    x[0, 0, 0] = 0.0  # zero vector: eps path
    layer = vgg16.L2Norm()
    params = layer.init(jax.random.key(0), x)
    assert np.all(np.asarray(params["params"]["scale"]) == 20.0)
    ours = np.asarray(layer.apply(params, x))
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    ref = 20.0 * torch.nn.functional.normalize(t, dim=1)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [75, 38, 19, 6])
def test_max_pool_2x2_and_its_gradient_match_torch_ceil_mode(size):
    """VGG's pools (pool3 in ceil mode): values and the gradient, which goes to the first maximum
    of each window; small integers make ties in most windows (the case where a gradient that
    splits or picks another maximum would differ)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(size).integers(0, 3, size=(2, size, size, 4)).astype(np.float32)
    g = np.random.default_rng(1).normal(size=(2, -(-size // 2), -(-size // 2), 4)).astype(np.float32)
    ours, vjp = jax.vjp(vgg16.max_pool_2x2, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    t = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    ref = torch.nn.functional.max_pool2d(t, 2, 2, ceil_mode=True)
    ref.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    assert ours.shape == ref.permute(0, 2, 3, 1).shape
    np.testing.assert_array_equal(np.asarray(ours), ref.detach().permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np.asarray(dx), t.grad.permute(0, 2, 3, 1).numpy())
    if size % 2 == 0:  # and flax's reduce_window pool (XLA's select_and_scatter gradient)
        ref_y, ref_vjp = jax.vjp(lambda v: nn.max_pool(v, (2, 2), (2, 2)), jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(dx), np.asarray(ref_vjp(jnp.asarray(g))[0]))


def test_source_map_sizes_by_shape_evaluation():
    assert models.source_map_sizes(VGG16SSDBackbone(), 300) == SSD300_VOC.feature_map_sizes
    assert models.source_map_sizes(VGG16SSDBackbone(highres=True), 512) == SSD512_VOC.feature_map_sizes
    assert models.source_map_sizes(CompactSSDBackbone(num_maps=5), 128) == (16, 8, 4, 2, 1)
    assert models.source_map_sizes(CompactSSDBackbone(), 128) == (32, 16, 8, 4, 2, 1)
    assert models.source_map_sizes(VGG16SSDBackbone(), 44)[:2] == (6, 3)  # pool3 in ceil mode


def _load_param_paths_fixture():
    import importlib.util
    import json
    import pathlib

    data = pathlib.Path(__file__).with_name("data")
    spec = importlib.util.spec_from_file_location("make_param_paths", data / "make_param_paths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, json.loads((data / "param_paths.json").read_text())


@pytest.mark.parametrize("case", ["ssd300_vgg16", "ssd512_vgg16", "compact_6", "compact_5",
                                  "compact_6_top_down", "compact_5_top_down", "compact_6_half",
                                  "compact_5_top_down_half", "ssd300_resnet50"])
def test_variable_paths_and_shapes_are_pinned(case):
    # Checkpoints store the variables tree: its paths and shapes must not change with a refactor
    # (tests/data/param_paths.json was written by tests/data/make_param_paths.py).
    module, pinned = _load_param_paths_fixture()
    assert module.param_paths(case) == pinned[case]


def test_freeze_bn_keeps_running_statistics(compact):
    """config.model.freeze_bn: train=True normalizes with the running statistics and leaves them
    as they are (the outputs equal eval mode's), while BatchNorm's scale still gets gradients."""
    model, variables, images = compact
    frozen = models.build_model("compact", 6, freeze_bn=True)
    assert frozen.freeze_bn and not model.freeze_bn
    # non-trivial running statistics, so that "equals eval mode" is not equal by accident
    stats = jax.tree.map(lambda s: s + 0.1 * np.abs(np.random.default_rng(0).normal(size=s.shape)),
                         variables["batch_stats"])
    v = {"params": variables["params"], "batch_stats": stats}

    def loss(params, m):
        (cls, box), upd = m.apply({"params": params, "batch_stats": stats}, images, train=True,
                                  mutable=["batch_stats"])
        return jnp.sum(cls ** 2) + jnp.sum(box ** 2), (cls, upd)

    (_, (cls_f, upd_f)), grads = jax.jit(jax.value_and_grad(
        lambda p: loss(p, frozen), has_aux=True))(v["params"])
    cls_eval, _ = jax.jit(model.apply)(v, images)
    np.testing.assert_allclose(cls_f, cls_eval, rtol=1e-4, atol=1e-4)  # other fusions
    for a, b in zip(jax.tree.leaves(upd_f["batch_stats"]), jax.tree.leaves(stats), strict=True):
        np.testing.assert_array_equal(a, b)
    scale = grads["backbone"]["stage1_down"]["bn"]["scale"]
    assert float(np.abs(scale).max()) > 0
    # unfrozen, the same call uses batch statistics: different outputs, updated statistics
    (_, (cls_t, upd_t)), _ = jax.jit(jax.value_and_grad(
        lambda p: loss(p, model), has_aux=True))(v["params"])
    assert not np.allclose(cls_t, cls_eval, atol=1e-3)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(upd_t["batch_stats"]),
                                                     jax.tree.leaves(stats), strict=True))


def test_freeze_bn_from_the_config():
    from experiments.configs import default, ssdlite320_coco

    config = default.get_config()
    config.model.freeze_bn = True
    assert models.from_config(config, 5, axis_name="data").freeze_bn
    lite = ssdlite320_coco.get_config()
    lite.dtype = "float32"
    model = models.from_config(lite, 81, axis_name="data")
    assert not model.freeze_bn and model.backbone.axis_name == model.head.axis_name == "data"


@pytest.mark.parametrize("k, stride, dilation", [(3, 1, 1), (5, 2, 1), (3, 2, 2), (5, 1, 1)])
def test_depthwise_conv_equals_grouped_conv(k, stride, dilation):
    """layers.DepthwiseConv (shifted multiply-adds) == nn.Conv(feature_group_count=C): same
    params (layout and init), outputs and gradients, odd and even inputs, strides, dilation."""
    import flax.linen as nn

    from ssd_jax.backbones.layers import DepthwiseConv

    p = (k - 1) // 2 * dilation
    ours = DepthwiseConv(k, stride, dilation, p)
    ref = nn.Conv(6, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
                  kernel_dilation=(dilation, dilation), feature_group_count=6, use_bias=False,
                  kernel_init=ours.kernel_init)
    for size in (9, 10):
        x = jnp.asarray(np.random.default_rng(size).normal(size=(2, size, size, 6)), jnp.float32)
        v_ours = ours.init(jax.random.key(0), x)
        v_ref = ref.init(jax.random.key(0), x)
        np.testing.assert_array_equal(v_ours["params"]["kernel"], v_ref["params"]["kernel"])
        out = ours.apply(v_ours, x)
        np.testing.assert_allclose(out, ref.apply(v_ref, x), rtol=1e-5, atol=1e-5)
        g_ours = jax.grad(lambda v, x: jnp.sum(ours.apply(v, x) ** 2), argnums=(0, 1))(v_ours, x)
        g_ref = jax.grad(lambda v, x: jnp.sum(ref.apply(v, x) ** 2), argnums=(0, 1))(v_ref, x)
        for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
