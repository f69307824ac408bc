#!/usr/bin/python3
"""The fine-tuning study (docs/studies.md): per seed, pretrain BN and GN at batch 32 on classes
0-4 (with a checkpoint), then fine-tune at batch 2 on classes 5-9 with BN and frozen BN (both from
the BN checkpoint) and GN (from the GN checkpoint). Runs are `normkit-train run` processes, two at
a time by default; a fine-tuning run starts as soon as its checkpoint is written, so one seed's
fine-tuning overlaps the next seed's pretraining.

    /usr/bin/python3 scripts/finetune_study.py --out runs/studies/finetune --seeds 1,2,3 \\
        [--pretrain-epochs 2] [--finetune-epochs 2] [--jobs 2] [-- MORE RUN OPTIONS]

Options after `--` go to every run (e.g. --data DIR --limit-train 2000 --limit-test 500
--widths 8,16,32). Writes OUT/results.csv (one row per run), OUT/results.md (mean ± sample std
over seeds per arm, and every run), OUT/runs/ (each run's metrics JSON and log) and
OUT/checkpoints/. Exits 1 naming the log of a run that failed, 2 on bad arguments.
"""

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FIRST, SECOND = "0,1,2,3,4", "5,6,7,8,9"
PRETRAIN_BATCH, FINETUNE_BATCH = 32, 2
# (arm, norm, checkpoint it starts from): the fine-tuning arms, in table order.
FINETUNE_ARMS = (("BN", "bn", "bn"), ("frozen BN", "frozen", "bn"), ("GN", "gn", "gn"))
PRETRAIN_ARMS = (("BN", "bn"), ("GN", "gn"))
COLUMNS = ("phase", "arm", "norm", "batch", "classes", "epochs", "seed", "test_error",
           "test_loss", "train_loss", "images_per_s", "seconds")


@dataclass
class Run:
    name: str                 # file stem under runs/
    phase: str                # "pretrain" or "finetune"
    arm: str
    norm: str
    seed: int
    epochs: int
    args: list
    after: list = field(default_factory=list)  # names of runs that must finish first


def default_train():
    here = Path(__file__).resolve().parents[1]
    return os.environ.get("NORMKIT_TRAIN") or str(here / "build" / "bin" / "normkit-train")


def parse_args(argv):
    more = []
    if "--" in argv:
        at = argv.index("--")
        argv, more = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seeds", default="1,2,3", help="seeds, e.g. 1,2,3")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each by default)")
    p.add_argument("--train", default=default_train(),
                   help="the normkit-train executable (default: $NORMKIT_TRAIN or build/bin/)")
    a = p.parse_args(argv)
    try:
        a.seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: expected whole numbers separated by commas, e.g. 1,2,3")
    if not a.seeds or len(set(a.seeds)) != len(a.seeds) or min(a.seeds) < 0:
        p.error(f"--seeds {a.seeds}: expected distinct seeds >= 0")
    for name in ("pretrain_epochs", "finetune_epochs", "jobs"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if not os.access(a.train, os.X_OK):
        p.error(f"--train {a.train}: not an executable; build normkit-train first")
    a.more = more
    return a


def plan(a, out):
    """Every run of the study, with the runs each waits for."""
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    common = ["--threads", str(threads), "--quiet", *a.more]
    runs = []
    for seed in a.seeds:
        for arm, norm in PRETRAIN_ARMS:
            name = f"pretrain_{norm}_s{seed}"
            runs.append(Run(name, "pretrain", arm, norm, seed, a.pretrain_epochs, [
                "run", "--norm", norm, "--batch", str(PRETRAIN_BATCH), "--classes", FIRST,
                "--epochs", str(a.pretrain_epochs), "--seed", str(seed),
                "--checkpoint", str(out / "checkpoints" / f"{name}.safetensors"), *common]))
        for arm, norm, source in FINETUNE_ARMS:
            name = f"finetune_{norm}_s{seed}"
            checkpoint = out / "checkpoints" / f"pretrain_{source}_s{seed}.safetensors"
            runs.append(Run(name, "finetune", arm, norm, seed, a.finetune_epochs, [
                "run", "--norm", norm, "--batch", str(FINETUNE_BATCH), "--classes", SECOND,
                "--epochs", str(a.finetune_epochs), "--seed", str(seed),
                "--init-from", str(checkpoint), *common], after=[f"pretrain_{source}_s{seed}"]))
    for r in runs:
        r.args += ["--metrics-out", str(out / "runs" / f"{r.name}.json")]
    return runs


def execute(a, runs, out):
    """Runs them, at most a.jobs at once, each after the runs it waits for; stops all on a failure."""
    waiting, running, done = list(runs), {}, set()
    started = time.monotonic()
    while waiting or running:
        for r in [r for r in waiting if all(d in done for d in r.after)]:
            if len(running) >= a.jobs:
                break
            log = open(out / "runs" / f"{r.name}.log", "w")
            running[r.name] = (r, subprocess.Popen([a.train, *r.args], stdout=log,
                                                   stderr=subprocess.STDOUT), log)
            waiting.remove(r)
        time.sleep(0.2)
        for name, (r, proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                for _, other, _ in running.values():
                    other.terminate()
                for _, other, _ in running.values():
                    other.wait()
                sys.exit(f"finetune_study: the run {name} failed (exit {proc.returncode}); "
                         f"see {out / 'runs' / (name + '.log')}")
            done.add(name)
            m = json.loads((out / "runs" / f"{name}.json").read_text())
            print(f"[{len(done)}/{len(runs)}] {r.phase} {r.arm} seed {r.seed}: test error "
                  f"{m['test_error']:.2f}%, {time.monotonic() - started:.0f} s elapsed", flush=True)


def rows_of(runs, out):
    rows = []
    for r in runs:
        m = json.loads((out / "runs" / f"{r.name}.json").read_text())
        rows.append({"phase": r.phase, "arm": r.arm, "norm": r.norm, "batch": m["batch"],
                     "classes": FIRST if r.phase == "pretrain" else SECOND, "epochs": m["epochs"],
                     "seed": r.seed, **{k: m.get(k) for k in COLUMNS[7:]}})
    return rows


def mean_sd(values, digits=2):
    """'mean ± sd (n=k)' over the finite values, sd the sample standard deviation; a run whose
    value is not finite (a diverged loss) is counted beside them."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    bad = len(values) - len(v)
    note = f", {bad} diverged" if bad else ""
    if not v:
        return "diverged" if bad else "—"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}{note}"
    return f"{statistics.fmean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f} (n={len(v)}){note}"


def markdown(rows, a):
    seeds = ", ".join(map(str, a.seeds))
    out = ["# Fine-tuning study", "",
           f"Pretrained at batch {PRETRAIN_BATCH} on classes {FIRST} for {a.pretrain_epochs} "
           f"epoch(s), then fine-tuned at batch {FINETUNE_BATCH} on classes {SECOND} for "
           f"{a.finetune_epochs} epoch(s) from the pretrained weights (a new classifier, a fresh "
           f"optimizer): BN and frozen BN from the BN checkpoint, GN from the GN checkpoint. "
           f"Seeds {seeds}; cells are mean ± sample standard deviation over the seeds."
           + (f" Options of every run: `{' '.join(a.more)}`." if a.more else ""), ""]
    for phase, title in (("finetune", f"Fine-tuned at batch {FINETUNE_BATCH}, classes {SECOND}"),
                         ("pretrain", f"Pretrained at batch {PRETRAIN_BATCH}, classes {FIRST}")):
        out += [f"## {title}", "", "| arm | test error (%) | training loss, last epoch |",
                "|---|---:|---:|"]
        for arm in dict.fromkeys(r["arm"] for r in rows if r["phase"] == phase):
            cell = [r for r in rows if r["phase"] == phase and r["arm"] == arm]
            errors = [r["test_error"] for r in cell]
            out.append(f"| {arm} | {mean_sd(errors)} | {mean_sd([r['train_loss'] for r in cell], 4)} |")
        out.append("")
    out += ["## Every run", "", "| phase | arm | seed | test error (%) | train loss | images/s |",
            "|---|---|---:|---:|---:|---:|"]
    number = lambda v, f: "—" if v is None or not math.isfinite(v) else format(v, f)
    for r in rows:
        out.append(f"| {r['phase']} | {r['arm']} | {r['seed']} | {number(r['test_error'], '.2f')} | "
                   f"{number(r['train_loss'], '.4f')} | {number(r['images_per_s'], '.0f')} |")
    return "\n".join(out) + "\n"


def main(argv):
    a = parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"finetune_study: --out {out} is not empty; give a new folder")
    for sub in ("runs", "checkpoints"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    runs = plan(a, out)
    print(f"fine-tuning study: {len(runs)} runs ({len(a.seeds)} seed(s) x 2 pretrain + 3 "
          f"fine-tune), {a.jobs} at a time -> {out}", flush=True)
    execute(a, runs, out)
    rows = rows_of(runs, out)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    (out / "results.md").write_text(markdown(rows, a))
    print(f"wrote {out}/results.csv, {out}/results.md and {out}/runs/")


if __name__ == "__main__":
    main(sys.argv[1:])
