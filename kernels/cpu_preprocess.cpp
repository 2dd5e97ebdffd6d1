// Pillow-compatible resampling and the LEGION preprocessing (CLIP + SAM branches) on the CPU.
// Only the pixels that survive (the CLIP center crop) are computed; per output pixel the arithmetic is
// Pillow's (resize.h), so cropping after a full resize or computing only the crop gives the same bytes.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_ops.h"

namespace lrt {

namespace {
double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}
double bicubic_filter(double x) {
  const double a = -0.5;  // Pillow's bicubic a
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}
}  // namespace

AxisPlan make_axis_plan(int in_size, int out_size, Filter filter) {
  double (*fn)(double) = filter == Filter::Bicubic ? bicubic_filter : bilinear_filter;
  const double filter_support = filter == Filter::Bicubic ? 2.0 : 1.0;
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = filter_support * filterscale;
  AxisPlan p;
  p.in_size = in_size;
  p.out_size = out_size;
  p.taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  p.start.resize(static_cast<size_t>(out_size));
  p.count.resize(static_cast<size_t>(out_size));
  p.coeffs.assign(static_cast<size_t>(out_size) * p.taps, 0);
  std::vector<double> k(static_cast<size_t>(p.taps));
  for (int i = 0; i < out_size; ++i) {
    const double center = (i + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      double w = fn((x + xmin - center + 0.5) * ss);
      k[static_cast<size_t>(x)] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      double v = ww != 0.0 ? k[static_cast<size_t>(x)] / ww : k[static_cast<size_t>(x)];
      // Fixed point, rounding half away from zero (Pillow's normalize_coeffs_8bpc).
      p.coeffs[static_cast<size_t>(i) * p.taps + x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                                                            : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
    }
    p.start[static_cast<size_t>(i)] = xmin;
    p.count[static_cast<size_t>(i)] = xmax;
  }
  return p;
}

PreprocessGeometry preprocess_geometry(int h, int w, const PreprocessParams& p) {
  PreprocessGeometry g{};
  // CLIP (transformers get_resize_output_image_size, default_to_square=False): short side -> size,
  // long side -> int(size * long / short) (float division, truncation); unchanged if short == size.
  const int short_side = std::min(h, w), long_side = std::max(h, w);
  int new_short = short_side, new_long = long_side;
  if (short_side != p.clip_shortest_edge) {
    new_short = p.clip_shortest_edge;
    new_long = static_cast<int>(static_cast<double>(p.clip_shortest_edge) * long_side / short_side);
  }
  // width <= height -> (new_long, new_short) as (h, w)
  if (w <= h) {
    g.clip_resized_h = new_long;
    g.clip_resized_w = new_short;
  } else {
    g.clip_resized_h = new_short;
    g.clip_resized_w = new_long;
  }
  // center_crop: top = (H - crop_h) // 2, left = (W - crop_w) // 2 (floor division).
  g.clip_top = (g.clip_resized_h - p.clip_crop_h) / 2;
  g.clip_left = (g.clip_resized_w - p.clip_crop_w) / 2;
  // SAM ResizeLongestSide.get_preprocess_shape: scale = size / max(h, w) (float64);
  // new = int(dim * scale + 0.5).
  const double scale = static_cast<double>(p.sam_size) / std::max(h, w);
  g.sam_h = static_cast<int>(h * scale + 0.5);
  g.sam_w = static_cast<int>(w * scale + 0.5);
  return g;
}

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// AVX2 and baseline clones picked at load time (integer results are identical; only speed differs).
#define LRT_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LRT_SIMD_CLONES
#endif

constexpr int kRowBlock = 8;           // source rows resampled together by the horizontal pass
constexpr int kLanes = kRowBlock * 3;  // int32 lanes per tile column: 8 rows x RGB

// One block of up to kRowBlock rows: tile [ncols][kLanes] int32 holds the needed source columns, pixel-major;
// each output pixel accumulates all lanes at once (vectorisable), then rows are written back interleaved.
LRT_SIMD_CLONES void horizontal_block(const int32_t* __restrict tile, int nrows, const int32_t* __restrict starts,
                                      const int32_t* __restrict counts, const int32_t* __restrict coeffs, int taps,
                                      int c0, int win_w, uint8_t* __restrict dst, int64_t dst_stride) {
  for (int x = 0; x < win_w; ++x) {
    int32_t acc[kLanes];
    for (int l = 0; l < kLanes; ++l) acc[l] = resample_round_init();
    const int32_t* __restrict k = coeffs + static_cast<size_t>(x) * taps;
    const int32_t* __restrict t = tile + static_cast<int64_t>(starts[x] - c0) * kLanes;
    const int cnt = counts[x];
    for (int j = 0; j < cnt; ++j) {
      const int32_t kj = k[j];
      for (int l = 0; l < kLanes; ++l) acc[l] += t[j * kLanes + l] * kj;
    }
    for (int r = 0; r < nrows; ++r) {
      uint8_t* o = dst + r * dst_stride + 3 * x;
      o[0] = clip8(acc[3 * r + 0]);
      o[1] = clip8(acc[3 * r + 1]);
      o[2] = clip8(acc[3 * r + 2]);
    }
  }
}

// Horizontal pass: rows [0, rows) of `src` (row stride `src_stride` bytes, RGB interleaved) resampled along x
// to the output columns [ox0, ox0 + win_w) of plan `ph`; writes rows x win_w x 3 into dst. Per output pixel the
// integer sum is exactly Pillow's (integer addition is exact, so lane order does not matter).
void horizontal_pass(const uint8_t* src, int64_t src_stride, int rows, const AxisPlan& ph, int ox0, int win_w,
                     uint8_t* dst, int threads) {
  int c0 = ph.start[static_cast<size_t>(ox0)], c1 = 0;
  for (int o = ox0; o < ox0 + win_w; ++o) {
    c0 = std::min(c0, ph.start[static_cast<size_t>(o)]);
    c1 = std::max(c1, ph.start[static_cast<size_t>(o)] + ph.count[static_cast<size_t>(o)]);
  }
  const int ncols = c1 - c0;
  const int32_t* starts = ph.start.data() + ox0;
  const int32_t* counts = ph.count.data() + ox0;
  const int32_t* coeffs = ph.coeffs.data() + static_cast<size_t>(ox0) * ph.taps;
  const int taps = ph.taps;
  const int blocks = (rows + kRowBlock - 1) / kRowBlock;
  parallel_for(blocks, threads, [&](int64_t b, int64_t e) {
    std::vector<int32_t> tile(static_cast<size_t>(ncols) * kLanes, 0);
    for (int64_t blk = b; blk < e; ++blk) {
      const int r0 = static_cast<int>(blk) * kRowBlock, nrows = std::min(kRowBlock, rows - r0);
      for (int r = 0; r < nrows; ++r) {
        const uint8_t* row = src + static_cast<int64_t>(r0 + r) * src_stride + static_cast<int64_t>(c0) * 3;
        int32_t* t = tile.data() + 3 * r;
        for (int c = 0; c < ncols; ++c) {
          t[c * kLanes + 0] = row[3 * c + 0];
          t[c * kLanes + 1] = row[3 * c + 1];
          t[c * kLanes + 2] = row[3 * c + 2];
        }
      }
      horizontal_block(tile.data(), nrows, starts, counts, coeffs, taps, c0, win_w,
                       dst + static_cast<int64_t>(r0) * win_w * 3, static_cast<int64_t>(win_w) * 3);
    }
  });
}

// One output row of the vertical pass: out[x] = clip8(init + sum_j rows[j][x] * k[j]) over n bytes.
LRT_SIMD_CLONES void vertical_row(const uint8_t* __restrict base, int64_t stride, const int32_t* __restrict k, int cnt,
                                  int64_t n, int32_t* __restrict acc, uint8_t* __restrict out) {
  for (int64_t x = 0; x < n; ++x) acc[x] = resample_round_init();
  for (int j = 0; j < cnt; ++j) {
    const uint8_t* __restrict row = base + j * stride;
    const int32_t kj = k[j];
    for (int64_t x = 0; x < n; ++x) acc[x] += row[x] * kj;
  }
  for (int64_t x = 0; x < n; ++x) out[x] = clip8(acc[x]);
}

// Vertical pass: output rows [oy0, oy0 + win_h) of plan `pv` over `cols` columns of `src`, whose first row is
// source row `row0` (row stride `src_stride` bytes); writes win_h x cols x 3 into dst. Accumulates whole rows
// (the same integer sums as Pillow in a vectorisable order).
void vertical_pass(const uint8_t* src, int64_t src_stride, int row0, int cols, const AxisPlan& pv, int oy0, int win_h,
                   uint8_t* dst, int threads) {
  const int64_t n = static_cast<int64_t>(cols) * 3;
  parallel_for(win_h, threads, [&](int64_t b, int64_t e) {
    std::vector<int32_t> acc(static_cast<size_t>(n));
    for (int64_t yy = b; yy < e; ++yy) {
      const int oy = oy0 + static_cast<int>(yy);
      const int s = pv.start[static_cast<size_t>(oy)], cnt = pv.count[static_cast<size_t>(oy)];
      vertical_row(src + static_cast<int64_t>(s - row0) * src_stride, src_stride,
                   pv.coeffs.data() + static_cast<size_t>(oy) * pv.taps, cnt, n, acc.data(), dst + yy * n);
    }
  });
}

// Span [first, last) of source indices that the outputs [o0, o1) of a plan read.
std::pair<int, int> source_span(const AxisPlan& p, int o0, int o1) {
  int first = p.start[static_cast<size_t>(o0)], last = 0;
  for (int o = o0; o < o1; ++o) {
    first = std::min(first, p.start[static_cast<size_t>(o)]);
    last = std::max(last, p.start[static_cast<size_t>(o)] + p.count[static_cast<size_t>(o)]);
  }
  return {first, last};
}

}  // namespace

bool pillow_vertical_first(int h, int w, int out_h, int out_w, bool pillow13) {
  if (!pillow13) return false;
  // Pillow 13 runs the vertical pass first when it shrinks the height and the height loses more than twice
  // as many pixels as the width: 2 * (w - out_w) < h - out_h. Determined by experiment against the installed
  // Pillow 13.0.0 (exact on 592 random size pairs and on threshold sweeps, both filters); Pillow <= 12 always
  // ran horizontal first. The order matters: the uint8 intermediate clips, so bicubic results differ.
  return out_h < h && out_w != w && 2 * static_cast<int64_t>(w - out_w) < static_cast<int64_t>(h - out_h);
}

void resize_window_u8(const uint8_t* rgb, int h, int w, int out_h, int out_w, Filter filter, int oy0, int oy1, int ox0,
                      int ox1, uint8_t* dst, int threads, bool pillow13) {
  const bool need_h = out_w != w, need_v = out_h != h;
  const int win_w = ox1 - ox0, win_h = oy1 - oy0;
  const int64_t stride = static_cast<int64_t>(w) * 3;
  AxisPlan ph, pv;
  if (need_h) ph = make_axis_plan(w, out_w, filter);
  if (need_v) pv = make_axis_plan(h, out_h, filter);
  if (!need_h && !need_v) {
    for (int y = 0; y < win_h; ++y)
      std::copy_n(rgb + (oy0 + y) * stride + ox0 * 3, static_cast<size_t>(win_w) * 3,
                  dst + static_cast<int64_t>(y) * win_w * 3);
  } else if (!need_v) {
    horizontal_pass(rgb + oy0 * stride, stride, win_h, ph, ox0, win_w, dst, threads);
  } else if (!need_h) {
    vertical_pass(rgb + ox0 * 3, stride, 0, win_w, pv, oy0, win_h, dst, threads);
  } else if (pillow_vertical_first(h, w, out_h, out_w, pillow13)) {
    auto [c0, c1] = source_span(ph, ox0, ox1);
    std::vector<uint8_t> tmp(static_cast<size_t>(win_h) * (c1 - c0) * 3);
    vertical_pass(rgb + c0 * 3, stride, 0, c1 - c0, pv, oy0, win_h, tmp.data(), threads);
    AxisPlan shifted = ph;  // start indices relative to column c0
    for (auto& s : shifted.start) s -= c0;
    horizontal_pass(tmp.data(), static_cast<int64_t>(c1 - c0) * 3, win_h, shifted, ox0, win_w, dst, threads);
  } else {
    auto [r0, r1] = source_span(pv, oy0, oy1);
    std::vector<uint8_t> tmp(static_cast<size_t>(r1 - r0) * win_w * 3);
    horizontal_pass(rgb + r0 * stride, stride, r1 - r0, ph, ox0, win_w, tmp.data(), threads);
    vertical_pass(tmp.data(), static_cast<int64_t>(win_w) * 3, r0, win_w, pv, oy0, win_h, dst, threads);
  }
}

namespace {

// Resize the output window rows [oy0, oy1) x cols [ox0, ox1) and hand each pixel to emit(y, x, r, g, b)
// (window coordinates).
template <typename Emit>
void resize_window(const uint8_t* rgb, int h, int w, int out_h, int out_w, Filter filter, int oy0, int oy1, int ox0,
                   int ox1, int threads, bool pillow13, Emit emit) {
  const int win_w = ox1 - ox0, win_h = oy1 - oy0;
  std::vector<uint8_t> win(static_cast<size_t>(win_h) * win_w * 3);
  resize_window_u8(rgb, h, w, out_h, out_w, filter, oy0, oy1, ox0, ox1, win.data(), threads, pillow13);
  parallel_for(win_h, threads, [&](int64_t b, int64_t e) {
    for (int64_t y = b; y < e; ++y) {
      const uint8_t* row = win.data() + y * win_w * 3;
      for (int x = 0; x < win_w; ++x) emit(static_cast<int>(y), x, row[3 * x], row[3 * x + 1], row[3 * x + 2]);
    }
  });
}

}  // namespace

void resize_rgb_cpu(const uint8_t* rgb, int h, int w, int out_h, int out_w, Filter filter, uint8_t* out, int threads,
                    bool pillow13) {
  resize_window_u8(rgb, h, w, out_h, out_w, filter, 0, out_h, 0, out_w, out, threads, pillow13);
}

void preprocess_cpu(const uint8_t* rgb, int h, int w, const PreprocessParams& p, float* clip_out, float* sam_out,
                    int threads) {
  const PreprocessGeometry g = preprocess_geometry(h, w, p);
  // A uint8 input has 256 values per channel: tabulate the (exact, per-value) normalisations once.
  float clip_lut[3][256], sam_lut[3][256];
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v) {
      clip_lut[c][v] = clip_normalize(static_cast<uint8_t>(v), p.clip_mean[c], p.clip_std[c]);
      sam_lut[c][v] = sam_normalize(static_cast<uint8_t>(v), p.sam_mean[c], p.sam_std[c]);
    }
  const int64_t clip_plane = static_cast<int64_t>(p.clip_crop_h) * p.clip_crop_w;
  resize_window(rgb, h, w, g.clip_resized_h, g.clip_resized_w, Filter::Bicubic, g.clip_top, g.clip_top + p.clip_crop_h,
                g.clip_left, g.clip_left + p.clip_crop_w, threads, p.pillow13_order,
                [&](int y, int x, uint8_t r, uint8_t gg, uint8_t b) {
                  float* o = clip_out + static_cast<int64_t>(y) * p.clip_crop_w + x;
                  o[0] = clip_lut[0][r];
                  o[clip_plane] = clip_lut[1][gg];
                  o[2 * clip_plane] = clip_lut[2][b];
                });
  const int64_t S = p.sam_size, sam_plane = S * S;
  // Zero padding (SAM pads after normalisation, so the pad value is 0).
  parallel_for(3 * S, threads, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* row = sam_out + r * S;
      const int64_t y = r % S;
      if (y >= g.sam_h)
        std::fill(row, row + S, 0.0f);
      else
        std::fill(row + g.sam_w, row + S, 0.0f);
    }
  });
  resize_window(rgb, h, w, g.sam_h, g.sam_w, Filter::Bilinear, 0, g.sam_h, 0, g.sam_w, threads, p.pillow13_order,
                [&](int y, int x, uint8_t r, uint8_t gg, uint8_t b) {
                  float* o = sam_out + static_cast<int64_t>(y) * S + x;
                  o[0] = sam_lut[0][r];
                  o[sam_plane] = sam_lut[1][gg];
                  o[2 * sam_plane] = sam_lut[2][b];
                });
}

}  // namespace lrt
