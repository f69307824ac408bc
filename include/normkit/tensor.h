#pragma once
// TensorView: a non-owning view of an activation tensor (N, C, *spatial), 0-3 spatial dims,
// stored densely in one of two memory formats. Per-channel vectors (weight, bias, running
// statistics) and per-(n, group) statistics are plain std::span<float>; an empty span
// (data() == nullptr) means "absent".
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>

namespace normkit {

// Element type of activations (x, y, dy, dx, residual). Parameters, statistics and
// accumulation are always float32.
enum class DType { float32, bfloat16, float16 };

// channels_first: NC, NCL, NCHW, NCDHW, i.e. C-contiguous in logical order.
// channels_last:  NLC, NHWC, NDHWC, i.e. the channel index varies fastest.
// For rank 2 (N, C) both formats describe the same bytes.
enum class MemoryFormat { channels_first, channels_last };

inline constexpr int kMaxRank = 5;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::float32;
  int rank = 0;
  int64_t shape[kMaxRank] = {0, 0, 0, 0, 0};
  MemoryFormat format = MemoryFormat::channels_first;

  TensorView() = default;
  // Inputs are taken as const pointers and never written through; outputs as mutable ones.
  TensorView(const float* p, std::initializer_list<int64_t> dims,
             MemoryFormat fmt = MemoryFormat::channels_first)
      : TensorView(const_cast<float*>(p), DType::float32, dims, fmt) {}
  TensorView(const void* p, DType type, std::initializer_list<int64_t> dims,
             MemoryFormat fmt = MemoryFormat::channels_first)
      : data(const_cast<void*>(p)), dtype(type), format(fmt) {
    for (int64_t d : dims) {
      if (rank < kMaxRank) shape[rank] = d;
      ++rank;  // a rank above kMaxRank is kept so validation can report it
    }
  }
  TensorView(const void* p, DType type, int dims_count, const int64_t* dims,
             MemoryFormat fmt = MemoryFormat::channels_first)
      : data(const_cast<void*>(p)), dtype(type), rank(dims_count), format(fmt) {
    for (int i = 0; i < dims_count && i < kMaxRank; ++i) shape[i] = dims[i];
  }

  int64_t batch() const { return shape[0]; }
  int64_t channels() const { return rank > 1 ? shape[1] : 0; }
  // Product of the spatial dims (1 when there are none).
  int64_t spatial_size() const {
    int64_t s = 1;
    for (int i = 2; i < rank && i < kMaxRank; ++i) s *= shape[i];
    return s;
  }
  int64_t numel() const { return rank < 2 ? 0 : batch() * channels() * spatial_size(); }
  bool same_shape(const TensorView& o) const {
    if (rank != o.rank) return false;
    for (int i = 0; i < rank && i < kMaxRank; ++i)
      if (shape[i] != o.shape[i]) return false;
    return true;
  }
  template <typename T> T* as() const { return static_cast<T*>(data); }
};

// "(2, 3, 4, 5)" for messages.
std::string shape_string(const TensorView& t);
const char* to_string(DType dtype);
const char* to_string(MemoryFormat format);
std::size_t element_size(DType dtype);

}  // namespace normkit
