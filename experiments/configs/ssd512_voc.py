"""The paper's SSD512 on PASCAL VOC (07+12 trainval, VOC07 mAP on 2007 test): SSD300's recipe
with the 512 px model, its 7 source maps and its priors (Caffe `ssd_pascal_512.py`; sources per
field in experiments/RESULTS.md)."""

import ml_collections

from experiments.configs import ssd300_voc


def get_config() -> ml_collections.ConfigDict:
    config = ssd300_voc.get_config()
    config.model.name = "ssd512_vgg16"             # the paper's SSD512 (conv12_2 added)
    config.model.prior_spec = "ssd512_voc"         # ssd_pascal_512.py: min_ratio 15, conv4_3 at
                                                   # 7%: 24564 priors
    return config
