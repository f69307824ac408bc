#include "bench_case.h"

#include <stdexcept>

namespace normkit::bench {

int64_t Case::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t Case::spatial_size() const {
  int64_t s = 1;
  for (std::size_t i = 2; i < shape.size(); ++i) s *= shape[i];
  return s;
}

double Case::traffic_bytes() const {
  const double b = static_cast<double>(bytes());
  const bool add = epilogue == Epilogue::add_relu;
  const double forward = add ? 3 : 2, backward = add ? 5 : 3;
  switch (op) {
    case Op::forward:
    case Op::forward_inference: return forward * b;
    case Op::backward: return backward * b;
    case Op::forward_backward: return (forward + backward) * b;
  }
  return b;
}

const char* family_name(Family f) {
  switch (f) {
    case Family::batch_norm: return "bn";
    case Family::group_norm: return "gn";
    case Family::layer_norm: return "ln";
    case Family::instance_norm: return "in";
    case Family::rms_norm: return "rms";
    case Family::batch_renorm: return "brn";
    case Family::layer_norm2d: return "ln2d";
    case Family::weight_std: return "ws";
    case Family::frn: return "frn";
    case Family::evonorm_s0: return "evo";
  }
  return "?";
}

const char* dtype_name(DType d) {
  switch (d) {
    case DType::float32: return "f32";
    case DType::bfloat16: return "bf16";
    case DType::float16: return "f16";
  }
  return "?";
}

std::string Case::op_name() const {
  std::string s = family_name(family);
  if (epilogue == Epilogue::add_relu) s += "+add+relu";
  if (epilogue == Epilogue::silu) s += "+silu";
  switch (op) {
    case Op::forward:
      s += family == Family::batch_norm || family == Family::batch_renorm ? ".fwd_train" : ".fwd";
      break;
    case Op::forward_inference: s += ".fwd_infer"; break;
    case Op::backward: s += ".bwd"; break;
    case Op::forward_backward: s += ".fwd+bwd"; break;
  }
  return s;
}

std::string Case::shape_name() const {
  std::string s;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += 'x';
    s += std::to_string(shape[i]);
  }
  if (family == Family::group_norm || family == Family::evonorm_s0)
    s += "/g" + std::to_string(groups);
  return s;
}

std::string Case::format_name() const {
  if (rows()) return "rows";
  static const char* first[] = {"", "", "nc", "ncw", "nchw", "ncdhw"};
  static const char* last[] = {"", "", "nc", "nwc", "nhwc", "ndhwc"};
  const std::size_t r = shape.size();
  if (r < 2 || r > 5) return "?";
  return format == MemoryFormat::channels_first ? first[r] : last[r];
}

std::string Case::label() const {
  return set + " " + op_name() + " " + shape_name() + " " + format_name() + " " +
         dtype_name(dtype);
}

namespace {

struct ShapeSet {
  const char* name;
  Family family;
  int64_t groups;                            // group norm: G
  std::vector<std::vector<int64_t>> shapes;  // (N, C, *spatial) or (rows, cols)
  std::vector<std::size_t> quick;            // indices kept by --quick
  Epilogue epilogue = Epilogue::none;
};

std::vector<std::vector<int64_t>> resnet50(int64_t n) {
  // (C, H = W) of every BatchNorm size class in ResNet-50.
  const int64_t cs[][2] = {{64, 112},  {64, 56},  {256, 56}, {128, 28}, {512, 28},
                           {256, 14},  {1024, 14}, {512, 7},  {2048, 7}};
  std::vector<std::vector<int64_t>> out;
  for (const auto& c : cs) out.push_back({n, c[0], c[1], c[1]});
  return out;
}

const std::vector<ShapeSet>& shape_sets() {
  static const std::vector<ShapeSet> sets = {
      {"resnet50-bn-n32", Family::batch_norm, 1, resnet50(32), {3, 8}},
      {"resnet50-bn-n2", Family::batch_norm, 1, resnet50(2), {0, 6}},
      {"sd-unet-gn", Family::group_norm, 32,
       {{1, 128, 256, 256}, {1, 256, 128, 128}, {1, 512, 64, 64}, {1, 512, 32, 32},
        {2, 320, 64, 64}, {2, 640, 32, 32}, {2, 1280, 16, 16}, {2, 1920, 32, 32},
        {2, 2560, 16, 16}},
       {2, 6}},
      {"unet3d-in", Family::instance_norm, 1,
       {{2, 32, 16, 112, 112}, {2, 256, 4, 14, 14}}, {1}},
      {"transformer-ln", Family::layer_norm, 1, {{4096, 768}, {8192, 1024}, {2048, 4096}}, {0}},
      // The RMSNorm of LLaMA-like decoders: (tokens, hidden) of a 7B (4096) and a 13B (5120)
      // model, a BERT-sized one, and an odd size for the loop tails.
      {"rms-norm", Family::rms_norm, 1, {{2048, 4096}, {512, 5120}, {4096, 768}, {1001, 3001}},
       {0}},
      // Batch Renorm (Ioffe 2017) on ResNet-50's BatchNorm shapes at N = 32; BatchNorm's own
      // cases on the same shapes run beside it as the anchor: it should cost what BN costs.
      {"batch-renorm", Family::batch_renorm, 1, resnet50(32), {3, 8}},
      // ConvNeXt's LayerNorm2d (over C): its four stages at batch 32 (ConvNeXt-T widths).
      {"layer-norm2d", Family::layer_norm2d, 1,
       {{32, 96, 56, 56}, {32, 192, 28, 28}, {32, 384, 14, 14}, {32, 768, 7, 7}}, {1}},
      // Weight Standardization of ResNet-50's distinct conv weights (C_out, C_in, kh, kw), as
      // bench/layer_norm2d_ws.py lists them.
      {"weight-std", Family::weight_std, 1,
       {{64, 3, 7, 7}, {64, 64, 1, 1}, {64, 64, 3, 3}, {256, 64, 1, 1}, {128, 256, 1, 1},
        {128, 128, 3, 3}, {512, 128, 1, 1}, {256, 512, 1, 1}, {256, 256, 3, 3},
        {1024, 256, 1, 1}, {512, 1024, 1, 1}, {512, 512, 3, 3}, {2048, 512, 1, 1},
        {512, 2048, 1, 1}, {2048, 1024, 1, 1}},
       {2, 11}},
      // FRN + TLU and EvoNorm-S0 (G = 32, the paper's) in place of ResNet-50's BatchNorms, as
      // both papers train them: every activation size class at batch 32.
      {"frn", Family::frn, 1, resnet50(32), {3, 8}},
      {"evonorm-s0", Family::evonorm_s0, 32, resnet50(32), {3, 8}},
      {"detection-gn", Family::group_norm, 32, {{2, 256, 200, 304}, {2, 256, 100, 152}}, {1}},
      // The end of a ResNet-50 bottleneck block, relu(norm(x) + identity), with BatchNorm at
      // N = 32 and 2 and with GroupNorm (G = 32, the paper's ResNet-50 GN) at N = 2.
      {"resnet50-bn-add-relu", Family::batch_norm, 1,
       {{32, 256, 56, 56}, {32, 1024, 14, 14}, {2, 256, 56, 56}, {2, 1024, 14, 14}}, {1, 2},
       Epilogue::add_relu},
      {"resnet50-gn-add-relu", Family::group_norm, 32, {{2, 256, 56, 56}, {2, 1024, 14, 14}}, {0},
       Epilogue::add_relu},
      // The GroupNorm + SiLU of every Stable Diffusion UNet (and VAE) block, on the shapes of
      // sd-unet-gn.
      {"sd-unet-gn-silu", Family::group_norm, 32,
       {{1, 128, 256, 256}, {1, 256, 128, 128}, {1, 512, 64, 64}, {1, 512, 32, 32},
        {2, 320, 64, 64}, {2, 640, 32, 32}, {2, 1280, 16, 16}, {2, 1920, 32, 32},
        {2, 2560, 16, 16}},
       {2, 6}, Epilogue::silu},
      // Tiny odd shapes: every code path once, in seconds; for the correctness smoke test.
      {"smoke", Family::group_norm, 0, {}, {}},
  };
  return sets;
}

void add_family_cases(std::vector<Case>& out, const std::string& set, Family family,
                      int64_t groups, const std::vector<int64_t>& shape, DType dtype,
                      Epilogue epilogue = Epilogue::none) {
  std::vector<Op> ops = {Op::forward, Op::backward, Op::forward_backward};
  if (family == Family::batch_norm) ops.insert(ops.begin() + 1, Op::forward_inference);
  std::vector<MemoryFormat> formats = {MemoryFormat::channels_first};
  // Layer and RMS norm rows and rank-2 tensors have one layout only.
  if (family != Family::layer_norm && family != Family::rms_norm && shape.size() > 2)
    formats.push_back(MemoryFormat::channels_last);
  for (MemoryFormat format : formats)
    for (Op op : ops) {
      Case c;
      c.set = set;
      c.family = family;
      c.op = op;
      c.shape = shape;
      c.groups = groups;
      c.format = format;
      c.dtype = dtype;
      c.epilogue = epilogue;
      out.push_back(c);
    }
}

void add_smoke_cases(std::vector<Case>& out, DType dtype) {
  add_family_cases(out, "smoke", Family::batch_norm, 1, {3, 5, 7, 9}, dtype);
  add_family_cases(out, "smoke", Family::batch_norm, 1, {4, 19}, dtype);
  add_family_cases(out, "smoke", Family::batch_renorm, 1, {3, 5, 7, 9}, dtype);
  add_family_cases(out, "smoke", Family::group_norm, 3, {2, 6, 11, 13}, dtype);
  add_family_cases(out, "smoke", Family::group_norm, 4, {3, 20, 3, 5, 7}, dtype);
  add_family_cases(out, "smoke", Family::group_norm, 2, {1, 6, 29}, dtype);
  add_family_cases(out, "smoke", Family::instance_norm, 1, {2, 7, 3, 9, 5}, dtype);
  add_family_cases(out, "smoke", Family::layer_norm, 1, {37, 123}, dtype);
  add_family_cases(out, "smoke", Family::rms_norm, 1, {37, 123}, dtype);
  add_family_cases(out, "smoke", Family::layer_norm2d, 1, {3, 21, 5, 7}, dtype);
  add_family_cases(out, "smoke", Family::weight_std, 1, {19, 7, 3, 3}, dtype);
  add_family_cases(out, "smoke", Family::frn, 1, {3, 11, 5, 7}, dtype);
  add_family_cases(out, "smoke", Family::evonorm_s0, 4, {2, 20, 3, 5}, dtype);
  add_family_cases(out, "smoke", Family::batch_norm, 1, {3, 10, 5, 7}, dtype, Epilogue::add_relu);
  add_family_cases(out, "smoke", Family::group_norm, 5, {2, 15, 3, 11}, dtype, Epilogue::add_relu);
  add_family_cases(out, "smoke", Family::group_norm, 5, {2, 15, 3, 11}, dtype, Epilogue::silu);
}

}  // namespace

std::vector<std::string> all_set_names() {
  std::vector<std::string> names;
  for (const auto& s : shape_sets()) names.push_back(s.name);
  return names;
}

std::vector<std::string> default_set_names() {
  std::vector<std::string> names;
  for (const auto& s : shape_sets())
    if (std::string(s.name) != "smoke") names.push_back(s.name);
  return names;
}

std::vector<Case> make_cases(const std::vector<std::string>& sets, const std::vector<DType>& dtypes,
                             bool quick) {
  std::vector<Case> out;
  for (const std::string& name : sets) {
    const ShapeSet* set = nullptr;
    for (const auto& s : shape_sets())
      if (name == s.name) set = &s;
    if (!set) throw std::invalid_argument("unknown shape set '" + name + "'");
    for (DType dtype : dtypes) {
      if (name == "smoke") {
        add_smoke_cases(out, dtype);
        continue;
      }
      for (std::size_t i = 0; i < set->shapes.size(); ++i) {
        bool keep = !quick;
        for (std::size_t q : set->quick) keep = keep || q == i;
        if (!keep) continue;
        if (set->family == Family::batch_renorm)
          add_family_cases(out, set->name, Family::batch_norm, 1, set->shapes[i], dtype,
                           set->epilogue);
        add_family_cases(out, set->name, set->family, set->groups, set->shapes[i], dtype,
                         set->epilogue);
      }
    }
  }
  return out;
}

}  // namespace normkit::bench
