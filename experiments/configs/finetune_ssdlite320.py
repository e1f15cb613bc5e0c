"""Fine-tune torchvision's COCO-trained SSDLite320-MobileNetV3 on your own classes (a COCO-JSON or
VOC-XML folder given on the command line): the way most detection projects start.

    python -m experiments.convert_torchvision \
        --input=ssdlite320_mobilenet_v3_large_coco-a79551df.pth --output=$CKPT
    python -m experiments.train --config=finetune_ssdlite320 --workdir=$RUN \
        --config.init_checkpoint=$CKPT --config.dataset.train_annotations=train.json \
        --config.dataset.train_images=train/ --config.dataset.eval_annotations=val.json \
        --config.dataset.eval_images=val/

The classification heads keep the rows of the dataset's classes that COCO has (by name, e.g.
"person", "dog"; `--config.init_class_map=motorcycle:motorbike` for names that differ) and start
the others fresh; the log lists the classes mapped, new and dropped (ssd_jax.finetune). The
recipe is the one torchvision's fine-tuning tutorial and the TF Object Detection API's
fine-tune configs share: the pretrained detector whole (not only the backbone), SGD with
momentum at a learning rate well below the from-scratch one (0.01 vs 0.15), a short warmup, a
short cosine schedule. `--config.trainable=heads` trains the heads only (tiny datasets);
`all_but_backbone` freezes MobileNetV3.
"""

import ml_collections

from experiments.configs import ssdlite320_coco


def get_config() -> ml_collections.ConfigDict:
    config = ssdlite320_coco.get_config()
    config.dataset.kind = "coco_json"              # or voc_xml with --config.dataset.root=...
    config.metric = "coco"                         # COCO AP@[.5:.95] (pycocotools)
    config.init_checkpoint = ""                    # the converted torchvision detector (required)
    config.trainable = "all"                       # all | all_but_backbone | heads

    config.batch_size = 32
    config.num_train_steps = 3000                  # ~100 epochs of 1000 images
    config.learning_rate = 0.01                    # torchvision's tutorial: 0.005 at batch 2-4
    config.warmup_steps = 100                      # linear from 0
    config.schedule = "cosine"
    config.dtype = "float32"                       # CPUs and GPUs alike; bfloat16 on TPUs
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    return config
