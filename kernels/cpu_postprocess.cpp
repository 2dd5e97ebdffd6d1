// Fused SAM mask post-processing on the CPU. Never materialises the image_size^2 intermediate: for every
// output row it needs two intermediate rows (stage-1 values at all w' columns), turns each into a stage-2
// horizontally interpolated row of width W once (cached, since neighbouring output rows share them), and
// blends the two rows vertically. Same float operations, in the same order, as torch (see masks.h).
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_ops.h"
#include "masks.h"

namespace lrt {
namespace {

struct Tables {
  std::vector<LinearTap> s1_rows, s1_cols;  // stage 1: low-res -> image_size, only the first h' / w' entries
  std::vector<LinearTap> s2_rows, s2_cols;  // stage 2: (h', w') -> (H, W)
};

struct RowStats {
  int64_t area = 0;
  int64_t x0 = INT64_MAX, y0 = INT64_MAX, x1 = -1, y1 = -1;  // inclusive while accumulating
};

// The hot loops, compiled twice on x86-64: with hardware FMA (AVX2+FMA) and a portable fallback whose fmaf
// calls the (exact) libm routine. Both give identical results; only speed differs.
template <int kVariant>
struct Kernel {
  static void intermediate_row(const float* src, int in_w, const Tables& t, int r, int wp, float* irow) {
    const LinearTap ty = t.s1_rows[static_cast<size_t>(r)];
    const float* a = src + static_cast<int64_t>(ty.i0) * in_w;
    const float* b = src + static_cast<int64_t>(ty.i1) * in_w;
    for (int c = 0; c < wp; ++c) {
      const LinearTap tx = t.s1_cols[static_cast<size_t>(c)];
      float r0 = torch_lerp(a[tx.i0], a[tx.i1], tx.w0, tx.w1);
      float r1 = torch_lerp(b[tx.i0], b[tx.i1], tx.w0, tx.w1);
      irow[c] = torch_lerp(r0, r1, ty.w0, ty.w1);
    }
  }
  static void stage2_row(const float* irow, const Tables& t, int out_w, float* hrow) {
    const LinearTap* cols = t.s2_cols.data();
    for (int x = 0; x < out_w; ++x) hrow[x] = torch_lerp(irow[cols[x].i0], irow[cols[x].i1], cols[x].w0, cols[x].w1);
  }
  static void blend_row(const float* h0, const float* h1, float w0, float w1, int out_w, uint8_t* out) {
    for (int x = 0; x < out_w; ++x) out[x] = torch_lerp(h0[x], h1[x], w0, w1) > 0.0f ? 1 : 0;
  }
  // ORs a mask row into the union row and returns its number of set pixels.
  static int64_t union_row(const uint8_t* __restrict out, uint8_t* __restrict u, int out_w) {
    uint32_t count = 0;  // out_w < 2^24
    for (int x = 0; x < out_w; ++x) {
      count += out[x];
      u[x] |= out[x];
    }
    return count;
  }
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LRT_FMA_TARGET __attribute__((target("avx2,fma")))
template <>
struct Kernel<1> {
  LRT_FMA_TARGET static void intermediate_row(const float* src, int in_w, const Tables& t, int r, int wp, float* irow) {
    const LinearTap ty = t.s1_rows[static_cast<size_t>(r)];
    const float* a = src + static_cast<int64_t>(ty.i0) * in_w;
    const float* b = src + static_cast<int64_t>(ty.i1) * in_w;
    for (int c = 0; c < wp; ++c) {
      const LinearTap tx = t.s1_cols[static_cast<size_t>(c)];
      float r0 = __builtin_fmaf(a[tx.i1], tx.w1, a[tx.i0] * tx.w0);
      float r1 = __builtin_fmaf(b[tx.i1], tx.w1, b[tx.i0] * tx.w0);
      irow[c] = __builtin_fmaf(r1, ty.w1, r0 * ty.w0);
    }
  }
  LRT_FMA_TARGET static void stage2_row(const float* irow, const Tables& t, int out_w, float* hrow) {
    const LinearTap* cols = t.s2_cols.data();
    for (int x = 0; x < out_w; ++x)
      hrow[x] = __builtin_fmaf(irow[cols[x].i1], cols[x].w1, irow[cols[x].i0] * cols[x].w0);
  }
  LRT_FMA_TARGET static void blend_row(const float* h0, const float* h1, float w0, float w1, int out_w, uint8_t* out) {
    for (int x = 0; x < out_w; ++x) out[x] = __builtin_fmaf(h1[x], w1, h0[x] * w0) > 0.0f ? 1 : 0;
  }
  LRT_FMA_TARGET static int64_t union_row(const uint8_t* __restrict out, uint8_t* __restrict u, int out_w) {
    uint32_t count = 0;
    for (int x = 0; x < out_w; ++x) {
      count += out[x];
      u[x] |= out[x];
    }
    return count;
  }
};
inline bool has_fma() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
template <>
struct Kernel<1> : Kernel<0> {};
inline bool has_fma() {
  return true;
}  // aarch64: fmaf is a native instruction
#endif

template <int kVariant>
void run_rows(const float* low_res, int n, int in_h, int in_w, int wp, int out_h, int out_w, const Tables& t,
              uint8_t* masks, uint8_t* union_out, std::vector<RowStats>* stats, int64_t y_begin, int64_t y_end) {
  using K = Kernel<kVariant>;
  std::vector<float> irow(static_cast<size_t>(wp));
  std::vector<float> slot[2] = {std::vector<float>(static_cast<size_t>(out_w)),
                                std::vector<float>(static_cast<size_t>(out_w))};
  const int64_t plane = static_cast<int64_t>(out_h) * out_w;
  for (int m = 0; m < n; ++m) {
    const float* src = low_res + static_cast<int64_t>(m) * in_h * in_w;
    int slot_row[2] = {-1, -1};
    auto fetch = [&](int r, int keep) -> const float* {
      for (int s = 0; s < 2; ++s)
        if (slot_row[s] == r) return slot[s].data();
      int s = (slot_row[0] == keep) ? 1 : 0;
      K::intermediate_row(src, in_w, t, r, wp, irow.data());
      K::stage2_row(irow.data(), t, out_w, slot[s].data());
      slot_row[s] = r;
      return slot[s].data();
    };
    RowStats st;
    for (int64_t y = y_begin; y < y_end; ++y) {
      const LinearTap ty = t.s2_rows[static_cast<size_t>(y)];
      const float* h0 = fetch(ty.i0, ty.i1);
      const float* h1 = fetch(ty.i1, ty.i0);
      uint8_t* out = masks + m * plane + y * out_w;
      K::blend_row(h0, h1, ty.w0, ty.w1, out_w, out);
      if (union_out != nullptr) {
        const int64_t count = K::union_row(out, union_out + y * out_w, out_w);
        if (count > 0) {
          int64_t first = 0, last = out_w - 1;
          while (!out[first]) ++first;
          while (!out[last]) --last;
          st.area += count;
          st.x0 = std::min(st.x0, first);
          st.x1 = std::max(st.x1, last);
          st.y0 = std::min(st.y0, y);
          st.y1 = std::max(st.y1, y);
        }
      }
    }
    if (stats != nullptr) (*stats)[static_cast<size_t>(m)] = st;
  }
}

}  // namespace

void postprocess_masks_cpu(const float* low_res, int n, int in_h, int in_w, int image_size, int input_h, int input_w,
                           int out_h, int out_w, uint8_t* masks, uint8_t* union_out, int64_t* bboxes, int64_t* areas,
                           int threads) {
  Tables t;
  const float s1h = torch_linear_scale(in_h, image_size), s1w = torch_linear_scale(in_w, image_size);
  const float s2h = torch_linear_scale(input_h, out_h), s2w = torch_linear_scale(input_w, out_w);
  for (int r = 0; r < input_h; ++r) t.s1_rows.push_back(torch_linear_tap(s1h, r, in_h));
  for (int c = 0; c < input_w; ++c) t.s1_cols.push_back(torch_linear_tap(s1w, c, in_w));
  for (int y = 0; y < out_h; ++y) t.s2_rows.push_back(torch_linear_tap(s2h, y, input_h));
  for (int x = 0; x < out_w; ++x) t.s2_cols.push_back(torch_linear_tap(s2w, x, input_w));

  if (union_out != nullptr) std::memset(union_out, 0, static_cast<size_t>(out_h) * out_w);
  const int nthreads = std::max(1, std::min(resolve_threads(threads), out_h));
  // Per-thread partial statistics (each thread owns a block of output rows of every mask).
  std::vector<std::vector<RowStats>> partial(static_cast<size_t>(nthreads),
                                             std::vector<RowStats>(static_cast<size_t>(n)));
  const bool fma_hw = has_fma();
  const int64_t chunk = (out_h + nthreads - 1) / nthreads;
  parallel_for(nthreads, nthreads, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      int64_t y0 = i * chunk, y1 = std::min<int64_t>(out_h, y0 + chunk);
      if (y0 >= y1) continue;
      std::vector<RowStats>* st = union_out ? &partial[static_cast<size_t>(i)] : nullptr;
      if (fma_hw)
        run_rows<1>(low_res, n, in_h, in_w, input_w, out_h, out_w, t, masks, union_out, st, y0, y1);
      else
        run_rows<0>(low_res, n, in_h, in_w, input_w, out_h, out_w, t, masks, union_out, st, y0, y1);
    }
  });
  if (union_out == nullptr) return;
  for (int m = 0; m < n; ++m) {
    RowStats total;
    for (const auto& p : partial) {
      const RowStats& s = p[static_cast<size_t>(m)];
      if (s.area == 0) continue;
      total.area += s.area;
      total.x0 = std::min(total.x0, s.x0);
      total.y0 = std::min(total.y0, s.y0);
      total.x1 = std::max(total.x1, s.x1);
      total.y1 = std::max(total.y1, s.y1);
    }
    int64_t* bb = bboxes + 4 * m;
    if (total.area == 0) {
      bb[0] = bb[1] = bb[2] = bb[3] = 0;
    } else {
      bb[0] = total.x0;
      bb[1] = total.y0;
      bb[2] = total.x1 + 1;
      bb[3] = total.y1 + 1;
    }
    areas[m] = total.area;
  }
}

}  // namespace lrt
