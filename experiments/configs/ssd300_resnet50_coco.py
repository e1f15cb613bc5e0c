"""NVIDIA DeepLearningExamples' SSD300 with ResNet-50 (PyTorch/Detection/SSD) on COCO 2017
(train -> val), COCO AP@[.5:.95] via pycocotools.

The model is `ssd300_resnet50` (torchvision ResNet-50 through layer3 at stride 8, BatchNorm
extras, 3x3 heads, 8732 priors, ImageNet normalization); the recipe is NVIDIA's 8-GPU one (batch
32 per GPU, SGD, 65 epochs, x0.1 at epochs 43 and 54, AMP). Their loss and matching are the
paper's (IoU 0.5, 3 hard negatives per positive); their augmentation has no zoom-out.

Before training: prepare COCO with TFDS (`tfds build coco/2017 --data_dir=DIR`) and convert
torchvision's ImageNet ResNet-50 (IMAGENET1K_V1, as NVIDIA's):

    python -m experiments.convert_torchvision --kind=resnet50 --input=resnet50-0676ba61.pth \
        --output=RESNET50_CKPT
    python -m experiments.train --config=experiments/configs/ssd300_resnet50_coco.py \
        --workdir=DIR --config.dataset.data_dir=DIR --config.init_checkpoint=RESNET50_CKPT
"""

import ml_collections

from experiments.configs import ssd300_coco

#: COCO train2017 images with annotations (NVIDIA's training set), and the global batch.
COCO_TRAIN_IMAGES = 117_266
BATCH = 256
STEPS_PER_EPOCH = COCO_TRAIN_IMAGES / BATCH  # 458.07


def get_config() -> ml_collections.ConfigDict:
    config = ssd300_coco.get_config()
    config.model = ml_collections.ConfigDict()
    config.model.name = "ssd300_resnet50"          # NVIDIA's SSD300-ResNet50 (ssd_jax.models)
    config.model.freeze_bn = False                 # NVIDIA trains the BatchNorm layers

    config.batch_size = BATCH                      # 32 per GPU x 8 GPUs (BN here syncs over all)
    config.optimizer = "sgd"
    config.momentum = 0.9
    config.weight_decay = 5e-4                     # conv kernels only, as their "tencent trick"
    config.learning_rate = 2.6e-3 * 8 * 32 / 32    # lr * N_gpu * batch/32 = 0.0208
    config.schedule = "piecewise"
    config.warmup_steps = 300                      # NVIDIA's --warmup 300 iterations
    config.warmup_start_factor = 0.0               # their warmup is linear from 0
    config.num_train_steps = round(65 * STEPS_PER_EPOCH)  # 65 epochs: 29,775 steps
    config.lr_boundaries = (round(43 * STEPS_PER_EPOCH),  # x0.1 at epoch 43: step 19,697
                            round(54 * STEPS_PER_EPOCH))  # and at epoch 54: step 24,736
    config.lr_decay = 0.1
    config.dtype = "bfloat16"                      # their AMP (float16); params stay float32
    config.init_checkpoint = ""                    # converted torchvision resnet50 (--kind=resnet50)

    config.matching_iou = 0.5                      # the paper's positives, as NVIDIA's
    config.neg_pos_ratio = 3.0                     # their hard negative mining

    config.dataset.augment_expand = False          # NVIDIA has no zoom-out
    config.dataset.augment_crop = True             # their SSDCropping: the paper's min-IoU crops
    config.dataset.augment_flip = True             # horizontal flip, p 0.5
    config.dataset.augment_photometric = True      # their ColorJitter

    config.detect.score_threshold = 0.05           # their decode_single: scores > 0.05
    config.detect.pre_nms_top_k = 200              # their max_num: 200 candidates per class
    config.detect.iou_threshold = 0.5              # their NMS criteria 0.5
    config.detect.max_detections = 200             # their max_output 200 per image
    config.eval_every_steps = 5_000                # ~11 epochs (NVIDIA: at epochs 21..64)
    config.checkpoint_every_steps = 2_500
    return config
