// Sweep outputs: results.csv, results.md and metrics JSON. The expected cells are computed here
// from the runs (means, sample standard deviations) and the files are parsed back independently
// of the writers.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "io/io_error.h"
#include "io/results.h"
#include "normkit/error.h"

namespace fs = std::filesystem;
using namespace normkit::train;
using json = nlohmann::json;

namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out(1);
  for (char c : s) {
    if (c == sep) out.emplace_back();
    else out.back() += c;
  }
  return out;
}

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(' '), e = s.find_last_not_of(' ');
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

std::string fmt2(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

RunResult make_run(const std::string& norm, int groups, int batch, uint64_t seed, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(0, 1);
  RunResult r;
  r.norm = norm;
  r.groups = groups;
  r.batch = batch;
  r.epochs = 3;
  r.lr = 0.1 * batch / 32;
  r.seed = seed;
  r.train_loss = 0.2 + u(rng);
  r.test_loss = 0.3 + u(rng);
  r.test_error = 8 + 4 * u(rng);
  if (norm == "bn") r.test_error_batch_stats = 9 + 8 * u(rng);
  r.images_per_s = 500 + 2000 * u(rng);
  r.seconds = 10 + 100 * u(rng);
  for (int e = 1; e <= r.epochs; ++e) {
    EpochRecord rec;
    rec.epoch = e;
    rec.lr = r.lr / (e == 3 ? 10 : 1);
    rec.train_loss = 1.0 / e + u(rng) * 0.01;
    rec.train_error = 30.0 / e;
    rec.test_loss = 1.1 / e;
    rec.test_error = 20.0 / e;
    if (norm == "bn") rec.test_error_batch_stats = 25.0 / e;
    rec.seconds = 5 + u(rng);
    rec.images_per_s = 1000 + u(rng);
    r.history.push_back(rec);
  }
  return r;
}

// A sweep: BN and GN at batch 32, 8, 2, two seeds for BN at batch 2, GN missing at batch 8.
std::vector<RunResult> sweep() {
  std::mt19937 rng(3);
  std::vector<RunResult> runs;
  for (int b : {32, 8, 2}) {
    runs.push_back(make_run("bn", 0, b, 1, rng));
    if (b != 8) runs.push_back(make_run("gn", 8, b, 1, rng));
  }
  runs.push_back(make_run("bn", 0, 2, 2, rng));
  return runs;
}

// The Markdown table that follows heading `heading`: rows of trimmed cells (header first).
std::vector<std::vector<std::string>> markdown_table(const std::string& md, const std::string& heading) {
  const auto lines = lines_of(md);
  std::vector<std::vector<std::string>> rows;
  size_t i = 0;
  while (i < lines.size() && lines[i] != heading) ++i;
  EXPECT_LT(i, lines.size()) << "no heading: " << heading;
  while (i < lines.size() && (lines[i].empty() || lines[i][0] != '|')) ++i;
  for (; i < lines.size() && !lines[i].empty() && lines[i][0] == '|'; ++i) {
    auto cells = split(lines[i].substr(1, lines[i].size() - 2), '|');
    for (auto& c : cells) c = trim(c);
    if (cells[0].find("---") == std::string::npos) rows.push_back(cells);
  }
  return rows;
}

class ResultsFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("normkit_io_results_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST(Results, NormLabels) {
  EXPECT_EQ(norm_label("bn", 0), "BN");
  EXPECT_EQ(norm_label("gn", 8), "GN (G=8)");
  EXPECT_EQ(norm_label("ln", 0), "LN");
  EXPECT_EQ(norm_label("in", 0), "IN");
  EXPECT_EQ(norm_label("none", 0), "none");
  EXPECT_EQ(norm_label("frozen", 0), "frozen BN");
  EXPECT_EQ(norm_label("brn", 0), "BRN");
}

TEST_F(ResultsFileTest, MetricsJsonHasBrnsOptionsForBrnAlone) {
  std::mt19937 rng(4);
  RunResult r = make_run("brn", 0, 2, 3, rng);
  EXPECT_FALSE(json::parse(metrics_json(r)).contains("renorm_r_max"));
  r.renorm = RunResult::Renorm{2.5, 0.75, 0.125};
  const fs::path p = dir_ / "brn.json";
  write_metrics_json(p.string(), r);
  const json j = json::parse(std::ifstream(p));
  EXPECT_EQ(j["renorm_r_max"], 2.5);
  EXPECT_EQ(j["renorm_d_max"], 0.75);
  EXPECT_EQ(j["renorm_warmup"], 0.125);
  const RunResult back = read_metrics_json(p.string());
  ASSERT_TRUE(back.renorm.has_value());
  EXPECT_EQ(back.renorm->r_max, 2.5);
  EXPECT_EQ(back.renorm->d_max, 0.75);
  EXPECT_EQ(back.renorm->warmup, 0.125);
  // Per device, as BN.
  r.devices = 4;
  EXPECT_NE(results_markdown({r}).find("| BRN (per device) |"), std::string::npos);
}

TEST(Results, CsvHasOneRowPerRunWithEveryField) {
  auto runs = sweep();
  runs[0].seconds = kNoValue;
  runs[1].devices = 8;
  runs[1].sync_bn = true;
  runs[2].test_error_precise = 12.5;
  const std::string csv = results_csv(runs);
  const auto lines = lines_of(csv);
  ASSERT_EQ(lines.size(), runs.size() + 1);
  EXPECT_EQ(lines[0],
            "norm,groups,devices,batch,epochs,lr,seed,train_loss,test_loss,test_error,"
            "test_error_batch_stats,test_error_precise,images_per_s,seconds,sync_bn,"
            "train_error_eval,train_loss_eval");
  for (size_t i = 0; i < runs.size(); ++i) {
    const RunResult& r = runs[i];
    const auto c = split(lines[i + 1], ',');
    ASSERT_EQ(c.size(), 17u) << lines[i + 1];
    EXPECT_EQ(c[15], "");  // not measured
    EXPECT_EQ(c[16], "");
    EXPECT_EQ(c[2], std::to_string(r.devices));
    EXPECT_EQ(c[14], r.sync_bn ? "1" : "0");
    EXPECT_EQ(c[0], r.sync_bn ? "syncbn" : r.norm);
    EXPECT_EQ(c[1], r.groups ? std::to_string(r.groups) : "");
    EXPECT_EQ(c[3], std::to_string(r.batch));
    EXPECT_EQ(c[4], "3");
    EXPECT_EQ(c[6], std::to_string(r.seed));
    const double values[] = {r.lr, 0, r.train_loss, r.test_loss, r.test_error,
                             r.test_error_batch_stats.value_or(kNoValue),
                             r.test_error_precise.value_or(kNoValue), r.images_per_s, r.seconds};
    for (size_t k = 5; k < 14; ++k) {
      if (k == 6) continue;
      const double want = values[k - 5];
      if (std::isnan(want)) {
        EXPECT_EQ(c[k], "") << "row " << i << " column " << k;
      } else {
        EXPECT_NEAR(std::stod(c[k]), want, 5e-6 * std::abs(want)) << "row " << i << " column " << k;
      }
    }
  }
}

TEST_F(ResultsFileTest, CsvReadsBackWhatItWrote) {
  auto runs = sweep();
  runs[1].norm = "gn, \"odd\"";  // survives quoting
  runs[2].seed = 18446744073709551615ull;
  runs[2].devices = 4;
  runs[2].sync_bn = true;
  runs[3].test_error_precise = 7.25;
  const fs::path p = dir_ / "results.csv";
  write_results_csv(p.string(), runs);
  const auto back = read_results_csv(p.string());
  ASSERT_EQ(back.size(), runs.size());
  for (size_t i = 0; i < runs.size(); ++i) {
    EXPECT_EQ(back[i].norm, runs[i].norm);
    EXPECT_EQ(back[i].groups, runs[i].groups);
    EXPECT_EQ(back[i].batch, runs[i].batch);
    EXPECT_EQ(back[i].seed, runs[i].seed);
    EXPECT_EQ(back[i].devices, runs[i].devices);
    EXPECT_EQ(back[i].sync_bn, runs[i].sync_bn);
    EXPECT_NEAR(back[i].test_error, runs[i].test_error, 1e-4);
    EXPECT_NEAR(back[i].lr, runs[i].lr, 1e-8);
    EXPECT_EQ(back[i].test_error_batch_stats.has_value(), runs[i].test_error_batch_stats.has_value());
    EXPECT_EQ(back[i].test_error_precise, runs[i].test_error_precise);
    EXPECT_TRUE(back[i].history.empty());
  }
  std::ofstream(dir_ / "bad1.csv") << "a,b\n";
  EXPECT_THROW(read_results_csv((dir_ / "bad1.csv").string()), IoError);
  std::string good = results_csv({runs[0]});
  std::ofstream(dir_ / "bad2.csv") << good.substr(0, good.rfind(',')) << "\n";
  EXPECT_THROW(read_results_csv((dir_ / "bad2.csv").string()), IoError);
  std::string nonnum = good;
  nonnum.replace(nonnum.rfind(','), 1, ",x");
  std::ofstream(dir_ / "bad3.csv") << nonnum;
  try {
    read_results_csv((dir_ / "bad3.csv").string());
    ADD_FAILURE();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("bad3.csv:2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(read_results_csv((dir_ / "absent.csv").string()), IoError);
}

TEST(Results, MarkdownTablesLikeThePaper) {
  const auto runs = sweep();
  const std::string md = results_markdown(runs, "Fashion-MNIST, 3 epochs.");
  EXPECT_NE(md.find("Fashion-MNIST, 3 epochs."), std::string::npos);

  const auto t = markdown_table(md, "## Test error (%) by batch size");
  ASSERT_EQ(t.size(), 3u);  // header, BN, GN
  EXPECT_EQ(t[0], (std::vector<std::string>{"norm", "batch 32", "batch 8", "batch 2"}));
  EXPECT_EQ(t[1][0], "BN");
  EXPECT_EQ(t[2][0], "GN (G=8)");
  // Expected cells from the runs.
  auto runs_at = [&](const std::string& norm, int b) {
    std::vector<const RunResult*> v;
    for (const auto& r : runs) {
      if (r.norm == norm && r.batch == b) v.push_back(&r);
    }
    return v;
  };
  EXPECT_EQ(t[1][1], fmt2(runs_at("bn", 32)[0]->test_error));
  EXPECT_EQ(t[1][2], fmt2(runs_at("bn", 8)[0]->test_error));
  const auto two = runs_at("bn", 2);
  ASSERT_EQ(two.size(), 2u);
  const double mean = (two[0]->test_error + two[1]->test_error) / 2;
  const double sd = std::abs(two[0]->test_error - two[1]->test_error) / std::sqrt(2.0);
  EXPECT_EQ(t[1][3], fmt2(mean) + " ± " + fmt2(sd) + " (n=2)");
  EXPECT_EQ(t[2][1], fmt2(runs_at("gn", 32)[0]->test_error));
  EXPECT_EQ(t[2][2], "—");
  EXPECT_NE(md.find("mean ± sample std over n seeds"), std::string::npos);

  const auto s = markdown_table(md, "## Test error (%) with running vs batch statistics at test time");
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[1][0], "BN, running statistics");
  EXPECT_EQ(s[2][0], "BN, batch statistics");
  EXPECT_EQ(s[1][1], t[1][1]);
  EXPECT_EQ(s[2][2], fmt2(*runs_at("bn", 8)[0]->test_error_batch_stats));

  const auto speed = markdown_table(md, "## Training speed (images/s)");
  ASSERT_EQ(speed.size(), 3u);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f", runs_at("gn", 2)[0]->images_per_s);
  EXPECT_EQ(speed[2][3], buf);
}

TEST(Results, MarkdownLeavesOutTheBatchStatisticsTableWhenThereIsNone) {
  auto runs = sweep();
  for (auto& r : runs) r.test_error_batch_stats.reset();
  const std::string md = results_markdown(runs);
  EXPECT_EQ(md.find("batch statistics"), std::string::npos);
  EXPECT_EQ(markdown_table(md, "## Test error (%) by batch size").size(), 3u);
}

TEST(Results, MarkdownShowsTheLastEpochsLossAndDivergence) {
  std::mt19937 rng(5);
  std::vector<RunResult> runs{make_run("bn", 0, 32, 1, rng), make_run("none", 0, 32, 1, rng),
                              make_run("none", 0, 32, 2, rng), make_run("none", 0, 8, 1, rng)};
  runs[2].train_loss = std::nan("");
  runs[3].train_loss = std::numeric_limits<double>::infinity();
  const std::string md = results_markdown(runs);
  const auto t = markdown_table(md, "## Training loss of the last epoch");
  ASSERT_EQ(t.size(), 3u);
  EXPECT_EQ(t[0], (std::vector<std::string>{"norm", "batch 32", "batch 8"}));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4f", runs[0].train_loss);
  EXPECT_EQ(t[1][1], buf);
  EXPECT_EQ(t[1][2], "—");
  std::snprintf(buf, sizeof buf, "%.4f", runs[1].train_loss);
  EXPECT_EQ(t[2][1], std::string(buf) + ", 1 diverged");
  EXPECT_EQ(t[2][2], "diverged");
  // Test error stays a number for a diverged run (it is measured on the broken model).
  const auto e = markdown_table(md, "## Test error (%) by batch size");
  EXPECT_EQ(e[2][2], fmt2(runs[3].test_error));
}

TEST(Results, RowsNameTheBaseLearningRateOnlyWhenTheRunsUseSeveral) {
  std::mt19937 rng(6);
  std::vector<RunResult> runs;
  for (double base : {0.1, 0.8})
    for (const char* norm : {"bn", "none"})
      for (int b : {32, 4}) {
        RunResult r = make_run(norm, 0, b, 1, rng);
        r.lr = base * b / 32;  // as the trainer sets it
        runs.push_back(r);
      }
  const std::string md = results_markdown(runs);
  const auto t = markdown_table(md, "## Test error (%) by batch size");
  ASSERT_EQ(t.size(), 5u);
  EXPECT_EQ(t[1][0], "BN, lr base 0.1");
  EXPECT_EQ(t[2][0], "none, lr base 0.1");
  EXPECT_EQ(t[3][0], "BN, lr base 0.8");
  EXPECT_EQ(t[4][0], "none, lr base 0.8");
  EXPECT_EQ(t[3][2], fmt2(runs[5].test_error));  // bn, base 0.8, batch 4: one run per cell
  const auto s = markdown_table(md, "## Test error (%) with running vs batch statistics at test time");
  ASSERT_EQ(s.size(), 5u);
  EXPECT_EQ(s[3][0], "BN, lr base 0.8, running statistics");

  // One base lr: plain norm labels, as in the batch-size sweep.
  runs.resize(4);
  EXPECT_EQ(markdown_table(results_markdown(runs), "## Test error (%) by batch size")[1][0], "BN");
}

TEST_F(ResultsFileTest, MetricsJsonHasTheSummaryAndHistory) {
  std::mt19937 rng(9);
  RunResult r = make_run("gn", 8, 2, 7, rng);
  r.history[1].test_loss = kNoValue;  // not measured that epoch
  r.loss_curve_step = {50, 100, 150};
  r.loss_curve_loss = {2.1, 1.5, std::nan("")};
  const fs::path p = dir_ / "metrics.json";
  write_metrics_json(p.string(), r);

  std::ifstream in(p);
  const json j = json::parse(in);
  EXPECT_EQ(j["norm"], "gn");
  EXPECT_EQ(j["groups"], 8);
  EXPECT_EQ(j["batch"], 2);
  EXPECT_EQ(j["seed"], 7);
  EXPECT_DOUBLE_EQ(j["train_loss"].get<double>(), r.train_loss);
  EXPECT_DOUBLE_EQ(j["test_loss"].get<double>(), r.test_loss);
  EXPECT_DOUBLE_EQ(j["test_error"].get<double>(), r.test_error);
  EXPECT_DOUBLE_EQ(j["images_per_s"].get<double>(), r.images_per_s);
  EXPECT_TRUE(j["test_error_batch_stats"].is_null());
  const json& h = j["history"];
  EXPECT_EQ(h["epoch"], (json{1, 2, 3}));
  for (size_t e = 0; e < 3; ++e) {
    EXPECT_DOUBLE_EQ(h["train_loss"][e].get<double>(), r.history[e].train_loss);
    EXPECT_DOUBLE_EQ(h["test_error"][e].get<double>(), r.history[e].test_error);
    EXPECT_DOUBLE_EQ(h["lr"][e].get<double>(), r.history[e].lr);
  }
  EXPECT_TRUE(h["test_loss"][1].is_null());
  EXPECT_EQ(h["test_error_batch_stats"], (json{nullptr, nullptr, nullptr}));
  EXPECT_EQ(j["loss_curve"]["step"], (json{50, 100, 150}));
  EXPECT_TRUE(j["loss_curve"]["loss"][2].is_null());

  const RunResult back = read_metrics_json(p.string());
  EXPECT_EQ(back.norm, r.norm);
  EXPECT_EQ(back.seed, r.seed);
  EXPECT_EQ(back.test_error, r.test_error);  // full precision in JSON
  EXPECT_FALSE(back.test_error_batch_stats.has_value());
  ASSERT_EQ(back.history.size(), 3u);
  EXPECT_EQ(back.history[2].train_loss, r.history[2].train_loss);
  EXPECT_TRUE(std::isnan(back.history[1].test_loss));
  EXPECT_EQ(back.loss_curve_step, r.loss_curve_step);
  EXPECT_TRUE(std::isnan(back.loss_curve_loss[2]));

  // One unsynchronized device: no device fields (the file is what it was before devices).
  EXPECT_FALSE(j.contains("devices"));
  EXPECT_FALSE(j.contains("sync_bn"));
  EXPECT_EQ(back.devices, 1);
  EXPECT_FALSE(back.sync_bn);
  RunResult synced = r;
  synced.devices = 8;
  synced.sync_bn = true;
  write_metrics_json(p.string(), synced);
  const json js = json::parse(std::ifstream(p));
  EXPECT_EQ(js["devices"], 8);
  EXPECT_EQ(js["sync_bn"], true);
  const RunResult synced_back = read_metrics_json(p.string());
  EXPECT_EQ(synced_back.devices, 8);
  EXPECT_TRUE(synced_back.sync_bn);

  r.loss_curve_loss.pop_back();
  EXPECT_THROW(metrics_json(r), normkit::Error);
  std::ofstream(dir_ / "broken.json") << "{\"norm\": \"bn\",";
  EXPECT_THROW(read_metrics_json((dir_ / "broken.json").string()), IoError);
  std::ofstream(dir_ / "partial.json") << "{\"norm\": \"bn\", \"groups\": 0}";
  try {
    read_metrics_json((dir_ / "partial.json").string());
    ADD_FAILURE();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("\"batch\""), std::string::npos) << e.what();
  }
}

TEST(Results, TableRowsTellBatchNormPerDeviceFromSyncBN) {
  std::mt19937 rng(5);
  std::vector<RunResult> runs;
  for (const auto& [norm, sync] : {std::pair{"bn", false}, {"bn", true}, {"gn", false}}) {
    RunResult r = make_run(norm, norm == std::string("gn") ? 8 : 0, 4, 1, rng);
    r.devices = 8;
    r.sync_bn = sync;
    r.lr = 0.1 * 8 * 4 / 32;
    runs.push_back(r);
  }
  const std::string md = results_markdown(runs);
  EXPECT_NE(md.find("| BN (per device) |"), std::string::npos) << md;
  EXPECT_NE(md.find("| SyncBN |"), std::string::npos) << md;
  EXPECT_NE(md.find("| GN (G=8) |"), std::string::npos) << md;
  // lr base from the global batch: one base, so no "lr base" in the labels.
  EXPECT_EQ(md.find("lr base"), std::string::npos) << md;
}

TEST_F(ResultsFileTest, WritersNameAnUnwritablePath) {
  const std::string p = (dir_ / "no" / "results.md").string();
  try {
    write_results_markdown(p, sweep());
    ADD_FAILURE();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(p), std::string::npos);
  }
  EXPECT_THROW(write_results_csv((dir_ / "no" / "r.csv").string(), sweep()), IoError);
  EXPECT_THROW(write_metrics_json((dir_ / "no" / "m.json").string(), sweep()[0]), IoError);
}

}  // namespace

namespace {

TEST_F(ResultsFileTest, TheTrainTestGapIsInTheCsvTheJsonAndTheMarkdown) {
  auto runs = sweep();
  runs[0].train_error_eval = 1.25;
  runs[0].train_loss_eval = 0.0625;
  runs[0].eval_train_images = 1000;
  const fs::path p = dir_ / "results.csv";
  write_results_csv(p.string(), runs);
  const auto back = read_results_csv(p.string());
  EXPECT_EQ(back[0].train_error_eval, 1.25);
  EXPECT_EQ(back[0].train_loss_eval, 0.0625);
  EXPECT_TRUE(std::isnan(back[1].train_error_eval));
  // Files from before the two columns, and from before test_error_precise, still read (by
  // column name: devices moved, SyncBN runs were named bn).
  std::ofstream(dir_ / "old.csv")
      << "norm,groups,batch,epochs,lr,seed,train_loss,test_loss,test_error,test_error_batch_stats,"
         "images_per_s,seconds,devices,sync_bn\n"
      << "bn,,8,3,0.05,7,0.5,0.6,9.5,10.5,1000,12,2,1\n";
  const auto old_back = read_results_csv((dir_ / "old.csv").string());
  ASSERT_EQ(old_back.size(), 1u);
  EXPECT_EQ(old_back[0].norm, "bn");
  EXPECT_TRUE(old_back[0].sync_bn);
  EXPECT_EQ(old_back[0].devices, 2);
  EXPECT_EQ(old_back[0].batch, 8);
  EXPECT_EQ(old_back[0].seed, 7u);
  EXPECT_EQ(old_back[0].test_error_batch_stats, 10.5);
  EXPECT_FALSE(old_back[0].test_error_precise.has_value());
  EXPECT_TRUE(std::isnan(old_back[0].train_error_eval));
  std::ofstream(dir_ / "gap.csv")
      << "norm,groups,batch,epochs,lr,seed,train_loss,test_loss,test_error,test_error_batch_stats,"
         "images_per_s,seconds,devices,sync_bn,train_error_eval,train_loss_eval\n"
      << "gn,4,2,3,0.00625,1,0.5,0.6,9.5,,1000,12,1,0,3.5,0.25\n";
  const auto gap_back = read_results_csv((dir_ / "gap.csv").string());
  ASSERT_EQ(gap_back.size(), 1u);
  EXPECT_EQ(gap_back[0].groups, 4);
  EXPECT_EQ(gap_back[0].devices, 1);
  EXPECT_EQ(gap_back[0].train_error_eval, 3.5);
  EXPECT_FALSE(gap_back[0].test_error_batch_stats.has_value());

  const std::string md = results_markdown(runs);
  const auto table = markdown_table(md, "## Train/test gap: error (%) evaluated at the end");
  ASSERT_EQ(table.size(), 3u);  // the header and the measured run's row pair
  EXPECT_EQ(table[1][0], norm_label(runs[0].norm, runs[0].groups) + ", training images");
  EXPECT_EQ(table[2][0], norm_label(runs[0].norm, runs[0].groups) + ", test images");
  EXPECT_EQ(results_markdown(sweep()).find("Train/test gap"), std::string::npos);
}

TEST_F(ResultsFileTest, MetricsJsonHasTheStudyOptionsOnlyWhenSet) {
  std::mt19937 rng(3);
  RunResult r = make_run("frozen", 0, 2, 7, rng);
  const json plain = json::parse(metrics_json(r));
  for (const char* key : {"init_scale", "dropout", "weight_decay", "eval_train_images", "classes",
                          "init_from", "train_error_eval", "train_loss_eval"})
    EXPECT_FALSE(plain.contains(key)) << key;
  r.init_scale = 0.1;
  r.dropout = 0.5;
  r.weight_decay = 0;
  r.eval_train_images = 512;
  r.classes = {5, 6, 9};
  r.init_from = "pre, \"trained\".safetensors";
  r.train_error_eval = 3.5;
  r.train_loss_eval = 0.125;
  const fs::path p = dir_ / "study.json";
  write_metrics_json(p.string(), r);
  const json j = json::parse(std::ifstream(p));
  EXPECT_EQ(j["init_scale"], 0.1);
  EXPECT_EQ(j["dropout"], 0.5);
  EXPECT_EQ(j["weight_decay"], 0);
  EXPECT_EQ(j["eval_train_images"], 512);
  EXPECT_EQ(j["classes"], (json{5, 6, 9}));
  EXPECT_EQ(j["init_from"], r.init_from);
  EXPECT_EQ(j["train_error_eval"], 3.5);
  const RunResult back = read_metrics_json(p.string());
  EXPECT_EQ(back.init_scale, r.init_scale);
  EXPECT_EQ(back.dropout, r.dropout);
  EXPECT_EQ(back.weight_decay, r.weight_decay);
  EXPECT_EQ(back.eval_train_images, r.eval_train_images);
  EXPECT_EQ(back.classes, r.classes);
  EXPECT_EQ(back.init_from, r.init_from);
  EXPECT_EQ(back.train_error_eval, r.train_error_eval);
  EXPECT_EQ(back.train_loss_eval, r.train_loss_eval);
  std::ofstream(dir_ / "bad.json") << json({{"norm", "bn"}, {"groups", 0}, {"batch", 2}, {"epochs", 1},
                                            {"seed", 1}, {"lr", 0.1}, {"train_loss", 1}, {"test_loss", 1},
                                            {"test_error", 1}, {"test_error_batch_stats", nullptr},
                                            {"images_per_s", 1}, {"seconds", 1}, {"classes", {1.5}}})
                                           .dump();
  EXPECT_THROW(read_metrics_json((dir_ / "bad.json").string()), IoError);
}

}  // namespace

namespace {

// Three seeds of BN and SyncBN (2 devices) at batches 4 and 2, GN at batch 4; one BN run
// without precise statistics.
std::vector<RunResult> seeded_sweep() {
  std::mt19937 rng(21);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<RunResult> runs;
  for (const char* arm : {"bn", "syncbn", "gn"})
    for (int b : {4, 2}) {
      if (std::string(arm) == "gn" && b == 2) continue;
      for (uint64_t seed : {1, 2, 3}) {
        RunResult r = make_run(std::string(arm) == "syncbn" ? "bn" : arm, std::string(arm) == "gn" ? 2 : 0, b, seed, rng);
        r.devices = 2;
        r.lr = 0.1 * 2 * b / 32;
        r.sync_bn = std::string(arm) == "syncbn";
        if (r.norm == "bn") r.test_error_precise = 5 + 10 * u(rng);
        runs.push_back(r);
      }
    }
  runs[1].test_error_precise.reset();
  return runs;
}

struct Moments {
  size_t n = 0;
  double mean = 0, sd = 0, min = 0, max = 0;
};
Moments moments(const std::vector<double>& v) {
  Moments m;
  m.n = v.size();
  if (v.empty()) return m;
  for (double x : v) m.mean += x / static_cast<double>(v.size());
  double ss = 0;
  for (double x : v) ss += (x - m.mean) * (x - m.mean);
  m.sd = v.size() > 1 ? std::sqrt(ss / static_cast<double>(v.size() - 1)) : std::nan("");
  m.min = *std::min_element(v.begin(), v.end());
  m.max = *std::max_element(v.begin(), v.end());
  return m;
}

TEST(Results, SeedsShowMeanAndSampleStdPerCellAndEveryRun) {
  const auto runs = seeded_sweep();
  const std::string md = results_markdown(runs);
  const auto t = markdown_table(md, "## Test error (%) by batch size");
  ASSERT_EQ(t.size(), 4u);  // header, BN (per device), SyncBN, GN
  EXPECT_EQ(t[1][0], "BN (per device)");
  EXPECT_EQ(t[2][0], "SyncBN");
  const Moments bn4 = moments({runs[0].test_error, runs[1].test_error, runs[2].test_error});
  EXPECT_EQ(t[1][1], fmt2(bn4.mean) + " ± " + fmt2(bn4.sd) + " (n=3)");
  const Moments sync2 = moments({runs[9].test_error, runs[10].test_error, runs[11].test_error});
  EXPECT_EQ(t[2][2], fmt2(sync2.mean) + " ± " + fmt2(sync2.sd) + " (n=3)");
  EXPECT_NE(md.find("± sample std over n seeds"), std::string::npos);
  // The precise statistics row averages the runs that have them.
  const auto s = markdown_table(md, "## Test error (%) with running vs batch statistics at test time");
  ASSERT_EQ(s.size(), 7u);
  EXPECT_EQ(s[3][0], "BN (per device), precise statistics");
  const Moments p = moments({*runs[0].test_error_precise, *runs[2].test_error_precise});
  EXPECT_EQ(s[3][1], fmt2(p.mean) + " ± " + fmt2(p.sd) + " (n=2)");
  // Every run, in order, with its seed.
  const auto every = markdown_table(md, "## Every run");
  ASSERT_EQ(every.size(), runs.size() + 1);
  for (size_t i = 0; i < runs.size(); ++i) {
    EXPECT_EQ(every[i + 1][2], std::to_string(runs[i].seed));
    EXPECT_EQ(every[i + 1][3], fmt2(runs[i].test_error));
    EXPECT_EQ(every[i + 1][5], runs[i].test_error_precise ? fmt2(*runs[i].test_error_precise) : "—");
  }
  // One seed: plain values and no list of runs.
  std::vector<RunResult> one;
  for (const auto& r : runs)
    if (r.seed == 1) one.push_back(r);
  const std::string md1 = results_markdown(one);
  EXPECT_EQ(md1.find("## Every run"), std::string::npos);
  EXPECT_EQ(md1.find("sample std"), std::string::npos);
  EXPECT_EQ(markdown_table(md1, "## Test error (%) by batch size")[1][1], fmt2(runs[0].test_error));
}

TEST(Results, SummaryCsvHasOneRowPerCellWithTheMomentsOfEachError) {
  const auto runs = seeded_sweep();
  const auto lines = lines_of(summary_csv(runs));
  std::string header = "norm,groups,devices,batch,lr,n";
  for (const char* e : {"test_error", "test_error_batch_stats", "test_error_precise"})
    for (const char* s : {"mean", "std", "min", "max"}) header += std::string(",") + e + "_" + s;
  ASSERT_EQ(lines.size(), 6u);  // header and 5 cells
  EXPECT_EQ(lines[0], header);
  const std::vector<std::string> cells[] = {{"bn", "", "2", "4"}, {"bn", "", "2", "2"},
                                            {"syncbn", "", "2", "4"}, {"syncbn", "", "2", "2"},
                                            {"gn", "2", "2", "4"}};
  for (size_t row = 0; row < 5; ++row) {
    const auto c = split(lines[row + 1], ',');
    ASSERT_EQ(c.size(), 18u) << lines[row + 1];
    for (size_t k = 0; k < 4; ++k) EXPECT_EQ(c[k], cells[row][k]) << row;
    EXPECT_EQ(c[5], "3");
    const std::vector<RunResult> cell(runs.begin() + 3 * row, runs.begin() + 3 * row + 3);
    const std::function<std::optional<double>(const RunResult&)> fields[] = {
        [](const RunResult& r) { return std::optional<double>(r.test_error); },
        [](const RunResult& r) { return r.test_error_batch_stats; },
        [](const RunResult& r) { return r.test_error_precise; }};
    for (size_t f = 0; f < 3; ++f) {
      std::vector<double> v;
      for (const auto& r : cell)
        if (fields[f](r)) v.push_back(*fields[f](r));
      const Moments m = moments(v);
      const double want[] = {m.mean, m.sd, m.min, m.max};
      for (size_t k = 0; k < 4; ++k) {
        const std::string& got = c[6 + 4 * f + k];
        if (v.empty() || std::isnan(want[k])) {
          EXPECT_EQ(got, "") << row << " " << f << " " << k;
        } else {
          EXPECT_NEAR(std::stod(got), want[k], 5e-6 * std::abs(want[k])) << row << " " << f << " " << k;
        }
      }
    }
  }
}

// The studies' options as sweep axes: three columns at the end of results.csv and summary.csv
// (the other columns where they were), rows of the tables per value, read back by name; runs at
// the defaults leave both files as they were.
TEST_F(ResultsFileTest, StudyOptionsAddColumnsAtTheEndAndSplitTheRows) {
  std::mt19937 rng(29);
  std::vector<RunResult> runs;
  const double scales[] = {0.3, 3};
  const double dropouts[] = {0, 0.5};
  for (double scale : scales)
    for (double dropout : dropouts)
      for (uint64_t seed : {1, 2, 3}) {
        RunResult r = make_run("bn", 0, 32, seed, rng);
        r.init_scale = scale;
        r.dropout = dropout;
        r.weight_decay = 0;
        runs.push_back(r);
      }
  const std::string old_header =
      "norm,groups,devices,batch,epochs,lr,seed,train_loss,test_loss,test_error,"
      "test_error_batch_stats,test_error_precise,images_per_s,seconds,sync_bn,"
      "train_error_eval,train_loss_eval";
  const auto lines = lines_of(results_csv(runs));
  ASSERT_EQ(lines.size(), runs.size() + 1);
  EXPECT_EQ(lines[0], old_header + ",init_scale,dropout,weight_decay");
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto c = split(lines[i + 1], ',');
    ASSERT_EQ(c.size(), 20u) << lines[i + 1];
    EXPECT_EQ(c[6], std::to_string(runs[i].seed));  // the earlier columns stay in place
    EXPECT_EQ(std::stod(c[17]), runs[i].init_scale);
    EXPECT_EQ(std::stod(c[18]), runs[i].dropout);
    EXPECT_EQ(std::stod(c[19]), 0.0);
  }
  const fs::path p = dir_ / "results.csv";
  write_results_csv(p.string(), runs);
  const auto back = read_results_csv(p.string());
  ASSERT_EQ(back.size(), runs.size());
  for (size_t i = 0; i < runs.size(); ++i) {
    EXPECT_EQ(back[i].init_scale, runs[i].init_scale) << i;
    EXPECT_EQ(back[i].dropout, runs[i].dropout) << i;
    EXPECT_EQ(back[i].weight_decay, 0.0) << i;
  }
  // An older file has the defaults.
  std::ofstream(dir_ / "old.csv") << results_csv({make_run("gn", 4, 8, 1, rng)});
  const auto old = read_results_csv((dir_ / "old.csv").string());
  ASSERT_EQ(old.size(), 1u);
  EXPECT_EQ(old[0].init_scale, 1.0);
  EXPECT_EQ(old[0].dropout, 0.0);
  EXPECT_EQ(old[0].weight_decay, 1e-4);

  // Four rows of three seeds each, named by the options that vary (not the weight decay).
  const auto table = markdown_table(results_markdown(runs), "## Test error (%) by batch size");
  ASSERT_EQ(table.size(), 5u);
  size_t row = 1;
  for (double scale : scales)
    for (double dropout : dropouts) {
      char want[96];
      std::snprintf(want, sizeof want, "BN, init scale %g, dropout %g", scale, dropout);
      EXPECT_EQ(table[row][0], want);
      std::vector<double> v;
      for (const RunResult& r : runs)
        if (r.init_scale == scale && r.dropout == dropout) v.push_back(r.test_error);
      const Moments m = moments(v);
      char cell[96];
      std::snprintf(cell, sizeof cell, "%.2f ± %.2f (n=3)", m.mean, m.sd);
      EXPECT_EQ(table[row][1], cell);
      ++row;
    }

  const auto summary = lines_of(summary_csv(runs));
  ASSERT_EQ(summary.size(), 5u);
  EXPECT_EQ(summary[0].substr(summary[0].size() - 32), ",init_scale,dropout,weight_decay");
  row = 1;
  for (double scale : scales)
    for (double dropout : dropouts) {
      const auto c = split(summary[row++], ',');
      ASSERT_EQ(c.size(), 21u);
      EXPECT_EQ(c[5], "3");
      EXPECT_EQ(std::stod(c[18]), scale);
      EXPECT_EQ(std::stod(c[19]), dropout);
      EXPECT_EQ(std::stod(c[20]), 0.0);
    }

  // At the defaults: no new columns, no new words.
  const auto plain = sweep();
  EXPECT_EQ(lines_of(results_csv(plain))[0], old_header);
  EXPECT_EQ(split(lines_of(summary_csv(plain))[0], ',').size(), 18u);
  EXPECT_EQ(results_markdown(plain).find("init scale"), std::string::npos);
}

TEST_F(ResultsFileTest, MetricsJsonCarriesPreciseStatisticsAugmentationAndWarmUp) {
  std::mt19937 rng(10);
  RunResult plain = make_run("bn", 0, 8, 1, rng);
  const json j0 = json::parse(metrics_json(plain));
  for (const char* key : {"test_error_precise", "crop_pad", "hflip", "lr_warmup"})
    EXPECT_FALSE(j0.contains(key)) << key;
  RunResult r = plain;
  r.test_error_precise = 9.75;
  r.crop_pad = 4;
  r.hflip = true;
  r.lr_warmup = 0.05;
  const json j = json::parse(metrics_json(r));
  EXPECT_EQ(j["test_error_precise"].get<double>(), 9.75);
  EXPECT_EQ(j["crop_pad"].get<int>(), 4);
  EXPECT_EQ(j["hflip"].get<bool>(), true);
  EXPECT_EQ(j["lr_warmup"].get<double>(), 0.05);
  const fs::path p = dir_ / "m.json";
  write_metrics_json(p.string(), r);
  const RunResult back = read_metrics_json(p.string());
  EXPECT_EQ(back.test_error_precise, r.test_error_precise);
  EXPECT_EQ(back.crop_pad, 4);
  EXPECT_TRUE(back.hflip);
  EXPECT_EQ(back.lr_warmup, 0.05);
  write_metrics_json(p.string(), plain);
  const RunResult back0 = read_metrics_json(p.string());
  EXPECT_FALSE(back0.test_error_precise.has_value());
  EXPECT_EQ(back0.crop_pad, 0);
  EXPECT_FALSE(back0.hflip);
}

}  // namespace
