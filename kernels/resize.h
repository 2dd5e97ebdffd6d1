// Pillow-compatible separable resampling (the per-pixel math shared by the CPU and CUDA preprocess kernels).
//
// Reproduces Pillow's Resample.c scheme for 8-bit images (read, not copied):
//  * support of the filter is scaled by the shrink factor (antialiasing when downscaling):
//      scale = in/out, filterscale = max(scale, 1), support = filter_support * filterscale;
//  * for output index i: center = (i + 0.5) * scale, xmin = max(int(center - support + 0.5), 0),
//    xmax = min(int(center + support + 0.5), in); weight(x) = filter((x - center + 0.5) / filterscale),
//    normalised to sum 1 in double, then converted to fixed point with PRECISION_BITS = 22 and rounding away
//    from zero;
//  * accumulation starts at 1 << 21 (rounding), sums uint8 * int32 coefficient, then clips to [0, 255]
//    (>> 22);
//  * two passes: horizontal first (only over the source rows the vertical pass needs), uint8 intermediate,
//    then vertical. A pass is skipped when that dimension keeps its size (as Pillow does).
// Coefficient tables are built on the host (double math) and used by both the CPU and CUDA kernels.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace lrt {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS for 8-bit images

enum class Filter : int { Bilinear = 0, Bicubic = 1 };

// Clip a fixed-point accumulator to uint8 exactly like Pillow's clip8().
LRT_HD uint8_t clip8(int32_t acc) {
  if (acc >= (1 << kPrecisionBits << 8)) return 255;
  if (acc <= 0) return 0;
  return static_cast<uint8_t>(acc >> kPrecisionBits);
}

LRT_HD int32_t resample_round_init() {
  return 1 << (kPrecisionBits - 1);
}

// CLIP: uint8 * (1/255) in float64, cast to float32, then (x - mean) / std in float32
// (transformers 4.28 CLIPImageProcessor: rescale in float64 then astype(float32); normalize in float32).
LRT_HD float clip_normalize(uint8_t v, float mean, float std_) {
  float x = static_cast<float>(static_cast<double>(v) * (1.0 / 255.0));
  return (x - mean) / std_;
}

// SAM: (x - mean) / std on 0..255 values in float32 (segment_anything Sam.preprocess).
LRT_HD float sam_normalize(uint8_t v, float mean, float std_) {
  return (static_cast<float>(v) - mean) / std_;
}

// One axis of a resampling plan: for every output index, the first source index, the tap count, and
// `taps` int32 fixed-point coefficients (zero padded).
struct AxisPlan {
  int in_size = 0;
  int out_size = 0;
  int taps = 0;                 // max taps per output index
  std::vector<int32_t> start;   // [out_size]
  std::vector<int32_t> count;   // [out_size]
  std::vector<int32_t> coeffs;  // [out_size * taps]
};

AxisPlan make_axis_plan(int in_size, int out_size, Filter filter);

}  // namespace lrt
