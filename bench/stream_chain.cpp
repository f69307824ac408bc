// normkit-bench-chain: a normalization followed by a consumer that reads its whole output, the way
// the next layer does. Whether an output is written with non-temporal stores (see kStreamBytes in
// src/cpu/streaming.h) decides where the consumer finds it: in L3, or in memory. The op alone can
// gain from streaming while the pair loses; this measures the pair. Build it with each threshold to
// compare (the threshold is a compile-time constant).
//
//   normkit-bench-chain [--threads 2] [--reps 301]
#include <CLI/CLI.hpp>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "normkit/normkit.h"
#include "timing.h"  // median

namespace {

using Clock = std::chrono::steady_clock;
using normkit::bench::median;

enum class Op { batch_norm, layer_norm, group_norm };

struct Case {
  std::string name;
  Op op;
  std::vector<int64_t> dims;
  normkit::MemoryFormat format;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"normkit-bench-chain: a normalization, then a consumer reading its output"};
  int threads = 2, reps = 301;
  app.add_option("--threads", threads, "Threads for the op and the consumer")
      ->check(CLI::Range(1, 1024));
  app.add_option("--reps", reps, "Timed repetitions (median reported)")
      ->check(CLI::Range(3, 100000));
  CLI11_PARSE(app, argc, argv);

  // Outputs of 8-16 MB: the sizes the threshold's choice is about.
  const std::vector<Case> cases = {
      {"bn.fwd_train 32x2048x7x7 nhwc", Op::batch_norm, {32, 2048, 7, 7},
       normkit::MemoryFormat::channels_last},
      {"ln.fwd 4096x768", Op::layer_norm, {4096, 768}, normkit::MemoryFormat::channels_first},
      {"gn.fwd 1x512x64x64/g32 nchw", Op::group_norm, {1, 512, 64, 64},
       normkit::MemoryFormat::channels_first}};
  std::printf("normkit-bench-chain: %d thread(s), median of %d; kStreamBytes is the build's\n",
              threads, reps);
  std::printf("%-32s %10s %16s %16s\n", "op", "op us", "op+scale us", "op+sum us");

  normkit::Context ctx;
  ctx.num_threads = threads;
  for (const Case& c : cases) {
    int64_t n = 1;
    for (int64_t d : c.dims) n *= d;
    const int64_t C = c.dims[1], rows = c.dims[0];
    std::vector<float> x(n), y(n), z(n), w(C, 1.0f), b(C, 0.0f), stat_a(std::max(C, rows * 32)),
        stat_b(stat_a.size()), running_mean(C, 0.0f), running_var(C, 1.0f);
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    for (float& v : x) v = normal(rng);
    const int rank = int(c.dims.size());
    const normkit::TensorView xv(x.data(), normkit::DType::float32, rank, c.dims.data(), c.format);
    const normkit::TensorView yv(y.data(), normkit::DType::float32, rank, c.dims.data(), c.format);

    std::function<void()> op;
    if (c.op == Op::batch_norm)
      op = [&] {
        normkit::batch_norm_forward_training({}, xv, w, b, yv, {stat_a.data(), size_t(C)},
                                             {stat_b.data(), size_t(C)}, running_mean,
                                             running_var, ctx);
      };
    else if (c.op == Op::layer_norm)
      op = [&] {
        normkit::layer_norm_forward({1}, xv, w, b, yv, {stat_a.data(), size_t(rows)},
                                    {stat_b.data(), size_t(rows)}, ctx);
      };
    else
      op = [&] {
        normkit::group_norm_forward({32}, xv, w, b, yv, {stat_a.data(), size_t(rows * 32)},
                                    {stat_b.data(), size_t(rows * 32)}, ctx);
      };
    // Consumers: one writes a new tensor from y (as an elementwise layer), one only reads it.
    auto scale = [&] {
#pragma omp parallel for num_threads(threads) schedule(static)
      for (int64_t i = 0; i < n; ++i) z[i] = 0.5f * y[i];
    };
    volatile float sink = 0;
    auto sum = [&] {
      float s = 0;
#pragma omp parallel for simd num_threads(threads) schedule(static) reduction(+ : s)
      for (int64_t i = 0; i < n; ++i) s += y[i];
      sink = s;
    };

    std::vector<double> t_op, t_scale, t_sum;
    auto us = [](Clock::time_point a, Clock::time_point b) {
      return std::chrono::duration<double, std::micro>(b - a).count();
    };
    for (int r = 0; r < reps; ++r) {
      const auto t0 = Clock::now();
      op();
      const auto t1 = Clock::now();
      scale();
      const auto t2 = Clock::now();
      op();
      sum();
      const auto t3 = Clock::now();
      t_op.push_back(us(t0, t1));
      t_scale.push_back(us(t0, t2));
      t_sum.push_back(us(t2, t3));
    }
    std::printf("%-32s %10.1f %16.1f %16.1f\n", c.name.c_str(), median(t_op), median(t_scale),
                median(t_sum));
  }
  return 0;
}
