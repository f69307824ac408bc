#pragma once
// The canonical merge tree of BatchNorm's steps (normkit/batch_norm_steps.h), shared by both
// backends: they differ only in how they compute the leaves (one sample's per-channel
// statistics or gradient sums); the tree, the packing and the merge are this plain code, so
// every node is the same bits wherever it is computed.
//
// Packed partials of a piece [offset, offset + n), C channels, spatial size S (doubles):
//   header: kind tag, C, S, offset, n, node count              (kHeaderDoubles)
//   per node, in sample order: node offset, node size, a[C], b[C]
// where a, b are (mean, M2) for statistics and (sum g, sum g * (x - mean)) for gradients.
// A statistics node of `size` samples holds size * S values per channel (its count is implied).
// The nodes are the maximal dyadic blocks [k * 2^j, (k + 1) * 2^j) inside the piece.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace normkit::detail {

enum class PartialsKind { statistics, gradients };

inline constexpr int64_t kHeaderDoubles = 6;

// Calls f(node_offset, node_size) for the maximal dyadic nodes of [offset, offset + count), in
// order.
template <class F>
void for_each_tree_node(int64_t offset, int64_t count, const F& f) {
  const int64_t end = offset + count;
  int64_t pos = offset;
  while (pos < end) {
    // The largest aligned block at pos (any size at 0), shrunk until it fits the range.
    int64_t size = pos == 0 ? int64_t(1) << 62 : pos & -pos;
    while (size > end - pos) size >>= 1;
    f(pos, size);
    pos += size;
  }
}

int64_t tree_node_count(int64_t offset, int64_t count);

// Doubles of a piece's packed partials; SIZE_MAX when size_t cannot count them.
std::size_t packed_partials_size(int64_t offset, int64_t count, int64_t channels);

// Reduces a piece's leaves over the tree, in place (leaf_a and leaf_b: count * C values each,
// sample-major: sample i's channel c at i * C + c), and writes the packed partials to `out`
// (packed_partials_size(offset, count, C) doubles).
void pack_partials(PartialsKind kind, int64_t channels, int64_t spatial, int64_t offset,
                   int64_t count, double* leaf_a, double* leaf_b, std::span<double> out);

// A concatenation of packed partials, parsed and checked against a global batch.
struct ParsedPartials {
  struct Node {
    int64_t offset, size;
    const double* a;
    const double* b;
  };
  int64_t channels = 0;  // 0 when there are no pieces at all
  int64_t spatial = 0;
  int64_t global_batch = 0;
  std::vector<Node> nodes;  // sorted by offset
};

// Throws normkit::Error (the message starting with `function`) on a buffer that does not parse
// as packed partials of `kind`, pieces with different channel counts or spatial sizes, and
// pieces that do not tile [0, global_batch) exactly.
ParsedPartials parse_partials(const char* function, PartialsKind kind, int64_t global_batch,
                              std::span<const double> partials);

// The root of the canonical tree over all parsed nodes: a[C], b[C] as in the packed nodes.
// Needs global_batch > 0 and spatial > 0.
void merge_partials(PartialsKind kind, const ParsedPartials& parsed, std::vector<double>& a,
                    std::vector<double>& b);

}  // namespace normkit::detail
