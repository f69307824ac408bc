// The copy yardstick and normkit's own candidates.
#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstring>

#include "candidate.h"
#include "normkit/batch_norm.h"
#include "normkit/epilogue.h"
#include "normkit/evonorm.h"
#include "normkit/frn.h"
#include "normkit/group_norm.h"
#include "normkit/instance_norm.h"
#include "normkit/layer_norm.h"
#include "normkit/layer_norm2d.h"
#include "normkit/rms_norm.h"
#include "normkit/batch_renorm.h"
#include "normkit/weight_standardization.h"

namespace normkit::bench {
namespace {

constexpr double kEps = 1e-5;
constexpr double kMomentum = 0.1;
constexpr double kLayerNorm2dEps = 1e-6;  // ConvNeXt's
constexpr double kFrnEps = 1e-6;          // the FRN paper's fixed eps

// Parameters by assignment, so fields the headers add later keep their defaults.
BatchNormParams batch_norm_params() {
  BatchNormParams p;
  p.eps = kEps;
  p.momentum = kMomentum;
  return p;
}

GroupNormParams group_norm_params(int64_t groups) {
  GroupNormParams p;
  p.num_groups = groups;
  p.eps = kEps;
  return p;
}

LayerNormParams layer_norm_params() {
  LayerNormParams p;
  p.normalized_ndim = 1;
  p.eps = kEps;
  return p;
}

RmsNormParams rms_norm_params() {
  RmsNormParams p;
  p.normalized_ndim = 1;
  p.eps = kEps;
  return p;
}

EvoNormS0Params evonorm_s0_params(int64_t groups) {
  EvoNormS0Params p;
  p.num_groups = groups;
  p.eps = kEps;
  return p;
}

InstanceNormParams instance_norm_params() {
  InstanceNormParams p;
  p.use_input_stats = true;
  p.momentum = kMomentum;
  p.eps = kEps;
  return p;
}

class CopyCandidate final : public Candidate {
 public:
  std::string name() const override { return "copy"; }
  std::string prepare(const Case& c, const CaseData& data) override {
    src_ = data.x.data();
    bytes_ = c.bytes();
    dst_ = Buffer(bytes_);
    std::memset(dst_.data(), 0, bytes_);  // first touch outside the timed region
    return "";
  }
  void set_threads(int threads) override { threads_ = threads; }
  void run() override {
    const auto* src = static_cast<const char*>(src_);
    auto* dst = static_cast<char*>(dst_.data());
    const std::size_t bytes = bytes_;
#pragma omp parallel num_threads(threads_)
    {
      // Contiguous chunks on 64-byte boundaries, one per thread.
      const std::size_t t = omp_get_thread_num(), n = omp_get_num_threads();
      const std::size_t lines = (bytes + 63) / 64;
      const std::size_t begin = std::min(bytes, lines * t / n * 64);
      const std::size_t end = std::min(bytes, lines * (t + 1) / n * 64);
      if (end > begin) std::memcpy(dst + begin, src + begin, end - begin);
    }
  }
  void collect(Outputs&) override {}
  void release() override { dst_ = Buffer(); }

 private:
  const void* src_ = nullptr;
  std::size_t bytes_ = 0;
  Buffer dst_;
  int threads_ = 1;
};

class NormkitCandidate final : public Candidate {
 public:
  explicit NormkitCandidate(Backend backend) { ctx_.backend = backend; }
  std::string name() const override {
    return ctx_.backend == Backend::reference ? "normkit-ref" : "normkit";
  }

  std::string prepare(const Case& c, const CaseData& data) override {
    c_ = &c;
    data_ = &data;
    x_ = view_of(c, data.x.data());
    dy_ = view_of(c, data.dy.data());
    // y also for a backward: its sign is the ReLU mask of a fused epilogue.
    y_ = Buffer(c.bytes());
    if (c.op == Op::backward || c.op == Op::forward_backward) {
      dx_ = Buffer(c.bytes());
      if (c.epilogue == Epilogue::add_relu) dresidual_ = Buffer(c.bytes());
    }
    int64_t stats = 0;
    switch (c.family) {
      case Family::batch_norm:
      case Family::batch_renorm: stats = c.channels(); break;
      case Family::group_norm: stats = c.batch() * c.groups; break;
      case Family::layer_norm:
      case Family::rms_norm: stats = c.batch(); break;  // rows
      case Family::instance_norm: stats = c.batch() * c.channels(); break;
      case Family::layer_norm2d: stats = c.batch() * c.spatial_size(); break;  // positions
      case Family::weight_std: stats = c.batch(); break;                       // C_out
      case Family::frn: stats = c.batch() * c.channels(); break;
      case Family::evonorm_s0: stats = c.batch() * c.groups; break;
    }
    mean_.assign(stats, 0.f);
    rstd_.assign(stats, 0.f);
    r_.assign(c.family == Family::batch_renorm ? stats : 0, 0.f);
    d_.assign(r_.size(), 0.f);
    dweight_.assign(data.weight.size(), 0.f);
    dbias_.assign(data.bias.size(), 0.f);
    dextra_.assign(data.extra.size(), 0.f);
    running_mean_ = data.running_mean;
    running_var_ = data.running_var;
    // Scratch memory given by the caller, so no call allocates.
    ctx_.workspace = {};
    std::size_t scratch = 0;
    switch (c.family) {
      case Family::batch_norm:
      case Family::batch_renorm: scratch = batch_norm_workspace_size(x_); break;
      case Family::group_norm:
        scratch = group_norm_workspace_size(group_norm_params(c.groups), x_);
        break;
      case Family::layer_norm: scratch = layer_norm_workspace_size(layer_norm_params(), x_); break;
      case Family::rms_norm: scratch = rms_norm_workspace_size(rms_norm_params(), x_); break;
      case Family::instance_norm:
        scratch = instance_norm_workspace_size(instance_norm_params(), x_);
        break;
      case Family::layer_norm2d: scratch = layer_norm2d_workspace_size(x_, kLayerNorm2dEps); break;
      case Family::weight_std: scratch = weight_standardization_workspace_size(x_, kEps); break;
      case Family::frn: scratch = frn_workspace_size(x_); break;
      case Family::evonorm_s0:
        scratch = evonorm_s0_workspace_size(evonorm_s0_params(c.groups), x_);
        break;
    }
    if (scratch > 0) {
      workspace_ = Buffer(scratch);
      ctx_.workspace = {static_cast<std::byte*>(workspace_.data()), workspace_.bytes()};
    }
    if (c.op == Op::backward) {
      // The saved statistics come from this backend's own forward, as in training.
      forward();
      running_mean_ = data.running_mean;
      running_var_ = data.running_var;
    }
    return "";
  }

  void set_threads(int threads) override { ctx_.num_threads = threads; }

  void run() override {
    switch (c_->op) {
      case Op::forward: forward(); break;
      case Op::forward_inference: forward_inference(); break;
      case Op::backward: backward(); break;
      case Op::forward_backward:
        forward();
        backward();
        break;
    }
  }

  void collect(Outputs& out) override {
    const bool fwd = c_->op != Op::backward;
    const bool bwd = c_->op == Op::backward || c_->op == Op::forward_backward;
    if (fwd) {
      out.add("y", y_.data(), c_->dtype, c_->numel());
      if (c_->op != Op::forward_inference) {
        // RMSNorm and FRN have none
        if (c_->family != Family::rms_norm && c_->family != Family::frn) out.add("mean", mean_);
        out.add("rstd", rstd_);
        if (c_->family == Family::batch_renorm) {
          out.add("r", r_);
          out.add("d", d_);
        }
        if (c_->family == Family::batch_norm || c_->family == Family::batch_renorm) {
          out.add("running_mean", running_mean_);
          out.add("running_var", running_var_);
        }
      }
    }
    if (bwd) {
      out.add("dx", dx_.data(), c_->dtype, c_->numel());
      if (c_->family != Family::weight_std) {  // no parameters
        out.add("dweight", dweight_);
        if (c_->family != Family::rms_norm) out.add("dbias", dbias_);
      }
      if (c_->family == Family::frn) out.add("dtau", dextra_);
      if (c_->family == Family::evonorm_s0) out.add("dv", dextra_);
      if (c_->epilogue == Epilogue::add_relu)
        out.add("dresidual", dresidual_.data(), c_->dtype, c_->numel());
    }
  }

  void release() override {
    y_ = Buffer();
    dx_ = Buffer();
    dresidual_ = Buffer();
    workspace_ = Buffer();
    ctx_.workspace = {};
  }

 private:
  // y = relu(normalized + residual) for the add+relu cases, silu(normalized) for the silu ones.
  ForwardEpilogue forward_epilogue() const {
    ForwardEpilogue e;
    if (c_->epilogue == Epilogue::add_relu) {
      e.activation = Activation::relu;
      e.residual = view_of(*c_, data_->residual.data());
    }
    if (c_->epilogue == Epilogue::silu) e.activation = Activation::silu;
    return e;
  }

  // The ReLU mask from y; the residual's gradient written to dresidual.
  BackwardEpilogue backward_epilogue() const {
    BackwardEpilogue e;
    if (c_->epilogue == Epilogue::add_relu) {
      e.activation = Activation::relu;
      e.y = view_of(*c_, y_.data());
      e.dresidual = view_of(*c_, dresidual_.data());
    }
    if (c_->epilogue == Epilogue::silu) {  // z from x and the forward's bias
      e.activation = Activation::silu;
      e.bias = data_->bias;
    }
    return e;
  }

  void forward() {
    const TensorView y = view_of(*c_, y_.data());
    const std::span<const float> w(data_->weight), b(data_->bias);
    switch (c_->family) {
      case Family::batch_norm: {
        BatchNormParams p = batch_norm_params();
        p.epilogue = forward_epilogue();
        batch_norm_forward_training(p, x_, w, b, y, mean_, rstd_, running_mean_, running_var_,
                                    ctx_);
        break;
      }
      case Family::group_norm: {
        GroupNormParams p = group_norm_params(c_->groups);
        p.epilogue = forward_epilogue();
        group_norm_forward(p, x_, w, b, y, mean_, rstd_, ctx_);
        break;
      }
      case Family::layer_norm:
        layer_norm_forward(layer_norm_params(), x_, w, b, y, mean_, rstd_, ctx_);
        break;
      case Family::rms_norm: {
        RmsNormParams p = rms_norm_params();
        p.epilogue = forward_epilogue();
        rms_norm_forward(p, x_, w, y, rstd_, ctx_);
        break;
      }
      case Family::batch_renorm: {
        BatchRenormParams p;
        p.epilogue = forward_epilogue();
        batch_renorm_forward_training(p, x_, w, b, y, mean_, rstd_, r_, d_, running_mean_,
                                      running_var_, ctx_);
        break;
      }
      case Family::instance_norm:
        instance_norm_forward(instance_norm_params(), x_, w, b, {}, {}, y, mean_, rstd_, ctx_);
        break;
      case Family::layer_norm2d:
        layer_norm2d_forward(x_, kLayerNorm2dEps, w, b, y, mean_, rstd_, ctx_);
        break;
      case Family::weight_std: weight_standardization_forward(x_, kEps, y, mean_, rstd_, ctx_); break;
      case Family::frn: frn_forward(kFrnEps, x_, w, b, data_->extra, y, rstd_, ctx_); break;
      case Family::evonorm_s0:
        evonorm_s0_forward(evonorm_s0_params(c_->groups), x_, data_->extra, w, b, y, mean_, rstd_,
                           ctx_);
        break;
    }
  }

  void forward_inference() {
    BatchNormParams p = batch_norm_params();
    p.epilogue = forward_epilogue();
    batch_norm_forward_inference(p, x_, data_->weight, data_->bias, running_mean_, running_var_,
                                 view_of(*c_, y_.data()), ctx_);
  }

  void backward() {
    const TensorView dx = view_of(*c_, dx_.data());
    const std::span<const float> w(data_->weight);
    switch (c_->family) {
      case Family::batch_norm:
        batch_norm_backward_training({.epilogue = backward_epilogue()}, dy_, x_, mean_, rstd_, w,
                                     dx, dweight_, dbias_, ctx_);
        break;
      case Family::batch_renorm:
        batch_renorm_backward_training({.epilogue = backward_epilogue()}, dy_, x_, mean_, rstd_,
                                       r_, d_, w, dx, dweight_, dbias_, ctx_);
        break;
      case Family::group_norm: {
        GroupNormBackwardParams p;
        p.num_groups = c_->groups;
        p.epilogue = backward_epilogue();
        group_norm_backward(p, dy_, x_, mean_, rstd_, w, dx, dweight_, dbias_, ctx_);
        break;
      }
      case Family::layer_norm: {
        LayerNormBackwardParams p;
        p.normalized_ndim = layer_norm_params().normalized_ndim;
        layer_norm_backward(p, dy_, x_, mean_, rstd_, w, dx, dweight_, dbias_, ctx_);
        break;
      }
      case Family::rms_norm: {
        RmsNormBackwardParams p;
        p.epilogue = backward_epilogue();
        p.epilogue.bias = {};  // no bias: silu's z is recomputed without one
        rms_norm_backward(p, dy_, x_, rstd_, w, dx, dweight_, ctx_);
        break;
      }
      case Family::instance_norm: {
        InstanceNormBackwardParams p;
        p.use_input_stats = instance_norm_params().use_input_stats;
        instance_norm_backward(p, dy_, x_, mean_, rstd_, w, dx, dweight_, dbias_, ctx_);
        break;
      }
      case Family::layer_norm2d:
        layer_norm2d_backward(dy_, x_, mean_, rstd_, w, dx, dweight_, dbias_, ctx_);
        break;
      case Family::weight_std:
        weight_standardization_backward(dy_, x_, mean_, rstd_, dx, ctx_);  // dy as dw_hat
        break;
      case Family::frn:
        frn_backward(dy_, x_, rstd_, w, data_->bias, data_->extra, dx, dweight_, dbias_, dextra_,
                     ctx_);
        break;
      case Family::evonorm_s0:
        evonorm_s0_backward(c_->groups, dy_, x_, mean_, rstd_, data_->extra, w, dx, dextra_,
                            dweight_, dbias_, ctx_);
        break;
    }
  }

  Context ctx_;
  const Case* c_ = nullptr;
  const CaseData* data_ = nullptr;
  TensorView x_, dy_;
  Buffer y_, dx_, dresidual_, workspace_;
  std::vector<float> mean_, rstd_, r_, d_, running_mean_, running_var_, dweight_, dbias_;
  std::vector<float> dextra_;  // FRN's dtau, EvoNorm-S0's dv
};

}  // namespace

std::unique_ptr<Candidate> make_copy_candidate() { return std::make_unique<CopyCandidate>(); }

std::unique_ptr<Candidate> make_normkit_candidate(Backend backend) {
  return std::make_unique<NormkitCandidate>(backend);
}

}  // namespace normkit::bench
