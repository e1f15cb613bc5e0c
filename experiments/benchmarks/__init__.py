"""Benchmark suites run by `python -m experiments.benchmark --suite NAME`.

Each module here defines `define_flags(fv)` (optional: its absl flags, named `<suite>_<option>`,
defined on the FlagValues it is given) and `run(args) -> list[Row]`, where `args` is a namespace
of the parsed flag values (`args.quick`, `args.peer`, `args.suite`, its own flags; read optional
ones with getattr and a default). Suites import only jax/flax/optax/numpy/absl and ssd_jax's core
(and torch for the peer, lazily), except `data`, which needs TensorFlow; they must run on a bare
accelerator host.
"""
