#pragma once
// Whole-file text input and output shared by the report writers and the sweep.
#include <string>

namespace normkit::train {

// Replaces the file at `path` with `text`: written to a temporary beside it, then renamed, so a
// reader never sees half a file. Throws IoError naming the path (and the fix) when the
// directory is missing or not writable or the write fails; the temporary is removed.
void write_text_file(const std::string& path, const std::string& text);

// The whole file at `path`. Throws IoError naming the path when it cannot be opened or read.
std::string read_text_file(const std::string& path);

}  // namespace normkit::train
