"""ssd_jax.inference (and its commands experiments/predict.py, experiments/evaluate.py) on a tiny
trained run, and the end-to-end parity of our inference path (converted weights, Pillow input,
jitted model + detect, boxes at the original size) with torchvision's ssd300_vgg16 in eval mode."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ssd_jax import coco, evaluation, inference, run_eval
from ssd_jax.errors import CheckpointMismatchError, UserError

try:  # torch and torchvision must be loaded before TensorFlow (the other order can segfault)
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:
    pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
    """The training tests' tiny config (compact model, 128 px synthetic data), 4 steps."""
    from tests.test_train import tiny_config as train_tiny_config

    config = train_tiny_config()
    config.dataset.num_eval = 8
    config.num_train_steps = 4
    config.warmup_steps = 1
    config.checkpoint_every_steps = 0
    config.num_eval_images_to_draw = 0
    return config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """(workdir, final eval metrics) of a 4-step run of the tiny config."""
    from ssd_jax import train

    workdir = str(tmp_path_factory.mktemp("run"))
    _, metrics = train.train_and_evaluate(tiny_config(), workdir)
    return workdir, metrics


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Real JPEG/PNG files of several sizes and layouts, a broken .jpg and a non-image file."""
    from ssd_jax.data import synthetic

    d = tmp_path_factory.mktemp("images")
    sizes = [(160, 120), (96, 200), (128, 128)]
    for i, (w, h) in enumerate(sizes):
        ex = synthetic.generate_example(0, "val", i, image_size=160)
        img = Image.fromarray(ex["image"]).resize((w, h), Image.BILINEAR)
        img.save(d / f"img{i}.jpg" if i != 1 else d / f"img{i}.png", quality=90)
    ex = synthetic.generate_example(0, "val", 3, image_size=100)
    Image.fromarray(ex["image"]).convert("L").save(d / "gray.png")  # grayscale
    Image.fromarray(ex["image"]).convert("RGBA").save(d / "rgba.png")  # with alpha
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 10)
    (d / "notes.txt").write_text("not an image")
    return str(d)


def _run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` in a subprocess that prints, at exit, whether TF was imported."""
    script = ("import atexit, runpy, sys\n"
              "atexit.register(lambda: print('TF_IMPORTED', 'tensorflow' in sys.modules))\n"
              f"sys.argv = [{module!r}, *sys.argv[1:]]\n"
              f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- predict


def test_predict_cli_on_a_folder_skips_the_broken_file(trained_run, image_dir, tmp_path):
    workdir, _ = trained_run
    out = tmp_path / "pred"
    extra = os.path.join(image_dir, "img0.jpg")  # also named explicitly: a duplicate stem
    proc = _run_cli("experiments.predict", f"--workdir={workdir}", f"--images={image_dir},{extra}",
                    f"--out={out}", "--batch_size=4", "--min_score=0.0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "broken.jpg" in proc.stdout and "skipped 1 unreadable" in proc.stdout
    assert "TF_IMPORTED False" in proc.stdout  # predict never imports TensorFlow
    names = sorted(os.listdir(out))
    expected_pngs = {"img0.png", "img0_2.png", "img1.png", "img2.png", "gray.png", "rgba.png"}
    assert expected_pngs <= set(names), names
    for name in expected_pngs:
        src = {"img0_2.png": "img0.jpg"}.get(name)
        src = src or next(f for f in os.listdir(image_dir) if f.startswith(name[:-4] + "."))
        with Image.open(out / name) as drawn, Image.open(os.path.join(image_dir, src)) as orig:
            assert drawn.size == orig.size and drawn.mode == "RGB"
    skipped = json.loads((out / "skipped.json").read_text())
    assert [os.path.basename(s["file"]) for s in skipped] == ["broken.jpg"]

    results = json.loads((out / "detections.json").read_text())
    assert results, "an untrained-ish model still yields low-score detections"
    sizes = {}
    for f in os.listdir(image_dir):
        if f.endswith((".jpg", ".png")) and f != "broken.jpg":
            with Image.open(os.path.join(image_dir, f)) as im:
                sizes[f] = im.size
    assert {r["file_name"] for r in results} <= set(sizes)
    ids = {r["file_name"]: r["image_id"] for r in results}
    assert len(set(ids.values())) == len(ids)  # one id per file
    for r in results:
        w, h = sizes[r["file_name"]]
        x, y, bw, bh = r["bbox"]
        assert 0 <= x and 0 <= y and bw >= 0 and bh >= 0
        assert x + bw <= w + 0.02 and y + bh <= h + 0.02
        assert 1 <= r["category_id"] <= 6 and 0.0 < r["score"] <= 1.0
        assert r["category_name"] in ("circle", "rectangle", "triangle", "star", "cross", "ring")


def test_predict_boxes_are_pixels_of_each_original_size(trained_run, tmp_path):
    """Two sizes in one padded batch: each image's boxes lie in its own pixel frame."""
    from ssd_jax.data import synthetic

    workdir, _ = trained_run
    image = synthetic.generate_example(0, "val", 5, image_size=128)["image"]
    Image.fromarray(image).save(tmp_path / "small.png")
    big = np.repeat(np.repeat(image, 2, axis=0), 3, axis=1)  # 256 x 384, same content
    Image.fromarray(big).save(tmp_path / "big.png")
    predictor = inference.load_predictor(workdir=workdir)
    res = inference.predict_files(predictor, [str(tmp_path / "small.png"),
                                              str(tmp_path / "big.png")],
                                  str(tmp_path / "out"), batch_size=4, progress=False)
    assert not res.skipped and len(res.pngs) == 2
    for name, (w, h) in (("small.png", (128, 128)), ("big.png", (384, 256))):
        boxes = np.array([r["bbox"] for r in res.results if r["file_name"] == name])
        assert len(boxes)
        assert (boxes >= 0).all()
        assert (boxes[:, 0] + boxes[:, 2] <= w + 0.02).all()
        assert (boxes[:, 1] + boxes[:, 3] <= h + 0.02).all()
        if name == "big.png":
            assert (boxes[:, 0] + boxes[:, 2]).max() > 128  # really in the big image's frame


def test_predict_with_a_mismatched_checkpoint_is_a_clear_error(trained_run, tmp_path):
    import shutil

    workdir, _ = trained_run
    bad = tmp_path / "bad_run"
    shutil.copytree(workdir, bad)
    info = json.loads((bad / "run_info.json").read_text())
    info["num_classes"] = 11
    info["class_names"] = [f"c{i}" for i in range(10)]
    (bad / "run_info.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointMismatchError,
                       match=r"num_classes=11.*cls_head_0.*num_classes=7"):
        inference.load_predictor(workdir=str(bad))

    info["num_classes"], info["class_names"] = 7, ["a", "b"]  # names do not fit the classes
    (bad / "run_info.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointMismatchError, match="names 2 classes"):
        inference.load_predictor(workdir=str(bad))

    with pytest.raises(UserError, match="run_info.json"):
        inference.load_predictor(workdir=str(tmp_path))


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_matches_training_eval_and_writes_report(trained_run, tmp_path):
    workdir, train_metrics = trained_run
    report = run_eval.evaluate_run(inference.load_run(workdir), progress=False)
    assert report["step"] == 4 and report["metric"] == "voc07"
    assert report["metrics"]["num_images"] == train_metrics["num_images"] == 8
    np.testing.assert_allclose(report["metrics"]["mAP"], train_metrics["mAP"], rtol=1e-6)
    np.testing.assert_allclose(np.nan_to_num(report["metrics"]["AP"]),
                               np.nan_to_num(train_metrics["AP"]), rtol=1e-6)
    paths = run_eval.write_eval_report(report, str(tmp_path / "eval"))
    curves = report["curves"]
    printed = evaluation.per_class_table(report["class_names"], curves["AP"], curves["num_gt"])
    saved = json.loads(open(paths["metrics"]).read())
    np.testing.assert_allclose(saved["mAP"], train_metrics["mAP"], rtol=1e-6)
    assert saved["step"] == 4 and set(saved["per_class"]) == set(report["class_names"])
    n_gt = sum(v["num_gt"] for v in saved["per_class"].values())
    assert n_gt > 0
    for name in report["class_names"]:
        assert name in printed
    assert "#gt" in printed and "mean" in printed
    with Image.open(paths["pr_curves"]) as png:
        assert png.format == "PNG" and png.size[0] > 200


def test_evaluate_the_held_out_test_split_as_training_reported_it(trained_run):
    workdir, train_metrics = trained_run
    report = run_eval.evaluate_run(inference.load_run(workdir), progress=False, split="test")
    assert report["split"] == "test"
    test = train_metrics["test"]
    assert report["metrics"]["num_images"] == test["num_images"] == 8
    np.testing.assert_allclose(report["metrics"]["mAP"], test["mAP"], rtol=1e-6)
    ids = {r["image_id"] for r in report["results"]}
    assert ids and all(i >= 200_000_000 for i in ids)  # the test split's own images


def test_evaluate_with_another_dataset_config_checks_the_classes(trained_run):
    workdir, _ = trained_run
    run = inference.load_run(workdir)
    dataset = tiny_config().dataset
    dataset.num_eval = 4
    report = run_eval.evaluate_run(run, dataset_config=dataset, metric="voc", progress=False)
    assert report["metrics"]["num_images"] == 4 and report["metric"] == "voc"
    with pytest.raises(ValueError, match="config.metric"):
        run_eval.evaluate_run(run, metric="nonsense")


# ----------------------------------------------------------------------------- torchvision parity


def trained_like_torchvision_ssd300():
    """torchvision's ssd300_vgg16 (COCO's 91 classes), seeded, in eval mode, with trained-like
    outputs: the class head scaled and background biased (a few confident priors per image)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None)
    with torch.no_grad():
        for conv in model.head.classification_head.module_list:
            conv.weight.mul_(0.3)
            conv.bias.view(-1, 91)[:, 0] += 12.0
    return model.eval()


def test_torchvision_checkpoint_matches_torchvision_eval_detections(tmp_path):
    """Our predict path on a converted seeded ssd300_vgg16 == torchvision's model.eval()(images)."""
    torch = pytest.importorskip("torch")
    model = trained_like_torchvision_ssd300()
    pth = tmp_path / "ssd300.pth"
    torch.save(model.state_dict(), pth)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "000000000042.png")
    with torch.no_grad():
        ref = model([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])[0]
    ref_boxes, ref_scores = ref["boxes"].numpy(), ref["scores"].numpy()
    ref_labels = ref["labels"].numpy()
    assert 0 < len(ref_scores)

    predictor = inference.load_predictor(torchvision_checkpoint=str(pth))
    assert predictor.class_names[0] == "person" and len(predictor.class_names) == 90
    res = inference.predict_files(predictor, [str(tmp_path / "000000000042.png")],
                                  str(tmp_path / "out"), batch_size=1, progress=False)
    assert not res.skipped
    assert all(r["image_id"] == 42 for r in res.results)
    ours = sorted(res.results, key=lambda r: -r["score"])
    assert len(ours) == len(ref_scores)
    np.testing.assert_array_equal([r["category_id"] for r in ours], ref_labels)
    np.testing.assert_allclose([r["score"] for r in ours], ref_scores, atol=1e-4)
    xywh = np.array([r["bbox"] for r in ours])
    corners = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    np.testing.assert_allclose(corners, ref_boxes, atol=1.0)
    names = {r["category_name"] for r in ours}
    assert names <= set(coco.COCO_CATEGORIES_91)


@pytest.mark.parametrize("x0", [0.0, 120.0, 185.0])
def test_a_caption_stays_whole_inside_the_picture(x0):
    """issue 33, item 13: the caption of a box near the right edge ran off the picture (cut
    after a few letters); it is moved left so the whole 'name score' shows, and stays at the
    box's left edge where it fits."""
    from PIL import ImageDraw, ImageFont

    from ssd_jax.data import visualize

    image = np.zeros((100, 200, 3), np.uint8)
    label = 1  # palette colour 1 is dark enough for white text
    color = visualize._PALETTE[label]
    pil = visualize.draw_detections(image, np.array([[x0, 50.0, x0 + 10, 90.0]]),
                                    np.array([label]), np.array([0.87]), ["a long class name"])
    font = ImageFont.load_default(size=10)
    tb = ImageDraw.Draw(pil).textbbox((0, 0), "a long class name 0.87", font=font)
    # the caption's top row (above the text): its fill colour, tw + 5 pixels long
    row = np.asarray(pil)[50 - (tb[3] - tb[1]) - 4]
    cols = np.nonzero((row == color).all(axis=-1))[0]
    assert len(cols) == tb[2] - tb[0] + 5, (len(cols), tb)
    assert cols[0] == min(x0, 200 - 1 - (tb[2] - tb[0]) - 4)


def test_predict_one_image_or_several(trained_run):
    """`Predictor.predict(image)` with one [H,W,3] array read its rows as images; it now returns
    that image's detections, equal to the same image in a list, and batches are sized to the
    input (one image runs a batch of 1, not a padded batch of 8). A wrong shape names it."""
    from ssd_jax.data import synthetic

    workdir, _ = trained_run
    predictor = inference.load_predictor(workdir=workdir)
    images = [synthetic.generate_example(0, "val", i, image_size=128)["image"] for i in range(3)]
    calls = []
    original = predictor.fn
    predictor = dataclasses.replace(predictor, fn=lambda v, x: calls.append(x.shape[0]) or
                                    original(v, x))
    one = predictor.predict(images[0])
    assert isinstance(one, inference.ImageDetections) and calls == [1]
    several = predictor.predict(images)
    assert calls == [1, 3] and len(several) == 3
    stacked = predictor.predict(np.stack(images))
    for got in (one, several[0], stacked[0]):
        np.testing.assert_allclose(got.boxes, one.boxes, atol=1e-4)
        np.testing.assert_array_equal(got.labels, one.labels)
    with pytest.raises(UserError, match=r"images\[0\] has shape \(128, 128\)"):
        predictor.predict([images[0][..., 0]])
