"""The paper's augmentation in numbers (arXiv 1512.02325 sec. 2.2; Caffe SSD's training
prototxt): the one definition both implementations draw from, `ssd_jax.device_augment` (JAX,
inside the train step) and `ssd_jax.data.host_augment` (TensorFlow, in tf.data)."""

from ssd_jax.normalization import CAFFE_MEAN

#: zoom-out canvases are filled with the mean the VGG/compact models subtract
FILL_RGB = CAFFE_MEAN
EXPAND_PROB = 0.5          # zoom out with this probability
MAX_EXPAND = 4.0           # largest canvas side / image side
#: Caffe's batch samplers: the whole image, 5 min-IoU samplers, 1 unconstrained patch sampler
MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9)
NUM_SAMPLERS = 2 + len(MIN_IOUS)
SAMPLER_MIN_IOUS = (*MIN_IOUS, -1.0)  # the 6 patch samplers' minimum IoU (-1: unconstrained)
NUM_TRIALS = 50            # patches each sampler tries
MIN_SCALE = 0.3            # patch side / image side, per side, U[MIN_SCALE, 1]
MIN_ASPECT, MAX_ASPECT = 0.5, 2.0  # patch width / height in pixels
FLIP_PROB = 0.5
PHOTOMETRIC_PROB = 0.5     # each photometric op applies with this probability
BRIGHTNESS_DELTA = 32.0    # +- in [0, 255] pixel units
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA_DEGREES = 18.0
