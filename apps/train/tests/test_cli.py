"""normkit-train's command line end to end, on a tiny MNIST-format dataset written here: a sweep
over a grid of norms, group counts and base learning rates writes one run per grid point with
the right settings and the tables, from which scripts/plot_sweep.py draws the figures; bad option
combinations fail with a message. Run by ctest with NORMKIT_TRAIN set to the executable."""

import csv
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from tiny_mnist import write_dataset

TRAIN = os.environ.get("NORMKIT_TRAIN", "build/bin/normkit-train")
PLOT_SWEEP = Path(__file__).resolve().parents[3] / "scripts" / "plot_sweep.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("mnist"), seed=0, train_images=48,
                         test_images=16)


def train(*args):
    return subprocess.run([TRAIN, *map(str, args)], capture_output=True, text=True, timeout=600)


SMALL = ["--epochs", "1", "--widths", "4,4,4", "--threads", "1", "--quiet"]


def test_sweep_trains_every_point_of_the_grid(data_dir, tmp_path):
    out = tmp_path / "grid"
    r = train("sweep", "--norms", "gn,in", "--groups", "1,2,4", "--lr-base", "0.1,0.8",
              "--batches", "8", "--data", data_dir, "--out", out, "--jobs", "2", *SMALL)
    assert r.returncode == 0, r.stderr
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    got = sorted((row["norm"], row["groups"], float(row["lr"]) * 32 / int(row["batch"])) for row in rows)
    want = sorted([("gn", str(g), lr) for g in (1, 2, 4) for lr in (0.1, 0.8)] +
                  [("in", "", lr) for lr in (0.1, 0.8)])
    assert [(n, g) for n, g, _ in got] == [(n, g) for n, g, _ in want]
    assert np.allclose([lr for *_, lr in got], [lr for *_, lr in want])

    # Each run's own metrics file, named for its grid point, holds the settings it trained with.
    for g in (1, 2, 4):
        for lr in ("0.1", "0.8"):
            m = json.loads((out / "runs" / f"gn_g{g}_lr{lr}_b8.json").read_text())
            assert (m["norm"], m["groups"], m["batch"]) == ("gn", g, 8)
            assert m["lr"] == pytest.approx(float(lr) * 8 / 32)
    assert (out / "runs" / "in_lr0.8_b8.json").exists()

    md = (out / "results.md").read_text()
    assert "| GN (G=2), lr base 0.8 |" in md
    assert "| IN, lr base 0.1 |" in md
    assert "## Training loss of the last epoch" in md
    # The sweep writes no figures; scripts/plot_sweep.py draws them from its folder: with one
    # batch size and several group counts, test error along G, and one loss line per run.
    assert not list(out.glob("*.svg"))
    pytest.importorskip("matplotlib")
    r = subprocess.run([sys.executable, str(PLOT_SWEEP), str(out)], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr
    for stem in ("test_error_vs_groups", "loss_curves"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert ET.parse(out / f"{stem}.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert not (out / "test_error_vs_batch.png").exists()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sweep_resume_keeps_finished_runs_and_trains_the_rest(data_dir, tmp_path, jobs):
    out = tmp_path / "resume"
    grid = ["--norms", "bn,gn", "--groups", "2", "--data", data_dir, "--out", out, "--jobs", jobs,
            *SMALL]
    r = train("sweep", "--batches", "8", *grid)
    assert r.returncode == 0, r.stderr
    runs = out / "runs"

    def metrics(name):  # the losses and errors, without the timings
        m = json.loads((runs / f"{name}.json").read_text())
        m["history"] = {k: v for k, v in m["history"].items() if k not in ("seconds", "images_per_s")}
        return {k: v for k, v in m.items() if k not in ("seconds", "images_per_s")}
    first = metrics("gn_b8")
    args = (runs / "bn_b8.args").read_text().splitlines()
    assert args[:3] == ["run", "--norm", "bn"] and "--metrics-out" not in args
    # An interrupted sweep: GN's run had not finished (no .args), and a new batch size is asked.
    (runs / "gn_b8.args").unlink()
    (runs / "gn_b8.json").write_text("{}")  # a leftover that must not be read
    for stale in runs.glob("*.json"):
        os.utime(stale, (1, 1))
    r = train("sweep", "--batches", "8,4", "--resume", *grid)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("finished by an earlier sweep") == 1, r.stdout
    assert "bn_b8.json" in r.stdout
    assert (runs / "bn_b8.json").stat().st_mtime == 1  # read, not written
    assert metrics("gn_b8") == first  # trained again, to the same result
    for name in ("bn_b4", "gn_b4", "gn_b8"):
        assert (runs / f"{name}.args").exists()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((row["norm"], row["batch"]) for row in rows) == [
        ("bn", "4"), ("bn", "8"), ("gn", "4"), ("gn", "8")]
    # A matching .args beside metrics that cannot be read: that run is trained again. The thread
    # count is not compared (it changes no bit of a run).
    (runs / "bn_b4.json").write_text("{")
    two_threads = [*grid[:-len(SMALL)], "--epochs", "1", "--widths", "4,4,4", "--threads", "2",
                   "--quiet"]
    r = train("sweep", "--batches", "8,4", "--resume", *two_threads)
    assert r.returncode == 0, r.stderr
    assert "bn_b4.args marks a finished run, but its metrics cannot be read" in r.stdout, r.stdout
    assert r.stdout.count("finished by an earlier sweep") == 3, r.stdout
    assert json.loads((runs / "bn_b4.json").read_text())["batch"] == 4
    assert "2" == (runs / "bn_b4.args").read_text().split("--threads\n")[1].splitlines()[0]
    # Other arguments (here the epochs) make every run a new one: nothing is kept.
    r = train("sweep", "--batches", "8", "--resume", *grid[:-len(SMALL)], "--epochs", "2",
              *SMALL[2:])
    assert r.returncode == 0, r.stderr
    assert "finished by an earlier sweep" not in r.stdout
    assert json.loads((runs / "bn_b8.json").read_text())["epochs"] == 2


def test_single_run_matches_the_same_point_of_a_sweep(data_dir, tmp_path):
    out = tmp_path / "one"
    r = train("sweep", "--norms", "gn", "--groups", "2", "--lr-base", "0.4", "--batches", "8",
              "--data", data_dir, "--out", out, "--jobs", "1", *SMALL)
    assert r.returncode == 0, r.stderr
    swept = json.loads((out / "runs" / "gn_b8.json").read_text())
    r = train("run", "--norm", "gn", "--groups", "2", "--lr-base", "0.4", "--batch", "8",
              "--data", data_dir, "--metrics-out", tmp_path / "run.json", *SMALL)
    assert r.returncode == 0, r.stderr
    alone = json.loads((tmp_path / "run.json").read_text())
    for key in ("train_loss", "test_loss", "test_error", "lr", "groups"):
        assert alone[key] == swept[key], key


@pytest.mark.parametrize("option,values", [("--groups", "2,4"), ("--lr-base", "0.1,0.2")])
def test_run_refuses_a_list(data_dir, tmp_path, option, values):
    r = train("run", "--norm", "gn", option, values, "--data", data_dir, *SMALL)
    assert r.returncode == 2
    assert f"run takes one {option} value, got 2" in r.stderr


def test_sweep_names_a_group_count_that_does_not_divide_a_width(data_dir, tmp_path):
    r = train("sweep", "--norms", "gn", "--groups", "2,3", "--batches", "8", "--data", data_dir,
              "--out", tmp_path / "bad", *SMALL)
    assert r.returncode != 0
    assert "--groups 3 is refused for the 4 channels of stem.norm" in r.stderr
    assert "num_groups = 3 must divide the number of channels C = 4" in r.stderr  # normkit's reason


# Pre-flight: what cannot finish fails at once, naming the option, before any training (no
# progress, no summary line, within seconds) and without leaving files.
@pytest.mark.parametrize("args,needle", [
    (["--metrics-out", "/nonexistent/dir/m.json"], "--metrics-out /nonexistent/dir/m.json: the folder"),
    (["--checkpoint", "/nonexistent/dir/c.safetensors"], "--checkpoint /nonexistent/dir/c.safetensors"),
    (["--blocks-per-stage", "100000"], "--blocks-per-stage (100000)"),
    (["--blocks-per-stage", "100000", "--widths", "16,32,64"], "--blocks-per-stage (100000)"),
    (["--widths", "2000000000,4"], "--widths (2000000000,4)"),
    (["--batch", "49"], "--batch 49 is larger than the 48 training images"),
    (["--batch", "20", "--limit-train", "10"], "that --limit-train 10 leaves"),
    (["--groups", "3"], "--groups 3 is refused for the 4 channels"),
])
def test_run_refuses_before_training(data_dir, args, needle):
    # List options add to each other: the defaults here only where the case sets none.
    base = ["--epochs", "1", "--threads", "1", "--quiet"]
    base += [] if "--widths" in args else ["--widths", "4,4,4"]
    base += [] if "--groups" in args else ["--groups", "2"]
    t0 = time.monotonic()
    r = train("run", "--norm", "gn", "--data", data_dir, *base, *args)
    assert r.returncode in (1, 2), r.stderr
    assert needle in r.stderr
    assert r.stdout == ""  # no summary: nothing trained
    assert time.monotonic() - t0 < 30


def test_run_refuses_outputs_that_clash_or_are_folders(data_dir, tmp_path):
    r = train("run", "--data", data_dir, "--metrics-out", tmp_path, *SMALL)
    assert r.returncode == 1 and "is a folder" in r.stderr
    same = tmp_path / "x"
    r = train("run", "--data", data_dir, "--metrics-out", same, "--checkpoint", same, *SMALL)
    assert r.returncode == 2 and "name the same file" in r.stderr
    assert list(tmp_path.iterdir()) == []  # the probes left nothing


def test_memory_estimate_is_checked_against_what_is_available(data_dir):
    env = dict(os.environ, NORMKIT_TRAIN_AVAILABLE_MEMORY=str(8 << 20))
    r = subprocess.run([TRAIN, "run", "--data", str(data_dir), "--batch", "32", *SMALL],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert "of memory is available; lower --batch (32)" in r.stderr


def test_sweep_checks_every_run_before_the_first(data_dir, tmp_path):
    out = tmp_path / "s"
    r = train("sweep", "--norms", "gn", "--groups", "2", "--batches", "8,64", "--data", data_dir,
              "--out", out, "--jobs", "1", *SMALL)
    assert r.returncode == 2
    assert "--batch 64 is larger than the 48 training images" in r.stderr
    assert not out.exists()  # nothing created, nothing trained
    (tmp_path / "file").write_text("x")
    r = train("sweep", "--norms", "gn", "--groups", "2", "--batches", "8", "--data", data_dir,
              "--out", tmp_path / "file" / "s", *SMALL)
    assert r.returncode == 1 and "--out" in r.stderr and "not a folder" in r.stderr


def test_run_names_a_group_count_below_one(data_dir):
    r = train("run", "--norm", "gn", "--groups", "0", "--data", data_dir, *SMALL)
    assert r.returncode != 0
    assert "--groups 0 is refused" in r.stderr and "num_groups must be > 0, got 0" in r.stderr


def test_run_records_augmentation_warm_up_and_precise_statistics(data_dir, tmp_path):
    r = train("run", "--norm", "bn", "--batch", "4", "--data", data_dir, "--crop-pad", "3", "--hflip",
              "--warmup", "0.25", "--precise-bn-images", "40", "--precise-bn-batch", "8",
              "--metrics-out", tmp_path / "m.json", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "precise statistics:" in r.stdout  # the end-of-run summary
    m = json.loads((tmp_path / "m.json").read_text())
    assert (m["crop_pad"], m["hflip"], m["lr_warmup"]) == (3, True, 0.25)
    assert 0 <= m["test_error_precise"] <= 100
    assert m["lr"] == pytest.approx(0.1 * 4 / 32)  # the scaled rate, warm-up or not
    # Without the options: none of their fields; BN computes precise statistics by default.
    r = train("run", "--norm", "bn", "--batch", "4", "--data", data_dir,
              "--metrics-out", tmp_path / "plain.json", *SMALL)
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert not {"crop_pad", "hflip", "lr_warmup"} & plain.keys()
    assert plain["test_error_precise"] is not None
    r = train("run", "--norm", "bn", "--batch", "4", "--data", data_dir, "--precise-bn-images", "0",
              "--metrics-out", tmp_path / "off.json", *SMALL)
    assert "test_error_precise" not in json.loads((tmp_path / "off.json").read_text())


@pytest.mark.parametrize("args,needle", [
    (["--warmup", "1.5"], "--warmup 1.5: must be a fraction of all steps in [0, 1)"),
    (["--precise-bn-batch", "1"], "--precise-bn-batch 1: must be >= 2"),
    (["--crop-pad", "-1"], "--crop-pad: must be zero or positive, got '-1'"),
])
def test_run_refuses_bad_protocol_options(data_dir, args, needle):
    r = train("run", "--norm", "bn", "--data", data_dir, *SMALL, *args)
    assert r.returncode != 0, r.stderr
    assert needle in r.stderr, r.stderr


def test_help_describes_the_protocol_options():
    for sub, options in (("run", ("--crop-pad", "--hflip", "--warmup", "--precise-bn-images",
                                  "--precise-bn-batch")),
                         ("sweep", ("--seeds", "syncbn", "--crop-pad", "--warmup", "--init-scale",
                                    "--dropout", "--weight-decay", "--eval-train-images",
                                    "--classes"))):
        r = train(sub, "--help")
        assert r.returncode == 0
        for o in options:
            assert o in r.stdout, (sub, o)


def test_sweep_over_seeds_reports_each_run_and_the_time_left(data_dir, tmp_path):
    out = tmp_path / "seeds"
    r = train("sweep", "--norms", "bn,gn", "--groups", "2", "--batches", "8", "--seeds", "1,2,3",
              "--data", data_dir, "--out", out, "--jobs", "2", *SMALL)
    assert r.returncode == 0, r.stderr
    with open(out / "results.csv") as f:
        header = f.readline().strip()
        rows = list(csv.DictReader(open(out / "results.csv")))
    assert header == ("norm,groups,devices,batch,epochs,lr,seed,train_loss,test_loss,test_error,"
                      "test_error_batch_stats,test_error_precise,images_per_s,seconds,sync_bn,"
                      "train_error_eval,train_loss_eval")
    assert sorted((row["norm"], row["seed"]) for row in rows) == \
        sorted((n, s) for n in ("bn", "gn") for s in ("1", "2", "3"))
    for s in (1, 2, 3):
        assert json.loads((out / "runs" / f"gn_b8_s{s}.json").read_text())["seed"] == s
    # Not a terminal: one line per finished run, k of n, with an estimate of the time left.
    lines = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert len(lines) == 6, r.stderr
    assert sorted(int(line[1:line.index("/")]) for line in lines) == list(range(1, 7))
    assert all("/6] " in line and ": test error " in line and "elapsed" in line for line in lines)
    assert lines[-1].endswith("about 0:00 left"), lines[-1]
    # summary.csv: a row per cell with the moments over the three seeds.
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [(s["norm"], s["n"]) for s in summary] == [("bn", "3"), ("gn", "3")]
    for s in summary:
        errors = [float(row["test_error"]) for row in rows if row["norm"] == s["norm"]]
        assert float(s["test_error_mean"]) == pytest.approx(np.mean(errors), rel=1e-5)
        assert float(s["test_error_std"]) == pytest.approx(np.std(errors, ddof=1), rel=1e-5, abs=1e-4)
        assert float(s["test_error_min"]) == pytest.approx(min(errors), rel=1e-5)
        assert float(s["test_error_max"]) == pytest.approx(max(errors), rel=1e-5)
    md = (out / "results.md").read_text()
    assert "± sample std over n seeds" in md and "(n=3)" in md and "## Every run" in md
    assert "seeds 1, 2, 3" in md


def test_sweep_seed_means_one_seed_and_not_with_seeds(data_dir, tmp_path):
    out = tmp_path / "one"
    r = train("sweep", "--norms", "gn", "--groups", "2", "--batches", "8", "--seed", "7",
              "--data", data_dir, "--out", out, "--jobs", "1", *SMALL)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "runs" / "gn_b8.json").read_text())["seed"] == 7
    assert "[1/1] gn G=2 b=8 lr=0.1: test error" in r.stderr
    r = train("sweep", "--norms", "gn", "--groups", "2", "--batches", "8", "--seed", "7", "--seeds", "1,2",
              "--data", data_dir, "--out", tmp_path / "both", *SMALL)
    assert r.returncode == 2 and "--seeds or --seed, not both" in r.stderr


def test_sweep_takes_the_study_options_as_axes(data_dir, tmp_path):
    out = tmp_path / "study"
    study = ["--classes", "0,1,2,3,4", "--eval-train-images", "16", "--weight-decay", "0"]
    r = train("sweep", "--norms", "bn,none", "--batches", "8", "--init-scale", "0.5,2",
              "--dropout", "0,0.5", "--seeds", "1,2", *study, "--data", data_dir, "--out", out,
              "--jobs", "2", *SMALL)
    assert r.returncode == 0, r.stderr
    with open(out / "results.csv") as f:
        header = f.readline().strip()
    # The three columns at the end: the earlier ones keep their places.
    assert header == ("norm,groups,devices,batch,epochs,lr,seed,train_loss,test_loss,test_error,"
                      "test_error_batch_stats,test_error_precise,images_per_s,seconds,sync_bn,"
                      "train_error_eval,train_loss_eval,init_scale,dropout,weight_decay")
    rows = list(csv.DictReader(open(out / "results.csv")))
    grid = [(n, s, p, seed) for n in ("bn", "none") for s in ("0.5", "2") for p in ("0", "0.5")
            for seed in ("1", "2")]
    assert sorted((r["norm"], r["init_scale"], r["dropout"], r["seed"]) for r in rows) == sorted(grid)
    assert all(r["weight_decay"] == "0" and r["train_error_eval"] != "" for r in rows)
    # Each run's file is named for its point and records the options; the plain ones go to every run.
    for n, s, p, seed in grid:
        m = json.loads((out / "runs" / f"{n}_init{s}_dropout{p}_b8_s{seed}.json").read_text())
        assert (m["init_scale"], m.get("dropout", 0), m["weight_decay"]) == (float(s), float(p), 0)
        assert m["classes"] == [0, 1, 2, 3, 4] and m["eval_train_images"] == 16
    # The tables and summary.csv: a row per (norm, init scale, dropout), the mean over two seeds.
    md = (out / "results.md").read_text()
    assert "| BN, init scale 0.5, dropout 0.5 |" in md and "| none, init scale 2, dropout 0 |" in md
    assert "weight decay 0," in md and "Classes 0,1,2,3,4 only." in md
    assert "## Train/test gap" in md
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert len(summary) == 8 and all(s["n"] == "2" for s in summary)
    for s in summary:
        errors = [float(r["test_error"]) for r in rows
                  if (r["norm"], r["init_scale"], r["dropout"]) == (s["norm"], s["init_scale"], s["dropout"])]
        assert float(s["test_error_mean"]) == pytest.approx(np.mean(errors), rel=1e-5)
    # A point of the grid trained alone, by `run` and by a sweep in this process, gives the same bits.
    swept = json.loads((out / "runs" / "bn_init2_dropout0.5_b8_s2.json").read_text())
    point = ["--init-scale", "2", "--dropout", "0.5", "--seed", "2", *study]
    r = train("run", "--norm", "bn", "--batch", "8", *point, "--data", data_dir,
              "--metrics-out", tmp_path / "alone.json", *SMALL)
    assert r.returncode == 0, r.stderr
    r = train("sweep", "--norms", "bn", "--batches", "8", *point, "--data", data_dir,
              "--out", tmp_path / "inline", "--jobs", "1", *SMALL)
    assert r.returncode == 0, r.stderr
    for other in (json.loads((tmp_path / "alone.json").read_text()),
                  json.loads((tmp_path / "inline" / "runs" / "bn_b8.json").read_text())):
        for key in ("train_loss", "test_loss", "test_error", "train_error_eval", "lr"):
            assert other[key] == swept[key], key
    # plot_sweep.py draws the init-scale axis.
    pytest.importorskip("matplotlib")
    r = subprocess.run([sys.executable, str(PLOT_SWEEP), str(out)], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr
    assert (out / "test_error_vs_init_scale.png").exists()


def test_sweep_without_study_options_starts_its_runs_as_before(data_dir, tmp_path):
    out = tmp_path / "plain"
    r = train("sweep", "--norms", "bn", "--batches", "8", "--data", data_dir, "--out", out,
              "--jobs", "2", *SMALL)
    assert r.returncode == 0, r.stderr
    log = (out / "runs" / "bn_b8.log").read_text()
    md = (out / "results.md").read_text()
    assert "init scale" not in md and "Initial weights" not in md and "Dropout" not in md
    m = json.loads((out / "runs" / "bn_b8.json").read_text())
    for key in ("init_scale", "dropout", "weight_decay", "eval_train_images", "classes"):
        assert key not in m, (key, log)
    assert "weight decay 1e-4," in md


@pytest.mark.parametrize("args,needle", [
    (["--init-scale", "1,0"], "--init-scale"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--dropout", "0,1"], "dropout"),
    (["--classes", "0,0"], "--classes"),
])
def test_sweep_refuses_bad_study_options_by_name(data_dir, tmp_path, args, needle):
    r = train("sweep", "--norms", "bn", "--batches", "8", *args, "--data", data_dir,
              "--out", tmp_path / "bad", *SMALL)
    assert r.returncode != 0 and needle in r.stderr, r.stderr
    assert not (tmp_path / "bad" / "results.csv").exists()


def test_sweep_trains_the_newer_arms_on_two_devices(data_dir, tmp_path):
    out = tmp_path / "arms"
    r = train("sweep", "--norms", "gn+ws,frn,evonorm", "--groups", "2", "--batches", "4",
              "--devices", "2", "--data", data_dir, "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr
    with open(out / "results.csv") as f:
        rows = {row["norm"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["evonorm", "frn", "gn+ws"]
    assert (rows["gn+ws"]["groups"], rows["frn"]["groups"], rows["evonorm"]["groups"]) == ("2", "", "2")
    for norm in rows:
        assert rows[norm]["devices"] == "2"
        m = json.loads((out / "runs" / f"{norm}_b4.json").read_text())
        assert m["norm"] == norm
        assert np.isfinite(m["train_loss"])
    md = (out / "results.md").read_text()
    for label in ("| GN+WS (G=2)", "| FRN", "| EvoNorm-S0 (G=2)"):
        assert label in md


@pytest.mark.parametrize("args,needle", [
    (["sweep", "--norms", "frn,gnws", "--batches", "8"], "the norm must be bn, gn, ln, in, none, gn+ws, frn, evonorm"),
    (["run", "--norm", "evonorm", "--groups", "3"], "--groups 3 is refused for the 4 channels of stem.norm"),
    (["run", "--norm", "gn+ws", "--groups", "3"], "--groups 3 is refused for the 4 channels of stem.norm"),
    (["run", "--norm", "frn", "--sync-bn"], "--sync-bn"),
    (["run", "--norm", "ws"], "--norm: ws not in {bn,gn,ln,in,none,frozen,gn+ws,frn,evonorm,brn}"),
])
def test_the_newer_arms_refuse_bad_options(data_dir, tmp_path, args, needle):
    r = train(*args, "--data", data_dir, "--out" if args[0] == "sweep" else "--quiet",
              *([tmp_path / "o"] if args[0] == "sweep" else []), "--epochs", "1",
              "--widths", "4,4,4", "--threads", "1")
    assert r.returncode != 0, r.stderr
    assert needle in r.stderr, r.stderr
    assert r.stdout == "" or "Error" not in r.stdout


def test_run_help_says_where_frn_and_evonorm_drop_their_nonlinearity():
    r = train("run", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for needle in ("gn+ws", "FRN without the TLU before each residual add",
                   "x / group_std * gamma + beta"):
        assert needle in text


def test_sweep_trains_brn_on_two_devices_with_its_options(data_dir, tmp_path):
    out = tmp_path / "brn"
    r = train("sweep", "--norms", "bn,brn", "--batches", "4", "--devices", "2",
              "--renorm-r-max", "2", "--renorm-warmup", "0.5",
              "--data", data_dir, "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr
    with open(out / "results.csv") as f:
        rows = {row["norm"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["bn", "brn"]
    assert rows["brn"]["devices"] == "2" and rows["brn"]["groups"] == ""
    m = json.loads((out / "runs" / "brn_b4.json").read_text())
    assert m["norm"] == "brn" and np.isfinite(m["train_loss"])
    assert (m["renorm_r_max"], m["renorm_d_max"], m["renorm_warmup"]) == (2, 5, 0.5)
    # Evaluated as bn is: with running statistics, with batch statistics and precise statistics.
    assert np.isfinite(m["test_error_batch_stats"]) and "test_error_precise" in m
    # bn's run takes none of brn's options.
    assert not {"renorm_r_max", "renorm_d_max", "renorm_warmup"} & json.loads(
        (out / "runs" / "bn_b4.json").read_text()).keys()
    md = (out / "results.md").read_text()
    assert "| BRN (per device)" in md and "| BN (per device)" in md


@pytest.mark.parametrize("args,needle", [
    (["run", "--norm", "brn", "--renorm-r-max", "0.5"], "--renorm-r-max 0.5: must be a number >= 1"),
    (["run", "--norm", "brn", "--renorm-d-max", "-1"], "--renorm-d-max -1: must be a number >= 0"),
    (["run", "--norm", "brn", "--renorm-warmup", "1.5"], "--renorm-warmup 1.5: must be a fraction"),
    (["run", "--norm", "brn", "--renorm-warmup", "-0.25"], "--renorm-warmup -0.25: must be a fraction"),
    (["run", "--norm", "bn", "--renorm-r-max", "3"], "--renorm-r-max 3 with --norm bn"),
    (["run", "--norm", "brn", "--sync-bn", "--devices", "2"], "--sync-bn with --norm brn"),
    (["sweep", "--norms", "bn,gn", "--batches", "8", "--renorm-d-max", "2"],
     "--renorm-d-max 2 without a brn arm"),
])
def test_brn_refuses_bad_options_by_name(data_dir, tmp_path, args, needle):
    r = train(*args, "--data", data_dir, "--out" if args[0] == "sweep" else "--quiet",
              *([tmp_path / "o"] if args[0] == "sweep" else []), "--epochs", "1",
              "--widths", "4,4,4", "--threads", "1")
    assert r.returncode != 0, r.stderr
    assert needle in r.stderr, r.stderr


def test_run_help_names_brn_momentum_and_warmup():
    r = train("run", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for needle in ("brn: Batch Renormalization", "--renorm-r-max", "momentum 0.1",
                   "--renorm-warmup", "Ioffe 2017"):
        assert needle in text
