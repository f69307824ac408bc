// normkit-bench-sync: what the canonical order of synchronized BatchNorm costs in one process.
// For each shape, one training forward + backward three ways, interleaved (every repetition
// runs each once, in a rotating order), median of the repetitions:
//   single  batch_norm_forward_training + batch_norm_backward_training (its own tiling)
//   steps1  the steps of batch_norm_steps.h over the batch as one piece
//   steps4  the same over four pieces (as four ranks would, without communication)
// It checks first (the steps' y and dx against the single-process ones), then times.
//   normkit-bench-sync [--threads T] [--reps R]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "normkit/batch_norm.h"
#include "normkit/batch_norm_steps.h"
#include "normkit/context.h"

namespace {

using normkit::MemoryFormat;
using normkit::TensorView;

struct Shape {
  int64_t n, c, h, w;
  MemoryFormat format;
};

struct Buffers {
  Shape s;
  std::vector<float> x, dy, y, dx, weight, bias, mean, invstd, rm, rv, dw, db;
  explicit Buffers(const Shape& shape) : s(shape) {
    const std::size_t total = std::size_t(s.n * s.c * s.h * s.w), C = std::size_t(s.c);
    std::mt19937_64 rng(1);
    std::normal_distribution<float> d;
    x.resize(total), dy.resize(total), y.resize(total), dx.resize(total);
    for (auto& v : x) v = d(rng) + 1;
    for (auto& v : dy) v = d(rng);
    weight.assign(C, 1.5f), bias.assign(C, 0.5f), mean.resize(C), invstd.resize(C);
    rm.assign(C, 0.f), rv.assign(C, 1.f), dw.resize(C), db.resize(C);
  }
  TensorView view(std::vector<float>& v, int64_t first, int64_t count) {
    return TensorView(v.data() + first * s.c * s.h * s.w, {count, s.c, s.h, s.w}, s.format);
  }
};

void single(Buffers& b) {
  const TensorView x = b.view(b.x, 0, b.s.n);
  normkit::batch_norm_forward_training({}, x, b.weight, b.bias, b.view(b.y, 0, b.s.n), b.mean,
                                       b.invstd, b.rm, b.rv);
  normkit::batch_norm_backward_training({}, b.view(b.dy, 0, b.s.n), x, b.mean, b.invstd,
                                        b.weight, b.view(b.dx, 0, b.s.n), b.dw, b.db);
}

void steps(Buffers& b, int pieces) {
  std::vector<std::pair<int64_t, int64_t>> p;
  for (int i = 0; i < pieces; ++i) {
    const int64_t lo = b.s.n * i / pieces, hi = b.s.n * (i + 1) / pieces;
    p.push_back({lo, hi - lo});
  }
  std::vector<double> all;
  for (auto [lo, n] : p) {
    std::vector<double> part(normkit::batch_norm_partials_size(lo, n, b.s.c));
    normkit::batch_norm_statistics_partials(lo, b.view(b.x, lo, n), part);
    all.insert(all.end(), part.begin(), part.end());
  }
  normkit::batch_norm_merge_statistics({}, b.s.n, all, b.mean, b.invstd, b.rm, b.rv);
  for (auto [lo, n] : p)
    normkit::batch_norm_normalize({}, b.view(b.x, lo, n), b.weight, b.bias, b.mean, b.invstd,
                                  b.view(b.y, lo, n));
  all.clear();
  for (auto [lo, n] : p) {
    std::vector<double> part(normkit::batch_norm_partials_size(lo, n, b.s.c));
    normkit::batch_norm_gradient_partials({}, lo, b.view(b.dy, lo, n), b.view(b.x, lo, n),
                                          b.mean, part);
    all.insert(all.end(), part.begin(), part.end());
  }
  std::vector<double> sg(std::size_t(b.s.c)), sgx(std::size_t(b.s.c));
  normkit::batch_norm_merge_gradients(b.s.n, all, b.invstd, sg, sgx, b.dw, b.db);
  for (auto [lo, n] : p)
    normkit::batch_norm_backward_dx({}, b.s.n, b.view(b.dy, lo, n), b.view(b.x, lo, n), b.mean,
                                    b.invstd, b.weight, sg, sgx, b.view(b.dx, lo, n));
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, reps = 15;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(argv[i + 1]);
  }
  normkit::set_num_threads(threads);
  const MemoryFormat cf = MemoryFormat::channels_first, cl = MemoryFormat::channels_last;
  // ResNet-50's BatchNorm shapes at 32 and 2 images per process, and the trainer's small net.
  const std::vector<Shape> shapes = {
      {32, 64, 56, 56, cf},   {32, 256, 56, 56, cf}, {32, 512, 28, 28, cf},
      {32, 1024, 14, 14, cf}, {32, 2048, 7, 7, cf},  {32, 256, 56, 56, cl},
      {32, 2048, 7, 7, cl},   {2, 64, 112, 112, cf}, {2, 256, 56, 56, cf},
      {2, 2048, 7, 7, cf},    {32, 16, 28, 28, cf},  {32, 64, 7, 7, cf},
      {8, 32, 14, 14, cf}};
  std::printf("| shape (N,C,H,W) | format | single ms | steps, 1 piece ms | steps, 4 pieces ms "
              "| 1 piece / single | 4 pieces / single |\n|---|---|---|---|---|---|---|\n");
  for (const Shape& s : shapes) {
    Buffers b(s);
    // Check, then time.
    single(b);
    const std::vector<float> y = b.y, dx = b.dx;
    steps(b, 4);
    const double ey = max_diff(y, b.y), edx = max_diff(dx, b.dx);
    if (!(ey < 1e-3 && edx < 1e-3)) {
      std::fprintf(stderr, "check failed: max |dy| %g, |ddx| %g\n", ey, edx);
      return 1;
    }
    std::vector<std::function<void()>> runs = {[&] { single(b); }, [&] { steps(b, 1); },
                                               [&] { steps(b, 4); }};
    std::vector<std::vector<double>> times(runs.size());
    for (int r = 0; r < reps; ++r)
      for (std::size_t k = 0; k < runs.size(); ++k) {
        const std::size_t which = (k + std::size_t(r)) % runs.size();
        const auto t0 = std::chrono::steady_clock::now();
        runs[which]();
        times[which].push_back(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    const double t0 = median(times[0]), t1 = median(times[1]), t4 = median(times[2]);
    std::printf("| %lld,%lld,%lld,%lld | %s | %.3f | %.3f | %.3f | %.2f | %.2f |\n",
                (long long)s.n, (long long)s.c, (long long)s.h, (long long)s.w,
                s.format == cf ? "NCHW" : "NHWC", t0 * 1e3, t1 * 1e3, t4 * 1e3, t1 / t0,
                t4 / t0);
    std::fflush(stdout);
  }
  return 0;
}
