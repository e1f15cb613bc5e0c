"""ssd_jax: the SSD object detector (Liu et al., 2016) as pure JAX functions and a Flax model.

Core modules (import only jax, flax, optax and numpy):
  box_ops, priors, box_coder, matching, loss, models, postprocess.
Host-side modules (TensorFlow, tfds, clu, orbax, pycocotools): data, evaluation, train_lib.
"""

__version__ = "0.1.0"
