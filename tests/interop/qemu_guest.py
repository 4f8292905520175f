"""A tiny Linux guest under QEMU (TCG) whose only NIC is wired to a netferry unix socket.

Why this exists: netferry must interoperate with a real guest kernel's DHCP client, ARP,
ICMP and TCP, not only with our own packet builders. The guest is built from Debian
packages fetched with ``apt-get download`` (never installed on the host) and boots in a few
seconds. Its ``/init`` (``qemu_init.sh``) runs test steps named on the kernel command line and
prints ``NETFERRY-<WHAT> ...`` lines on the serial console, which :func:`run_guest` parses.

Network safety: the guest's NIC is a QEMU ``stream`` netdev that *connects* to a unix socket
the test already listens on; nothing here uses slirp, tap or the host network.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
INIT_SCRIPT = HERE / "qemu_init.sh"
UDHCPC_SCRIPT = HERE / "qemu_udhcpc.sh"

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# insmod order matters: the .deb ships no modules.dep, so dependencies come first.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
# Bump when the layout of the built initramfs changes, to invalidate old caches.
BUILD_FORMAT = "1"
DEFAULT_MAC = "5a:94:ef:e4:0c:ee"
MARKER_RE = re.compile(r"^NETFERRY-([A-Z][A-Z0-9]*)(?: (.*))?$")
STEP_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class GuestBuildError(RuntimeError):
    """The guest image cannot be built (missing tool, package or mirror)."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable kernel + initramfs pair."""

    kernel: Path
    initrd: Path


@dataclass
class GuestResult:
    """What one guest run printed, parsed from its serial console."""

    console: str
    lease: dict[str, str] | None
    results: dict[str, str]
    returncode: int | None
    timed_out: bool = False
    command: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """True if /init reached its end (it prints NETFERRY-DONE before poweroff)."""
        return "done" in self.results

    def describe(self) -> str:
        """Summary plus console for assertion messages."""
        return (
            f"returncode={self.returncode} timed_out={self.timed_out} lease={self.lease} "
            f"results={self.results}\n--- console ---\n{self.console}"
        )


def default_cache_dir() -> Path:
    """``$NETFERRY_CACHE/qemu-guest``, default ``<repo>/.cache/qemu-guest`` (git-ignored)."""
    return Path(os.environ.get("NETFERRY_CACHE", str(REPO / ".cache"))) / "qemu-guest"


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestBuildError(f"building the QEMU test guest needs {name!r}, not found in PATH")
    return path


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=600
        )
    except subprocess.TimeoutExpired as e:
        raise GuestBuildError(f"{' '.join(cmd)} timed out") from e
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
        )
    return proc.stdout


def _package_versions(apt_cache: str, packages: list[str]) -> dict[str, str]:
    """Candidate versions from the local apt lists (no network)."""
    out = _run([apt_cache, "show", "--no-all-versions", *packages])
    versions: dict[str, str] = {}
    package = ""
    for line in out.splitlines():
        if line.startswith("Package:"):
            package = line.split(":", 1)[1].strip()
        elif line.startswith("Version:") and package:
            versions.setdefault(package, line.split(":", 1)[1].strip())
    missing = [p for p in packages if p not in versions]
    if missing:
        raise GuestBuildError(f"apt-cache knows no version of {missing} (run apt-get update?)")
    return versions


@functools.cache
def _resolve_packages() -> tuple[str, str, str]:
    """(kernel package, its version, busybox-static version); cached per process (apt is slow)."""
    apt_cache = _require_tool("apt-cache")
    kernel_pkg = _kernel_package(apt_cache)
    versions = _package_versions(apt_cache, [kernel_pkg, BUSYBOX_PACKAGE])
    return kernel_pkg, versions[kernel_pkg], versions[BUSYBOX_PACKAGE]


def _kernel_package(apt_cache: str) -> str:
    """The versioned image package the cloud metapackage points at (it holds the files)."""
    out = _run([apt_cache, "depends", KERNEL_METAPACKAGE])
    for line in out.splitlines():
        m = re.match(r"^\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m and m.group(1) != KERNEL_METAPACKAGE:
            return m.group(1)
    raise GuestBuildError(f"cannot resolve the kernel package behind {KERNEL_METAPACKAGE!r}")


class _Newc:
    """Minimal cpio "newc" writer; lets us add root-owned entries and /dev/console unprivileged."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        nameb = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08x" % f for f in fields) + nameb)
        self.buf.write(b"\0" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self.ino = 0
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _find_module(tree: Path, name: str) -> Path | None:
    wanted = name.replace("-", "_")
    for p in tree.glob("lib/modules/*/kernel/**/*.ko*"):
        base = p.name.split(".ko", 1)[0].replace("-", "_")
        if base == wanted:
            return p
    return None


def _module_builtin(tree: Path, name: str) -> bool:
    wanted = name.replace("-", "_")
    for f in tree.glob("lib/modules/*/modules.builtin"):
        for line in f.read_text().splitlines():
            if Path(line).name.split(".ko", 1)[0].replace("-", "_") == wanted:
                return True
    return False


def _module_bytes(path: Path) -> bytes:
    if path.name.endswith(".ko"):
        return path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        zstd = _require_tool("zstd")
        return subprocess.run(
            [zstd, "-dc", str(path)], capture_output=True, check=True, timeout=60
        ).stdout
    raise GuestBuildError(f"unsupported module compression: {path}")


def _build_initrd(tree: Path) -> bytes:
    busybox = next(
        (p for p in (tree / "bin/busybox", tree / "usr/bin/busybox") if p.is_file()), None
    )
    if busybox is None:
        raise GuestBuildError(f"no busybox binary in the extracted {BUSYBOX_PACKAGE} package")
    applets = _run([str(busybox), "--list"]).split()

    a = _Newc()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "root", "sys", "tmp"):
        a.dir(d)
    for d in ("sbin", "usr"):
        a.symlink(d, "bin")  # so "#!/bin/sh", /sbin/x and /usr/bin/x all resolve
    a.chardev("dev/console", 5, 1)
    a.chardev("dev/null", 1, 3)
    a.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in sorted(set(applets)):
        if applet != "busybox" and "/" not in applet:
            a.symlink(f"bin/{applet}", "busybox")

    loaded: list[str] = []
    for name in MODULES:
        path = _find_module(tree, name)
        if path is None:
            if _module_builtin(tree, name):
                continue
            raise GuestBuildError(f"kernel module {name!r} is neither in the package nor built in")
        a.file(f"lib/modules/{name}.ko", _module_bytes(path))
        loaded.append(name)
    a.file("etc/nf-modules", ("\n".join(loaded) + "\n").encode())
    a.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    a.file("udhcpc.sh", UDHCPC_SCRIPT.read_bytes(), 0o755)
    return gzip.compress(a.finish(), compresslevel=6, mtime=0)


def build_guest(cache_dir: Path | None = None) -> GuestImage:
    """Fetch the Debian kernel and busybox-static and build kernel + initramfs, cached.

    The cache key covers the package versions, the guest scripts and this builder's format,
    so a kernel update or an edit to ``qemu_init.sh`` triggers a rebuild. Concurrent callers
    each build into a temp dir and rename it into place; the first rename wins.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    kernel_pkg, kernel_ver, busybox_ver = _resolve_packages()

    h = hashlib.sha256()
    for part in (BUILD_FORMAT, kernel_pkg, kernel_ver, busybox_ver, ",".join(MODULES)):
        h.update(part.encode() + b"\0")
    h.update(INIT_SCRIPT.read_bytes() + b"\0" + UDHCPC_SCRIPT.read_bytes())
    final = cache_dir / f"{kernel_pkg}-{h.hexdigest()[:16]}"
    image = GuestImage(kernel=final / "vmlinuz", initrd=final / "initrd.img")
    if image.kernel.is_file() and image.initrd.is_file():
        return image

    apt_get = _require_tool("apt-get")
    dpkg = _require_tool("dpkg")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache_dir) as tmp_s:
        tmp = Path(tmp_s)
        debs = tmp / "debs"
        tree = tmp / "tree"
        out = tmp / "out"
        for d in (debs, tree, out):
            d.mkdir()
        try:
            _run(
                [
                    apt_get,
                    "download",
                    f"{kernel_pkg}={kernel_ver}",
                    f"{BUSYBOX_PACKAGE}={busybox_ver}",
                ],
                cwd=debs,
            )
        except GuestBuildError as e:
            raise GuestBuildError(
                f"could not download {kernel_pkg} / {BUSYBOX_PACKAGE} from the Debian mirror: {e}"
            ) from e
        for deb in sorted(debs.glob("*.deb")):
            _run([dpkg, "-x", str(deb), str(tree)])
        kernels = sorted(tree.glob("boot/vmlinuz-*"))
        if not kernels:
            raise GuestBuildError(f"{kernel_pkg} contains no boot/vmlinuz-*")
        shutil.copyfile(kernels[0], out / "vmlinuz")
        (out / "initrd.img").write_bytes(_build_initrd(tree))
        try:
            out.rename(final)
        except OSError:
            if not (image.kernel.is_file() and image.initrd.is_file()):
                raise  # not a lost race: a real error
    return image


def check_step(key: str, value: str) -> None:
    if not STEP_RE.match(key):
        raise ValueError(f"bad step name {key!r}")
    if not value or any(c.isspace() or c in "\"'\\" for c in value):
        raise ValueError(f"step {key}={value!r}: the value must be one kernel command-line word")


def qemu_command(
    image: GuestImage,
    socket_path: str,
    steps: dict[str, str],
    mac: str = DEFAULT_MAC,
    ipv6: bool = False,
) -> list[str]:
    """The QEMU argv: TCG (KVM here is PVM and cannot boot a normal kernel), NIC to the socket.
    Without `ipv6` the guest kernel has IPv6 disabled (it would send multicast otherwise)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise FileNotFoundError(
            "qemu-system-x86_64 not found in PATH (apt-get install qemu-system-x86)"
        )
    if "," in socket_path:
        raise ValueError(f"socket path {socket_path!r} must not contain ','")
    for key, value in steps.items():
        check_step(key, value)
    append = ["console=ttyS0", "panic=-1", "quiet", *([] if ipv6 else ["ipv6.disable=1"])]
    append += [f"nf.{k}={v}" for k, v in steps.items()]
    return [
        qemu,
        "-accel", "tcg",
        "-m", "128",  # 64 MiB is too small: QEMU exits 0 with no output
        "-smp", "1",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join(append),
        "-netdev", f"stream,id=n0,addr.type=unix,addr.path={socket_path},server=off",
        "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile=",
    ]  # fmt: skip


def parse_console(console: str) -> tuple[dict[str, str] | None, dict[str, str]]:
    """Extract the lease (from NETFERRY-LEASE) and per-marker results (lower-cased names)."""
    lease: dict[str, str] | None = None
    results: dict[str, str] = {}
    for raw in console.splitlines():
        m = MARKER_RE.match(raw.strip())
        if not m:
            continue
        what, rest = m.group(1).lower(), (m.group(2) or "").strip()
        if what == "lease":
            lease = dict(tok.split("=", 1) for tok in rest.split() if "=" in tok)
        else:
            results[what] = rest
    return lease, results


def run_guest(
    image: GuestImage,
    socket_path: str,
    steps: dict[str, str],
    timeout: float = 120.0,
    mac: str = DEFAULT_MAC,
    ipv6: bool = False,
) -> GuestResult:
    """Boot the guest against ``socket_path`` (already listening!) and wait for it to power off.

    QEMU 7.2's stream netdev never reconnects, so a socket that is not listening yet gives a
    silently dead NIC. On timeout QEMU is killed and the partial console is returned with
    ``timed_out=True`` so the assertion message can show how far the guest got.
    """
    cmd = qemu_command(image, socket_path, steps, mac, ipv6)
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    timed_out = False
    try:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    console = out.decode("utf-8", "replace").replace("\r", "")
    lease, results = parse_console(console)
    return GuestResult(
        console=console,
        lease=lease,
        results=results,
        returncode=proc.returncode,
        timed_out=timed_out,
        command=cmd,
    )
