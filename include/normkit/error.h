#pragma once
// normkit::Error: every rejected argument throws this, before any caller memory is written.
#include <stdexcept>
#include <string>

namespace normkit {

class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& message) : std::invalid_argument(message) {}
};

}  // namespace normkit
