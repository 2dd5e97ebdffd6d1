// CUDA preprocessing: the same Pillow-exact two-pass resampling as cpu_preprocess.cpp (coefficient tables are
// built on the host by make_axis_plan and uploaded), then the CLIP / SAM normalisation of resize.h.
// All device work is enqueued on the caller's stream; scratch memory uses the stream-ordered allocator.
#include <algorithm>
#include <climits>
#include <vector>

#include "cpu_ops.h"
#include "cuda_common.cuh"
#include "cuda_ops.h"
#include "resize.h"

namespace lrt {
namespace {

// Device view of an AxisPlan: start[out], count[out], coeffs[out * taps].
struct DevPlan {
  const int32_t* start;
  const int32_t* count;
  const int32_t* coeffs;
  int taps;
};

// dst[r][x] (r < rows, x < win_w, RGB) = horizontal resample of src row r at output column ox0 + x.
__global__ void horizontal_kernel(const uint8_t* src, int64_t src_stride, int rows, DevPlan ph, int ox0, int win_w,
                                  uint8_t* dst) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= win_w) return;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {  // grid-stride: gridDim.y is capped at 65535
    const int ox = ox0 + x;
    const int s = ph.start[ox], cnt = ph.count[ox];
    const int32_t* k = ph.coeffs + static_cast<int64_t>(ox) * ph.taps;
    const uint8_t* px = src + r * src_stride + static_cast<int64_t>(s) * 3;
    int32_t a0 = resample_round_init(), a1 = a0, a2 = a0;
    for (int j = 0; j < cnt; ++j) {
      a0 += px[3 * j + 0] * k[j];
      a1 += px[3 * j + 1] * k[j];
      a2 += px[3 * j + 2] * k[j];
    }
    uint8_t* o = dst + (static_cast<int64_t>(r) * win_w + x) * 3;
    o[0] = clip8(a0);
    o[1] = clip8(a1);
    o[2] = clip8(a2);
  }
}

// dst[yy][x] (yy < win_h, x < cols, RGB) = vertical resample at output row oy0 + yy; src row 0 is source row row0.
__global__ void vertical_kernel(const uint8_t* src, int64_t src_stride, int row0, int cols, DevPlan pv, int oy0,
                                int win_h, uint8_t* dst) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= cols) return;
  for (int yy = blockIdx.y; yy < win_h; yy += gridDim.y) {
    const int oy = oy0 + yy;
    const int s = pv.start[oy], cnt = pv.count[oy];
    const int32_t* k = pv.coeffs + static_cast<int64_t>(oy) * pv.taps;
    const uint8_t* px = src + static_cast<int64_t>(s - row0) * src_stride + static_cast<int64_t>(x) * 3;
    int32_t a0 = resample_round_init(), a1 = a0, a2 = a0;
    for (int j = 0; j < cnt; ++j) {
      a0 += px[j * src_stride + 0] * k[j];
      a1 += px[j * src_stride + 1] * k[j];
      a2 += px[j * src_stride + 2] * k[j];
    }
    uint8_t* o = dst + (static_cast<int64_t>(yy) * cols + x) * 3;
    o[0] = clip8(a0);
    o[1] = clip8(a1);
    o[2] = clip8(a2);
  }
}

// win uint8 [win_h, win_w, 3] -> planar float [3, out_h, out_w] (CLIP when clip != 0, else SAM); pixels outside
// the window (SAM padding) are 0.
__global__ void normalize_kernel(const uint8_t* win, int win_h, int win_w, float* out, int out_h, int out_w, int clip,
                                 float m0, float m1, float m2, float s0, float s1, float s2) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= out_w) return;
  const int64_t plane = static_cast<int64_t>(out_h) * out_w;
  for (int y = blockIdx.y; y < out_h; y += gridDim.y) {
    const int64_t i = static_cast<int64_t>(y) * out_w + x;
    if (y >= win_h || x >= win_w) {
      out[i] = 0.0f;
      out[plane + i] = 0.0f;
      out[2 * plane + i] = 0.0f;
      continue;
    }
    const uint8_t* p = win + (static_cast<int64_t>(y) * win_w + x) * 3;
    if (clip) {
      out[i] = clip_normalize(p[0], m0, s0);
      out[plane + i] = clip_normalize(p[1], m1, s1);
      out[2 * plane + i] = clip_normalize(p[2], m2, s2);
    } else {
      out[i] = sam_normalize(p[0], m0, s0);
      out[plane + i] = sam_normalize(p[1], m1, s1);
      out[2 * plane + i] = sam_normalize(p[2], m2, s2);
    }
  }
}

// Uploads a plan into one device block (freed by the caller after the kernels are enqueued).
cudaError_t upload_plan(const AxisPlan& p, cudaStream_t stream, int32_t** block, DevPlan* dev) {
  std::vector<int32_t> host;
  host.reserve(p.start.size() + p.count.size() + p.coeffs.size());
  host.insert(host.end(), p.start.begin(), p.start.end());
  host.insert(host.end(), p.count.begin(), p.count.end());
  host.insert(host.end(), p.coeffs.begin(), p.coeffs.end());
  LRT_CUDA_TRY(scratch_alloc(reinterpret_cast<void**>(block), host.size() * sizeof(int32_t), stream));
  // Pageable source: the call returns once the data is staged, so `host` may be freed afterwards.
  LRT_CUDA_TRY(cudaMemcpyAsync(*block, host.data(), host.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
  dev->start = *block;
  dev->count = *block + p.start.size();
  dev->coeffs = *block + p.start.size() + p.count.size();
  dev->taps = p.taps;
  return cudaSuccess;
}

constexpr unsigned kThreads = 128;

// Resizes the window [oy0, oy1) x [ox0, ox1) of an (out_h, out_w) resize into win (uint8 [win_h, win_w, 3]),
// in Pillow's pass order (pillow_vertical_first).
cudaError_t resize_window_cuda(const uint8_t* rgb, int h, int w, int out_h, int out_w, Filter filter, int oy0, int oy1,
                               int ox0, int ox1, uint8_t* win, cudaStream_t stream, bool pillow13) {
  const bool need_h = out_w != w, need_v = out_h != h;
  const int win_w = ox1 - ox0, win_h = oy1 - oy0;
  const int64_t stride = static_cast<int64_t>(w) * 3;
  AxisPlan ph, pv;
  DevPlan dh{}, dv{};
  int32_t *bh = nullptr, *bv = nullptr;
  uint8_t* tmp = nullptr;
  cudaError_t err = cudaSuccess;
  if (need_h) {
    ph = make_axis_plan(w, out_w, filter);
    if ((err = upload_plan(ph, stream, &bh, &dh)) != cudaSuccess) return err;
  }
  if (need_v) {
    pv = make_axis_plan(h, out_h, filter);
    if ((err = upload_plan(pv, stream, &bv, &dv)) != cudaSuccess) return err;
  }
  if (!need_h && !need_v) {
    err = cudaMemcpy2DAsync(win, static_cast<size_t>(win_w) * 3, rgb + oy0 * stride + ox0 * 3, stride,
                            static_cast<size_t>(win_w) * 3, win_h, cudaMemcpyDeviceToDevice, stream);
  } else if (!need_v) {
    horizontal_kernel<<<dim3(blocks_for(win_w, kThreads), grid_y(win_h)), kThreads, 0, stream>>>(
        rgb + oy0 * stride, stride, win_h, dh, ox0, win_w, win);
  } else if (!need_h) {
    vertical_kernel<<<dim3(blocks_for(win_w, kThreads), grid_y(win_h)), kThreads, 0, stream>>>(
        rgb + ox0 * 3, stride, 0, win_w, dv, oy0, win_h, win);
  } else if (pillow_vertical_first(h, w, out_h, out_w, pillow13)) {
    int c0 = ph.start[ox0], c1 = 0;
    for (int o = ox0; o < ox1; ++o) {
      c0 = std::min(c0, ph.start[o]);
      c1 = std::max(c1, ph.start[o] + ph.count[o]);
    }
    err = scratch_alloc(reinterpret_cast<void**>(&tmp), static_cast<size_t>(win_h) * (c1 - c0) * 3, stream);
    if (err == cudaSuccess) {
      vertical_kernel<<<dim3(blocks_for(c1 - c0, kThreads), grid_y(win_h)), kThreads, 0, stream>>>(
          rgb + c0 * 3, stride, 0, c1 - c0, dv, oy0, win_h, tmp);
      // Horizontal pass over tmp whose column 0 is source column c0: shift the source pointer back by c0 so
      // the plan's absolute start indices stay valid (only columns >= c0 are read).
      horizontal_kernel<<<dim3(blocks_for(win_w, kThreads), grid_y(win_h)), kThreads, 0, stream>>>(
          tmp - static_cast<int64_t>(c0) * 3, static_cast<int64_t>(c1 - c0) * 3, win_h, dh, ox0, win_w, win);
    }
  } else {
    int r0 = pv.start[oy0], r1 = 0;
    for (int o = oy0; o < oy1; ++o) {
      r0 = std::min(r0, pv.start[o]);
      r1 = std::max(r1, pv.start[o] + pv.count[o]);
    }
    err = scratch_alloc(reinterpret_cast<void**>(&tmp), static_cast<size_t>(r1 - r0) * win_w * 3, stream);
    if (err == cudaSuccess) {
      horizontal_kernel<<<dim3(blocks_for(win_w, kThreads), grid_y(r1 - r0)), kThreads, 0, stream>>>(
          rgb + r0 * stride, stride, r1 - r0, dh, ox0, win_w, tmp);
      vertical_kernel<<<dim3(blocks_for(win_w, kThreads), grid_y(win_h)), kThreads, 0, stream>>>(
          tmp, static_cast<int64_t>(win_w) * 3, r0, win_w, dv, oy0, win_h, win);
    }
  }
  if (err == cudaSuccess) err = cudaGetLastError();
  if (tmp) scratch_free(tmp, stream);
  if (bh) scratch_free(bh, stream);
  if (bv) scratch_free(bv, stream);
  return err;
}

}  // namespace

int preprocess_cuda(const uint8_t* rgb, int h, int w, const PreprocessParams& p, float* clip_out, float* sam_out,
                    uintptr_t stream_handle) {
  cudaStream_t stream = as_stream(stream_handle);
  const PreprocessGeometry g = preprocess_geometry(h, w, p);
  uint8_t* win = nullptr;
  const size_t clip_bytes = static_cast<size_t>(p.clip_crop_h) * p.clip_crop_w * 3;
  const size_t sam_bytes = static_cast<size_t>(g.sam_h) * g.sam_w * 3;
  LRT_CUDA_TRY(scratch_alloc(reinterpret_cast<void**>(&win), std::max(clip_bytes, sam_bytes), stream));
  cudaError_t err = resize_window_cuda(rgb, h, w, g.clip_resized_h, g.clip_resized_w, Filter::Bicubic, g.clip_top,
                                       g.clip_top + p.clip_crop_h, g.clip_left, g.clip_left + p.clip_crop_w, win,
                                       stream, p.pillow13_order);
  if (err == cudaSuccess) {
    normalize_kernel<<<dim3(blocks_for(p.clip_crop_w, kThreads), grid_y(p.clip_crop_h)), kThreads, 0, stream>>>(
        win, p.clip_crop_h, p.clip_crop_w, clip_out, p.clip_crop_h, p.clip_crop_w, 1, p.clip_mean[0], p.clip_mean[1],
        p.clip_mean[2], p.clip_std[0], p.clip_std[1], p.clip_std[2]);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess)
    err = resize_window_cuda(rgb, h, w, g.sam_h, g.sam_w, Filter::Bilinear, 0, g.sam_h, 0, g.sam_w, win, stream,
                             p.pillow13_order);
  if (err == cudaSuccess) {
    normalize_kernel<<<dim3(blocks_for(p.sam_size, kThreads), grid_y(p.sam_size)), kThreads, 0, stream>>>(
        win, g.sam_h, g.sam_w, sam_out, p.sam_size, p.sam_size, 0, p.sam_mean[0], p.sam_mean[1], p.sam_mean[2],
        p.sam_std[0], p.sam_std[1], p.sam_std[2]);
    err = cudaGetLastError();
  }
  scratch_free(win, stream);
  return static_cast<int>(err);
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

bool cuda_memory_pools_supported(int device) {
  return device >= 0 && device < cuda_device_count() && memory_pools_supported(device);
}

const char* cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace lrt
