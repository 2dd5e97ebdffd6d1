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

}  // namespace lrt
