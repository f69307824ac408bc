#!/usr/bin/env python3
"""Bit-for-bit fingerprints of normkit's results, to hold refactorings of the kernels to "no bit
changes".

    bits.py record  --python-dir build/python --train build/bin/normkit-train --api-bits build/bin/golden_api_bits
    bits.py check   --python-dir build/python --train build/bin/normkit-train --api-bits build/bin/golden_api_bits

`record` computes a SHA-256 of every output of a fixed set of Python calls (every op the module
exposes, forward and backward, both memory formats, odd shapes, float32 and float16, shapes that
take the cached, two-phase and streamed paths), of the C++ API's results that Python does not
reach (api_bits.cpp: the LayerNorm and InstanceNorm backwards, bfloat16, the fused epilogues) and
of short normkit-train runs (bn, gn, in, ln: every loss and error, and the final checkpoint's
tensors), and stores them in fingerprints.json beside
this file under the machine's key. `check` recomputes them and fails on any difference.

Results are bitwise the same for any thread count and alignment, but not across SIMD targets or
OpenBLAS kernels: the key is the CPU's SIMD feature set. On a CPU with no recorded fingerprints
`check` exits 77 (skipped) and says how to record them.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
STORE = os.path.join(HERE, "fingerprints.json")
SKIPPED = 77

# Flags that change which SIMD target Highway or OpenBLAS picks, hence the bits.
SIMD_FLAGS = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
              "avx512cd", "avx512_vnni", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg",
              "avx512_vpopcntdq", "avx512_bf16", "avx512_fp16", "vaes", "vpclmulqdq", "gfni",
              "asimd", "sve"]


def machine_key():
    flags = set()
    vendor = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif name in ("vendor_id", "CPU implementer") and not vendor:
                    vendor = value.strip()
    except OSError:
        pass
    return vendor + ":" + ",".join(f for f in SIMD_FLAGS if f in flags)


def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.asarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def channels_last(a):
    """The same logical array with channels-last strides (NLC, NHWC, NDHWC)."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def layouts(cases, shape_of=lambda case: case):
    """(dtype, case, format) for float32 and float16 (float16 only up to 1 Mi elements), each
    case channels-first and, where it has spatial dims, channels-last."""
    for dtype in (np.float32, np.float16):
        for case in cases:
            shape = shape_of(case)
            if dtype == np.float16 and np.prod(shape) > 1 << 20:
                continue
            for fmt in ("cf", "cl"):
                if fmt == "cl" and len(shape) < 3:
                    continue
                yield dtype, case, fmt


def python_fingerprints(nk):
    out = {}
    rng = np.random.default_rng(20261203)

    def data(shape, dtype=np.float32, offset=0.0):
        return (rng.standard_normal(shape) * 1.5 + offset).astype(dtype)

    def vec(c):
        return rng.standard_normal(c).astype(np.float32)

    # (shape, groups): odd sizes; channels-first groups in cache and not; streamed outputs (16 MiB).
    gn_cases = [((3, 6, 7, 5), 3), ((2, 12, 33), 4), ((1, 8, 3, 5, 7), 2), ((2, 64, 23, 29), 32),
                ((1, 4, 300, 301), 2), ((1, 64, 256, 257), 8), ((5, 10), 5)]
    for dtype, (shape, groups), fmt in layouts(gn_cases, lambda case: case[0]):
        c = shape[1]
        x = data(shape, dtype, offset=3e4 if dtype == np.float32 and shape[0] == 3 else 0.5)
        dy = data(shape, dtype)
        if fmt == "cl":
            x, dy = channels_last(x), channels_last(dy)
        w, b = vec(c), vec(c)
        name = f"{np.dtype(dtype).name}/{fmt}/{shape}/G{groups}"
        y, mean, rstd = nk.group_norm_forward(x, groups, w, b, eps=1e-5)
        out[f"group_norm_forward/{name}"] = digest(y, mean, rstd)
        out[f"group_norm_backward/{name}"] = digest(
            *nk.group_norm_backward(dy, x, mean, rstd, groups, w))
        y0 = nk.group_norm(x, groups, eps=1e-3)
        mean0, rstd0 = nk.group_norm_forward(x, groups, eps=1e-3)[1:]
        out[f"group_norm/no-affine/{name}"] = digest(
            y0, nk.group_norm_backward(dy, x, mean0, rstd0, groups)[0])

    bn_cases = [(3, 5, 7, 9), (2, 16, 33), (4, 7), (2, 3, 4, 5, 6), (32, 64, 19, 17), (2, 8, 200, 199),
                (4, 64, 130, 130)]
    for dtype, shape, fmt in layouts(bn_cases):
        c = shape[1]
        x = data(shape, dtype, offset=-2e3 if dtype == np.float32 and shape[0] == 3 else 0.25)
        dy = data(shape, dtype)
        if fmt == "cl":
            x, dy = channels_last(x), channels_last(dy)
        w, b = vec(c), vec(c)
        rm, rv = vec(c), np.abs(vec(c)) + 0.5
        name = f"{np.dtype(dtype).name}/{fmt}/{shape}"
        steps = []
        for _ in range(3):
            y, sm, si = nk.batch_norm_forward(x, rm, rv, w, b, training=True, momentum=0.1)
            steps.append(digest(y, sm, si, rm, rv))
        out[f"batch_norm_forward/training/{name}"] = digest(np.array([s.encode() for s in steps]))
        out[f"batch_norm_backward/training/{name}"] = digest(
            *nk.batch_norm_backward(dy, x, w, sm, si, training=True))
        out[f"batch_norm/inference/{name}"] = digest(nk.batch_norm(x, rm, rv, w, b))
        out[f"batch_norm_backward/inference/{name}"] = digest(*nk.batch_norm_backward(
            dy, x, w, None, None, training=False, running_mean=rm, running_var=rv))
        rm2, rv2 = np.zeros(c, np.float32), np.ones(c, np.float32)
        y_none = nk.batch_norm(x, rm2, rv2, training=True, momentum=0.5, eps=1e-3)
        out[f"batch_norm/no-affine/{name}"] = digest(y_none, rm2, rv2)

    in_cases = [(3, 5, 7, 9), (2, 6, 33), (1, 3, 2, 9, 5), (2, 32, 130, 131)]
    for dtype in (np.float32, np.float16):
        for shape in in_cases:
            for fmt in ("cf", "cl"):
                c = shape[1]
                x = data(shape, dtype, offset=1e3 if dtype == np.float32 and shape[0] == 3 else 0.0)
                if fmt == "cl":
                    x = channels_last(x)
                w, b = vec(c), vec(c)
                rm, rv = vec(c), np.abs(vec(c)) + 0.5
                name = f"{np.dtype(dtype).name}/{fmt}/{shape}"
                out[f"instance_norm/input-stats/{name}"] = digest(
                    nk.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.2), rm, rv)
                out[f"instance_norm/running-stats/{name}"] = digest(
                    nk.instance_norm(x, rm, rv, w, b, use_input_stats=False))
                out[f"instance_norm/plain/{name}"] = digest(nk.instance_norm(x))

    ln_cases = [((4, 7, 33), (33,)), ((3, 5, 6, 7), (6, 7)), ((2, 9, 4096 + 13), (4096 + 13,)),
                ((512, 768), (768,)), ((3, 100000), (100000,)), ((1, 8, 5, 3), (8, 5, 3))]
    for shape, norm_shape in ln_cases:
        x = data(shape, offset=5e3 if shape[0] == 3 else 0.0)
        w, b = data(norm_shape), data(norm_shape)
        name = f"{shape}/{norm_shape}"
        out[f"layer_norm/affine/{name}"] = digest(nk.layer_norm(x, norm_shape, w, b))
        out[f"layer_norm/plain/{name}"] = digest(nk.layer_norm(x, norm_shape, eps=1e-6))
    return out


def checkpoint_digest(path, timing):
    """Every tensor and the metadata of a safetensors checkpoint, less its timings and its
    checksum (a function of the timings too)."""
    with open(path, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    metadata = header.pop("__metadata__", {})
    metadata.pop("crc32", None)
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(header):
        if name.split("/")[-1] in timing:
            continue
        begin, end = header[name]["data_offsets"]
        h.update(f"{name}:{header[name]['dtype']}:{header[name]['shape']}".encode())
        h.update(blob[8 + n + begin:8 + n + end])
    return h.hexdigest()


def train_fingerprints(train, data_dir):
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for norm, extra in (("bn", []), ("gn", ["--groups", "4"]), ("in", []), ("ln", [])):
            metrics = os.path.join(tmp, f"{norm}.json")
            checkpoint = os.path.join(tmp, f"{norm}.safetensors")
            cmd = [train, "run", "--norm", norm, "--batch", "4", "--epochs", "2", "--limit-train",
                   "600", "--limit-test", "300", "--widths", "8,12,16", "--lr-decay-at", "0.5",
                   "--threads", "2", "--quiet", "--metrics-out", metrics, "--checkpoint", checkpoint,
                   *extra]
            if data_dir:
                cmd += ["--data", data_dir]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(metrics) as f:
                m = json.load(f)
            timing = ("seconds", "images_per_s")
            # Results added after the recording are new fields, not changed bits of old ones.
            added = ("test_error_precise",)
            kept = {k: v for k, v in m.items() if k not in timing and k not in added}
            kept["history"] = {k: v for k, v in m.get("history", {}).items() if k not in timing}
            out[f"normkit-train/{norm}/metrics"] = hashlib.sha256(
                json.dumps(kept, sort_keys=True).encode()).hexdigest()
            out[f"normkit-train/{norm}/checkpoint"] = checkpoint_digest(checkpoint, timing)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["record", "check", "print"])
    parser.add_argument("--python-dir", required=True, help="folder holding the built normkit module")
    parser.add_argument("--train", required=True, help="the normkit-train program")
    parser.add_argument("--api-bits", required=True, help="the golden_api_bits program")
    parser.add_argument("--data", default="", help="Fashion-MNIST folder (default: normkit-train's)")
    args = parser.parse_args()

    sys.path.insert(0, os.path.abspath(args.python_dir))
    import normkit
    normkit.set_num_threads(2)
    now = python_fingerprints(normkit)
    api = subprocess.run([os.path.abspath(args.api_bits)], check=True, capture_output=True, text=True)
    for line in api.stdout.splitlines():
        name, value = line.rsplit(" ", 1)
        now[f"api/{name}"] = value
    now.update(train_fingerprints(os.path.abspath(args.train), args.data))

    key = machine_key()
    store = {}
    if os.path.exists(STORE):
        with open(STORE) as f:
            store = json.load(f)
    if args.mode == "print":
        json.dump(now, sys.stdout, indent=1, sort_keys=True)
        return 0
    if args.mode == "record":
        store[key] = now
        with open(STORE, "w") as f:
            json.dump(store, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"recorded {len(now)} fingerprints for {key}")
        return 0
    if key not in store:
        print(f"SKIPPED: no fingerprints recorded for this CPU ({key}); record them from a build "
              f"of the commit to compare against with `{os.path.basename(__file__)} record`")
        return SKIPPED
    expected = store[key]
    changed = sorted(k for k in expected if now.get(k) != expected[k])
    missing = sorted(k for k in now if k not in expected)
    for k in changed:
        print(f"CHANGED: {k}")
    for k in missing:
        print(f"NOT RECORDED: {k}")
    print(f"{len(expected) - len(changed)} of {len(expected)} fingerprints unchanged")
    return 1 if changed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
