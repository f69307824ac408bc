#pragma once
// What the op tests (BatchNorm, GroupNorm, LayerNorm, InstanceNorm and the layers) share: the
// backends' contexts, optional arguments from vectors, and the check that a call is rejected
// with a normkit::Error naming what is wrong.
#include <gtest/gtest.h>

#include <functional>
#include <span>
#include <string>
#include <vector>

#include "normkit/error.h"
#include "normkit/context.h"

namespace normkit::test {

inline constexpr double kFloatEps = 5.96e-8;  // 2^-24

inline Context reference_ctx() { return {Backend::reference, 1}; }
inline Context cpu_ctx(int threads = 0) { return {Backend::cpu, threads}; }

// An optional argument: absent (an empty span) when v is empty or not `present`.
inline std::span<const float> opt(const std::vector<float>& v, bool present = true) {
  return present && !v.empty() ? std::span<const float>(v) : std::span<const float>();
}
inline std::span<float> opt(std::vector<float>& v, bool present = true) {
  return present && !v.empty() ? std::span<float>(v) : std::span<float>();
}

// call() must throw normkit::Error whose message contains every needle.
inline void expect_error(const std::function<void()>& call,
                         const std::vector<std::string>& needles) {
  try {
    call();
    ADD_FAILURE() << "expected normkit::Error containing \"" << needles.front() << "\"";
  } catch (const Error& e) {
    const std::string what = e.what();
    for (const auto& needle : needles)
      EXPECT_NE(what.find(needle), std::string::npos) << "message: " << what
                                                      << "\nexpected: " << needle;
  }
}

// The argument checks as edits of one valid call: Args holds the arguments with every output
// poison-filled, run() makes the call and untouched() says nothing was written. edit() breaks
// one argument; the call must then throw an Error with every needle and write nothing.
template <typename Args>
void expect_edit_error(const std::function<void(Args&)>& edit,
                       const std::vector<std::string>& needles) {
  Args a;
  edit(a);
  expect_error([&] { a.run(); }, needles);
  EXPECT_TRUE(a.untouched()) << "memory written before the throw: " << needles.front();
}

}  // namespace normkit::test
