#pragma once
// A trainable parameter: value, gradient (overwritten by each backward) and the optimizer's
// momentum buffer, under a stable name used by checkpoints.
#include <string>
#include <vector>

namespace normkit::train {

struct Param {
  std::string name;
  std::vector<float> value, grad, momentum;
  // The gradient is already the sum over every logical device of a step (synchronized
  // BatchNorm's weight and bias): the devices' gradients are then not summed again.
  bool grad_summed_over_devices = false;

  Param() = default;
  Param(std::string param_name, size_t size)
      : name(std::move(param_name)), value(size, 0.0f), grad(size, 0.0f), momentum(size, 0.0f) {}
  size_t size() const { return value.size(); }
};

// A non-trainable state vector saved in checkpoints (BatchNorm's running statistics).
struct Buffer {
  std::string name;
  std::vector<float>* values;
};

}  // namespace normkit::train
