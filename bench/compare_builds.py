#!/usr/bin/env python3
"""Per-case speed of one normkit-bench build against another, from interleaved runs.

    compare_builds.py BEFORE.csv[,BEFORE2.csv...] AFTER.csv[,AFTER2.csv...]

Each CSV is one normkit-bench run (--csv). A case's figure is normkit's time over the copy's
time in the same run (the copy absorbs the machine's drift); over several runs, the median of
those ratios. Prints a Markdown table of after/before per case, then the median and the spread
of the ratio, and the cases beyond it.
"""
import csv
import statistics
import sys


def runs(paths):
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
                by_case.setdefault(key, []).append(float(r["median_ms"]) / copy[key])
    return by_case


def main():
    before_runs, after_runs = runs(sys.argv[1]), runs(sys.argv[2])
    before = {k: statistics.median(v) for k, v in before_runs.items()}
    after = {k: statistics.median(v) for k, v in after_runs.items()}
    keys = sorted(set(before) & set(after))
    print("| set | op | shape | format | dtype | threads | before x/copy | after x/copy | after/before |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    change = []
    for k in keys:
        r = after[k] / before[k]
        change.append(r)
        print("| " + " | ".join(k) + f" | {before[k]:.3f} | {after[k]:.3f} | {r:.3f} |")
    q = statistics.quantiles(change, n=10)
    print(f"\n{len(keys)} cases; after/before: median {statistics.median(change):.3f}, "
          f"10th-90th percentile {q[0]:.3f}-{q[-1]:.3f}, "
          f"geometric mean {statistics.geometric_mean(change):.3f}")
    slower = [k for k in keys if min(after_runs[k]) > max(before_runs[k])]
    faster = [k for k in keys if max(after_runs[k]) < min(before_runs[k])]
    print(f"slower in every run: {len(slower)}; faster in every run: {len(faster)}")
    for k in slower:
        print(f"- slower: {' '.join(k)}: {after[k] / before[k]:.3f} "
              f"(before {min(before_runs[k]):.3f}-{max(before_runs[k]):.3f}, "
              f"after {min(after_runs[k]):.3f}-{max(after_runs[k]):.3f} x/copy)")
    for k in faster:
        print(f"- faster: {' '.join(k)}: {after[k] / before[k]:.3f}")

if __name__ == "__main__":
    main()
