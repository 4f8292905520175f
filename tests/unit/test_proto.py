"""The API contract: buf lint, no breaking change against the previous commit, and
generated code that is exactly what the committed proto produces."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).parent / "buf"


def buf() -> str:
    if not BUF.exists():
        pytest.fail(f"{BUF} missing: pip install buf-bin (scripts/bootstrap does)")
    return str(BUF)


def test_buf_lint():
    r = subprocess.run([buf(), "lint"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_buf_breaking_against_previous_commit():
    prev = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", "HEAD~1"], cwd=REPO, capture_output=True, text=True
    )
    if prev.returncode != 0:
        pytest.skip("this clone has no previous commit to compare the proto against")
    has_proto = subprocess.run(
        ["git", "cat-file", "-e", "HEAD~1:proto/netferry/v1/host.proto"], cwd=REPO
    )
    if has_proto.returncode != 0:
        pytest.skip("the previous commit has no proto to compare against")
    r = subprocess.run(
        [buf(), "breaking", "--against", ".git#ref=HEAD~1"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_python_stubs_are_regenerated_identically(tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    subprocess.run([str(REPO / "scripts" / "gen-proto"), str(out)], cwd=REPO, check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})  # fmt: skip
    committed = REPO / "clients" / "python" / "netferry" / "v1"
    generated = out / "netferry" / "v1"
    names = sorted(p.name for p in generated.iterdir() if p.is_file())
    assert names == sorted(
        p.name for p in committed.iterdir() if p.is_file() and p.suffix != ".pyc"
    )
    cmp = filecmp.cmpfiles(committed, generated, names, shallow=False)
    assert cmp[1] == [] and cmp[2] == [], (
        f"stale generated files: {cmp[1] + cmp[2]}; run scripts/gen-proto"
    )
    shutil.rmtree(out)
