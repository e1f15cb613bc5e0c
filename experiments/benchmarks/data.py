"""Suite `data`: training input pipeline images/sec, ssd_jax (tf.data) vs torchvision v2.

Both decode the same JPEG files (~500x375, written to a temp dir) and apply the SSD training
augmentation (photometric distortion, zoom-out with the mean fill, min-IoU crop, flip, resize to
300); torchvision runs its detection-reference preset in a DataLoader with 2 workers. Needs
TensorFlow; the peer needs torch + torchvision.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from typing import Any

import numpy as np
from absl import flags

from experiments.benchmarks.common import Row

for _needed in ("tensorflow", "ml_collections"):  # absent on a bare accelerator host
    if importlib.util.find_spec(_needed) is None:
        raise ImportError(f"the data suite needs {_needed}, which is not installed")


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("data_images", 200, "data suite: JPEGs written (--quick: 40).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("data_workers", 2, "data suite: DataLoader workers of the peer.",
                         lower_bound=1, flag_values=fv)


def _write_voc_like(root: str, n: int) -> tuple[str, str]:
    """n random-texture JPEGs (500x375 or 375x500) with 1-4 boxes, as a COCO-json folder."""
    import json

    from PIL import Image

    rng = np.random.default_rng(0)
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        w, h = (500, 375) if i % 3 else (375, 500)
        small = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
        arr = np.clip(arr.astype(int) + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(img_dir, f"{i:05d}.jpg"), quality=90)
        images.append({"id": i, "file_name": f"{i:05d}.jpg", "width": w, "height": h})
        for k in range(int(rng.integers(1, 5))):
            bw, bh = rng.uniform(0.1, 0.6) * w, rng.uniform(0.1, 0.6) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append({"id": 10 * i + k, "image_id": i, "category_id": int(rng.integers(1, 21)),
                         "bbox": [x, y, bw, bh], "iscrowd": 0})
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, 21)]
    ann = os.path.join(root, "ann.json")
    with open(ann, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return ann, img_dir


def _ours(ann: str, img_dir: str, batch: int, seconds: float, on_device: bool = False) -> float:
    """Images/sec of the training iterator: the full tf.data augmentation to 300 px, or with
    on_device the device mode's host side (decode + resize to the 512 px canvas)."""
    from experiments.configs import default
    from ssd_jax.data import pipeline

    cfg = default.get_config().dataset
    cfg.update(dict(kind="coco_json", train_annotations=ann, train_images=img_dir,
                    augment_expand=True, augment_crop=True, augment_on_device=on_device,
                    canvas_size=512))
    it = pipeline.InputPipeline(cfg, splits=("train",)).train_iterator(
        image_size=300, batch_size=batch, max_boxes=50, seed=0)
    for _ in range(3):
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(next(it)["image"])
    return n / (time.perf_counter() - start)


class _TorchSet:
    def __init__(self, ann: str, img_dir: str):
        import json

        from torchvision.transforms import v2

        with open(ann) as f:
            coco = json.load(f)
        self.img_dir = img_dir
        self.images = coco["images"]
        self.anns: dict[int, list] = {}
        for a in coco["annotations"]:
            self.anns.setdefault(a["image_id"], []).append(a)
        mean = [123, 117, 104]
        self.transform = v2.Compose([
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomZoomOut(fill={"others": 0, **{k: mean for k in _tv_image_types()}}),
            v2.RandomIoUCrop(),
            v2.RandomHorizontalFlip(p=0.5),
            v2.Resize((300, 300)),
            v2.SanitizeBoundingBoxes(),
            v2.ToDtype({"others": None, **{k: None for k in _tv_image_types()}}),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        import torch
        from PIL import Image
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        info = self.images[i]
        image = F.pil_to_tensor(Image.open(os.path.join(self.img_dir, info["file_name"]))
                                .convert("RGB"))
        anns = self.anns.get(info["id"], [])
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(xywh, format="XYWH",
                                         canvas_size=(info["height"], info["width"]))
        boxes = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
        target = {"boxes": boxes,
                  "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)}
        return self.transform(tv_tensors.Image(image), target)


def _tv_image_types():
    from torchvision import tv_tensors

    return (tv_tensors.Image, tv_tensors.Video)


def _collate(batch):
    import torch

    return torch.stack([im for im, _ in batch]), [t for _, t in batch]


def _peer(ann: str, img_dir: str, batch: int, seconds: float, workers: int) -> float:
    import torch

    torch.set_num_threads(1)
    ds = _TorchSet(ann, img_dir)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=_collate, drop_last=True,
                                         persistent_workers=True)
    n, start, warm = 0, None, 0
    while start is None or time.perf_counter() - start < seconds:
        for images, _ in loader:
            if warm < 3:
                warm += 1
                if warm == 3:
                    start = time.perf_counter()
                continue
            n += len(images)
            if time.perf_counter() - start >= seconds:
                break
    return n / (time.perf_counter() - start)


def run(args: Any) -> list[Row]:
    """Images/sec of the training pipeline, ours vs torchvision's SSD preset."""
    n = 40 if args.quick else int(getattr(args, "data_images", 200))
    seconds = 3.0 if args.quick else 15.0
    batch = 16
    workers = int(getattr(args, "data_workers", 2))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as root:
        ann, img_dir = _write_voc_like(root, n)
        ours = _ours(ann, img_dir, batch, seconds)
        canvas = _ours(ann, img_dir, batch, seconds, on_device=True)
        peer = None
        if getattr(args, "peer", True):
            # A fresh (spawned) process: forking DataLoader workers from a process that runs
            # TensorFlow threads crashes; the peer gets a clean interpreter, as it would alone.
            import concurrent.futures
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
                peer = ex.submit(_peer, ann, img_dir, batch, seconds, workers).result()
    note = f"{n} JPEGs ~500x375, batch {batch}, {cores} cores; peer: DataLoader {workers} workers"
    return [Row("data: train pipeline (decode + SSD augment -> 300)", ours, peer, "img/s", note),
            Row("data: device mode's host side (decode + 512 canvas)", canvas, None, "img/s",
                f"{canvas / ours:.1f}x the host augmentation above; the step augments")]
