#include "io/plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "io/text_file.h"
#include "normkit/error.h"

namespace normkit::train {
namespace {

// Matplotlib's "tab10": distinct, and readable for most colour-blind viewers with the markers.
constexpr const char* kPalette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
constexpr int kMaxMarkedPoints = 60;
constexpr double kCharWidth = 7.0;  // average glyph width of the 12 px sans-serif labels
constexpr size_t kMaxLegendChars = 40;

bool drawable(double v, AxisScale scale) {
  return std::isfinite(v) && (scale == AxisScale::linear || v > 0);
}

double to_axis(double v, AxisScale scale) {
  switch (scale) {
    case AxisScale::log2: return std::log2(v);
    case AxisScale::log10: return std::log10(v);
    case AxisScale::linear: break;
  }
  return v;
}

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

std::string px(double v) { return fmt("%.2f", v); }

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        // Control characters are not allowed in XML 1.0.
        if (static_cast<unsigned char>(c) >= 0x20 || c == '\t' || c == '\n') out += c;
    }
  }
  return out;
}

// A 1-2-2.5-5 step giving about `target` intervals over `range`.
double nice_step(double range, int target) {
  const double raw = range / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0}) {
    if (raw <= m * mag * (1 + 1e-9)) return m * mag;
  }
  return 10 * mag;
}

struct Axis {
  AxisScale scale = AxisScale::linear;
  double lo = 0, hi = 1;       // domain in axis units (log2/log10 of values on log axes)
  std::vector<double> ticks;   // values (not axis units)
  std::vector<std::string> labels;

  // Fraction 0..1 of the way from lo to hi.
  double fraction(double value) const { return (to_axis(value, scale) - lo) / (hi - lo); }
};

// Tick candidates for a log axis covering [lo, hi] in axis units.
std::vector<double> log_candidates(AxisScale scale, double lo, double hi) {
  std::vector<double> out;
  const double span = hi - lo;
  if (scale == AxisScale::log2) {
    const int every = span > 12 ? 2 : 1;
    for (int k = static_cast<int>(std::floor(lo)) - 1; k <= static_cast<int>(std::ceil(hi)) + 1; ++k) {
      if (k % every == 0) out.push_back(std::exp2(k));
    }
    return out;
  }
  std::vector<double> mantissas = {1};
  if (span <= 1) mantissas = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  else if (span <= 2.5) mantissas = {1, 2, 5};
  const int every = span > 10 ? 2 : 1;
  for (int e = static_cast<int>(std::floor(lo)) - 1; e <= static_cast<int>(std::ceil(hi)) + 1; ++e) {
    if (e % every != 0) continue;
    for (double m : mantissas) out.push_back(m * std::pow(10.0, e));
  }
  return out;
}

// Builds an axis over `values` (all drawable). `fixed_*` pin the ends exactly; `explicit_ticks`
// replace the automatic ones. Unpinned ends are rounded out to a tick and padded a little so
// markers do not sit on the frame.
Axis make_axis(AxisScale scale, const std::vector<double>& values,
               const std::vector<double>& explicit_ticks, std::optional<double> fixed_lo,
               std::optional<double> fixed_hi) {
  Axis axis;
  axis.scale = scale;
  std::vector<double> t;
  for (double v : values) t.push_back(to_axis(v, scale));
  for (double v : explicit_ticks) t.push_back(to_axis(v, scale));
  double lo = t.empty() ? 0.0 : *std::min_element(t.begin(), t.end());
  double hi = t.empty() ? 1.0 : *std::max_element(t.begin(), t.end());
  if (fixed_lo) lo = to_axis(*fixed_lo, scale);
  if (fixed_hi) hi = to_axis(*fixed_hi, scale);
  if (hi - lo < 1e-12 * std::max(1.0, std::abs(lo))) {  // one value: give it some room
    const double half = scale == AxisScale::linear ? std::max(0.5, std::abs(lo) * 0.1) : 0.5;
    if (!fixed_lo) lo -= half;
    if (!fixed_hi) hi += half;
    if (hi <= lo) hi = lo + 2 * half;
  }

  double step = 0;
  std::vector<double> candidates;
  if (!explicit_ticks.empty()) {
    candidates = explicit_ticks;
  } else if (scale == AxisScale::linear) {
    step = nice_step(hi - lo, 5);
    if (!fixed_lo) lo = std::floor(lo / step + 1e-9) * step;
    if (!fixed_hi) hi = std::ceil(hi / step - 1e-9) * step;
    for (double k = std::ceil(lo / step - 1e-9); k <= std::floor(hi / step + 1e-9); ++k) {
      candidates.push_back(k * step == 0 ? 0.0 : k * step);  // no "-0"
    }
  } else {
    candidates = log_candidates(scale, lo, hi);
    // Round unpinned ends out to the nearest candidate so the axis starts and ends on a tick.
    double below = lo, above = hi;
    bool found_above = false;
    for (double c : candidates) {  // ascending
      const double tc = to_axis(c, scale);
      if (tc <= lo + 1e-9) below = tc;
      if (tc >= hi - 1e-9 && !found_above) above = tc, found_above = true;
    }
    if (!fixed_lo) lo = below;
    if (!fixed_hi) hi = above;
  }
  const double pad = 0.04 * (hi - lo);
  if (!fixed_lo) lo -= pad;
  if (!fixed_hi) hi += pad;
  axis.lo = lo;
  axis.hi = hi;

  int decimals = 0;
  if (step > 0) {
    decimals = std::max(0, -static_cast<int>(std::floor(std::log10(step) + 1e-9)));
    if (std::abs(step / std::pow(10.0, std::floor(std::log10(step) + 1e-9)) - 2.5) < 1e-6) ++decimals;
  }
  for (double c : candidates) {
    const double tc = to_axis(c, scale);
    if (tc < lo - 1e-9 || tc > hi + 1e-9) continue;
    axis.ticks.push_back(c);
    axis.labels.push_back(step > 0 ? fmt(("%." + std::to_string(decimals) + "f").c_str(), c)
                                   : fmt("%g", c));
  }
  return axis;
}

void validate(const PlotSpec& spec) {
  if (spec.width < 240 || spec.height < 160) {
    throw Error("write_line_plot_svg: size " + std::to_string(spec.width) + "x" +
                std::to_string(spec.height) + " is below the 240x160 minimum");
  }
  for (const auto& s : spec.series) {
    if (s.x.size() != s.y.size()) {
      throw Error("write_line_plot_svg: series \"" + s.name + "\" has " +
                  std::to_string(s.x.size()) + " x values but " + std::to_string(s.y.size()) +
                  " y values");
    }
  }
  for (double t : spec.x_ticks) {
    if (!drawable(t, spec.x_scale)) {
      throw Error("write_line_plot_svg: x tick " + fmt("%g", t) + " cannot be placed on the " +
                  (spec.x_scale == AxisScale::linear ? "linear" : "log") + " x axis");
    }
  }
  for (const auto& bound : {spec.y_min, spec.y_max}) {
    if (bound && !drawable(*bound, spec.y_scale)) {
      throw Error("write_line_plot_svg: y range bound " + fmt("%g", *bound) +
                  " cannot be placed on the y axis");
    }
  }
  if (spec.y_min && spec.y_max && !(*spec.y_min < *spec.y_max)) {
    throw Error("write_line_plot_svg: y_min " + fmt("%g", *spec.y_min) + " must be below y_max " +
                fmt("%g", *spec.y_max));
  }
}

// A marker of shape `index` % 4 (circle, square, triangle, diamond) centred on (x, y); hollow
// ones mark dashed series that share a colour with a solid one.
std::string marker(int index, bool hollow, double x, double y, const char* color) {
  const std::string fill = hollow ? std::string(" fill=\"white\" stroke=\"") + color +
                                        "\" stroke-width=\"1.5\""
                                  : std::string(" fill=\"") + color + "\"";
  switch (index % 4) {
    case 0:
      return "<circle cx=\"" + px(x) + "\" cy=\"" + px(y) + "\" r=\"3.5\"" + fill + "/>";
    case 1:
      return "<rect x=\"" + px(x - 3.2) + "\" y=\"" + px(y - 3.2) +
             "\" width=\"6.4\" height=\"6.4\"" + fill + "/>";
    case 2:
      return "<polygon points=\"" + px(x) + "," + px(y - 4.2) + " " + px(x + 4) + "," +
             px(y + 3) + " " + px(x - 4) + "," + px(y + 3) + "\"" + fill + "/>";
    default:
      return "<polygon points=\"" + px(x) + "," + px(y - 4.5) + " " + px(x + 4.5) + "," + px(y) +
             " " + px(x) + "," + px(y + 4.5) + " " + px(x - 4.5) + "," + px(y) + "\"" + fill + "/>";
  }
}

int style_of(const PlotSeries& s, size_t position) {
  return s.style >= 0 ? s.style : static_cast<int>(position);
}

std::string legend_name(const std::string& name) {
  return name.size() <= kMaxLegendChars ? name : name.substr(0, kMaxLegendChars - 3) + "...";
}

}  // namespace

std::string render_line_plot_svg(const PlotSpec& spec) {
  validate(spec);

  std::vector<double> xs, ys;
  for (const auto& s : spec.series) {
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (drawable(s.x[i], spec.x_scale) && drawable(s.y[i], spec.y_scale)) {
        xs.push_back(s.x[i]);
        ys.push_back(s.y[i]);
      }
    }
  }
  const Axis xa = make_axis(spec.x_scale, xs, spec.x_ticks, std::nullopt, std::nullopt);
  const Axis ya = make_axis(spec.y_scale, ys, {}, spec.y_min, spec.y_max);

  // Margins follow the text they hold.
  size_t y_label_chars = 0, legend_chars = 0;
  for (const auto& l : ya.labels) y_label_chars = std::max(y_label_chars, l.size());
  for (const auto& s : spec.series) legend_chars = std::max(legend_chars, legend_name(s.name).size());
  const double left = 34 + kCharWidth * static_cast<double>(y_label_chars) + 10;
  const double legend_width = spec.series.empty() ? 0 : 52 + kCharWidth * static_cast<double>(legend_chars);
  const double right = 16 + legend_width;
  const double top = spec.title.empty() ? 20 : 40;
  const double bottom = 56;
  const double plot_w = std::max(60.0, spec.width - left - right);
  const double plot_h = std::max(60.0, spec.height - top - bottom);
  const double width = left + plot_w + right;

  auto map_x = [&](double v) {
    const double f = xa.fraction(v);
    return left + (spec.x_reversed ? 1 - f : f) * plot_w;
  };
  auto map_y = [&](double v) { return top + (1 - ya.fraction(v)) * plot_h; };

  std::string svg;
  svg += "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  svg += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + px(width) + "\" height=\"" +
         std::to_string(spec.height) + "\" viewBox=\"0 0 " + px(width) + " " +
         std::to_string(spec.height) +
         "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"12\">\n";
  svg += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  svg += "<defs><clipPath id=\"plot-clip\"><rect x=\"" + px(left) + "\" y=\"" + px(top) +
         "\" width=\"" + px(plot_w) + "\" height=\"" + px(plot_h) + "\"/></clipPath></defs>\n";
  if (!spec.title.empty()) {
    svg += "<text class=\"title\" x=\"" + px(left + plot_w / 2) +
           "\" y=\"24\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">" +
           escape(spec.title) + "</text>\n";
  }

  // Grid and ticks.
  svg += "<g class=\"x-ticks\">\n";
  for (size_t i = 0; i < xa.ticks.size(); ++i) {
    const double x = map_x(xa.ticks[i]);
    svg += "<g class=\"x-tick\"><line x1=\"" + px(x) + "\" y1=\"" + px(top) + "\" x2=\"" + px(x) +
           "\" y2=\"" + px(top + plot_h) + "\" stroke=\"#e6e6e6\"/><line x1=\"" + px(x) +
           "\" y1=\"" + px(top + plot_h) + "\" x2=\"" + px(x) + "\" y2=\"" + px(top + plot_h + 5) +
           "\" stroke=\"#333\"/><text x=\"" + px(x) + "\" y=\"" + px(top + plot_h + 19) +
           "\" text-anchor=\"middle\">" + escape(xa.labels[i]) + "</text></g>\n";
  }
  svg += "</g>\n<g class=\"y-ticks\">\n";
  for (size_t i = 0; i < ya.ticks.size(); ++i) {
    const double y = map_y(ya.ticks[i]);
    svg += "<g class=\"y-tick\"><line x1=\"" + px(left) + "\" y1=\"" + px(y) + "\" x2=\"" +
           px(left + plot_w) + "\" y2=\"" + px(y) + "\" stroke=\"#e6e6e6\"/><line x1=\"" +
           px(left - 5) + "\" y1=\"" + px(y) + "\" x2=\"" + px(left) + "\" y2=\"" + px(y) +
           "\" stroke=\"#333\"/><text x=\"" + px(left - 8) + "\" y=\"" + px(y + 4) +
           "\" text-anchor=\"end\">" + escape(ya.labels[i]) + "</text></g>\n";
  }
  svg += "</g>\n";
  svg += "<rect class=\"plot-area\" x=\"" + px(left) + "\" y=\"" + px(top) + "\" width=\"" +
         px(plot_w) + "\" height=\"" + px(plot_h) + "\" fill=\"none\" stroke=\"#333\"/>\n";
  if (!spec.x_label.empty()) {
    svg += "<text class=\"x-label\" x=\"" + px(left + plot_w / 2) + "\" y=\"" +
           px(spec.height - 12) + "\" text-anchor=\"middle\" font-size=\"13\">" +
           escape(spec.x_label) + "</text>\n";
  }
  if (!spec.y_label.empty()) {
    const double cy = top + plot_h / 2;
    svg += "<text class=\"y-label\" x=\"18\" y=\"" + px(cy) + "\" transform=\"rotate(-90 18 " +
           px(cy) + ")\" text-anchor=\"middle\" font-size=\"13\">" + escape(spec.y_label) +
           "</text>\n";
  }

  // Series: one polyline per unbroken run of drawable points.
  for (size_t si = 0; si < spec.series.size(); ++si) {
    const PlotSeries& s = spec.series[si];
    const int style = style_of(spec.series[si], si);
    const char* color = kPalette[style % std::size(kPalette)];
    const std::string dash = s.dashed ? " stroke-dasharray=\"7 4\"" : "";
    svg += "<g class=\"series\" data-name=\"" + escape(s.name) + "\" clip-path=\"url(#plot-clip)\">\n";
    std::string run, marks;
    int run_points = 0;
    auto flush = [&] {
      if (run_points > 0) {
        svg += "<polyline points=\"" + run + "\" fill=\"none\" stroke=\"" + color +
               "\" stroke-width=\"2\" stroke-linejoin=\"round\"" + dash + "/>\n";
      }
      run.clear();
      run_points = 0;
    };
    const bool mark = spec.markers && s.x.size() <= static_cast<size_t>(kMaxMarkedPoints);
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!drawable(s.x[i], spec.x_scale) || !drawable(s.y[i], spec.y_scale)) {
        flush();
        continue;
      }
      const double x = map_x(s.x[i]), y = map_y(s.y[i]);
      if (run_points) run += ' ';
      run += px(x);
      run += ',';
      run += px(y);
      ++run_points;
      if (mark) marks += marker(style, s.dashed, x, y, color) + "\n";
    }
    flush();
    svg += marks + "</g>\n";
  }

  // Legend, right of the plot area.
  if (!spec.series.empty()) {
    const double lx = left + plot_w + 16;
    svg += "<g class=\"legend\">\n";
    for (size_t si = 0; si < spec.series.size(); ++si) {
      const int style = style_of(spec.series[si], si);
      const char* color = kPalette[style % std::size(kPalette)];
      const double ly = top + 12 + 20.0 * static_cast<double>(si);
      svg += "<line x1=\"" + px(lx) + "\" y1=\"" + px(ly) + "\" x2=\"" + px(lx + 28) + "\" y2=\"" +
             px(ly) + "\" stroke=\"" + color + "\" stroke-width=\"2\"" +
             (spec.series[si].dashed ? " stroke-dasharray=\"7 4\"" : "") + "/>\n";
      if (spec.markers && spec.series[si].x.size() <= static_cast<size_t>(kMaxMarkedPoints)) {
        svg += marker(style, spec.series[si].dashed, lx + 14, ly, color) + "\n";
      }
      svg += "<text x=\"" + px(lx + 36) + "\" y=\"" + px(ly + 4) + "\">" +
             escape(legend_name(spec.series[si].name)) + "</text>\n";
    }
    svg += "</g>\n";
  }
  svg += "</svg>\n";
  return svg;
}

void write_line_plot_svg(const std::string& path, const PlotSpec& spec) {
  write_text_file(path, render_line_plot_svg(spec));
}

}  // namespace normkit::train
