#!/usr/bin/env python3
"""bench/report.py on measurements made up for the purpose.

Usage: report_test.py PATH/TO/report.py
"""
import os
import subprocess
import sys
import tempfile
import unittest

REPORT = None


def run_report(rows, results):
    """rows: [(row, unit)]; results: [(row, system, round, value, note)]."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.tsv")
        results_path = os.path.join(tmp, "results.tsv")
        with open(rows_path, "w") as f:
            for row, unit in rows:
                f.write(f"{row}\t{unit}\tabout {row}\n")
        with open(results_path, "w") as f:
            for r in results:
                f.write("\t".join(str(x) for x in r) + "\n")
        out = subprocess.run([sys.executable, REPORT, rows_path, results_path],
                             check=True, capture_output=True, text=True).stdout
    return out


def table_line(out, row):
    for line in out.splitlines():
        if line.startswith(f"| {row} |"):
            return line
    raise AssertionError(f"no table line for {row} in:\n{out}")


def rounds(row, system, values):
    return [(row, system, i + 1, v, "") for i, v in enumerate(values)]


class TargetColumnTest(unittest.TestCase):
    def test_higher_is_better_row_met_in_the_median_and_counted_per_round(self):
        out = run_report([("seq-read-1M-cold", "MiB/s")],
                         rounds("seq-read-1M-cold", "raw", [100, 100, 100]) +
                         rounds("seq-read-1M-cold", "qcow2fuse", [95, 85, 91]) +
                         rounds("seq-read-1M-cold", "qsd", [50, 50, 50]))
        self.assertIn("| ≥ 0.9× raw: met (2 of 3 rounds) |", table_line(out, "seq-read-1M-cold"))

    def test_lower_is_better_row_missed(self):
        # Seconds: at most 1.11x raw's time (at least 0.9x its speed).
        out = run_report([("ext4-read-tree-200M", "s")],
                         rounds("ext4-read-tree-200M", "raw", [10, 10, 10]) +
                         rounds("ext4-read-tree-200M", "qcow2fuse", [11, 12, 13]) +
                         rounds("ext4-read-tree-200M", "qsd", [14, 14, 14]))
        self.assertIn("| ≤ 1.11× raw: **missed** (1 of 3 rounds) |", table_line(out, "ext4-read-tree-200M"))

    def test_against_qsd(self):
        out = run_report([("rand-read-4k-psync4-hot", "IOPS")],
                         rounds("rand-read-4k-psync4-hot", "qcow2fuse", [300, 290, 310]) +
                         rounds("rand-read-4k-psync4-hot", "qsd", [100, 100, 100]))
        self.assertIn("| ≥ 3× qsd: met (2 of 3 rounds) |", table_line(out, "rand-read-4k-psync4-hot"))

    def test_not_measured_when_a_side_failed(self):
        out = run_report([("read-zlib-1M-cold", "MiB/s")],
                         rounds("read-zlib-1M-cold", "qcow2fuse", [300]) +
                         [("read-zlib-1M-cold", "qsd", 1, "failed", "mount failed")])
        self.assertIn("| ≥ 3× qsd: not measured |", table_line(out, "read-zlib-1M-cold"))

    def test_rows_without_a_target_and_variants_get_none(self):
        rows = [("rand-read-4k-qd32-hot", "IOPS"), ("ext4-read-tree-200M-dio", "s")]
        results = (rounds("rand-read-4k-qd32-hot", "qcow2fuse", [5]) + rounds("rand-read-4k-qd32-hot", "qsd", [1]) +
                   rounds("ext4-read-tree-200M-dio", "raw", [1]) +
                   rounds("ext4-read-tree-200M-dio", "qcow2fuse", [9]))
        out = run_report(rows, results)
        for row, _ in rows:
            self.assertTrue(table_line(out, row).endswith("|  |"), table_line(out, row))

    def test_one_round_gives_no_round_count(self):
        out = run_report([("cp-sparse-64G-200M", "s")],
                         rounds("cp-sparse-64G-200M", "raw", [0.5]) + rounds("cp-sparse-64G-200M", "qcow2fuse", [0.5]))
        self.assertIn("| ≤ 1× raw: met |", table_line(out, "cp-sparse-64G-200M"))


if __name__ == "__main__":
    REPORT = sys.argv.pop(1)
    unittest.main()
