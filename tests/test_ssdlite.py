"""SSDLite320-MobileNetV3-Large against torchvision's ssdlite320_mobilenet_v3_large: head outputs
of converted seeded weights, priors, detections end to end (the predict path), the converter's
errors and recognition of the state dict."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ssd_jax import box_ops, convert, inference, models
from ssd_jax.priors import SSDLITE320, generate_priors
from tests.conftest import (
    FINETUNE_CLASSES,
    FINETUNE_COCO_INDICES,
    finetuned_from_torchvision,
    randomize_batchnorm,
)

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
detection = pytest.importorskip("torchvision.models.detection")


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def smooth_images(rng: np.random.Generator, n: int) -> torch.Tensor:
    """Random low-frequency RGB images [n,3,320,320] in [0, 1] on the uint8 grid (bicubic 32x
    upsampling of 10x10 noise): feature maps that vary over the image, unlike iid noise."""
    low = torch.from_numpy(rng.uniform(0, 255, (n, 3, 10, 10)).astype(np.float32))
    up = torch.nn.functional.interpolate(low, size=(320, 320), mode="bicubic",
                                         align_corners=False)
    return up.clamp(0, 255).round() / 255.0


@pytest.fixture(scope="module")
def tv_lite():
    """A seeded ssdlite320_mobilenet_v3_large (91 classes) in eval mode whose BatchNorm layers
    have random scales and biases and the statistics of a batch of images (at init they are the
    identity, which would hide a wrong mapping of mean, var, scale or bias, and the N(0, 0.03)
    weights leave maps nearly constant over the image)."""
    torch.manual_seed(0)
    model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                   num_classes=91)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0  # running statistics := the next batch's
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        model.train()
        x = (smooth_images(np.random.default_rng(5), 4) - 0.5) / 0.5
        model.head(list(model.backbone(x).values()))
    return model.eval()


@pytest.fixture(scope="module")
def converted(tv_lite):
    return convert.from_torchvision_ssdlite(tv_lite.state_dict())


def test_model_matches_torchvision_structure():
    model = models.ssdlite320_mobilenet_v3(91)
    variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    ref = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                 num_classes=91)
    assert n == sum(p.numel() for p in ref.parameters())  # 3,440,060
    stats = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["batch_stats"]))
    assert stats == sum(b.numel() for name, b in ref.named_buffers() if "running_" in name)
    assert models.source_map_sizes(model.backbone, 320) == (20, 10, 5, 3, 2, 1)
    assert model.num_priors == 3234
    assert model.image_mean == model.image_std == (127.5,) * 3  # [0, 255] -> [-1, 1]


def test_head_outputs_match_torchvision(tv_lite, converted):
    model, variables = converted
    assert model.num_classes == 91 and model.prior_spec == SSDLITE320
    x = smooth_images(np.random.default_rng(0), 2)
    images = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    x = torch.stack([tv_lite.transform.normalize(im) for im in x])
    with torch.no_grad():
        features = list(tv_lite.backbone(x).values())
        head = tv_lite.head(features)
    cls_logits, box_preds = jax.jit(model.apply)(variables, jnp.asarray(images))
    assert cls_logits.shape == tuple(head["cls_logits"].shape) == (2, 3234, 91)
    assert _rel_err(cls_logits, head["cls_logits"].numpy()) <= 1e-4
    assert _rel_err(box_preds, head["bbox_regression"].numpy()) <= 1e-4

    # the priors are torchvision's anchors (pixel corners at 320 px) in the same order
    image_list = detection.image_list.ImageList(x, [(320, 320)] * 2)
    anchors = tv_lite.anchor_generator(image_list, features)[0].numpy() / 320.0
    ours = np.asarray(box_ops.centers_to_corners(generate_priors(SSDLITE320)))
    np.testing.assert_allclose(ours, anchors, rtol=0, atol=1e-6)


def test_finetuned_to_three_coco_classes_equals_torchvision_at_step_0(tv_lite, tmp_path):
    """A converted COCO ssdlite320 as config.init_checkpoint of a person/car/dog model: its
    logits of background and those classes are torchvision's at their COCO indices, its boxes
    torchvision's (issue 35, item 4)."""
    x = smooth_images(np.random.default_rng(2), 1)
    images = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        head = tv_lite.head(list(tv_lite.backbone(
            torch.stack([tv_lite.transform.normalize(im) for im in x])).values()))
    cls, box = finetuned_from_torchvision(
        tv_lite, tmp_path, {"name": "ssdlite320_mobilenet_v3", "reduced_tail": True}, images)
    assert cls.shape == (1, 3234, len(FINETUNE_CLASSES) + 1)
    ref = head["cls_logits"].numpy()[..., list(FINETUNE_COCO_INDICES)]
    assert _rel_err(cls, ref) <= 1e-4
    assert _rel_err(box, head["bbox_regression"].numpy()) <= 1e-4


def test_the_finetune_config_takes_a_converted_coco_ssdlite(converted, tmp_path):
    """experiments/configs/finetune_ssdlite320.py with torchvision's COCO layout converted (COCO's
    class names saved with it) fits a dataset of person, dog and forklift: checked on shapes, as
    the trainer does before it writes anything, with the classes mapped, new and dropped."""
    from experiments.configs import finetune_ssdlite320
    from ssd_jax import config as config_lib
    from ssd_jax import train
    from ssd_jax.coco import COCO_CATEGORIES_91

    model, variables = converted
    convert.save_checkpoint(str(tmp_path / "ckpt"), variables, model="ssdlite320_mobilenet_v3",
                            class_names=COCO_CATEGORIES_91[1:])
    config = finetune_ssdlite320.get_config()
    config.init_checkpoint = str(tmp_path / "ckpt")
    config.init_class_map = "cell phone:phone"
    config_lib.validate(config, check_data=False, num_devices=1, num_processes=1)
    target = ("Person", "dog", "forklift", "phone")
    init = train.state.load_init(config, models.from_config(config, len(target) + 1), target)
    assert init.plan.mapping == [0, 1, 18, None, 77]
    assert init.plan.report["new"] == ["forklift"] and len(init.plan.report["dropped"]) == 77


def test_imagenet_mobilenet_v3_backbone_gives_torchvisions_features(tmp_path):
    """`convert_torchvision --kind=mobilenet_v3`: torchvision's mobilenet_v3_large (seeded, with
    random BatchNorm statistics and affine parameters), converted and used as
    config.init_checkpoint of ssdlite320_mobilenet_v3 with reduced_tail=False, gives
    torchvision's C4 expansion (SSDLite's first source map, 672 channels) and last conv (960)."""
    import ml_collections

    from experiments import convert_torchvision
    from ssd_jax import config as config_lib
    from ssd_jax import train
    from ssd_jax.backbones.mobilenet_v3 import MobileNetV3Large

    torch.manual_seed(0)
    tv = randomize_batchnorm(torchvision.models.mobilenet_v3_large(weights=None), seed=1)
    torch.save(tv.state_dict(), tmp_path / "mbv3.pth")
    ckpt = convert_torchvision.main(["--kind=mobilenet_v3", f"--input={tmp_path / 'mbv3.pth'}",
                                     f"--output={tmp_path / 'backbone'}"])
    config = config_lib.get_config()
    config.model = ml_collections.ConfigDict({"name": "ssdlite320_mobilenet_v3",
                                              "reduced_tail": False})
    config.init_checkpoint = ckpt
    model = models.from_config(config, 4)
    state = train.create_train_state(config, model, train.create_optimizer(config), ("a", "b", "c"))

    x = (smooth_images(np.random.default_rng(4), 1) - 0.5) / 0.5  # the model's [-1, 1] input
    with torch.no_grad():
        h = x
        for block in tv.features[:13]:
            h = block(h)
        ref = [tv.features[13].block[0](h), tv.features(x)]
    ours = jax.jit(lambda v, x: MobileNetV3Large(reduced_tail=False).apply(v, x, False))(
        {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]},
        jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    for got, want in zip(ours, ref, strict=True):
        want = want.permute(0, 2, 3, 1).numpy()
        assert got.shape == want.shape
        assert _rel_err(got, want) <= 1e-4


def test_detections_end_to_end_match_torchvision(tv_lite, tmp_path):
    """The predict path on the converted .pth == torchvision's model.eval()(images)."""
    sd = {k: v.clone() for k, v in tv_lite.state_dict().items()}
    # trained-like outputs: background dominates, ~130 priors score above torchvision's 0.001
    for k in range(6):
        sd[f"head.classification_head.module_list.{k}.1.weight"].mul_(5.0)
        sd[f"head.classification_head.module_list.{k}.1.bias"].view(-1, 91)[:, 0] += 20.0
    pth = tmp_path / "ssdlite.pth"
    torch.save(sd, pth)
    ref_model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                       num_classes=91)
    ref_model.load_state_dict(sd)
    ref_model.eval()

    x = smooth_images(np.random.default_rng(7), 1)[0]
    Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()).save(
        tmp_path / "000000000007.png")
    with torch.no_grad():
        ref = ref_model([x])[0]
    ref_boxes, ref_scores, ref_labels = (ref[k].numpy() for k in ("boxes", "scores", "labels"))
    assert 50 < len(ref_scores) < 300 and len(np.unique(ref_labels)) > 20

    predictor = inference.load_predictor(torchvision_checkpoint=str(pth))
    assert predictor.detect_kwargs == {"score_threshold": 0.001, "pre_nms_top_k": 300,
                                       "iou_threshold": 0.55, "max_detections": 300}
    assert predictor.image_size == 320 and predictor.class_names[0] == "person"
    res = inference.predict_files(predictor, [str(tmp_path / "000000000007.png")],
                                  str(tmp_path / "out"), batch_size=1, progress=False)
    assert not res.skipped and all(r["image_id"] == 7 for r in res.results)
    scores = np.array([r["score"] for r in res.results])
    assert len(scores) == len(ref_scores) and np.all(np.diff(scores) <= 0)
    classes = np.array([r["category_id"] for r in res.results])
    xywh = np.array([r["bbox"] for r in res.results])
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    # one-to-one: each of torchvision's detections is one of ours with the same class, its score
    # within 1e-4 and its box within 0.01 px (scores ~1e-7 apart may come in either order)
    unused = np.ones(len(scores), bool)
    for label, score, box in zip(ref_labels, ref_scores, ref_boxes, strict=True):
        hit = unused & (classes == label) & (np.abs(scores - score) <= 1e-4) & \
            (np.abs(boxes - box).max(axis=1) <= 0.01)
        assert hit.any(), (label, score, box)
        unused[np.flatnonzero(hit)[0]] = False
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-4)


def test_bad_ssdlite_state_dict_names_the_key(tv_lite):
    sd = dict(tv_lite.state_dict())
    missing = dict(sd)
    del missing["backbone.features.1.0.2.fc1.weight"]  # the split C4 block's squeeze-excitation
    with pytest.raises(convert.StateDictError, match=r"backbone\.features\.1\.0\.2\.fc1\.weight"):
        convert.from_torchvision_ssdlite(missing)
    bad = dict(sd)
    bad["backbone.extra.2.1.1.running_var"] = torch.ones(7)
    with pytest.raises(convert.StateDictError, match=r"backbone\.extra\.2\.1\.1\.running_var.*"
                       r"\(7,\).*\(128,\)"):
        convert.from_torchvision_ssdlite(bad)
    with pytest.raises(convert.StateDictError,
                       match=r"its keys \(fc\.weight, \.\.\.\) are neither ssd300_vgg16's"):
        convert.from_torchvision_detector({"fc.weight": np.zeros((2, 2), np.float32)})


def test_detector_recognized_from_keys(tv_lite):
    assert convert.torchvision_detector_name(tv_lite.state_dict()) == "ssdlite320_mobilenet_v3"
    ssd300 = detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=3)
    assert convert.torchvision_detector_name(ssd300.state_dict()) == "ssd300_vgg16"
    name, model, variables = convert.from_torchvision_detector(ssd300.state_dict())
    assert name == "ssd300_vgg16" and model.num_classes == 3


def test_convert_cli_recognizes_ssdlite(tv_lite, tmp_path):
    from experiments import convert_torchvision
    from ssd_jax.errors import UserError

    pth = tmp_path / "ssdlite.pth"
    torch.save(tv_lite.state_dict(), pth)
    out = convert_torchvision.main(["--input", str(pth), "--output", str(tmp_path / "out")])
    loaded = convert.load_checkpoint(out)
    _, expected = convert.from_torchvision_ssdlite(tv_lite.state_dict())
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    np.testing.assert_array_equal(loaded["batch_stats"]["extras"]["extra3_depthwise"]["bn"]["var"],
                                  expected["batch_stats"]["extras"]["extra3_depthwise"]["bn"]["var"])
    with pytest.raises(UserError, match=r"is a torchvision ssdlite320_mobilenet_v3 state dict, "
                       r"not --kind=ssd300; use --kind=ssdlite320"):
        convert_torchvision.main(["--kind=ssd300", f"--input={pth}",
                                  f"--output={tmp_path / 'other'}"])
    assert not (tmp_path / "other").exists()


def test_synchronized_batch_norm_equals_one_batch(converted):
    """Backbone and heads with BatchNorm averaging train-mode statistics over "data": two shards
    of one image each give the outputs and statistics of one batch of two (the data-parallel
    train step maps the model this way; tests/test_train.py runs 8 devices against 1 for the
    compact BatchNorm model through the whole step).

    Measured through the whole step (matching, loss, backward, SGD) for SSDLite: the batch
    statistics of 8 devices and 1 agree to 1e-5, the updates of the smallest leaves differ by
    up to 1.6% in float32 and 1.9e-4 with float64 compute: summation order amplified by
    BatchNorm's backward, (g - mean(g) - x_hat mean(g x_hat)) / sigma, which cancels."""
    model, variables = converted
    synced = model.with_bn_axis_name("data")
    assert synced.backbone.axis_name == synced.head.axis_name == "data"
    assert model.backbone.axis_name is None and model.head.axis_name is None
    images = jnp.asarray((smooth_images(np.random.default_rng(3), 2) * 255).round().byte()
                         .permute(0, 2, 3, 1).numpy())

    def train_apply(m, x):
        return m.apply(variables, x, train=True, mutable=["batch_stats"])

    (cls_g, box_g), stats_g = jax.jit(lambda x: train_apply(model, x))(images)
    (cls_s, box_s), stats_s = jax.jit(jax.vmap(lambda x: train_apply(synced, x),
                                               axis_name="data"))(images[:, None])
    np.testing.assert_allclose(cls_s[:, 0], cls_g, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(box_s[:, 0], box_g, rtol=1e-4, atol=1e-4)
    leaves_g = jax.tree.leaves(stats_g)
    assert len(leaves_g) == 2 * 70  # mean and var of all 70 BatchNorms, the 12 of the heads included
    for g, s in zip(leaves_g, jax.tree.leaves(stats_s), strict=True):
        np.testing.assert_allclose(s[0], g, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s[1], g, rtol=1e-4, atol=1e-5)
    # and unsynchronized, each shard's statistics are its own image's: not the batch's
    (_, _), stats_local = jax.jit(jax.vmap(lambda x: train_apply(model, x)))(images[:, None])
    assert any(not np.allclose(s[0], g, rtol=1e-3, atol=1e-3)
               for g, s in zip(leaves_g, jax.tree.leaves(stats_local), strict=True))
