"""The API contract: buf lint, no breaking change against the merge base or last release, and
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


PROTO = "proto/netferry/v1/host.proto"


def _git(*args: str) -> str | None:
    r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def breaking_baseline() -> tuple[str, str]:
    """(commit, why) the proto must stay compatible with: the merge base with origin/main
    (what this branch will be merged into), else the last release tag (v*), else -- a fresh
    clone without a remote or tags -- the commit that first added the proto, so the check
    still covers every change since; the reason is printed. A base that is HEAD itself
    compares nothing and is passed over."""
    head = _git("rev-parse", "HEAD")
    candidates = []
    if _git("rev-parse", "--verify", "-q", "origin/main"):
        candidates.append(
            (_git("merge-base", "HEAD", "origin/main"), "merge base with origin/main")
        )
    tag = _git("describe", "--tags", "--abbrev=0", "--match", "v*", "HEAD")
    if tag:
        candidates.append((_git("rev-list", "-n1", tag), f"last release tag {tag}"))
    first = _git("log", "--format=%H", "--diff-filter=A", "--", PROTO)
    if first:
        first = first.splitlines()[-1]
        candidates.append((first, "no origin/main and no release tag: the proto's first commit"))
    for commit, why in candidates:
        if commit and commit != head:
            return commit, why
    pytest.skip(f"no commit other than HEAD has {PROTO} (shallow clone?): nothing to compare")


def test_buf_breaking_against_the_merge_base_or_last_release():
    base, why = breaking_baseline()
    assert subprocess.run(["git", "cat-file", "-e", f"{base}:{PROTO}"], cwd=REPO).returncode == 0
    print(f"buf breaking against {base[:12]} ({why})", file=sys.stderr)
    r = subprocess.run(
        [buf(), "breaking", "--against", f".git#ref={base}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"against {base[:12]} ({why}):\n{r.stdout}{r.stderr}"


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
