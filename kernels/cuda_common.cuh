// Small helpers shared by the .cu files.
#pragma once

#include <cuda_runtime.h>

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

}  // namespace lrt
