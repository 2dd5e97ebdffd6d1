// CUDA kernel entry points. All data pointers are device pointers; work is enqueued on `stream` (a
// cudaStream_t passed as an integer handle, 0 = legacy default stream) and is asynchronous: the caller
// synchronises the stream before reading results. Return value: 0 on success, else a cudaError_t code.
#pragma once

#include <cstdint>

#include "cpu_ops.h"

namespace lrt {

// rgb uint8 [h, w, 3] -> clip f32 [3, crop_h, crop_w], sam f32 [3, sam_size, sam_size]; same math as the CPU.
int preprocess_cuda(const uint8_t* rgb, int h, int w, const PreprocessParams& p, float* clip_out, float* sam_out,
                    uintptr_t stream);

// low_res f32 [n, in_h, in_w] -> masks bool(uint8) [n, out_h, out_w]; union/bboxes/areas may be null
// (all or none) and then are not computed.
int postprocess_masks_cuda(const float* low_res, int n, int in_h, int in_w, int image_size, int input_h, int input_w,
                           int out_h, int out_w, uint8_t* masks, uint8_t* union_out, int64_t* bboxes, int64_t* areas,
                           uintptr_t stream);

// masks uint8 [n, per_mask] (0 / non-zero) -> packed uint8 [n, ceil(per_mask / 8)]: bit b of byte j of mask m is
// masks[m, 8 j + b] != 0 (least significant bit first, numpy.packbits(bitorder="little") per mask). What a
// device-resident request copies back instead of the masks: 8x fewer bytes.
int pack_masks_cuda(const uint8_t* masks, int n, int64_t per_mask, uint8_t* packed, uintptr_t stream);

// Number of usable CUDA devices; 0 on any error (no driver, no device). Never throws.
int cuda_device_count();
// Whether `device` supports stream-ordered allocation (memory pools); asked once per device. False on any error.
bool cuda_memory_pools_supported(int device);
const char* cuda_error_string(int code);

}  // namespace lrt
