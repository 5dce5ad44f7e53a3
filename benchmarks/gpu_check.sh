#!/usr/bin/env bash
# One prepared run on a CUDA machine that already has CuPy, PyTorch and onnx:
# install onnxgrad without dependencies, time the training-step benchmark
# against PyTorch CUDA, then run the gpu-marked tests.  Logs go to $OUT (or
# ./gpu-logs).  Usage: bash benchmarks/gpu_check.sh [TEST_SECONDS]
#
# Wheels in .whl/ are installed first (a machine that cannot reach PyPI gets
# the cuDNN frontend that way; its own CuPy and cuDNN runtime are used), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl nvidia-cudnn-frontend==1.32.0
set -u
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import cupy, numpy, torch, onnx; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__, 'onnx', onnx.__version__)" | tee -a "$out/device.txt"
python3 -c "from onnxgrad.backend import get_backend; print(*get_backend('cuda').describe(), sep='\n')" \
    | tee -a "$out/device.txt"
timeout 200 python3 benchmarks/bench_step.py --device cuda --seconds 3 --warmup 1 --cuda-graphs on,off 2>&1 \
    | grep -v -i warn | tee "$out/gpu_bench.log"
timeout "${1:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    --durations=5 tests/ > "$out/gpu_tests.log" 2>&1
echo "pytest exit $?" >> "$out/gpu_tests.log"
tail -40 "$out/gpu_tests.log"
