#pragma once
// IoError: a file that cannot be opened, read, written or parsed. The message names the file,
// says what is wrong with it and how to fix it. Bad arguments from the caller (an unknown
// split, a shape that does not match its bytes) throw normkit::Error instead.
#include <stdexcept>
#include <string>

namespace normkit::train {

class IoError : public std::runtime_error {
 public:
  explicit IoError(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace normkit::train
