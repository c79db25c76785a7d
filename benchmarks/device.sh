#!/usr/bin/env bash
# Every benchmark at GPU/TPU sizes, one summary table (see benchmarks/device.py). Run from the repo root:
#   bash benchmarks/device.sh            # on the first GPU or TPU; under 5 minutes
#   bash benchmarks/device.sh --smoke    # tiny sizes on any machine
set -euo pipefail
cd "$(dirname "$0")/.."
# JAX and PyTorch share the GPU: no 75% preallocation by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
fi
"${PYTHON:-python}" -c "import jax; print('jax', jax.__version__, jax.devices())"
exec timeout "${DEVICE_BENCH_TIMEOUT:-600}" "${PYTHON:-python}" -m benchmarks.device "$@"
