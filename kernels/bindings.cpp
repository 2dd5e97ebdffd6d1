// The only pybind11 file of legion_rt._C. Every argument is validated here (dtype, rank, shape, contiguity,
// sizes > 0, sizes that would overflow) with a message naming the argument; failures raise TypeError
// (wrong dtype / type) or ValueError (everything else), never abort. The kernels run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "cpu_ops.h"
#ifdef LEGION_RT_WITH_CUDA
#include "cuda_ops.h"
#endif

namespace py = pybind11;

namespace {

// Sizes must stay below 2^24: the reference computes source coordinates in float32, which is exact for
// integers only below 2^24, and every product of two sizes then fits comfortably in int64.
constexpr int64_t kMaxDim = int64_t{1} << 24;
// Largest number of elements one output may have (2^40 bytes); larger requests are refused up front.
constexpr int64_t kMaxElements = int64_t{1} << 40;

[[noreturn]] void value_error(const std::string& msg) {
  throw py::value_error(msg);
}
[[noreturn]] void type_error(const std::string& msg) {
  throw py::type_error(msg);
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  if (a.ndim() == 1) s += ",";
  return s + ")";
}

py::array as_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    type_error(std::string(name) + " must be a numpy.ndarray, got " +
               std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  return py::reinterpret_borrow<py::array>(obj);
}

void check_dtype(const py::array& a, const char* name, const py::dtype& want, const char* want_name) {
  if (!a.dtype().is(want) && !a.dtype().equal(want))
    type_error(std::string(name) + " must have dtype " + want_name + ", got " + std::string(py::str(a.dtype())));
}

void check_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style))
    value_error(std::string(name) + " must be C-contiguous (use numpy.ascontiguousarray)");
}

int64_t check_dim(int64_t v, const char* name) {
  if (v <= 0) value_error(std::string(name) + " must be > 0, got " + std::to_string(v));
  if (v >= kMaxDim) value_error(std::string(name) + " is too large (" + std::to_string(v) + " >= 2^24)");
  return v;
}

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r) || r > kMaxElements)
    value_error(std::string(what) + " is too large (" + std::to_string(a) + " x " + std::to_string(b) + " elements)");
  return r;
}

std::pair<int, int> check_size_pair(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj))
    type_error(std::string(name) + " must be a (height, width) pair of ints");
  auto seq = py::reinterpret_borrow<py::sequence>(obj);
  if (seq.size() != 2)
    value_error(std::string(name) + " must have 2 entries (height, width), got " + std::to_string(seq.size()));
  int64_t v[2];
  for (size_t i = 0; i < 2; ++i) {
    py::handle item = seq[i];
    if (py::isinstance<py::bool_>(item) || !py::isinstance<py::int_>(item)) {
      // Accept numpy integers too (they implement __index__), but never floats or bools.
      if (py::isinstance<py::bool_>(item) || !py::hasattr(item, "__index__"))
        type_error(std::string(name) + "[" + std::to_string(i) + "] must be an int, got " +
                   std::string(py::str(py::type::handle_of(item).attr("__name__"))));
    }
    v[i] = py::cast<int64_t>(item.attr("__index__")());
    std::string n = std::string(name) + (i == 0 ? "[0] (height)" : "[1] (width)");
    check_dim(v[i], n.c_str());
  }
  return {static_cast<int>(v[0]), static_cast<int>(v[1])};
}

std::array<float, 3> check_triple(const py::handle& obj, const char* name, bool positive) {
  if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj))
    type_error(std::string(name) + " must be a sequence of 3 numbers");
  auto seq = py::reinterpret_borrow<py::sequence>(obj);
  if (seq.size() != 3) value_error(std::string(name) + " must have 3 entries, got " + std::to_string(seq.size()));
  std::array<float, 3> out{};
  for (size_t i = 0; i < 3; ++i) {
    double d = 0;
    try {
      d = py::cast<double>(seq[i]);
    } catch (const py::cast_error&) {
      type_error(std::string(name) + "[" + std::to_string(i) + "] must be a number");
    }
    if (!std::isfinite(d) || (positive && d <= 0))
      value_error(std::string(name) + "[" + std::to_string(i) + "] must be " + (positive ? "> 0 and " : "") +
                  "finite, got " + std::to_string(d));
    out[i] = static_cast<float>(d);
  }
  return out;
}

int check_threads(int n) {
  if (n < 0) value_error("num_threads must be >= 0 (0 = all cores), got " + std::to_string(n));
  return n;
}

std::pair<int, int> check_rgb(const py::array& rgb) {
  check_dtype(rgb, "rgb", py::dtype::of<uint8_t>(), "uint8");
  if (rgb.ndim() != 3 || rgb.shape(2) != 3) value_error("rgb must have shape [H, W, 3], got " + shape_str(rgb));
  check_contiguous(rgb, "rgb");
  int64_t h = check_dim(rgb.shape(0), "rgb height"), w = check_dim(rgb.shape(1), "rgb width");
  checked_mul(h, w * 3, "rgb");
  return {static_cast<int>(h), static_cast<int>(w)};
}

lrt::PreprocessParams make_params(int clip_shortest_edge, const py::handle& clip_crop, const py::handle& clip_mean,
                                  const py::handle& clip_std, int sam_size, const py::handle& sam_mean,
                                  const py::handle& sam_std) {
  lrt::PreprocessParams p;
  p.clip_shortest_edge = static_cast<int>(check_dim(clip_shortest_edge, "clip_size"));
  auto crop = check_size_pair(clip_crop, "clip_crop");
  p.clip_crop_h = crop.first;
  p.clip_crop_w = crop.second;
  if (p.clip_crop_h > p.clip_shortest_edge || p.clip_crop_w > p.clip_shortest_edge)
    value_error("clip_crop (" + std::to_string(p.clip_crop_h) + ", " + std::to_string(p.clip_crop_w) +
                ") must not exceed clip_size " + std::to_string(p.clip_shortest_edge));
  p.sam_size = static_cast<int>(check_dim(sam_size, "sam_size"));
  checked_mul(int64_t{3} * p.sam_size, p.sam_size, "sam_size");
  auto cm = check_triple(clip_mean, "clip_mean", false), cs = check_triple(clip_std, "clip_std", true);
  auto sm = check_triple(sam_mean, "sam_mean", false), ss = check_triple(sam_std, "sam_std", true);
  for (int i = 0; i < 3; ++i) {
    p.clip_mean[i] = cm[static_cast<size_t>(i)];
    p.clip_std[i] = cs[static_cast<size_t>(i)];
    p.sam_mean[i] = sm[static_cast<size_t>(i)];
    p.sam_std[i] = ss[static_cast<size_t>(i)];
  }
  return p;
}

void check_geometry(int h, int w, const lrt::PreprocessParams& p, lrt::PreprocessGeometry* g) {
  // The long side after the CLIP resize is 336 * long / short: refuse what would overflow int32 / 2^24.
  const double long_after = static_cast<double>(p.clip_shortest_edge) * std::max(h, w) / std::min(h, w);
  if (long_after >= static_cast<double>(kMaxDim))
    value_error("rgb aspect ratio " + std::to_string(h) + "x" + std::to_string(w) +
                " is too extreme: the CLIP resize would be " + std::to_string(static_cast<int64_t>(long_after)) +
                " pixels long");
  *g = lrt::preprocess_geometry(h, w, p);
  // SAM's ResizeLongestSide rounds the short side to int(short * size / long + 0.5): 0 for pictures more than
  // 2 * size times longer than wide. The reference fails there too (PIL: "height and width must be > 0").
  if (g->sam_h <= 0 || g->sam_w <= 0)
    value_error("rgb aspect ratio " + std::to_string(h) + "x" + std::to_string(w) +
                " is too extreme: SAM's longest-side resize to " + std::to_string(p.sam_size) + " gives " +
                std::to_string(g->sam_h) + "x" + std::to_string(g->sam_w) + " pixels");
}

py::tuple preprocess(const py::handle& rgb_obj, int clip_size, const py::handle& clip_crop, const py::handle& clip_mean,
                     const py::handle& clip_std, int sam_size, const py::handle& sam_mean, const py::handle& sam_std,
                     int num_threads, bool pillow13_order) {
  py::array rgb = as_array(rgb_obj, "rgb");
  auto [h, w] = check_rgb(rgb);
  lrt::PreprocessParams p = make_params(clip_size, clip_crop, clip_mean, clip_std, sam_size, sam_mean, sam_std);
  p.pillow13_order = pillow13_order;
  lrt::PreprocessGeometry g{};
  check_geometry(h, w, p, &g);
  check_threads(num_threads);
  py::array_t<float> clip({py::ssize_t{1}, py::ssize_t{3}, py::ssize_t(p.clip_crop_h), py::ssize_t(p.clip_crop_w)});
  py::array_t<float> sam({py::ssize_t{1}, py::ssize_t{3}, py::ssize_t(p.sam_size), py::ssize_t(p.sam_size)});
  const uint8_t* src = static_cast<const uint8_t*>(rgb.data());
  float* clip_ptr = clip.mutable_data();
  float* sam_ptr = sam.mutable_data();
  {
    py::gil_scoped_release release;
    lrt::preprocess_cpu(src, h, w, p, clip_ptr, sam_ptr, num_threads);
  }
  return py::make_tuple(clip, sam, py::make_tuple(g.sam_h, g.sam_w));
}

py::dict geometry(const py::handle& size, int clip_size, const py::handle& clip_crop, int sam_size) {
  auto hw = check_size_pair(size, "size");
  lrt::PreprocessParams p = make_params(clip_size, clip_crop, py::make_tuple(0, 0, 0), py::make_tuple(1, 1, 1),
                                        sam_size, py::make_tuple(0, 0, 0), py::make_tuple(1, 1, 1));
  lrt::PreprocessGeometry g{};
  check_geometry(hw.first, hw.second, p, &g);
  py::dict d;
  d["clip_resized"] = py::make_tuple(g.clip_resized_h, g.clip_resized_w);
  d["clip_crop_offset"] = py::make_tuple(g.clip_top, g.clip_left);
  d["sam_resized"] = py::make_tuple(g.sam_h, g.sam_w);
  return d;
}

py::array resize_rgb(const py::handle& rgb_obj, const py::handle& size, const std::string& filter, int num_threads,
                     bool pillow13_order) {
  py::array rgb = as_array(rgb_obj, "rgb");
  auto [h, w] = check_rgb(rgb);
  auto out_hw = check_size_pair(size, "size");
  checked_mul(int64_t{3} * out_hw.first, out_hw.second, "size");
  lrt::Filter f;
  if (filter == "bilinear")
    f = lrt::Filter::Bilinear;
  else if (filter == "bicubic")
    f = lrt::Filter::Bicubic;
  else
    value_error("filter must be 'bilinear' or 'bicubic', got '" + filter + "'");
  check_threads(num_threads);
  py::array_t<uint8_t> out({py::ssize_t(out_hw.first), py::ssize_t(out_hw.second), py::ssize_t{3}});
  const uint8_t* src = static_cast<const uint8_t*>(rgb.data());
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    lrt::resize_rgb_cpu(src, h, w, out_hw.first, out_hw.second, f, dst, num_threads, pillow13_order);
  }
  return out;
}

struct MaskArgs {
  int n, in_h, in_w, input_h, input_w, out_h, out_w;
};

MaskArgs check_mask_sizes(int64_t n, int64_t in_h, int64_t in_w, const py::handle& input_size,
                          const py::handle& original_size, int image_size) {
  MaskArgs a{};
  if (n < 0) value_error("low_res mask count must be >= 0, got " + std::to_string(n));
  if (n >= kMaxDim) value_error("low_res has too many masks (" + std::to_string(n) + ")");
  a.n = static_cast<int>(n);
  a.in_h = static_cast<int>(check_dim(in_h, "low_res height"));
  a.in_w = static_cast<int>(check_dim(in_w, "low_res width"));
  check_dim(image_size, "image_size");
  auto in = check_size_pair(input_size, "input_size");
  if (in.first > image_size || in.second > image_size)
    value_error("input_size (" + std::to_string(in.first) + ", " + std::to_string(in.second) +
                ") must fit in image_size " + std::to_string(image_size));
  auto out = check_size_pair(original_size, "original_size");
  a.input_h = in.first;
  a.input_w = in.second;
  a.out_h = out.first;
  a.out_w = out.second;
  checked_mul(checked_mul(n == 0 ? 1 : n, a.out_h, "masks"), a.out_w, "masks");
  return a;
}

py::object postprocess_masks(const py::handle& low_obj, const py::handle& input_size, const py::handle& original_size,
                             int image_size, bool with_stats, int num_threads) {
  py::array low = as_array(low_obj, "low_res");
  check_dtype(low, "low_res", py::dtype::of<float>(), "float32");
  if (low.ndim() != 3) value_error("low_res must have shape [N, h, w], got " + shape_str(low));
  check_contiguous(low, "low_res");
  MaskArgs a = check_mask_sizes(low.shape(0), low.shape(1), low.shape(2), input_size, original_size, image_size);
  check_threads(num_threads);
  py::array_t<bool> masks({py::ssize_t(a.n), py::ssize_t(a.out_h), py::ssize_t(a.out_w)});
  py::array_t<bool> uni;
  py::array_t<int64_t> bboxes, areas;
  uint8_t* u = nullptr;
  int64_t *bb = nullptr, *ar = nullptr;
  if (with_stats) {
    uni = py::array_t<bool>({py::ssize_t(a.out_h), py::ssize_t(a.out_w)});
    bboxes = py::array_t<int64_t>({py::ssize_t(a.n), py::ssize_t{4}});
    areas = py::array_t<int64_t>({py::ssize_t(a.n)});
    u = reinterpret_cast<uint8_t*>(uni.mutable_data());
    bb = bboxes.mutable_data();
    ar = areas.mutable_data();
  }
  const float* src = static_cast<const float*>(low.data());
  uint8_t* m = reinterpret_cast<uint8_t*>(masks.mutable_data());
  {
    py::gil_scoped_release release;
    lrt::postprocess_masks_cpu(src, a.n, a.in_h, a.in_w, image_size, a.input_h, a.input_w, a.out_h, a.out_w, m, u, bb,
                               ar, num_threads);
  }
  if (!with_stats) return std::move(masks);
  return py::make_tuple(masks, uni, bboxes, areas);
}

bool cuda_compiled() {
#ifdef LEGION_RT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef LEGION_RT_WITH_CUDA
  return lrt::cuda_device_count();
#else
  return 0;
#endif
}

bool cuda_memory_pools_supported(int device) {
#ifdef LEGION_RT_WITH_CUDA
  return lrt::cuda_memory_pools_supported(device);
#else
  (void)device;
  return false;
#endif
}

uintptr_t check_ptr(uintptr_t p, const char* name) {
  if (p == 0) value_error(std::string(name) + " must be a non-null device pointer");
  return p;
}

#ifdef LEGION_RT_WITH_CUDA
void check_cuda(int code, const char* what) {
  if (code != 0) throw std::runtime_error(std::string(what) + " failed: " + lrt::cuda_error_string(code));
}
#endif

py::tuple preprocess_cuda(uintptr_t rgb, const py::handle& size, uintptr_t clip_out, uintptr_t sam_out,
                          uintptr_t stream, int clip_size, const py::handle& clip_crop, const py::handle& clip_mean,
                          const py::handle& clip_std, int sam_size, const py::handle& sam_mean,
                          const py::handle& sam_std, bool pillow13_order) {
  auto hw = check_size_pair(size, "size");
  checked_mul(int64_t{3} * hw.first, hw.second, "size");
  check_ptr(rgb, "rgb");
  check_ptr(clip_out, "clip_out");
  check_ptr(sam_out, "sam_out");
  lrt::PreprocessParams p = make_params(clip_size, clip_crop, clip_mean, clip_std, sam_size, sam_mean, sam_std);
  p.pillow13_order = pillow13_order;
  lrt::PreprocessGeometry g{};
  check_geometry(hw.first, hw.second, p, &g);
#ifdef LEGION_RT_WITH_CUDA
  int code;
  {
    py::gil_scoped_release release;
    code = lrt::preprocess_cuda(reinterpret_cast<const uint8_t*>(rgb), hw.first, hw.second, p,
                                reinterpret_cast<float*>(clip_out), reinterpret_cast<float*>(sam_out), stream);
  }
  check_cuda(code, "preprocess_cuda");
  return py::make_tuple(g.sam_h, g.sam_w);
#else
  (void)stream;
  throw std::runtime_error("legion_rt._C was built without CUDA (LEGION_RT_CUDA=OFF or no nvcc at build time)");
#endif
}

void postprocess_masks_cuda(uintptr_t low_res, const py::handle& low_res_shape, const py::handle& input_size,
                            const py::handle& original_size, uintptr_t masks_out, uintptr_t union_out,
                            uintptr_t bboxes_out, uintptr_t areas_out, uintptr_t stream, int image_size) {
  if (!py::isinstance<py::sequence>(low_res_shape) || py::len(low_res_shape) != 3)
    value_error("low_res_shape must be (N, h, w)");
  auto shp = py::reinterpret_borrow<py::sequence>(low_res_shape);
  int64_t n = py::cast<int64_t>(shp[0]), in_h = py::cast<int64_t>(shp[1]), in_w = py::cast<int64_t>(shp[2]);
  MaskArgs a = check_mask_sizes(n, in_h, in_w, input_size, original_size, image_size);
  if (a.n > 0) {
    check_ptr(low_res, "low_res");
    check_ptr(masks_out, "masks_out");
  }
  const bool any_stats = union_out || bboxes_out || areas_out;
  if (any_stats && !(union_out && bboxes_out && areas_out))
    value_error("union_out, bboxes_out and areas_out must be given together (all non-zero) or not at all");
#ifdef LEGION_RT_WITH_CUDA
  int code;
  {
    py::gil_scoped_release release;
    code = lrt::postprocess_masks_cuda(reinterpret_cast<const float*>(low_res), a.n, a.in_h, a.in_w, image_size,
                                       a.input_h, a.input_w, a.out_h, a.out_w, reinterpret_cast<uint8_t*>(masks_out),
                                       reinterpret_cast<uint8_t*>(union_out), reinterpret_cast<int64_t*>(bboxes_out),
                                       reinterpret_cast<int64_t*>(areas_out), stream);
  }
  check_cuda(code, "postprocess_masks_cuda");
#else
  (void)stream;
  throw std::runtime_error("legion_rt._C was built without CUDA (LEGION_RT_CUDA=OFF or no nvcc at build time)");
#endif
}

void pack_masks_cuda(uintptr_t masks, int64_t n, int64_t per_mask, uintptr_t packed_out, uintptr_t stream) {
  if (n < 0 || per_mask < 0 || n > std::numeric_limits<int32_t>::max())
    value_error("n and per_mask must be >= 0 (n < 2^31)");
  checked_mul(n, per_mask, "n * per_mask");
  if (n > 0 && per_mask > 0) {
    check_ptr(masks, "masks");
    check_ptr(packed_out, "packed_out");
  }
#ifdef LEGION_RT_WITH_CUDA
  int code;
  {
    py::gil_scoped_release release;
    code = lrt::pack_masks_cuda(reinterpret_cast<const uint8_t*>(masks), static_cast<int>(n), per_mask,
                                reinterpret_cast<uint8_t*>(packed_out), stream);
  }
  check_cuda(code, "pack_masks_cuda");
#else
  (void)stream;
  throw std::runtime_error("legion_rt._C was built without CUDA (LEGION_RT_CUDA=OFF or no nvcc at build time)");
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "legion_rt native core: Pillow-exact preprocessing and fused SAM mask post-processing (CPU + CUDA)";
  const auto default_crop = py::make_tuple(336, 336);
  const auto clip_mean = py::make_tuple(0.48145466, 0.4578275, 0.40821073);
  const auto clip_std = py::make_tuple(0.26862954, 0.26130258, 0.27577711);
  const auto sam_mean = py::make_tuple(123.675, 116.28, 103.53);
  const auto sam_std = py::make_tuple(58.395, 57.12, 57.375);
  m.def("preprocess", &preprocess, py::arg("rgb"), py::arg("clip_size") = 336, py::arg("clip_crop") = default_crop,
        py::arg("clip_mean") = clip_mean, py::arg("clip_std") = clip_std, py::arg("sam_size") = 1024,
        py::arg("sam_mean") = sam_mean, py::arg("sam_std") = sam_std, py::arg("num_threads") = 0,
        py::arg("pillow13_order") = true, "uint8 [H,W,3] -> (clip f32 [1,3,ch,cw], sam f32 [1,3,S,S], (h', w'))");
  m.def("geometry", &geometry, py::arg("size"), py::arg("clip_size") = 336, py::arg("clip_crop") = default_crop,
        py::arg("sam_size") = 1024, "Resize/crop geometry of preprocess for an image of size (H, W)");
  m.def("resize_rgb", &resize_rgb, py::arg("rgb"), py::arg("size"), py::arg("filter"), py::arg("num_threads") = 0,
        py::arg("pillow13_order") = true,
        "Pillow-equivalent Image.resize of uint8 [H,W,3] to size=(h, w); filter 'bilinear' or 'bicubic'");
  m.def("postprocess_masks", &postprocess_masks, py::arg("low_res"), py::arg("input_size"), py::arg("original_size"),
        py::arg("image_size") = 1024, py::arg("with_stats") = false, py::arg("num_threads") = 0,
        "f32 [N,h,w] -> bool [N,H,W] (or (masks, union, bboxes, areas) with with_stats)");
  m.def("cuda_compiled", &cuda_compiled, "True when the extension contains the CUDA kernels");
  m.def("cuda_device_count", &cuda_device_count, "Number of CUDA devices (0 on any error); never raises");
  m.def("cuda_memory_pools_supported", &cuda_memory_pools_supported, py::arg("device") = 0,
        "Whether the device supports stream-ordered allocation (else the kernels' scratch uses cudaMalloc)");
  m.def("preprocess_cuda", &preprocess_cuda, py::arg("rgb"), py::arg("size"), py::arg("clip_out"), py::arg("sam_out"),
        py::arg("stream") = 0, py::arg("clip_size") = 336, py::arg("clip_crop") = default_crop,
        py::arg("clip_mean") = clip_mean, py::arg("clip_std") = clip_std, py::arg("sam_size") = 1024,
        py::arg("sam_mean") = sam_mean, py::arg("sam_std") = sam_std, py::arg("pillow13_order") = true,
        "Device-pointer preprocess enqueued on `stream`; returns (h', w')");
  m.def("postprocess_masks_cuda", &postprocess_masks_cuda, py::arg("low_res"), py::arg("low_res_shape"),
        py::arg("input_size"), py::arg("original_size"), py::arg("masks_out"), py::arg("union_out") = 0,
        py::arg("bboxes_out") = 0, py::arg("areas_out") = 0, py::arg("stream") = 0, py::arg("image_size") = 1024,
        "Device-pointer mask post-processing enqueued on `stream`");
  m.def("pack_masks_cuda", &pack_masks_cuda, py::arg("masks"), py::arg("n"), py::arg("per_mask"), py::arg("packed_out"),
        py::arg("stream") = 0,
        "uint8 [n, per_mask] -> bits [n, ceil(per_mask/8)] (LSB first) on the device, enqueued on `stream`");
}
