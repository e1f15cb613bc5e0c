"""A profile of the train step or of inference: a `jax.profiler` trace and the top device ops.

    python -m experiments.benchmarks.device_profile --out=DIR [--program=train|inference]
        [--model=ssd300_vgg16] [--batch=64] [--dtype=bf16] [--steps=5]

Builds the model suite's train step (`experiments.benchmarks.model.train_step`: the SSD300 VOC
recipe's step on a synthetic batch already on the device) or the inference suite's end-to-end
program (images -> detections), runs a few warm-up steps, then traces
`--steps` steps into DIR (TensorBoard's profile plugin or Perfetto open it:
`DIR/plugins/profile/*/*.trace.json.gz`) and prints, from the trace's device lines, the ops that
took the most device time per step, with the device's busy time against the step's wall time.
On a CPU host the trace has no device lines and the host's XLA op lines are read instead.
Needs no TensorFlow (runs on a bare accelerator image).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
from absl import flags

from experiments.benchmarks import model as model_suite
from ssd_jax import cli, models
from ssd_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Folder for the trace (created).")
flags.DEFINE_enum("program", "train", ["train", "inference"],
                  "train: the train step; inference: images -> final detections (the inference "
                  "suite's program: network, decode, per-class NMS, top 200).")
flags.DEFINE_enum("model", "ssd300_vgg16", list(model_suite.MODEL_NAMES), "Model to profile.")
flags.DEFINE_integer("batch", 64, "Images per step.")
flags.DEFINE_enum("dtype", "bf16", ["fp32", "bf16"], "Compute dtype.")
flags.DEFINE_integer("steps", 5, "Steps traced (after 3 warm-up steps).")
flags.DEFINE_integer("top", 15, "Ops listed.")


def _trace_events(trace_dir: str) -> dict:
    """The newest Chrome-format trace (`*.trace.json.gz`) under `trace_dir`, parsed."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise UserError(f"no *.trace.json.gz under {trace_dir}: the profiler wrote no trace")
    with gzip.open(paths[-1], "rt") as f:
        return json.load(f)


def top_ops(trace: dict, steps: int, top: int = 15) -> str:
    """A text table of the `top` ops by device time per step in a Chrome-format `trace`: the
    events of the device processes ('/device:...'), each thread (stream or op line) summed
    apart, the line with the most time shown (no event counted twice)."""
    events = trace.get("traceEvents", [])
    pid_names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    tid_names = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {p for p, n in pid_names.items() if "/device:" in n and "CPU" not in n}
    host_ops = not device
    lines: dict = collections.defaultdict(collections.Counter)
    counts: dict = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if device and e["pid"] not in device:
            continue
        line = (pid_names.get(e["pid"], str(e["pid"])), tid_names.get((e["pid"], e["tid"]), ""))
        if host_ops and "XLA" not in line[1] and "Thunk" not in line[1] and "Ops" not in line[1]:
            continue
        lines[line][e["name"]] += e["dur"]
        counts[line][e["name"]] += 1
    if not lines:
        return "(the trace has no device op events)"
    busiest = sorted(lines.items(), key=lambda kv: -sum(kv[1].values()))
    out = [f"{line[0]} / {line[1]}: {sum(totals.values()) / steps / 1e3:.2f} ms busy per step, "
           f"{len(totals)} distinct ops" for line, totals in busiest[:3]]
    line, totals = busiest[0]
    whole = sum(totals.values())
    out.append(f"\ntop {top} ops of {line[0]} / {line[1]} (ms per step, share of its busy time):")
    for name, us in totals.most_common(top):
        calls = counts[line][name] // steps
        out.append(f"  {us / steps / 1e3:9.3f} ms {100 * us / whole:5.1f}%  x{calls:<3d} "
                   f"{name[:110]}")
    return "\n".join(out)


def _inference_step(name: str, batch: int, dtype_name: str) -> Any:
    """`run()`: the inference suite's end-to-end program of `name` (random trained-like weights)
    on a batch of uint8 images already on the device; returns the detections."""
    import jax.numpy as jnp

    from experiments.benchmarks import inference as inference_suite

    dtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
    model, variables = inference_suite.our_model(None, dtype, name)
    infer = inference_suite.make_inference_fn(model, name)
    variables = jax.device_put(variables)
    images = jax.device_put(inference_suite.images_batch(batch, size=model.prior_spec.image_size))
    return lambda: infer(variables, images)


def profile(out: str, program: str, name: str, batch: int, dtype_name: str, steps: int,
            top: int) -> str:
    """Trace `steps` calls of `program` ("train" or "inference") of model `name` into `out`;
    returns the report text."""
    if program == "train":
        config = model_suite.voc_train_config(name, dtype_name)
        model = models.from_config(config, model_suite.NUM_CLASSES, axis_name="data")
        run_step = model_suite.train_step(config, model, batch)
    else:
        run_step = _inference_step(name, batch, dtype_name)
    for _ in range(3):
        jax.block_until_ready(run_step())
    start = time.perf_counter()
    with jax.profiler.trace(out):
        for _ in range(steps):
            result = run_step()
        jax.block_until_ready(result)
    wall = (time.perf_counter() - start) / steps * 1e3
    dev = jax.devices()[0]
    head = (f"profile: {name} {program} program, batch {batch}, {dtype_name}, {steps} steps "
            f"traced on {dev.device_kind} ({dev.platform}), jax {jax.__version__}; {wall:.2f} ms per step "
            f"under the tracer ({batch / wall * 1e3:.0f} img/s); trace in {out}")
    return head + "\n" + top_ops(_trace_events(out), steps, top)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.out:
        raise UserError("--out: give a folder for the trace")
    if FLAGS.batch < 1 or FLAGS.steps < 1:
        raise UserError("--batch and --steps must be >= 1")
    print(profile(FLAGS.out, FLAGS.program, FLAGS.model, FLAGS.batch, FLAGS.dtype, FLAGS.steps,
                  FLAGS.top), flush=True)


if __name__ == "__main__":
    cli.run(main)
