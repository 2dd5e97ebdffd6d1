#!/usr/bin/env bash
# One prepared device check for an NVIDIA machine without network access (sized for an H200 check machine:
# well under 8 minutes). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # build, GPU tests, kernel timings
#     GPU_CHECK_BUILD_ONLY=1 bash benchmarks/gpu_check.sh   # the CUDA build step alone (works without a GPU)
#
# Needs: nvcc (12.x or 13.x), CMake >= 3.24, ninja, pybind11, numpy, pytest; optional: cuda-python
# (cuda-bindings: the kernel parity tests), PyTorch with CUDA (buffers, CUDA-event timings and the interpolate
# baseline), CuPy. Never touches the network: the native core is built with CMake directly into
# build/gpu-check (no pip, no torch download) and its _C is copied next to the sources (ignored by git).
# Environment: CUDAARCHS (default: this GPU's compute capability from nvidia-smi, else 90), GPU_CHECK_PYTHON
# (default python3), GPU_CHECK_REPEATS (timing repeats, default 50).
# Anything that needs TensorRT or ONNX Runtime GPU is reported as not available when it is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_CHECK_PYTHON:-python3}
BUILD=build/gpu-check
T0=$(date +%s)
status=0
section() { printf '\n==== %s (t=%ss)\n' "$1" "$(($(date +%s) - T0))"; }

section "machine"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi: not available"
nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: not on PATH"
cmake --version 2>/dev/null | head -n 1
"$PY" - <<'EOF'
import importlib, importlib.util, platform
print("python", platform.python_version())
for mod in ("numpy", "pybind11", "pytest", "torch", "cupy", "cuda.bindings", "onnxruntime", "tensorrt"):
    try:
        m = importlib.import_module(mod)
        extra = ""
        if mod == "torch":
            extra = f" cuda={m.version.cuda} available={m.cuda.is_available()}"
        if mod == "onnxruntime":
            extra = f" providers={m.get_available_providers()}"
        print(f"{mod:14s} {getattr(m, '__version__', '?')}{extra}")
    except Exception as err:  # noqa: BLE001 - report, never fail here
        print(f"{mod:14s} not available ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})")
EOF

section "build the native core with CUDA (CMake, no network)"
if [ -z "${CUDAARCHS:-}" ]; then
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  export CUDAARCHS="${cc:-90}"
fi
echo "CUDAARCHS=$CUDAARCHS"
mkdir -p build
PYBIND11_DIR=$("$PY" -m pybind11 --cmakedir 2>/dev/null)
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
if ! cmake -S . -B "$BUILD" ${GEN[@]+"${GEN[@]}"} -DCMAKE_BUILD_TYPE=Release -DLEGION_RT_CUDA=ON \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$PYBIND11_DIR" >"$BUILD.configure.log" 2>&1; then
  tail -n 30 "$BUILD.configure.log"
  echo "RESULT build: FAILED (configure)"
  exit 1
fi
grep -E "legion_rt:" "$BUILD.configure.log"
if ! cmake --build "$BUILD" -j "$(nproc)" >"$BUILD.build.log" 2>&1; then
  tail -n 40 "$BUILD.build.log"
  echo "RESULT build: FAILED (compile)"
  exit 1
fi
so=$(find "$BUILD" -maxdepth 2 -name '_C*.so' | head -n 1)
# copy then rename: a process that has the old _C loaded keeps its file (overwriting a mapped .so crashes it)
cp -f "$so" "legion_rt/.$(basename "$so").tmp" && mv -f "legion_rt/.$(basename "$so").tmp" "legion_rt/$(basename "$so")"
echo "built $so -> legion_rt/$(basename "$so") in $(($(date +%s) - T0)) s"
"$PY" -c "from legion_rt import ops; print('cuda_compiled', ops.cuda_compiled(), 'cuda_available', ops.cuda_available())"
if [ -n "${GPU_CHECK_BUILD_ONLY:-}" ]; then
  echo "RESULT build: ok (GPU_CHECK_BUILD_ONLY: stopping here)"
  exit 0
fi

section "GPU-marked tests (kernel parity with the CPU kernels; TensorRT tests skip without TensorRT)"
# -rs lists every skip with its reason: what needs TensorRT / ONNX Runtime GPU shows up there.
# tests/test_device_resident.py: the device-resident request stages (DevicePath) on real device memory, and ONNX
# Runtime IOBinding on device buffers (skips with its reason without onnxruntime-gpu).
timeout 300 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_ops_cuda.py tests/test_tensorrt.py \
  tests/test_device_path.py tests/test_device_resident.py
rc=$?
echo "RESULT gpu tests: exit $rc"
[ $rc -ne 0 ] && status=1

section "kernel timings: CUDA vs CPU kernels vs PyTorch CUDA interpolate"
timeout 240 "$PY" benchmarks/gpu_kernels.py --repeats "${GPU_CHECK_REPEATS:-50}"
rc=$?
echo "RESULT kernel timings: exit $rc"
[ $rc -ne 0 ] && status=1

section "not available on this machine"
"$PY" - <<'EOF'
import importlib.util
if importlib.util.find_spec("tensorrt") is None:
    print("TensorRT: not installed -> build-engines, TensorRT engines and the TensorRT LLM were NOT run")
else:
    print("TensorRT: installed (not exercised by this script: it needs an exported artifact directory)")
try:
    import onnxruntime as ort
    gpu = [p for p in ort.get_available_providers() if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
except ImportError:
    gpu = []
print("ONNX Runtime GPU providers:", gpu or "none -> IOBinding on device buffers (the device-resident request), the "
      "[SEG] hidden state left on the device and the GQA graph on CUDA were NOT run")
EOF
section "done"
echo "RESULT overall: $([ $status -eq 0 ] && echo ok || echo FAILED) in $(($(date +%s) - T0)) s"
exit $status
