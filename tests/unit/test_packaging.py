"""Packaging: a plain install puts one top-level package, `netferry`, into site-packages.

hostd/ and guestd/ stay top-level folders in the repository (DESIGN.md's layout); setup.py
maps them to `netferry.hostd` and `netferry.guestd`, so no generic `hostd` collides with
another project's. The wheel is built here from the working tree, offline (the venv's own
setuptools, no build isolation) from a copy of the tree, so setuptools' build/ and
egg-info land in the test's directory, not in the repository; and read back.
"""

from __future__ import annotations

import email
import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_wheel_installs_everything_under_netferry(tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "results", ".*cache"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(src)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("netferry-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(z.read(f"{dist_info}/METADATA"))
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"netferry", dist_info}
    for module in (
        "netferry/hostd/stack/network.py",
        "netferry/hostd/stack/transport.py",
        "netferry/hostd/api/server.py",
        "netferry/guestd/vm_switch.py",
        "netferry/guestd/udhcpc.script",  # package data vm-switch runs udhcpc with
        "netferry/v1/host_pb2.py",
        "netferry/cli.py",
    ):
        assert module in names, module
    assert "host-switch = netferry.hostd.cli:main" in entry_points
    assert "vm-switch = netferry.guestd.vm_switch:main" in entry_points
    assert "hostd." not in entry_points.replace("netferry.hostd.", "")
    # grpcio-tools generates code: only in the extras that regenerate or test the stubs.
    requires = metadata.get_all("Requires-Dist")
    tools = [r for r in requires if r.startswith("grpcio-tools")]
    assert tools and all("extra ==" in r for r in tools), tools
    assert any(r.startswith("grpcio>=") and "extra" not in r for r in requires)
