"""Train/eval iterators: shapes, determinism, exact resume, multi-host split, eval coverage."""

from __future__ import annotations

import numpy as np
import pytest

from ssd_jax.data import pipeline, sources
from ssd_jax.errors import ConfigError
from tests.conftest import dataset_config

S, B, M = 32, 4, 5


@pytest.fixture(scope="module")
def cfg():
    return dataset_config(kind="synthetic", seed=0, num_train=10, num_eval=7, image_size=48)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _train(cfg, **kw):
    args = dict(image_size=S, batch_size=B, max_boxes=M, seed=1)
    args.update(kw)
    return pipeline.create_train_iterator(cfg, **args)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_batch_contract(cfg):
    info = pipeline.get_dataset_info(cfg)
    batch = next(_train(cfg))
    assert set(batch) == {"image", "boxes", "labels"}
    assert batch["image"].shape == (B, S, S, 3) and batch["image"].dtype == np.uint8
    assert batch["boxes"].shape == (B, M, 4) and batch["boxes"].dtype == np.float32
    assert batch["labels"].shape == (B, M) and batch["labels"].dtype == np.int32
    labels = batch["labels"]
    assert (labels >= 0).all() and (labels < info.num_classes).all()
    real = labels > 0
    assert (batch["boxes"][~real] == 0).all()
    boxes = batch["boxes"][real]
    assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > boxes[:, :2]).all()


def test_same_seed_same_batches_other_seed_differs(cfg):
    a, b = _take(_train(cfg), 3), _take(_train(cfg), 3)
    for x, y in zip(a, b, strict=True):
        _assert_same(x, y)
    c = next(_train(cfg, seed=2))
    assert not np.array_equal(a[0]["image"], c["image"])


def test_resume_gives_the_uninterrupted_stream(cfg):
    full = _take(_train(cfg), 6)  # 24 elements: crosses 2 epochs of 10 images
    for k in (1, 3, 5):
        resumed = _take(_train(cfg, start_step=k), 6 - k)
        for x, y in zip(full[k:], resumed, strict=True):
            _assert_same(x, y)


def test_epochs_are_permutations_and_hosts_split_the_global_batch(cfg):
    # The i-th element of the stream is image index_shuffle(i % N) of epoch i // N: with
    # augmentation aside, one epoch of 10 images visits each exactly once.
    n = 10
    table = pipeline.InputPipeline(cfg).source("train")
    ds = pipeline._table_train_examples(table, b=B, seed=1, start_step=0, process_index=0,
                                        process_count=1)
    seeds, picked = [], []
    for ex in ds.take(2 * n):
        seeds.append(int(ex["seed"].numpy()[1]))
        hits = [i for i in range(n) if np.array_equal(table.images[i], ex["image"].numpy())]
        picked += hits
    assert seeds == list(range(2 * n))  # augmentation seed (seed, element index)
    assert sorted(picked[:n]) == sorted(picked[n:]) == list(range(n))
    assert picked[:n] != picked[n:]  # reshuffled each epoch
    # Two hosts with per-host batch 2 (and four with batch 1) see exactly the global batch of
    # one host with batch 4, in process order.
    one = _take(_train(cfg, batch_size=4), 3)
    for hosts in (2, 4):
        parts = [_take(_train(cfg, batch_size=4 // hosts, process_index=i, process_count=hosts), 3)
                 for i in range(hosts)]
        for step, g in enumerate(one):
            for k in g:
                np.testing.assert_array_equal(
                    g[k], np.concatenate([p[step][k] for p in parts]), err_msg=f"{hosts} {k}")


def test_device_mode_ships_canvases_original_sizes_and_global_indices(cfg):
    """augment_on_device: the host only puts each image on its canvas; each batch holds the
    images the host mode would augment at that step (same order), their sizes, unaugmented padded
    boxes and the global example index the device folds into its key; 2 hosts split it as 1."""
    dev = dataset_config(**{**dict(cfg), "augment_on_device": True, "canvas_size": 64})
    table = pipeline.InputPipeline(cfg).source("train")
    ds = pipeline._table_train_examples(table, b=B, seed=1, start_step=0, process_index=0,
                                        process_count=1)
    order = [next(i for i in range(10) if np.array_equal(table.images[i], ex["image"].numpy()))
             for ex in ds.take(3 * B)]
    batches = _take(_train(dev), 3)
    for step, batch in enumerate(batches):
        assert set(batch) == {"image", "image_size", "boxes", "labels", "index"}
        assert batch["image"].shape == (B, 64, 64, 3) and batch["image"].dtype == np.uint8
        np.testing.assert_array_equal(batch["image_size"], np.full((B, 2), 48))
        np.testing.assert_array_equal(batch["index"], np.arange(step * B, (step + 1) * B))
        assert batch["index"].dtype == np.uint32
        for j in range(B):
            i = order[step * B + j]
            lo, hi = table.row_splits[i], table.row_splits[i + 1]
            n = min(hi - lo, M)
            np.testing.assert_array_equal(batch["boxes"][j, :n], table.boxes[lo:lo + n])
            np.testing.assert_array_equal(batch["labels"][j, :n], table.labels[lo:lo + n])
            assert (batch["labels"][j, n:] == 0).all()
            np.testing.assert_array_equal(batch["image"][j, :48, :48], table.images[i])
            assert (batch["image"][j, 48:] == 0).all() and (batch["image"][j, :, 48:] == 0).all()
    h0 = _take(_train(dev, batch_size=2, process_index=0, process_count=2), 3)
    h1 = _take(_train(dev, batch_size=2, process_index=1, process_count=2), 3)
    for g, a, b in zip(batches, h0, h1, strict=True):
        for k in g:
            np.testing.assert_array_equal(g[k], np.concatenate([a[k], b[k]]), err_msg=k)


def test_truncation_is_counted(cfg):
    data = pipeline.InputPipeline(cfg)
    it = data.train_iterator(image_size=S, batch_size=B, max_boxes=1, seed=1)
    _take(it, 2)
    assert it.stats["boxes_truncated"] > 0
    assert data.stats["boxes_truncated"] == it.stats["boxes_truncated"]
    assert f"boxes_truncated {it.stats['boxes_truncated']}" in data.summary()
    # a second pipeline of the same config counts on its own (no process-wide counters)
    other = pipeline.InputPipeline(cfg)
    assert other.stats["boxes_truncated"] == 0


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_every_image_once(cfg, process_count):
    info = pipeline.get_dataset_info(cfg)
    seen, lengths = [], set()
    for p in range(process_count):
        ev = pipeline.create_eval_iterator(cfg, image_size=S, batch_size=3, max_boxes=M,
                                           process_index=p, process_count=process_count)
        batches = list(ev)
        lengths.add(len(batches))
        assert len(batches) == len(ev)
        for b in batches:
            assert b["image"].shape == (3, S, S, 3)
            assert b["image_size"].dtype == np.int32 and b["image_id"].dtype == np.int64
            assert b["difficult"].shape == b["iscrowd"].shape == (3, M)
            assert (b["image_size"][b["mask"]] == 48).all()
            assert (b["labels"][~b["mask"]] == 0).all()
            seen += list(b["image_id"][b["mask"]])
        # the padding is at the end: the last batch is the only one with masked entries
        masks = np.concatenate([b["mask"] for b in batches])
        assert not (masks[1:] & ~masks[:-1]).any()
    assert len(lengths) == 1  # every host runs the same number of batches
    assert sorted(seen) == sorted(set(seen)) and len(seen) == info.num_eval == 7


def test_eval_is_reiterable(cfg):
    ev = pipeline.create_eval_iterator(cfg, image_size=S, batch_size=4, max_boxes=M)
    a, b = list(ev), list(ev)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        _assert_same(x, y)


def test_eval_boxes_are_unchanged_by_resize(cfg):
    from ssd_jax.data import sources

    table = sources.load_source(cfg, "eval")
    ev = pipeline.create_eval_iterator(cfg, image_size=S, batch_size=7, max_boxes=8)
    batch = next(iter(ev))
    n = table.row_splits[1]
    np.testing.assert_array_equal(batch["boxes"][0, :n], table.boxes[:n])
    np.testing.assert_array_equal(batch["labels"][0, :n], table.labels[:n])


def test_held_out_test_split_has_its_own_seed_and_ids():
    fields = dict(kind="synthetic", seed=0, num_train=10, num_eval=7, image_size=48, num_test=5,
                  test_seed=3)
    cfg = dataset_config(**fields)
    data = pipeline.InputPipeline(cfg)
    assert data.has_test_split
    ids = []
    for batch in data.eval_iterator(image_size=48, batch_size=4, max_boxes=8, split="test"):
        ids += [int(i) for i, m in zip(batch["image_id"], batch["mask"]) if m]
    assert ids == [200_000_000 + i for i in range(5)]
    test = sources.load_source(cfg, "test")
    other = sources.load_source(dataset_config(**{**fields, "test_seed": 4}), "test")
    assert not np.array_equal(test.images, other.images)  # the test seed decides the images
    assert np.array_equal(sources.load_source(dataset_config(**{**fields, "seed": 9}), "test").images,
                          test.images)  # and the dataset seed does not


def test_only_synthetic_data_has_a_test_split():
    cfg = dataset_config(kind="coco_json", train_annotations="a.json", train_images=".",
                         eval_annotations="b.json", eval_images=".")
    assert not sources.has_test_split(cfg)
    with pytest.raises(ConfigError, match="only kind=synthetic"):
        sources.load_source(cfg, "test")
    assert not sources.has_test_split(dataset_config(kind="synthetic", num_test=0))


def test_synthetic_info_comes_from_the_config_without_generating(cfg, monkeypatch):
    # training compiles its steps between info() and the first read of the images
    tables = {split: sources.synthetic_table(cfg, split) for split in ("train", "eval")}

    def refuse(cfg, split):
        raise AssertionError(f"info() generated the {split} split")

    monkeypatch.setattr(sources, "synthetic_table", refuse)
    info = pipeline.InputPipeline(cfg).info()
    assert info.class_names == tables["train"].class_names
    assert info.category_ids == tuple(tables["train"].category_ids)
    assert info.num_classes == len(tables["train"].class_names) + 1
    assert (info.num_train, info.num_eval) == (len(tables["train"]), len(tables["eval"])) == (10, 7)


def test_a_too_small_canvas_is_a_config_error(cfg):
    bad = dataset_config(**{**dict(cfg), "augment_on_device": True, "canvas_size": 8})
    with pytest.raises(ConfigError, match="config.dataset.canvas_size must be >= 32"):
        pipeline.InputPipeline(bad)
    pipeline.InputPipeline(dataset_config(**{**dict(cfg), "canvas_size": 8}))  # unused: fine


def test_flip_only_training_keeps_the_synthetic_table_at_the_models_size(cfg):
    """With no zoom-out and no crop, the training table is held at the model's side (resized once,
    as evaluation resizes): the same batches up to the rounding of that resize (|diff| <= 2 of 255,
    the photometric steps scale it), at (32/48)^2 of the memory. With a crop it stays full size."""
    from ssd_jax import image as image_lib
    from ssd_jax.data import synthetic

    small = pipeline.InputPipeline(cfg)
    small.start_loading(train_image_size=S)
    table = small.source("train")
    assert table.images.shape == (10, S, S, 3)
    ex = synthetic.generate_example(0, "train", 3, 48)
    np.testing.assert_array_equal(table.images[3], image_lib.resize(ex["image"], S))
    full = pipeline.InputPipeline(cfg)
    a = _take(small.train_iterator(image_size=S, batch_size=B, max_boxes=M, seed=1), 3)
    b = _take(full.train_iterator(image_size=S, batch_size=B, max_boxes=M, seed=1), 3)
    assert full.source("train").images.shape == (10, 48, 48, 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["boxes"], y["boxes"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
        diff = np.abs(x["image"].astype(int) - y["image"].astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())
    crop = dataset_config(**{**dict(cfg), "augment_crop": True})
    cropped = pipeline.InputPipeline(crop)
    cropped.start_loading(train_image_size=S)
    assert cropped.source("train").images.shape == (10, 48, 48, 3)


def test_in_memory_images_take_the_file_path_s_examples_and_seeds(tmp_path):
    """In-memory tables (synthetic) load each example with a plain map, files through the
    interleave that falls back past undecodable images: the same training stream of (image,
    boxes, seed) across epochs, and the same evaluation batches, for the same images (PNG:
    lossless)."""
    from PIL import Image

    n, side = 5, 16
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im).save(paths[-1])
    counts = np.array([1, 2, 0, 3, 1])
    total = int(counts.sum())
    common = dict(class_names=("a", "b"), image_id=np.arange(n, dtype=np.int64),
                  row_splits=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                  boxes=rng.uniform(0, 1, (total, 4)).astype(np.float32),
                  labels=rng.integers(1, 3, total).astype(np.int32),
                  difficult=np.zeros(total, bool), iscrowd=np.zeros(total, bool))
    memory = sources.Table(**common, images=images)
    files = sources.Table(**common, paths=np.array(paths))
    streams, evals = [], []
    for table in (memory, files):
        ds = pipeline._table_train_examples(table, 3, seed=7, start_step=1, process_index=1,
                                            process_count=2)
        streams.append(list(ds.take(12).as_numpy_iterator()))  # 2.4 epochs of this host

        class Owner:  # the InputPipeline parts the eval iterator uses
            cfg = None

            def __init__(self, table):
                self.table = table

            def source(self, split):
                return self.table

            def count(self, counts, split):
                pass

        evals.append(list(pipeline._make_eval_iterator(
            Owner(table), image_size=12, batch_size=2, max_boxes=4, process_index=0,
            process_count=1)))  # 3 batches, the last one padded
    assert len(evals[0]) == 3
    for a, b in [*zip(*streams, strict=True), *zip(*evals, strict=True)]:
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("cores, autotuned", [(2, False), (16, False), (64, True)])
def test_autotuning_is_off_up_to_16_cores(cfg, monkeypatch, cores, autotuned):
    """tf.data's autotuning model thread made an iterator's destructor wait up to 60 s (the end
    of a training run): off where AUTOTUNE's fallback parallelism, min(16, cores), is all cores."""
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    data = pipeline.InputPipeline(cfg)
    ds = data.train_dataset(image_size=S, batch_size=B, max_boxes=M, seed=1, start_step=0,
                            process_index=0, process_count=1)
    enabled = ds.options().autotune.enabled
    assert (enabled is None or enabled) == autotuned
    eval_it = data.eval_iterator(image_size=S, batch_size=B, max_boxes=M)
    assert (eval_it.dataset.options().autotune.enabled in (None, True)) == autotuned
