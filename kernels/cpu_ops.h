// CPU kernel entry points (called by bindings.cpp with the GIL released). All pointers are host memory,
// C-contiguous; the caller has validated every size.
#pragma once

#include <cstdint>

#include "resize.h"

namespace lrt {

struct PreprocessParams {
  int clip_shortest_edge = 336;  // CLIP: resize so the shorter side is this (bicubic)
  int clip_crop_h = 336;         // CLIP: center crop size
  int clip_crop_w = 336;
  float clip_mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
  float clip_std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
  int sam_size = 1024;  // SAM: longest side resized to this (bilinear), zero padded to sam_size^2
  float sam_mean[3] = {123.675f, 116.28f, 103.53f};
  float sam_std[3] = {58.395f, 57.12f, 57.375f};
  bool pillow13_order = true;  // resampling pass order of Pillow >= 13 (else Pillow <= 12)
};

struct PreprocessGeometry {
  int clip_resized_h, clip_resized_w;  // size after the shortest-side resize
  int clip_top, clip_left;             // center-crop offsets
  int sam_h, sam_w;                    // (h', w') after ResizeLongestSide
};

// Geometry exactly as the reference computes it (transformers get_resize_output_image_size / center_crop,
// segment_anything ResizeLongestSide.get_preprocess_shape).
PreprocessGeometry preprocess_geometry(int h, int w, const PreprocessParams& p);

// rgb uint8 [h, w, 3] -> clip f32 [3, crop_h, crop_w], sam f32 [3, sam_size, sam_size] (zero padded).
void preprocess_cpu(const uint8_t* rgb, int h, int w, const PreprocessParams& p, float* clip_out, float* sam_out,
                    int threads);

// Pillow's pass order for an (h, w) -> (out_h, out_w) resize that changes both sizes (see cpu_preprocess.cpp).
// pillow13 = false reproduces Pillow <= 12, which always ran the horizontal pass first.
bool pillow_vertical_first(int h, int w, int out_h, int out_w, bool pillow13);

// The window rows [oy0, oy1) x cols [ox0, ox1) of a Pillow-equivalent resize, uint8 [oy1-oy0, ox1-ox0, 3].
void resize_window_u8(const uint8_t* rgb, int h, int w, int out_h, int out_w, Filter filter, int oy0, int oy1, int ox0,
                      int ox1, uint8_t* dst, int threads, bool pillow13 = true);

// Pillow-equivalent Image.resize of an RGB uint8 [h, w, 3] image to [out_h, out_w, 3].
void resize_rgb_cpu(const uint8_t* rgb, int h, int w, int out_h, int out_w, Filter filter, uint8_t* out, int threads,
                    bool pillow13 = true);

// low_res f32 [n, in_h, in_w] -> masks bool [n, out_h, out_w]; if union_out != nullptr also the union
// [out_h, out_w], bboxes int64 [n, 4] (x0, y0, x1, y1 end-exclusive; zeros when empty) and areas int64 [n].
void postprocess_masks_cpu(const float* low_res, int n, int in_h, int in_w, int image_size, int input_h, int input_w,
                           int out_h, int out_w, uint8_t* masks, uint8_t* union_out, int64_t* bboxes, int64_t* areas,
                           int threads);

}  // namespace lrt
