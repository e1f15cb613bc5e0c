"""SSD300 on COCO 2017 (train -> val), COCO AP@[.5:.95] via pycocotools.

The paper's COCO recipe: batch 32, lr 1e-3 for 160k iterations, x0.1 at 120k and 140k (its
smaller COCO scales are the SSD300_COCO prior spec; the model here uses the VOC spec by default).
"""

import ml_collections

from experiments.configs import ssd300_voc


def get_config() -> ml_collections.ConfigDict:
    config = ssd300_voc.get_config()
    config.dataset.name = "coco/2017"
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.canvas_size = 640               # COCO images are <= 640 px
    config.max_boxes = 100
    config.num_train_steps = 160_000
    config.lr_boundaries = (120_000, 140_000)
    config.metric = "coco"
    config.eval_every_steps = 20_000
    return config
