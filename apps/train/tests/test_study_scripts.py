"""The studies' scripts end to end on a tiny MNIST-format dataset written here:
scripts/finetune_study.py (pretrain BN and GN on classes 0-4, fine-tune BN, frozen BN and GN on
5-9, the table of mean ± sample std over seeds) and scripts/run-studies.sh --quick (every study,
its tables and figures). Run by ctest with NORMKIT_TRAIN set to the executable."""

import csv
import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest
from tiny_mnist import write_dataset

TRAIN = os.environ.get("NORMKIT_TRAIN", "build/bin/normkit-train")
SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"
PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # Enough training images for --quick's train/test gap (1,000) and batch 32 on half the classes.
    return write_dataset(tmp_path_factory.mktemp("mnist"), seed=11, train_images=1200,
                         test_images=300)


def finetune(*args, timeout=600):
    return subprocess.run([PYTHON, str(SCRIPTS / "finetune_study.py"), "--train", TRAIN, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


SMALL = ["--widths", "8,8,16", "--limit-train", "400", "--limit-test", "100"]


def test_finetune_study_trains_every_arm_per_seed_and_tabulates_them(data_dir, tmp_path):
    out = tmp_path / "ft"
    r = finetune("--out", out, "--seeds", "3,4", "--pretrain-epochs", "1", "--finetune-epochs", "1",
                 "--", "--data", data_dir, *SMALL)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    got = sorted((row["phase"], row["norm"], row["batch"], row["classes"], row["seed"]) for row in rows)
    want = sorted([("pretrain", n, "32", "0,1,2,3,4", s) for n in ("bn", "gn") for s in ("3", "4")] +
                  [("finetune", n, "2", "5,6,7,8,9", s) for n in ("bn", "frozen", "gn") for s in ("3", "4")])
    assert got == want
    # Each fine-tuning run started from its own seed's checkpoint of the right norm.
    for norm, source in (("bn", "bn"), ("frozen", "bn"), ("gn", "gn")):
        for seed in (3, 4):
            m = json.loads((out / "runs" / f"finetune_{norm}_s{seed}.json").read_text())
            assert m["init_from"].endswith(f"pretrain_{source}_s{seed}.safetensors")
            assert (m["norm"], m["batch"], m["seed"], m["classes"]) == (norm, 2, seed, [5, 6, 7, 8, 9])
    # The same run by hand is the same bits (the script adds nothing of its own).
    alone = tmp_path / "alone.json"
    r = subprocess.run([TRAIN, "run", "--norm", "frozen", "--batch", "2", "--classes", "5,6,7,8,9",
                        "--epochs", "1", "--seed", "4", "--init-from",
                        out / "checkpoints" / "pretrain_bn_s4.safetensors", "--threads", "1",
                        "--quiet", "--data", data_dir, *SMALL, "--metrics-out", alone],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    swept = json.loads((out / "runs" / "finetune_frozen_s4.json").read_text())
    by_hand = json.loads(alone.read_text())
    for key in ("train_loss", "test_loss", "test_error"):
        assert by_hand[key] == swept[key], key
    # The table: per arm, mean ± sample standard deviation over the two seeds.
    md = (out / "results.md").read_text()
    for phase, arm, norm in (("finetune", "BN", "bn"), ("finetune", "frozen BN", "frozen"),
                             ("finetune", "GN", "gn"), ("pretrain", "BN", "bn"), ("pretrain", "GN", "gn")):
        errors = [float(row["test_error"]) for row in rows if (row["phase"], row["norm"]) == (phase, norm)]
        cell = f"| {arm} | {statistics.fmean(errors):.2f} ± {statistics.stdev(errors):.2f} (n=2) |"
        assert cell in md, (cell, md)
    assert md.index("## Fine-tuned at batch 2") < md.index("## Pretrained at batch 32")


def test_finetune_study_refuses_bad_arguments_and_names_a_failed_run(data_dir, tmp_path):
    r = finetune("--out", tmp_path / "a", "--seeds", "1,x")
    assert r.returncode == 2 and "--seeds" in r.stderr
    r = finetune("--out", tmp_path / "a", "--finetune-epochs", "0")
    assert r.returncode == 2 and "--finetune-epochs" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    r = finetune("--out", tmp_path / "full")
    assert r.returncode != 0 and "not empty" in r.stderr
    # GN's 8 groups do not divide 4 channels: that run fails, the script names its log.
    r = finetune("--out", tmp_path / "fail", "--seeds", "1", "--", "--data", data_dir,
                 "--widths", "4,4,4")
    assert r.returncode == 1
    assert "pretrain_gn_s1 failed" in r.stderr and "pretrain_gn_s1.log" in r.stderr
    assert not (tmp_path / "fail" / "results.csv").exists()


def test_run_studies_quick_runs_every_study(data_dir, tmp_path):
    pytest.importorskip("matplotlib")  # plot_sweep.py's figures
    out = tmp_path / "studies"
    env = dict(os.environ, NORMKIT_TRAIN=str(Path(TRAIN).resolve()))
    r = subprocess.run(["bash", str(SCRIPTS / "run-studies.sh"), str(out), "--quick", "--data",
                        str(data_dir)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.startswith("== estimated time: ")
    figures = {"init": "test_error_vs_init_scale", "init-lr0.02": "test_error_vs_init_scale",
               "regularization": "test_error_vs_batch", "regularization-lr0.02": "test_error_vs_batch",
               "learning-rate": "test_error_vs_lr", "groups": "test_error_vs_groups",
               "instance-norm-batch-2": "test_error_vs_batch"}
    for study, figure in figures.items():
        for name in ("results.csv", "results.md", "summary.csv", f"{figure}.png", "loss_curves.png"):
            assert (out / study / name).is_file(), (study, name)
    runs = lambda study: list(csv.DictReader(open(out / study / "results.csv")))
    assert sorted(float(row["init_scale"]) for row in runs("init")) == \
        sorted([0.1, 0.3, 1, 3, 10] * 2)
    regularization = runs("regularization")
    assert sorted((row["norm"], float(row["dropout"]), float(row["weight_decay"])) for row in regularization) == \
        sorted((n, p, w) for n in ("bn", "none") for p in (0, 0.5) for w in (0, 5e-4))
    assert all(row["train_error_eval"] != "" for row in regularization)
    assert {(row["norm"], float(row["lr"])) for row in runs("init-lr0.02")} == {("none", 0.02)}
    assert len(runs("init-lr0.02")) == 5 and len(runs("regularization-lr0.02")) == 4
    assert len(runs("learning-rate")) == 8 and len(runs("groups")) == 6
    assert [row["norm"] for row in runs("instance-norm-batch-2")] == ["in"]
    assert len(list(csv.DictReader(open(out / "finetune" / "results.csv")))) == 5
    assert "## Fine-tuned at batch 2" in (out / "finetune" / "results.md").read_text()
