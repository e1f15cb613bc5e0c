"""The paper's SSD512 on PASCAL VOC (07+12 trainval, VOC07 mAP on 2007 test): SSD300's recipe
with the 512 px model and its 7 source maps (24564 priors)."""

import ml_collections

from experiments.configs import ssd300_voc


def get_config() -> ml_collections.ConfigDict:
    config = ssd300_voc.get_config()
    config.model.name = "ssd512_vgg16"
    return config
