"""TensorFlow for host-side data work, with every GPU hidden from it (done once, on import).

Modules of `ssd_jax.data` import `tf` from here, so TensorFlow never grabs accelerator memory
that JAX needs.
"""

from __future__ import annotations

import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # devices already initialized: nothing left to hide
    pass

__all__ = ["tf"]
