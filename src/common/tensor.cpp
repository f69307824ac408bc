#include "normkit/tensor.h"

#include <sstream>

namespace normkit {

std::string shape_string(const TensorView& t) {
  std::ostringstream s;
  s << '(';
  for (int i = 0; i < t.rank && i < kMaxRank; ++i) s << (i ? ", " : "") << t.shape[i];
  if (t.rank > kMaxRank) s << ", ...";
  if (t.rank == 1) s << ',';
  s << ')';
  return s.str();
}

const char* to_string(DType dtype) {
  switch (dtype) {
    case DType::float32: return "float32";
    case DType::bfloat16: return "bfloat16";
    case DType::float16: return "float16";
  }
  return "unknown";
}

const char* to_string(MemoryFormat format) {
  return format == MemoryFormat::channels_last ? "channels_last" : "channels_first";
}

std::size_t element_size(DType dtype) { return dtype == DType::float32 ? 4 : 2; }

}  // namespace normkit
