"""No work lost when normkit-train is killed: a short run with a checkpoint every few steps is
SIGKILLed at random moments, one to three times in a row (each kill hits the run resumed after
the previous one), and then resumed to its end. Every time, the checkpoint on disk must be
intact (its CRC-32 checked here, independently of the trainer) and the resumed run must end
with the same tensors and metrics, bit for bit, as a run that was never interrupted.

NORMKIT_KILL_TEST_RUNS sets the number of interrupted runs (default 5; docs/reliability.md
reports a run with 50). NORMKIT_KILL_TEST_SEED changes the kill moments. Run by ctest with
NORMKIT_TRAIN set to the executable."""

import hashlib
import json
import os
import random
import signal
import subprocess
import time
import zlib

import pytest
from tiny_mnist import write_dataset

TRAIN = os.environ.get("NORMKIT_TRAIN", "build/bin/normkit-train")
RUNS = int(os.environ.get("NORMKIT_KILL_TEST_RUNS", "5"))
SEED = int(os.environ.get("NORMKIT_KILL_TEST_SEED", "20261203"))
TIMING = ("seconds", "images_per_s")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("mnist"), seed=1, train_images=160,
                         test_images=32)


def options(data_dir, checkpoint, metrics):
    # 3 epochs of 20 steps, a checkpoint every 3 steps and at each epoch end.
    return [TRAIN, "run", "--norm", "bn", "--batch", "8", "--epochs", "3", "--widths", "4,8,8",
            "--threads", "1", "--quiet", "--data", str(data_dir), "--checkpoint", str(checkpoint),
            "--checkpoint-every", "3", "--metrics-out", str(metrics)]


def read_checkpoint(path):
    """(tensors, metadata) of a safetensors file, after checking its CRC-32 as documented in
    apps/train/io/safetensors.h: zlib's CRC-32 of the file with the eight digits as zeros."""
    blob = open(path, "rb").read()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    metadata = header.pop("__metadata__")
    digits = metadata["crc32"]
    field = f'"crc32":"{digits}"'.encode()
    at = blob.index(field, 8, 8 + n) + len(field) - 9
    zeroed = blob[:at] + b"00000000" + blob[at + 8:]
    assert f"{zlib.crc32(zeroed):08x}" == digits, f"{path}: CRC-32 mismatch"
    tensors = {name: (info["dtype"], info["shape"],
                      blob[8 + n + info["data_offsets"][0]:8 + n + info["data_offsets"][1]])
               for name, info in header.items()}
    return tensors, metadata


def fingerprint(checkpoint, metrics):
    """What must match bit for bit: every tensor and metadata value but the timings (and the
    checksum, which covers them), and every metric but the timings."""
    tensors, metadata = read_checkpoint(checkpoint)
    metadata.pop("crc32")
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        if name.split("/")[-1] in TIMING:
            continue
        dtype, shape, data = tensors[name]
        h.update(f"{name}:{dtype}:{shape}".encode())
        h.update(data)
    m = json.loads(open(metrics).read())
    kept = {k: v for k, v in m.items() if k not in TIMING}
    kept["history"] = {k: v for k, v in m["history"].items() if k not in TIMING}
    return h.hexdigest(), json.dumps(kept, sort_keys=True)


def test_killed_runs_resume_to_the_same_bits(data_dir, tmp_path):
    ref_ckpt, ref_metrics = tmp_path / "ref.safetensors", tmp_path / "ref.json"
    t0 = time.monotonic()
    subprocess.run(options(data_dir, ref_ckpt, ref_metrics), check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    duration = time.monotonic() - t0
    reference = fingerprint(ref_ckpt, ref_metrics)

    rng = random.Random(SEED)
    kills = no_checkpoint_yet = finished_before_kill = mid_write = 0
    for run in range(RUNS):
        ckpt, metrics = tmp_path / f"k{run}.safetensors", tmp_path / f"k{run}.json"
        temporaries = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(ckpt.name + ".tmp-")]
        for _ in range(rng.randint(1, 3)):
            cmd = options(data_dir, ckpt, metrics)
            resumed = ckpt.exists()
            if resumed:
                cmd += ["--resume", str(ckpt)]
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            # A resumed run has less left to do: its moment is drawn from the first half.
            time.sleep(rng.uniform(0, duration / 2 if resumed else duration))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
            else:
                finished_before_kill += 1
            _, err = p.communicate(timeout=300)
            assert p.returncode in (0, -signal.SIGKILL), err.decode()
            if temporaries():
                mid_write += 1  # killed while writing a checkpoint
            if ckpt.exists():
                read_checkpoint(ckpt)  # intact after every kill
            else:
                no_checkpoint_yet += 1
        cmd = options(data_dir, ckpt, metrics)
        if ckpt.exists():
            cmd += ["--resume", str(ckpt)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"run {run}: {r.stderr}"
        assert fingerprint(ckpt, metrics) == reference, f"run {run} ended elsewhere"
        # A temporary left by a kill mid-write is removed by the next run.
        assert temporaries() == []
    print(f"\n{RUNS} interrupted runs, {kills} SIGKILLs ({no_checkpoint_yet} before the first "
          f"checkpoint, {mid_write} while a checkpoint was being written; {finished_before_kill} "
          f"runs finished before their kill), an uninterrupted run taking {duration:.2f} s: every "
          f"checkpoint intact, every resumed run bit for bit the uninterrupted one")
