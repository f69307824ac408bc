#!/usr/bin/env python3
"""Per-case speed of one normkit-bench build against another, from interleaved runs.

    compare_builds.py BEFORE.csv[,BEFORE2.csv...] AFTER.csv[,AFTER2.csv...]

Each CSV is one normkit-bench run (--csv). A case's figure is normkit's time over the copy's
time in the same run (the copy absorbs the machine's drift); over several runs, the median of
those ratios. Prints a Markdown table of after/before per case, then the median and the spread
of the ratio, and the cases beyond it.

Beside it, each case's after/before of normkit's own time and of the copy's (medians of the
runs' milliseconds). The copy of a shape that fits the L3 (8 to 16 MB on a 32 MiB L3) moves
with whatever else runs on the machine far more than normkit does, so a ratio that moves with
the copy's column and not normkit's is the yardstick moving, not the kernel.
"""
import csv
import statistics
import sys


def runs(paths):
    """Per case: normkit's time over the copy's, normkit's ms and the copy's ms, one per run."""
    by_case = {}
    for path in paths.split(","):
        rows = list(csv.DictReader(open(path)))
        copy = {}
        for r in rows:
            key = (r["set"], r["op"], r["shape"], r["format"], r["dtype"], r["threads"])
            if r["candidate"] == "copy":
                copy[key] = float(r["median_ms"])
        for r in rows:
            key = (r["set"], r["op"], r["shape"], r["format"], r["dtype"], r["threads"])
            if r["candidate"] == "normkit" and r["status"] == "ok" and key in copy:
                ms = float(r["median_ms"])
                by_case.setdefault(key, []).append((ms / copy[key], ms, copy[key]))
    return by_case


def medians(by_case, field):
    return {k: statistics.median(v[field] for v in vs) for k, vs in by_case.items()}


def main():
    before_runs, after_runs = runs(sys.argv[1]), runs(sys.argv[2])
    before, after = medians(before_runs, 0), medians(after_runs, 0)
    before_ms, after_ms = medians(before_runs, 1), medians(after_runs, 1)
    before_copy, after_copy = medians(before_runs, 2), medians(after_runs, 2)
    keys = sorted(set(before) & set(after))
    print("| set | op | shape | format | dtype | threads | before x/copy | after x/copy | after/before "
          "| normkit ms after/before | copy ms after/before |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    change, change_ms = [], []
    for k in keys:
        r = after[k] / before[k]
        r_ms = after_ms[k] / before_ms[k]
        change.append(r)
        change_ms.append(r_ms)
        print("| " + " | ".join(k) + f" | {before[k]:.3f} | {after[k]:.3f} | {r:.3f} | {r_ms:.3f} "
              f"| {after_copy[k] / before_copy[k]:.3f} |")
    q = statistics.quantiles(change, n=10)
    print(f"\n{len(keys)} cases; after/before: median {statistics.median(change):.3f}, "
          f"10th-90th percentile {q[0]:.3f}-{q[-1]:.3f}, "
          f"geometric mean {statistics.geometric_mean(change):.3f}; "
          f"normkit's own time after/before: median {statistics.median(change_ms):.3f}")

    def ratios(by_case, k):
        return [v[0] for v in by_case[k]]

    slower = [k for k in keys if min(ratios(after_runs, k)) > max(ratios(before_runs, k))]
    faster = [k for k in keys if max(ratios(after_runs, k)) < min(ratios(before_runs, k))]
    print(f"slower in every run: {len(slower)}; faster in every run: {len(faster)}")
    for k in slower:
        print(f"- slower: {' '.join(k)}: {after[k] / before[k]:.3f} "
              f"(before {min(ratios(before_runs, k)):.3f}-{max(ratios(before_runs, k)):.3f}, "
              f"after {min(ratios(after_runs, k)):.3f}-{max(ratios(after_runs, k)):.3f} x/copy; "
              f"normkit's time {after_ms[k] / before_ms[k]:.3f}, "
              f"the copy's {after_copy[k] / before_copy[k]:.3f})")
    for k in faster:
        print(f"- faster: {' '.join(k)}: {after[k] / before[k]:.3f}")

if __name__ == "__main__":
    main()
