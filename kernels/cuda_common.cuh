// Small helpers shared by the .cu files.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#define LRT_CUDA_TRY(expr)                        \
  do {                                            \
    cudaError_t lrt_err_ = (expr);                \
    if (lrt_err_ != cudaSuccess) return lrt_err_; \
  } while (0)

namespace lrt {

inline cudaStream_t as_stream(uintptr_t s) {
  return reinterpret_cast<cudaStream_t>(s);
}

inline unsigned blocks_for(int64_t n, unsigned threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

// gridDim.y (and z) is limited to 65535: kernels that put rows on blockIdx.y launch at most that many and loop
// over the rest (grid-stride in y), so outputs taller than 65535 rows are covered.
inline unsigned grid_y(int64_t rows) {
  return static_cast<unsigned>(rows < 65535 ? (rows < 1 ? 1 : rows) : 65535);
}

// Stream-ordered allocation (cudaMallocAsync / cudaFreeAsync) needs memory-pool support, which some virtualized
// GPUs (vGPU, some MIG / WSL setups) and older drivers lack: it is asked once per device
// (cudaDevAttrMemoryPoolsSupported) and, where missing, scratch memory falls back to cudaMalloc / cudaFree
// (cudaFree waits for the device: slower, but correct).
constexpr int kMaxDevices = 64;

inline bool memory_pools_supported(int device) {
  static std::atomic<int> known[kMaxDevices];  // 0 = not asked yet, 1 = yes, 2 = no
  if (device < 0 || device >= kMaxDevices) return false;
  int v = known[device].load(std::memory_order_relaxed);
  if (v == 0) {
    int attr = 0;
    if (cudaDeviceGetAttribute(&attr, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess) {
      cudaGetLastError();  // clear the error so the caller's next cudaGetLastError does not see it
      attr = 0;
    }
    v = attr ? 1 : 2;
    known[device].store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

inline bool current_device_has_pools() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return memory_pools_supported(device);
}

inline cudaError_t scratch_alloc(void** ptr, size_t bytes, cudaStream_t stream) {
  return current_device_has_pools() ? cudaMallocAsync(ptr, bytes, stream) : cudaMalloc(ptr, bytes);
}

inline void scratch_free(void* ptr, cudaStream_t stream) {
  if (ptr == nullptr) return;
  if (current_device_has_pools())
    cudaFreeAsync(ptr, stream);
  else
    cudaFree(ptr);
}

}  // namespace lrt
