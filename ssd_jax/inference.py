"""Inference with a trained SSD: load a run, check its checkpoint, predict and evaluate.

    run = load_run(workdir)                      # run_info.json + checkpoint (latest or step)
    predictor = Predictor.from_run(run)          # or Predictor.from_torchvision("ssd300.pth")
    dets = predictor.predict([image_a, image_b]) # uint8 [H,W,3] (or gray, RGBA) of any size
    dets[0].boxes                                # [N,4] pixel corners in image_a; .scores, .labels,
                                                 # .category_ids (the training data's own ids)
    result = predict_files(predictor, paths, out_dir)      # PNGs + COCO results JSON
    report = evaluate_run(run)                   # the training loop's evaluator on a checkpoint

Every image goes through `ssd_jax.image.resize`, the function the evaluation pipeline uses, so a
file predicted here and the same file evaluated by `evaluate_run` give the same detections. This
module imports no TensorFlow (`evaluate_run` does, when called: it reads the eval data).

Ids. A run keeps the training data's category ids (`run_info.json` "category_ids": a COCO-JSON
file's own ids, COCO's ids for TFDS coco, else the labels 1..K); results are written in those ids,
and with an annotation file, in its image ids. torchvision's COCO SSD300 predicts COCO's ids.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ssd_jax import image as image_lib
from ssd_jax.errors import CheckpointMismatchError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

#: torchvision's SSD300 post-processing (also the paper's).
TORCHVISION_DETECT = {"score_threshold": 0.01, "pre_nms_top_k": 400, "iou_threshold": 0.45,
                      "max_detections": 200}
#: torchvision's post-processing of each detector it ships (ssd_jax.convert.TORCHVISION_DETECTORS).
TORCHVISION_DETECT_OF = {
    "ssd300_vgg16": TORCHVISION_DETECT,
    "ssdlite320_mobilenet_v3": {"score_threshold": 0.001, "pre_nms_top_k": 300,
                                "iou_threshold": 0.55, "max_detections": 300},
}
DETECT_FIELDS = ("score_threshold", "pre_nms_top_k", "iou_threshold", "max_detections")


# ----------------------------------------------------------------------------- a training run


@dataclasses.dataclass
class Run:
    """What a training workdir holds, ready for inference.

    Attributes:
      model: the SSD of the run's config (no BatchNorm axis: plain inference).
      variables: {"params": ..., ["batch_stats": ...]} as arrays on this host's first device.
      config: the run's ConfigDict (from run_info.json).
      class_names: names of labels 1..C-1.
      category_ids: the dataset's id of label i at [i-1].
      step: the checkpoint's step.
      workdir: the folder.
    """

    model: Any
    variables: dict[str, Any]
    config: Any
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    step: int
    workdir: str


def load_run(workdir: str, step: int | None = None) -> Run:
    """The run in `workdir` at its latest checkpoint (or `step`), checked to fit its model.

    Raises UserError naming what is missing (not a workdir, no checkpoint, no such step) and
    CheckpointMismatchError when the checkpoint does not fit the model of run_info.json.
    """
    import ml_collections

    from ssd_jax import models
    from ssd_jax import workdir as workdir_lib

    info = workdir_lib.require_run_info(workdir)
    config = ml_collections.ConfigDict(info["config"])
    num_classes = int(info["num_classes"])
    model = models.from_config(config, num_classes)
    steps = workdir_lib.checkpoint_steps(workdir)
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise UserError(f"step={step}: no checkpoint of that step in "
                        f"{workdir_lib.checkpoint_dir(workdir)}; steps there: {steps}",
                        parameter="step")
    with workdir_lib.keep_root_handlers(), \
            workdir_lib.checkpoint_manager(workdir, create=False) as manager:
        restored = workdir_lib.restore_on_this_host(manager, step)
    variables = {"params": restored["params"]}
    if restored.get("batch_stats"):
        variables["batch_stats"] = restored["batch_stats"]
    class_names = tuple(info["class_names"])
    if len(class_names) != num_classes - 1:
        raise CheckpointMismatchError(
            f"run_info.json of {workdir} names {len(class_names)} classes but num_classes="
            f"{num_classes} (expected num_classes - 1 names, background excluded)")
    category_ids = tuple(int(c) for c in info.get("category_ids") or range(1, num_classes))
    check_variables_fit(model, variables, what=f"checkpoint of step {step} in {workdir}")
    return Run(model, variables, config, class_names, category_ids, int(step),
               os.path.abspath(workdir))


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
    backbone = type(getattr(model, "backbone", None)).__name__
    desc = f"the SSD with backbone {backbone}, num_classes={model.num_classes}, at {size} px"
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


# ----------------------------------------------------------------------------- the predictor


def detect_images(model: Any, variables: dict[str, Any], images: Any, prior_boxes: Any,
                  **detect_kwargs: Any) -> Any:
    """The network, decode and NMS on a batch: images uint8 [B,S,S,3] -> `postprocess.Detections`
    (fixed size). The one definition the Predictor, the evaluation step (inside shard_map) and
    the exports run; not jitted (call it inside jit). variables: {"params", ["batch_stats"]}
    (an empty batch_stats is left out); detect_kwargs: `postprocess.detect`'s settings."""
    from ssd_jax import postprocess

    variables = {k: v for k, v in variables.items() if k == "params" or v}
    cls_logits, box_preds = model.apply(variables, images, train=False)
    return postprocess.detect(cls_logits, box_preds, prior_boxes, **detect_kwargs)


def make_detect_fn(model: Any, detect_kwargs: dict[str, Any]) -> Callable[..., Any]:
    """jit(variables, images uint8 [B,S,S,3]) -> postprocess.Detections: `detect_images`."""
    import functools

    import jax

    from ssd_jax import priors

    return jax.jit(functools.partial(detect_images, model,
                                     prior_boxes=priors.generate_priors(model.prior_spec),
                                     **detect_kwargs))


@dataclasses.dataclass
class ImageDetections:
    """The detections of one image, in its own pixels.

    boxes float [N,4] corners (xmin, ymin, xmax, ymax) in pixels; scores float [N] (descending);
    labels int [N] (1..C-1); category_ids int [N] (the training data's ids of the labels).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    category_ids: np.ndarray


@dataclasses.dataclass
class Predictor:
    """A model ready for inference: variables on the device and the jitted network + `detect`.

    Attributes:
      model: the SSD (its `prior_spec.image_size` is the input side).
      variables: {"params": ..., ["batch_stats": ...]} on the device.
      class_names: names of labels 1..C-1 (label i -> class_names[i - 1]).
      category_ids: the dataset's id of label i at [i - 1].
      detect_kwargs: arguments of `postprocess.detect` (thresholds, top-k, max detections).
      fn: jitted (variables, uint8 images [B,S,S,3]) -> `postprocess.Detections`.
      step: the checkpoint's step (None for converted weights).
    """

    model: Any
    variables: Any
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    detect_kwargs: dict[str, Any]
    fn: Callable[..., Any]
    step: int | None = None

    @classmethod
    def from_run(cls, run: Run, dtype: str | None = None) -> Predictor:
        """The predictor of a loaded run, with the run's detect settings (config.detect)."""
        import jax
        import jax.numpy as jnp

        model = run.model if dtype is None else run.model.clone(dtype=jnp.dtype(dtype))
        detect_kwargs = {k: run.config.detect[k] for k in DETECT_FIELDS}
        return cls(model, jax.device_put(run.variables), run.class_names, run.category_ids,
                   detect_kwargs, make_detect_fn(model, detect_kwargs), run.step)

    @classmethod
    def from_torchvision(cls, path: str, dtype: str | None = None) -> Predictor:
        """torchvision's ssd300_vgg16 or ssdlite320_mobilenet_v3_large state dict
        (.pth/.pt/.safetensors; recognized from its keys), converted on the fly; torchvision's
        post-processing of that model; labels are COCO's category ids for the 91-class weights."""
        import jax
        import jax.numpy as jnp

        from ssd_jax import coco, convert

        if not os.path.isfile(path):
            raise UserError(f"torchvision_checkpoint={path}: no such file",
                            parameter="torchvision_checkpoint")
        try:
            state_dict = convert.load_state_dict(path)
            name, model, variables = convert.from_torchvision_detector(
                state_dict, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        except ImportError as e:
            raise UserError(f"torchvision_checkpoint={path}: reading it needs {e.name or 'torch'} "
                            "(pip install torch), or convert the file to .safetensors",
                            parameter="torchvision_checkpoint") from None
        except convert.StateDictError as e:
            raise CheckpointMismatchError(
                f"--torchvision_checkpoint={path} is not a torchvision ssd300_vgg16 or "
                f"ssdlite320_mobilenet_v3_large state dict: {e}") from None
        n = model.num_classes
        names = (coco.COCO_CATEGORIES_91[1:] if n == len(coco.COCO_CATEGORIES_91)
                 else tuple(f"class_{i}" for i in range(1, n)))
        detect_kwargs = dict(TORCHVISION_DETECT_OF[name])
        return cls(model, jax.device_put(variables), tuple(names), tuple(range(1, n)),
                   detect_kwargs, make_detect_fn(model, detect_kwargs))

    @property
    def image_size(self) -> int:
        return int(self.model.prior_spec.image_size)

    def category_of_label(self) -> np.ndarray:
        """int64 [C]: the dataset's category id of each label (0 at label 0, background): the
        map from `Detections.classes` to the ids results are written in."""
        return np.asarray((0,) + tuple(int(c) for c in self.category_ids), np.int64)

    def __call__(self, images: np.ndarray) -> Any:
        """Detections (device arrays, dispatched asynchronously) of uint8 images [B,S,S,3]."""
        return self.fn(self.variables, images)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """uint8 image of any size -> uint8 [S,S,3]: the resize evaluation uses.

        Takes [H,W,3] RGB, [H,W] or [H,W,1] grayscale (replicated) and [H,W,4] RGBA (alpha
        dropped); anything else, and non-uint8 pixels (e.g. floats in [0, 1]), is a UserError.
        """
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise UserError(f"Predictor takes uint8 RGB images in [0, 255], got dtype "
                            f"{image.dtype} (for floats in [0, 1]: (x * 255).round().astype(np.uint8))")
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
            raise UserError(f"Predictor takes images [H,W,3] (or [H,W], [H,W,1], [H,W,4]), got "
                            f"shape {image.shape}")
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        return image_lib.resize(np.ascontiguousarray(image[..., :3]), self.image_size)

    def predict(self, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 8
                ) -> ImageDetections | list[ImageDetections]:
        """Detections of uint8 [H,W,3] RGB images of any sizes, boxes in each image's pixels.

        `images`: one image (returns its ImageDetections), or a sequence of them / an array
        [N,H,W,3] (returns a list). They are resized with `prepare` and run in batches of
        min(batch_size, number of images) (the last one padded: one program per batch size).
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            return self.predict([images], batch_size)[0]
        images = list(images)
        bad = next((i for i, img in enumerate(images)
                    if np.ndim(img) != 3 or np.shape(img)[-1] != 3), None)
        if bad is not None:
            raise UserError(f"images[{bad}] has shape {np.shape(images[bad])}: give uint8 RGB "
                            "[H, W, 3] arrays (one, a list of them, or an [N, H, W, 3] array)",
                            parameter="images")
        batch_size = max(1, min(int(batch_size), len(images)))
        out: list[ImageDetections] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = np.zeros((batch_size, self.image_size, self.image_size, 3), np.uint8)
            for i, img in enumerate(chunk):
                batch[i] = self.prepare(img)
            dets = self.to_pixels(self(batch), [np.shape(img)[:2] for img in chunk])
            out += dets
        return out

    def to_pixels(self, dets: Any, sizes: Sequence[tuple[int, int]]) -> list[ImageDetections]:
        """The first len(sizes) rows of a batch's Detections, boxes scaled to (h, w) pixels."""
        import jax

        boxes, scores, classes, num = jax.device_get(tuple(dets))
        cats = self.category_of_label()
        out = []
        for row, (h, w) in enumerate(sizes):
            n = int(num[row])
            labels = classes[row, :n].astype(np.int64)
            out.append(ImageDetections(
                boxes=boxes[row, :n].astype(np.float64) * np.array([w, h, w, h], np.float64),
                scores=scores[row, :n].astype(np.float64), labels=labels,
                category_ids=cats[np.clip(labels, 0, len(cats) - 1)]))
        return out

    def name(self, label: int) -> str:
        return self.class_names[label - 1] if 0 < label <= len(self.class_names) else str(label)


def load_predictor(workdir: str | None = None, torchvision_checkpoint: str | None = None,
                   step: int | None = None, dtype: str | None = None) -> Predictor:
    """A Predictor from a training workdir or a torchvision ssd300_vgg16 /
    ssdlite320_mobilenet_v3_large state dict (exactly one)."""
    if (workdir is None) == (torchvision_checkpoint is None):
        raise UserError("give exactly one of --workdir and --torchvision_checkpoint")
    if workdir is not None:
        return Predictor.from_run(load_run(workdir, step), dtype)
    return Predictor.from_torchvision(torchvision_checkpoint, dtype)


# ----------------------------------------------------------------------------- files


def list_images(images: Iterable[str]) -> list[str]:
    """Files named in `images` (each comma separated) and the image files of named folders
    (sorted, not recursive). Named files are taken whatever their extension; a path that does
    not exist is a UserError."""
    out: list[str] = []
    for spec in images:
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
                raise UserError(f"images: {part} does not exist", parameter="images")
    return out


def image_ids(paths: Sequence[str], annotations: str | None = None) -> list[int]:
    """The COCO image id of each file: from `annotations` (a COCO-JSON file; matched by file
    name, UserError naming the files it lacks), else `image.image_id_from_name` (the digits of
    the stem: COCO's 000000397133.jpg -> 397133) when those are distinct, else 1..N."""
    if annotations is not None:
        if not os.path.isfile(annotations):
            raise UserError(f"annotations={annotations}: no such file", parameter="annotations")
        try:
            with open(annotations) as f:
                images = json.load(f)["images"]
            by_name = {}
            for img in images:
                by_name[img["file_name"]] = int(img["id"])
                by_name.setdefault(os.path.basename(img["file_name"]), int(img["id"]))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"annotations={annotations}: not a COCO annotation file with an "
                            f"'images' list of {{id, file_name}} ({type(e).__name__}: {e})",
                            parameter="annotations") from None
        missing = [p for p in paths if os.path.basename(p) not in by_name]
        if missing:
            raise UserError(f"annotations={annotations} has no image named "
                            f"{os.path.basename(missing[0])} ({len(missing)} of {len(paths)} files "
                            "missing); predict only the files the annotation file lists",
                            parameter="annotations")
        return [by_name[os.path.basename(p)] for p in paths]
    ids = [image_lib.image_id_from_name(p) for p in paths]
    return ids if len(set(ids)) == len(ids) else list(range(1, len(paths) + 1))


def _output_names(paths: Sequence[str]) -> list[str]:
    """Distinct PNG names <stem>.png (a repeated stem gets _2, _3, ...)."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")
    return names


def _load(path: str, predictor: Predictor) -> tuple[np.ndarray, tuple[int, int]] | str:
    """(resized image, original (height, width)) or the error message of an unreadable file."""
    try:
        img = image_lib.read_image(path)
        return predictor.prepare(img), img.shape[:2]
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
        return f"{type(e).__name__}: {e}"


@dataclasses.dataclass
class PredictResult:
    """What `predict_files` did: COCO results, PNGs written, files skipped as unreadable (file,
    error; no detections) and PNGs that could not be drawn (file, error; detections kept)."""

    results: list[dict[str, Any]]
    pngs: list[str]
    skipped: list[tuple[str, str]]
    draw_failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def predict_files(predictor: Predictor, paths: Sequence[str], out_dir: str, *,
                  batch_size: int = 8, min_score: float = 0.3, annotations: str | None = None,
                  progress: bool = True) -> PredictResult:
    """Detect objects in image files; write one PNG per image and COCO results to `out_dir`.

    Written: <stem>.png (the image at its size with the detections scoring >= min_score),
    detections.json (every detection: {"image_id", "file_name", "category_id" (the training
    data's ids), "category_name", "bbox": [x, y, w, h] pixels, "score"}; what
    `COCO(annotations).loadRes` takes), skipped.json (only when some file could not be read).
    Files are decoded and resized by a thread pool while the device runs the previous batch (and
    decoded once more at their full size to draw the PNG, so that only one batch of full-size
    images is held at a time); an unreadable file is skipped and reported, never fatal.
    """
    from tqdm import tqdm

    from ssd_jax.data import visualize

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir={out_dir} is a file; give a folder", parameter="out_dir")
    if int(batch_size) <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size}", parameter="batch_size")
    ids = image_ids(paths, annotations)
    os.makedirs(out_dir, exist_ok=True)
    size, b = predictor.image_size, int(batch_size)
    names = _output_names(paths)
    results: list[dict[str, Any]] = []
    pngs: list[str] = []
    skipped: list[tuple[str, str]] = []
    draw_failed: list[tuple[str, str]] = []
    bar = tqdm(total=len(paths), unit="img", desc="predict", disable=not progress, file=sys.stderr)

    def draw(path: str, out: str, det: ImageDetections) -> str | None:
        keep = det.scores >= min_score
        try:
            visualize.draw_detections(image_lib.read_image(path), det.boxes[keep], det.labels[keep],
                                      det.scores[keep], predictor.class_names).save(out)
            return None
        except Exception as e:  # noqa: BLE001 - the file changed or vanished since it was read
            return f"{type(e).__name__}: {e}"

    def finish(ok: Sequence[int], sizes: list[tuple[int, int]], dets: Any):
        futures = []
        for i, det in zip(ok, predictor.to_pixels(dets, sizes), strict=True):
            for box, score, label, cat in zip(det.boxes, det.scores, det.labels, det.category_ids):
                results.append({
                    "image_id": ids[i], "file_name": os.path.basename(paths[i]),
                    "category_id": int(cat), "category_name": predictor.name(int(label)),
                    "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]),
                             float(box[3] - box[1])],
                    "score": float(score)})
            futures.append((i, pool.submit(draw, paths[i], os.path.join(out_dir, names[i]), det)))
        return futures

    pending = None
    drawing: list[tuple[int, concurrent.futures.Future]] = []
    order = list(range(len(paths)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        loaders = [pool.submit(_load, paths[i], predictor) for i in order[:b]]
        for start in range(0, len(order), b):
            batch_idx = order[start:start + b]
            loaded = [f.result() for f in loaders]
            nxt = order[start + b:start + 2 * b]
            loaders = [pool.submit(_load, paths[i], predictor) for i in nxt]  # overlap the device
            images = np.zeros((b, size, size, 3), np.uint8)  # padded to the fixed batch
            ok, sizes = [], []
            for i, item in zip(batch_idx, loaded, strict=True):
                if isinstance(item, str):
                    skipped.append((paths[i], item))
                    continue
                images[len(ok)] = item[0]
                sizes.append(item[1])
                ok.append(i)
            dets = predictor(images) if ok else None  # dispatched asynchronously
            if pending is not None:
                drawing += finish(*pending)
            pending = (ok, sizes, dets) if ok else None
            bar.update(len(batch_idx))
        if pending is not None:
            drawing += finish(*pending)
        for i, fut in drawing:
            err = fut.result()
            if err is None:
                pngs.append(os.path.join(out_dir, names[i]))
            else:
                draw_failed.append((paths[i], err))
    bar.close()

    with open(os.path.join(out_dir, "detections.json"), "w") as f:
        json.dump(results, f)
    skipped_path = os.path.join(out_dir, "skipped.json")
    if skipped:
        with open(skipped_path, "w") as f:
            json.dump([{"file": p, "error": e} for p, e in skipped], f, indent=1)
    elif os.path.exists(skipped_path):
        os.remove(skipped_path)
    return PredictResult(results, pngs, skipped, draw_failed)
