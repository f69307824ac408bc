#include "io/progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>

#include "normkit/error.h"

namespace normkit::train {
namespace {

std::string printf_string(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// Columns of the terminal on stderr, or 0 when unknown.
int terminal_columns() {
  winsize ws{};
  if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 0;
}

}  // namespace

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  const long long total = std::llround(seconds);
  const long long h = total / 3600, m = total % 3600 / 60, s = total % 60;
  char buf[48];
  if (h > 0) {
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", h, m, s);
  } else {
    std::snprintf(buf, sizeof buf, "%lld:%02lld", m, s);
  }
  return buf;
}

std::string format_rate(double v) {
  if (!std::isfinite(v) || v < 0) return "-";
  if (v >= 9999.5) return printf_string("%.1fk", v / 1000);
  if (v >= 99.95) return printf_string("%.0f", v);
  if (v >= 9.995) return printf_string("%.1f", v);
  if (v >= 0.9995) return printf_string("%.2f", v);
  return printf_string("%.3f", v);
}

std::string format_progress(const ProgressSnapshot& s, int bar_width) {
  std::string line;
  if (!s.label.empty()) line += s.label + " | ";
  line += "epoch " + std::to_string(s.epoch) + "/" + std::to_string(s.epochs);
  if (bar_width > 0) {
    const int64_t filled =
        s.steps > 0 ? std::clamp<int64_t>(s.step * bar_width / s.steps, 0, bar_width) : 0;
    std::string bar(static_cast<size_t>(bar_width), ' ');
    std::fill_n(bar.begin(), filled, '=');
    if (filled < bar_width && s.step > 0) bar[static_cast<size_t>(filled)] = '>';
    line += " [" + bar + "]";
  }
  const std::string total = std::to_string(s.steps);
  std::string done = std::to_string(s.step);
  if (done.size() < total.size()) done.insert(0, total.size() - done.size(), ' ');
  line += " " + done + "/" + total;
  if (s.step > 0) {
    line += " | loss " + printf_string("%.4f", s.loss);
    line += " | acc " + printf_string("%.2f", 100 * s.accuracy) + "%";
  } else {
    line += " | loss - | acc -";
  }
  line += " | " + format_rate(s.images_per_s) + " img/s";
  line += " | ETA " + format_duration(s.eta_seconds);
  return line;
}

ProgressBar::ProgressBar(ProgressOptions options)
    : options_(std::move(options)), mode_(options_.mode), out_(options_.out) {
  if (out_ == nullptr) out_ = &std::cerr;
  if (mode_ == ProgressMode::automatic) {
    const char* term = std::getenv("TERM");
    const bool tty = out_ == &std::cerr && ::isatty(STDERR_FILENO) &&
                     !(term != nullptr && std::strcmp(term, "dumb") == 0);
    mode_ = tty ? ProgressMode::interactive : ProgressMode::plain;
  }
}

double ProgressBar::now() const {
  if (options_.clock) return options_.clock();
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void ProgressBar::begin_epoch(int epoch, int epochs, int64_t steps, std::string label) {
  if (epoch < 1 || epochs < epoch || steps < 0) {
    throw Error("ProgressBar::begin_epoch: need 1 <= epoch <= epochs and steps >= 0, got epoch " +
                std::to_string(epoch) + ", epochs " + std::to_string(epochs) + ", steps " +
                std::to_string(steps));
  }
  label_ = std::move(label);
  epoch_ = epoch;
  epochs_ = epochs;
  steps_ = steps;
  step_ = images_ = correct_ = 0;
  loss_sum_ = 0;
  epoch_start_ = last_draw_ = now();
  bar_shown_ = false;
  if (mode_ == ProgressMode::interactive) draw(false);
}

void ProgressBar::add_step(int64_t images, double mean_loss, int64_t correct) {
  ++step_;
  images_ += images;
  correct_ += correct;
  loss_sum_ += mean_loss * static_cast<double>(images);
  if (mode_ == ProgressMode::interactive) {
    if (now() - last_draw_ >= options_.redraw_interval_s) draw(false);
  } else if (mode_ == ProgressMode::plain && step_ < steps_) {
    // The k-th line is due at k * plain_percent % of the epoch; the end_epoch line covers 100%.
    const int64_t share = steps_ * std::clamp(options_.plain_percent, 1, 100);
    const bool mark = step_ * 100 / share > (step_ - 1) * 100 / share;
    if (mark || now() - last_draw_ >= options_.plain_interval_s) draw(false);
  }
}

void ProgressBar::end_epoch() {
  if (mode_ != ProgressMode::silent) draw(true);
  bar_shown_ = false;
}

void ProgressBar::message(const std::string& line) {
  if (mode_ == ProgressMode::silent) return;
  if (mode_ == ProgressMode::interactive && bar_shown_) {
    *out_ << "\r\x1b[K" << line << "\n";
    draw(false);
  } else {
    *out_ << line << "\n";
  }
  out_->flush();
}

ProgressSnapshot ProgressBar::snapshot() const {
  ProgressSnapshot s;
  s.label = label_;
  s.epoch = epoch_;
  s.epochs = epochs_;
  s.step = step_;
  s.steps = steps_;
  if (images_ > 0) {
    s.loss = loss_sum_ / static_cast<double>(images_);
    s.accuracy = static_cast<double>(correct_) / static_cast<double>(images_);
  }
  const double elapsed = now() - epoch_start_;
  if (elapsed > 0) s.images_per_s = static_cast<double>(images_) / elapsed;
  if (step_ > 0) {
    const int64_t remaining = static_cast<int64_t>(epochs_) * steps_ -
                              (static_cast<int64_t>(epoch_ - 1) * steps_ + step_);
    s.eta_seconds = static_cast<double>(std::max<int64_t>(remaining, 0)) * elapsed /
                    static_cast<double>(step_);
  }
  return s;
}

void ProgressBar::draw(bool final_line) {
  if (mode_ == ProgressMode::silent) return;
  last_draw_ = now();
  const ProgressSnapshot s = snapshot();
  if (mode_ == ProgressMode::plain) {
    *out_ << format_progress(s, 0) << "\n";
    out_->flush();
    return;
  }
  // Interactive: the line must not wrap, or '\r' would redraw only its last row.
  const int columns = out_ == &std::cerr ? terminal_columns() : 0;
  int bar_width = 24;
  std::string line = format_progress(s, bar_width);
  if (columns > 0 && static_cast<int>(line.size()) >= columns) {
    const int without_bar = static_cast<int>(format_progress(s, 0).size());
    bar_width = std::clamp(columns - 1 - without_bar - 3, 0, 24);
    bar_width = bar_width < 5 ? 0 : bar_width;
    line = format_progress(s, bar_width);
    if (static_cast<int>(line.size()) >= columns) line.resize(static_cast<size_t>(columns - 1));
  }
  *out_ << "\r" << line << "\x1b[K";
  if (final_line) *out_ << "\n";
  out_->flush();
  bar_shown_ = !final_line;
}

double sweep_seconds_left(double elapsed_seconds, double images_done, double images_total) {
  if (images_done >= images_total) return 0;
  if (!(images_done > 0)) return std::numeric_limits<double>::quiet_NaN();
  return elapsed_seconds * (images_total - images_done) / images_done;
}

std::string sweep_finished_line(size_t k, size_t n, const std::string& label, double test_error,
                                double elapsed_seconds, double seconds_left) {
  char error[32];
  std::snprintf(error, sizeof error, "%.2f%%", test_error);
  std::string line = "[";
  line += std::to_string(k);
  line += '/';
  line += std::to_string(n);
  line += "] ";
  line += label;
  line += ": test error ";
  line += error;
  line += ", elapsed ";
  line += format_duration(elapsed_seconds);
  line += ", ";
  if (std::isnan(seconds_left)) {
    line += "time left unknown";
  } else {
    line += "about ";
    line += format_duration(seconds_left);
    line += " left";
  }
  return line;
}

}  // namespace normkit::train
