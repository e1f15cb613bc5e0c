#!/usr/bin/env bash
# The accelerator check in one call (issue 17), from the repository root on a machine with a GPU:
#
#     OUT=/tmp/check bash experiments/device_check.sh
#
# 1. the device and versions; 2. `python -m experiments.benchmark --targets` (the four H200
# target rows with torchvision's SSD300 in the same process, achieved TFLOP/s, met / NOT met);
# 3. jax.profiler traces of the SSD300 bf16 batch-64 train step and end-to-end inference with
# their top device ops as text; 4. the model and inference suites over every model at batch 32,
# bf16. Each part has its own time limit so that the whole fits one call of under 8 minutes;
# each writes its text under $OUT as it goes (a part cut short keeps what it printed). Compiles
# are shared between the parts through JAX's persistent compilation cache.
# Needs jax with a GPU backend, flax, optax, absl, numpy, Pillow; torch + torchvision for the peer.
# Imports no TensorFlow, tfds, clu, ml_collections or pycocotools.
set -uo pipefail
OUT=${OUT:-/tmp/ssd_jax_device_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/ssd_jax_jit_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
start=$SECONDS
part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep its output in $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s, at $((SECONDS - start))s) ==="
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "=== $name: exit status $rc (124: cut at its limit) ==="
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c 'import jax, flax, optax, platform; d = jax.devices()[0]
print(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
      f"python {platform.python_version()}; {jax.device_count()} x {d.device_kind} ({d.platform})")
try:
    import torch, torchvision
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"cuda {torch.cuda.is_available()}")
except ImportError as e:
    print(f"no torch peer: {e}")'
} 2>&1 | tee "$OUT/device.txt"

part targets "${TARGETS_LIMIT:-220}" "$PY" -m experiments.benchmark --targets
part profile "${PROFILE_LIMIT:-70}" "$PY" -m experiments.benchmarks.device_profile \
  --out="$OUT/trace" --batch=64 --dtype=bf16 --steps=5
part profile_inference "${PROFILE_LIMIT:-50}" "$PY" -m experiments.benchmarks.device_profile \
  --out="$OUT/trace_inference" --program=inference --batch=64 --dtype=bf16 --steps=5 --top=25
part suites_bf16 "${SUITES_LIMIT:-110}" "$PY" -m experiments.benchmark --suite=model \
  --suite=inference --model_batch=32 --model_dtypes=bf16 --inference_batches=32 \
  --inference_dtypes=bf16
echo "=== done in $((SECONDS - start))s; text in $OUT ==="
