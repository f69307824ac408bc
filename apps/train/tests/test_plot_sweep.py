"""scripts/plot_sweep.py on sweep folders written here: several seeds, one seed, SyncBN at one N,
results.csv with columns missing or reordered, the older sync_bn column, a diverged run, group and
learning-rate grids, and broken files. The aggregated series (what the figures draw) are checked
against means and sample standard deviations computed here with numpy from the values written;
the figures are checked to be valid PNG (150 dpi) and SVG naming what they show."""

import importlib.util
import json
import math
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "plot_sweep.py"
spec = importlib.util.spec_from_file_location("plot_sweep", SCRIPT)
plot_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_sweep)

# The layout other versions of the trainer write: devices after groups, BN's precise statistics
# after its batch statistics, a column this script does not know at the end.
HEADER = ("norm,groups,devices,batch,epochs,lr,seed,train_loss,test_loss,test_error,"
          "test_error_batch_stats,test_error_precise,images_per_s,seconds,peak_memory_mb").split(",")
TRAIN_IMAGES = 960


def cell(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v)


def write_sweep(folder, rows, header=HEADER, curves=None):
    """results.csv with `header` (a row's missing keys are empty cells) and, for each row with a
    curve, runs/<i>.json as normkit-train writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(cell(r.get(c)) for c in header) for r in rows]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    for i, r in enumerate(rows):
        if curves is None or curves[i] is None:
            continue
        (folder / "runs").mkdir(exist_ok=True)
        steps, losses = curves[i]
        metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        metrics["groups"] = metrics.get("groups") or 0
        metrics["loss_curve"] = {"step": steps,
                                 "loss": [None if math.isnan(l) else l for l in losses]}
        metrics["history"] = {"epoch": list(range(1, r["epochs"] + 1))}
        (folder / "runs" / f"{r['norm']}_{i}.json").write_text(json.dumps(metrics, indent=2))
    return folder


def make_row(rng, norm, batch, seed, devices=1, lr_base=0.1, groups=None, epochs=2):
    row = {"norm": norm, "groups": groups or (8 if norm == "gn" else None), "devices": devices,
           "batch": batch, "epochs": epochs, "lr": lr_base * devices * batch / 32, "seed": seed,
           # Values with few digits, so that the CSV text holds them exactly.
           "train_loss": round(rng.uniform(0.2, 1.5), 4), "test_loss": round(rng.uniform(0.2, 1), 4),
           "test_error": round(rng.uniform(5, 25), 2), "images_per_s": round(rng.uniform(50, 900), 1),
           "seconds": 12.5, "peak_memory_mb": 31}
    if norm in ("bn", "syncbn"):
        row["test_error_batch_stats"] = round(rng.uniform(5, 25), 2)
        row["test_error_precise"] = round(rng.uniform(5, 25), 2)
    return row


def make_curve(rng, row, points=8):
    total = TRAIN_IMAGES // (row["batch"] * row["devices"]) * row["epochs"]
    steps = [k * total // points for k in range(1, points + 1)]
    return steps, list(np.round(rng.uniform(0.3, 2.3, points), 4))


def expected(rows, measure="test_error", **where):
    """The finite values of `measure` over the rows matching `where`, their mean and sample sd."""
    v = np.array([r[measure] for r in rows if all(r.get(k) == w for k, w in where.items())
                  and r.get(measure) is not None and np.isfinite(r[measure])])
    return v, v.mean(), (v.std(ddof=1) if len(v) > 1 else math.nan)


def find(series, label):
    matches = [s for s in series if s.label == label]
    assert len(matches) == 1, [s.label for s in series]
    return matches[0]


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 200
    phys = data.index(b"pHYs")  # pixels per metre: 150 dpi
    per_metre = struct.unpack(">I", data[phys + 4:phys + 8])[0]
    assert per_metre == round(150 / 0.0254)


def svg_text(path):
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg", path
    return " ".join(t for e in root.iter() for t in [e.text] if t)


def check_figures(folder, stems):
    for stem in stems:
        check_png(folder / f"{stem}.png")
        svg_text(folder / f"{stem}.svg")


def run_script(folder):
    return subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True,
                          timeout=240)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture
def seeds_sweep(rng, tmp_path):
    """BN, GN at N = 32, 8, 2 on 4 devices, three seeds; SyncBN at N = 2 only; every run a curve."""
    rows = [make_row(rng, norm, batch, seed, devices=4)
            for norm in ("bn", "gn") for batch in (32, 8, 2) for seed in (1, 2, 3)]
    rows += [make_row(rng, "syncbn", 2, seed, devices=4) for seed in (1, 2, 3)]
    curves = [make_curve(rng, r) for r in rows]
    return write_sweep(tmp_path / "seeds", rows, curves=curves), rows, curves


def test_several_seeds_give_mean_and_sample_sd_per_point(seeds_sweep):
    folder, rows, _ = seeds_sweep
    runs = plot_sweep.read_results(folder)
    assert plot_sweep.x_column(runs) == "batch"
    series = plot_sweep.test_error_series(runs, "batch")
    assert [s.label for s in series] == [
        "BN", "GN (G=8)", "SyncBN", "BN, batch statistics", "SyncBN, batch statistics",
        "BN, precise statistics", "SyncBN, precise statistics"]
    for label, norm, measure in (("BN", "bn", "test_error"), ("GN (G=8)", "gn", "test_error"),
                                 ("BN, batch statistics", "bn", "test_error_batch_stats"),
                                 ("BN, precise statistics", "bn", "test_error_precise")):
        s = find(series, label)
        assert s.x == [2, 8, 32] and not s.markers_only and s.arm == label.split(",")[0]
        for i, batch in enumerate(s.x):
            values, mean, sd = expected(rows, measure, norm=norm, batch=batch)
            assert sorted(s.seeds[i]) == sorted(values)
            assert s.n[i] == 3
            assert s.mean[i] == pytest.approx(mean, rel=1e-12)
            assert s.std[i] == pytest.approx(sd, rel=1e-12)
    sync = find(series, "SyncBN")  # one N: markers
    values, mean, sd = expected(rows, norm="syncbn")
    assert sync.x == [2] and sync.markers_only
    assert sync.mean[0] == pytest.approx(mean, rel=1e-12)
    assert sync.std[0] == pytest.approx(sd, rel=1e-12)


def test_several_seeds_give_loss_bands(seeds_sweep):
    folder, rows, curves = seeds_sweep
    panels = plot_sweep.loss_series(plot_sweep.read_loss_curves(folder))
    assert list(panels) == ["BN", "SyncBN", "GN"]
    assert [line.label for line in panels["BN"]] == ["N=32", "N=8", "N=2"]
    for panel, norm in (("BN", "bn"), ("GN", "gn"), ("SyncBN", "syncbn")):
        for line in panels[panel]:
            batch = int(line.label[2:])
            mine = [c for r, c in zip(rows, curves) if r["norm"] == norm and r["batch"] == batch]
            losses = np.array([c[1] for c in mine])
            steps_per_epoch = TRAIN_IMAGES // (batch * 4)
            assert line.epochs == pytest.approx(np.array(mine[0][0]) / steps_per_epoch)
            assert line.epochs[-1] == pytest.approx(2.0)  # two epochs
            assert line.mean == pytest.approx(losses.mean(axis=0), rel=1e-12)
            assert line.low == pytest.approx(losses.min(axis=0))
            assert line.high == pytest.approx(losses.max(axis=0))
            assert (line.seeds, line.diverged) == (3, 0)


def test_several_seeds_draw_both_figures(seeds_sweep):
    pytest.importorskip("matplotlib")
    folder, _, _ = seeds_sweep
    r = run_script(folder)
    assert r.returncode == 0, r.stderr
    check_figures(folder, ("test_error_vs_batch", "loss_curves"))
    text = svg_text(folder / "test_error_vs_batch.svg")
    for needle in ("sample standard deviation", "n = 3", "SyncBN", "BN, precise statistics",
                   "images per device N"):
        assert needle in text
    assert "band" in svg_text(folder / "loss_curves.svg")


def test_one_seed_has_no_error_bars(rng, tmp_path):
    rows = [make_row(rng, norm, batch, 1) for norm in ("bn", "gn") for batch in (16, 4)]
    folder = write_sweep(tmp_path / "one", rows, curves=[make_curve(rng, r) for r in rows])
    series = plot_sweep.test_error_series(plot_sweep.read_results(folder), "batch")
    for s in series:
        assert s.n == [1, 1] and all(math.isnan(d) for d in s.std)
    assert find(series, "GN (G=8)").mean == [r["test_error"] for r in rows[3:1:-1]]
    assert plot_sweep.seeds_caption(series) == "one seed per point"
    pytest.importorskip("matplotlib")
    assert run_script(folder).returncode == 0
    check_figures(folder, ("test_error_vs_batch", "loss_curves"))
    text = svg_text(folder / "test_error_vs_batch.svg")
    assert "one seed per point" in text and "standard deviation" not in text


def test_uneven_seed_counts_are_shown_and_figures_repeat_exactly(rng, tmp_path):
    # Three seeds at N = 2, two at N = 8 (a sweep stopped early): n per point, stated.
    rows = [make_row(rng, "gn", 2, seed) for seed in (1, 2, 3)]
    rows += [make_row(rng, "gn", 8, seed) for seed in (1, 2)]
    folder = write_sweep(tmp_path / "uneven", rows, curves=[make_curve(rng, r) for r in rows])
    (s,) = plot_sweep.test_error_series(plot_sweep.read_results(folder), "batch")
    assert s.n == [3, 2]
    assert s.std == pytest.approx([expected(rows, batch=b)[2] for b in (2, 8)], rel=1e-12)
    assert "n = 2–3" in plot_sweep.seeds_caption([s])
    pytest.importorskip("matplotlib")
    assert run_script(folder).returncode == 0
    assert "n=2" in svg_text(folder / "test_error_vs_batch.svg")
    first = {p.name: p.read_bytes() for p in folder.glob("*.[ps][nv]g")}
    assert len(first) == 4
    assert run_script(folder).returncode == 0
    assert {p.name: p.read_bytes() for p in folder.glob("*.[ps][nv]g")} == first


def test_missing_columns_and_empty_cells(rng, tmp_path):
    # The fewest columns, in another order, no runs/ folder; GN without a group count.
    rows = [make_row(rng, norm, batch, None) for norm in ("gn", "bn") for batch in (2, 32)]
    folder = write_sweep(tmp_path / "few", rows, header=["test_error", "batch", "norm"])
    runs = plot_sweep.read_results(folder)
    assert [r.config["lr_base"] for r in runs] == [None] * 4
    series = plot_sweep.test_error_series(runs, "batch")
    assert [s.label for s in series] == ["GN", "BN"]
    assert find(series, "BN").mean == [rows[2]["test_error"], rows[3]["test_error"]]
    assert plot_sweep.read_loss_curves(folder) == []
    pytest.importorskip("matplotlib")
    r = run_script(folder)
    assert r.returncode == 0, r.stderr
    assert "no loss curves" in r.stderr
    check_figures(folder, ("test_error_vs_batch",))
    assert not (folder / "loss_curves.png").exists()


def test_older_sync_bn_column_means_syncbn(rng, tmp_path):
    header = ("norm,groups,batch,epochs,lr,seed,train_loss,test_loss,test_error,"
              "test_error_batch_stats,images_per_s,seconds,devices,sync_bn").split(",")
    rows = [dict(make_row(rng, "bn", b, 1, devices=2), sync_bn=s) for b in (8, 4) for s in (0, 1)]
    folder = write_sweep(tmp_path / "older", rows, header=header)
    series = plot_sweep.test_error_series(plot_sweep.read_results(folder), "batch")
    assert [s.label for s in series][:2] == ["BN", "SyncBN"]
    assert find(series, "SyncBN").mean == [rows[3]["test_error"], rows[1]["test_error"]]
    assert find(series, "SyncBN").markers_only and not find(series, "BN").markers_only


def test_diverged_run_is_drawn_and_labelled(rng, tmp_path):
    # BN and no normalization over base learning rates at one N; none diverges at 0.5.
    rows, curves = [], []
    for norm in ("bn", "none"):
        for lr in (0.02, 0.1, 0.5):
            rows.append(make_row(rng, norm, 32, 1, lr_base=lr, epochs=1))
            curves.append(make_curve(rng, rows[-1]))
    rows[5].update(train_loss=math.nan, test_loss=math.inf, test_error=90.0)
    curves[5][1][3:] = [math.nan] * 5
    folder = write_sweep(tmp_path / "lr", rows, curves=curves)
    runs = plot_sweep.read_results(folder)
    assert plot_sweep.x_column(runs) == "lr_base"
    assert [r.diverged for r in runs] == [False] * 5 + [True]
    none = find(plot_sweep.test_error_series(runs, "lr_base"), "none")
    assert none.x == [0.02, 0.1, 0.5]
    assert none.diverged == [[], [], [90.0]] and none.mean[2] == 90.0

    line = plot_sweep.loss_series(plot_sweep.read_loss_curves(folder))["none"][2]
    assert (line.label, line.seeds, line.diverged) == ("N=32, lr base 0.5", 1, 1)
    assert line.mean[:3] == pytest.approx(curves[5][1][:3])
    assert all(math.isnan(m) for m in line.mean[3:])

    pytest.importorskip("matplotlib")
    r = run_script(folder)
    assert r.returncode == 0, r.stderr
    check_figures(folder, ("test_error_vs_lr", "loss_curves"))
    assert "diverged" in svg_text(folder / "test_error_vs_lr.svg")
    assert "1 of 1 diverged" in svg_text(folder / "loss_curves.svg")


def test_groups_grid_runs_along_groups_with_other_norms_as_levels(rng, tmp_path):
    rows = [make_row(rng, "gn", 32, seed, groups=g) for g in (16, 1, 4) for seed in (1, 2)]
    rows += [make_row(rng, "in", 32, seed) for seed in (1, 2)]
    folder = write_sweep(tmp_path / "groups", rows)
    runs = plot_sweep.read_results(folder)
    assert plot_sweep.x_column(runs) == "groups"
    series = plot_sweep.test_error_series(runs, "groups")
    gn, level = find(series, "GN"), find(series, "IN")
    assert gn.x == [1, 4, 16]
    want = [expected(rows, norm="gn", groups=g)[1] for g in gn.x]
    assert gn.mean == pytest.approx(want, rel=1e-12)
    assert level.level and level.mean[0] == pytest.approx(expected(rows, norm="in")[1], rel=1e-12)
    pytest.importorskip("matplotlib")
    assert run_script(folder).returncode == 0
    check_figures(folder, ("test_error_vs_groups",))


STUDY_HEADER = HEADER + ["init_scale", "dropout", "weight_decay"]


def test_init_scale_grid_runs_along_the_scale(rng, tmp_path):
    rows = [dict(make_row(rng, norm, 32, seed), init_scale=scale, dropout=0, weight_decay=0.0001)
            for norm in ("bn", "none") for scale in (10, 0.1, 1) for seed in (1, 2, 3)]
    folder = write_sweep(tmp_path / "init", rows, header=STUDY_HEADER)
    runs = plot_sweep.read_results(folder)
    assert plot_sweep.x_column(runs) == "init_scale"
    series = plot_sweep.test_error_series(runs, "init_scale")
    for norm, label in (("bn", "BN"), ("none", "none")):
        s = find(series, label)
        assert s.x == [0.1, 1, 10]
        assert s.mean == pytest.approx([expected(rows, norm=norm, init_scale=x)[1] for x in s.x], rel=1e-12)
        assert s.std == pytest.approx([expected(rows, norm=norm, init_scale=x)[2] for x in s.x], rel=1e-9)
    pytest.importorskip("matplotlib")
    assert run_script(folder).returncode == 0
    check_figures(folder, ("test_error_vs_init_scale",))


def test_dropout_and_weight_decay_make_lines_of_their_own(rng, tmp_path):
    rows = [dict(make_row(rng, "bn", 32, seed), init_scale=1, dropout=p, weight_decay=w)
            for p in (0, 0.5) for w in (0, 0.0005) for seed in (1, 2)]
    # Metrics files leave out options at their defaults: those runs are still dropout 0.
    curves = [make_curve(rng, r) for r in rows]
    folder = write_sweep(tmp_path / "reg", rows, header=STUDY_HEADER, curves=curves)
    for path in (folder / "runs").glob("*.json"):
        m = json.loads(path.read_text())
        if m["dropout"] == 0:
            del m["dropout"]
        path.write_text(json.dumps(m))
    runs = plot_sweep.read_results(folder)
    series = plot_sweep.test_error_series(runs, plot_sweep.x_column(runs))
    for p in (0, 0.5):
        for w in (0, 0.0005):
            s = find(series, f"BN, dropout {p:g}, wd {w:g}")
            assert s.mean == pytest.approx([expected(rows, dropout=p, weight_decay=w)[1]], rel=1e-12)
    panels = plot_sweep.loss_series(plot_sweep.read_loss_curves(folder))
    assert sorted(line.label for line in panels["BN"]) == sorted(
        f"N=32, dropout {p:g}, wd {w:g}" for p in (0, 0.5) for w in (0, 0.0005))
    assert all(line.seeds == 2 for line in panels["BN"])


@pytest.mark.parametrize("content,needle", [
    (None, "results.csv: not found"),
    ("", "results.csv: empty"),
    ("norm,batch\nbn,2\n", "line 1 lacks the column(s) test_error"),
    ("norm,batch,test_error\nbn,2\n", "results.csv:2: 2 cells, expected 3"),
    ("norm,batch,test_error\nbn,2,12\nbn,2,twelve\n",
     "results.csv:3: test_error is 'twelve', not a number"),
    ("norm,batch,test_error\nbn,2.5,12\n", "results.csv:2: batch is '2.5', not a whole number"),
    ("norm,batch,test_error\nbn,,12\n", "results.csv:2: batch is '', not a positive whole number"),
    ("norm,batch,test_error\n", "results.csv: no runs"),
    ("norm,batch,test_error\n,2,12\n", "results.csv:2: the norm is empty"),
])
def test_broken_results_csv_is_named(tmp_path, capsys, content, needle):
    if content is not None:
        (tmp_path / "results.csv").write_text(content)
    assert plot_sweep.main(["plot_sweep.py", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert needle in err and str(tmp_path) in err
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("content,needle", [
    ('{"norm": "bn", "batch": ', "bn_b2.json: not a metrics JSON file"),
    ('[1, 2]', "bn_b2.json: not a normkit-train metrics file"),
    ('{"norm": "bn", "batch": 0}', "bn_b2.json: batch is 0, not a positive whole number"),
])
def test_broken_metrics_json_is_named(rng, tmp_path, capsys, content, needle):
    folder = write_sweep(tmp_path / "j", [make_row(rng, "bn", 2, 1)])
    (folder / "runs").mkdir()
    (folder / "runs" / "bn_b2.json").write_text(content)
    assert plot_sweep.main(["plot_sweep.py", str(folder)]) == 1
    assert needle in capsys.readouterr().err
    assert not list(folder.glob("*.png"))  # nothing drawn from a folder that cannot all be read


def test_usage_without_a_folder():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "plot_sweep.py OUT_DIR" in r.stderr
