// oneDNN's normalization primitives: batch_normalization, group_normalization (also instance
// norm, as groups = C: oneDNN has no instance-norm primitive), layer_normalization; forward
// training / inference and backward, on memory described by the case's own strides (so nchw and
// nhwc are the plain formats, not a reordered blocked one). Outputs are preallocated; oneDNN does
// not update running statistics (its callers do), so those are not compared. The add+relu
// epilogue is batch normalization's fuse_norm_add_relu flag (with its workspace, the ReLU mask).
#include <oneapi/dnnl/dnnl.hpp>
#include <oneapi/dnnl/dnnl_config.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <unordered_map>

#include "candidate.h"

#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB
#include <oneapi/tbb/global_control.h>
#elif DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>
#endif

namespace normkit::bench {
namespace {

using dnnl::memory;
using dnnl::normalization_flags;
using dnnl::prop_kind;
constexpr float kEps = 1e-5f;

memory::data_type data_type(DType d) {
  switch (d) {
    case DType::float32: return memory::data_type::f32;
    case DType::bfloat16: return memory::data_type::bf16;
    case DType::float16: return memory::data_type::f16;
  }
  return memory::data_type::f32;
}

// One CPU engine and stream for the process. A SYCL-runtime build finds its CPU device through
// the OpenCL ICD loader; the build records where the package's CPU driver is.
struct Runtime {
  std::optional<dnnl::engine> engine;
  std::optional<dnnl::stream> stream;
  std::string error;
  Runtime() {
#ifdef NORMKIT_BENCH_OPENCL_ICD
    setenv("OCL_ICD_FILENAMES", NORMKIT_BENCH_OPENCL_ICD, /*overwrite=*/0);
#endif
    try {
      engine.emplace(dnnl::engine::kind::cpu, 0);
      stream.emplace(*engine);
    } catch (const dnnl::error& e) {
      error = std::string("no oneDNN CPU engine: ") + e.what();
    }
  }
};

Runtime& runtime() {
  static Runtime r;
  return r;
}

class OnednnCandidate final : public Candidate {
 public:
  std::string name() const override { return "onednn"; }

  std::string prepare(const Case& c, const CaseData& data) override {
    Runtime& rt = runtime();
    if (!rt.engine) return rt.error;
    const dnnl::engine& eng = *rt.engine;
    c_ = &c;
    const memory::dims dims(c.shape.begin(), c.shape.end());
    const memory::dims strides = strides_of(c);
    const memory::desc md(dims, data_type(c.dtype), strides);
    const int64_t params = static_cast<int64_t>(data.weight.size());
    const memory::desc param_md({params}, memory::data_type::f32, memory::format_tag::a);
    const bool inference = c.op == Op::forward_inference;
    const prop_kind fwd_kind =
        inference ? prop_kind::forward_inference : prop_kind::forward_training;
    auto flags = normalization_flags::use_scale | normalization_flags::use_shift;
    if (inference) flags = flags | normalization_flags::use_global_stats;
    const bool bwd = c.op == Op::backward || c.op == Op::forward_backward;
    add_relu_ = c.epilogue == Epilogue::add_relu;
    if (c.epilogue == Epilogue::silu) return "no fused silu compared";
    if (add_relu_) {
      if (c.family != Family::batch_norm) return "no fused add+relu for this primitive";
      flags = flags | normalization_flags::fuse_norm_add_relu;
    }
    // Not compared: normkit-bench does not build oneDNN's RMS variant of layer_normalization.
    if (c.family == Family::rms_norm) return "no RMS norm compared";
    if (c.family == Family::batch_renorm) return "no Batch Renorm in oneDNN";
    // No primitive for these; torch's compositions are timed by the Python scripts instead.
    if (c.family == Family::layer_norm2d || c.family == Family::weight_std ||
        c.family == Family::frn || c.family == Family::evonorm_s0)
      return "no primitive for this op";
    memory::desc workspace_md;

    try {
      switch (c.family) {
        case Family::batch_norm: {
          dnnl::batch_normalization_forward::primitive_desc pd(eng, fwd_kind, md, md, kEps, flags);
          forward_ = dnnl::batch_normalization_forward(pd);
          stat_md_ = pd.mean_desc();
          workspace_md = pd.workspace_desc();  // the ReLU mask of a fused add+relu
          impl_ = pd.impl_info_str();
          if (bwd) {
            dnnl::batch_normalization_backward::primitive_desc bpd(eng, prop_kind::backward, md,
                                                                   md, md, kEps, flags, pd);
            backward_ = dnnl::batch_normalization_backward(bpd);
            impl_ += "/" + std::string(bpd.impl_info_str());
          }
          break;
        }
        case Family::group_norm:
        case Family::instance_norm: {
          const int64_t groups = c.family == Family::group_norm ? c.groups : c.channels();
          dnnl::group_normalization_forward::primitive_desc pd(eng, fwd_kind, md, md, groups,
                                                               kEps, flags);
          forward_ = dnnl::group_normalization_forward(pd);
          stat_md_ = pd.mean_desc();
          impl_ = pd.impl_info_str();
          if (bwd) {
            dnnl::group_normalization_backward::primitive_desc bpd(
                eng, prop_kind::backward, md, md, md, groups, kEps, flags, pd);
            backward_ = dnnl::group_normalization_backward(bpd);
            impl_ += "/" + std::string(bpd.impl_info_str());
          }
          break;
        }
        case Family::rms_norm:
        case Family::batch_renorm:
        case Family::layer_norm2d:
        case Family::weight_std:
        case Family::frn:
        case Family::evonorm_s0: break;  // refused above
        case Family::layer_norm: {
          dnnl::layer_normalization_forward::primitive_desc pd(eng, fwd_kind, md, md, kEps,
                                                               flags);
          forward_ = dnnl::layer_normalization_forward(pd);
          stat_md_ = pd.mean_desc();
          impl_ = pd.impl_info_str();
          if (bwd) {
            dnnl::layer_normalization_backward::primitive_desc bpd(eng, prop_kind::backward, md,
                                                                   md, md, kEps, flags, pd);
            backward_ = dnnl::layer_normalization_backward(bpd);
            impl_ += "/" + std::string(bpd.impl_info_str());
          }
          break;
        }
      }
    } catch (const dnnl::error& e) {
      const std::string what = e.what();
      return "no primitive: " + what.substr(0, what.find(". Run workload"));
    }

    // Inputs wrap the case's buffers (oneDNN only reads them); outputs are oneDNN-allocated.
    x_ = memory(md, eng, const_cast<void*>(data.x.data()));
    scale_ = memory(param_md, eng, const_cast<float*>(data.weight.data()));
    shift_ = memory(param_md, eng, const_cast<float*>(data.bias.data()));
    if (c.op != Op::backward) y_ = memory(md, eng);
    if (inference) {
      mean_ = memory(stat_md_, eng, const_cast<float*>(data.running_mean.data()));
      variance_ = memory(stat_md_, eng, const_cast<float*>(data.running_var.data()));
    } else {
      mean_ = memory(stat_md_, eng);
      variance_ = memory(stat_md_, eng);
    }
    if (bwd) {
      dy_ = memory(md, eng, const_cast<void*>(data.dy.data()));
      dx_ = memory(md, eng);
      dscale_ = memory(param_md, eng);
      dshift_ = memory(param_md, eng);
    }
    if (add_relu_) {
      residual_ = memory(md, eng, const_cast<void*>(data.residual.data()));
      if (workspace_md.get_size() > 0) workspace_ = memory(workspace_md, eng);
      if (bwd) dresidual_ = memory(md, eng);
    }
    if (c.op == Op::backward) {
      y_ = memory(md, eng);
      forward();  // the saved statistics backward reads
      y_ = memory();
    }
    return "";
  }

  void set_threads(int threads) override {
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB
    limit_.reset();
    limit_.emplace(oneapi::tbb::global_control::max_allowed_parallelism,
                   static_cast<std::size_t>(threads));
#endif
    threads_ = threads;
  }

  void run() override {
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
    omp_set_num_threads(threads_);
#endif
    switch (c_->op) {
      case Op::forward:
      case Op::forward_inference: forward(); break;
      case Op::backward: backward(); break;
      case Op::forward_backward:
        forward();
        backward();
        break;
    }
  }

  void collect(Outputs& out) override {
    if (c_->op != Op::backward) {
      out.add("y", y_.get_data_handle(), c_->dtype, c_->numel());
      if (c_->op == Op::forward || c_->op == Op::forward_backward) {
        const auto* mean = static_cast<const float*>(mean_.get_data_handle());
        const auto* var = static_cast<const float*>(variance_.get_data_handle());
        const std::size_t n = stat_md_.get_size() / sizeof(float);
        std::vector<float> rstd(n);
        for (std::size_t i = 0; i < n; ++i) rstd[i] = 1.0f / std::sqrt(var[i] + kEps);
        out.add("mean", mean, DType::float32, static_cast<int64_t>(n));
        out.add("rstd", rstd);
      }
    }
    if (c_->op == Op::backward || c_->op == Op::forward_backward) {
      out.add("dx", dx_.get_data_handle(), c_->dtype, c_->numel());
      const int64_t params = static_cast<int64_t>(dscale_.get_desc().get_size() / sizeof(float));
      out.add("dweight", dscale_.get_data_handle(), DType::float32, params);
      out.add("dbias", dshift_.get_data_handle(), DType::float32, params);
      if (add_relu_) out.add("dresidual", dresidual_.get_data_handle(), c_->dtype, c_->numel());
    }
  }

  void release() override {
    forward_ = dnnl::primitive();
    backward_ = dnnl::primitive();
    x_ = y_ = dy_ = dx_ = scale_ = shift_ = mean_ = variance_ = dscale_ = dshift_ = memory();
    residual_ = dresidual_ = workspace_ = memory();
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB
    limit_.reset();
#endif
  }

  // The kernels oneDNN picked (jit, ncsp, ref, ...): forward/backward.
  std::string note() const override { return impl_; }
  std::string thread_pool() const override {
    return DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB ? "tbb" : "openmp";
  }

 private:
  void forward() {
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, x_},     {DNNL_ARG_DST, y_},   {DNNL_ARG_SCALE, scale_},
        {DNNL_ARG_SHIFT, shift_}, {DNNL_ARG_MEAN, mean_}, {DNNL_ARG_VARIANCE, variance_}};
    if (add_relu_) {
      args[DNNL_ARG_SRC_1] = residual_;
      if (workspace_) args[DNNL_ARG_WORKSPACE] = workspace_;
    }
    forward_.execute(*runtime().stream, args);
    runtime().stream->wait();
  }

  void backward() {
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, x_},           {DNNL_ARG_DIFF_DST, dy_},        {DNNL_ARG_MEAN, mean_},
        {DNNL_ARG_VARIANCE, variance_}, {DNNL_ARG_SCALE, scale_},      {DNNL_ARG_DIFF_SRC, dx_},
        {DNNL_ARG_DIFF_SCALE, dscale_}, {DNNL_ARG_DIFF_SHIFT, dshift_}};
    if (add_relu_) {
      args[DNNL_ARG_DIFF_SRC_1] = dresidual_;
      args[DNNL_ARG_WORKSPACE] = workspace_;
    }
    backward_.execute(*runtime().stream, args);
    runtime().stream->wait();
  }

  const Case* c_ = nullptr;
  int threads_ = 1;
  std::string impl_;
  memory::desc stat_md_;
  dnnl::primitive forward_, backward_;
  memory x_, y_, dy_, dx_, scale_, shift_, mean_, variance_, dscale_, dshift_;
  bool add_relu_ = false;
  memory residual_, dresidual_, workspace_;
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB
  std::optional<oneapi::tbb::global_control> limit_;
#endif
};

}  // namespace

std::unique_ptr<Candidate> make_onednn_candidate() { return std::make_unique<OnednnCandidate>(); }

bool onednn_has_own_thread_pool() {
  return DNNL_CPU_THREADING_RUNTIME != DNNL_RUNTIME_OMP;
}

std::string onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  std::string s = std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
                  std::to_string(v->patch);
  const unsigned runtime = v->cpu_runtime;
  s += runtime == DNNL_RUNTIME_OMP    ? " (OpenMP)"
       : runtime == DNNL_RUNTIME_TBB  ? " (TBB)"
       : runtime == DNNL_RUNTIME_SYCL ? " (SYCL CPU runtime, TBB threads)"
                                      : " (other runtime)";
  return s;
}

}  // namespace normkit::bench
