"""The contenders: how each network program is brought up around a fresh namespace, and
where the guest reaches host loopback through it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    GUEST_IPERF_PORT,
    NS_PREFIX,
    REAPER,
    VENV_BIN,
    BenchError,
    descendants,
    free_port,
    make_netns,
    ns_cmd,
    tail,
    wait_for,
)

HOST6 = "fd00:192:168:127::254"  # netferry's v6 host loopback (→ the host's ::1)
SLIRP_HOST6 = "fd00::2"  # slirp4netns's (and the drop-in's) v6 gateway = host loopback

CONTENDERS = ("netferry", "netferry-vm", "slirp4netns", "pasta", "netferry-slirp4netns", "gvproxy")


# Contenders used by default: gvproxy only when both of its binaries are on PATH (the
# benchmark never downloads or builds them).
def default_contenders() -> list[str]:
    names = [c for c in CONTENDERS if c != "gvproxy"]
    if shutil.which("gvproxy") and shutil.which("gvforwarder"):
        names.append("gvproxy")
    return names


# Pairs compared head to head besides netferry ÷ each: the drop-in against the program it
# replaces, both driven the same way (slirp4netns's command line and API); the VM topology
# (vm-switch pumping the tap over a frame stream) against slirp4netns and `netferry run`.
PAIRS = (
    ("netferry-slirp4netns", "slirp4netns"),
    ("netferry-vm", "slirp4netns"),
    ("netferry-vm", "netferry"),
)


# ---- contenders ------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    mtu: int = 1500
    ns: str = ""
    target: str = ""  # the host-loopback address as the guest sees it
    # its IPv6 host-loopback address (the host's ::1), "" when it has none: the v6 rows
    # leave it out (`why_no_v6` says why)
    target6: str = ""
    why_no_v6: str = ""
    fwd_port: int = 0  # host 127.0.0.1 port forwarded to the guest's GUEST_IPERF_PORT
    dir: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)

    def cpu_pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def rss_pids(self) -> dict[str, int]:
        return {k: p.pid for k, p in self.procs.items()}

    def wait_for_lease(self, address: str, what: str) -> None:
        """Until eth0 in the guest namespace has `address` ("" for any IPv4 address)."""

        def leased() -> bool:
            self.check_alive()
            out = subprocess.run(
                ns_cmd(self.ns, "ip", "-4", "-o", "addr", "show", "dev", "eth0"),
                capture_output=True,
                text=True,
            ).stdout
            return f"inet {address}/" in out if address else "inet " in out

        wait_for(leased, 30, f"the {what} guest's DHCP lease", step=0.1)

    def wait_for_ipv6(self, target6: str, dev: str = "eth0", timeout: float = 20) -> None:
        """Until `dev` has a global IPv6 address past DAD and a default route; then the v6
        rows use `target6`. Not fatal when it never comes: the v6 rows leave it out."""

        def up() -> bool:
            self.check_alive()
            addr = subprocess.run(
                ns_cmd(self.ns, "ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "global"),
                capture_output=True,
                text=True,
            ).stdout
            route = subprocess.run(
                ns_cmd(self.ns, "ip", "-6", "route", "show", "default"),
                capture_output=True,
                text=True,
            ).stdout
            return "inet6 " in addr and "tentative" not in addr and "default" in route

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if up():
                self.target6 = target6
                return
            time.sleep(0.1)
        self.why_no_v6 = f"no IPv6 address and default route in {timeout:.0f} s"

    def check_alive(self) -> None:
        for k, p in self.procs.items():
            if p.poll() is not None:
                raise BenchError(
                    f"{self.name}: {k} exited with {p.returncode}\n"
                    f"{tail(self.logs.get(k, Path('/nonexistent')))}"
                )

    def _spawn(self, key: str, args: list[str], **kw) -> subprocess.Popen:
        assert self.dir
        log = self.dir / f"{key}.out"
        self.logs.setdefault(key, log)
        self.commands.append(" ".join(args))
        with open(log, "ab") as out:
            p = REAPER.popen(args, stdout=out, stderr=subprocess.STDOUT, **kw)
        self.procs[key] = p
        return p

    def setup(self, mtu: int, index: int) -> None:
        self.mtu = mtu
        self.dir = REAPER.mkdtemp()
        self.ns = f"{NS_PREFIX}{self.name[:5]}-{index}"
        make_netns(self.ns)
        self.fwd_port = free_port()
        self._start()

    def _start(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        for p in reversed(list(self.procs.values())):
            REAPER.stop(p)
        self.procs.clear()
        if self.ns:
            REAPER.del_netns(self.ns)
            self.ns = ""
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.dir in REAPER.dirs:
                REAPER.dirs.remove(self.dir)
        self.logs.clear()


class Netferry(Contender):
    GUEST_IP = "192.168.127.2"

    def __init__(self) -> None:
        super().__init__("netferry")
        self.warnings: dict[str, int] = {}

    def _start(self) -> None:
        # The topology `netferry run` uses: hostd owns the namespace's tap (handed over by
        # vm-switch --give-tap), with TSO/checksum offload. `--enter` networks the bench's
        # own namespace (a holder process keeps it), so every contender runs in `ip netns`.
        assert self.dir
        api = self.dir / "api.sock"
        self.api = f"unix://{api}"
        holder = self._spawn("holder", ns_cmd(self.ns, "sleep", "1000000"))
        self._spawn(
            "run",
            [
                str(VENV_BIN / "netferry"),
                "run",
                "--enter",
                str(holder.pid),
                "--mtu",
                str(self.mtu),
                "--api",
                str(api),
                "--dns-upstream",
                "127.0.0.1:9",
                "--dhcp-client",
                "udhcpc",
            ],
        )

        self.wait_for_lease(self.GUEST_IP, "netferry")
        self.target = "192.168.127.254"
        self.wait_for_ipv6(HOST6)
        cmd = [
            str(VENV_BIN / "netferry"),
            "--api",
            self.api,
            "expose",
            f"127.0.0.1:{self.fwd_port}",
            f"{self.GUEST_IP}:{GUEST_IPERF_PORT}",
        ]
        self.commands.append(" ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise BenchError(f"netferry expose failed: {r.stdout}{r.stderr}")

    def teardown(self) -> None:
        # collect warnings/errors hostd and vm-switch logged, to report oddities
        run_dirs = sorted(Path("/tmp").glob("netferry-run-*"), key=lambda p: p.stat().st_mtime)
        for key, name in (("hostd", "hostd.log"), ("vm-switch", "vm-switch.log")):
            path = run_dirs[-1] / name if run_dirs else None
            if not path or not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if (
                    ev.get("level") in ("warning", "error", "critical")
                    and ev.get("event") != "icmp.ping_sockets_not_permitted"
                ):
                    k = f"{key}: {ev.get('level')} {ev.get('event')}"
                    self.warnings[k] = self.warnings.get(k, 0) + 1
        super().teardown()

    def _daemons(self) -> dict[str, int]:
        """host-switch and vm-switch under `netferry run` (found by their command lines)."""
        found: dict[str, int] = {}
        for pid in descendants(self.procs["run"].pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for name in ("host-switch", "vm-switch"):
                if any(part.endswith(name.encode()) for part in cmd[:2]):
                    found[name] = pid
        return found

    def cpu_pids(self) -> list[int]:
        return [self.procs["run"].pid, *descendants(self.procs["run"].pid)]

    def rss_pids(self) -> dict[str, int]:
        return self._daemons()


class NetferryVm(Contender):
    """The seeds' topology: hostd (`host-switch --listen unix://S`) on the host and vm-switch
    in the guest namespace pumping its tap over that unix stream, both with default flags
    (offload negotiated by the link's capability exchange)."""

    GUEST_IP = "192.168.127.2"

    def __init__(self) -> None:
        super().__init__("netferry-vm")
        self.warnings: dict[str, int] = {}
        self.drops: dict[str, int] = {}

    def _start(self) -> None:
        assert self.dir
        link = self.dir / "link.sock"
        api = self.dir / "api.sock"
        self.api = f"unix://{api}"
        self.logs["host-switch.json"] = self.dir / "hostd.json"
        self.logs["vm-switch.json"] = self.dir / "vm-switch.json"
        self._spawn(
            "host-switch",
            [str(VENV_BIN / "host-switch"), "--listen", f"unix://{link}", "--api", f"unix://{api}",
             "--mtu", str(self.mtu), "--dns-upstream", "127.0.0.1:9",
             "--log-format", "json", "--log-file", str(self.dir / "hostd.json")],
        )  # fmt: skip
        wait_for(lambda: self.check_alive() or link.exists(), 15, "host-switch to listen")
        self._spawn(
            "vm-switch",
            ns_cmd(self.ns, str(VENV_BIN / "vm-switch"), "--connect", f"unix://{link}",
                   "--mtu", str(self.mtu), "--dhcp-client", "udhcpc",
                   "--log-format", "json", "--log-file", str(self.dir / "vm-switch.json")),
        )  # fmt: skip

        self.wait_for_lease(self.GUEST_IP, "netferry-vm")
        self.target = "192.168.127.254"
        self.wait_for_ipv6(HOST6)
        cmd = [str(VENV_BIN / "netferry"), "--api", self.api, "expose",
               f"127.0.0.1:{self.fwd_port}", f"{self.GUEST_IP}:{GUEST_IPERF_PORT}"]  # fmt: skip
        self.commands.append(" ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise BenchError(f"netferry expose failed: {r.stdout}{r.stderr}")

    def _daemons(self) -> dict[str, int]:
        return {k: p.pid for k, p in self.procs.items()}

    def collect_drops(self) -> None:
        """hostd's link drops and vm-switch's tap counters, summed over the run."""
        vm = self.procs.get("vm-switch")
        if vm is not None and vm.poll() is None:
            vm.send_signal(signal.SIGUSR1)
            time.sleep(0.3)
        r = subprocess.run(
            [str(VENV_BIN / "netferry"), "--api", self.api, "--json", "stats"],
            capture_output=True, text=True, timeout=15,
        )  # fmt: skip
        with contextlib.suppress(ValueError, KeyError):
            counters = json.loads(r.stdout).get("counters", {})
            for key in ("links.dropped_out", "links.offload_vnet"):
                self.drops[key] = self.drops.get(key, 0) + int(counters.get(key, 0))
        for ev in _json_lines(self.dir / "vm-switch.json" if self.dir else None):
            if ev.get("event") == "vm-switch.stats":
                for key in ("tap_write_deferred", "tap_write_dropped", "tap_gso_dropped"):
                    self.drops[f"vm-switch.{key}"] = self.drops.get(f"vm-switch.{key}", 0) + int(
                        ev.get(key, 0)
                    )
            if ev.get("event") == "link.offload":
                self.drops[f"offload: {ev.get('agreed')}"] = 1

    def teardown(self) -> None:
        if self.procs:
            with contextlib.suppress(Exception):
                self.collect_drops()
        for key in ("hostd", "vm-switch"):
            for ev in _json_lines(self.dir / f"{key}.json" if self.dir else None):
                if ev.get("level") in ("warning", "error", "critical") and ev.get("event") not in (
                    "icmp.ping_sockets_not_permitted",
                ):
                    k = f"{key}: {ev.get('level')} {ev.get('event')}"
                    self.warnings[k] = self.warnings.get(k, 0) + 1
        super().teardown()


def _json_lines(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


class Gvproxy(Contender):
    """gvproxy on the host and gvforwarder in the guest namespace over a unix stream (the
    netferry-vm topology with gvisor-tap-vsock's programs), only when both are on PATH."""

    GUEST_IP = "192.168.127.2"

    def __init__(self) -> None:
        super().__init__("gvproxy")

    def _start(self) -> None:
        assert self.dir
        sock = self.dir / "gvproxy.sock"
        self._spawn("gvproxy", ["gvproxy", "-listen", f"unix://{sock}", "-mtu", str(self.mtu)])
        wait_for(lambda: self.check_alive() or sock.exists(), 15, "gvproxy to listen")
        self._spawn(
            "gvforwarder",
            ns_cmd(self.ns, "gvforwarder", "-url", f"unix://{sock}/connect", "-iface", "eth0",
                   "-stop-if-exist", "", "-mtu", str(self.mtu)),
        )  # fmt: skip

        self.wait_for_lease("", "gvforwarder")
        self.target = "192.168.127.254"
        self.why_no_v6 = "gvisor-tap-vsock has no IPv6"
        body = json.dumps({"local": f"127.0.0.1:{self.fwd_port}",
                           "remote": f"{self.GUEST_IP}:{GUEST_IPERF_PORT}"})  # fmt: skip
        req = (
            "POST /services/forwarder/expose HTTP/1.0\r\nHost: gvproxy\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        )
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(sock))
            s.sendall(req.encode())
            reply = s.recv(4096)
        if b" 200 " not in reply.split(b"\r\n", 1)[0]:
            raise BenchError(f"gvproxy expose: {reply[:200]!r}")


class Slirp(Contender):
    def __init__(self) -> None:
        super().__init__("slirp4netns")

    def _start(self) -> None:
        self._start_slirp("slirp4netns", configure=True)

    def _start_slirp(self, binary: str, configure: bool) -> None:
        assert self.dir
        api = self.dir / "slirp.sock"
        rfd, wfd = os.pipe()
        try:
            # no --disable-host-loopback: 10.0.2.2 must reach 127.0.0.1 (and fd00::2 the
            # host's ::1 with --enable-ipv6; checked with strace: slirp4netns 1.2.0 connects
            # to ::1); --disable-dns: the guest never resolves through the host
            self._spawn(
                self.name,
                [
                    binary,
                    *(["--configure"] if configure else []),
                    f"--mtu={self.mtu}",
                    "--enable-ipv6",
                    "--disable-dns",
                    f"--api-socket={api}",
                    f"--ready-fd={wfd}",
                    "--netns-type=path",
                    f"/var/run/netns/{self.ns}",
                    "tap0",
                ],
                pass_fds=(wfd,),
            )
        finally:
            os.close(wfd)
        try:
            import select

            r, _, _ = select.select([rfd], [], [], 20)
            if not r or os.read(rfd, 1) != b"1":
                self.check_alive()
                raise BenchError(f"{self.name} did not report ready")
        finally:
            os.close(rfd)
        if not configure:
            # rootlesskit's part, after `1` on the ready fd: address, route (tap0 is its own).
            for cmd in (
                ["ip", "addr", "add", "10.0.2.100/24", "dev", "tap0"],
                ["ip", "route", "add", "default", "via", "10.0.2.2"],
            ):
                self.commands.append(" ".join(cmd))
                subprocess.run(ns_cmd(self.ns, *cmd), check=True)
        self.target = "10.0.2.2"
        # IPv6 by SLAAC from its RA (prefix fd00::/64), in either case
        self.wait_for_ipv6(SLIRP_HOST6, dev="tap0")
        req = {
            "execute": "add_hostfwd",
            "arguments": {
                "proto": "tcp",
                "host_addr": "127.0.0.1",
                "host_port": self.fwd_port,
                "guest_port": GUEST_IPERF_PORT,
            },
        }
        self.commands.append(f"echo '{json.dumps(req)}' | socat - UNIX:{api}")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(api))
            s.sendall(json.dumps(req).encode())
            s.shutdown(socket.SHUT_WR)
            reply = s.recv(4096)
        if b'"return"' not in reply or b"error" in reply:
            raise BenchError(f"{self.name} add_hostfwd: {reply!r}")


class NetferrySlirp(Slirp):
    """netferry started the way rootlesskit starts slirp4netns: rootlesskit makes tap0 (up,
    MTU set) first, runs the program without --configure, waits for `1` on the ready fd,
    then addresses the tap itself; forwards go through the same JSON API."""

    def __init__(self) -> None:
        Contender.__init__(self, "netferry-slirp4netns")

    def _start(self) -> None:
        for cmd in (
            ["ip", "tuntap", "add", "name", "tap0", "mode", "tap"],
            ["ip", "link", "set", "tap0", "mtu", str(self.mtu), "up"],
        ):
            self.commands.append(" ".join(cmd))
            subprocess.run(ns_cmd(self.ns, *cmd), check=True)
        self._start_slirp(str(VENV_BIN / "netferry-slirp4netns"), configure=False)


class Pasta(Contender):
    def __init__(self) -> None:
        super().__init__("pasta")

    def _start(self) -> None:
        # -f: stay in the foreground (our child, so /proc/PID/stat is pasta itself);
        # --runas 0: as root this build drops to nobody and then cannot join the netns;
        # --no-icmp: this build would send guest pings to the real gateway;
        # -4, no DNS options: no DNS is offered or forwarded;
        # -t: one forward bound on 127.0.0.1; no automatic port scanning in any direction.
        self._spawn(
            "pasta",
            [
                "pasta",
                "-f",
                "-q",
                "--runas",
                "0",
                "--config-net",
                "--no-icmp",
                "-4",
                "-m",
                str(self.mtu),
                "-t",
                f"127.0.0.1/{self.fwd_port}:{GUEST_IPERF_PORT}",
                "-u",
                "none",
                "-T",
                "none",
                "-U",
                "none",
                "--netns",
                f"/var/run/netns/{self.ns}",
            ],
        )

        def gateway() -> str | None:
            self.check_alive()
            out = subprocess.run(
                ns_cmd(self.ns, "ip", "-4", "route", "show", "default"),
                capture_output=True,
                text=True,
            ).stdout.split()
            return out[out.index("via") + 1] if "via" in out else None

        gw = wait_for(gateway, 20, "pasta to configure the namespace", step=0.1)
        # pasta maps its gateway address to the host's loopback (this build has --no-map-gw,
        # so mapping is the default); the guest sends to nothing else.
        self.target = gw
        self.commands.append(f"(guest → host loopback via the gateway {gw})")
        # -4 stays: pasta's IPv6 gateway is a copy of the machine's real one, and its
        # mapping to ::1 could not be confirmed in a sandbox here (the guest got no neighbour
        # answer); without that proof nothing is sent to it
        self.why_no_v6 = "run with -4: its v6 host-loopback mapping was not verified here"


def make_contender(name: str) -> Contender:
    return {
        "netferry": Netferry,
        "netferry-vm": NetferryVm,
        "gvproxy": Gvproxy,
        "slirp4netns": Slirp,
        "pasta": Pasta,
        "netferry-slirp4netns": NetferrySlirp,
    }[name]()
