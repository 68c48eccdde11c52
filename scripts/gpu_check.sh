#!/usr/bin/env bash
# One-command GPU check: on a machine with a CUDA GPU, run the GPU tests (the ones that skip
# on CPU machines) and print adaptation throughput (samples/s) for sequential vs batched
# episodes and for 1 vs 2 Ray actors.
#
#   scripts/gpu_check.sh                 # from the repository root; PYTHON=... to pick python
#   scripts/gpu_check.sh --dry-run       # no GPU: the same tests on the CPU (logical GPUs in Ray)
#
# The GPU tests (tests/gpu_helpers.py `needs_gpu`; every test whose name says cuda/gpu):
#   - every registered engine adapts on cuda:0 as on the CPU (BatchNorm and GroupNorm nets),
#     its state stays on the device, reset() works there, batched episodes equal sequential;
#   - the trainer: SGD on the GPU gives the CPU's weights, staged (pinned) batches, bf16/fp16,
#     augmentation on the device, one device read per epoch;
#   - `ttt-pipe train --gpus 1` and `ttt-pipe adapt --gpus-per-actor 1` on a GPU actor of a
#     local Ray cluster: device cuda:0 recorded, predictions agree with a CPU run.
# --dry-run runs them on the CPU: it checks the tests and the device plumbing, not CUDA.
#
# Exit codes: 0 all GPU tests passed and the throughput ran; 1 a test or the benchmark failed;
# 77 no CUDA GPU here (nothing was checked; 77 is the "skipped" code of automake/meson tests).
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export MKL_CBWR="${MKL_CBWR:-AUTO}" TTT_PIPE_OFFLINE=1

if [[ $dry_run == 1 ]]; then
  echo "gpu_check: dry run on the CPU (TTT_PIPE_GPU_DRY_RUN=1): the GPU tests' code, not CUDA"
  export TTT_PIPE_GPU_DRY_RUN=1
  exec "$PYTHON" -m pytest -q -rs -p no:cacheprovider -k "cuda or gpu" tests
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU (torch.cuda.is_available() is False with $PYTHON); nothing checked, exit 77"
  exit 77
fi
"$PYTHON" -c 'import torch; print("gpu_check:", torch.cuda.device_count(), "x", torch.cuda.get_device_name(0), "torch", torch.__version__)'

# The GPU tests: every test whose name says cuda/gpu (they skip without CUDA). A "needs a GPU"
# skip left over means one of them did not run: that fails the check.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! "$PYTHON" -m pytest -q -rs -p no:cacheprovider -k "cuda or gpu" tests 2>&1 | tee "$log"; then
  echo "gpu_check: GPU tests FAILED"; exit 1
fi
if grep -qi "needs a GPU\|needs CUDA" "$log"; then
  echo "gpu_check: some GPU tests were skipped on a CUDA machine"; exit 1
fi
if ! grep -qE "[0-9]+ passed" "$log"; then
  echo "gpu_check: no GPU test ran"; exit 1
fi

"$PYTHON" benchmarks/gpu_throughput.py
echo "gpu_check: OK"
