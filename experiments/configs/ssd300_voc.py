"""The paper's SSD300 on PASCAL VOC: 07+12 trainval, evaluated with VOC07 11-point mAP on 2007 test.

Every value follows the paper (arXiv 1512.02325v5) and its Caffe script `examples/ssd/ssd_pascal.py`
(weiliu89/caffe, branch ssd); experiments/RESULTS.md ("The paper configs, field by field") gives
the source of each field and why the few that differ do.

Before training: prepare the TFDS datasets (`tfds build voc/2007 voc/2012 --data_dir=DIR`) and
convert the ImageNet VGG16 backbone (`python -m experiments.convert_torchvision --kind=vgg16 ...`).

    python -m experiments.train --config=experiments/configs/ssd300_voc.py --workdir=DIR \
        --config.dataset.data_dir=DIR --config.init_checkpoint=VGG16_CKPT
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = ml_collections.ConfigDict()     # the options of ssd_jax.models.ssd300_vgg16
    config.model.name = "ssd300_vgg16"             # the paper's SSD300 (Fig. 2)
    config.model.prior_spec = "ssd300_voc"         # ssd_pascal.py: min_ratio 20, max_ratio 90,
                                                   # conv4_3 at 10%: 8732 priors (ssd_jax.priors)
    config.model.image_mean = (123.0, 117.0, 104.0)  # ssd_pascal.py mean_value [104, 117, 123] (BGR)
    config.model.image_std = (1.0, 1.0, 1.0)       # Caffe subtracts the mean only
    config.dataset.kind = "tfds"
    config.dataset.name = "voc/2007+voc/2012"      # "07+12": trainval of both
    config.dataset.data_dir = ""                   # required: where the TFDS data was prepared
    config.dataset.train_split = "train+validation"  # TFDS names VOC trainval "train+validation"
    config.dataset.eval_split = "test"             # VOC2007 test (of the first name)
    config.dataset.use_difficult = True            # ssd_pascal.py train_on_diff_gt = True
    config.dataset.augment_photometric = True      # ssd_pascal.py distort_param
    config.dataset.augment_expand = True           # expand_param: prob 0.5, max_expand_ratio 4
    config.dataset.max_expand = 4.0
    config.dataset.augment_crop = True             # batch_sampler: the 7 samplers, 50 trials
    config.dataset.augment_flip = True             # transform_param mirror: true
    config.dataset.augment_on_device = True        # the host decodes, the train step augments
    config.dataset.canvas_size = 512               # VOC images are <= 500 px: copied, not resampled
    config.max_boxes = 64                          # VOC images hold at most 42 objects

    config.num_train_steps = 120_000               # solver_param max_iter at batch 32
    config.batch_size = 32                         # batch_size = accum_batch_size = 32
    config.optimizer = "sgd"                       # type "SGD", momentum 0.9
    config.learning_rate = 1e-3                    # base_lr 0.00004 * 25 / loc_weight
    config.schedule = "piecewise"                  # lr_policy "multistep", gamma 0.1
    config.lr_boundaries = (80_000, 100_000)       # stepvalue [80000, 100000, 120000]
    config.lr_decay = 0.1
    config.warmup_steps = 1000                     # (not in Caffe) linear warmup from
    config.warmup_start_factor = 1.0 / 3           # lr / 3 over the first 0.8% of the steps
    config.momentum = 0.9
    config.weight_decay = 5e-4                     # weight_decay 0.0005 (Caffe: not on biases)
    config.dtype = "bfloat16"                      # accelerators; params stay float32
    config.init_checkpoint = ""                    # the converted ImageNet VGG16 (required in practice)

    config.matching_iou = 0.5                      # overlap_threshold 0.5 (the default uses 0.3)
    config.neg_pos_ratio = 3.0                     # neg_pos_ratio 3, mining MAX_NEGATIVE
    config.loc_weight = 1.0                        # loc_weight (3 + 1) / 4; the paper's alpha 1
    config.metric = "voc07"                        # ap_version "11point" (the paper's Table 1)
    config.eval_batch_size = 64
    config.detect.score_threshold = 0.01           # det_out_param confidence_threshold 0.01
    config.detect.pre_nms_top_k = 400              # nms_param top_k 400
    config.detect.iou_threshold = 0.45             # nms_param nms_threshold 0.45
    config.detect.max_detections = 200             # keep_top_k 200
    config.log_every_steps = 100
    config.eval_every_steps = 10_000               # test_interval 10000
    config.checkpoint_every_steps = 5_000
    return config
