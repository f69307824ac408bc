// PyTorch's ATen (libtorch C++), called as torch.nn.functional calls it: at::batch_norm,
// at::group_norm, at::layer_norm, at::instance_norm, with outputs allocated by ATen.
// Forward-only ops run under InferenceMode (autograd off); backward goes through autograd
// (torch::autograd::grad), which runs ATen's native backward kernels as a training step does.
// A fused add+relu epilogue is PyTorch's separate in-place add_ and relu_ after the norm.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/version.h>

#include "candidate.h"

namespace normkit::bench {
namespace {

constexpr double kEps = 1e-5;
constexpr double kMomentum = 0.1;

at::ScalarType scalar_type(DType d) {
  switch (d) {
    case DType::float32: return at::kFloat;
    case DType::bfloat16: return at::kBFloat16;
    case DType::float16: return at::kHalf;
  }
  return at::kFloat;
}

class TorchCandidate final : public Candidate {
 public:
  std::string name() const override { return "torch"; }

  std::string prepare(const Case& c, const CaseData& data) override {
    // ATen has no Batch Renorm kernel; its composition is timed by bench/torch_batch_renorm.py.
    if (c.family == Family::batch_renorm) return "no Batch Renorm kernel in ATen";
    // torch has no kernel for these: its compositions are timed by bench/layer_norm2d_ws.py and
    // bench/torch_frn_evonorm.py.
    if (c.family == Family::layer_norm2d || c.family == Family::weight_std ||
        c.family == Family::frn || c.family == Family::evonorm_s0)
      return "composition only (bench/*.py)";
    c_ = &c;
    sizes_ = c.shape;
    strides_ = strides_of(c);
    const auto act = at::TensorOptions().dtype(scalar_type(c.dtype));
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    // Inputs wrap the case's buffers without copying; ATen never writes to them.
    x_ = at::from_blob(data.x.data(), sizes_, strides_, act);
    dy_ = at::from_blob(data.dy.data(), sizes_, strides_, act);
    const int64_t params = static_cast<int64_t>(data.weight.size());
    weight_ = at::from_blob(const_cast<float*>(data.weight.data()), {params}, f32);
    bias_ = at::from_blob(const_cast<float*>(data.bias.data()), {params}, f32);
    add_relu_ = c.epilogue == Epilogue::add_relu;
    silu_ = c.epilogue == Epilogue::silu;
    rms_ = c.family == Family::rms_norm;
    if (add_relu_) residual_ = at::from_blob(data.residual.data(), sizes_, strides_, act);
    if (c.family == Family::batch_norm) {
      // Updated in place by the training forward: own copies.
      running_mean_ = at::from_blob(const_cast<float*>(data.running_mean.data()), {params}, f32)
                          .clone();
      running_var_ = at::from_blob(const_cast<float*>(data.running_var.data()), {params}, f32)
                         .clone();
    }
    if (c.op == Op::backward || c.op == Op::forward_backward) {
      x_grad_ = x_.detach().requires_grad_(true);
      weight_grad_ = weight_.detach().requires_grad_(true);
      bias_grad_ = bias_.detach().requires_grad_(true);
      if (add_relu_) residual_grad_ = residual_.detach().requires_grad_(true);
    }
    // The graph backward replays. (Running statistics the graph saved must stay untouched:
    // autograd checks their version.)
    if (c.op == Op::backward)
      graph_y_ = forward(x_grad_, weight_grad_, bias_grad_, residual_grad_);
    return "";
  }

  void set_threads(int threads) override { at::set_num_threads(threads); }

  void run() override {
    switch (c_->op) {
      case Op::forward:
      case Op::forward_inference: {
        c10::InferenceMode guard;
        y_ = forward(x_, weight_, bias_, residual_);
        break;
      }
      case Op::backward:
        grads_ = torch::autograd::grad({graph_y_}, grad_inputs(), {dy_}, /*retain_graph=*/true);
        break;
      case Op::forward_backward: {
        at::Tensor y = forward(x_grad_, weight_grad_, bias_grad_, residual_grad_);
        grads_ = torch::autograd::grad({y}, grad_inputs(), {dy_});
        y_ = y.detach();
        break;
      }
    }
  }

  void collect(Outputs& out) override {
    if (c_->op != Op::backward) {
      out.add("y", in_case_layout(y_).data_ptr<float>(), DType::float32, c_->numel());
      if (c_->family == Family::batch_norm && c_->op != Op::forward_inference) {
        out.add("running_mean", running_mean_.data_ptr<float>(), DType::float32,
                running_mean_.numel());
        out.add("running_var", running_var_.data_ptr<float>(), DType::float32,
                running_var_.numel());
      }
    }
    if (c_->op == Op::backward || c_->op == Op::forward_backward) {
      out.add("dx", in_case_layout(grads_[0]).data_ptr<float>(), DType::float32, c_->numel());
      const at::Tensor dw = grads_[1].contiguous().to(at::kFloat);
      out.add("dweight", dw.data_ptr<float>(), DType::float32, dw.numel());
      if (!rms_) {  // RMSNorm has no bias
        const at::Tensor db = grads_[2].contiguous().to(at::kFloat);
        out.add("dbias", db.data_ptr<float>(), DType::float32, db.numel());
      }
      if (add_relu_)
        out.add("dresidual", in_case_layout(grads_.back()).data_ptr<float>(), DType::float32,
                c_->numel());
    }
  }

  void release() override {
    x_ = dy_ = weight_ = bias_ = running_mean_ = running_var_ = at::Tensor();
    x_grad_ = weight_grad_ = bias_grad_ = graph_y_ = y_ = at::Tensor();
    residual_ = residual_grad_ = at::Tensor();
    grads_.clear();
  }

 private:
  std::vector<at::Tensor> grad_inputs() const {
    std::vector<at::Tensor> in = {x_grad_, weight_grad_};
    if (!rms_) in.push_back(bias_grad_);
    if (add_relu_) in.push_back(residual_grad_);
    return in;
  }

  // With add+relu, as a ResNet block ends in PyTorch (torchvision): out += identity; relu_(out).
  // With silu, as diffusers' ResnetBlock2D: nn.GroupNorm, then nn.SiLU (not in place).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                     const at::Tensor& residual) {
    at::Tensor y = normalize(x, w, b);
    if (add_relu_) {
      y.add_(residual);
      y.relu_();
    }
    if (silu_) y = at::silu(y);
    return y;
  }

  at::Tensor normalize(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
    switch (c_->family) {
      case Family::batch_norm:
        return at::batch_norm(x, w, b, running_mean_, running_var_,
                              /*training=*/c_->op != Op::forward_inference, kMomentum, kEps,
                              /*cudnn_enabled=*/false);
      case Family::group_norm:
        return at::group_norm(x, c_->groups, w, b, kEps, false);
      case Family::layer_norm:
        return at::layer_norm(x, {c_->shape.back()}, w, b, kEps, false);
      case Family::rms_norm: {
        // torch has no RMSNorm kernel here: the composition LLaMA-style models write, the
        // statistic in float32 for 16-bit x.
        const at::Tensor xf = x.to(at::kFloat);
        const at::Tensor r = at::rsqrt(xf.pow(2).mean({-1}, /*keepdim=*/true) + kEps);
        return (xf * r * w).to(x.scalar_type());
      }
      case Family::batch_renorm: break;  // refused in prepare
      case Family::instance_norm:
        return at::instance_norm(x, w, b, {}, {}, /*use_input_stats=*/true, kMomentum, kEps,
                                 false);
      case Family::layer_norm2d:
      case Family::weight_std:
      case Family::frn:
      case Family::evonorm_s0: break;  // refused in prepare
    }
    return {};
  }

  // A float copy with the case's strides, so its bytes are in the case's element order
  // (ATen may return another memory format, e.g. instance_norm of channels-last input).
  at::Tensor in_case_layout(const at::Tensor& t) const {
    at::Tensor out = at::empty_strided(sizes_, strides_, at::TensorOptions().dtype(at::kFloat));
    out.copy_(t);
    return out;
  }

  const Case* c_ = nullptr;
  std::vector<int64_t> sizes_, strides_;
  at::Tensor x_, dy_, weight_, bias_, running_mean_, running_var_;
  at::Tensor x_grad_, weight_grad_, bias_grad_, graph_y_, y_;
  bool add_relu_ = false, silu_ = false, rms_ = false;
  at::Tensor residual_, residual_grad_;
  std::vector<at::Tensor> grads_;
};

}  // namespace

std::unique_ptr<Candidate> make_torch_candidate() { return std::make_unique<TorchCandidate>(); }

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace normkit::bench
