#include "devices.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <thread>

#include "dist.h"
#include "normkit/error.h"

#ifdef NORMKIT_TRAIN_WITH_NORMKIT_MPI
#include <mpi.h>

#include "normkit/mpi.h"
#endif

namespace normkit::train {

DeviceGroup::DeviceGroup(int first, int count, int total)
    : first_(first), count_(count), total_(total), handles_(static_cast<size_t>(count)),
      slots_(static_cast<size_t>(count)) {
  for (int d = 0; d < count; ++d) {
    handles_[static_cast<size_t>(d)].group = this;
    handles_[static_cast<size_t>(d)].device = d;
  }
}

std::span<const double> DeviceGroup::meet(int device, std::span<const double> mine) {
  const auto start = std::chrono::steady_clock::now();
  // Device 0's time in here: its own wait and the exchange between processes.
  struct Timed {
    DeviceGroup* group;
    int device;
    std::chrono::steady_clock::time_point start;
    ~Timed() {
      if (device == 0)
        group->exchange_seconds_ +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
  } timed{this, device, start};
  std::unique_lock lock(mutex_);
  if (failed_) throw Error("another device of this process failed");
  slots_[static_cast<size_t>(device)].assign(mine.begin(), mine.end());
  const uint64_t generation = generation_;
  if (++arrived_ < count_) {
    cv_.wait(lock, [&] { return generation_ != generation || failed_; });
    if (failed_) throw Error("another device of this process failed");
    return result_;
  }
  // The last to arrive: this process's partials in device order, then every process's. The
  // others wait on the mutex-free side of cv_, so no two threads call MPI at once.
  std::vector<double> local;
  for (const auto& s : slots_) local.insert(local.end(), s.begin(), s.end());
  try {
#ifdef NORMKIT_TRAIN_WITH_NORMKIT_MPI
    if (dist::size() > 1)
      result_ = normkit::mpi::allgather_partials(local, MPI_COMM_WORLD);
    else
      result_ = std::move(local);
#else
    result_ = dist::allgather_doubles(local);
#endif
  } catch (...) {
    failed_ = true;
    cv_.notify_all();
    throw;
  }
  arrived_ = 0;
  exchanged_doubles_ += result_.size();
  ++generation_;
  cv_.notify_all();
  return result_;
}

void DeviceGroup::fail() {
  std::lock_guard lock(mutex_);
  failed_ = true;
  cv_.notify_all();
}

void DeviceGroup::run(bool concurrent, const std::function<void(int)>& step) {
  if (!concurrent || count_ == 1) {
    for (int d = 0; d < count_; ++d) step(d);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<size_t>(count_));
  auto body = [&](int d) {
    try {
      step(d);
    } catch (...) {
      errors[static_cast<size_t>(d)] = std::current_exception();
      fail();
    }
  };
  std::vector<std::thread> threads;
  for (int d = 1; d < count_; ++d) threads.emplace_back(body, d);
  body(0);  // on the calling thread, which alone calls MPI outside an exchange
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

void combine_gradients(const std::vector<std::unique_ptr<Model>>& replicas, int total,
                       std::vector<float>& send, std::vector<float>& receive) {
  if (total == 1) return;
  const std::vector<Param*> params = replicas[0]->params();
  size_t per_device = 0;
  for (const Param* p : params) per_device += p->size();
  send.resize(per_device * replicas.size());
  // This process's devices' gradients, one after the other, each in params() order.
  for (size_t d = 0; d < replicas.size(); ++d) {
    float* out = send.data() + d * per_device;
    for (const Param* p : replicas[d]->params()) out = std::copy(p->grad.begin(), p->grad.end(), out);
  }
  const float* all = send.data();
  if (dist::size() > 1) {
    receive.resize(per_device * static_cast<size_t>(total));
    dist::allgather(send.data(), send.size() * sizeof(float), receive.data());
    all = receive.data();
  }
  const float scale = static_cast<float>(total);
  size_t at = 0;
  for (Param* p : params) {
    float* g = p->grad.data();
    const size_t n = p->size();
    std::copy_n(all + at, n, g);
    if (!p->grad_summed_over_devices)
      for (int d = 1; d < total; ++d) {
        const float* src = all + static_cast<size_t>(d) * per_device + at;
        for (size_t i = 0; i < n; ++i) g[i] += src[i];
      }
    for (size_t i = 0; i < n; ++i) g[i] /= scale;
    at += n;
  }
}

void broadcast_values(const std::vector<std::unique_ptr<Model>>& replicas) {
  if (replicas.size() < 2) return;
  const std::vector<Param*> from = replicas[0]->params();
  for (size_t d = 1; d < replicas.size(); ++d) {
    const std::vector<Param*> to = replicas[d]->params();
    for (size_t i = 0; i < from.size(); ++i) to[i]->value = from[i]->value;
  }
}

}  // namespace normkit::train
