#!/usr/bin/env python3
"""Turns normkit-bench's CSV into Markdown tables (for docs/benchmarks.md).

    python3 bench/csv_to_markdown.py results.csv [--threads 2] > tables.md

Per thread count: one table per shape set (median ms, normkit's GB/s, each candidate's time over
the same-thread copy, and each anchor's time over normkit's), then the geometric means against
the anchors and the cases that miss a target (ratio to copy, shapes >= 1 MB). With the passes
yardstick in the CSV (normkit-bench --passes), also its time over the copy and normkit's over
its, with medians per op on the shapes that have a target.
"""
import argparse
import csv
import math
from statistics import median
from collections import OrderedDict, defaultdict

TARGETS = {"fwd": 1.3, "fwd_train": 1.3, "fwd_infer": 1.1, "fwd+bwd": 3.0}


def target(op, nbytes):
    """The ratio-to-copy target of a case, or None."""
    if nbytes < 1 << 20 or "+add+relu" in op:  # epilogues move more bytes: no target
        return None
    return TARGETS.get(op.split(".", 1)[1])


def target_of_op(op):
    return TARGETS.get(op.split(".", 1)[1])


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def fnum(v, digits=2):
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--threads", help="only these thread counts (comma-separated)")
    args = ap.parse_args()

    cases = OrderedDict()  # (threads, set, op, shape, format, dtype) -> {candidate: row}
    for row in csv.DictReader(open(args.csv)):
        key = (int(row["threads"]), row["set"], row["op"], row["shape"], row["format"],
               row["dtype"])
        cases.setdefault(key, {})[row["candidate"]] = row
    anchors = []
    for rows in cases.values():
        for name in rows:
            if name not in ("copy", "passes", "normkit") and name not in anchors:
                anchors.append(name)
    has_passes = any("passes" in rows for rows in cases.values())
    threads = sorted({k[0] for k in cases})
    if args.threads:
        threads = [t for t in threads if str(t) in args.threads.split(",")]

    def ms(row):
        ok = row and row["median_ms"] and row["status"] in ("ok", "unchecked")
        return float(row["median_ms"]) if ok else None

    for t in threads:
        print(f"\n### {t} thread{'s' if t > 1 else ''}\n")
        print("Median ms per call. *x/copy*: time over a same-thread copy of the input bytes "
              "(**bold**: misses its target). *vs X*: X's time over normkit's (above 1: normkit "
              "is faster).")
        if has_passes:
            print("*passes x/copy*: the op's own passes over memory (normkit-bench --passes) over "
                  "the copy; *normkit x/passes*: normkit's time over theirs.")
        current_set = None
        speedups = defaultdict(list)
        by_op = defaultdict(lambda: defaultdict(list))
        misses = []
        over_passes = defaultdict(list)  # op -> [(passes/copy, normkit/passes)]
        for key, rows in cases.items():
            if key[0] != t:
                continue
            _, set_name, op, shape, fmt, dtype = key
            if set_name != current_set:
                current_set = set_name
                head = ["op", "shape", "format", "MB", "copy ms", "normkit ms", "GB/s",
                        "normkit x/copy"] + \
                       (["passes x/copy", "normkit x/passes"] if has_passes else []) + \
                       [f"{a} x/copy" for a in anchors] + \
                       [f"vs {a}" for a in anchors] + ["check"]
                print(f"\n**{set_name}**\n")
                print("| " + " | ".join(head) + " |")
                print("|" + "---|" * len(head))
            copy = ms(rows.get("copy"))
            nk = ms(rows.get("normkit"))
            nbytes = int(rows["copy"]["bytes"]) if "copy" in rows else 0
            ratio = nk / copy if nk and copy else None
            tgt = target(op, nbytes)
            ratio_s = fnum(ratio)
            if tgt and ratio and ratio > tgt:
                ratio_s = f"**{ratio_s}**"
                misses.append((ratio / tgt, f"{set_name} {op} {shape} {fmt}", ratio, tgt))
            gbps = f'{float(rows["normkit"]["gb_per_s"]):.1f}' if nk else "–"
            cells = [op, shape, fmt, f"{nbytes / 1e6:.1f}", fnum(copy, 3), fnum(nk, 3), gbps,
                     ratio_s]
            if has_passes:
                pm = ms(rows.get("passes"))
                cells += [fnum(pm / copy if pm and copy else None),
                          fnum(nk / pm if pm and nk else None)]
                if tgt and pm and nk and copy:
                    over_passes[op].append((pm / copy, nk / pm))
            for a in anchors:
                am = ms(rows.get(a))
                cells.append(fnum(am / copy if am and copy else None))
            for a in anchors:
                am = ms(rows.get(a))
                s = am / nk if am and nk else None
                cells.append(fnum(s) + ("×" if s else ""))
                if s:
                    speedups[a].append(s)
                    by_op[a][op].append(s)
            bad = [f"{n}: {r['status']}" for n, r in rows.items()
                   if r["status"] not in ("ok", "unchecked")
                   and not r["status"].startswith("skipped")]
            cells.append("; ".join(bad) if bad else "ok")
            print("| " + " | ".join(cells) + " |")
        print()
        for a in anchors:
            if not speedups[a]:
                continue
            ops = ", ".join(f"{op} {geomean(v):.2f}×" for op, v in sorted(by_op[a].items()))
            slower = sum(s < 1 for s in speedups[a])
            print(f"- normkit vs {a}: geometric mean speedup **{geomean(speedups[a]):.2f}×** over "
                  f"{len(speedups[a])} cases ({ops}); {a} faster in {slower} cases.")
        for op, v in sorted(over_passes.items()):
            p = [a for a, _ in v]
            o = [b for _, b in v]
            print(f"- {op} (shapes ≥ 1 MB, {len(v)}): passes {median(p):.2f}× copy, "
                  f"normkit {median(o):.2f}× passes (medians); passes within the target in "
                  f"{sum(a <= target_of_op(op) for a in p)}.")
        misses.sort(reverse=True)
        print(f"- targets missed (shapes ≥ 1 MB): {len(misses)}"
              + ("; worst first:" if misses else ""))
        for over, label, ratio, tgt in misses:
            print(f"  - {label}: {ratio:.2f}× copy vs ≤ {tgt} (+{100 * (over - 1):.0f}%)")


if __name__ == "__main__":
    main()
