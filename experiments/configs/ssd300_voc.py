"""The paper's SSD300 on PASCAL VOC: 07+12 trainval, evaluated with VOC07 11-point mAP on 2007 test.

Before training: prepare the TFDS datasets (`tfds build voc/2007 voc/2012 --data_dir=DIR`) and
convert the ImageNet VGG16 backbone (`python -m experiments.convert_torchvision --kind=vgg16 ...`).

    python -m experiments.train --config=experiments/configs/ssd300_voc.py --workdir=DIR \
        --config.dataset.data_dir=DIR --config.init_checkpoint=VGG16_CKPT
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = ml_collections.ConfigDict()     # the VGG16 builders take no options
    config.model.name = "ssd300_vgg16"             # the paper's SSD300 (8732 priors)
    config.dataset.kind = "tfds"
    config.dataset.name = "voc/2007+voc/2012"      # "07+12": trainval of both
    config.dataset.data_dir = ""                   # required: where the TFDS data was prepared
    config.dataset.train_split = "train+validation"  # TFDS names VOC trainval "train+validation"
    config.dataset.eval_split = "test"             # VOC2007 test (of the first name)
    config.dataset.augment_expand = True           # the paper's full augmentation
    config.dataset.augment_crop = True
    config.dataset.augment_on_device = True        # the host decodes, the train step augments
    config.dataset.canvas_size = 512               # VOC images are <= 500 px: copied, not resampled
    config.max_boxes = 64                          # VOC images hold at most 42 objects

    config.num_train_steps = 120_000               # the paper: 120k iterations at batch 32
    config.batch_size = 32
    config.optimizer = "sgd"
    config.learning_rate = 1e-3
    config.schedule = "piecewise"
    config.lr_boundaries = (80_000, 100_000)       # x0.1 at 80k and 100k
    config.lr_decay = 0.1
    config.warmup_steps = 1000                     # linear warmup from warmup_start_factor * lr
    config.warmup_start_factor = 1.0 / 3
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.dtype = "bfloat16"                      # accelerators; params stay float32
    config.init_checkpoint = ""                    # the converted ImageNet VGG16 (required in practice)

    config.matching_iou = 0.5                      # the paper's positives (the default uses 0.3)
    config.neg_pos_ratio = 3.0
    config.metric = "voc07"
    config.eval_batch_size = 64
    config.detect.pre_nms_top_k = 400              # the paper's inference settings
    config.detect.iou_threshold = 0.45
    config.detect.score_threshold = 0.01
    config.detect.max_detections = 200
    config.log_every_steps = 100
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 5_000
    return config
