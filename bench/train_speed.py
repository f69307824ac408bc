#!/usr/bin/env python3
"""Training speed of normkit-train against PyTorch on the same network, data and threads.

Both train the residual CNN of normkit-train (stem conv 16, basic blocks 16 -> 32 -> 64, stride 2
in the last two, global average pooling, linear; BN or GN) on Fashion-MNIST with the same recipe
(SGD momentum 0.9, weight decay 1e-4, lr 0.1 * N / 32) for a fixed number of steps at each batch
size, and the script prints training images per second side by side. Each measurement is the
whole training loop (batch assembly, forward, backward, update), warm-up steps excluded; each
configuration runs both back to back --repeat times and keeps the best of each. Besides wall
time, both report the CPU time of the timed steps (the whole process, every thread), so that on a
machine shared with other work --threads 1 gives a usable images-per-CPU-second comparison.

    /usr/bin/python3 bench/train_speed.py                      # batch 32 and 2, BN and GN
    /usr/bin/python3 bench/train_speed.py --accuracy           # also compare test error

PyTorch runs in a child process of --python (default: ../venv-anchors/bin/python next to the
repository, made by scripts/setup-anchors.sh, when it has torch, else /usr/bin/python3, Debian's
torch 1.13), limited to --threads intra-op threads.
"""
import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------------------------------------
# PyTorch side (runs in the --python interpreter)

def read_idx(path):
    import numpy as np
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split, limit, data_dir):
    import numpy as np
    images = read_idx(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz"))[:limit]
    labels = read_idx(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz"))[:limit]
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)


def build_model(torch, norm, groups, widths):
    nn = torch.nn

    def make_norm(c):
        return nn.BatchNorm2d(c) if norm == "bn" else nn.GroupNorm(groups, c)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.norm1 = make_norm(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.norm2 = make_norm(cout)
            nn.init.zeros_(self.norm2.weight)  # each residual branch starts at zero
            self.shortcut = None
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), make_norm(cout))

        def forward(self, x):
            y = torch.relu(self.norm1(self.conv1(x)))
            y = self.norm2(self.conv2(y))
            return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))

    layers = [nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), make_norm(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        layers.append(Block(cin, w, 1 if i == 0 else 2))
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def torch_worker(args):
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    results = []
    for norm in args.norms.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            steps = args.steps * 32 // batch if args.accuracy else steps_for(args, batch)
            limit = args.limit_train if args.accuracy else (steps + args.warmup) * batch
            x_np, y_np = load("train", limit, args.data)
            mean, std = float(x_np.mean()), float(x_np.std())
            x = torch.from_numpy((x_np - mean) / std).unsqueeze(1).contiguous()
            y = torch.from_numpy(y_np)
            model = build_model(torch, norm, args.groups, [16, 32, 64])
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
            lr0 = 0.1 * batch / 32
            opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=0.9, weight_decay=1e-4)
            model.train()
            steps_per_epoch = len(x) // batch
            total = steps_per_epoch * args.epochs if args.accuracy else steps + args.warmup
            g = torch.Generator().manual_seed(args.seed)
            perm = torch.randperm(len(x), generator=g)
            t0 = c0 = None
            for step in range(total):
                if step == args.warmup:
                    t0 = time.perf_counter()
                    c0 = time.process_time()
                k = step % steps_per_epoch
                if k == 0 and step > 0:
                    perm = torch.randperm(len(x), generator=g)
                if args.accuracy:
                    frac = step / total
                    for group in opt.param_groups:
                        group["lr"] = lr0 * (0.1 if frac >= 0.5 else 1) * (0.1 if frac >= 0.75 else 1)
                idx = perm[k * batch:(k + 1) * batch]
                xb = x[idx]
                if args.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            seconds = time.perf_counter() - t0
            cpu = time.process_time() - c0
            row = {"norm": norm, "batch": batch, "images_per_s": (total - args.warmup) * batch / seconds,
                   "images_per_cpu_s": (total - args.warmup) * batch / cpu, "steps": total - args.warmup}
            if args.accuracy:
                xt_np, yt_np = load("t10k", 10000, args.data)
                xt = torch.from_numpy((xt_np - mean) / std).unsqueeze(1)
                model.eval()
                with torch.no_grad():
                    pred = torch.cat([model(xt[i:i + 500]).argmax(1) for i in range(0, len(xt), 500)])
                row["test_error"] = 100.0 * float((pred != torch.from_numpy(yt_np)).float().mean())
            results.append(row)
            print(json.dumps(row), flush=True)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available())}
    print(json.dumps({"info": info}), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver

def steps_for(args, batch):
    # About the same wall time per batch size: fewer steps for larger batches.
    return max(args.steps * 32 // batch // 4, args.steps // 4) if batch < 32 else args.steps


def default_python():
    # scripts/setup-anchors.sh's default: venv-anchors next to the repository.
    venv = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "venv-anchors",
                        "bin", "python")
    if os.path.exists(venv):
        if subprocess.run([venv, "-c", "import torch"], capture_output=True).returncode == 0:
            return venv
    return "/usr/bin/python3"


def best_of(best, row):
    """The best round of each measure (wall and CPU rates kept separately; test error from the
    round with the best wall rate)."""
    if best is None:
        return dict(row)
    out = dict(row if row["images_per_s"] > best["images_per_s"] else best)
    cpu = [r["images_per_cpu_s"] for r in (best, row) if "images_per_cpu_s" in r]
    if cpu:
        out["images_per_cpu_s"] = max(cpu)
    return out


def run_torch(args, norm, batch):
    cmd = [args.python, os.path.abspath(__file__), "--torch-worker"] + worker_args(args, norm, batch)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"PyTorch side failed:\n{out.stderr}")
    row, info = None, {}
    for line in out.stdout.splitlines():
        obj = json.loads(line)
        if "info" in obj:
            info = obj["info"]
        else:
            row = obj
    return row, info


def worker_args(args, norm, batch):
    out = ["--norms", norm, "--batches", str(batch), "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--groups", str(args.groups),
           "--seed", str(args.seed), "--data", args.data, "--epochs", str(args.epochs),
           "--limit-train", str(args.limit_train)]
    return out + (["--accuracy"] if args.accuracy else []) + (["--channels-last"] if args.channels_last else [])


def run_normkit(args, norm, batch):
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.json")
        if args.accuracy:
            extra = ["--epochs", str(args.epochs), "--limit-train", str(args.limit_train)]
        else:
            # One epoch over exactly steps + warmup batches; normkit-train reports the throughput
            # of the steps after the warm-up.
            extra = ["--epochs", "1", "--limit-train", str((steps_for(args, batch) + args.warmup) * batch),
                     "--limit-test", str(batch * 2), "--warmup-steps", str(args.warmup)]
        cmd = [args.normkit, "run", "--norm", norm, "--groups", str(args.groups), "--batch", str(batch),
               "--threads", str(args.threads), "--seed", str(args.seed), "--data", args.data,
               "--metrics-out", metrics, "--quiet"] + extra
        # NORMKIT_TRAIN_PROFILE=cpu: normkit-train prints the timed steps' CPU time to stderr.
        env = dict(os.environ, NORMKIT_TRAIN_PROFILE="cpu")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"normkit-train failed: {' '.join(cmd)}\n{out.stderr}")
        with open(metrics) as f:
            m = json.load(f)
    row = {"norm": norm, "batch": batch, "images_per_s": m["images_per_s"]}
    measured = re.search(r"measured: (\d+) images, wall [\d.]+ s, CPU ([\d.]+) s", out.stderr)
    if measured and float(measured.group(2)) > 0:
        row["images_per_cpu_s"] = int(measured.group(1)) / float(measured.group(2))
    if args.accuracy:
        row["test_error"] = m["test_error"]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norms", default="bn,gn")
    p.add_argument("--batches", default="32,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=200, help="timed steps at batch 32 (more at smaller batches)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--repeat", type=int, default=2, help="rounds per configuration; the best is kept")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", default=DATA)
    p.add_argument("--python", default=None, help="interpreter with torch (default: see the docstring)")
    p.add_argument("--normkit", default=os.path.join(ROOT, "build", "bin", "normkit-train"))
    p.add_argument("--accuracy", action="store_true",
                   help="instead train --epochs over --limit-train images with lr decay and compare test error")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=20000)
    p.add_argument("--channels-last", action="store_true", help="PyTorch in channels_last (NHWC) memory format")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_worker:
        torch_worker(args)
        return
    args.python = args.python or default_python()
    if not os.path.exists(args.normkit):
        sys.exit(f"{args.normkit} not found: build it first (cmake --build build --target normkit-train)")
    load_before = os.getloadavg()[0]
    # Each configuration runs PyTorch and normkit-train back to back, --repeat times, and keeps
    # the best of each: both see the same machine state, and a passing disturbance costs neither.
    nk_rows, torch_rows, info = [], [], {}
    for norm in args.norms.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            best_nk, best_torch = None, None
            for r in range(args.repeat):
                t, info = run_torch(args, norm, batch)
                n = run_normkit(args, norm, batch)
                print(f"  {norm} batch {batch}, round {r + 1}: normkit-train {n['images_per_s']:.0f}, "
                      f"PyTorch {t['images_per_s']:.0f} images/s; per CPU-second: normkit-train "
                      f"{n.get('images_per_cpu_s', float('nan')):.0f}, PyTorch "
                      f"{t.get('images_per_cpu_s', float('nan')):.0f}", file=sys.stderr)
                best_nk = best_of(best_nk, n)
                best_torch = best_of(best_torch, t)
            nk_rows.append(best_nk)
            torch_rows.append(best_torch)
    blas = subprocess.run([args.normkit, "--version"], capture_output=True, text=True).stdout.strip()
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"\nthreads {args.threads}; PyTorch {info.get('torch')} ({layout}, mkldnn {info.get('mkldnn')}); {blas}")
    head = ("| norm | batch | normkit-train images/s | PyTorch images/s | ratio | "
            "normkit-train images/CPU-s | PyTorch images/CPU-s | CPU ratio |")
    if args.accuracy:
        head += " normkit test error % | PyTorch test error % |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for a, b in zip(nk_rows, torch_rows):
        ca, cb = a.get("images_per_cpu_s", float("nan")), b.get("images_per_cpu_s", float("nan"))
        line = (f"| {a['norm']} | {a['batch']} | {a['images_per_s']:.0f} | {b['images_per_s']:.0f} | "
                f"{a['images_per_s'] / b['images_per_s']:.2f} | {ca:.0f} | {cb:.0f} | {ca / cb:.2f} |")
        if args.accuracy:
            line += f" {a['test_error']:.2f} | {b['test_error']:.2f} |"
        print(line)
    print(f"\n1-minute load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}; "
          f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
