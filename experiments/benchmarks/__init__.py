"""Benchmark suites run by `python -m experiments.benchmark --suite NAME`.

Each module here defines `add_arguments(parser)` (optional) and `run(args) -> list[Row]`.
Suites import only jax/flax/optax/numpy (and torch for the peer, lazily), except `data`,
which needs TensorFlow; they must run on a bare accelerator host.
"""
