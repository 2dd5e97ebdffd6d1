// Shared helpers for the legion_rt kernels: host/device qualifiers and a small parallel_for.
#pragma once

#if defined(__CUDACC__)
#define LRT_HD __host__ __device__ __forceinline__
#else
#define LRT_HD inline
#endif

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace lrt {

// Number of worker threads for a call: n > 0 is taken as is, 0 means "all hardware threads".
inline int resolve_threads(int n) {
  if (n > 0) return n;
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// Runs fn(begin, end) over [0, count) split into contiguous chunks, one per thread (the calling thread takes
// the first chunk). Exceptions from workers are rethrown on the caller.
template <typename Fn>
void parallel_for(int64_t count, int threads, Fn fn) {
  if (count <= 0) return;
  int64_t t = std::min<int64_t>(std::max(threads, 1), count);
  if (t == 1) {
    fn(int64_t{0}, count);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(t));
  int64_t chunk = (count + t - 1) / t;
  for (int64_t i = 1; i < t; ++i) {
    int64_t b = i * chunk, e = std::min(count, b + chunk);
    if (b >= e) break;
    pool.emplace_back([&, i, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        errors[static_cast<size_t>(i)] = std::current_exception();
      }
    });
  }
  try {
    fn(int64_t{0}, std::min(count, chunk));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace lrt
