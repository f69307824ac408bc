#include "cpu/scratch.h"

#include <vector>

namespace normkit::cpu {

std::byte* scratch_base(std::span<std::byte> workspace, std::size_t workspace_bytes) {
  std::byte* base = workspace.data();
  if (base == nullptr || workspace.size() < workspace_bytes) {
    thread_local std::vector<std::byte> own;
    if (own.size() < workspace_bytes) own.resize(workspace_bytes);
    base = own.data();
  }
  const auto address = reinterpret_cast<std::uintptr_t>(base);
  return base + (kScratchAlign - address % kScratchAlign) % kScratchAlign;
}

}  // namespace normkit::cpu
