"""The paper's SSD512 on COCO 2017 (train -> val), COCO AP@[.5:.95]: SSD300-COCO's recipe with the
512 px model and COCO's SSD512 priors (conv4_3 at 0.04 of the image, then 0.10 .. 0.90; Caffe's
ssd_coco.py at 512 px; sources per field in experiments/RESULTS.md)."""

import ml_collections

from experiments.configs import ssd300_coco


def get_config() -> ml_collections.ConfigDict:
    config = ssd300_coco.get_config()
    config.model.name = "ssd512_vgg16"             # the paper's SSD512 (conv12_2 added)
    config.model.prior_spec = "ssd512_coco"        # min_ratio 10, max_ratio 90, conv4_3 at 4%
                                                   # (20.48 px): 24564 priors, not clipped
    return config
