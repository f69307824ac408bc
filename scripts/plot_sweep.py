#!/usr/bin/env python3
"""The figures of a `normkit-train sweep`, from the files it writes into its --out folder:

    /usr/bin/python3 scripts/plot_sweep.py OUT_DIR

reads OUT_DIR/results.csv (one row per run) and OUT_DIR/runs/*.json (each run's metrics and loss
curve) and writes, as PNG (150 dpi) and SVG:

  test_error_vs_batch     test error against images per device N (the GroupNorm paper's Figure 1:
                          log2 axis, 32 ... 2 left to right), one line per arm; when the sweep has
                          one N, against the column it varies instead (test_error_vs_groups,
                          test_error_vs_lr);
  loss_curves             training loss against epochs, one panel per norm, one line per setting.

Several seeds of a configuration make one point: their mean, with the sample standard deviation as
an error bar and each seed as a faint dot. Columns are read by name; optional ones may be missing
or empty. Needs matplotlib (Debian: python3-matplotlib).
"""

import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The columns that say what a run trained; every other column of results.csv is a measurement.
# `lr` is per run (base * devices * N / 32), so runs are grouped by the base rate instead, and
# seeds are the repetitions a point averages over. The studies' options are configuration too;
# files without their columns hold runs at their defaults.
CONFIGURATION = ("norm", "groups", "devices", "epochs", "lr_base", "init_scale", "dropout",
                 "weight_decay", "batch")
STUDY_DEFAULTS = {"init_scale": 1.0, "dropout": 0.0, "weight_decay": 1e-4}
INTEGER_COLUMNS = ("groups", "batch", "devices", "epochs", "seed", "sync_bn")
REQUIRED_COLUMNS = ("norm", "batch", "test_error")
# BatchNorm evaluated other ways than with its running statistics: dashed beside its line.
EXTRA_EVALUATIONS = {"test_error_batch_stats": "batch statistics",
                     "test_error_precise": "precise statistics"}
LINE_STYLES = {"test_error": "-", "test_error_batch_stats": "--",
               "test_error_precise": (0, (6, 2, 1, 2))}  # dash-dot
X_AXES = {  # the columns a test-error figure can run along, in order of preference
    "batch": ("images per device N", "test_error_vs_batch"),
    "groups": ("GroupNorm groups G", "test_error_vs_groups"),
    "lr_base": ("base learning rate (lr at 32 images per step)", "test_error_vs_lr"),
    "init_scale": ("initial weights times S", "test_error_vs_init_scale"),
}


class PlotError(Exception):
    """A sweep folder that cannot be plotted; the message names the file."""


@dataclass
class Run:
    config: dict                        # CONFIGURATION -> value (None when not given)
    seed: int | None
    values: dict                        # measurement column -> float (NaN when empty)
    diverged: bool                      # its training loss is not a finite number


@dataclass
class ErrorSeries:
    """One line of the test-error figure: per x, the values of the runs (seeds) at that x."""
    arm: str                            # the arm's label, which also picks its colour
    measure: str                        # "test_error" or one of EXTRA_EVALUATIONS
    label: str
    x: list = field(default_factory=list)
    seeds: list = field(default_factory=list)      # per x: the finite values
    diverged: list = field(default_factory=list)   # per x: the values of diverged runs
    level: bool = False                 # the arm has no x value (IN along G): a level across
    markers_only: bool = False          # SyncBN, or a single point: markers, no line

    @property
    def mean(self):
        return [statistics.fmean(v) if v else math.nan for v in self.seeds]

    @property
    def std(self):  # the sample standard deviation; NaN for a single seed
        return [statistics.stdev(v) if len(v) > 1 else math.nan for v in self.seeds]

    @property
    def n(self):
        return [len(v) for v in self.seeds]


@dataclass
class LossSeries:
    """One line of a loss panel: the mean over seeds per epoch, the band min..max."""
    label: str
    epochs: list
    mean: list
    low: list
    high: list
    seeds: int
    diverged: int                       # seeds whose loss stopped being finite


# ---- reading ------------------------------------------------------------------------------------

def number(text, where, column):
    if text is None or str(text).strip() == "":
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise PlotError(f"{where}: {column} is {text!r}, not a number") from None
    if column in INTEGER_COLUMNS and not value.is_integer():
        raise PlotError(f"{where}: {column} is {text!r}, not a whole number")
    return value


def significant(value, digits=6):
    """Rounded as results.csv writes numbers, so runs of one sweep compare equal."""
    return float(f"{value:.{digits}g}")


def make_run(fields, where):
    """A Run from one results.csv row or metrics JSON object (column -> text or number)."""
    norm = str(fields.get("norm") or "").strip()
    if not norm:
        raise PlotError(f"{where}: the norm is empty")
    known = {k: number(fields.get(k), where, k)
             for k in INTEGER_COLUMNS + ("lr",) + tuple(STUDY_DEFAULTS)}
    if fields.get("sync_bn") is True or known["sync_bn"] == 1:
        norm = "syncbn" if norm == "bn" else norm  # older files: sync_bn = 1 beside norm bn
    positive = lambda k: int(known[k]) if known[k] > 0 else None  # NaN > 0 is False
    batch, devices = positive("batch"), positive("devices") or 1
    if batch is None:
        raise PlotError(f"{where}: batch is {fields.get('batch')!r}, not a positive whole number")
    lr = known["lr"]
    config = {"norm": norm, "groups": positive("groups"), "devices": devices,
              "epochs": positive("epochs"), "batch": batch,
              "lr_base": None if math.isnan(lr) else significant(lr * 32 / (batch * devices))}
    for k, default in STUDY_DEFAULTS.items():
        config[k] = default if math.isnan(known[k]) else significant(known[k])
    config = {k: config[k] for k in CONFIGURATION}
    # Measurements: the known ones must be numbers; a column added later that is not is skipped.
    values = {}
    for k, v in fields.items():
        if k in known or k == "norm":
            continue
        try:
            values[k] = number(v, where, k)
        except PlotError:
            if k in REQUIRED_COLUMNS or k in EXTRA_EVALUATIONS or k in ("train_loss", "test_loss"):
                raise
    seed = None if math.isnan(known["seed"]) else int(known["seed"])
    return Run(config, seed, values, not math.isfinite(values.get("train_loss", 0.0)))


def read_results(folder):
    path = Path(folder) / "results.csv"
    if not path.is_file():
        raise PlotError(f"{path}: not found; is {folder} the --out folder of a "
                        "normkit-train sweep?")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise PlotError(f"{path}: empty, expected a header line")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise PlotError(f"{path}: line 1 lacks the column(s) {', '.join(missing)} "
                        f"(header: {','.join(header)})")
    runs = []
    for line_no, cells in enumerate(rows[1:], start=2):
        if not cells:
            continue
        if len(cells) != len(header):
            raise PlotError(f"{path}:{line_no}: {len(cells)} cells, expected {len(header)} "
                            "as in the header")
        runs.append(make_run(dict(zip(header, cells)), f"{path}:{line_no}"))
    if not runs:
        raise PlotError(f"{path}: no runs (only the header)")
    return runs


def read_loss_curves(folder):
    """(Run, epochs, losses) for every runs/*.json holding a loss curve or an epoch history."""
    curves = []
    for path in sorted((Path(folder) / "runs").glob("*.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PlotError(f"{path}: not a metrics JSON file ({e})") from None
        if not isinstance(metrics, dict) or "norm" not in metrics:
            raise PlotError(f"{path}: not a normkit-train metrics file (no \"norm\")")
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
        run = make_run({k: ("" if v is None else v) for k, v in scalars.items()}, str(path))
        curve, history = metrics.get("loss_curve") or {}, metrics.get("history") or {}
        as_float = lambda values: [math.nan if v is None else float(v) for v in values]
        steps, losses = curve.get("step") or [], as_float(curve.get("loss") or [])
        if steps and len(steps) == len(losses) and run.config["epochs"]:
            # The curve's points end at the run's last step (steps per epoch x epochs).
            per_epoch = metrics.get("steps_per_epoch") or steps[-1] / run.config["epochs"]
            curves.append((run, [s / per_epoch for s in steps], losses))
        elif history.get("epoch") and history.get("train_loss"):
            epochs = [float(e) for e in history["epoch"]]
            curves.append((run, epochs, as_float(history["train_loss"])))
    return curves


# ---- aggregating ---------------------------------------------------------------------------------

def distinct(values):
    return sorted({v for v in values if v is not None})


def x_column(runs):
    """The configuration column the test-error figure runs along."""
    for column in X_AXES:
        if len(distinct(r.config[column] for r in runs)) > 1:
            return column
    return "batch"


NORM_LABELS = {"bn": "BN", "syncbn": "SyncBN", "gn": "GN", "ln": "LN", "in": "IN", "none": "none",
               "gn+ws": "GN+WS", "frn": "FRN", "evonorm": "EvoNorm-S0", "brn": "BRN"}
GROUPED_NORMS = ("gn", "gn+ws", "evonorm")  # the norms that take --groups, as normkit-train's labels


def norm_label(norm, groups):
    label = NORM_LABELS.get(norm, norm.upper())
    return f"{label} (G={groups})" if norm in GROUPED_NORMS and groups else label


SETTING_TEXT = {"groups": "G={}", "devices": "{} devices", "epochs": "{} epochs",
                "lr_base": "lr base {:g}", "init_scale": "init x{:g}", "dropout": "dropout {:g}",
                "weight_decay": "wd {:g}", "batch": "N={}"}
# The configuration columns other than the norm and G that name a line when they vary.
SETTINGS = ("devices", "epochs", "lr_base", "init_scale", "dropout", "weight_decay", "batch")


def varying(runs, columns):
    return [c for c in columns if len(distinct(r.config[c] for r in runs)) > 1]


def setting(run, columns):
    return [SETTING_TEXT[c].format(run.config[c]) for c in columns if run.config[c] is not None]


def groups_of(runs, leave_out):
    """The runs by configuration without the columns left out (seed always): {key: [runs]}."""
    groups = {}
    for r in runs:
        groups.setdefault(tuple(v for k, v in r.config.items() if k not in leave_out), []).append(r)
    return groups


def test_error_series(runs, x):
    """The test-error figure's lines: per arm its test error, then BN's other evaluations."""
    shown = varying(runs, [c for c in SETTINGS if c != x])
    arms = groups_of(runs, leave_out=(x,)).values()
    series = []
    for measure in ("test_error", *EXTRA_EVALUATIONS):
        for members in arms:
            first = members[0].config
            if not any(math.isfinite(r.values.get(measure, math.nan)) for r in members):
                continue
            arm = ", ".join([norm_label(first["norm"], None if x == "groups" else first["groups"])]
                            + setting(members[0], shown))
            s = ErrorSeries(arm, measure, arm if measure == "test_error"
                            else f"{arm}, {EXTRA_EVALUATIONS[measure]}")
            finite = lambda rs: [v for v in (r.values.get(measure, math.nan) for r in rs)
                                 if math.isfinite(v)]
            for xv in sorted({r.config[x] for r in members}, key=lambda v: (v is None, v)):
                at = [r for r in members if r.config[x] == xv]
                s.x.append(xv)
                s.diverged.append(finite(r for r in at if r.diverged))
                # A diverged run's error (chance, 90 %) is a result: it counts in the mean.
                s.seeds.append(finite(r for r in at if not r.diverged) + s.diverged[-1])
            s.level = s.x == [None]
            s.markers_only = first["norm"] == "syncbn" or len(s.x) == 1
            series.append(s)
    return series


def curve_order(config):
    """Panels BN, SyncBN, GN, LN, IN, none, then others; in a panel N from large to small."""
    norms = list(NORM_LABELS)
    rank = norms.index(config["norm"]) if config["norm"] in norms else len(norms)
    return (rank, config["norm"], *((-v if k == "batch" else v) if v is not None else -math.inf
                                    for k, v in config.items() if k != "norm"))


def loss_series(curves):
    """Per norm (a panel), the lines over epochs: per setting the mean over seeds, band min..max."""
    curves = sorted(curves, key=lambda c: curve_order(c[0].config))
    panels = {}
    for norm in dict.fromkeys(r.config["norm"] for r, _, _ in curves):
        in_panel = [c for c in curves if c[0].config["norm"] == norm]
        shown = ["batch"] + varying([r for r, _, _ in in_panel],
                                    ("groups",) + tuple(c for c in SETTINGS if c != "batch"))
        settings = {}  # configuration -> its seeds' (run, epochs, losses)
        for c in in_panel:
            settings.setdefault(tuple(c[0].config.values()), []).append(c)
        lines = []
        for members in settings.values():
            # Seeds of one setting take the same steps; plot the epochs all of them reached.
            common = sorted(set.intersection(*(set(e) for _, e, _ in members)))
            at = [[dict(zip(e, y))[t] for _, e, y in members] for t in common]
            finite = lambda v: [y for y in v if math.isfinite(y)]
            lines.append(LossSeries(
                ", ".join(setting(members[0][0], shown)), common,
                # Where any seed's loss is not finite the mean is left out: the line stops.
                [statistics.fmean(v) if len(finite(v)) == len(v) else math.nan for v in at],
                [min(finite(v), default=math.nan) for v in at],
                [max(finite(v), default=math.nan) for v in at],
                len(members), sum(1 for _, _, y in members if not all(map(math.isfinite, y)))))
        panels[norm_label(norm, None)] = lines
    return panels


# ---- drawing -------------------------------------------------------------------------------------

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # SVG text stays text (small files, searchable); fixed element ids give the same file twice.
    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "normkit", "font.size": 9})
    return plt


def save(fig, folder, stem):
    written = []
    for ext, options in (("png", {"dpi": 150}), ("svg", {"metadata": {"Date": None}})):
        path = Path(folder) / f"{stem}.{ext}"
        fig.savefig(path, bbox_inches="tight", **options)
        written.append(str(path))
    return written


def seeds_caption(series):
    counts = sorted({n for s in series if s.measure == "test_error" for n in s.n if n})
    if counts == [1]:
        return "one seed per point"
    n = (f"n = {counts[0]}" if len(counts) == 1
         else f"n = {counts[0]}–{counts[-1]} (shown where it differs)")
    return f"mean over seeds ± sample standard deviation, {n} seeds; dots: single seeds"


def draw_test_error(series, x, folder):
    plt = pyplot()
    colours = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(s.arm for s in series))}
    counts = {n for s in series for n in s.n if n}
    fig, ax = plt.subplots(figsize=(7, 4.4))
    placed = [s for s in series if not s.level]
    for s in series:
        colour, extra = colours[s.arm], s.measure != "test_error"
        if s.level:  # no x value (IN along G): its mean as a level across the figure, ± sd
            ax.axhline(s.mean[0], color=colour, linestyle=":", label=f"{s.label} (level)")
            if s.n[0] > 1:
                ax.axhspan(s.mean[0] - s.std[0], s.mean[0] + s.std[0], color=colour, alpha=0.1,
                           linewidth=0)
            continue
        bars = [0 if math.isnan(d) else d for d in s.std]
        ax.errorbar(s.x, s.mean, yerr=bars if any(bars) else None, label=s.label, color=colour,
                    marker="o", markersize=5, capsize=3,
                    markerfacecolor="white" if extra else colour,
                    linestyle="none" if s.markers_only else LINE_STYLES[s.measure])
        for xv, values, bad in zip(s.x, s.seeds, s.diverged):
            if len(values) > 1:
                ax.scatter([xv] * len(values), values, color=colour, alpha=0.25, s=12, linewidths=0)
            if bad:
                ax.scatter([xv] * len(bad), bad, color=colour, marker="x", s=40, zorder=3)
                ax.annotate("diverged", (xv, bad[0]), textcoords="offset points", xytext=(4, 4),
                            color=colour, fontsize=7)
        if len(counts) > 1 and not extra:
            for xv, m, n in zip(s.x, s.mean, s.n):
                ax.annotate(f"n={n}", (xv, m), textcoords="offset points", xytext=(4, -10),
                            fontsize=7)
    axis_label, stem = X_AXES[x]
    ticks = distinct(v for s in placed for v in s.x)
    ax.set_xscale("log", base=10 if x in ("lr_base", "init_scale") else 2)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    if x == "batch":
        ax.invert_xaxis()  # 32 on the left, as the GroupNorm paper's Figure 1
    ax.set_xlabel(axis_label)
    ax.set_ylabel("test error (%)")
    ax.set_title(f"Test error vs {axis_label}\n({seeds_caption(series)})", fontsize=9)
    if any(any(s.diverged) for s in series):
        ax.scatter([], [], color="grey", marker="x",
                   label="diverged run (training loss not finite)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("diverged run"))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7)
    written = save(fig, folder, stem)
    plt.close(fig)
    return written


def draw_loss_curves(panels, folder):
    plt = pyplot()
    from matplotlib.ticker import FormatStrFormatter
    colours = {}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels) + 1, 3.6), sharey=True,
                             squeeze=False)
    several = any(line.seeds > 1 for lines in panels.values() for line in lines)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for line in lines:
            colour = colours.setdefault(line.label, f"C{len(colours)}")
            shown = [(e, m) for e, m in zip(line.epochs, line.mean) if math.isfinite(m) and m > 0]
            label = line.label + (f" ({line.diverged} of {line.seeds} diverged)"
                                  if line.diverged else "")
            ax.plot(line.epochs, line.mean, color=colour, label=label, linewidth=1)
            if line.seeds > 1:
                ax.fill_between(line.epochs, line.low, line.high, color=colour, alpha=0.2,
                                linewidth=0)
            if line.diverged and shown:  # where the loss stopped being a number
                ax.plot(*shown[-1], marker="x", color=colour, markersize=7)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss")
    fig.suptitle("Training loss" + (" (mean over seeds; band: min–max)" if several else ""),
                 fontsize=10)
    written = save(fig, folder, "loss_curves")
    plt.close(fig)
    return written


def main(argv):
    if len(argv) != 2 or argv[1].startswith("-"):
        print("usage: " + __doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    folder = argv[1]
    try:  # every file is read before the first figure is written
        runs = read_results(folder)
        curves = read_loss_curves(folder)
    except PlotError as e:
        print(f"plot_sweep.py: {e}", file=sys.stderr)
        return 1
    x = x_column(runs)
    written = draw_test_error(test_error_series(runs, x), x, folder)
    if curves:
        written += draw_loss_curves(loss_series(curves), folder)
    else:
        print(f"plot_sweep.py: no loss curves: {folder}/runs/ has no metrics JSON", file=sys.stderr)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
