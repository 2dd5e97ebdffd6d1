// SAM mask post-processing math shared by the CPU and CUDA kernels (one definition of every formula).
//
// Reference (segment_anything Sam.postprocess_masks as LEGION uses it), all float32:
//   x = F.interpolate(low_res, (S, S), mode="bilinear", align_corners=False)      # S = 1024
//   x = x[..., :h', :w']
//   x = F.interpolate(x, (H, W), mode="bilinear", align_corners=False)
//   mask = x > 0
// torch's CPU kernel (UpSampleKernel.cpp) per axis: scale = float(in) / float(out);
//   src = scale * (dst + 0.5) - 0.5, which the compiler contracts into fma(scale, dst + 0.5, -0.5);
//   src = max(src, 0); i0 = min(floor(src), in - 1); lambda = clamp(src - i0, 0, 1);
//   i1 = i0 + (i0 < in - 1); w0 = 1 - lambda; w1 = lambda.
// and per pixel (rows outer, columns inner, `out += t * w` contracted into fma):
//   row_k = fma(x[rk][c1], wx1, x[rk][c0] * wx0);  value = fma(row_1, wy1, row_0 * wy0)
// The intermediate (stage 1) value is rounded to float32 exactly as torch stores it.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace lrt {

struct LinearTap {
  int32_t i0;  // first source index
  int32_t i1;  // second source index (== i0 at the last source index)
  float w0;    // weight of i0
  float w1;    // weight of i1
};

LRT_HD float torch_linear_scale(int in_size, int out_size) {
  return static_cast<float>(in_size) / static_cast<float>(out_size);
}

LRT_HD LinearTap torch_linear_tap(float scale, int dst, int in_size) {
  float src = fmaf(scale, static_cast<float>(dst) + 0.5f, -0.5f);
  if (src < 0.0f) src = 0.0f;
  int i0 = static_cast<int>(floorf(src));
  if (i0 > in_size - 1) i0 = in_size - 1;
  float lambda = src - static_cast<float>(i0);
  lambda = lambda < 0.0f ? 0.0f : (lambda > 1.0f ? 1.0f : lambda);
  LinearTap t;
  t.i0 = i0;
  t.i1 = i0 + ((i0 < in_size - 1) ? 1 : 0);
  t.w0 = 1.0f - lambda;
  t.w1 = lambda;
  return t;
}

// One bilinear blend in torch's operation order.
LRT_HD float torch_lerp(float a, float b, float wa, float wb) {
  return fmaf(b, wb, a * wa);
}

// Stage-1 value of the 1024x1024 intermediate at (row tap ty, column tap tx) of one low-res mask `src`
// (row-major, width `w`).
LRT_HD float stage1_value(const float* src, int w, LinearTap ty, LinearTap tx) {
  float r0 = torch_lerp(src[ty.i0 * w + tx.i0], src[ty.i0 * w + tx.i1], tx.w0, tx.w1);
  float r1 = torch_lerp(src[ty.i1 * w + tx.i0], src[ty.i1 * w + tx.i1], tx.w0, tx.w1);
  return torch_lerp(r0, r1, ty.w0, ty.w1);
}

}  // namespace lrt
