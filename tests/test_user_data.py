"""A user's own COCO-JSON folder from the command line, end to end (USER-JOURNEYS 2 and 3).

One session of commands, run as a user runs them (subprocesses started outside the repository,
no PYTHONPATH: `experiments` is installed): train on a folder with truncated, garbage, missing,
grayscale, RGBA and CMYK images, off-image and zero-area boxes and gapped category ids (1, 5, 17,
...) with no config file; predict on new photos with the annotation file; evaluate. Checked:
the run finishes and names what it skipped (console, TensorBoard `input/*`), the workdir's paths
come first and orbax stays out of the console, and predict's COCO results scored by pycocotools
against the user's own annotation file give exactly the COCO AP that `evaluate` reports.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from ssd_jax.errors import DataError
from tests.conftest import dataset_config


def _shared(tmp_path_factory) -> pathlib.Path:
    """A folder all xdist workers of this run share (the session fixtures below are built once,
    by whichever worker asks first, under a file lock: the workers interleave modules, and
    xdist's group marks do not keep this module on one worker with pytest 9)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "user_data"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def _exclusive(folder: pathlib.Path):
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

CATEGORY_IDS = (1, 5, 17, 23, 42, 90)  # gapped, as in COCO; labels 1..6 of the synthetic shapes
NUM_TRAIN, NUM_EVAL, SIDE = 24, 8, 128


def _run(module: str, *args: str, cwd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _coco_box(box: np.ndarray, w: int, h: int) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h]


@pytest.fixture(scope="session")
def coco_folder(tmp_path_factory):
    """images/ (24 synthetic JPEGs + broken files), train.json, val/ (8 of the images, as new
    photos) and val.json (their own image ids 5000+); categories with gapped ids."""
    shared = _shared(tmp_path_factory)
    with _exclusive(shared):
        root = shared / "user_coco"
        if not (root / "val.json").exists():
            _write_coco_folder(root)
    return root


def _write_coco_folder(root: pathlib.Path) -> None:
    from ssd_jax.data import synthetic

    root.mkdir()
    (root / "images").mkdir()
    (root / "val").mkdir()
    cats = [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, synthetic.CLASS_NAMES, strict=True)]
    train_images, train_anns, val_images, val_anns = [], [], [], []

    def add(images, anns, image_id, name, boxes, labels, w=SIDE, h=SIDE):
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for box, label in zip(boxes, labels, strict=True):
            bbox = box if isinstance(box, list) else _coco_box(box, w, h)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "bbox": bbox,
                         "category_id": CATEGORY_IDS[int(label) - 1], "area": bbox[2] * bbox[3],
                         "iscrowd": 0})

    for i in range(NUM_TRAIN):
        ex = synthetic.generate_example(7, "train", i, image_size=SIDE)
        name = f"shape_{i:03d}.jpg"
        Image.fromarray(ex["image"]).save(root / "images" / name, quality=95)
        add(train_images, train_anns, 100 + i, name, ex["boxes"], ex["labels"])
        if i < NUM_EVAL:
            Image.fromarray(ex["image"]).save(root / "val" / name, quality=95)
            add(val_images, val_anns, 5000 + i, name, ex["boxes"], ex["labels"])
    # the broken part of a real folder
    ex = synthetic.generate_example(7, "train", 99, image_size=SIDE)
    good = io.BytesIO()
    Image.fromarray(ex["image"]).save(good, "JPEG")
    files = {"truncated.jpg": good.getvalue()[: len(good.getvalue()) // 3],
             "garbage.jpg": b"this is not an image" * 30, "missing.jpg": None}
    for name, mode, fmt in (("gray.jpg", "L", "JPEG"), ("rgba.png", "RGBA", "PNG"),
                            ("cmyk.jpg", "CMYK", "JPEG")):
        buf = io.BytesIO()
        Image.fromarray(ex["image"]).convert(mode).save(buf, fmt)
        files[name] = buf.getvalue()
    for k, (name, data) in enumerate(files.items()):
        if data is not None:
            (root / "images" / name).write_bytes(data)
        add(train_images, train_anns, 900 + k, name, ex["boxes"], ex["labels"])
    train_anns += [  # on shape_001: a box off the image (clipped), a zero-area box (dropped)
        {"id": len(train_anns) + 1, "image_id": 101, "bbox": [100.0, 100.0, 80.0, 60.0],
         "category_id": 5, "area": 4800.0, "iscrowd": 0},
        {"id": len(train_anns) + 2, "image_id": 101, "bbox": [10.0, 10.0, 0.0, 20.0],
         "category_id": 5, "area": 0.0, "iscrowd": 0}]
    (root / "train.json").write_text(json.dumps(
        {"images": train_images, "annotations": train_anns, "categories": cats}))
    (root / "val.json").write_text(json.dumps(
        {"images": val_images, "annotations": val_anns, "categories": cats}))


@pytest.fixture(scope="session")
def user_run(coco_folder, tmp_path_factory):
    """The commands a user types: train (no config file), predict on val/, evaluate."""
    shared = _shared(tmp_path_factory)
    with _exclusive(shared):
        record = shared / "user_run.json"
        if not record.exists():
            record.write_text(json.dumps(_user_session(coco_folder, shared / "cwd")))
        run = json.loads(record.read_text())
    for step in ("train", "predict", "evaluate"):
        run[step] = types.SimpleNamespace(**run[step])
    return run


def _user_session(coco_folder: pathlib.Path, cwd_path: pathlib.Path) -> dict:
    cwd_path.mkdir()
    cwd = str(cwd_path)
    work = os.path.join(cwd, "run")
    root = str(coco_folder)
    train = _run(
        "experiments.train", f"--workdir={work}", "--config.dataset.kind=coco_json",
        f"--config.dataset.train_annotations={root}/train.json",
        f"--config.dataset.train_images={root}/images",
        f"--config.dataset.eval_annotations={root}/val.json",
        f"--config.dataset.eval_images={root}/val", "--config.metric=coco",
        "--config.num_train_steps=60", "--config.batch_size=8", "--config.eval_batch_size=8",
        "--config.warmup_steps=5", "--config.log_every_steps=20",
        "--config.checkpoint_every_steps=30", "--config.eval_every_steps=30",
        "--config.num_eval_images_to_draw=2", cwd=cwd)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-5000:]
    predict = _run("experiments.predict", f"--workdir={work}", f"--images={root}/val",
                   f"--annotations={root}/val.json", f"--out={cwd}/pred", "--min_score=0.2",
                   cwd=cwd)
    assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    evaluate = _run("experiments.evaluate", f"--workdir={work}", "--metric=coco",
                    f"--out={cwd}/eval", cwd=cwd)
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    done = {k: {"returncode": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
            for k, p in (("train", train), ("predict", predict), ("evaluate", evaluate))}
    return {"cwd": cwd, "work": work, "root": root, **done}


@pytest.mark.slow
def test_train_on_a_broken_coco_folder_from_the_command_line(user_run):
    out = user_run["train"].stdout + user_run["train"].stderr
    final = out[out.index("Done in"):]
    input_line = next(line for line in final.splitlines() if "input:" in line)
    # every kind of bad input is named, with a count
    for stat in ("missing_image_files 1", "images_skipped_undecodable", "boxes_clipped",
                 "boxes_degenerate_dropped", "images_converted_to_rgb"):
        assert stat in input_line, input_line
    # the workdir's paths come first, before any training step
    lines = out.splitlines()
    first_step = next(i for i, line in enumerate(lines) if "step " in line and "/60" in line)
    paths = next(i for i, line in enumerate(lines) if line.startswith("workdir "))
    assert paths < first_step
    assert any("checkpoints: " in line for line in lines[paths:first_step])
    # orbax's INFO lines stay off the console, in the workdir's log
    assert "checkpoint_manager.py" not in out and "orbax" not in out.lower().replace(
        "orbax-checkpoint", "")
    with open(os.path.join(user_run["work"], "train.log")) as f:
        assert "checkpoint_manager.py" in f.read()
    # the dataset's own ids are kept for predict/evaluate
    with open(os.path.join(user_run["work"], "run_info.json")) as f:
        assert json.load(f)["category_ids"] == list(CATEGORY_IDS)


@pytest.mark.slow
def test_repairs_and_skips_reach_tensorboard(user_run):
    import tensorflow as tf
    from tensorflow.python.summary.summary_iterator import summary_iterator

    tags: dict[str, float] = {}
    for name in os.listdir(user_run["work"]):
        if name.startswith("events.out.tfevents"):
            for event in summary_iterator(os.path.join(user_run["work"], name)):
                for v in event.summary.value:
                    if v.tag.startswith("input/"):
                        tags[v.tag] = float(tf.make_ndarray(v.tensor).reshape(-1)[0])
    # per split: the broken files are in the training folder only (val/ is clean)
    assert tags.get("input/train/missing_image_files") == 1
    assert tags.get("input/train/images_skipped_undecodable", 0) >= 1
    assert tags.get("input/train/boxes_degenerate_dropped", 0) >= 1
    assert not any(t.startswith("input/eval/") for t in tags), tags


@pytest.mark.slow
def test_predict_results_in_the_datasets_ids_score_as_evaluate_reports(user_run):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cwd, root = user_run["cwd"], user_run["root"]
    with open(os.path.join(cwd, "pred", "detections.json")) as f:
        results = json.load(f)
    assert results
    assert {r["category_id"] for r in results} <= set(CATEGORY_IDS)
    assert {r["image_id"] for r in results} <= set(range(5000, 5000 + NUM_EVAL))
    with open(os.path.join(cwd, "eval", "metrics.json")) as f:
        reported = json.load(f)
    gt = COCO(os.path.join(root, "val.json"))
    coco_eval = COCOeval(gt, gt.loadRes(results), iouType="bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    assert coco_eval.stats[0] > 0, "some detections must hit: a wrong id would score 0"
    np.testing.assert_allclose(coco_eval.stats[0], reported["AP"], atol=1e-6)
    np.testing.assert_allclose(coco_eval.stats[1], reported["AP50"], atol=1e-6)
    # evaluate writes the same results (same pixels: one resize; same ids)
    with open(os.path.join(cwd, "eval", "detections.json")) as f:
        from_eval = json.load(f)
    key = lambda r: (r["image_id"], r["category_id"], round(r["score"], 4))
    assert sorted(map(key, results)) == sorted(map(key, from_eval))


# ----------------------------------------------------------------------------- bad folders


def _folder(tmp_path, boxes_px: list[list[float]], side: int = 300) -> dict:
    """A one-category COCO folder with 3 images, each annotated with `boxes_px`."""
    (tmp_path / "images").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(3):
        Image.fromarray(np.full((side, side, 3), 90 + 40 * i, np.uint8)).save(
            tmp_path / "images" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": side, "height": side})
        for b in boxes_px:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 3, "bbox": b,
                         "iscrowd": 0, "area": 1.0})
    (tmp_path / "a.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "thing"}]}))
    return dict(kind="coco_json", train_annotations=str(tmp_path / "a.json"),
                train_images=str(tmp_path / "images"), eval_annotations=str(tmp_path / "a.json"),
                eval_images=str(tmp_path / "images"))


def test_no_usable_box_stops_before_any_compile(tmp_path, monkeypatch):
    from experiments.configs import default
    from ssd_jax import train

    config = default.get_config()
    config.dataset = dataset_config(**_folder(tmp_path, [[50, 50, -20, 30], [10, 10, -5, 8]]))

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before the data was checked")

    monkeypatch.setattr(train.step, "make_steps", no_compile)
    monkeypatch.setattr(train.state, "create_train_state", no_compile)
    with pytest.raises(DataError, match=r"only 0 of 6 annotated boxes.*zero-area, negative"):
        train.train_and_evaluate(config, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work" / "run_info.json")


def test_no_usable_box_from_the_command_line_is_one_message(tmp_path):
    f = _folder(tmp_path, [[50, 50, -20, 30]])
    proc = _run("experiments.train", f"--workdir={tmp_path}/work",
                "--config.dataset.kind=coco_json",
                *(f"--config.dataset.{k}={v}" for k, v in f.items() if k != "kind"),
                cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr[proc.stderr.index("error:"):].strip().splitlines()
    assert len(err) <= 3 and "Traceback" not in proc.stderr
    assert "only 0 of 3 annotated boxes are usable" in err[0]


def test_normalized_boxes_get_a_warning(tmp_path):
    from ssd_jax.data import pipeline

    cfg = dataset_config(**_folder(tmp_path, [[0.1, 0.2, 0.3, 0.4]]))
    data = pipeline.InputPipeline(cfg)
    data.info()
    assert any("look normalized" in w for w in data.warnings), data.warnings
    (tmp_path / "px").mkdir()
    ok = dataset_config(**_folder(tmp_path / "px", [[30.0, 60.0, 90.0, 120.0]]))
    data = pipeline.InputPipeline(ok)
    data.info()
    assert not data.warnings


def test_corner_boxes_in_a_coco_bbox_get_a_warning(tmp_path):
    """bbox written [x0, y0, x1, y1] instead of [x, y, w, h] trained silently with 63 of 88 boxes
    clipped; now a warning names it. Correct boxes near the edges get none."""
    from ssd_jax.data import pipeline

    corners = [[40.0, 50.0, 180.0, 200.0], [150.0, 120.0, 290.0, 260.0], [10.0, 200.0, 60.0, 290.0]]
    data = pipeline.InputPipeline(dataset_config(**_folder(tmp_path, corners)))
    data.info()
    assert any("[x0, y0, x1, y1]" in w and "reach past the image edge" in w
               for w in data.warnings), data.warnings
    (tmp_path / "ok").mkdir()
    xywh = [[40.0, 50.0, 140.0, 150.0], [150.0, 120.0, 140.0, 140.0], [10.0, 200.0, 50.0, 90.0]]
    data = pipeline.InputPipeline(dataset_config(**_folder(tmp_path / "ok", xywh)))
    data.info()
    assert not data.warnings, data.warnings


def test_coco_file_names_with_a_subfolder(tmp_path):
    """file_name "train/0.jpg" (CVAT, Label Studio exports) was rejected as missing; it is read
    from the subfolder now, and a file that is really missing is named in the message."""
    from ssd_jax.data import pipeline, sources

    f = _folder(tmp_path, [[30.0, 60.0, 90.0, 120.0]])
    (tmp_path / "images" / "train").mkdir()
    for i in range(3):
        os.replace(tmp_path / "images" / f"{i}.jpg", tmp_path / "images" / "train" / f"{i}.jpg")
    ann = json.loads((tmp_path / "a.json").read_text())
    for img in ann["images"]:
        img["file_name"] = "train/" + img["file_name"]
    (tmp_path / "a.json").write_text(json.dumps(ann))
    table = sources.coco_json_table(f["train_annotations"], f["train_images"], keep_crowd=False)
    assert len(table.image_id) == 3 and table.stats["missing_image_files"] == 0
    assert all(os.path.exists(p) for p in table.paths)
    for img in ann["images"]:
        img["file_name"] = img["file_name"].replace("train/", "val/")
    (tmp_path / "a.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"missing_image_files.*e\.g\. .*images/val/0\.jpg is not there"):
        pipeline.InputPipeline(dataset_config(**f)).info()


def _exif_jpeg(path, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif)


def test_declared_sizes_that_are_not_the_upright_pixels_are_skipped_and_named(tmp_path):
    """issue 33, item 1: a phone photo stored 200x300 with EXIF orientation 6 shows (and is now
    decoded) 300x200. Declared 300x200 (drawn on the upright photo): kept, boxes normalized by
    it. Declared 200x300 (drawn on the stored pixels, without the rotation): its boxes would be
    applied to the wrong orientation, so the image is skipped, counted and named; the same for a
    VOC <size>. Before, the declared size was used without looking at the pixels."""
    from ssd_jax.data import pipeline, sources

    f = _folder(tmp_path, [[30.0, 60.0, 90.0, 120.0]])
    stored = np.full((300, 200, 3), 120, np.uint8)  # rows x cols: 200 wide, 300 high
    _exif_jpeg(tmp_path / "images" / "1.jpg", stored, 6)  # upright: 300 wide, 200 high
    _exif_jpeg(tmp_path / "images" / "2.jpg", stored, 6)
    ann = json.loads((tmp_path / "a.json").read_text())
    ann["images"][1].update(width=300, height=200)  # the upright size: right
    ann["images"][2].update(width=200, height=300)  # the stored pixels' size: boxes sideways
    (tmp_path / "a.json").write_text(json.dumps(ann))
    table = sources.coco_json_table(f["train_annotations"], f["train_images"], keep_crowd=False)
    assert table.stats["images_size_mismatch_skipped"] == 1
    assert [os.path.basename(p) for p in table.paths] == ["0.jpg", "1.jpg"]
    np.testing.assert_allclose(table.boxes[1], [30 / 300, 60 / 200, 120 / 300, 180 / 200],
                               rtol=1e-6)
    (warning,) = table.warnings
    assert "1 images skipped" in warning and "2.jpg: declared 200x300, upright pixels 300x200" \
        in warning and "EXIF rotation" in warning
    data = pipeline.InputPipeline(dataset_config(**f))
    data.info()
    assert any("2.jpg: declared 200x300" in w for w in data.warnings)
    # every image mismatched: the error names one
    for img in ann["images"]:
        img.update(width=100, height=100)
    (tmp_path / "a.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"images_size_mismatch_skipped=3.*declared 100x100"):
        sources.coco_json_table(f["train_annotations"], f["train_images"], keep_crowd=False)
    # VOC: <size> is the declared size
    voc = tmp_path / "voc"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / d).mkdir(parents=True)
    for stem, (w, h) in {"a": (300, 200), "b": (200, 300)}.items():
        _exif_jpeg(voc / "JPEGImages" / f"{stem}.jpg", stored, 6)
        (voc / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{w}</width><height>{h}"
            "</height></size><object><name>thing</name><bndbox><xmin>31</xmin><ymin>61</ymin>"
            "<xmax>120</xmax><ymax>180</ymax></bndbox></object></annotation>")
    (voc / "ImageSets/Main/train.txt").write_text("a\nb\n")
    table = sources.voc_xml_table(str(voc), "train", ("thing",))
    assert table.stats["images_size_mismatch_skipped"] == 1 and len(table.paths) == 1
    assert "b.jpg: declared 200x300" in table.warnings[0]


@pytest.mark.slow
def test_evaluate_a_run_whose_data_moved(user_run, tmp_path):
    """issue 33, item 6: a run read where its data is not (moved, or an old run's relative
    path) said only "config.dataset.eval_annotations='coco/val.json': no such file". Now the
    message says the path is the run's and how to give the new place; --config.FIELD=VALUE
    without --config overrides the run's own config (it needed --config=default before), and
    --print_config prints the run's config. The evaluation on the moved data equals the
    evaluation of the run where its data was."""
    import shutil

    work, moved = tmp_path / "run", tmp_path / "moved"
    shutil.copytree(user_run["work"], work)
    shutil.copytree(os.path.join(user_run["root"], "val"), moved / "val")
    shutil.copy(os.path.join(user_run["root"], "val.json"), moved / "val.json")
    info = json.loads((work / "run_info.json").read_text())
    info["config"]["dataset"]["eval_annotations"] = "data/val.json"  # an old run: relative
    info["config"]["dataset"]["eval_images"] = "data/val"
    (work / "run_info.json").write_text(json.dumps(info))
    refused = _run("experiments.evaluate", f"--workdir={work}", cwd=str(tmp_path))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "config.dataset.eval_annotations='data/val.json'" in refused.stderr
    assert f"the path is the run's ({work}/run_info.json), a relative path" in refused.stderr
    assert "--config.dataset.eval_annotations=PATH" in refused.stderr
    printed = _run("experiments.evaluate", f"--workdir={work}", "--print_config",
                   f"--config.dataset.eval_images={moved}/val", cwd=str(tmp_path))
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert "dataset.eval_annotations = 'data/val.json'" in printed.stdout
    assert f"dataset.eval_images = '{moved}/val'" in printed.stdout
    assert "num_train_steps = 60" in printed.stdout  # the run's, not the default's
    evaluate = _run("experiments.evaluate", f"--workdir={work}", "--metric=coco",
                    f"--config.dataset.eval_annotations={moved}/val.json",
                    f"--config.dataset.eval_images={moved}/val", f"--out={tmp_path}/eval",
                    cwd=str(tmp_path))
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    want = json.loads(pathlib.Path(user_run["cwd"], "eval", "metrics.json").read_text())
    assert got["AP"] == want["AP"] > 0
