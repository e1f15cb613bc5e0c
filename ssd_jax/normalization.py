"""The input normalizations of the models, RGB in [0, 255] pixel units: the one definition the
models subtract and divide by and the augmentations fill zoom-out canvases with (both the
device and the host augmentation import them from here, not from `models`)."""

#: Caffe's SSD mean: the VGG16 and compact models subtract it.
CAFFE_MEAN = (123.0, 117.0, 104.0)
#: torchvision's ssd300_vgg16 mean ([0.48235, 0.45882, 0.40784] * 255): exact for converted weights.
TORCHVISION_MEAN = (0.48235 * 255.0, 0.45882 * 255.0, 0.40784 * 255.0)
#: Unit std: Caffe's and torchvision's SSD300 divide [0,255] pixels by nothing (torchvision's
#: image_std 1/255 on [0,1] inputs is the same).
UNIT_STD = (1.0, 1.0, 1.0)
#: MobileNetV3's input normalization: [0, 255] -> [-1, 1] (torchvision's mean = std = 0.5 on [0, 1]).
HALF_RANGE = (127.5, 127.5, 127.5)
#: torchvision's ImageNet normalization ([0.485, 0.456, 0.406] and [0.229, 0.224, 0.225] on [0, 1])
#: in [0, 255] units: the inputs torchvision's ImageNet ResNet weights expect.
IMAGENET_MEAN = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
IMAGENET_STD = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)
