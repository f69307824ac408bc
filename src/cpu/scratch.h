#pragma once
// The one scratch carver of the CPU kernels. An op lays out its parts once, from the shape alone
// (ScratchLayout: each part at a 64-byte boundary, the sizes counted in 128 bits so an absurd
// shape reports an overflow instead of wrapping); its *_workspace_size is that layout's
// workspace_bytes(), which has room to align a caller's workspace of any alignment; the kernel
// then takes its parts from scratch_base(): the caller's workspace, or a buffer of the calling
// thread when none (or too small a one) was given.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

namespace normkit::cpu {

inline constexpr std::size_t kScratchAlign = 64;

class ScratchLayout {
 public:
  // Reserves a * b * c values of U (the product taken in 128 bits) after the parts added so
  // far; returns the part's offset.
  template <typename U>
  std::size_t add(int64_t a, int64_t b = 1, int64_t c = 1) {
    const Wide start = at_;
    const Wide count = a > 0 && b > 0 && c > 0 ? Wide(a) * Wide(b) * Wide(c) : 0;
    at_ += (count * sizeof(U) + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
    end_ = std::max(end_, at_);
    return start > kMaxBytes ? 0 : std::size_t(start);
  }
  // Where the next part goes; rewind(mark) lays out an alternative (a forward's parts and a
  // backward's) over the same memory: the layout covers the longest of them.
  std::size_t mark() const { return std::size_t(std::min(at_, kMaxBytes)); }
  void rewind(std::size_t mark) { at_ = mark; }

  bool overflows() const { return end_ + kScratchAlign - 1 > kMaxBytes; }
  // Bytes a caller's workspace must hold: every part, plus room to align its base. 0 for an
  // empty layout; SIZE_MAX when size_t cannot count them.
  std::size_t workspace_bytes() const {
    if (end_ == 0) return 0;
    return overflows() ? std::numeric_limits<std::size_t>::max()
                       : std::size_t(end_ + kScratchAlign - 1);
  }

 private:
  using Wide = unsigned __int128;
  // Half of size_t's range: a part's offset plus a pointer never wraps.
  static constexpr Wide kMaxBytes = Wide(std::numeric_limits<std::size_t>::max() / 2);
  Wide at_ = 0, end_ = 0;
};

// The kScratchAlign-aligned base of a call's scratch of `workspace_bytes` bytes (a layout's
// workspace_bytes()): inside the caller's workspace when it holds that many, else in a buffer
// of the calling thread, allocated on first use and grown as needed, never shrunk.
std::byte* scratch_base(std::span<std::byte> workspace, std::size_t workspace_bytes);

template <typename U>
U* scratch_part(std::byte* base, std::size_t offset) {
  return reinterpret_cast<U*>(base + offset);
}

}  // namespace normkit::cpu
