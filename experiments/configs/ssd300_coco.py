"""The paper's SSD300 on COCO 2017 (train -> val), COCO AP@[.5:.95] via pycocotools.

SSD300's recipe with COCO's smaller priors (the paper's sec. 3.4: conv4_3 at 0.07, then 0.15 ..
0.87) and the schedule of Caffe's `examples/ssd/ssd_coco.py` (400k iterations at batch 32). The
priors are torchvision's `ssd300_vgg16` anchors (the same scales, w and h clipped to the image),
so torchvision's converted COCO weights fine-tune with the priors they were trained on; sources
per field in experiments/RESULTS.md.
"""

import ml_collections

from experiments.configs import ssd300_voc


def get_config() -> ml_collections.ConfigDict:
    config = ssd300_voc.get_config()
    config.model.prior_spec = "ssd300_torchvision"  # ssd_coco.py: min_ratio 15, conv4_3 at 7%;
                                                    # w, h clipped to 1 as torchvision's anchors
    config.dataset.name = "coco/2017"
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.use_difficult = True            # COCO marks none (its crowd boxes are ignored)
    config.dataset.canvas_size = 640               # COCO images are <= 640 px
    config.max_boxes = 100
    config.num_train_steps = 400_000               # ssd_coco.py max_iter 400000 at batch 32
    config.lr_boundaries = (280_000, 360_000)      # stepvalue [280000, 360000, 400000]
    config.metric = "coco"                         # the paper's Table 5: AP@[.5:.95]
    config.eval_every_steps = 20_000
    return config
