"""Data sources on small datasets written to disk (including broken files) and TFDS mocks."""

from __future__ import annotations

import io
import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ssd_jax.data import pipeline, sources
from ssd_jax.errors import ConfigError, DataError
from tests.conftest import dataset_config

S = 32  # model input side in these tests: tiny and fast


def _jpeg(arr: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG")
    return buf.getvalue()


def _png(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def _image(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


# name -> (file bytes or None for missing, decodable?)
def _files() -> dict[str, tuple[bytes | None, bool]]:
    good = _jpeg(_image())
    return {
        "good.jpg": (good, True),
        "gray.jpg": (_jpeg(_image(seed=1), "L"), True),
        "rgba.png": (_png(_image(seed=2), "RGBA"), True),
        "cmyk.jpg": (_jpeg(_image(seed=3), "CMYK"), True),
        "empty.jpg": (_jpeg(_image(seed=4)), True),  # no objects: kept as a negative
        "trunc.jpg": (good[: len(good) // 3], False),
        "garbage.jpg": (b"this is not an image" * 20, False),
        "missing.jpg": (None, False),
    }


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    img_dir = root / "images"
    img_dir.mkdir()
    images, anns = [], []
    for i, (name, (data, _)) in enumerate(_files().items()):
        if data is not None:
            (img_dir / name).write_bytes(data)
        images.append({"id": 100 + i, "file_name": name, "width": 60, "height": 40})
        if name == "empty.jpg":
            continue
        anns += [
            {"id": 10 * i, "image_id": 100 + i, "category_id": 7, "bbox": [6, 4, 30, 20],
             "iscrowd": 0},
            {"id": 10 * i + 1, "image_id": 100 + i, "category_id": 3, "bbox": [50, 30, 20, 20],
             "iscrowd": 0},  # out of range: clipped
            {"id": 10 * i + 2, "image_id": 100 + i, "category_id": 3, "bbox": [10, 10, 0, 5],
             "iscrowd": 0},  # degenerate: dropped
            {"id": 10 * i + 3, "image_id": 100 + i, "category_id": 9, "bbox": [0, 0, 60, 40],
             "iscrowd": 1},  # crowd: excluded in training, kept as ignore in eval
        ]
    cats = [{"id": 9, "name": "zebra"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                               "categories": cats}))
    return root


def _coco_cfg(root) -> ml_collections.ConfigDict:
    return dataset_config(
        kind="coco_json", train_annotations=str(root / "ann.json"), train_images=str(root / "images"),
        eval_annotations=str(root / "ann.json"), eval_images=str(root / "images"))


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    stems = []
    for i, (name, (data, _)) in enumerate(_files().items()):
        stem = f"2007_{i:06d}"
        stems.append(stem)
        if data is not None:
            (root / "JPEGImages" / f"{stem}.jpg").write_bytes(data)
        objs = "" if name == "empty.jpg" else (
            "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>7</xmin><ymin>5</ymin>"
            "<xmax>36</xmax><ymax>24</ymax></bndbox></object>"
            "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>51</xmin><ymin>31</ymin>"
            "<xmax>90</xmax><ymax>60</ymax></bndbox></object>"  # out of range: clipped
            "<object><name>cat</name><difficult>0</difficult><bndbox><xmin>20</xmin><ymin>5</ymin>"
            "<xmax>19</xmax><ymax>24</ymax></bndbox></object>")  # degenerate: dropped
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>60</width>"
            f"<height>40</height><depth>3</depth></size>{objs}</annotation>")
    (root / "ImageSets/Main/trainval.txt").write_text("\n".join(stems) + "\n")
    (root / "ImageSets/Main/test.txt").write_text("\n".join(stems) + "\n")
    return root


def _voc_cfg(root) -> ml_collections.ConfigDict:
    return dataset_config(kind="voc_xml", root=str(root), train_split="trainval",
                          eval_split="test")


def _decodable() -> int:
    return sum(ok for _, ok in _files().values())


def test_coco_json_table_repairs_and_counts(coco_dir):
    table = sources.coco_json_table(str(coco_dir / "ann.json"), str(coco_dir / "images"),
                                    keep_crowd=False)
    assert table.class_names == ("cat", "dog", "zebra")  # sorted by category id: 3, 7, 9
    assert len(table) == len(_files()) - 1  # the missing file is dropped
    assert table.stats["missing_image_files"] == 1
    assert table.stats["boxes_degenerate_dropped"] == len(table) - 1
    assert table.stats["boxes_clipped"] == len(table) - 1
    assert table.stats["crowd_boxes_excluded"] == len(table) - 1
    assert table.stats["images_without_objects"] == 1
    assert not table.iscrowd.any()
    i = list(table.paths).index(str(coco_dir / "images" / "good.jpg"))
    s, e = table.row_splits[i], table.row_splits[i + 1]
    np.testing.assert_allclose(table.boxes[s:e], [[0.1, 0.1, 0.6, 0.6], [50 / 60, 0.75, 1, 1]],
                               atol=1e-6)
    np.testing.assert_array_equal(table.labels[s:e], [2, 1])
    assert (table.boxes >= 0).all() and (table.boxes <= 1).all()


def test_coco_json_eval_keeps_crowd_and_masks_padding(coco_dir):
    cfg = _coco_cfg(coco_dir)
    ev = pipeline.create_eval_iterator(cfg, image_size=S, batch_size=3, max_boxes=4)
    batches = list(ev)
    assert len(batches) == len(ev) == 3  # 7 listed images (missing one dropped) -> 3 batches of 3
    mask = np.concatenate([b["mask"] for b in batches])
    ids = np.concatenate([b["image_id"] for b in batches])[mask]
    assert mask.sum() == _decodable() and len(set(ids)) == len(ids)
    good = [b for b in batches if 100 in b["image_id"]][0]
    j = list(good["image_id"]).index(100)
    np.testing.assert_array_equal(good["iscrowd"][j], [False, False, True, False])
    np.testing.assert_array_equal(good["image_size"][j], [40, 60])
    assert ev.stats["images_skipped_undecodable"] == 2
    assert ev.stats["images_converted_to_rgb"] == 3  # grayscale JPEG, RGBA PNG, CMYK JPEG
    for b in batches:
        assert b["image"].shape == (3, S, S, 3) and b["image"].dtype == np.uint8
        assert not b["image"][~b["mask"]].any()
    assert len(list(ev)) == 3  # re-iterable
    assert ev.stats["images_skipped_undecodable"] == 2  # per pass, not summed over passes
    data = pipeline.InputPipeline(cfg)
    again = data.eval_iterator(image_size=S, batch_size=3, max_boxes=4)
    for _ in range(3):  # the training loop evaluates many times: its counts must not grow
        list(again)
    assert data.stats["images_skipped_undecodable"] == 2


def test_voc_xml_source(voc_dir):
    cfg = _voc_cfg(voc_dir)
    info = pipeline.get_dataset_info(cfg)
    assert info.class_names == ("cat", "dog") and info.num_classes == 3
    table = sources.load_source(cfg, "train")
    assert len(table) == len(_files()) - 1
    assert table.stats["missing_image_files"] == 1
    assert table.image_id[0] == 2007000000
    s, e = table.row_splits[0], table.row_splits[1]
    np.testing.assert_allclose(table.boxes[s:e], [[0.1, 0.1, 0.6, 0.6], [50 / 60, 0.75, 1, 1]],
                               atol=1e-6)
    np.testing.assert_array_equal(table.labels[s:e], [2, 1])
    np.testing.assert_array_equal(table.difficult[s:e], [False, True])
    # Training never stops on the broken files: every position yields an example.
    it = pipeline.create_train_iterator(cfg, image_size=S, batch_size=4, max_boxes=3, seed=0)
    for _ in range(3):
        batch = next(it)
        assert batch["image"].shape == (4, S, S, 3)
        assert set(np.unique(batch["labels"])) <= {0, 1, 2}
    assert it.stats["images_skipped_undecodable"] > 0


def test_voc_class_names_from_config(voc_dir):
    cfg = _voc_cfg(voc_dir)
    cfg.class_names = ("dog", "cat", "bird")
    info = pipeline.get_dataset_info(cfg)
    assert info.class_names == ("dog", "cat", "bird") and info.num_classes == 4
    table = sources.load_source(cfg, "train")
    assert table.labels[0] == 1  # dog


def test_synthetic_source_and_cache(tmp_path):
    cfg = dataset_config(kind="synthetic", seed=3, num_train=6, num_eval=4, image_size=48,
                         cache_dir=str(tmp_path))
    info = pipeline.get_dataset_info(cfg)  # from the config: generates nothing
    assert info.num_train == 6 and info.num_eval == 4 and info.num_classes == 7
    assert not list(tmp_path.glob("*.npz"))
    table = sources.load_source(cfg, "train")
    sources.load_source(cfg, "eval")
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert table.images.shape == (6, 48, 48, 3)
    assert (table.labels >= 1).all() and (table.labels < info.num_classes).all()
    again = sources.load_source(cfg, "train")  # from the .npz cache (no in-memory cache)
    np.testing.assert_array_equal(again.images, table.images)
    np.testing.assert_array_equal(again.boxes, table.boxes)


def test_synthetic_max_object_size_has_a_cache_of_its_own(tmp_path):
    """The default's cache file keeps its name; small objects get another file and other boxes
    (a default-size cache is never read for them, nor theirs for the default)."""
    from ssd_jax.data import synthetic

    base = dict(kind="synthetic", seed=3, num_train=4, num_eval=2, image_size=64,
                generate_processes=0, cache_dir=str(tmp_path))
    default = sources.load_source(dataset_config(**base), "train")
    assert [p.name for p in tmp_path.glob("*.npz")] == ["synthetic_3_train_4_64.npz"]
    small = sources.load_source(dataset_config(**base, max_object_size=0.2), "train")
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == [
        "synthetic_3_train_4_64.npz", "synthetic_3_train_4_64_max0.2.npz"]
    assert (small.boxes[:, 2:] - small.boxes[:, :2]).max() <= 0.2 + 1e-6
    assert not np.array_equal(small.images, default.images)
    expected = synthetic.generate_split(3, "train", 4, image_size=64, max_object_size=0.2)
    np.testing.assert_array_equal(small.images, expected["image"])
    again = sources.load_source(dataset_config(**base, max_object_size=0.2), "train")
    np.testing.assert_array_equal(again.images, small.images)  # from its own cache
    np.testing.assert_array_equal(again.boxes, small.boxes)


@pytest.mark.parametrize("value, words", [
    (0.05, "config.dataset.max_object_size must be in (0.05, 1]"),
    (1.5, "config.dataset.max_object_size must be in (0.05, 1]"),
    (None, "config.dataset.max_object_size must be a number"),
])
def test_bad_synthetic_max_object_size_is_a_clear_error(value, words):
    cfg = dataset_config(kind="synthetic")
    cfg.max_object_size = value
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("]", r"\]")):
        sources.validate_dataset_config(cfg)
    cfg = dataset_config(kind="synthetic", image_size=32, max_object_size=0.06)
    with pytest.raises(ConfigError, match="config.dataset.max_object_size=0.06 is too small"):
        sources.validate_dataset_config(cfg)


@pytest.mark.parametrize("cfg, words", [
    (dict(kind="nope"), "config.dataset.kind='nope' is unknown"),
    (dict(kind="coco_json", train_annotations="/no/such.json", train_images="/tmp",
          eval_annotations="/no/such.json", eval_images="/tmp"),
     "config.dataset.train_annotations='/no/such.json': no such file"),
    (dict(kind="coco_json", train_images="/tmp"), "config.dataset.train_annotations is required"),
    (dict(kind="voc_xml", root="/no/such/voc"), "config.dataset.root='/no/such/voc': no such"),
    (dict(kind="tfds", name="no_such_dataset_xyz", data_dir="/tmp"), "no_such_dataset_xyz"),
    (dict(kind="tfds", name="voc/2007"), "config.dataset.data_dir is required"),
])
def test_unusable_dataset_is_a_clear_error(cfg, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        pipeline.get_dataset_info(dataset_config(**cfg))


def test_a_tfds_folder_without_prepared_data_is_one_line_and_writes_nothing(tmp_path):
    """issue 33, item 8: TFDS's AssertionError was a 41-line traceback, and ssd-train left
    checkpoints/ and train.log in the new workdir."""
    from experiments.configs import ssd300_voc
    from ssd_jax import train

    empty = tmp_path / "tfds"
    empty.mkdir()
    cfg = dataset_config(kind="tfds", name="voc/2007", data_dir=str(empty))
    with pytest.raises(ConfigError, match=r"holds no prepared 'voc/2007'.*tfds build voc/2007"):
        pipeline.get_dataset_info(cfg)
    config = ssd300_voc.get_config()
    config.dataset.data_dir = str(empty)
    with pytest.raises(ConfigError, match="holds no prepared"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not list((tmp_path / "run").iterdir())


def test_a_dataset_config_missing_a_field_names_it():
    fields = dataset_config().to_dict()
    del fields["image_size"]
    cfg = ml_collections.ConfigDict(fields)
    with pytest.raises(ConfigError, match="config.dataset.image_size is missing"):
        pipeline.get_dataset_info(cfg)


def test_no_usable_images_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "a.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "x.jpg", "width": 5, "height": 5}],
        "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(DataError, match="no usable images"):
        sources.coco_json_table(str(tmp_path / "a.json"), str(tmp_path / "images"),
                                keep_crowd=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sources.coco_json_table(str(tmp_path / "a.json"), str(tmp_path / "nowhere"),
                                keep_crowd=False)


def test_tfds_coco_class_names_map_to_coco_category_ids():
    from ssd_jax import coco

    names = tuple(n.replace(" ", "_") for n in coco.COCO_CATEGORIES_91[1:] if n != "N/A")
    ids = sources.category_ids_of(names, ("coco/2017",))
    assert len(ids) == 80 and ids[:3] == (1, 2, 3) and ids[-1] == 90 and 12 not in ids
    assert [coco.COCO_CATEGORIES_91[i] for i in ids] == [n.replace("_", " ") for n in names]
    assert sources.category_ids_of(("a", "b"), ("voc/2007",)) == (1, 2)


def test_decode_image_layouts():
    for data, converted in [(_jpeg(_image()), False), (_jpeg(_image(), "L"), True),
                            (_png(_image(), "RGBA"), True), (_png(_image(), "LA"), True),
                            (_jpeg(_image(), "CMYK"), True)]:
        image, conv = pipeline.decode_image(data)
        assert image.shape == (40, 60, 3) and image.dtype == np.uint8
        assert bool(conv) == converted


# ------------------------------------------------------------------------------------------
# TFDS through tfds.testing.mock_data


@pytest.mark.parametrize("name, num_classes", [("voc/2007+voc/2012", 21), ("coco/2017", 81)])
def test_tfds_sources(tfds_mock, name, num_classes, tmp_path):
    cfg = dataset_config(kind="tfds", name=name, data_dir=str(tmp_path), train_split="train",
                         eval_split="validation")
    data = pipeline.InputPipeline(cfg)
    info = data.info()
    assert info.num_classes == num_classes
    # the mock's class names are "0".."79" (not COCO's), so the ids stay the labels here; the
    # name -> COCO id mapping is tested on COCO's names below
    assert info.category_ids == tuple(range(1, num_classes))
    it = data.train_iterator(image_size=S, batch_size=4, max_boxes=12, seed=0)
    batch = next(it)
    assert batch["image"].shape == (4, S, S, 3)
    labels = batch["labels"]
    assert (labels >= 0).all() and (labels < num_classes).all() and (labels > 0).any()
    boxes = batch["boxes"][labels > 0]
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert data.stats["boxes_degenerate_dropped"] > 0 and it.stats["boxes_degenerate_dropped"] > 0
    # Resume: the batch at step 2 is the same from a fresh iterator started at step 2.
    it.__next__()
    third = next(it)
    resumed = next(pipeline.create_train_iterator(cfg, image_size=S, batch_size=4, max_boxes=12,
                                                  seed=0, start_step=2))
    for k in third:
        np.testing.assert_array_equal(third[k], resumed[k])
    ev = pipeline.create_eval_iterator(cfg, image_size=S, batch_size=4, max_boxes=12)
    batches = list(ev)
    n = 10 if "+" in name else 5  # mock_data yields 5 examples per split and dataset
    assert sum(int(b["mask"].sum()) for b in batches) == n == len(ev) * 4 - (-n % 4)
    if name == "coco/2017":
        assert any(b["iscrowd"].any() for b in batches)  # crowd kept for eval

