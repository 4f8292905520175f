"""The benchmark must not rot: its one-round smoke run works end to end (no thresholds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.interop
def test_bench_quick_prints_every_row_for_every_contender():
    """run.py exits non-zero when a contender that came up left a row without a figure (or
    a measurement failed), so a run of empty cells fails here."""
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for contender in ("netferry", "netferry-vm", "slirp4netns", "pasta", "netferry-slirp4netns"):
        assert contender in out, out[-2000:]
    assert "netferry-slirp4netns ÷ slirp4netns" in out  # the drop-in against what it replaces
    assert "netferry-vm ÷ slirp4netns" in out  # the VM topology against slirp4netns
    assert "| — " not in out and " — |" not in out, out[-3000:]  # every cell has a figure
    for row in ("guest→host", "host→guest", "conn", "request-response", "UDP", "forward"):
        assert row.lower() in out.lower(), (row, out[-2000:])
    print(out[-4000:])


@pytest.mark.parametrize("offload", [False, True])
def test_core_benchmark_runs(offload):
    """bench/core.py (the sans-IO core in a hot loop) still drives a connection: it exits
    non-zero if a round does not produce exactly one reply frame."""
    args = [sys.executable, str(REPO / "bench" / "core.py"), "--rounds", "300"]
    r = subprocess.run(
        args + (["--offload"] if offload else []),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "µs of core per 1-byte request-response" in r.stdout
