// Built without NORMKIT_BENCH_ANCHORS: no PyTorch or oneDNN candidates.
#include "candidate.h"

namespace normkit::bench {

std::unique_ptr<Candidate> make_torch_candidate() { return nullptr; }
std::unique_ptr<Candidate> make_onednn_candidate() { return nullptr; }
bool onednn_has_own_thread_pool() { return false; }
std::string torch_version() { return ""; }
std::string onednn_version() { return ""; }

}  // namespace normkit::bench
