"""ssd_jax: the SSD object detector (Liu et al., 2016) as pure JAX functions and a Flax model.

Core modules (import only jax, flax, optax and numpy): box_ops, priors, box_coder, matching,
loss, postprocess, normalization, augment_params, device_augment, models (+ heads, backbones).
Then, each importing only those before it: config (the config schema); data, evaluation;
workdir (a run's folder); inference, run_eval, export, convert, finetune; train (the trainer);
cli, host (the command layer). Importing any of them changes nothing in the process.
"""

__version__ = "0.1.0"
