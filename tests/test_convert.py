"""ssd_jax.convert: parity with torchvision (SSD300 outputs, VGG16 activations), the reduced fc
rule, errors on bad state dicts, checkpoints and merge_params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import box_ops, convert, models
from ssd_jax.backbones import vgg16
from ssd_jax.priors import SSD300_TORCHVISION, generate_priors
from tests.conftest import FINETUNE_CLASSES, FINETUNE_COCO_INDICES, finetuned_from_torchvision

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tv_ssd():
    torch.manual_seed(0)
    model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None)
    return model.eval()


def test_finetuned_to_three_coco_classes_equals_torchvision_at_step_0(tv_ssd, tmp_path):
    """A converted COCO ssd300_vgg16 as config.init_checkpoint of a person/car/dog model: its
    logits of background and those classes are torchvision's at their COCO indices, its boxes
    torchvision's (issue 35, item 4)."""
    images = np.random.default_rng(3).integers(0, 256, (1, 300, 300, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        head = tv_ssd.head(list(tv_ssd.backbone(
            torch.stack([tv_ssd.transform.normalize(im) for im in x])).values()))
    cls, box = finetuned_from_torchvision(
        tv_ssd, tmp_path, {"name": "ssd300_vgg16", "prior_spec": "ssd300_torchvision",
                           "image_mean": models.TORCHVISION_MEAN}, images)
    assert cls.shape == (1, 8732, len(FINETUNE_CLASSES) + 1)
    ref = head["cls_logits"].numpy()[..., list(FINETUNE_COCO_INDICES)]
    assert _rel_err(cls, ref) <= 1e-4
    assert _rel_err(box, head["bbox_regression"].numpy()) <= 1e-4


@pytest.fixture(scope="module")
def tv_vgg():
    torch.manual_seed(1)
    return torchvision.models.vgg16(weights=None).eval()


def test_ssd300_parity_with_torchvision(tv_ssd):
    model, variables = convert.from_torchvision_ssd(tv_ssd.state_dict())
    assert model.num_classes == 91 and model.prior_spec == SSD300_TORCHVISION
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 300, 300, 3), dtype=np.uint8)

    # torchvision: [0,1] images normalized by GeneralizedRCNNTransform (already 300x300).
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = torch.stack([tv_ssd.transform.normalize(im) for im in x])
    with torch.no_grad():
        features = list(tv_ssd.backbone(x).values())
        head = tv_ssd.head(features)
    cls_logits, box_preds = jax.jit(model.apply)(variables, jnp.asarray(images))
    assert cls_logits.shape == tuple(head["cls_logits"].shape) == (2, 8732, 91)
    assert box_preds.shape == tuple(head["bbox_regression"].shape)
    assert _rel_err(cls_logits, head["cls_logits"].numpy()) <= 1e-4
    assert _rel_err(box_preds, head["bbox_regression"].numpy()) <= 1e-4

    # Same prior order: torchvision's anchors (pixel corners) vs ours.
    image_list = torchvision.models.detection.image_list.ImageList(x, [(300, 300)] * 2)
    anchors = tv_ssd.anchor_generator(image_list, features)[0].numpy()
    ours = np.asarray(box_ops.centers_to_corners(generate_priors(model.prior_spec))) * 300
    np.testing.assert_allclose(ours, anchors, atol=1e-3)


def test_bad_ssd_state_dict_names_the_key(tv_ssd):
    sd = dict(tv_ssd.state_dict())
    missing = dict(sd)
    del missing["backbone.extra.2.2.weight"]
    with pytest.raises(convert.StateDictError, match=r"backbone\.extra\.2\.2\.weight"):
        convert.from_torchvision_ssd(missing)
    bad = dict(sd)
    bad["head.regression_head.module_list.3.weight"] = torch.zeros(20, 256, 3, 3)
    with pytest.raises(convert.StateDictError,
                       match=r"head\.regression_head\.module_list\.3\.weight.*\(20, 256, 3, 3\)"):
        convert.from_torchvision_ssd(bad)
    bad_scale = dict(sd)
    bad_scale["backbone.scale_weight"] = torch.ones(256)
    with pytest.raises(convert.StateDictError, match="backbone.scale_weight"):
        convert.from_torchvision_ssd(bad_scale)


def test_vgg16_conv4_3_matches_torchvision(tv_vgg):
    variables = convert.vgg16_backbone_from_torchvision(tv_vgg.state_dict())
    # Our pool3 is in ceil mode (as torchvision's SSD extractor patches it): patch the reference.
    features = tv_vgg.features
    features[16].ceil_mode = True
    try:
        x = np.random.default_rng(0).normal(0, 50, (1, 44, 44, 3)).astype(np.float32)
        with torch.no_grad():
            ref = features[:23](torch.from_numpy(x).permute(0, 3, 1, 2))  # through relu4_3
    finally:
        features[16].ceil_mode = False
    ref = ref.permute(0, 2, 3, 1).numpy()
    assert ref.shape == (1, 6, 6, 512)  # 44 -> 22 -> 11 -> ceil 6 (floor would be 5)
    conv4_3, fc7 = vgg16.VGG16().apply(
        {"params": variables["params"]["backbone"]}, jnp.asarray(x))
    assert conv4_3.shape == ref.shape and fc7.shape == (1, 3, 3, 1024)
    assert _rel_err(conv4_3, ref) <= 1e-4


def test_vgg16_reduced_fc_rule(tv_vgg):
    sd = tv_vgg.state_dict()
    backbone = convert.vgg16_backbone_from_torchvision(sd)["params"]["backbone"]
    w6 = sd["classifier.0.weight"].numpy()  # [4096, 512*7*7], flat index c*49 + y*7 + x
    filters = np.arange(0, 4096, 4)
    taps = np.array([0, 3, 6])
    cols = (np.arange(512)[None, None, :] * 49 + taps[:, None, None] * 7 + taps[None, :, None])
    expected6 = w6[filters][:, cols]  # [1024, 3(y), 3(x), 512]
    np.testing.assert_array_equal(np.asarray(backbone["fc6"]["kernel"]),
                                  expected6.transpose(1, 2, 3, 0))
    assert backbone["fc6"]["kernel"][1, 2, 5, 7] == w6[28, 5 * 49 + 3 * 7 + 6]
    np.testing.assert_array_equal(np.asarray(backbone["fc6"]["bias"]),
                                  sd["classifier.0.bias"].numpy()[filters])
    w7 = sd["classifier.3.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(backbone["fc7"]["kernel"])[0, 0],
                                  w7[np.ix_(filters, filters)].T)
    np.testing.assert_array_equal(np.asarray(backbone["fc7"]["bias"]),
                                  sd["classifier.3.bias"].numpy()[filters])
    # The converted backbone fits SSD300's backbone exactly (names and shapes).
    _, shapes = jax.eval_shape(
        lambda: models.ssd300_vgg16(21).init_with_output(jax.random.key(0),
                                                         jnp.zeros((1, 300, 300, 3))))
    want = jax.tree.map(lambda a: a.shape, shapes["params"]["backbone"])
    assert jax.tree.map(lambda a: a.shape, backbone) == want


def test_bad_vgg_state_dict_names_the_key():
    convs = {"features.0": (64, 3), "features.2": (64, 64)}
    sd = {f"{k}.weight": np.zeros((o, i, 3, 3), np.float32) for k, (o, i) in convs.items()}
    sd.update({f"{k}.bias": np.zeros(o, np.float32) for k, (o, _) in convs.items()})
    with pytest.raises(convert.StateDictError, match=r"features\.5\.weight"):
        convert.vgg16_backbone_from_torchvision(sd)
    sd["features.2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    with pytest.raises(convert.StateDictError, match=r"features\.2\.weight.*\(64, 64, 1, 1\)"):
        convert.vgg16_backbone_from_torchvision(sd)


def test_checkpoint_roundtrip_and_merge(tmp_path):
    model = models.compact_ssd(6)  # as test_models' fixture: the jitted init is reused
    init_a = models.init_variables(model, jax.random.key(0))
    init_b = models.init_variables(model, jax.random.key(1))
    convert.save_checkpoint(str(tmp_path / "ckpt"), init_b)
    convert.save_checkpoint(str(tmp_path / "ckpt"), init_b)  # overwrite is fine
    loaded = convert.load_checkpoint(str(tmp_path / "ckpt"))
    jax.tree.map(np.testing.assert_array_equal, loaded, init_b)

    partial = {"params": {"backbone": loaded["params"]["backbone"]}}
    merged = convert.merge_params(init_a, partial)
    jax.tree.map(np.testing.assert_array_equal, merged["params"]["backbone"],
                 init_b["params"]["backbone"])
    jax.tree.map(np.testing.assert_array_equal, merged["params"]["cls_head_0"],
                 init_a["params"]["cls_head_0"])
    jax.tree.map(np.testing.assert_array_equal, merged["batch_stats"], init_a["batch_stats"])

    narrow = {"stage1_down": {"conv": {"kernel": np.zeros((3, 3, 3, 12), np.float32)}}}
    with pytest.raises(ValueError, match=r"/params/backbone/stage1_down/conv/kernel.*"
                                         r"\(3, 3, 3, 12\).*\(3, 3, 3, 24\)"):
        convert.merge_params(init_a, {"params": {"backbone": narrow}})
    with pytest.raises(ValueError, match="/params/nope"):
        convert.merge_params(init_a, {"params": {"nope": np.zeros(3)}})


def test_convert_cli_ssd300(tv_ssd, tmp_path):
    from experiments import convert_torchvision

    pth = tmp_path / "ssd300.pth"
    torch.save(tv_ssd.state_dict(), pth)
    out = convert_torchvision.main(["--kind", "ssd300", "--input", str(pth),
                                    "--output", str(tmp_path / "out")])
    loaded = convert.load_checkpoint(out)
    _, expected = convert.from_torchvision_ssd(tv_ssd.state_dict())
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    np.testing.assert_array_equal(loaded["params"]["box_head_5"]["kernel"],
                                  expected["params"]["box_head_5"]["kernel"])


def test_load_state_dict_safetensors(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {"w": rng.normal(size=(3, 4)).astype(np.float32),
               "h": rng.normal(size=(2, 5)).astype(np.float16),
               "steps": np.array([7], np.int64)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "np"})
    sd = convert.load_state_dict(path)  # os.PathLike is accepted
    assert sorted(sd) == ["h", "steps", "w"]
    for k, v in tensors.items():
        assert sd[k].dtype == np.float32 and sd[k].shape == v.shape
        np.testing.assert_array_equal(sd[k], v.astype(np.float32))


def test_load_state_dict_safetensors_bfloat16(tmp_path):
    from safetensors.torch import save_file

    b = torch.tensor([[1.5, -2.0, 3.140625], [0.0, -0.0078125, 256.0]], dtype=torch.bfloat16)
    w = torch.randn(4, 3)
    path = tmp_path / "bf16.safetensors"
    save_file({"b": b, "w": w}, str(path))
    sd = convert.load_state_dict(str(path))
    assert sd["b"].dtype == np.float32
    np.testing.assert_array_equal(sd["b"], b.float().numpy())
    np.testing.assert_array_equal(sd["w"], w.numpy())


def test_load_state_dict_torch_unwraps(tmp_path):
    w = torch.randn(2, 3)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"w": w, "n": torch.tensor(3)}, "epoch": 5}, path)
    sd = convert.load_state_dict(str(path))
    assert sorted(sd) == ["n", "w"]
    np.testing.assert_array_equal(sd["w"], w.numpy())
    torch.save([w], tmp_path / "list.pth")
    with pytest.raises(convert.StateDictError, match=r"list\.pth.*holds a list"):
        convert.load_state_dict(str(tmp_path / "list.pth"))


@pytest.mark.parametrize("text", ["this is not a torch file", "not a checkpoint\n", ""])
@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_load_state_dict_invalid_file(tmp_path, text, ext):
    path = tmp_path / f"weights{ext}"
    path.write_text(text)
    expected = "torch state dict" if ext == ".pth" else "safetensors file"
    with pytest.raises(convert.StateDictError, match=rf"weights\{ext}.*expected a .*{expected}") as e:
        convert.load_state_dict(str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        convert.load_state_dict(str(tmp_path / f"missing{ext}"))
