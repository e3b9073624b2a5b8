#!/usr/bin/env bash
# GPU check of the compiled multi-scale deformable attention op, for a machine with a GPU,
# a CUDA build of torch and nvcc (e.g. torch 2.11 / CUDA 13 / Python 3.12, no Detectron2 needed):
#
#   tools/gpu_check.sh            # PYTHON=python3, arch of the visible GPU, MAX_JOBS=8
#
# 1. builds dinov2od._C in place with FORCE_CUDA=1 for the local GPU's architecture;
# 2. runs tests/layers/test_msda_kernels.py (CUDA tests included; DINOV2OD_EXPECT_CUDA_EXT=1) and
#    tests/d2/test_amp_cuda.py (fp16 training with a GradScaler: the training loop's AMP code,
#    dinov2od/d2/engine/amp.py, imports only torch, so it runs here without Detectron2);
# 3. runs tools/benchmark.py on cuda: the op (PyTorch path vs CUDA kernel, float32 and bfloat16),
#    then the whole detector (dinov2od.benchmark; the default preset, built without Detectron2).
# Prints everything; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
command -v nvcc && nvcc --version | tail -2 || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
"$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "no GPU visible to torch: nothing to check"
print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")

# the system compiler, not a relocated toolchain wrapper: on the lent H100/H200 image CXX is
# /opt/gcc/bin/g++, and any extension it builds (even a 3-line load_inline one) segfaults when a
# TORCH_CHECK throws, while /usr/bin/g++ (same gcc 13.3) works. Override: GPU_CHECK_CXX/GPU_CHECK_CC.
if [ -x "${GPU_CHECK_CXX:-/usr/bin/g++}" ]; then
  export CXX="${GPU_CHECK_CXX:-/usr/bin/g++}" CC="${GPU_CHECK_CC:-/usr/bin/gcc}"
fi
echo "compilers: CXX=${CXX:-default} CC=${CC:-default}"
echo "== build (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch})"
rm -f dinov2od/_C.*.so
start=$SECONDS
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS="${MAX_JOBS:-8}" \
  "$PY" setup.py -q build_ext --inplace --force
echo "built in $((SECONDS - start)) s"
"$PY" -c "import torch; from dinov2od import _C; print('dinov2od._C: cuda', _C.with_cuda(), 'archs', _C.cuda_archs(), 'cpu', _C.cpu_capability())"

echo "== tests"
DINOV2OD_EXPECT_CUDA_EXT=1 DINOV2OD_EXPECT_DETECTRON2=0 "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/layers/test_msda_kernels.py tests/d2/test_amp_cuda.py

echo "== benchmark (cuda)"
"$PY" tools/benchmark.py --section msda --device cuda --repeats 50 --warmup 5

echo "== whole-model benchmark (cuda; the default preset, built without Detectron2)"
"$PY" tools/benchmark.py --section model --device cuda --presets default --runtimes torch \
  --backbones vits14 vitb14 dinov3-s16 --sizes 448 644 --batches 1 8 --dtypes fp32 bf16 --model-repeats 20

echo "== gpu check passed"
