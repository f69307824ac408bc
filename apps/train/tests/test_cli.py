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
