#!/usr/bin/env bash
# The checks that need a GPU, in one go: the gpu-marked tests, then the device benchmark.
#
#   bash benchmarks/gpu_check.sh [OUTDIR] [benchmarks/device.py arguments ...]
#
# Logs go to OUTDIR (runs/gpu). Run from the repository root with a Python that has torch (CUDA)
# and transformers; the package is imported from the checkout, so nothing needs installing.
set -u
out=${1:-runs/gpu}
shift || true
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py=${PYTHON:-python3}
nvidia-smi -L 2>&1 | tee "$out/device.txt"
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee -a "$out/device.txt"
timeout "${TEST_TIMEOUT:-300}" $py -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_profiling.py \
    2>&1 | tee "$out/pytest.log"
timeout "${BENCH_TIMEOUT:-300}" $py benchmarks/device.py --json "$@" 2>&1 | tee "$out/device.log"
