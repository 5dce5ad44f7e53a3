#!/usr/bin/env bash
# One prepared run on a CUDA machine that already has CuPy, PyTorch and onnx:
# install onnxgrad without dependencies, time the training-step benchmark
# against PyTorch CUDA, then run the gpu-marked tests.  Logs go to $OUT (or
# ./gpu-logs).  Usage: bash benchmarks/gpu_check.sh [TEST_SECONDS]
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import cupy, numpy, torch, onnx; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__, 'onnx', onnx.__version__)" | tee -a "$out/device.txt"
timeout 200 python3 benchmarks/bench_step.py --device cuda --seconds 3 --warmup 1 --cuda-graphs on,off 2>&1 \
    | grep -v -i warn | tee "$out/gpu_bench.log"
timeout "${1:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    --durations=5 tests/ > "$out/gpu_tests.log" 2>&1
echo "pytest exit $?" >> "$out/gpu_tests.log"
tail -40 "$out/gpu_tests.log"
