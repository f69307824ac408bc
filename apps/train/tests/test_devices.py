"""normkit-train's logical devices across processes, end to end on a tiny MNIST-format dataset:
`mpirun -np P normkit-train run --devices K` gives the same losses, errors, loss curve and
checkpoint, bit for bit, for P = 1, 2, 4 and any --threads; a process that throws or is killed
ends the whole job within seconds, naming its rank; impossible combinations are refused before
any work; a sweep records the device count and SyncBN. Run by ctest with NORMKIT_TRAIN set to
the executable; the multi-process tests need Open MPI's mpirun and a build with MPI."""

import csv
import json
import os
import shutil
import subprocess
import time

import pytest
from tiny_mnist import write_dataset

TRAIN = os.environ.get("NORMKIT_TRAIN", "build/bin/normkit-train")
TIMING = ("seconds", "images_per_s")
MPIRUN = shutil.which("mpirun")
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_rmaps_base_oversubscribe="1")


def version():
    return subprocess.run([TRAIN, "--version"], capture_output=True, text=True).stdout


HAS_MPI = MPIRUN is not None and "MPI: several processes" in version()
needs_mpi = pytest.mark.skipif(not HAS_MPI, reason="no mpirun, or normkit-train built without MPI")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("mnist"), seed=3, train_images=72,
                         test_images=24)


def train(processes, *args, timeout=300, env=None):
    cmd = [TRAIN, *map(str, args)]
    if processes > 1:
        cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(processes), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ENV)


def small(data_dir, *more, epochs=1):
    # An epoch of 72 // (4 * 3) = 6 steps of 4 devices x 3 images.
    return ["run", "--batch", "3", "--epochs", str(epochs), "--widths", "4,8", "--lr-decay-at",
            "0.5", "--data", data_dir, "--quiet", *more]


def metrics_without_timing(path):
    m = json.loads(open(path).read())
    for k in TIMING:
        m.pop(k)
        m["history"].pop(k)
    return m


def checkpoint_without_timing(path):
    """The checkpoint's header and bytes, less its timings and its checksum (a function of them)."""
    blob = open(path, "rb").read()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__")
    meta.pop("crc32")
    tensors = {name: blob[8 + n + h["data_offsets"][0]:8 + n + h["data_offsets"][1]]
               for name, h in header.items() if name.split("/")[-1] not in TIMING}
    return meta, tensors


@needs_mpi
@pytest.mark.parametrize("norm", ["bn", "gn", "syncbn", "bn-studies", "bn-augmented", "syncbn-augmented"])
def test_processes_give_the_same_bits(data_dir, tmp_path, norm):
    # Augmentation and warm-up drawn per position of the permutation: the same for any split.
    augment = ["--crop-pad", "2", "--hflip", "--warmup", "0.3"] if norm.endswith("-augmented") else []
    norm = norm.removesuffix("-augmented")
    extra = ["--norm", "bn", "--sync-bn"] if norm == "syncbn" else ["--norm", norm, "--groups", "2"]
    if norm == "bn-studies":
        # Dropout's masks follow the image's place in the epoch, not the device or the process.
        extra = ["--norm", "bn", "--dropout", "0.3", "--init-scale", "2", "--weight-decay", "0.001",
                 "--eval-train-images", "20", "--classes", "1,3,4,5,6,7,8,9"]
    extra += augment
    results = {}
    for processes, threads in ((1, 1), (2, 1), (4, 1), (2, 2)):
        tag = f"p{processes}t{threads}"
        r = train(processes, *small(data_dir, *extra), "--devices", 4, "--threads", threads,
                  "--metrics-out", tmp_path / f"{tag}.json",
                  "--checkpoint", tmp_path / f"{tag}.safetensors")
        assert r.returncode == 0, r.stderr
        # Process 0 alone reports.
        assert r.stdout.count("train loss") == 1, r.stdout
        results[tag] = (metrics_without_timing(tmp_path / f"{tag}.json"),
                        checkpoint_without_timing(tmp_path / f"{tag}.safetensors"))
    m1, (meta1, t1) = results["p1t1"]
    assert m1["devices"] == 4 and m1["sync_bn"] == (norm == "syncbn")
    if augment:
        assert (m1["crop_pad"], m1["hflip"], m1["lr_warmup"]) == (2, True, 0.3)
        assert (meta1["crop_pad"], meta1["hflip"]) == ("2", "1")
    if norm != "gn":
        assert m1["test_error_precise"] is not None
    if norm == "bn-studies":
        assert (m1["dropout"], m1["eval_train_images"], meta1["dropout"]) == (0.3, 20, "0.29999999999999999")
        assert m1["train_error_eval"] is not None
    else:
        assert len(m1["loss_curve"]["loss"]) == 6
    for tag, (m, (meta, t)) in results.items():
        assert m == m1, tag
        assert meta == meta1, tag
        assert t.keys() == t1.keys(), tag
        for name in t1:
            assert t[name] == t1[name], (tag, name)


@needs_mpi
@pytest.mark.parametrize("more", [[], ["--dropout", "0.5", "--init-scale", "0.5"],
                                  ["--crop-pad", "1", "--hflip", "--warmup", "0.4"]])
def test_a_checkpoint_of_two_processes_resumes_in_one(data_dir, tmp_path, more):
    # Stopped inside the second epoch by 2 processes, resumed by 1.
    common = [*small(data_dir, "--norm", "bn", *more, epochs=2), "--devices", 4, "--threads", 1]
    r = train(1, *common, "--metrics-out", tmp_path / "whole.json",
              "--checkpoint", tmp_path / "whole.safetensors")
    assert r.returncode == 0, r.stderr
    r = train(2, *common, "--checkpoint", tmp_path / "part.safetensors", "--stop-after-steps", 8)
    assert r.returncode == 0, r.stderr
    r = train(1, *common, "--metrics-out", tmp_path / "part.json",
              "--checkpoint", tmp_path / "part.safetensors", "--resume", tmp_path / "part.safetensors")
    assert r.returncode == 0, r.stderr
    assert metrics_without_timing(tmp_path / "part.json") == metrics_without_timing(tmp_path / "whole.json")
    assert checkpoint_without_timing(tmp_path / "part.safetensors") == \
        checkpoint_without_timing(tmp_path / "whole.safetensors")


@needs_mpi
@pytest.mark.parametrize("how", ["throw", "kill"])
def test_a_failing_process_ends_the_job_within_seconds(data_dir, tmp_path, how):
    # Rank 1 fails at step 3 of a run of many steps; the others must not wait for it.
    env = dict(ENV, NORMKIT_TRAIN_TEST_FAIL="1:3" + (":kill" if how == "kill" else ""))
    start = time.monotonic()
    r = train(2, "run", "--batch", "3", "--epochs", "50", "--widths", "4,8", "--data", data_dir,
              "--quiet", "--threads", "1", "--devices", "4", "--metrics-out", tmp_path / "m.json",
              timeout=60, env=env)
    took = time.monotonic() - start
    assert r.returncode != 0
    assert took < 30, took
    out = r.stdout + r.stderr
    if how == "throw":
        assert "rank 1 of 2: NORMKIT_TRAIN_TEST_FAIL" in out, out
    else:
        assert "rank 1" in out and "signal 9" in out, out
    assert not (tmp_path / "m.json").exists()


@needs_mpi
def test_a_device_count_the_processes_do_not_divide_is_refused(data_dir):
    r = train(2, *small(data_dir, "--norm", "bn"), "--devices", 3, timeout=60)
    assert r.returncode != 0
    assert "--devices 3: is not a multiple of the 2 processes" in r.stderr, r.stderr


@needs_mpi
def test_a_sweep_under_mpirun_is_refused(data_dir, tmp_path):
    r = train(2, "sweep", "--norms", "bn", "--batches", "3", "--devices", "2", "--data", data_dir,
              "--out", tmp_path / "s", "--quiet", timeout=60)
    assert r.returncode != 0
    assert "start it without mpirun" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()


def test_several_processes_without_mpi_are_refused(data_dir):
    # What a build without MPI says when mpirun starts it (simulated: no mpirun involved).
    env = dict(ENV, OMPI_COMM_WORLD_SIZE="2", NORMKIT_TRAIN_TEST_WITHOUT_MPI="1")
    r = train(1, *small(data_dir, "--norm", "bn"), "--devices", 2, env=env, timeout=60)
    assert r.returncode == 2
    assert "no MPI support" in r.stderr and "libopenmpi-dev" in r.stderr, r.stderr


def test_bad_device_options_are_refused_before_any_work(data_dir, tmp_path):
    for args, words in ((["--devices", "0"], "--devices 0: must be >= 1"),
                        (["--devices", "2", "--norm", "gn", "--sync-bn"], "--sync-bn"),
                        (["--devices", "25"], "--devices 25 x --batch 3 = 75 images per step")):
        r = train(1, *small(data_dir), *args, "--metrics-out", tmp_path / "m.json")
        assert r.returncode == 2, (args, r.stderr)
        assert words in r.stderr, (args, r.stderr)
        assert not (tmp_path / "m.json").exists()


def test_devices_one_is_the_default_run(data_dir, tmp_path):
    runs = []
    for tag, extra in (("default", []), ("one", ["--devices", "1"])):
        r = train(1, *small(data_dir, "--norm", "bn"), *extra, "--metrics-out", tmp_path / f"{tag}.json",
                  "--checkpoint", tmp_path / f"{tag}.safetensors")
        assert r.returncode == 0, r.stderr
        runs.append((metrics_without_timing(tmp_path / f"{tag}.json"),
                     checkpoint_without_timing(tmp_path / f"{tag}.safetensors")))
    assert runs[0] == runs[1]
    # A one-device run's files carry no device fields: they are what they were before devices.
    assert "devices" not in runs[0][0] and "devices" not in runs[0][1][0]


def test_sweep_records_devices_and_sync_bn(data_dir, tmp_path):
    out = tmp_path / "sweep"
    r = train(1, "sweep", "--norms", "bn,gn", "--groups", "2", "--batches", "3", "--devices", "2",
              "--epochs", "1", "--widths", "4,8", "--threads", "1", "--jobs", "2", "--quiet",
              "--data", data_dir, "--out", out, "--sync-bn")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    got = sorted((row["norm"], row["devices"], row["sync_bn"]) for row in rows)
    want = sorted([("bn", "2", "0"), ("syncbn", "2", "1"), ("gn", "2", "0")])
    assert got == want
    for row in rows:  # lr = 0.1 * devices * batch / 32
        assert float(row["lr"]) == pytest.approx(0.1 * 2 * 3 / 32)
    m = json.loads((out / "runs" / "bn_b3.json").read_text())
    assert (m["devices"], m["sync_bn"]) == (2, False)
    md = (out / "results.md").read_text()
    assert "| BN (per device) |" in md
    assert "| SyncBN |" in md
    assert json.loads((out / "runs" / "syncbn_b3.json").read_text())["sync_bn"] is True


def test_sweep_arms_syncbn_at_some_batches_over_seeds(data_dir, tmp_path):
    out = tmp_path / "arms"
    r = train(1, "sweep", "--norms", "bn,gn@3,syncbn@2", "--groups", "2", "--batches", "3,2",
              "--devices", "2", "--seeds", "4,5", "--epochs", "1", "--widths", "4,8", "--threads", "1",
              "--jobs", "2", "--quiet", "--data", data_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    got = sorted((row["norm"], row["batch"], row["seed"], row["sync_bn"]) for row in rows)
    want = sorted([("bn", b, s, "0") for b in ("3", "2") for s in ("4", "5")] +
                  [("gn", "3", s, "0") for s in ("4", "5")] + [("syncbn", "2", s, "1") for s in ("4", "5")])
    assert got == want
    for row in rows:
        assert row["devices"] == "2"
        assert (row["test_error_precise"] != "") == (row["norm"] != "gn"), row
    # File names and labels carry the seed.
    assert json.loads((out / "runs" / "syncbn_b2_s5.json").read_text())["sync_bn"] is True
    assert "syncbn 2xb=2 lr=0.1 seed=5" in r.stderr
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [(s["norm"], s["batch"], s["n"]) for s in summary] == \
        [("bn", "3", "2"), ("bn", "2", "2"), ("gn", "3", "2"), ("syncbn", "2", "2")]
    md = (out / "results.md").read_text()
    assert "| SyncBN | — |" in md
    assert "## Every run" in md


@pytest.mark.parametrize("norms, words", [
    ("bn,syncbn@4", "--norms entry 'syncbn@4': batch 4 is not one of --batches"),
    ("bn,gn@", "--norms entry 'gn@': '' is not a batch size"),
    ("bn,bogus", "--norms entry 'bogus': the norm must be"),
])
def test_bad_sweep_arms_are_refused_by_entry(data_dir, tmp_path, norms, words):
    r = train(1, "sweep", "--norms", norms, "--batches", "3,2", "--devices", "2", "--data", data_dir,
              "--out", tmp_path / "s", "--quiet")
    assert r.returncode == 2, r.stderr
    assert words in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()


def test_a_syncbn_arm_needs_several_devices(data_dir, tmp_path):
    r = train(1, "sweep", "--norms", "syncbn", "--batches", "3", "--data", data_dir,
              "--out", tmp_path / "s", "--quiet")
    assert r.returncode == 2
    assert "--norms entry 'syncbn'" in r.stderr and "--devices >= 2" in r.stderr, r.stderr
