// SVG line plots: the document is parsed back (by a small strict XML parser here and, when
// present, by Python's xml.etree), and every drawn point is checked against the position its
// value must have according to the tick labels drawn beside the axes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "io/io_error.h"
#include "io/plot.h"
#include "normkit/error.h"

namespace fs = std::filesystem;
using namespace normkit::train;

namespace {

// ---- A strict parser for the XML subset SVG writers use -------------------------------------
struct Node {
  std::string tag;
  std::map<std::string, std::string> attrs;
  std::string text;  // character data directly inside, entities decoded
  std::vector<std::unique_ptr<Node>> children;

  double num(const std::string& name) const { return std::stod(attrs.at(name)); }
  void collect(const std::string& want, std::vector<const Node*>& out) const {
    if (tag == want) out.push_back(this);
    for (const auto& c : children) c->collect(want, out);
  }
  std::vector<const Node*> all(const std::string& want) const {
    std::vector<const Node*> out;
    collect(want, out);
    return out;
  }
  bool has_class(const std::string& c) const {
    auto it = attrs.find("class");
    return it != attrs.end() && it->second == c;
  }
};

class XmlParser {
 public:
  explicit XmlParser(const std::string& s) : s_(s) {}

  std::unique_ptr<Node> parse_document() {
    skip_space();
    if (s_.compare(i_, 5, "<?xml") == 0) {
      const size_t end = s_.find("?>", i_);
      if (end == std::string::npos) fail("unterminated prolog");
      i_ = end + 2;
    }
    skip_space();
    auto root = parse_element();
    skip_space();
    if (i_ != s_.size()) fail("content after the root element");
    return root;
  }

 private:
  [[noreturn]] void fail(const std::string& why) {
    throw std::runtime_error("XML error at byte " + std::to_string(i_) + ": " + why);
  }
  void skip_space() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  std::string name() {
    const size_t b = i_;
    while (i_ < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[i_])) || s_[i_] == '-' ||
                              s_[i_] == '_' || s_[i_] == ':')) {
      ++i_;
    }
    if (b == i_) fail("expected a name");
    return s_.substr(b, i_ - b);
  }
  std::string decode(const std::string& raw) {
    std::string out;
    for (size_t k = 0; k < raw.size(); ++k) {
      if (raw[k] == '<') fail("raw '<' in text or attribute");
      if (raw[k] != '&') {
        out += raw[k];
        continue;
      }
      const size_t semi = raw.find(';', k);
      if (semi == std::string::npos) fail("unterminated entity");
      const std::string ent = raw.substr(k + 1, semi - k - 1);
      static const std::map<std::string, char> known = {
          {"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"apos", '\''}};
      if (!known.count(ent)) fail("unknown entity &" + ent + ";");
      out += known.at(ent);
      k = semi;
    }
    return out;
  }
  std::unique_ptr<Node> parse_element() {
    if (s_[i_] != '<') fail("expected '<'");
    ++i_;
    auto node = std::make_unique<Node>();
    node->tag = name();
    for (;;) {
      skip_space();
      if (s_.compare(i_, 2, "/>") == 0) {
        i_ += 2;
        return node;
      }
      if (s_[i_] == '>') {
        ++i_;
        break;
      }
      const std::string key = name();
      if (s_[i_] != '=' || s_[i_ + 1] != '"') fail("attribute " + key + " not =\"...\"");
      i_ += 2;
      const size_t end = s_.find('"', i_);
      if (end == std::string::npos) fail("unterminated attribute");
      if (node->attrs.count(key)) fail("duplicate attribute " + key);
      node->attrs[key] = decode(s_.substr(i_, end - i_));
      i_ = end + 1;
    }
    for (;;) {
      const size_t lt = s_.find('<', i_);
      if (lt == std::string::npos) fail("unclosed <" + node->tag + ">");
      node->text += decode(s_.substr(i_, lt - i_));
      i_ = lt;
      if (s_.compare(i_, 2, "</") == 0) {
        i_ += 2;
        if (name() != node->tag) fail("mismatched close of <" + node->tag + ">");
        if (s_[i_] != '>') fail("bad close tag");
        ++i_;
        return node;
      }
      node->children.push_back(parse_element());
    }
  }

  const std::string& s_;
  size_t i_ = 0;
};

std::vector<std::pair<double, double>> points_of(const Node& polyline) {
  std::vector<std::pair<double, double>> out;
  std::istringstream in(polyline.attrs.at("points"));
  std::string pair;
  while (in >> pair) {
    const size_t comma = pair.find(',');
    out.emplace_back(std::stod(pair.substr(0, comma)), std::stod(pair.substr(comma + 1)));
  }
  return out;
}

double axis_units(double v, AxisScale s) {
  return s == AxisScale::log2 ? std::log2(v) : s == AxisScale::log10 ? std::log10(v) : v;
}

// The pixel position of `value` implied by the first and last tick of an axis: ticks are
// <g class="x-tick"> (or y-tick) holding a <line> and a <text> label.
struct TickMap {
  double p0 = 0, v0 = 0, p1 = 0, v1 = 0;
  AxisScale scale = AxisScale::linear;
  std::vector<std::pair<double, double>> ticks;  // (value, position)
  double at(double value) const {
    const double f = (axis_units(value, scale) - axis_units(v0, scale)) /
                     (axis_units(v1, scale) - axis_units(v0, scale));
    return p0 + f * (p1 - p0);
  }
};

TickMap tick_map(const Node& root, const std::string& cls, AxisScale scale) {
  TickMap m;
  m.scale = scale;
  for (const Node* g : root.all("g")) {
    if (!g->has_class(cls)) continue;
    const Node* text = g->all("text").at(0);
    const double pos = cls == "x-tick" ? text->num("x") : g->all("line").at(0)->num("y1");
    m.ticks.emplace_back(std::stod(text->text), pos);
  }
  EXPECT_GE(m.ticks.size(), 2u) << cls;
  if (m.ticks.size() < 2) return m;
  std::tie(m.v0, m.p0) = m.ticks.front();
  std::tie(m.v1, m.p1) = m.ticks.back();
  return m;
}

struct Area {
  double x, y, w, h;
  bool contains(double px, double py) const {
    return px >= x - 1e-9 && px <= x + w + 1e-9 && py >= y - 1e-9 && py <= y + h + 1e-9;
  }
};

Area plot_area(const Node& root) {
  for (const Node* r : root.all("rect")) {
    if (r->has_class("plot-area")) return {r->num("x"), r->num("y"), r->num("width"), r->num("height")};
  }
  ADD_FAILURE() << "no plot-area rect";
  return {};
}

std::vector<const Node*> series_groups(const Node& root) {
  std::vector<const Node*> out;
  for (const Node* g : root.all("g")) {
    if (g->has_class("series")) out.push_back(g);
  }
  return out;
}

// Every drawable (x, y) of every series must appear, in order, at the pixel the tick labels imply,
// inside the plot area (axes are automatic in these specs, so nothing is clipped).
void expect_points_where_ticks_say(const std::string& svg, const PlotSpec& spec) {
  auto root = XmlParser(svg).parse_document();
  const Area area = plot_area(*root);
  const TickMap xm = tick_map(*root, "x-tick", spec.x_scale);
  const TickMap ym = tick_map(*root, "y-tick", spec.y_scale);
  for (const auto& [v, p] : xm.ticks) {
    EXPECT_NEAR(p, xm.at(v), 0.02) << "x ticks not evenly placed in axis units, tick " << v;
  }
  for (const auto& [v, p] : ym.ticks) EXPECT_NEAR(p, ym.at(v), 0.02) << "y tick " << v;
  const auto groups = series_groups(*root);
  ASSERT_EQ(groups.size(), spec.series.size());
  for (size_t s = 0; s < spec.series.size(); ++s) {
    const PlotSeries& series = spec.series[s];
    EXPECT_EQ(groups[s]->attrs.at("data-name"), series.name);
    std::vector<std::pair<double, double>> drawn;
    for (const Node* pl : groups[s]->all("polyline")) {
      for (auto p : points_of(*pl)) drawn.push_back(p);
    }
    size_t k = 0;
    for (size_t i = 0; i < series.x.size(); ++i) {
      const bool ok_x = std::isfinite(series.x[i]) && (spec.x_scale == AxisScale::linear || series.x[i] > 0);
      const bool ok_y = std::isfinite(series.y[i]) && (spec.y_scale == AxisScale::linear || series.y[i] > 0);
      if (!ok_x || !ok_y) continue;
      ASSERT_LT(k, drawn.size()) << series.name;
      EXPECT_NEAR(drawn[k].first, xm.at(series.x[i]), 0.02) << series.name << " point " << i;
      EXPECT_NEAR(drawn[k].second, ym.at(series.y[i]), 0.02) << series.name << " point " << i;
      EXPECT_TRUE(area.contains(drawn[k].first, drawn[k].second)) << series.name << " point " << i;
      ++k;
    }
    EXPECT_EQ(k, drawn.size()) << series.name << ": extra points drawn";
  }
}

PlotSpec figure1() {
  PlotSpec spec;
  spec.title = "Fashion-MNIST: test error vs batch size";
  spec.x_label = "batch size";
  spec.y_label = "test error (%)";
  spec.x_scale = AxisScale::log2;
  spec.x_reversed = true;
  spec.x_ticks = {32, 16, 8, 4, 2};
  spec.series = {{"BN", {32, 16, 8, 4, 2}, {8.85, 9.1, 9.3, 9.7, 9.98}},
                 {"GN (G=8)", {32, 16, 8, 4, 2}, {10.87, 10.8, 10.9, 10.7, 10.77}},
                 {"BN, batch statistics", {32, 16, 8, 4, 2}, {8.9, 9.2, 9.9, 11.6, 16.3}, true}};
  return spec;
}

class PlotFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("normkit_io_plot_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST(Plot, Figure1StyleIsWellFormedAndPlacesEveryPoint) {
  const PlotSpec spec = figure1();
  const std::string svg = render_line_plot_svg(spec);
  expect_points_where_ticks_say(svg, spec);
  auto root = XmlParser(svg).parse_document();
  EXPECT_EQ(root->tag, "svg");
  EXPECT_EQ(root->attrs.at("xmlns"), "http://www.w3.org/2000/svg");
  // One polyline per series, a marker per point, the given ticks exactly, 32 on the left.
  for (const Node* g : series_groups(*root)) {
    EXPECT_EQ(g->all("polyline").size(), 1u);
    EXPECT_EQ(g->all("circle").size() + g->all("rect").size() + g->all("polygon").size(), 5u);
  }
  const TickMap xm = tick_map(*root, "x-tick", AxisScale::log2);
  ASSERT_EQ(xm.ticks.size(), 5u);
  EXPECT_EQ(xm.ticks.front().first, 32);
  EXPECT_EQ(xm.ticks.back().first, 2);
  EXPECT_LT(xm.ticks.front().second, xm.ticks.back().second) << "x axis must be reversed";
  // Legend and labels carry the text.
  std::string all_text;
  for (const Node* t : root->all("text")) all_text += t->text + "\n";
  for (const auto& s : spec.series) EXPECT_NE(all_text.find(s.name + "\n"), std::string::npos) << s.name;
  for (const auto& s : {spec.title, spec.x_label, spec.y_label}) {
    EXPECT_NE(all_text.find(s), std::string::npos) << s;
  }
  // The batch-statistics line is dashed, the others solid; colours differ by default.
  const auto line = [&](const Node& r, size_t i) { return series_groups(r)[i]->all("polyline")[0]; };
  EXPECT_EQ(line(*root, 2)->attrs.count("stroke-dasharray"), 1u);
  EXPECT_EQ(line(*root, 0)->attrs.count("stroke-dasharray"), 0u);
  EXPECT_NE(line(*root, 2)->attrs.at("stroke"), line(*root, 0)->attrs.at("stroke"));
  EXPECT_NE(line(*root, 1)->attrs.at("stroke"), line(*root, 0)->attrs.at("stroke"));
  // A style index lets the dashed variant share the solid line's colour.
  PlotSpec shared = spec;
  shared.series[2].style = 0;
  auto shared_root = XmlParser(render_line_plot_svg(shared)).parse_document();
  EXPECT_EQ(line(*shared_root, 2)->attrs.at("stroke"), line(*shared_root, 0)->attrs.at("stroke"));
}

TEST(Plot, LossCurveWithLogYBreaksAtUndrawablePoints) {
  PlotSpec spec;
  spec.title = "loss";
  spec.x_label = "step";
  spec.y_label = "training loss";
  spec.y_scale = AxisScale::log10;
  PlotSeries bn{"BN", {}, {}}, none{"none", {}, {}};
  for (int i = 0; i < 333; ++i) {
    bn.x.push_back(i);
    bn.y.push_back(2.3 * std::exp(-i / 90.0) + 0.2);
    none.x.push_back(i);
    none.y.push_back(i == 100 ? 0.0 : i == 200 ? std::nan("") : i > 300 ? INFINITY : 2.3 + i * 0.05);
  }
  spec.series = {bn, none};
  const std::string svg = render_line_plot_svg(spec);
  expect_points_where_ticks_say(svg, spec);
  auto root = XmlParser(svg).parse_document();
  const auto groups = series_groups(*root);
  EXPECT_EQ(groups[0]->all("polyline").size(), 1u);
  EXPECT_EQ(groups[1]->all("polyline").size(), 3u) << "0 (log axis) and NaN each break the line";
  EXPECT_EQ(groups[0]->all("circle").size(), 0u) << "no markers on long series";
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  EXPECT_EQ(svg.find("inf"), std::string::npos);
}

TEST(Plot, LinearAxesAndDegenerateData) {
  PlotSpec spec;
  spec.x_label = "epoch";
  spec.series = {{"flat", {1, 2, 3, 4, 5, 6, 7}, {0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5}},
                 {"one point", {3}, {-2.25}},
                 {"empty", {}, {}}};
  const std::string svg = render_line_plot_svg(spec);
  expect_points_where_ticks_say(svg, spec);
  spec.series = {{"constant", {4, 4}, {7, 7}}};
  expect_points_where_ticks_say(render_line_plot_svg(spec), spec);
  spec.series.clear();  // axes only
  auto root = XmlParser(render_line_plot_svg(spec)).parse_document();
  EXPECT_TRUE(series_groups(*root).empty());
}

TEST(Plot, FixedYRangePinsTheAxisAndClipsTheLines) {
  PlotSpec spec = figure1();
  spec.y_min = 0;
  spec.y_max = 12;
  const std::string svg = render_line_plot_svg(spec);
  auto root = XmlParser(svg).parse_document();
  const Area area = plot_area(*root);
  const TickMap ym = tick_map(*root, "y-tick", AxisScale::linear);
  EXPECT_NEAR(ym.at(0), area.y + area.h, 0.02);
  EXPECT_NEAR(ym.at(12), area.y, 0.02);
  for (const auto& [v, p] : ym.ticks) {
    EXPECT_GE(v, 0);
    EXPECT_LE(v, 12);
  }
  for (const Node* g : series_groups(*root)) EXPECT_EQ(g->attrs.at("clip-path"), "url(#plot-clip)");
}

TEST(Plot, EscapesTextAndRejectsBadSpecs) {
  PlotSpec spec = figure1();
  spec.title = "a < b & \"c\" 'd'";
  spec.series[0].name = "BN <G=1> & co";
  const std::string svg = render_line_plot_svg(spec);
  auto root = XmlParser(svg).parse_document();
  EXPECT_EQ(root->all("text")[0]->text, spec.title);
  EXPECT_EQ(series_groups(*root)[0]->attrs.at("data-name"), spec.series[0].name);

  PlotSpec bad = figure1();
  bad.series[1].y.pop_back();
  EXPECT_THROW(render_line_plot_svg(bad), normkit::Error);
  bad = figure1();
  bad.width = 100;
  EXPECT_THROW(render_line_plot_svg(bad), normkit::Error);
  bad = figure1();
  bad.x_ticks.push_back(0);  // not on a log axis
  EXPECT_THROW(render_line_plot_svg(bad), normkit::Error);
  bad = figure1();
  bad.y_min = 5;
  bad.y_max = 5;
  EXPECT_THROW(render_line_plot_svg(bad), normkit::Error);
}

TEST_F(PlotFileTest, WritesTheFileAndPythonParsesIt) {
  const fs::path path = dir_ / "fig.svg";
  PlotSpec spec = figure1();
  spec.series[1].name = "GN & friends <8>";
  write_line_plot_svg(path.string(), spec);
  std::ifstream in(path);
  const std::string svg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(svg, render_line_plot_svg(spec));

  const std::string python = NORMKIT_TEST_PYTHON;
  if (python.empty() || !fs::exists(python)) GTEST_SKIP() << "no Python to cross-check the XML";
  // An independent XML parser: every series group, its polyline, and the legend names.
  const fs::path out = dir_ / "names.txt";
  const std::string script =
      "import sys, xml.etree.ElementTree as E\n"
      "ns = '{http://www.w3.org/2000/svg}'\n"
      "root = E.parse(sys.argv[1]).getroot()\n"
      "assert root.tag == ns + 'svg', root.tag\n"
      "with open(sys.argv[2], 'w') as f:\n"
      "    for g in root.iter(ns + 'g'):\n"
      "        if g.get('class') == 'series':\n"
      "            f.write(g.get('data-name') + '|' + str(len(g.findall(ns + 'polyline'))) + '\\n')\n";
  const fs::path script_path = dir_ / "check.py";
  std::ofstream(script_path) << script;
  const std::string cmd = python + " " + script_path.string() + " " + path.string() + " " + out.string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << "Python's XML parser rejected the SVG";
  std::ifstream names(out);
  std::string line;
  std::vector<std::string> got;
  while (std::getline(names, line)) got.push_back(line);
  std::vector<std::string> want;
  for (const auto& s : spec.series) want.push_back(s.name + "|1");
  EXPECT_EQ(got, want);
}

TEST_F(PlotFileTest, UnwritablePathIsAnIoError) {
  const std::string path = (dir_ / "missing" / "fig.svg").string();
  try {
    write_line_plot_svg(path, figure1());
    ADD_FAILURE();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos);
  }
}

}  // namespace
