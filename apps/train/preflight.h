#pragma once
// Checks normkit-train makes before it trains, so that a configuration that cannot finish fails
// at once, with the option to change, instead of after its work (an unwritable output), or in
// the kernel's OOM killer (a model too large for the machine).
#include <cstdint>
#include <string>

#include "trainer.h"

namespace normkit::train {

// Throws IoError naming `option` and `path` when a file cannot be written at `path`: its folder
// does not exist or is not a folder, or no file can be created in it (probed by creating a
// temporary file there and removing it), or `path` is itself a folder. Leaves nothing behind.
// An empty path is not checked.
void check_output_file(const std::string& option, const std::string& path);

// Throws IoError naming `option` and `path` when `path` is not a folder that files can be
// created in: it exists and is not a folder, or it exists and is not writable, or it does not
// exist and its nearest existing ancestor is not a writable folder (where it would be created).
// Creates nothing and leaves nothing behind.
void check_output_folder(const std::string& option, const std::string& path);

// Bytes this process may still allocate without swapping: MemAvailable of /proc/meminfo,
// lowered to the cgroup's memory.max - memory.current when that is smaller; without
// /proc/meminfo, sysconf's available pages. NORMKIT_TRAIN_AVAILABLE_MEMORY (bytes) in the
// environment replaces the measurement (to test the refusal, or to see the estimate).
uint64_t available_memory_bytes();

// The estimate for one run of `config` on images of rows x cols (nn/model.h's estimate_memory)
// plus the trainer's own buffers: the input batches and a checkpoint's copies of the state.
// rows = cols = 0: the parameters and the checkpoint copies alone.
MemoryEstimate estimate_run_memory(const TrainConfig& config, int64_t rows, int64_t cols,
                                   int64_t test_images);

// Throws normkit::Error when `runs_at_once` runs like `config` (each also holding
// `data_bytes_per_run` of its own data) need more than available_memory_bytes(). The message
// gives the estimate, what is available, and the options that would shrink the largest part.
void check_fits_in_memory(const TrainConfig& config, int64_t rows, int64_t cols,
                          int64_t test_images, int runs_at_once = 1, double data_bytes_per_run = 0);

// Throws normkit::Error when `config` cannot train on `data`: the batch is larger than the
// training images it may use (--batch, --limit-train).
void check_fits_data(const TrainConfig& config, const Data& data);

}  // namespace normkit::train
