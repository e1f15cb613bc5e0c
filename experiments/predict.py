"""Run a trained SSD on image files: one PNG with the detections drawn per image, plus COCO results.

    python -m experiments.predict --workdir=RUN_DIR --images=photos/,extra.jpg --out=OUT_DIR
    python -m experiments.predict --torchvision_checkpoint=ssd300_vgg16_coco-b556d3b4.pth \
        --images=photos/ --out=OUT_DIR --min_score=0.4

The model comes from a training workdir (`run_info.json` + `checkpoints/`, latest step or --step)
or from a torchvision ssd300_vgg16 state dict converted on the fly (COCO's 91 torchvision class
ids and names). Images (files and/or folders, comma separated or the flag repeated) are read and
resized to the model input on the host with Pillow, run through one jitted model + `detect` in
batches of a fixed size (the last batch is padded), and the normalized boxes are mapped back to
each image's original size.

Written to --out:
  <name>.png        the image at its original size with boxes, class names and scores >= --min_score
  detections.json   COCO results: [{"image_id", "file_name", "category_id", "category_name",
                    "bbox": [x, y, w, h] pixels, "score"}] for every detection (no --min_score cut)
  skipped.json      only when some image could not be read: [{"file", "error"}]

An unreadable image is skipped and reported at the end; it never stops the run. TensorFlow is not
imported. EXIF orientation is ignored (as the training pipeline's decoder does).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFont

FLAGS = flags.FLAGS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

#: torchvision's COCO category names by label id (91 entries: background, 80 classes, "N/A" gaps).
COCO_CATEGORIES_91: tuple[str, ...] = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A",
    "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet",
    "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

#: torchvision's SSD300 post-processing (also the paper's).
TORCHVISION_DETECT = {"score_threshold": 0.01, "pre_nms_top_k": 400, "iou_threshold": 0.45,
                      "max_detections": 200}


class CheckpointMismatchError(ValueError):
    """The checkpoint's variables do not fit the model its config describes (names the leaf)."""


@dataclasses.dataclass
class Predictor:
    """A model ready for inference: variables, jitted images -> Detections, names and settings.

    Attributes:
      model: the SSD (its `prior_spec.image_size` is the input side).
      variables: {"params": ..., ["batch_stats": ...]} on the device.
      class_names: names of labels 1..C-1 (label i -> class_names[i - 1]).
      detect_kwargs: arguments of `postprocess.detect` (thresholds, top-k, max detections).
      fn: jitted (variables, uint8 images [B,S,S,3]) -> `postprocess.Detections`.
    """

    model: Any
    variables: Any
    class_names: tuple[str, ...]
    detect_kwargs: dict[str, Any]
    fn: Callable[..., Any]

    @property
    def image_size(self) -> int:
        return int(self.model.prior_spec.image_size)

    def __call__(self, images: np.ndarray) -> Any:
        """Detections (device arrays, dispatched asynchronously) of uint8 images [B,S,S,3]."""
        return self.fn(self.variables, images)


def make_detect_fn(model: Any, detect_kwargs: dict[str, Any]) -> Callable[..., Any]:
    """jit(variables, images) -> postprocess.Detections: the network, then decode + NMS."""
    import jax

    from ssd_jax import postprocess, priors

    prior_boxes = priors.generate_priors(model.prior_spec)

    @jax.jit
    def fn(variables, images):
        cls_logits, box_preds = model.apply(variables, images, train=False)
        return postprocess.detect(cls_logits, box_preds, prior_boxes, **detect_kwargs)

    return fn


def check_variables_fit(model: Any, variables: Any, what: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError naming the first leaf whose presence or shape differs from
    what `model` expects (e.g. a checkpoint trained with another num_classes or model)."""
    import jax
    import jax.numpy as jnp

    size = model.prior_spec.image_size
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8)))
    exp = {jax.tree_util.keystr(k): tuple(v.shape)
           for k, v in jax.tree_util.tree_leaves_with_path(dict(expected))}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v))
           for k, v in jax.tree_util.tree_leaves_with_path(dict(variables))}
    desc = (f"the model {getattr(model, 'arch', '?')!r} with num_classes={model.num_classes} "
            f"at {size} px")
    hint = ""
    heads = [k for k in got if "cls_head_0" in k and k.endswith("['bias']")]
    if heads:
        per_loc = model.prior_spec.boxes_per_location[0]
        n = got[heads[0]][0]
        if n % per_loc == 0 and n // per_loc != model.num_classes:
            hint = f" (the {what} has a class head for num_classes={n // per_loc})"
    for key, shape in exp.items():
        if key not in got:
            raise CheckpointMismatchError(f"the {what} does not fit {desc}: it has no {key} "
                                          f"(expected shape {shape}){hint}")
        if got[key] != shape:
            raise CheckpointMismatchError(
                f"the {what} does not fit {desc}: {key} has shape {got[key]} in the {what} but "
                f"the model expects {shape}{hint}")
    extra = sorted(set(got) - set(exp))
    if extra:
        raise CheckpointMismatchError(f"the {what} does not fit {desc}: it has {len(extra)} "
                                      f"leaves the model lacks, e.g. {extra[0]}{hint}")


def load_workdir(workdir: str, step: int | None = None) -> tuple[Any, Any, Any, tuple[str, ...]]:
    """(model, variables, config, class_names) of a training workdir's checkpoint."""
    from ssd_jax import train_lib  # imports no TensorFlow

    return train_lib.load_for_inference(workdir, step)


def load_predictor(workdir: str | None = None, torchvision_checkpoint: str | None = None,
                   step: int | None = None, dtype: str | None = None) -> Predictor:
    """A Predictor from a training workdir or a torchvision ssd300_vgg16 state dict (exactly one).

    Raises CheckpointMismatchError when the checkpoint does not fit the model of its config,
    FileNotFoundError for a missing workdir/file, ValueError for a bad state dict.
    """
    import jax
    import jax.numpy as jnp

    if (workdir is None) == (torchvision_checkpoint is None):
        raise ValueError("give exactly one of workdir and torchvision_checkpoint")
    if workdir is not None:
        model, variables, config, class_names = load_workdir(workdir, step)
        if dtype is not None:
            model = model.clone(dtype=jnp.dtype(dtype))
        if len(class_names) != model.num_classes - 1:
            raise CheckpointMismatchError(
                f"run_info.json of {workdir} names {len(class_names)} classes but num_classes="
                f"{model.num_classes} (expected num_classes - 1 names, background excluded)")
        check_variables_fit(model, variables, what=f"checkpoint in {workdir}")
        detect_kwargs = {k: config.detect[k] for k in ("score_threshold", "pre_nms_top_k",
                                                      "iou_threshold", "max_detections")}
    else:
        from ssd_jax import convert

        if not os.path.exists(torchvision_checkpoint):
            raise FileNotFoundError(f"torchvision checkpoint {torchvision_checkpoint!r} not found")
        state_dict = convert.load_state_dict(torchvision_checkpoint)
        try:
            model, variables = convert.from_torchvision_ssd(
                state_dict, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        except convert.StateDictError as e:
            raise CheckpointMismatchError(
                f"{torchvision_checkpoint} is not a torchvision ssd300_vgg16 state dict: {e}") from e
        n = model.num_classes
        class_names = (COCO_CATEGORIES_91[1:] if n == len(COCO_CATEGORIES_91)
                       else tuple(f"class_{i}" for i in range(1, n)))
        detect_kwargs = dict(TORCHVISION_DETECT)
    variables = jax.device_put(variables)
    return Predictor(model, variables, tuple(class_names), detect_kwargs,
                     make_detect_fn(model, detect_kwargs))


# ----------------------------------------------------------------------------- files and images


def list_images(specs: Iterable[str]) -> list[str]:
    """Files named in `specs` (each comma separated) and the image files of named folders
    (sorted, not recursive). Named files are taken whatever their extension; a path that does
    not exist raises FileNotFoundError."""
    out: list[str] = []
    for spec in specs:
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if os.path.isdir(part):
                out += [os.path.join(part, f) for f in sorted(os.listdir(part))
                        if f.lower().endswith(IMAGE_EXTENSIONS)
                        and os.path.isfile(os.path.join(part, f))]
            elif os.path.exists(part):
                out.append(part)
            else:
                raise FileNotFoundError(f"--images: {part!r} does not exist")
    return out


def read_image(path: str) -> np.ndarray:
    """uint8 [H,W,3] RGB of an image file (grayscale/alpha/palette converted); raises on bad data."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


def resize_for_model(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H,W,3] -> uint8 [size,size,3], bilinear (Pillow); an image of the right size is kept."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _load(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]] | str:
    """(resized image, original (height, width)) or the error message of an unreadable file."""
    try:
        image = read_image(path)
        return resize_for_model(image, size), image.shape[:2]
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
        return f"{type(e).__name__}: {e}"


def image_ids(paths: Sequence[str]) -> list[int]:
    """COCO image ids: the file stems when they are all distinct integers (e.g. COCO's
    000000397133.jpg -> 397133), otherwise 1..N in order."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if stems and all(re.fullmatch(r"\d+", s) for s in stems) and len({int(s) for s in stems}) == len(
            stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


def _output_names(paths: Sequence[str]) -> list[str]:
    """Distinct PNG names <stem>.png (a repeated stem gets _2, _3, ...)."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")
    return names


# ----------------------------------------------------------------------------- drawing

_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
            (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0), (170, 255, 195))


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    class_names: Sequence[str]) -> Image.Image:
    """The image with pixel corner boxes [N,4], 'name score' captions; colors by class."""
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    h, w = image.shape[:2]
    width = max(1, round(max(h, w) / 300))
    try:
        font = ImageFont.load_default(size=max(10, round(max(h, w) / 40)))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for box, label, score in zip(boxes, labels, scores):
        color = _PALETTE[int(label) % len(_PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
        name = class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(label)
        text = f"{name} {float(score):.2f}"
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y0 - th - 4 if y0 - th - 4 >= 0 else min(y1 + 1, h - th - 4)
        draw.rectangle((x0, ty, x0 + tw + 4, ty + th + 4), fill=color)
        draw.text((x0 + 2, ty + 2 - tb[1]), text, fill=(0, 0, 0) if sum(color) > 400 else
                  (255, 255, 255), font=font)
    return pil


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class PredictResult:
    """What `predict` did: COCO results, PNGs written and files skipped (file, error)."""

    results: list[dict[str, Any]]
    pngs: list[str]
    skipped: list[tuple[str, str]]


def _chunks(items: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def predict(predictor: Predictor, paths: Sequence[str], out_dir: str, *, batch_size: int = 8,
            min_score: float = 0.3, progress: bool = True) -> PredictResult:
    """Detect objects in `paths`; write PNGs and detections.json (and skipped.json) to `out_dir`.

    Images are decoded and resized by a thread pool while the device runs the previous batch.
    """
    import jax
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    size, b = predictor.image_size, int(batch_size)
    if b <= 0:
        raise ValueError(f"batch_size must be positive, got {b}")
    ids = image_ids(paths)
    names = _output_names(paths)
    order = list(range(len(paths)))
    results: list[dict[str, Any]] = []
    pngs: list[str] = []
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(paths), unit="img", desc="predict", disable=not progress, file=sys.stderr)

    def finish(batch_idx: Sequence[int], ok: Sequence[int], sizes: dict[int, tuple[int, int]],
               dets: Any) -> list[concurrent.futures.Future]:
        boxes, scores, classes, num = jax.device_get(tuple(dets))
        futures = []
        for row, i in enumerate(ok):
            h, w = sizes[i]
            n = int(num[row])
            px = boxes[row, :n].astype(np.float64) * np.array([w, h, w, h])
            for box, score, label in zip(px, scores[row, :n], classes[row, :n]):
                label = int(label)
                results.append({
                    "image_id": ids[i], "file_name": os.path.basename(paths[i]),
                    "category_id": label, "category_name": _name(predictor.class_names, label),
                    "bbox": [round(float(box[0]), 2), round(float(box[1]), 2),
                             round(float(box[2] - box[0]), 2), round(float(box[3] - box[1]), 2)],
                    "score": round(float(score), 5)})
            keep = scores[row, :n] >= min_score
            futures.append(pool.submit(_draw_and_save, paths[i], os.path.join(out_dir, names[i]),
                                       px[keep], classes[row, :n][keep], scores[row, :n][keep],
                                       predictor.class_names))
        bar.update(len(batch_idx))
        return futures

    pending = None
    drawing: list[tuple[int, concurrent.futures.Future]] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        loaders = [pool.submit(_load, paths[i], size) for i in order[:b]]
        for start in range(0, len(order), b):
            batch_idx = order[start:start + b]
            loaded = [f.result() for f in loaders]
            nxt = order[start + b:start + 2 * b]
            loaders = [pool.submit(_load, paths[i], size) for i in nxt]  # overlap with the device
            images = np.zeros((b, size, size, 3), np.uint8)  # padded to the fixed batch
            ok, sizes = [], {}
            for i, item in zip(batch_idx, loaded):
                if isinstance(item, str):
                    skipped.append((paths[i], item))
                    continue
                images[len(ok)] = item[0]
                sizes[i] = item[1]
                ok.append(i)
            dets = predictor(images) if ok else None  # dispatched asynchronously
            if pending is not None:
                drawing += [(j, f) for j, f in zip(pending[1], finish(*pending))]
            pending = (batch_idx, ok, sizes, dets) if ok else None
            if not ok:
                bar.update(len(batch_idx))
        if pending is not None:
            drawing += [(j, f) for j, f in zip(pending[1], finish(*pending))]
        for i, fut in drawing:
            err = fut.result()
            if err is None:
                pngs.append(os.path.join(out_dir, names[i]))
            else:
                skipped.append((paths[i], err))
    bar.close()

    with open(os.path.join(out_dir, "detections.json"), "w") as f:
        json.dump(results, f)
    skipped_path = os.path.join(out_dir, "skipped.json")
    if skipped:
        with open(skipped_path, "w") as f:
            json.dump([{"file": p, "error": e} for p, e in skipped], f, indent=1)
    elif os.path.exists(skipped_path):
        os.remove(skipped_path)
    return PredictResult(results, pngs, skipped)


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label - 1] if 0 < label <= len(class_names) else str(label)


def _draw_and_save(path: str, out: str, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                   class_names: Sequence[str]) -> str | None:
    try:
        draw_detections(read_image(path), boxes, labels, scores, class_names).save(out)
        return None
    except Exception as e:  # noqa: BLE001 - the file changed or vanished since it was read
        return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- main


def define_flags() -> None:
    """The command line's absl flags (defined only when run as a program, so that importing this
    module next to other experiments' mains never clashes on flag names like --workdir)."""
    flags.DEFINE_string("workdir", None, "Training workdir (run_info.json + checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
    flags.DEFINE_string("torchvision_checkpoint", None,
                        "A torchvision ssd300_vgg16 state dict (.pth/.pt/.safetensors), converted on the "
                        "fly (instead of --workdir).")
    flags.DEFINE_multi_string("images", None, "Image files and/or folders; comma separated or repeated.")
    flags.DEFINE_string("out", None, "Output folder for the PNGs and detections.json.")
    flags.DEFINE_integer("batch_size", 8, "Images per jitted call (fixed; the last batch is padded).")
    flags.DEFINE_float("min_score", 0.3, "Smallest score drawn on the PNGs (the JSON keeps all).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                      "Compute dtype (default: the run's config.dtype; float32 for torchvision).")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.workdir is None) == (FLAGS.torchvision_checkpoint is None):
        raise app.UsageError("give exactly one of --workdir and --torchvision_checkpoint")
    if not FLAGS.images or not FLAGS.out:
        raise app.UsageError("--images and --out are required")
    paths = list_images(FLAGS.images)
    if not paths:
        raise app.UsageError(f"no image files found in --images={','.join(FLAGS.images)}")
    try:
        predictor = load_predictor(FLAGS.workdir, FLAGS.torchvision_checkpoint, FLAGS.step,
                                   FLAGS.dtype)
    except (CheckpointMismatchError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    res = predict(predictor, paths, FLAGS.out, batch_size=FLAGS.batch_size,
                  min_score=FLAGS.min_score)
    n_img = len(paths) - len(res.skipped)
    print(f"{len(res.results)} detections in {n_img} images -> "
          f"{os.path.join(FLAGS.out, 'detections.json')}; {len(res.pngs)} PNGs in {FLAGS.out}")
    if res.skipped:
        print(f"skipped {len(res.skipped)} unreadable image(s) (listed in "
              f"{os.path.join(FLAGS.out, 'skipped.json')}):")
        for p, e in res.skipped:
            print(f"  {p}: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
