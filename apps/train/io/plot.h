#pragma once
// A small SVG line-plot writer for the experiment's figures: test error against batch size (the
// GroupNorm paper's Figure 1: log2 x axis, reversed so 32 is on the left, one line per
// normalization) and loss curves (x = step or epoch, optionally log y). SVG is text, so no
// plotting library is needed; any browser or rsvg-convert renders it.
#include <optional>
#include <string>
#include <vector>

namespace normkit::train {

enum class AxisScale { linear, log2, log10 };

struct PlotSeries {
  std::string name;       // shown in the legend
  std::vector<double> x;  // same length as y
  std::vector<double> y;
  bool dashed = false;    // e.g. BN evaluated with batch statistics beside the solid BN line
  int style = -1;         // colour and marker index; -1: the series' position (so a dashed
                          // variant can share its solid line's colour)
};

struct PlotSpec {
  std::string title;
  std::string x_label;
  std::string y_label;
  std::vector<PlotSeries> series;  // drawn in order, colors and marker shapes cycle
  AxisScale x_scale = AxisScale::linear;
  AxisScale y_scale = AxisScale::linear;
  bool x_reversed = false;         // larger x on the left (batch 32 ... 2)
  std::vector<double> x_ticks;     // exactly these x ticks (e.g. the batch sizes); empty: automatic
  std::optional<double> y_min;     // fixed y range; otherwise rounded out from the data
  std::optional<double> y_max;
  bool markers = true;             // a marker per point (not for series over 60 points)
  int width = 680;                 // whole image, pixels
  int height = 440;
};

// Returns the SVG document for `spec`. Points that cannot be drawn (NaN, infinity, or <= 0 on a
// log axis, e.g. a diverged loss) are left out and break their line. Lines are clipped to the
// plot area when a fixed y range cuts them. The plot area is the element
// <rect class="plot-area">, each series a <g class="series"> holding one <polyline> per unbroken
// run of points; ticks are <g class="x-tick"> / <g class="y-tick"> with their label as text.
// Throws normkit::Error when a series' x and y differ in length, width < 240 or height < 160,
// x_ticks holds a non-finite value (or one <= 0 on a log axis), or y_min >= y_max.
std::string render_line_plot_svg(const PlotSpec& spec);

// Writes render_line_plot_svg(spec) to `path`, replacing it whole (see write_text_file). Throws
// what render throws, and IoError naming the path when the file cannot be written.
void write_line_plot_svg(const std::string& path, const PlotSpec& spec);

}  // namespace normkit::train
