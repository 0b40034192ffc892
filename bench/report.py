#!/usr/bin/env python3
"""Turns bench/run.sh's measurements into a Markdown report.

Usage: report.py ROWS.tsv RESULTS.tsv

ROWS.tsv:    row, unit, description            (one line per table row, in order)
RESULTS.tsv: row, system, round, value, note   (value: a number, "failed" or "n/a";
                                                note: e.g. "buffered", or why it failed)

Prints the table of medians with the ratios ours/raw, ours/qsd and qsd/raw,
then every round's values, then the notes (fallbacks and failures).
"""
import statistics
import sys
from collections import defaultdict

SYSTEMS = ("raw", "qcow2fuse", "qsd")
LOWER_IS_BETTER = {"s", "ms", "MiB", "ratio"}


def number(text):
    try:
        return float(text)
    except ValueError:
        return None


def fmt(value, unit):
    if unit == "IOPS":
        return f"{value:,.0f}"
    if unit == "ms" and value < 0.1:
        return f"{value:.4f}"
    if unit in ("s", "ms"):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if unit == "ratio":
        return f"{value:.2f}"
    return f"{value:,.1f}"


def main():
    rows_path, results_path = sys.argv[1:3]
    rows = []
    for line in open(rows_path):
        row, unit, desc = line.rstrip("\n").split("\t")
        rows.append((row, unit, desc))

    values = defaultdict(list)  # (row, system) -> [(round, text, note)]
    for line in open(results_path):
        row, system, rnd, value, note = line.rstrip("\n").split("\t")
        values[(row, system)].append((int(rnd), value, note))

    medians = {}
    cells = {}
    footnotes = []
    for row, unit, _ in rows:
        for system in SYSTEMS:
            runs = values.get((row, system), [])
            nums = [number(v) for _, v, _ in runs]
            ok = [n for n in nums if n is not None]
            if not runs:
                cells[(row, system)] = "-"
                continue
            if all(v == "n/a" for _, v, _ in runs):
                cells[(row, system)] = "n/a"
                continue
            if not ok:
                cells[(row, system)] = "failed"
                continue
            median = statistics.median(ok)
            medians[(row, system)] = median
            text = fmt(median, unit)
            if len(ok) < len(runs):
                text += f" ({len(ok)}/{len(runs)} ok)"
            notes = sorted({n for (_, v, n), x in zip(runs, nums) if x is not None and n})
            for note in notes:
                footnotes.append(f"{row} / {system}: {note}")
                text += f" [{note}]"
            cells[(row, system)] = text
        for system in SYSTEMS:
            for rnd, v, note in values.get((row, system), []):
                if number(v) is None and v != "n/a":
                    footnotes.append(f"{row} / {system} round {rnd}: failed: {note}")

    def ratio(row, a, b):
        x, y = medians.get((row, a)), medians.get((row, b))
        if x is None or y is None or y == 0:
            return "-"
        return f"{x / y:.2f}"

    print("| workload | unit | raw | qcow2fuse | qsd | ours/raw | ours/qsd | qsd/raw |")
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for row, unit, _ in rows:
        arrow = "↓" if unit in LOWER_IS_BETTER else "↑"
        print(f"| {row} | {unit} {arrow} | {cells[(row, 'raw')]} | {cells[(row, 'qcow2fuse')]} | "
              f"{cells[(row, 'qsd')]} | {ratio(row, 'qcow2fuse', 'raw')} | "
              f"{ratio(row, 'qcow2fuse', 'qsd')} | {ratio(row, 'qsd', 'raw')} |")
    print()
    print("Medians over the rounds. ↑: higher is better, ↓: lower is better (so a ratio")
    print("above 1 is good for ↑ rows and bad for ↓ rows). qsd = qemu-storage-daemon's FUSE export.")
    if any("[buffered]" in c for c in cells.values()):
        print("[buffered]: O_DIRECT on the view failed, so that cell ran buffered instead.")
    print()
    print("Workloads:")
    print()
    seen = set()
    for row, unit, desc in rows:
        if desc not in seen:
            seen.add(desc)
            print(f"- {row}: {desc}")
    print()
    print("Every round (raw / qcow2fuse / qsd):")
    print()
    for row, unit, _ in rows:
        parts = []
        for system in SYSTEMS:
            runs = sorted(values.get((row, system), []))
            parts.append(", ".join(v for _, v, _ in runs) or "-")
        print(f"- {row}: " + " / ".join(parts))
    if footnotes:
        print()
        print("Notes:")
        print()
        for note in dict.fromkeys(footnotes):
            print(f"- {note}")


if __name__ == "__main__":
    main()
