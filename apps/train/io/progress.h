#pragma once
// A live training progress line:
//
//   bn b=2 | epoch 2/3 [=========>          ]  4123/10000 | loss 0.4213 | acc 84.21% | 667 img/s | ETA 0:14:31
//
// On a terminal it is redrawn in place ('\r', at most ~10 times a second). When stderr is not a
// terminal (CI logs, files) a plain line is printed every 10% of an epoch or every 30 seconds,
// whichever comes first, so logs stay short and readable.
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <string>

namespace normkit::train {

// What the line shows; everything a formatter needs, so formatting is a pure function.
struct ProgressSnapshot {
  std::string label;          // e.g. "bn b=2"; omitted when empty
  int epoch = 0;              // 1-based
  int epochs = 0;
  int64_t step = 0;           // steps finished in this epoch
  int64_t steps = 0;          // steps per epoch
  double loss = 0;            // mean loss over the images of this epoch so far
  double accuracy = 0;        // fraction 0..1 correct over the images of this epoch so far
  double images_per_s = 0;    // this epoch so far
  double eta_seconds = -1;    // to the end of the run; negative while unknown
};

// "m:ss" below an hour, "h:mm:ss" from an hour on ("0:07", "12:05", "1:02:03", "27:46:40");
// rounds to the nearest second; "--:--" for negative or non-finite input.
std::string format_duration(double seconds);

// Images per second with three significant digits: "0.512", "66.7", "667", "2270", "12.3k";
// "-" for negative or non-finite input.
std::string format_rate(double per_second);

// The progress line for `s` (no '\r' or newline). `bar_width` characters of bar between the
// brackets; 0 leaves the bar out. Loss shows 4 decimals, accuracy 2 (as a percentage).
std::string format_progress(const ProgressSnapshot& s, int bar_width = 20);

enum class ProgressMode {
  automatic,    // interactive when writing to std::cerr and stderr is a terminal (TERM != dumb)
  interactive,  // redraw in place
  plain,        // separate lines at intervals
  silent,       // print nothing (messages included)
};

struct ProgressOptions {
  ProgressMode mode = ProgressMode::automatic;
  std::ostream* out = nullptr;        // nullptr: std::cerr
  double redraw_interval_s = 0.1;     // interactive: least time between redraws
  int plain_percent = 10;             // plain: a line each time this share of the epoch passes
  double plain_interval_s = 30;       // plain: and at least this often
  std::function<double()> clock;      // seconds on a monotonic clock; empty: std::chrono::steady_clock
};

// Tracks one run: call begin_epoch, then add_step after every optimizer step, then end_epoch.
// Not thread-safe; call from the training loop's thread.
class ProgressBar {
 public:
  explicit ProgressBar(ProgressOptions options = {});

  // Starts epoch `epoch` (1-based) of `epochs`, `steps` steps long; resets the running means.
  void begin_epoch(int epoch, int epochs, int64_t steps, std::string label = {});
  // Adds one step of `images` images whose mean loss was `mean_loss` and of which `correct`
  // were classified correctly; redraws or prints when due.
  void add_step(int64_t images, double mean_loss, int64_t correct);
  // Shows the epoch's final line and ends it with a newline.
  void end_epoch();
  // Prints `line` on its own line without tearing the bar (which is redrawn below it).
  void message(const std::string& line);

  ProgressSnapshot snapshot() const;
  bool interactive() const { return mode_ == ProgressMode::interactive; }

 private:
  double now() const;
  void draw(bool final_line);

  ProgressOptions options_;
  ProgressMode mode_;
  std::ostream* out_;
  std::string label_;
  int epoch_ = 0, epochs_ = 0;
  int64_t step_ = 0, steps_ = 0, images_ = 0, correct_ = 0;
  double loss_sum_ = 0;
  double epoch_start_ = 0, last_draw_ = -1e300;
  bool bar_shown_ = false;
};

// ---- a sweep's progress (sweep.h) ---------------------------------------------------------
// The time a sweep has left, from the work done so far: elapsed * (total - done) / done, work
// counted in training images (runs differ in size: epochs, and the images their steps use).
// NaN when nothing is done yet (no rate to go by); 0 when done >= total. Pure.
double sweep_seconds_left(double elapsed_seconds, double images_done, double images_total);

// The line a sweep writes when its k-th of n runs finished and stderr is not a terminal:
// "[k/n] label: test error 12.34%, elapsed 1:05, about 2:10 left" ("time left unknown" for
// a NaN estimate). Pure.
std::string sweep_finished_line(size_t k, size_t n, const std::string& label, double test_error,
                                double elapsed_seconds, double seconds_left);

}  // namespace normkit::train
