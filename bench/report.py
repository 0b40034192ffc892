#!/usr/bin/env python3
"""Turns bench/run.sh's measurements into a Markdown report.

Usage: report.py ROWS.tsv RESULTS.tsv

ROWS.tsv:    row, unit, description            (one line per table row, in order)
RESULTS.tsv: row, system, round, value, note   (value: a number, "failed" or "n/a";
                                                note: e.g. "buffered", or why it failed)

Prints the table of medians with the ratios ours/raw, ours/qsd and qsd/raw
and, for the rows that have one, the target and whether the medians meet it
(and in how many rounds), then every round's values, then the notes
(fallbacks and failures).
"""
import re
import statistics
import sys
from collections import defaultdict

SYSTEMS = ("raw", "qcow2fuse", "qsd")
LOWER_IS_BETTER = {"s", "ms", "MiB", "ratio"}

# The speed targets qcow2fuse is held to: (row pattern, the system compared
# with, the bound on qcow2fuse's value divided by that system's). For rows
# where lower is better (seconds, MiB) the ratio must stay at or below the
# bound; for the others at or above it. "At least 0.85x the raw file's
# speed" on a row of seconds is a time of at most 1/0.85 = 1.18x raw's.
TARGETS = (
    (r"seq-read-1M-cold", "raw", 0.9),
    (r"seq-write-1M-fsync", "raw", 0.85),
    (r"rand-read-4k-psync4-hot", "qsd", 3.0),
    (r"rand-write-alloc-4k-qd32", "qsd", 2.0),
    (r"rand-write-alloc-4k-psync4", "qsd", 1.55),
    (r"rand-write-over-4k-(psync4|qd32)", "raw", 1.0),
    (r"cp-sparse-.*", "raw", 1.0),  # raw column: qemu-img convert
    (r"read-zstd-1M-cold", "qsd", 2.5),
    (r"read-zlib-1M-cold", "qsd", 3.0),
    (r"mount-first-read-.*", "qsd", 1.1),
    (r"rss-peak-.*", "qsd", 1.0),
    (r"ext4-unpack-\d+M", "raw", round(1 / 0.85, 2)),
    (r"ext4-read-tree-\d+M", "raw", round(1 / 0.9, 2)),
)


def target_of(row):
    for pattern, against, bound in TARGETS:
        if re.fullmatch(pattern, row):
            return against, bound
    return None


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

    def target(row, unit):
        found = target_of(row)
        if found is None:
            return ""
        against, bound = found
        lower = unit in LOWER_IS_BETTER

        def meets(x, y):
            return y > 0 and (x / y <= bound if lower else x / y >= bound)

        text = f"{'≤' if lower else '≥'} {bound:g}× {against}"
        x, y = medians.get((row, "qcow2fuse")), medians.get((row, against))
        if x is None or y is None:
            return text + ": not measured"
        text += ": met" if meets(x, y) else ": **missed**"
        # Round by round: the machine drifts, the medians may hide it.
        ours = {r: number(v) for r, v, _ in values.get((row, "qcow2fuse"), [])}
        theirs = {r: number(v) for r, v, _ in values.get((row, against), [])}
        paired = [r for r in ours if ours[r] is not None and theirs.get(r) is not None]
        if len(paired) > 1:
            met = sum(meets(ours[r], theirs[r]) for r in paired)
            text += f" ({met} of {len(paired)} rounds)"
        return text

    print("| workload | unit | raw | qcow2fuse | qsd | ours/raw | ours/qsd | qsd/raw | target |")
    print("|---|---|--:|--:|--:|--:|--:|--:|---|")
    for row, unit, _ in rows:
        arrow = "↓" if unit in LOWER_IS_BETTER else "↑"
        print(f"| {row} | {unit} {arrow} | {cells[(row, 'raw')]} | {cells[(row, 'qcow2fuse')]} | "
              f"{cells[(row, 'qsd')]} | {ratio(row, 'qcow2fuse', 'raw')} | "
              f"{ratio(row, 'qcow2fuse', 'qsd')} | {ratio(row, 'qsd', 'raw')} | {target(row, unit)} |")
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
