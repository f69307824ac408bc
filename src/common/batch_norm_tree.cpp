#include "common/batch_norm_tree.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "common/validate.h"

namespace normkit::detail {
namespace {

// What a piece's buffer holds; arbitrary values, far from the small integers around them, so
// that a misaligned or foreign buffer is rejected.
constexpr double kStatisticsTag = 1400136052;  // "Stat"
constexpr double kGradientsTag = 1198678372;   // "Grad"
// Every integer of a buffer is exact in a double.
constexpr int64_t kMaxExact = int64_t(1) << 53;

double tag_of(PartialsKind kind) {
  return kind == PartialsKind::statistics ? kStatisticsTag : kGradientsTag;
}

// Merges right into left, channel by channel: out = merge(left, right), out may be left.
// One out-of-line function for every merge of the tree (in a piece or across pieces), so that
// every node is computed by the same instructions.
[[gnu::noinline]] void merge_nodes(PartialsKind kind, int64_t C, double count_left,
                                   double count_right, const double* a_left,
                                   const double* b_left, const double* a_right,
                                   const double* b_right, double* a_out, double* b_out) {
  if (kind == PartialsKind::gradients) {
    for (int64_t c = 0; c < C; ++c) {
      a_out[c] = a_left[c] + a_right[c];
      b_out[c] = b_left[c] + b_right[c];
    }
    return;
  }
  // Chan, Golub & LeVeque on (count, mean, M2); never sum and sum of squares.
  const double n = count_left + count_right;
  if (n == 0) {  // samples without values (S == 0): nothing to merge
    std::copy(a_left, a_left + C, a_out);
    std::copy(b_left, b_left + C, b_out);
    return;
  }
  const double w_right = count_right / n;
  for (int64_t c = 0; c < C; ++c) {
    const double delta = a_right[c] - a_left[c];
    a_out[c] = a_left[c] + delta * w_right;
    b_out[c] = b_left[c] + b_right[c] + delta * delta * count_left * w_right;
  }
}

std::string range(int64_t begin, int64_t end) {
  std::string s = "[";  // appended, not "[" + ...: GCC 12 warns falsely on that
  s += std::to_string(begin);
  s += ", ";
  s += std::to_string(end);
  return s + ")";
}

// v as an integer in [lo, hi], or -1 when it is not one.
int64_t integer(double v, int64_t lo, int64_t hi) {
  if (!(v >= double(lo) && v <= double(hi)) || v != std::floor(v)) return -1;
  return int64_t(v);
}

}  // namespace

int64_t tree_node_count(int64_t offset, int64_t count) {
  int64_t nodes = 0;
  for_each_tree_node(offset, count, [&](int64_t, int64_t) { ++nodes; });
  return nodes;
}

std::size_t packed_partials_size(int64_t offset, int64_t count, int64_t channels) {
  using Wide = unsigned __int128;
  const Wide n = Wide(kHeaderDoubles) +
                 Wide(tree_node_count(offset, count)) * (Wide(2) + Wide(2) * Wide(channels));
  // Bytes must fit too: a buffer is allocated from this.
  return n > Wide(std::numeric_limits<std::size_t>::max() / sizeof(double)) ? SIZE_MAX
                                                                            : std::size_t(n);
}

void pack_partials(PartialsKind kind, int64_t C, int64_t S, int64_t offset, int64_t count,
                   double* leaf_a, double* leaf_b, std::span<double> out) {
  double* o = out.data();
  const int64_t nodes = tree_node_count(offset, count);
  const double header[kHeaderDoubles] = {tag_of(kind), double(C),     double(S),
                                         double(offset), double(count), double(nodes)};
  o = std::copy(header, header + kHeaderDoubles, o);
  for_each_tree_node(offset, count, [&](int64_t node, int64_t size) {
    const int64_t first = node - offset;
    // Bottom up: at each level, the left child's values become the parent's.
    for (int64_t half = 1; half < size; half *= 2) {
      const double child_count = double(half) * double(S);
      for (int64_t i = first; i < first + size; i += 2 * half) {
        double* a = leaf_a + i * C;
        double* b = leaf_b + i * C;
        merge_nodes(kind, C, child_count, child_count, a, b, a + half * C, b + half * C, a, b);
      }
    }
    *o++ = double(node);
    *o++ = double(size);
    o = std::copy(leaf_a + first * C, leaf_a + (first + 1) * C, o);
    o = std::copy(leaf_b + first * C, leaf_b + (first + 1) * C, o);
  });
}

ParsedPartials parse_partials(const char* fn, PartialsKind kind, int64_t global_batch,
                              std::span<const double> partials) {
  struct Piece {
    int64_t offset, count;
  };
  ParsedPartials out;
  out.global_batch = global_batch;
  std::vector<Piece> pieces;
  const double* p = partials.data();
  const std::size_t total = partials.size();
  std::size_t pos = 0;
  const char* expected = kind == PartialsKind::statistics
                             ? "statistics partials (from batch_norm_statistics_partials)"
                             : "gradient partials (from batch_norm_gradient_partials)";
  while (pos < total) {
    const std::string at = " at double " + std::to_string(pos) + " of " + std::to_string(total);
    if (total - pos < std::size_t(kHeaderDoubles))
      fail(fn, "partials end inside a piece's header" + at + ": truncated");
    const double tag = p[pos];
    if (tag != kStatisticsTag && tag != kGradientsTag)
      fail(fn, "partials hold no piece header" + at + " (expected " + expected +
                   ", concatenated whole)");
    if (tag != tag_of(kind))
      fail(fn, std::string("partials hold ") +
                   (tag == kStatisticsTag ? "statistics" : "gradient") + " partials" + at +
                   ", expected " + expected);
    const int64_t C = integer(p[pos + 1], 1, kMaxExact);
    const int64_t S = integer(p[pos + 2], 0, kMaxExact);
    const int64_t offset = integer(p[pos + 3], 0, kMaxExact);
    const int64_t count = integer(p[pos + 4], 0, kMaxExact - std::max<int64_t>(offset, 0));
    const int64_t nodes = integer(p[pos + 5], 0, 128);
    if (C < 0 || S < 0 || offset < 0 || count < 0 || nodes != tree_node_count(offset, count))
      fail(fn, "partials have a malformed piece header" + at);
    const std::size_t size = packed_partials_size(offset, count, C);
    if (size > total - pos)
      fail(fn, "partials end inside the piece " + range(offset, offset + count) + at +
                   ": it needs " + std::to_string(size) + " doubles, " +
                   std::to_string(total - pos) + " remain (truncated)");
    if (out.channels == 0) {
      out.channels = C;
      out.spatial = S;
    } else if (C != out.channels || S != out.spatial) {
      const Piece& first = pieces.front();
      fail(fn, std::string("pieces have different ") +
                   (C != out.channels ? "channel counts: C = " : "spatial sizes: S = ") +
                   std::to_string(C != out.channels ? out.channels : out.spatial) +
                   " in piece " + range(first.offset, first.offset + first.count) + ", " +
                   std::to_string(C != out.channels ? C : S) + " in piece " +
                   range(offset, offset + count));
    }
    std::size_t q = pos + kHeaderDoubles;
    bool ok = true;
    for_each_tree_node(offset, count, [&](int64_t node, int64_t node_size) {
      ok = ok && p[q] == double(node) && p[q + 1] == double(node_size);
      out.nodes.push_back({node, node_size, p + q + 2, p + q + 2 + C});
      q += 2 + 2 * std::size_t(C);
    });
    if (!ok) fail(fn, "partials have malformed tree nodes in piece " +
                          range(offset, offset + count) + at);
    pieces.push_back({offset, count});
    pos += size;
  }

  // The pieces must tile [0, global_batch): sorted by offset, each non-empty one starts where
  // the previous one ended.
  std::stable_sort(pieces.begin(), pieces.end(),
                   [](const Piece& l, const Piece& r) { return l.offset < r.offset; });
  const std::string batch = " of the global batch of " + std::to_string(global_batch) + " samples";
  int64_t covered = 0;
  Piece previous{0, 0};
  for (const Piece& piece : pieces) {
    if (piece.count == 0) {
      if (piece.offset > global_batch)
        fail(fn, "an empty piece at offset " + std::to_string(piece.offset) + " lies beyond" +
                     batch);
      continue;
    }
    if (piece.offset > covered)
      fail(fn, "samples " + range(covered, piece.offset) + batch + " are in no piece");
    if (piece.offset < covered)
      fail(fn, "pieces overlap: samples " +
                   range(piece.offset, std::min(covered, piece.offset + piece.count)) +
                   " are in pieces " + range(previous.offset, previous.offset + previous.count) +
                   " and " + range(piece.offset, piece.offset + piece.count));
    covered = piece.offset + piece.count;
    previous = piece;
    if (covered > global_batch)
      fail(fn, "piece " + range(piece.offset, covered) + " lies beyond the end" + batch);
  }
  if (covered < global_batch)
    fail(fn, "samples " + range(covered, global_batch) + batch + " are in no piece");
  std::sort(out.nodes.begin(), out.nodes.end(),
            [](const auto& l, const auto& r) { return l.offset < r.offset; });
  return out;
}

void merge_partials(PartialsKind kind, const ParsedPartials& parsed, std::vector<double>& a,
                    std::vector<double>& b) {
  const int64_t C = parsed.channels, N = parsed.global_batch;
  const double S = double(parsed.spatial);
  int64_t root = 1, depth = 0;
  while (root < N) root *= 2, ++depth;
  // Two result slots (a, b) per recursion level.
  std::vector<double> slots(std::size_t(2 * C) * 2 * std::size_t(depth + 1));
  const auto slot = [&](int64_t level, int side) {
    return slots.data() + (level * 2 + side) * 2 * C;
  };
  // Writes node [lo, lo + size)'s values to out (a then b) and returns its sample count (0:
  // absent). The same recursion a piece ran for the nodes inside it.
  const auto node = [&](const auto& self, int64_t lo, int64_t size, int64_t level,
                        double* out) -> int64_t {
    if (lo >= N) return 0;
    const auto it = std::lower_bound(parsed.nodes.begin(), parsed.nodes.end(), lo,
                                     [](const auto& n, int64_t v) { return n.offset < v; });
    if (it != parsed.nodes.end() && it->offset == lo && it->size == size) {
      std::copy(it->a, it->a + C, out);
      std::copy(it->b, it->b + C, out + C);
      return size;
    }
    // parse_partials checked that the pieces tile [0, N): a node not packed is split.
    const int64_t half = size / 2;
    double* left = slot(level + 1, 0);
    double* right = slot(level + 1, 1);
    const int64_t n_left = self(self, lo, half, level + 1, left);
    const int64_t n_right = self(self, lo + half, half, level + 1, right);
    if (n_right == 0) {  // merge(a, absent) = a, exactly
      std::copy(left, left + 2 * C, out);
      return n_left;
    }
    merge_nodes(kind, C, double(n_left) * S, double(n_right) * S, left, left + C, right,
                right + C, out, out + C);
    return n_left + n_right;
  };
  double* result = slot(0, 0);
  node(node, 0, root, 0, result);
  a.assign(result, result + C);
  b.assign(result + C, result + 2 * C);
}

}  // namespace normkit::detail
