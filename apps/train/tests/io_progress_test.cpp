// Progress line: the pure formatters, and the bar driven by a fake clock in each output mode.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "io/progress.h"
#include "normkit/error.h"

using namespace normkit::train;

namespace {

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

TEST(Progress, FormatsDurations) {
  EXPECT_EQ(format_duration(0), "0:00");
  EXPECT_EQ(format_duration(7.4), "0:07");
  EXPECT_EQ(format_duration(59.5), "1:00");
  EXPECT_EQ(format_duration(725), "12:05");
  EXPECT_EQ(format_duration(3599.4), "59:59");
  EXPECT_EQ(format_duration(3599.6), "1:00:00");
  EXPECT_EQ(format_duration(3723), "1:02:03");
  EXPECT_EQ(format_duration(100000), "27:46:40");
  EXPECT_EQ(format_duration(-1), "--:--");
  EXPECT_EQ(format_duration(std::nan("")), "--:--");
  EXPECT_EQ(format_duration(std::numeric_limits<double>::infinity()), "--:--");
}

TEST(Progress, FormatsRatesWithThreeSignificantDigits) {
  EXPECT_EQ(format_rate(0.512), "0.512");
  EXPECT_EQ(format_rate(5.126), "5.13");
  EXPECT_EQ(format_rate(66.71), "66.7");
  EXPECT_EQ(format_rate(667.2), "667");
  EXPECT_EQ(format_rate(2270.4), "2270");
  EXPECT_EQ(format_rate(12345), "12.3k");
  EXPECT_EQ(format_rate(9.999), "10.0");
  EXPECT_EQ(format_rate(0), "0.000");
  EXPECT_EQ(format_rate(-3), "-");
  EXPECT_EQ(format_rate(std::nan("")), "-");
}

TEST(Progress, FormatsTheLine) {
  ProgressSnapshot s;
  s.label = "bn b=2";
  s.epoch = 2;
  s.epochs = 3;
  s.step = 5;
  s.steps = 20;
  s.loss = 0.42134;
  s.accuracy = 0.84214;
  s.images_per_s = 667.2;
  s.eta_seconds = 871;
  EXPECT_EQ(format_progress(s, 20),
            "bn b=2 | epoch 2/3 [=====>              ]  5/20 | loss 0.4213 | acc 84.21% | "
            "667 img/s | ETA 14:31");
  EXPECT_EQ(format_progress(s, 0),
            "bn b=2 | epoch 2/3  5/20 | loss 0.4213 | acc 84.21% | 667 img/s | ETA 14:31");
  s.step = 20;
  s.label.clear();
  EXPECT_EQ(format_progress(s, 4).substr(0, 25), "epoch 2/3 [====] 20/20 | ");
  s.step = 0;
  s.eta_seconds = -1;
  EXPECT_EQ(format_progress(s, 4),
            "epoch 2/3 [    ]  0/20 | loss - | acc - | 667 img/s | ETA --:--");
}

// A clock the test moves by hand.
struct FakeClock {
  double t = 1000;
  std::function<double()> fn() {
    return [this] { return t; };
  }
};

TEST(Progress, RunningMeansRateAndEtaAcrossEpochs) {
  FakeClock clock;
  std::ostringstream out;
  ProgressBar bar({.mode = ProgressMode::silent, .out = &out, .clock = clock.fn()});
  bar.begin_epoch(2, 3, 10, "gn");
  double loss_sum = 0;
  int64_t images = 0, correct = 0;
  for (int i = 0; i < 5; ++i) {
    const int64_t n = i == 4 ? 3 : 8;  // a short last batch weighs less
    const double loss = 2.0 - 0.3 * i;
    clock.t += 0.5;
    bar.add_step(n, loss, i + 1);
    loss_sum += loss * static_cast<double>(n);
    images += n;
    correct += i + 1;
  }
  const ProgressSnapshot s = bar.snapshot();
  EXPECT_EQ(s.label, "gn");
  EXPECT_EQ(s.step, 5);
  EXPECT_DOUBLE_EQ(s.loss, loss_sum / static_cast<double>(images));
  EXPECT_DOUBLE_EQ(s.accuracy, static_cast<double>(correct) / static_cast<double>(images));
  EXPECT_DOUBLE_EQ(s.images_per_s, static_cast<double>(images) / 2.5);
  // 5 steps left in epoch 2 and 10 in epoch 3, at 0.5 s each.
  EXPECT_DOUBLE_EQ(s.eta_seconds, 7.5);
  bar.end_epoch();
  EXPECT_TRUE(out.str().empty()) << "silent mode printed: " << out.str();
  EXPECT_THROW(bar.begin_epoch(4, 3, 10), normkit::Error);
  EXPECT_THROW(bar.begin_epoch(0, 3, 10), normkit::Error);
  EXPECT_THROW(bar.begin_epoch(1, 3, -1), normkit::Error);
}

TEST(Progress, PlainModePrintsEveryTenPercentAndAtTheEnd) {
  FakeClock clock;
  std::ostringstream out;
  ProgressBar bar({.mode = ProgressMode::plain, .out = &out, .clock = clock.fn()});
  EXPECT_FALSE(bar.interactive());
  bar.begin_epoch(1, 1, 37);
  for (int i = 0; i < 37; ++i) {
    clock.t += 0.1;
    bar.add_step(4, 1.0, 2);
  }
  bar.end_epoch();
  const auto lines = lines_of(out.str());
  ASSERT_EQ(lines.size(), 10u) << out.str();  // 9 marks (10%..90%) and the final line
  EXPECT_EQ(out.str().find('\r'), std::string::npos);
  std::vector<int> steps;
  for (const auto& l : lines) steps.push_back(std::stoi(l.substr(l.find("/37") - 2, 2)));
  // A line is due at the first step reaching each multiple of 10% of 37 steps.
  std::vector<int> want;
  for (int k = 1; k <= 9; ++k) want.push_back(static_cast<int>(std::ceil(37 * k / 10.0)));
  want.push_back(37);
  EXPECT_EQ(steps, want);
  EXPECT_NE(lines.back().find("acc 50.00%"), std::string::npos) << lines.back();
}

TEST(Progress, PlainModeAlsoPrintsOnATimer) {
  FakeClock clock;
  std::ostringstream out;
  ProgressBar bar({.mode = ProgressMode::plain, .out = &out, .plain_percent = 100,
                   .plain_interval_s = 30, .clock = clock.fn()});
  bar.begin_epoch(1, 1, 200);
  for (int i = 0; i < 200; ++i) {
    clock.t += 1;
    bar.add_step(1, 0.5, 1);
  }
  bar.end_epoch();
  // One line per 30 s of 200 s (at steps 30, 60, ..., 180) and the final one.
  EXPECT_EQ(lines_of(out.str()).size(), 7u) << out.str();
  bar.message("test error 12.34%");
  EXPECT_EQ(lines_of(out.str()).back(), "test error 12.34%");
}

TEST(Progress, InteractiveModeRedrawsInPlaceAtMostTenTimesASecond) {
  FakeClock clock;
  std::ostringstream out;
  ProgressBar bar({.mode = ProgressMode::interactive, .out = &out, .clock = clock.fn()});
  EXPECT_TRUE(bar.interactive());
  bar.begin_epoch(1, 2, 100, "bn b=32");
  for (int i = 0; i < 100; ++i) {
    clock.t += 0.01;  // 100 steps per second
    bar.add_step(32, 0.7, 20);
    if (i == 49) bar.message("checkpoint saved");
  }
  bar.end_epoch();
  const std::string s = out.str();
  const auto redraws = std::count(s.begin(), s.end(), '\r');
  // The first draw, about one per 0.1 s over 1 s, the redraw after the message, and the end.
  EXPECT_GE(redraws, 10);
  EXPECT_LE(redraws, 14);
  EXPECT_NE(s.find("\r\x1b[Kcheckpoint saved\n\r"), std::string::npos) << "message must clear the bar";
  ASSERT_EQ(s.back(), '\n');
  const std::string last = s.substr(s.rfind('\r') + 1);
  EXPECT_NE(last.find("100/100"), std::string::npos) << last;
  EXPECT_NE(last.find("3200 img/s"), std::string::npos) << last;
  EXPECT_NE(last.find("ETA 0:01"), std::string::npos) << last;  // one more epoch at 1 s
  EXPECT_EQ(std::count(s.begin(), s.end(), '\n'), 2);           // the message and the end
}

}  // namespace

namespace {

TEST(SweepProgress, TimeLeftScalesTheElapsedTimeByTheImagesLeft) {
  // 100 s for 1000 of 4000 images: 300 s for the other 3000.
  EXPECT_DOUBLE_EQ(sweep_seconds_left(100, 1000, 4000), 300);
  // Runs differ in size: a small run done says little, a large one much.
  EXPECT_DOUBLE_EQ(sweep_seconds_left(10, 100, 10100), 1000);
  EXPECT_DOUBLE_EQ(sweep_seconds_left(50, 10000, 10100), 0.5);
  EXPECT_TRUE(std::isnan(sweep_seconds_left(5, 0, 100)));
  EXPECT_EQ(sweep_seconds_left(42, 100, 100), 0);
}

TEST(SweepProgress, FinishedRunLine) {
  EXPECT_EQ(sweep_finished_line(3, 12, "gn G=8 b=2 lr=0.1 seed=2", 9.876, 65, 130),
            "[3/12] gn G=8 b=2 lr=0.1 seed=2: test error 9.88%, elapsed 1:05, about 2:10 left");
  EXPECT_EQ(sweep_finished_line(1, 2, "bn b=4 lr=0.1", 50, 3, std::nan("")),
            "[1/2] bn b=4 lr=0.1: test error 50.00%, elapsed 0:03, time left unknown");
}

}  // namespace
