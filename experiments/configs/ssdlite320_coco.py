"""SSDLite320 with MobileNetV3-Large on COCO 2017 (train -> val), COCO AP@[.5:.95]: torchvision's
recipe for `ssdlite320_mobilenet_v3_large` (21.3 box AP), trained from scratch as torchvision's
reference scripts do (no ImageNet backbone: its COCO weights have the reduced tail):

    torchrun --nproc_per_node=8 train.py --dataset coco --model ssdlite320_mobilenet_v3_large \
        --epochs 660 --aspect-ratio-group-factor 3 --lr-scheduler cosineannealinglr --lr 0.15 \
        --batch-size 24 --weight-decay 0.00004 --data-augmentation ssdlite

    python -m experiments.train --config=experiments/configs/ssdlite320_coco.py --workdir=DIR \
        --config.dataset.data_dir=DIR

To fine-tune torchvision's COCO weights instead: convert them (`python -m
experiments.convert_torchvision --input=ssdlite320_mobilenet_v3_large_coco-a79551df.pth
--output=CKPT`) and pass --config.init_checkpoint=CKPT. Differences from torchvision's script:
weight decay on conv kernels only (torchvision decays every parameter), the warmup is linear
from 0 (torchvision: from lr/1000 over the first 1000 iterations), one fixed 320 px resize.
"""

import ml_collections

from experiments.configs import ssd300_coco


def get_config() -> ml_collections.ConfigDict:
    config = ssd300_coco.get_config()
    config.model = ml_collections.ConfigDict()
    config.model.name = "ssdlite320_mobilenet_v3"  # 3234 priors at 320 px, SSDLite heads
    config.model.freeze_bn = False                 # BatchNorm trains (synchronized over devices)
    config.model.reduced_tail = True               # torchvision's COCO layout (C4/C5 at half width)

    # --data-augmentation ssdlite: RandomIoUCrop + horizontal flip only
    config.dataset.augment_photometric = False
    config.dataset.augment_expand = False
    config.dataset.augment_crop = True
    config.dataset.augment_flip = True

    # 660 epochs of the 117,266 train2017 images with boxes at batch 8 x 24 = 192
    config.batch_size = 192
    config.num_train_steps = 403_100
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.learning_rate = 0.15
    config.schedule = "cosine"                     # --lr-scheduler cosineannealinglr (to 0)
    config.warmup_steps = 1000                     # torchvision warms up over 1000 iterations
    config.weight_decay = 4e-5
    config.dtype = "bfloat16"                      # accelerators; params stay float32
    config.init_checkpoint = ""                    # from scratch (or converted COCO weights)

    config.matching_iou = 0.5                      # torchvision's SSDMatcher(0.5)
    config.neg_pos_ratio = 3.0
    config.detect.score_threshold = 0.001          # torchvision's ssdlite320 post-processing
    config.detect.pre_nms_top_k = 300
    config.detect.iou_threshold = 0.55
    config.detect.max_detections = 300
    config.eval_every_steps = 20_000
    config.checkpoint_every_steps = 5_000
    return config
