#pragma once
// The logical devices of a training step (trainer.h): K model replicas that each train on their
// own N images, K / P of them in each of the run's P processes (dist.h), and what joins them:
// the exchange of synchronized BatchNorm's partials within a step, and the combination of their
// parameter gradients after it.
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "nn/model.h"

namespace normkit::train {

// The devices of this process, devices first .. first + count - 1 of all. Each device's step
// runs on a thread of its own when the devices synchronize BatchNorm (they must then meet at
// every BatchNorm), and one after another otherwise.
class DeviceGroup {
 public:
  DeviceGroup(int first, int count, int total);

  // Runs step(d) for each of this process's devices d (0-based, local) and returns when all
  // have finished. Concurrently, one thread per device, when `concurrent`. When a device
  // throws, the others are woken from an exchange (they throw too) and the first device's
  // exception (in device order) is rethrown here.
  void run(bool concurrent, const std::function<void(int)>& step);

  // The exchange object for local device d (Norm's DeviceExchange): every device of every
  // process hands in its partials, and each gets them all, concatenated in device order. The
  // last device of this process to arrive moves them between the processes (one
  // dist::allgather_partials).
  DeviceExchange* exchange(int d) { return &handles_[static_cast<size_t>(d)]; }

  // For the profile: the doubles every exchange so far returned (all devices' partials), and the
  // seconds local device 0 spent in exchanges (waiting for the others included).
  uint64_t exchanged_doubles() const { return exchanged_doubles_; }
  double exchange_seconds() const { return exchange_seconds_; }

  int first() const { return first_; }
  int count() const { return count_; }
  int total() const { return total_; }

 private:
  struct Handle : DeviceExchange {
    DeviceGroup* group = nullptr;
    int device = 0;
    std::span<const double> exchange(std::span<const double> mine) override {
      return group->meet(device, mine);
    }
  };
  std::span<const double> meet(int device, std::span<const double> mine);
  void fail();

  int first_, count_, total_;
  std::vector<Handle> handles_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::vector<double>> slots_;
  std::vector<double> result_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool failed_ = false;
  uint64_t exchanged_doubles_ = 0;
  double exchange_seconds_ = 0;
};

// The step's gradient of every parameter: the mean over all `total` devices of their gradients,
// summed in device order 0, 1, ..., total - 1 (a parameter whose gradient is already the sum
// over the devices, grad_summed_over_devices, takes device 0's), then divided by total; written
// into replicas[0]'s grads. `replicas` are this process's devices (first .. first + count - 1).
// With several processes the gradients travel in one dist::allgather of count * G floats per
// process (G = the model's parameter count), so that every process adds the same floats in the
// same order: the result is bitwise the same for any number of processes. With one device,
// nothing changes.
void combine_gradients(const std::vector<std::unique_ptr<Model>>& replicas, int total,
                       std::vector<float>& send, std::vector<float>& receive);

// Copies replicas[0]'s parameter values to the other replicas (after the optimizer's step).
void broadcast_values(const std::vector<std::unique_ptr<Model>>& replicas);

}  // namespace normkit::train
