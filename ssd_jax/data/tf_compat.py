"""TensorFlow for host-side data work, with every GPU hidden from it.

Modules of `ssd_jax.data` import `tf` from here, so TensorFlow never grabs accelerator memory
that JAX needs (`tf.config.set_visible_devices([], "GPU")`: TensorFlow's own device list, nothing
else in the process). The import is plain: no output is redirected and no environment variable
is set. The commands import TensorFlow quietly first (`ssd_jax.cli.import_tensorflow_quietly`:
its C++ start-up banners dropped); a notebook may set TF_CPP_MIN_LOG_LEVEL=2 itself.
"""

from __future__ import annotations

import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # devices already initialized: nothing left to hide
    pass

__all__ = ["tf"]
