"""normkit-train's options for the papers' other claims, end to end on a tiny MNIST-format
dataset: pretraining on some classes and fine-tuning on the others from its checkpoint with BN,
frozen BN and GN; --classes counts the kept images; the train/test gap; every option in the
metrics and refused by name when wrong. Run by ctest with NORMKIT_TRAIN set to the executable."""

import gzip
import json
import os
import subprocess

import pytest
from tiny_mnist import write_dataset

TRAIN = os.environ.get("NORMKIT_TRAIN", "build/bin/normkit-train")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("mnist"), seed=5, train_images=80,
                         test_images=30)


def labels(data_dir, split):
    with gzip.open(data_dir / f"{split}-labels-idx1-ubyte.gz") as f:
        return list(f.read()[8:])


def train(*args):
    return subprocess.run([TRAIN, *map(str, args)], capture_output=True, text=True, timeout=300)


def run(data_dir, *more, widths="4,8"):
    return ["run", "--epochs", "1", "--widths", widths, "--threads", "1", "--quiet",
            "--data", data_dir, *more]


def checkpoint_meta(path):
    blob = open(path, "rb").read()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n])


def test_pretrain_on_some_classes_then_fine_tune_on_the_others(data_dir, tmp_path):
    train_labels = labels(data_dir, "train")
    first, second = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    kept = sum(label in first for label in train_labels)
    for norm in ("bn", "gn"):
        r = train(*run(data_dir, "--norm", norm, "--groups", "2", "--batch", "8", "--classes",
                       "0,1,2,3,4", "--checkpoint", tmp_path / f"pre_{norm}.safetensors"))
        assert r.returncode == 0, r.stderr
    # The image count after filtering is what the checkpoint's position and permutation count.
    header = checkpoint_meta(tmp_path / "pre_bn.safetensors")
    assert header["__metadata__"]["classes"] == "0,1,2,3,4"
    assert header["__metadata__"]["train_images"] == str(kept)
    assert header["position/permutation"]["shape"] == [kept]
    # --limit-train counts the kept images: the first 16 of them.
    r = train(*run(data_dir, "--batch", "8", "--classes", "0,1,2,3,4", "--limit-train", "16",
                   "--checkpoint", tmp_path / "limited.safetensors"))
    assert r.returncode == 0, r.stderr
    assert checkpoint_meta(tmp_path / "limited.safetensors")["__metadata__"]["train_images"] == "16"

    for norm, source in (("bn", "pre_bn"), ("frozen", "pre_bn"), ("gn", "pre_gn")):
        metrics = tmp_path / f"fine_{norm}.json"
        r = train(*run(data_dir, "--norm", norm, "--groups", "2", "--batch", "2", "--classes",
                       "5,6,7,8,9", "--init-from", tmp_path / f"{source}.safetensors",
                       "--eval-train-images", "10", "--metrics-out", metrics))
        assert r.returncode == 0, r.stderr
        assert "10 training images: error" in r.stdout
        m = json.loads(metrics.read_text())
        assert m["norm"] == norm
        assert m["classes"] == second
        assert m["init_from"].endswith(f"{source}.safetensors")
        assert 0 <= m["train_error_eval"] <= 100 and m["train_loss_eval"] > 0
        assert ("test_error_batch_stats" in m and m["test_error_batch_stats"] is not None) == (norm == "bn")


def test_defaults_add_no_metrics_fields_and_set_options_are_recorded(data_dir, tmp_path):
    r = train(*run(data_dir, "--batch", "8", "--metrics-out", tmp_path / "plain.json"))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "plain.json").read_text())
    for key in ("init_scale", "dropout", "weight_decay", "eval_train_images", "classes",
                "init_from", "train_error_eval", "train_loss_eval"):
        assert key not in m, key
    r = train(*run(data_dir, "--batch", "8", "--init-scale", "0.1", "--dropout", "0.5",
                   "--weight-decay", "0", "--metrics-out", tmp_path / "set.json"))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "set.json").read_text())
    assert (m["init_scale"], m["dropout"], m["weight_decay"]) == (0.1, 0.5, 0)


def test_the_help_names_every_option():
    out = train("run", "--help").stdout
    for option in ("--init-scale", "--dropout", "--weight-decay", "--eval-train-images",
                   "--classes", "--init-from", "frozen"):
        assert option in out, option


@pytest.mark.parametrize("args, needle", [
    (["--init-scale", "0"], "--init-scale: must be a positive number"),
    (["--dropout", "1"], "--dropout 1: must be in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay: must be zero or positive"),
    (["--classes", "3,3"], "--classes 3,3: names class 3 twice"),
    (["--classes", "300"], "--classes 300: each class must be a label in [0, 255]"),
    (["--eval-train-images", "81"], "--eval-train-images 81: the run has 80 training images"),
    (["--norm", "frozen"], "--norm frozen: freezes a trained BatchNorm"),
])
def test_bad_study_options_are_refused_by_name(data_dir, args, needle):
    r = train(*run(data_dir, "--batch", "8", *args))
    assert r.returncode != 0, r.stderr
    assert needle in r.stderr, r.stderr


def test_init_from_refuses_another_shape_resume_and_frozen_gn(data_dir, tmp_path):
    for norm in ("bn", "gn"):
        r = train(*run(data_dir, "--norm", norm, "--groups", "2", "--batch", "8", "--checkpoint",
                       tmp_path / f"{norm}.safetensors"))
        assert r.returncode == 0, r.stderr
    bn, gn = tmp_path / "bn.safetensors", tmp_path / "gn.safetensors"
    r = train(*run(data_dir, "--batch", "8", "--init-from", bn, widths="4,16"))
    assert r.returncode == 1 and "widths = 4,8, this run has widths = 4,16 (--widths)" in r.stderr, r.stderr
    r = train(*run(data_dir, "--norm", "frozen", "--batch", "8", "--init-from", gn))
    assert r.returncode == 1 and "it has norm = gn; start from a --norm bn checkpoint" in r.stderr, r.stderr
    r = train(*run(data_dir, "--batch", "8", "--init-from", bn, "--resume", bn))
    assert r.returncode == 2 and "give one of them" in r.stderr, r.stderr
    # A frozen fine-tuning run resumes with --resume alone; another --dropout is refused by name.
    common = run(data_dir, "--norm", "frozen", "--batch", "4", "--checkpoint",
                 tmp_path / "frozen.safetensors")
    r = train(*common, "--init-from", bn, "--stop-after-steps", "5")
    assert r.returncode == 0, r.stderr
    r = train(*common, "--resume", tmp_path / "frozen.safetensors", "--dropout", "0.1")
    assert r.returncode == 1 and "(--dropout)" in r.stderr, r.stderr
    r = train(*common, "--resume", tmp_path / "frozen.safetensors")
    assert r.returncode == 0, r.stderr
    assert checkpoint_meta(tmp_path / "frozen.safetensors")["__metadata__"]["init_from"] == str(bn)
