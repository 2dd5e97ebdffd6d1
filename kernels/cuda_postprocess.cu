// CUDA mask post-processing: one thread per output pixel, looping over the masks. Every value is computed
// with the formulas of masks.h (the same code the CPU kernel runs), so CPU and GPU agree bit for bit; the
// 1024x1024 intermediate is never stored (each output pixel recomputes the 4 stage-1 values it blends).
// Statistics: warp-aggregated atomics into an int32 scratch, then a finalize kernel writes int64 outputs.
#include <climits>

#include "cuda_common.cuh"
#include "cuda_ops.h"
#include "masks.h"

namespace lrt {
namespace {

struct MaskGeom {
  int n, in_h, in_w, input_h, input_w, out_h, out_w;
  float s1h, s1w, s2h, s2w;  // torch scales of stage 1 (low-res -> image_size) and stage 2 (crop -> output)
};

// Scratch per mask: x0 (min), y0 (min), x1 (max), y1 (max) as int32, area as unsigned long long.
struct MaskStat {
  int x0, y0, x1, y1;
  unsigned long long area;
};

__global__ void init_stats_kernel(MaskStat* stats, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) stats[i] = MaskStat{INT_MAX, INT_MAX, -1, -1, 0ull};
}

__global__ void postprocess_kernel(const float* low_res, MaskGeom g, uint8_t* masks, uint8_t* union_out,
                                   MaskStat* stats) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  for (int y = blockIdx.y; y < g.out_h; y += gridDim.y) {  // grid-stride: gridDim.y is capped at 65535
    const bool inside = x < g.out_w;
    const unsigned lane = threadIdx.x & 31u;
    // Stage-2 taps of this output pixel, then stage-1 taps of the 2 x 2 intermediate pixels it reads.
    LinearTap ty2 = torch_linear_tap(g.s2h, y, g.input_h);
    LinearTap tx2 = torch_linear_tap(g.s2w, inside ? x : 0, g.input_w);
    LinearTap ty1a = torch_linear_tap(g.s1h, ty2.i0, g.in_h), ty1b = torch_linear_tap(g.s1h, ty2.i1, g.in_h);
    LinearTap tx1a = torch_linear_tap(g.s1w, tx2.i0, g.in_w), tx1b = torch_linear_tap(g.s1w, tx2.i1, g.in_w);
    const int64_t plane_in = static_cast<int64_t>(g.in_h) * g.in_w;
    const int64_t plane_out = static_cast<int64_t>(g.out_h) * g.out_w;
    const int64_t idx = static_cast<int64_t>(y) * g.out_w + x;
    uint8_t any = 0;
    for (int m = 0; m < g.n; ++m) {
      const float* src = low_res + m * plane_in;
      float v00 = stage1_value(src, g.in_w, ty1a, tx1a), v01 = stage1_value(src, g.in_w, ty1a, tx1b);
      float v10 = stage1_value(src, g.in_w, ty1b, tx1a), v11 = stage1_value(src, g.in_w, ty1b, tx1b);
      float r0 = torch_lerp(v00, v01, tx2.w0, tx2.w1);
      float r1 = torch_lerp(v10, v11, tx2.w0, tx2.w1);
      const bool on = inside && torch_lerp(r0, r1, ty2.w0, ty2.w1) > 0.0f;
      if (inside) masks[m * plane_out + idx] = on ? 1 : 0;
      any |= on ? 1 : 0;
      if (stats != nullptr) {
        const unsigned ballot = __ballot_sync(0xffffffffu, on);
        if (ballot != 0u) {
          const int xmin = __reduce_min_sync(0xffffffffu, on ? x : INT_MAX);
          const int xmax = __reduce_max_sync(0xffffffffu, on ? x : -1);
          if (lane == 0) {
            atomicMin(&stats[m].x0, xmin);
            atomicMax(&stats[m].x1, xmax);
            atomicMin(&stats[m].y0, y);
            atomicMax(&stats[m].y1, y);
            atomicAdd(&stats[m].area, static_cast<unsigned long long>(__popc(ballot)));
          }
        }
      }
    }
    if (union_out != nullptr && inside) union_out[idx] = any;
  }
}

__global__ void finalize_stats_kernel(const MaskStat* stats, int n, int64_t* bboxes, int64_t* areas) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const MaskStat s = stats[i];
  int64_t* b = bboxes + 4 * static_cast<int64_t>(i);
  if (s.area == 0ull) {
    b[0] = b[1] = b[2] = b[3] = 0;
  } else {
    b[0] = s.x0;
    b[1] = s.y0;
    b[2] = static_cast<int64_t>(s.x1) + 1;
    b[3] = static_cast<int64_t>(s.y1) + 1;
  }
  areas[i] = static_cast<int64_t>(s.area);
}

__global__ void pack_masks_kernel(const uint8_t* masks, int n, int64_t per_mask, int64_t packed_per_mask,
                                  uint8_t* packed) {
  const int64_t total = packed_per_mask * n;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += step) {
    const int64_t m = k / packed_per_mask, j = k - m * packed_per_mask;
    const uint8_t* src = masks + m * per_mask;
    unsigned v = 0u;
    for (int b = 0; b < 8; ++b) {
      const int64_t i = 8 * j + b;
      if (i < per_mask && src[i] != 0) v |= 1u << b;
    }
    packed[k] = static_cast<uint8_t>(v);
  }
}

}  // namespace

int pack_masks_cuda(const uint8_t* masks, int n, int64_t per_mask, uint8_t* packed, uintptr_t stream_handle) {
  const int64_t packed_per_mask = (per_mask + 7) / 8;
  const int64_t total = packed_per_mask * n;
  if (total <= 0) return 0;
  const int64_t blocks = (total + 255) / 256;
  pack_masks_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0, as_stream(stream_handle)>>>(
      masks, n, per_mask, packed_per_mask, packed);
  return static_cast<int>(cudaGetLastError());
}

int postprocess_masks_cuda(const float* low_res, int n, int in_h, int in_w, int image_size, int input_h, int input_w,
                           int out_h, int out_w, uint8_t* masks, uint8_t* union_out, int64_t* bboxes, int64_t* areas,
                           uintptr_t stream_handle) {
  cudaStream_t stream = as_stream(stream_handle);
  MaskGeom g{n,
             in_h,
             in_w,
             input_h,
             input_w,
             out_h,
             out_w,
             torch_linear_scale(in_h, image_size),
             torch_linear_scale(in_w, image_size),
             torch_linear_scale(input_h, out_h),
             torch_linear_scale(input_w, out_w)};
  const bool with_stats = union_out != nullptr;
  MaskStat* stats = nullptr;
  if (with_stats && n > 0) {
    LRT_CUDA_TRY(scratch_alloc(reinterpret_cast<void**>(&stats), sizeof(MaskStat) * n, stream));
    init_stats_kernel<<<blocks_for(n, 128), 128, 0, stream>>>(stats, n);
  }
  // Block width 128 (whole warps: the warp reductions need every lane to take part).
  postprocess_kernel<<<dim3(blocks_for(out_w, 128), grid_y(out_h)), 128, 0, stream>>>(low_res, g, masks, union_out,
                                                                                      stats);
  cudaError_t err = cudaGetLastError();
  if (stats != nullptr) {
    if (err == cudaSuccess) {
      finalize_stats_kernel<<<blocks_for(n, 128), 128, 0, stream>>>(stats, n, bboxes, areas);
      err = cudaGetLastError();
    }
    scratch_free(stats, stream);
  }
  return static_cast<int>(err);
}

}  // namespace lrt
