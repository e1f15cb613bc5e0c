"""Writes the notebooks of this folder (the .ipynb files are committed; edit here, then run

    python experiments/notebooks/make_notebooks.py

). Each notebook has one cell tagged `parameters` (papermill style); tests/test_notebooks.py
injects a cell after it with SMOKE = True (tiny synthetic run on the CPU, no downloads) and
executes the notebook with nbclient, so the notebooks cannot rot.
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''\
import os, subprocess, sys

def find_repo_root(start="."):
    """The enclosing ssd_jax clone (a folder with ssd_jax/ and pyproject.toml), or None."""
    path = os.path.abspath(start)
    while True:
        if os.path.isdir(os.path.join(path, "ssd_jax")) and os.path.exists(
                os.path.join(path, "pyproject.toml")):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent

def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)

ROOT = find_repo_root()
if ROOT is None:  # e.g. a fresh Colab runtime: clone the repository first
    if not REPO_URL:
        raise ValueError("not inside an ssd_jax clone: set REPO_URL (parameters cell) to the "
                         "git URL of the ssd_jax repository, or clone it and open the notebook there")
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, "ssd_jax"], check=True)
    ROOT = os.path.abspath("ssd_jax")
if not SMOKE:  # inside a clone this is an editable install of the checkout
    {extra_pip}pip("-e", ROOT)
sys.path.insert(0, ROOT)  # this checkout's ssd_jax and experiments/ (configs, commands) first
os.chdir(ROOT)
print("repository:", ROOT)
'''


def _nb(cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes only what changed
        cell["id"] = f"cell-{i:02d}"
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "TPU"
    return nb


def _params(src: str) -> nbformat.NotebookNode:
    cell = new_code_cell(src)
    cell.metadata["tags"] = ["parameters"]
    return cell


def colab_tpu() -> nbformat.NotebookNode:
    md, code = new_markdown_cell, new_code_cell
    return _nb([
        md("# SSD300 on PASCAL VOC with JAX on a Colab TPU\n\n"
           "Trains the paper's SSD300 (VGG16, 8732 priors) on VOC2007+2012 trainval on all TPU "
           "cores with `ssd_jax.train.train_and_evaluate` (data parallel: one `shard_map`ped "
           "step over a mesh axis `data`), starting from torchvision's ImageNet VGG16, then "
           "evaluates VOC2007-test mAP (11-point) and shows detections.\n\n"
           "Runtime > Change runtime type > **TPU**. The full schedule (120k steps at batch 32) "
           "takes hours; set `NUM_TRAIN_STEPS` lower for a first look. `SMOKE = True` runs every "
           "cell on a CPU in about a minute with a tiny synthetic dataset (used by the tests)."),
        _params(
            "SMOKE = False                 # True: tiny CPU run (synthetic data, few steps, no downloads)\n"
            "REPO_URL = \"\"  # git URL of your ssd_jax repository; needed only outside a clone\n"
            "DATA_DIR = \"/content/tensorflow_datasets\"  # where TFDS prepares VOC (or gs://bucket/...)\n"
            "WORKDIR = \"/content/ssd300_voc\"  # checkpoints, TensorBoard logs, eval report\n"
            "NUM_TRAIN_STEPS = 120_000     # the paper's schedule (lr x0.1 at 80k and 100k)\n"
            "BATCH_SIZE = 32               # global batch, split over all TPU cores\n"
            "NUM_SHOW = 8                  # validation images shown with detections"),
        md("## Install\n\nInside a clone (`git clone REPO_URL && cd ssd_jax`), the checkout is "
           "installed in editable mode; otherwise the repository is cloned first. `jax[tpu]` is "
           "installed explicitly so that pip never replaces the TPU build with a CPU one."),
        code(SETUP.format(extra_pip='pip("-U", "jax[tpu]>=0.10")\n    ')),
        md("## The TPU"),
        code("import jax\n\n"
             "devices = jax.devices()\n"
             "print(f\"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), \"\n"
             "      f\"{jax.process_count()} process(es)\")\n"
             "if not SMOKE:\n"
             "    assert devices[0].platform == \"tpu\", \"no TPU: Runtime > Change runtime type > TPU\"\n"
             "    assert BATCH_SIZE % jax.device_count() == 0, \"BATCH_SIZE must split over the cores\""),
        md("## ImageNet VGG16 -> the SSD backbone\n\n"
           "torchvision's VGG16 state dict goes through `convert.vgg16_backbone_from_torchvision`: "
           "conv1_1..conv5_3 are copied and fc6/fc7 become the paper's reduced, dilated fc6/fc7 "
           "(every 4th filter, every 3rd tap). The checkpoint is the config's `init_checkpoint`. "
           "torch is imported before TensorFlow (the other order can crash some builds)."),
        code("import torch\n"
             "import torchvision\n\n"
             "from ssd_jax import convert\n\n"
             "os.makedirs(WORKDIR, exist_ok=True)\n"
             "VGG_CKPT = os.path.join(WORKDIR, \"vgg16_imagenet_backbone\")\n"
             "weights = None if SMOKE else torchvision.models.VGG16_Weights.IMAGENET1K_V1\n"
             "vgg = torchvision.models.vgg16(weights=weights)  # SMOKE: random weights, no download\n"
             "backbone = convert.vgg16_backbone_from_torchvision(vgg.state_dict())\n"
             "convert.save_checkpoint(VGG_CKPT, backbone)\n"
             "print(\"VGG16 layers:\", \", \".join(sorted(backbone[\"params\"][\"backbone\"])))\n"
             "del vgg, backbone"),
        md("## PASCAL VOC with TFDS\n\n"
           "`voc/2007` and `voc/2012` are downloaded and prepared once into `DATA_DIR` "
           "(~3.5 GB); training reads `train+validation` (= trainval) of both and evaluates on "
           "`voc/2007` test. On a TPU pod, put `DATA_DIR` on GCS so every host can read it."),
        code("from ssd_jax.data.tf_compat import tf  # TensorFlow only feeds data: no GPU for it\n\n"
             "if not SMOKE:\n"
             "    import tensorflow_datasets as tfds\n\n"
             "    for name in (\"voc/2007\", \"voc/2012\"):\n"
             "        builder = tfds.builder(name, data_dir=DATA_DIR)\n"
             "        builder.download_and_prepare()\n"
             "        print(name, {k: v.num_examples for k, v in builder.info.splits.items()})"),
        md("## The config\n\n`experiments/configs/ssd300_voc.py` is the paper's recipe: SGD "
           "momentum 0.9, weight decay 5e-4, lr 1e-3 (warmup), x0.1 at 80k and 100k, bfloat16 "
           "compute, SSD augmentation. `SMOKE` swaps in the compact model on synthetic shapes "
           "(the `default` config). The same run from a shell, with the config by name:\n\n"
           "    python -m experiments.train --config=ssd300_voc --workdir=WORKDIR \\\n"
           "        --config.dataset.data_dir=DATA_DIR --config.init_checkpoint=VGG_CKPT\n\n"
           "(`--print_config` lists every field with its comment; `ssd-train` is the same "
           "command.)"),
        code("from experiments.configs import default, ssd300_voc\n\n"
             "if SMOKE:\n"
             "    config = default.get_config()\n"
             "    config.dataset.num_train, config.dataset.num_eval = 32, 8\n"
             "    config.dataset.num_test = 8\n"
             "    config.dataset.image_size = 128\n"
             "    config.batch_size = config.eval_batch_size = 8\n"
             "    config.num_train_steps, config.warmup_steps = 3, 1\n"
             "    config.log_every_steps, config.checkpoint_every_steps = 1, 0\n"
             "    config.eval_every_steps, config.num_eval_images_to_draw = 0, 0\n"
             "else:\n"
             "    config = ssd300_voc.get_config()\n"
             "    config.dataset.data_dir = DATA_DIR\n"
             "    config.init_checkpoint = VGG_CKPT\n"
             "    config.num_train_steps = NUM_TRAIN_STEPS\n"
             "    config.batch_size = BATCH_SIZE\n"
             "print(config)"),
        md("## Train\n\nResumable: running this cell again with the same `WORKDIR` continues "
           "from the last checkpoint. Follow the curves in TensorBoard."),
        code("if not SMOKE:\n"
             "    get_ipython().run_line_magic(\"load_ext\", \"tensorboard\")\n"
             "    get_ipython().run_line_magic(\"tensorboard\", f\"--logdir {WORKDIR}\")"),
        code("from ssd_jax import train\n\n"
             "state, final_metrics = train.train_and_evaluate(config, WORKDIR)\n"
             "print({k: v for k, v in final_metrics.items() if not isinstance(v, list)})"),
        md("## Evaluate\n\n`run_eval.evaluate_run` runs the training loop's evaluation (the same "
           "eval step, eval batches and `evaluation.Evaluator`) on the run's latest checkpoint "
           "(`load_run(WORKDIR, step=N)` for another): VOC07 11-point mAP, a per-class table and "
           "precision/recall curves (the paper's SSD300 reaches 77.2 mAP on VOC2007 test). "
           "`write_eval_report` writes metrics.json, detections.json (COCO results) and "
           "pr_curves.png. From a shell: `python -m experiments.evaluate --workdir=WORKDIR`."),
        code("from IPython.display import Image as ShowImage, display\n\n"
             "from ssd_jax import evaluation, inference, run_eval\n\n"
             "run = inference.load_run(WORKDIR)\n"
             "report = run_eval.evaluate_run(run)\n"
             "paths = run_eval.write_eval_report(report, os.path.join(WORKDIR, \"eval\"))\n"
             "curves = report[\"curves\"]\n"
             "print(evaluation.per_class_table(report[\"class_names\"], curves[\"AP\"],\n"
             "                                 curves[\"num_gt\"]))\n"
             "metrics = report[\"metrics\"]\n"
             "print(f\"\\n{report['metric']} mAP = {metrics['mAP']:.4f} at step {report['step']} \"\n"
             "      f\"({metrics['num_images']} images)\")\n"
             "display(ShowImage(paths[\"pr_curves\"]))"),
        md("## Detections on validation images\n\n"
           "`Predictor.from_run` puts the checkpoint on the device with the run's `detect` "
           "settings; called on a batch of uint8 [B, S, S, 3] images it returns fixed-size "
           "`Detections` (normalized boxes), which `to_pixels` cuts to each image's detections "
           "in pixels."),
        code("import matplotlib.pyplot as plt\n\n"
             "from ssd_jax.data import pipeline, visualize\n\n"
             "predictor = inference.Predictor.from_run(run)\n"
             "size = predictor.image_size\n"
             "batch = next(iter(pipeline.InputPipeline(config.dataset).eval_iterator(\n"
             "    image_size=size, batch_size=NUM_SHOW, max_boxes=config.max_boxes)))\n"
             "dets = predictor.to_pixels(predictor(batch[\"image\"]), [(size, size)] * NUM_SHOW)\n"
             "cols, rows = 4, -(-NUM_SHOW // 4)\n"
             "fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)\n"
             "for i, ax in enumerate(axes.flat):\n"
             "    ax.axis(\"off\")\n"
             "    if i >= NUM_SHOW or not batch[\"mask\"][i]:\n"
             "        continue\n"
             "    keep = dets[i].scores >= 0.4\n"
             "    drawn = visualize.draw_detections(batch[\"image\"][i], dets[i].boxes[keep],\n"
             "                                      dets[i].labels[keep], dets[i].scores[keep],\n"
             "                                      predictor.class_names)\n"
             "    ax.imshow(drawn)\n"
             "plt.tight_layout()\n"
             "plt.show()"),
        md("Run the trained model on your own pictures from a shell (`ssd-predict` is the same "
           "command; in Python: `inference.predict_files(predictor, paths, out_dir)`):\n\n"
           "    python -m experiments.predict --workdir=WORKDIR --images=my_photos/ --out=predictions/"),
    ])


def inference() -> nbformat.NotebookNode:
    md, code = new_markdown_cell, new_code_cell
    nb = _nb([
        md("# SSD inference and the MultiBox loss as pure functions\n\n"
           "Loads a model with `ssd_jax.inference` (a training run's checkpoint, or "
           "torchvision's COCO `ssd300_vgg16` weights converted to ssd_jax), runs the jitted "
           "network + `postprocess.detect` on image files and on in-memory images and draws the "
           "detections; then evaluates `ssd_jax.loss.multibox_loss` on a "
           "batch matched with `ssd_jax.matching.match_batch` - plain functions of arrays, "
           "differentiable with `jax.grad`.\n\n"
           "`SMOKE = True` (used by the tests) converts a randomly initialized torchvision model "
           "and uses synthetic images: no downloads."),
        _params(
            "SMOKE = False       # True: random torchvision weights and synthetic images (no downloads)\n"
            "REPO_URL = \"\"  # git URL of your ssd_jax repository; needed only outside a clone\n"
            "WORKDIR = \"\"        # training workdir (run_info.json, checkpoints/); empty: torchvision\n"
            "TORCHVISION_PTH = \"\"  # a local ssd300_vgg16 .pth; empty: torchvision downloads COCO_V1\n"
            "IMAGES = \"\"         # image files/folders, comma separated; empty: two COCO val2017 images\n"
            "MIN_SCORE = 0.4     # smallest score drawn\n"
            "BATCH_SIZE = 4      # images per jitted call (fixed; the last batch is padded)\n"
            "OUT_DIR = \"/tmp/ssd_predictions\""),
        code(SETUP.format(extra_pip="")),
        md("## The model\n\nA torchvision state dict is converted by "
           "`convert.from_torchvision_ssd` (same layers, same priors, same mean: the same "
           "function) and saved/loaded as an orbax checkpoint, as `experiments/convert_torchvision.py` "
           "does (`ssd-convert-torchvision`); `inference.load_predictor(torchvision_checkpoint=...)` "
           "converts a .pth on the fly, and `inference.load_predictor(workdir=...)` loads a "
           "training run's latest checkpoint (`step=N` for another), checked to fit its model."),
        code("import numpy as np\n"
             "import torch  # before TensorFlow (the other order can crash some builds)\n"
             "import torchvision\n\n"
             "from ssd_jax import convert, inference\n\n"
             "if WORKDIR:\n"
             "    predictor = inference.load_predictor(workdir=WORKDIR)\n"
             "else:\n"
             "    pth = TORCHVISION_PTH\n"
             "    if not pth:\n"
             "        if SMOKE:  # a seeded random model, its class head made background-dominant\n"
             "            torch.manual_seed(0)\n"
             "            tv = torchvision.models.detection.ssd300_vgg16(weights=None,\n"
             "                                                           weights_backbone=None)\n"
             "            with torch.no_grad():\n"
             "                for conv in tv.head.classification_head.module_list:\n"
             "                    conv.weight.mul_(0.3)\n"
             "                    conv.bias.view(-1, 91)[:, 0] += 12.0\n"
             "        else:\n"
             "            tv = torchvision.models.detection.ssd300_vgg16(weights=\"COCO_V1\")\n"
             "        pth = os.path.join(OUT_DIR, \"ssd300_vgg16.pth\")\n"
             "        os.makedirs(OUT_DIR, exist_ok=True)\n"
             "        torch.save(tv.state_dict(), pth)\n"
             "    # .pth -> ssd_jax variables -> an orbax checkpoint -> back (what a user keeps)\n"
             "    model, variables = convert.from_torchvision_ssd(convert.load_state_dict(pth))\n"
             "    ckpt = os.path.join(OUT_DIR, \"ssd300_converted\")\n"
             "    convert.save_checkpoint(ckpt, variables)\n"
             "    predictor = inference.load_predictor(torchvision_checkpoint=pth)\n"
             "    predictor.variables = convert.load_checkpoint(ckpt)\n"
             "model = predictor.model\n"
             "print(f\"{type(model.backbone).__name__} at {predictor.image_size} px, \"\n"
             "      f\"{model.num_classes} classes, \"\n"
             "      f\"{model.prior_spec.num_priors} priors; detect: {predictor.detect_kwargs}\")"),
        md("## Images"),
        code("from PIL import Image\n\n"
             "from ssd_jax.data import synthetic\n\n"
             "image_dir = os.path.join(OUT_DIR, \"images\")\n"
             "os.makedirs(image_dir, exist_ok=True)\n"
             "if IMAGES:\n"
             "    paths = inference.list_images([IMAGES])\n"
             "elif SMOKE:  # synthetic shapes of a few sizes\n"
             "    paths = []\n"
             "    for i, side in enumerate((300, 240, 360)):\n"
             "        ex = synthetic.generate_example(0, \"val\", i, image_size=side)\n"
             "        paths.append(os.path.join(image_dir, f\"shapes{i}.jpg\"))\n"
             "        Image.fromarray(ex[\"image\"]).save(paths[-1])\n"
             "else:\n"
             "    import urllib.request\n\n"
             "    paths = []\n"
             "    for image_id in (39769, 397133):\n"
             "        path = os.path.join(image_dir, f\"{image_id:012d}.jpg\")\n"
             "        urllib.request.urlretrieve(\n"
             "            f\"http://images.cocodataset.org/val2017/{image_id:012d}.jpg\", path)\n"
             "        paths.append(path)\n"
             "print(len(paths), \"images:\", [os.path.basename(p) for p in paths])"),
        md("## Detect\n\n`inference.predict_files` reads and resizes the files on a thread pool "
           "(`Predictor.prepare`: the resize evaluation uses, so a file gets the detections it "
           "gets in evaluation), runs the jitted model + `detect` in fixed-size batches and maps "
           "the boxes back to each image's size; it writes one PNG per image and COCO-style "
           "`detections.json` (unreadable files are skipped and listed). The same in a shell: "
           "`python -m experiments.predict --torchvision_checkpoint=... --images=... --out=...` "
           "(or `ssd-predict`)."),
        code("import json\n\n"
             "import matplotlib.pyplot as plt\n\n"
             "result = inference.predict_files(predictor, paths, OUT_DIR, batch_size=BATCH_SIZE,\n"
             "                                 min_score=MIN_SCORE)\n"
             "print(len(result.results), \"detections; skipped:\", result.skipped)\n"
             "print(json.dumps(result.results[:3], indent=1))\n"
             "fig, axes = plt.subplots(1, len(result.pngs), figsize=(6 * len(result.pngs), 6),\n"
             "                         squeeze=False)\n"
             "for ax, png in zip(axes[0], result.pngs):\n"
             "    ax.imshow(Image.open(png))\n"
             "    ax.set_title(os.path.basename(png))\n"
             "    ax.axis(\"off\")\n"
             "plt.show()"),
        md("In memory: `predictor.predict` takes uint8 [H, W, 3] images of any size and returns "
           "each one's detections in its own pixels (`boxes`, `scores`, `labels`, "
           "`category_ids`); `visualize.draw_detections` draws them.\n\n"
           "The lower-level path, one batch by hand: `model.apply` gives the raw head outputs "
           "(`cls_logits` [B, P, C], `box_preds` [B, P, 4] offsets against the priors), "
           "`postprocess.detect` turns them into fixed-size detections (jit-able: no Python loop "
           "over images or classes)."),
        code("import jax\n"
             "import jax.numpy as jnp\n"
             "from IPython.display import display\n\n"
             "from ssd_jax import image as image_lib\n"
             "from ssd_jax import postprocess, priors\n"
             "from ssd_jax.data import visualize\n\n"
             "originals = [image_lib.read_image(p) for p in paths]\n"
             "found = predictor.predict(originals, batch_size=BATCH_SIZE)\n"
             "for path, det in zip(paths, found):\n"
             "    print(os.path.basename(path), len(det.scores), \"detections; best:\",\n"
             "          [(predictor.name(int(c)), round(float(s), 3))\n"
             "           for c, s in zip(det.labels[:3], det.scores[:3])])\n"
             "keep = found[0].scores >= MIN_SCORE\n"
             "display(visualize.draw_detections(originals[0], found[0].boxes[keep], found[0].labels[keep],\n"
             "                                  found[0].scores[keep], predictor.class_names))\n\n"
             "size = predictor.image_size\n"
             "images = np.stack([predictor.prepare(im) for im in originals])  # [B, S, S, 3] uint8\n"
             "prior_boxes = priors.generate_priors(model.prior_spec)  # [P, 4] center form\n"
             "forward = jax.jit(lambda v, x: model.apply(v, x, train=False))\n"
             "cls_logits, box_preds = forward(predictor.variables, images)\n"
             "dets = postprocess.detect(cls_logits, box_preds, prior_boxes, **predictor.detect_kwargs)\n"
             "print(\"cls_logits\", cls_logits.shape, \"box_preds\", box_preds.shape)\n"
             "print(\"detections per image:\", np.asarray(dets.num_detections))"),
        md("## The MultiBox loss as a pure function\n\n"
           "Ground truth is padded to a fixed number of boxes (label 0 = padding). "
           "`match_batch` assigns every prior a class (0 = background) and encoded offsets; "
           "`multibox_loss` is softmax cross-entropy with 3:1 hard negative mining plus smooth L1 "
           "on the positives, divided by the number of positives. Here on synthetic shapes with "
           "their boxes (labels 1..6; any label below the model's class count works)."),
        code("from ssd_jax.loss import multibox_loss\n"
             "from ssd_jax.matching import match_batch\n\n"
             "max_boxes = 8\n"
             "gt_boxes = np.zeros((len(images), max_boxes, 4), np.float32)\n"
             "gt_labels = np.zeros((len(images), max_boxes), np.int32)\n"
             "shapes = []\n"
             "for i in range(len(images)):\n"
             "    ex = synthetic.generate_example(1, \"val\", i, image_size=size)\n"
             "    n = min(len(ex[\"labels\"]), max_boxes)\n"
             "    gt_boxes[i, :n], gt_labels[i, :n] = ex[\"boxes\"][:n], ex[\"labels\"][:n]\n"
             "    shapes.append(ex[\"image\"])\n"
             "cls_logits, box_preds = forward(predictor.variables, np.stack(shapes))\n"
             "cls_targets, box_targets = match_batch(gt_boxes, gt_labels, prior_boxes, 0.5)\n"
             "loss, aux = multibox_loss(cls_logits, box_preds, cls_targets, box_targets,\n"
             "                          neg_pos_ratio=3.0, loc_weight=1.0)\n"
             "print(f\"loss {float(loss):.4f} = conf {float(aux['conf_loss']):.4f} + \"\n"
             "      f\"loc {float(aux['loc_loss']):.4f}; {int(aux['num_pos'])} matched priors\")\n\n"
             "# Pure and differentiable: the gradient with respect to the head outputs.\n"
             "grad_cls, grad_box = jax.grad(\n"
             "    lambda c, b: multibox_loss(c, b, cls_targets, box_targets)[0], argnums=(0, 1))(\n"
             "    cls_logits, box_preds)\n"
             "print(\"|d loss / d logits| =\", float(jnp.linalg.norm(grad_cls)),\n"
             "      \" |d loss / d offsets| =\", float(jnp.linalg.norm(grad_box)))"),
    ])
    nb.metadata.pop("accelerator", None)
    return nb


def main() -> None:
    for name, build in (("ssd_colab_tpu.ipynb", colab_tpu), ("ssd_inference.ipynb", inference)):
        nb = build()
        nbformat.validate(nb)
        path = os.path.join(HERE, name)
        with open(path, "w") as f:
            nbformat.write(nb, f)
        print("wrote", path)


if __name__ == "__main__":
    main()
