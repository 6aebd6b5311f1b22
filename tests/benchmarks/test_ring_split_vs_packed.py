"""``make bench-ring`` runs: both tables (one process; two processes over vhost-user) come
out whole with tiny settings. What the figures say is for the reader: no timing asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers.paths import ROOT, SRC

pytestmark = pytest.mark.timeout(240)


def test_bench_ring_prints_both_tables_with_every_cell() -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ring_split_vs_packed.py"), "--rounds", "2",
         "--requests", "64", "--requests-2p", "16"],
        capture_output=True, text=True, env=env, timeout=200, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "in one process: ns per request" in out
    assert "two processes over vhost-user" in out
    cell = re.compile(r"^(plain|event_idx|in_order|event_idx\+in_order)\s+(1|8|64)\s+"
                      r"(\d+ / \d+ / \d+)\s+(\d+ / \d+ / \d+)\s+\d+\.\d\d \[\d+\.\d\d-\d+\.\d\d\]"
                      r"\s+(packed faster|packed slower|undecided)$", re.M)
    rows = cell.findall(out)
    assert len(rows) == 2 * 12, out  # 4 configurations x 3 batch sizes, per table
