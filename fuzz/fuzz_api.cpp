// The public forward functions and workspace-size queries with arguments drawn from the input:
// ranks, dims (small, zero, negative, near 2^63), formats, dtypes, groups, eps, momentum,
// vectors of the right or a wrong length, null pointers, workspaces too small or misaligned.
// Every tensor that has data has a real buffer of exactly its size; a shape too large for one
// gets a null pointer, which the checks must reject. Each call must either succeed or throw
// normkit::Error, and these contracts of the headers must hold:
//  - a throw leaves every buffer as it was ("before writing anything");
//  - inputs are never written;
//  - a workspace query that throws means the forward throws too (its checks are a subset);
//  - a workspace smaller than the query's answer is refused by the CPU backend.
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <span>
#include <vector>

#include "normkit/normkit.h"

namespace {

using namespace normkit;

constexpr int64_t kMaxBufferBytes = int64_t{1} << 16;  // beyond this a tensor gets no data
constexpr std::size_t kMaxWorkspaceBytes = std::size_t{1} << 24;

// A buffer the op may see; `output` ones may change on success, none may on a throw.
struct Buffer {
  std::vector<std::byte> bytes;
  std::vector<std::byte> before;
  bool output = false;
};

class Arena {
 public:
  explicit Arena(FuzzedDataProvider& in) : in_(in) {}

  // Holds `size` bytes filled from the input (cycled), or nullptr when size is 0.
  std::byte* allocate(std::size_t size, bool output) {
    if (size == 0) return nullptr;
    Buffer& b = buffers_.emplace_back();
    b.output = output;
    b.bytes.resize(size);
    std::vector<uint8_t> pattern = in_.ConsumeBytes<uint8_t>(in_.ConsumeIntegralInRange(0, 32));
    for (std::size_t i = 0; i < size; ++i) {
      b.bytes[i] = std::byte{pattern.empty() ? uint8_t(0x7f) : pattern[i % pattern.size()]};
    }
    return b.bytes.data();
  }
  void snapshot() {
    for (Buffer& b : buffers_) b.before = b.bytes;
  }
  // After a throw nothing may have changed; after success only outputs.
  void check(bool threw) const {
    for (const Buffer& b : buffers_) {
      if ((threw || !b.output) && b.bytes != b.before) std::abort();
    }
  }

 private:
  FuzzedDataProvider& in_;
  std::deque<Buffer> buffers_;  // a deque: growing it keeps earlier buffers where they are
};

int64_t pick_dim(FuzzedDataProvider& in) {
  static constexpr int64_t kSpecial[] = {
      -1, 0, 1, int64_t{1} << 20, int64_t{1} << 31, int64_t{1} << 32, int64_t{3} << 40,
      int64_t{1} << 62, std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min()};
  const uint8_t v = in.ConsumeIntegral<uint8_t>();
  if (v < 224) return v % 9;
  return kSpecial[v % std::size(kSpecial)];
}

double pick_real(FuzzedDataProvider& in, double usual) {
  static constexpr double kSpecial[] = {
      0.0, -0.0, 1e-5, -1e-5, 1.0, 1.5, -1.0, 1e300, 5e-324, 0.5,
      std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
      std::numeric_limits<double>::quiet_NaN()};
  const uint8_t v = in.ConsumeIntegral<uint8_t>();
  if (v < 128) return usual;
  if (v < 240) return kSpecial[v % std::size(kSpecial)];
  return in.ConsumeFloatingPoint<double>();
}

// Product of dims (0 when one is 0), or -1 when it overflows or a dim is negative.
int64_t count_of(const int64_t* dims, int rank) {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) {
    if (dims[i] < 0) return -1;
    if (dims[i] == 0) return 0;
  }
  for (int i = 0; i < rank; ++i) {
    if (__builtin_mul_overflow(n, dims[i], &n)) return -1;
  }
  return n;
}

// Data for a tensor of these dims: a real buffer when it fits, else null (or, sometimes, null
// even when it would fit).
void* data_for(Arena& arena, FuzzedDataProvider& in, const TensorView& t, bool output) {
  const int rank = t.rank < 0 ? 0 : (t.rank > kMaxRank ? kMaxRank : t.rank);
  const int64_t n = count_of(t.shape, rank);
  const int64_t elem = t.dtype == DType::float32 ? 4 : 2;
  const uint8_t mode = in.ConsumeIntegral<uint8_t>();
  if (mode < 8) return nullptr;
  if (n < 0 || n > kMaxBufferBytes / elem) return nullptr;
  // An empty tensor still gets a pointer, sometimes: the library must not touch it.
  return arena.allocate(static_cast<std::size_t>(n == 0 ? (mode & 1) * 8 : n * elem), output);
}

TensorView make_x(Arena& arena, FuzzedDataProvider& in) {
  TensorView x;
  x.rank = in.ConsumeIntegralInRange(-1, kMaxRank + 2);
  for (int i = 0; i < kMaxRank; ++i) x.shape[i] = i < x.rank ? pick_dim(in) : 0;
  x.format = in.ConsumeBool() ? MemoryFormat::channels_last : MemoryFormat::channels_first;
  const uint8_t d = in.ConsumeIntegral<uint8_t>();
  x.dtype = d < 250 ? static_cast<DType>(d % 3) : static_cast<DType>(d % 5);
  x.data = data_for(arena, in, x, false);
  return x;
}

// A tensor meant to look like x (y, residual), sometimes unlike it in one respect.
TensorView make_like(Arena& arena, FuzzedDataProvider& in, const TensorView& x, bool output,
                     bool optional) {
  const uint8_t mode = in.ConsumeIntegral<uint8_t>();
  if (optional && mode < 128) return {};
  TensorView t = x;
  switch (mode % 16) {
    case 0: t.format = t.format == MemoryFormat::channels_last ? MemoryFormat::channels_first
                                                               : MemoryFormat::channels_last;
      break;
    case 1: t.dtype = t.dtype == DType::float32 ? DType::bfloat16 : DType::float32; break;
    case 2:
      if (t.rank > 0 && t.rank <= kMaxRank &&
          t.shape[t.rank - 1] < std::numeric_limits<int64_t>::max()) {
        t.shape[t.rank - 1] += 1;
      }
      break;
    case 3: t.rank += 1; break;
    default: break;
  }
  t.data = data_for(arena, in, t, output);
  return t;
}

// A float vector whose right length is `expected` (-1: none can be right): absent, right,
// one off, or empty but present.
std::span<float> make_vector(Arena& arena, FuzzedDataProvider& in, int64_t expected, bool output) {
  const uint8_t mode = in.ConsumeIntegral<uint8_t>();
  if (expected < 0) expected = -1;  // a negative dim: no length is right
  int64_t length = expected;
  if (mode < 32) return {};
  if (mode < 40) length = expected < std::numeric_limits<int64_t>::max() ? expected + 1 : -1;
  else if (mode < 48) length = expected - 1;
  else if (mode < 52) length = 0;
  if (length < 0 || length > kMaxBufferBytes / 4) return {};
  if (length == 0) {
    static float empty_target;
    return {&empty_target, 0};
  }
  auto* p = reinterpret_cast<float*>(arena.allocate(static_cast<std::size_t>(length) * 4, output));
  return {p, static_cast<std::size_t>(length)};
}

int64_t dim(const TensorView& x, int i) {
  return i < x.rank && i < kMaxRank && x.rank <= kMaxRank ? x.shape[i] : 0;
}

int64_t product(int64_t a, int64_t b) {
  int64_t r;
  return a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r) ? -1 : r;
}

// The caller's workspace, given the query's answer (or none when the query threw).
struct Workspace {
  std::vector<std::byte> storage;
  std::span<std::byte> span;
  bool too_small = false;
};

void make_workspace(FuzzedDataProvider& in, bool query_ok, std::size_t need, Workspace& ws) {
  const uint8_t mode = in.ConsumeIntegralInRange<uint8_t>(0, 3);
  if (mode == 0 || !query_ok || need > kMaxWorkspaceBytes) return;
  const std::size_t offset = mode == 3 ? 1 + in.ConsumeIntegralInRange<std::size_t>(0, 62) : 0;
  std::size_t size = need;
  if (mode == 2) {
    if (need == 0) return;
    size = need - 1 - in.ConsumeIntegralInRange<std::size_t>(0, need - 1);
    ws.too_small = true;
  }
  ws.storage.resize(size + offset + 1);
  ws.span = std::span<std::byte>(ws.storage.data() + offset, size);
}

template <class Query, class Forward>
void run(Arena& arena, FuzzedDataProvider& in, Context& ctx, Query query, Forward forward) {
  bool query_ok = true;
  std::size_t need = 0;
  try {
    need = query();
  } catch (const Error&) {
    query_ok = false;
  }
  Workspace ws;
  make_workspace(in, query_ok, need, ws);
  ctx.workspace = ws.span;
  arena.snapshot();
  bool threw = false;
  try {
    forward();
  } catch (const Error&) {
    threw = true;
  }
  arena.check(threw);
  if (!threw && !query_ok) std::abort();  // the forward accepted what the query refused
  if (!threw && ws.too_small && ctx.backend == Backend::cpu && ws.span.data() != nullptr) {
    std::abort();  // a workspace smaller than the query's answer was accepted
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  set_num_threads(2);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  Arena arena(in);
  const int op = in.ConsumeIntegralInRange(0, 4);
  Context ctx;
  ctx.backend = in.ConsumeIntegralInRange(0, 3) == 0 ? Backend::reference : Backend::cpu;
  ctx.num_threads = in.ConsumeIntegralInRange(-1, 3);
  // 3 is no Activation: the api must refuse it.
  const auto activation = static_cast<Activation>(in.ConsumeIntegralInRange(0, 3));

  const TensorView x = make_x(arena, in);
  const TensorView y = make_like(arena, in, x, true, false);
  const TensorView residual = make_like(arena, in, x, false, true);
  const ForwardEpilogue epilogue{activation, residual};
  const int64_t n = dim(x, 0), c = dim(x, 1);

  switch (op) {
    case 0: {
      GroupNormParams p;
      const uint8_t g = in.ConsumeIntegral<uint8_t>();
      static constexpr int64_t kGroups[] = {0, -1, std::numeric_limits<int64_t>::max(),
                                            std::numeric_limits<int64_t>::min(), int64_t{1} << 32};
      p.num_groups = g < 200 ? 1 + g % 8 : (g < 228 ? c : kGroups[g % std::size(kGroups)]);
      p.eps = pick_real(in, 1e-5);
      p.epilogue = epilogue;
      const auto weight = make_vector(arena, in, c, false);
      const auto bias = make_vector(arena, in, c, false);
      const int64_t stats = product(n, p.num_groups > 0 ? p.num_groups : 1);
      const auto mean = make_vector(arena, in, stats, true);
      const auto rstd = make_vector(arena, in, stats, true);
      run(arena, in, ctx, [&] { return group_norm_workspace_size(p, x); },
          [&] { group_norm_forward(p, x, weight, bias, y, mean, rstd, ctx); });
      break;
    }
    case 1:
    case 2: {
      BatchNormParams p;
      p.eps = pick_real(in, 1e-5);
      p.momentum = pick_real(in, 0.1);
      p.epilogue = epilogue;
      const auto weight = make_vector(arena, in, c, false);
      const auto bias = make_vector(arena, in, c, false);
      const auto running_mean = make_vector(arena, in, c, op == 1);
      const auto running_var = make_vector(arena, in, c, op == 1);
      if (op == 1) {
        const auto save_mean = make_vector(arena, in, c, true);
        const auto save_invstd = make_vector(arena, in, c, true);
        run(arena, in, ctx, [&] { return batch_norm_workspace_size(x); }, [&] {
          batch_norm_forward_training(p, x, weight, bias, y, save_mean, save_invstd, running_mean,
                                      running_var, ctx);
        });
      } else {
        run(arena, in, ctx, [&] { return batch_norm_workspace_size(x); }, [&] {
          batch_norm_forward_inference(p, x, weight, bias, running_mean, running_var, y, ctx);
        });
      }
      break;
    }
    case 3: {
      LayerNormParams p;
      p.normalized_ndim = in.ConsumeIntegralInRange(-1, kMaxRank + 1);
      p.eps = pick_real(in, 1e-5);
      p.epilogue = epilogue;
      int64_t rows = 1, cols = 1;
      const int rank = x.rank < 0 ? 0 : (x.rank > kMaxRank ? kMaxRank : x.rank);
      const int split = p.normalized_ndim >= 1 && p.normalized_ndim <= rank
                            ? rank - p.normalized_ndim : (rank > 0 ? rank - 1 : 0);
      for (int i = 0; i < rank; ++i) {
        (i < split ? rows : cols) = product(i < split ? rows : cols, x.shape[i]);
      }
      const auto weight = make_vector(arena, in, cols, false);
      const auto bias = make_vector(arena, in, cols, false);
      const auto mean = make_vector(arena, in, rows, true);
      const auto rstd = make_vector(arena, in, rows, true);
      run(arena, in, ctx, [&] { return layer_norm_workspace_size(p, x); },
          [&] { layer_norm_forward(p, x, weight, bias, y, mean, rstd, ctx); });
      break;
    }
    default: {
      InstanceNormParams p;
      p.use_input_stats = in.ConsumeIntegralInRange(0, 3) != 0;
      p.eps = pick_real(in, 1e-5);
      p.momentum = pick_real(in, 0.1);
      p.epilogue = epilogue;
      const auto weight = make_vector(arena, in, c, false);
      const auto bias = make_vector(arena, in, c, false);
      const auto running_mean = make_vector(arena, in, c, p.use_input_stats);
      const auto running_var = make_vector(arena, in, c, p.use_input_stats);
      const auto mean = make_vector(arena, in, product(n, c), true);
      const auto rstd = make_vector(arena, in, product(n, c), true);
      run(arena, in, ctx, [&] { return instance_norm_workspace_size(p, x); }, [&] {
        instance_norm_forward(p, x, weight, bias, running_mean, running_var, y, mean, rstd, ctx);
      });
      break;
    }
  }
  return 0;
}
