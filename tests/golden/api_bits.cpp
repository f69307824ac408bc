// Fingerprints of the C++ API's results for tests/golden/bits.py: what the Python module does
// not reach (the LayerNorm and InstanceNorm backwards, bfloat16, the fused epilogues forward and
// backward), on fixed random inputs. Prints one "name fnv1a64" line per output; any change of a
// bit in any output changes its line.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "normkit/normkit.h"

namespace {

using normkit::DType;
using normkit::MemoryFormat;
using normkit::TensorView;

uint64_t fnv1a(const void* data, std::size_t bytes) {
  uint64_t h = 1469598103934665603ull;
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

void print(const std::string& name, const void* data, std::size_t bytes) {
  std::printf("%s %016llx\n", name.c_str(), static_cast<unsigned long long>(fnv1a(data, bytes)));
}

// Activations of one dtype as raw 16- or 32-bit values.
struct Buffer {
  DType dtype;
  std::vector<uint32_t> f32;
  std::vector<uint16_t> half;
  void* data() { return dtype == DType::float32 ? (void*)f32.data() : (void*)half.data(); }
  std::size_t bytes() const { return f32.size() * 4 + half.size() * 2; }
};

uint16_t to_half_bits(float v, DType dtype) {
  if (dtype == DType::bfloat16) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
  }
  const _Float16 h = static_cast<_Float16>(v);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

struct Data {
  std::mt19937_64 rng{20261203};
  Buffer random(DType dtype, int64_t n, double offset = 0.0) {
    std::normal_distribution<double> d(0.0, 1.0);
    Buffer b{dtype, {}, {}};
    for (int64_t i = 0; i < n; ++i) {
      const float v = float(offset + 1.5 * d(rng));
      if (dtype == DType::float32) {
        uint32_t u;
        std::memcpy(&u, &v, 4);
        b.f32.push_back(u);
      } else {
        b.half.push_back(to_half_bits(v, dtype));
      }
    }
    return b;
  }
  Buffer poison(DType dtype, int64_t n) {
    Buffer b{dtype, {}, {}};
    if (dtype == DType::float32) b.f32.assign(std::size_t(n), 0x7fc01234u);
    else b.half.assign(std::size_t(n), uint16_t(0x7e12));
    return b;
  }
  std::vector<float> floats(int64_t n, double offset = 0.0) {
    std::normal_distribution<double> d(0.0, 1.0);
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& e : v) e = float(offset + d(rng));
    return v;
  }
};

const char* dtype_name(DType d) {
  return d == DType::float32 ? "f32" : d == DType::bfloat16 ? "bf16" : "f16";
}

std::string shape_name(const std::vector<int64_t>& dims) {
  std::string s = "(";
  for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + ")";
}

int64_t product(const std::vector<int64_t>& dims) {
  int64_t p = 1;
  for (int64_t d : dims) p *= d;
  return p;
}

TensorView view(Buffer& b, const std::vector<int64_t>& dims, MemoryFormat f) {
  return TensorView(b.data(), b.dtype, int(dims.size()), dims.data(), f);
}

// One op's forward and backward, with and without the epilogue, all outputs printed.
struct Case {
  std::string name;
  DType dtype;
  std::vector<int64_t> dims;
  MemoryFormat format;
  bool epilogue;
};

void layer_norm_case(Data& data, const Case& k, int normalized_ndim) {
  const int64_t n = product(k.dims);
  int64_t cols = 1;
  for (std::size_t i = k.dims.size() - normalized_ndim; i < k.dims.size(); ++i) cols *= k.dims[i];
  const int64_t rows = n / cols;
  Buffer x = data.random(k.dtype, n, 3.0), dy = data.random(k.dtype, n), r = data.random(k.dtype, n);
  Buffer y = data.poison(k.dtype, n), dx = data.poison(k.dtype, n), dr = data.poison(k.dtype, n);
  auto w = data.floats(cols, 1.0), b = data.floats(cols);
  std::vector<float> mean(rows), rstd(rows), dw(cols), db(cols);
  normkit::LayerNormParams p{.normalized_ndim = normalized_ndim, .eps = 1e-5};
  if (k.epilogue) p.epilogue = {.activation = normkit::Activation::relu, .residual = view(r, k.dims, k.format)};
  normkit::layer_norm_forward(p, view(x, k.dims, k.format), w, b, view(y, k.dims, k.format), mean, rstd);
  print(k.name + "/forward", y.data(), y.bytes());
  print(k.name + "/stats", mean.data(), 4 * rows), print(k.name + "/rstd", rstd.data(), 4 * rows);
  normkit::BackwardEpilogue e;
  if (k.epilogue) e = {.activation = normkit::Activation::relu, .y = view(y, k.dims, k.format), .dresidual = view(dr, k.dims, k.format)};
  normkit::layer_norm_backward({.normalized_ndim = normalized_ndim, .epilogue = e},
                               view(dy, k.dims, k.format), view(x, k.dims, k.format), mean, rstd, w,
                               view(dx, k.dims, k.format), dw, db);
  print(k.name + "/dx", dx.data(), dx.bytes());
  print(k.name + "/dweight", dw.data(), 4 * cols), print(k.name + "/dbias", db.data(), 4 * cols);
  if (k.epilogue) print(k.name + "/dresidual", dr.data(), dr.bytes());
}

void group_norm_case(Data& data, const Case& k, int64_t groups, bool instance) {
  const int64_t n = product(k.dims), N = k.dims[0], C = k.dims[1];
  const int64_t stats = N * (instance ? C : groups);
  Buffer x = data.random(k.dtype, n, -2.0), dy = data.random(k.dtype, n), r = data.random(k.dtype, n);
  Buffer y = data.poison(k.dtype, n), dx = data.poison(k.dtype, n), dr = data.poison(k.dtype, n);
  auto w = data.floats(C, 1.0), b = data.floats(C), rm = data.floats(C), rv = data.floats(C, 2.0);
  std::vector<float> mean(stats), rstd(stats), dw(C), db(C);
  const TensorView xv = view(x, k.dims, k.format), yv = view(y, k.dims, k.format);
  normkit::ForwardEpilogue fe;
  normkit::BackwardEpilogue be;
  if (k.epilogue) {
    fe = {.activation = normkit::Activation::relu, .residual = view(r, k.dims, k.format)};
    be = {.activation = normkit::Activation::relu, .y = yv, .dresidual = view(dr, k.dims, k.format)};
  }
  if (instance) {
    normkit::InstanceNormParams p{.use_input_stats = true, .momentum = 0.3, .eps = 1e-5, .epilogue = fe};
    normkit::instance_norm_forward(p, xv, w, b, rm, rv, yv, mean, rstd);
    print(k.name + "/running", rm.data(), 4 * C), print(k.name + "/running_var", rv.data(), 4 * C);
    normkit::instance_norm_backward({.use_input_stats = true, .epilogue = be},
                                    view(dy, k.dims, k.format), xv, mean, rstd, w,
                                    view(dx, k.dims, k.format), dw, db);
  } else {
    normkit::GroupNormParams p{.num_groups = groups, .eps = 1e-5, .epilogue = fe};
    normkit::group_norm_forward(p, xv, w, b, yv, mean, rstd);
    normkit::group_norm_backward({.num_groups = groups, .epilogue = be},
                                 view(dy, k.dims, k.format), xv, mean, rstd, w,
                                 view(dx, k.dims, k.format), dw, db);
  }
  print(k.name + "/forward", y.data(), y.bytes());
  print(k.name + "/mean", mean.data(), 4 * stats), print(k.name + "/rstd", rstd.data(), 4 * stats);
  print(k.name + "/dx", dx.data(), dx.bytes());
  print(k.name + "/dweight", dw.data(), 4 * C), print(k.name + "/dbias", db.data(), 4 * C);
  if (k.epilogue) print(k.name + "/dresidual", dr.data(), dr.bytes());
}

void batch_norm_case(Data& data, const Case& k) {
  const int64_t n = product(k.dims), C = k.dims[1];
  Buffer x = data.random(k.dtype, n, 1.0), dy = data.random(k.dtype, n), r = data.random(k.dtype, n);
  Buffer y = data.poison(k.dtype, n), dx = data.poison(k.dtype, n), dr = data.poison(k.dtype, n);
  auto w = data.floats(C, 1.0), b = data.floats(C), rm = data.floats(C), rv = data.floats(C, 2.0);
  std::vector<float> sm(C), si(C), dw(C), db(C);
  const TensorView xv = view(x, k.dims, k.format), yv = view(y, k.dims, k.format);
  normkit::BatchNormParams p;
  normkit::BackwardEpilogue be;
  if (k.epilogue) {
    p.epilogue = {.activation = normkit::Activation::relu, .residual = view(r, k.dims, k.format)};
    be = {.activation = normkit::Activation::relu, .y = yv, .dresidual = view(dr, k.dims, k.format)};
  }
  normkit::batch_norm_forward_training(p, xv, w, b, yv, sm, si, rm, rv);
  print(k.name + "/training/forward", y.data(), y.bytes());
  print(k.name + "/training/stats", sm.data(), 4 * C), print(k.name + "/training/invstd", si.data(), 4 * C);
  print(k.name + "/training/running", rm.data(), 4 * C), print(k.name + "/training/running_var", rv.data(), 4 * C);
  normkit::batch_norm_backward_training({.epilogue = be}, view(dy, k.dims, k.format), xv, sm, si, w,
                                        view(dx, k.dims, k.format), dw, db);
  print(k.name + "/training/dx", dx.data(), dx.bytes());
  print(k.name + "/training/dweight", dw.data(), 4 * C), print(k.name + "/training/dbias", db.data(), 4 * C);
  if (k.epilogue) print(k.name + "/training/dresidual", dr.data(), dr.bytes());
  normkit::batch_norm_forward_inference(p, xv, w, b, rm, rv, yv);
  print(k.name + "/inference/forward", y.data(), y.bytes());
  normkit::batch_norm_backward_inference({.eps = p.eps, .epilogue = be},
                                         view(dy, k.dims, k.format), xv, rm, rv, w,
                                         view(dx, k.dims, k.format), dw, db);
  print(k.name + "/inference/dx", dx.data(), dx.bytes());
  print(k.name + "/inference/dweight", dw.data(), 4 * C), print(k.name + "/inference/dbias", db.data(), 4 * C);
}

}  // namespace

int main() {
  normkit::set_num_threads(2);
  Data data;
  const MemoryFormat cf = MemoryFormat::channels_first, cl = MemoryFormat::channels_last;
  for (DType dtype : {DType::float32, DType::bfloat16, DType::float16}) {
    const std::string d = dtype_name(dtype);
    for (bool epi : {false, true}) {
      const std::string e = epi ? "/relu+residual" : "";
      // LayerNorm: short and long rows, cached row blocks, two trailing dims, channels-last rows.
      for (const auto& [dims, nd] : std::vector<std::pair<std::vector<int64_t>, int>>{
               {{4, 7, 33}, 1}, {{3, 5, 6, 7}, 2}, {{3, 5, 6, 7}, 3}, {{2, 9, 4109}, 1}, {{1000, 96}, 1},
               {{300, 3000}, 1}, {{3, 100000}, 1}, {{2, 6, 5, 7}, 3}}) {
        for (MemoryFormat f : {cf, cl}) {
          if (f == cl && (dims.size() < 3 || std::size_t(nd) != dims.size() - 1)) continue;
          layer_norm_case(data, {"layer_norm/" + d + (f == cl ? "/cl/" : "/cf/") + shape_name(dims) +
                                     "/nd" + std::to_string(nd) + e, dtype, dims, f, epi}, nd);
        }
      }
      for (MemoryFormat f : {cf, cl}) {
        const std::string fs = f == cl ? "/cl/" : "/cf/";
        for (const auto& [dims, g] : std::vector<std::pair<std::vector<int64_t>, int64_t>>{
                 {{3, 6, 7, 5}, 3}, {{2, 64, 23, 29}, 32}, {{1, 4, 300, 301}, 2}, {{1, 64, 64, 64}, 8}})
          group_norm_case(data, {"group_norm/" + d + fs + shape_name(dims) + "/G" + std::to_string(g) + e,
                                 dtype, dims, f, epi}, g, false);
        for (const auto& dims : std::vector<std::vector<int64_t>>{{2, 6, 33, 17}, {1, 3, 2, 9, 5}, {2, 32, 130, 131}})
          group_norm_case(data, {"instance_norm/" + d + fs + shape_name(dims) + e, dtype, dims, f, epi}, 0, true);
        for (const auto& dims : std::vector<std::vector<int64_t>>{{3, 5, 7, 9}, {4, 64, 30, 30}, {2, 16, 33}})
          batch_norm_case(data, {"batch_norm/" + d + fs + shape_name(dims) + e, dtype, dims, f, epi});
      }
    }
  }
  // Float32 outputs of 16 MiB and more are streamed past the cache.
  for (MemoryFormat f : {cf, cl}) {
    const std::string fs = f == cl ? "/cl/" : "/cf/";
    group_norm_case(data, {"group_norm/f32" + fs + "(1,32,363,363)/G8/streamed/relu+residual",
                           DType::float32, {1, 32, 363, 363}, f, true}, 8, false);
    batch_norm_case(data, {"batch_norm/f32" + fs + "(4,32,182,182)/streamed/relu+residual",
                           DType::float32, {4, 32, 182, 182}, f, true});
  }
  layer_norm_case(data, {"layer_norm/f32/cf/(4,1100000)/streamed/relu+residual", DType::float32,
                         {4, 1100000}, cf, true}, 1);
  // Channels-last groups cut by the 256-channel column blocks of the statistics: 10 channels per
  // group, and 512 (a group over two blocks). Last, so the inputs above stay as recorded.
  for (DType dtype : {DType::float32, DType::bfloat16})
    for (bool epi : {false, true})
      for (const auto& [dims, g] : std::vector<std::pair<std::vector<int64_t>, int64_t>>{
               {{2, 320, 9, 11}, 32}, {{1, 1024, 5, 7}, 2}})
        group_norm_case(data, {std::string("group_norm/") + dtype_name(dtype) + "/cl/" +
                                   shape_name(dims) + "/G" + std::to_string(g) +
                                   (epi ? "/relu+residual" : ""),
                               dtype, dims, cl, epi}, g, false);
  return 0;
}
