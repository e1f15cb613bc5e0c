"""The embedded default: the compact SSD trained from scratch on the synthetic shapes dataset.

Runs on a 2-core CPU in minutes: `python -m experiments.train --workdir=DIR`. Every other config
starts from this one and changes a few fields; any field can be overridden on the command line
(`--config.num_train_steps=100`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model: a name from ssd_jax.models.MODELS; its prior spec fixes the input size.
    config.model = ml_collections.ConfigDict()
    config.model.name = "compact"      # a name of ssd_jax.models.MODELS (README: the models table)
    # Options of the "compact" builder (ssd_jax.models.compact_ssd); the other configs replace
    # config.model with their builder's options (the VGG16 builders: prior_spec, image_mean, image_std).
    config.model.freeze_bn = False     # BatchNorm keeps its running statistics in training (True:
                                       # for fine-tuning with small per-device batches)
    config.model.width_mult = 1.0      # multiplies every channel count
    config.model.depths = (0, 3, 1, 1)  # stride-1 3x3 convs after each backbone stage's stride-2
                                        # one: three on the stride-4 source map, where the small
                                        # objects were lost (README: how the recipe was chosen)
    config.model.top_down = False      # FPN-style fusion into the backbone's source maps (measured:
                                       # 0.54 vs 0.64 mAP at 3000 steps, and 25% slower: off)
    # 6 source maps (strides 4..128, COMPACT6_PRIORS, 3572 priors) or 5 (strides 8..128, 1524).
    # With 5, 71% of the objects under 8% of the side have no prior at IoU 0.5; the stride-4 map
    # took the 3000-step mAP from 0.68 to 0.74 (matching IoU 0.3) for 25% more time per step.
    config.model.num_maps = 6

    # Data: ssd_jax.data.pipeline reads config.dataset. Every field of every kind is declared
    # here (the fields of the other kinds are ignored); ssd_jax.data.sources.validate_dataset_config
    # checks the ones the chosen kind needs, so any kind can be set from the command line:
    #   --config.dataset.kind=coco_json --config.dataset.train_annotations=A.json ...
    config.dataset = ml_collections.ConfigDict()
    config.dataset.kind = "synthetic"  # synthetic | tfds | coco_json | voc_xml
    # kind=synthetic: ssd_jax.data.synthetic shapes, generated once and held in memory.
    config.dataset.seed = 0            # (synthetic) the images' seed (independent of config.seed)
    config.dataset.num_train = 16000   # (synthetic) training images (1.8 GB at 192 px, ~35 s; 6000
                                       # left a train/val mAP gap of 0.87/0.83, 16000 gave +0.015)
    config.dataset.num_eval = 500      # (synthetic) validation images (a disjoint split): the
                                       # split every recipe choice in these comments was made on
    config.dataset.num_test = 1000     # (synthetic) held-out test images, evaluated once after
                                       # training and never used to choose anything; 0 = none
    config.dataset.test_seed = 1       # (synthetic) the test images' own seed
    config.dataset.image_size = 192    # (synthetic) side of the generated images
    config.dataset.max_object_size = 0.70  # (synthetic) largest shape side, fraction of the image
                                           # side (log-uniform from 0.05)
    config.dataset.cache_dir = ""      # (synthetic) folder for an .npz cache of the images; "" = none
    config.dataset.generate_processes = 2  # (synthetic) worker processes generating the images
                                           # while training compiles (0: in this process; the
                                           # images are the same either way)
    # kind=tfds: TFDS datasets prepared with `tfds build NAME --data_dir=DIR`.
    config.dataset.name = ""           # (tfds) e.g. "voc/2007+voc/2012" (joined) or "coco/2017"
    config.dataset.data_dir = ""       # (tfds) the folder the TFDS data was prepared in
    config.dataset.shuffle_buffer = 10_000  # (tfds) examples in the training shuffle buffer
    # kind=tfds and kind=voc_xml: split names.
    config.dataset.train_split = "trainval"  # (tfds, voc_xml) TFDS split or ImageSets/Main/<name>.txt
    config.dataset.eval_split = "test"       # (tfds, voc_xml) the evaluation split
    # kind=coco_json: COCO-format annotation files and image folders.
    config.dataset.train_annotations = ""  # (coco_json) training annotation .json
    config.dataset.train_images = ""       # (coco_json) folder of the training images
    config.dataset.eval_annotations = ""   # (coco_json) evaluation annotation .json
    config.dataset.eval_images = ""        # (coco_json) folder of the evaluation images
    # kind=voc_xml: a Pascal VOC-style folder.
    config.dataset.root = ""           # (voc_xml) folder with Annotations/, JPEGImages/, ImageSets/Main/
    config.dataset.class_names = ()    # (voc_xml) class names; () = the sorted names found in the XML
    config.dataset.use_difficult = True  # (tfds, voc_xml) train on objects marked difficult (eval
                                         # always ignores them, as the VOC devkit)
    # The paper's augmentation (ssd_jax.data.augment), each step switchable. Zoom-out and min-IoU
    # crops pay off over 100k+ steps; in this 10-minute run they cost mAP (measured at 600 steps:
    # 0.09 with both, 0.17 without zoom-out, 0.26 without either), so the default keeps flips and
    # photometric distortion only. The VOC/COCO configs use the full set.
    config.dataset.augment_photometric = True  # brightness, contrast, saturation, hue
    config.dataset.augment_expand = False      # zoom out with p 0.5 onto a mean-filled canvas
    config.dataset.max_expand = 4.0            # largest zoom-out ratio (the paper's 4)
    config.dataset.augment_crop = False        # min-IoU random crop (7 samplers, 50 trials)
    config.dataset.augment_flip = True         # horizontal flip with p 0.5
    # Where the augmentation runs: False = tf.data on the host CPU (ssd_jax.data.augment); True =
    # the host only decodes and resizes to a canvas, the jitted train step augments on the
    # accelerator (ssd_jax.augment), so the host's cores no longer cap the step rate.
    config.dataset.augment_on_device = False
    config.dataset.canvas_size = 192           # (augment_on_device) side of the uint8 canvas the
                                               # host places each image on (top-left; scaled down
                                               # only if larger); >= the largest image side
    config.max_boxes = 16              # ground truth per image, padded with label 0 ("no box")

    # Optimization.
    # On a 2-core CPU the compact model trains at ~80-100 img/s whatever the batch, so a fixed time
    # buys a fixed number of images; small batches turn them into more updates (same 19k images:
    # mAP 0.34 at batch 32, 0.43 at 16, 0.46 at 8).
    config.num_train_steps = 7500      # optimizer updates
    config.batch_size = 8              # global batch, split over all devices of all hosts
    config.optimizer = "adamw"         # "sgd" (momentum, Caffe-style L2) or "adamw"
    config.learning_rate = 1e-2        # peak learning rate (0.34 / 0.32 / 0.26 mAP at 1e-2 / 5e-3 / 3e-3)
    config.schedule = "cosine"         # "cosine" (to 0 at the end) or "piecewise" (x lr_decay)
    config.warmup_steps = 500          # linear warmup from warmup_start_factor * lr
    config.warmup_start_factor = 0.0   # (piecewise schedule) first warmup lr = factor * lr
    config.lr_boundaries = ()          # (piecewise schedule) steps where lr is multiplied by lr_decay
    config.lr_decay = 0.1              # (piecewise schedule) the factor at each boundary
    config.momentum = 0.9              # (sgd) momentum
    config.weight_decay = 5e-4         # on conv kernels only (not biases, BN or L2Norm scales)
    config.grad_clip_norm = 0.0        # global-norm gradient clipping; 0 = off
    config.dtype = "float32"           # compute dtype: float32 | bfloat16 (params stay float32)
    config.seed = 0                    # init, data order and augmentation: a function of (seed, step)
    config.init_checkpoint = ""        # orbax checkpoint whose params override the fresh init

    # The loss (ssd_jax.loss.multibox_loss) and matching.

    # Prior <-> ground truth IoU threshold for positives (the paper: 0.5; the VOC/COCO configs keep
    # it). The compact model's priors are sparse (1-2 per object at IoU 0.5, ~11 at 0.3), and more
    # positives per object learn faster here: 3000-step mAP 0.52 / 0.70 / 0.74 at 0.5 / 0.4 / 0.3.
    config.matching_iou = 0.3
    config.neg_pos_ratio = 3.0         # hard negatives per positive, per image
    config.loc_weight = 1.0            # alpha of the paper's L = (L_conf + alpha L_loc) / N

    # Evaluation and detection (ssd_jax.postprocess.detect).

    config.metric = "voc07"            # voc07 (11-point mAP) | voc (area mAP) | coco (AP@[.5:.95])
    config.eval_batch_size = 64        # global eval batch; the last partial batch is padded + masked
    config.detect = ml_collections.ConfigDict()
    config.detect.score_threshold = 0.01  # detections below this score are dropped before NMS
    config.detect.pre_nms_top_k = 200  # candidates per class before NMS (paper: 400 for SSD300)
    # NMS IoU (the paper: 0.45). Positives at IoU >= 0.3 spread the detections of one object
    # wider; on this split 0.3 gave +0.006-0.009 mAP over 0.45 for the same checkpoints.
    config.detect.iou_threshold = 0.3
    config.detect.max_detections = 100  # kept per image after NMS (paper: 200)
    config.num_eval_images_to_draw = 8  # validation images drawn with predictions (TensorBoard, PNG)
    config.draw_score_threshold = 0.3  # detections drawn on those images score above this

    # Bookkeeping.
    config.log_every_steps = 200       # progress line + TensorBoard scalars every N steps
    config.eval_every_steps = 2000     # evaluation (mAP, pictures) every N steps; 0 = only at the end
    config.checkpoint_every_steps = 2000  # orbax checkpoint every N steps (and at the end); 0 = end only
    config.keep_checkpoints = 3        # checkpoints kept (the oldest are deleted)
    config.lost_process_timeout = 60.0  # (multi-process runs) seconds without a sign of life from
                                        # a process after which the others stop with a message
    return config
