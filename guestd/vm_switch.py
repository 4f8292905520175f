"""`vm-switch`: the guest end of the frame stream, run inside the guest's network namespace.

It owns tap `eth0`: frames the guest kernel sends on it go to hostd over the link, frames
from hostd are written to it. The tap survives link drops: vm-switch redials with
backoff and the guest's sockets see a pause, not a dead interface. Once the link is up the
first time it gets an address by DHCP (pyroute2's client, or udhcpc), sets the default
route and MTU from the lease, and writes a resolv.conf only to the path it is given.

IPv6 (guestd/ipv6_setup.py): before the tap comes up its sysctls let the kernel take hostd's
router advertisements (SLAAC address, default route, MTU); the RA's DNS servers (RDNSS) are
read from netlink and written to the resolv.conf beside the IPv4 lease's; `--dhcpv6` adds
a DHCPv6 client for the stateful address; `--no-ipv6` disables IPv6 on the tap. `--ready-fd`
waits for the IPv6 address and route too (at most `--ipv6-timeout` seconds; no longer than
a few seconds after its router solicitation when no router answers).

With `--give-tap FD` it does not pump at all: it opens the tap, passes the fd to hostd over
the unix socket FD (SCM_RIGHTS) and keeps only the DHCP client; hostd then reads and writes
the tap itself (`tapfd://`), which is how `netferry run` works.

Offload: on a stream link without `?offload=` vm-switch opens the tap with virtio-net
headers (offloads off) and offers them to hostd (`netferry.linkcaps`); once hostd accepts,
it turns the tap's checksum/TSO offload on and frames carry the header both ways. Until
then, or with an older hostd, it strips and adds an empty header itself.

Flow control, both ways: when the link cannot take more (its queue is over the high-water
mark) vm-switch stops reading the tap, so the guest kernel's queue fills and its TCP slows
down; when the tap will not take a write, vm-switch stops reading the link until it does,
so hostd's TCP is held back instead of frames being dropped (`tap_write_deferred`).
Counters are logged on SIGUSR1 (`vm-switch.stats`) and when a link ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections import deque
from importlib import resources

import structlog

from netferry import linkcaps
from netferry.framing import FramingError, StreamDeframer, get_framing
from netferry.goflags import Alias
from netferry.goflags import parse_args as parse_go_flags
from netferry.guestd.ipv6_setup import Ipv6Guest, ResolvConf, configure_sysctls
from netferry.guestd.tap import TapError, configure_link, open_tap, set_mtu, set_tap_offload
from netferry.log import add_logging_arguments, configure_logging
from netferry.streams import send_queued
from netferry.uri import LinkUri, parse_link_uri

log = structlog.get_logger("vm-switch")

TAP_READ_BATCH = 128
TAP_READ_SIZE = 65536 + 14 + 10  # a 64 KiB TSO segment, Ethernet and virtio-net headers
HIGH_WATER = 4 << 20
VNET_LEN = 10
VNET_NONE = bytes(VNET_LEN)  # a virtio-net header that asks for nothing
CAPS_ETHERTYPE = linkcaps.ETHERTYPE.to_bytes(2, "big")
# Frames from the link looked at for hostd's ACCEPT before vm-switch decides it never comes.
CAPS_WAIT_FRAMES = 256


class LinkDown(Exception):
    pass


def dial(uri: LinkUri) -> socket.socket:
    """A connected socket for `uri` (blocking connect; the caller makes it non-blocking)."""
    if uri.scheme == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(uri.path)
    elif uri.scheme == "unixpacket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(uri.path)
    elif uri.scheme == "unixgram":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # The server learns us from our source address, so we must bind one.
        s.bind(os.path.join(tempfile.mkdtemp(prefix="vm-switch-"), "sock"))
        s.connect(uri.path)
    elif uri.scheme == "tcp":
        s = socket.create_connection((uri.host, uri.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif uri.scheme == "vsock":
        if uri.cid is None:
            raise ValueError(f"{uri}: connecting needs a CID (vsock://2:PORT for the host)")
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.connect((uri.cid, uri.port))
    elif uri.scheme == "fd":
        s = socket.socket(fileno=uri.fd)
    else:
        raise ValueError(f"{uri}: vm-switch cannot dial this scheme")
    return s


def _cleanup_bound_path(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        name = s.getsockname()
        if isinstance(name, str) and name:
            os.unlink(name)
            os.rmdir(os.path.dirname(name))


def negotiates(uri: LinkUri) -> bool:
    """Whether vm-switch offers virtio-net headers on this link (netferry.linkcaps): stream
    links without `?offload=` whose framing can carry 64 KiB super-frames."""
    if uri.offload or uri.scheme == "unixgram" or uri.scheme == "unixpacket":
        return False
    return linkcaps.can_vnet(uri.max_frame, get_framing(uri.framing).max_length)


class Pump:
    """Moves frames between the tap fd and one connected link socket until it drops.

    The tap is opened with virtio-net headers whenever the link may use them (`tap_vnet`);
    while the link carries plain frames the header is stripped on the way out (the tap's
    offloads are off then, so the kernel sends no super-frames) and an empty one added on
    the way in. Writes to the tap that would block are queued and the link is not read until
    the tap takes them: the backlog then backs up into hostd's TCP, not into a drop."""

    def __init__(
        self, tap_fd: int, sock: socket.socket, uri: LinkUri, tap_vnet: bool, mac: bytes
    ) -> None:
        self.tap_fd = tap_fd
        self.sock = sock
        self.uri = uri
        self.stream = sock.type == socket.SOCK_STREAM
        self.framing = get_framing(uri.framing)
        self.deframer = StreamDeframer(self.framing, uri.max_frame)
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[str] = self.loop.create_future()
        self._out: deque[bytes | memoryview] = deque()  # pieces for the link, sent by sendmsg
        self._out_size = 0
        self._writing = False
        self._tap_reading = False
        self._sock_reading = False
        self._tap_backlog: deque[bytes] = deque()  # frames the tap would not take yet
        self.tap_vnet = tap_vnet
        self.mac = mac
        self.vnet_in = uri.vnet  # frames from the link carry a virtio-net header
        self.vnet_out = uri.vnet  # frames to the link carry one
        self.negotiating = tap_vnet and not uri.vnet and negotiates(uri)
        self._caps_budget = CAPS_WAIT_FRAMES
        self.offload = "vnet" if uri.vnet else "none"
        self.frames_in = 0
        self.frames_out = 0
        self.stats = {"tap_write_deferred": 0, "tap_write_dropped": 0, "tap_gso_dropped": 0,
                      "link_datagrams_dropped": 0}  # fmt: skip

    def start(self) -> None:
        self.sock.setblocking(False)
        if self.negotiating:
            # Plain until hostd accepts: no super-frames from the tap meanwhile.
            set_tap_offload(self.tap_fd, False)
            offer = linkcaps.encode(
                linkcaps.OFFER, self.mac, linkcaps.F_VNET,
                min(self.uri.max_frame, self.framing.max_length),
            )  # fmt: skip
            self._queue_out(self.framing.encode_many([offer]))
        self._resume_sock()
        self._resume_tap()

    def _resume_tap(self) -> None:
        if not self._tap_reading:
            self._tap_reading = True
            self.loop.add_reader(self.tap_fd, self._tap_readable)

    def _pause_tap(self) -> None:
        if self._tap_reading:
            self._tap_reading = False
            self.loop.remove_reader(self.tap_fd)

    def _resume_sock(self) -> None:
        if not self._sock_reading:
            self._sock_reading = True
            self.loop.add_reader(self.sock.fileno(), self._sock_readable)

    def _pause_sock(self) -> None:
        if self._sock_reading:
            self._sock_reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _fail(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(reason)

    def _sock_readable(self) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fail(f"read error: {e}")
            return
        if not data:
            self._fail("link closed by hostd")
            return
        if self.stream:
            try:
                frames = self.deframer.feed(data)
            except FramingError as e:
                self._fail(f"framing error: {e}")
                return
        else:
            frames = [data]
        self.frames_in += len(frames)
        if self.negotiating:
            frames = self._look_for_accept(frames)
        if self.tap_vnet and not self.vnet_in:
            frames = [VNET_NONE + f for f in frames]
        self._tap_backlog.extend(frames)
        self._write_tap()

    def _look_for_accept(self, frames: list[bytes]) -> list[bytes]:
        """hostd's ACCEPT: frames after it carry virtio-net headers if vnet was agreed."""
        for i, frame in enumerate(frames):
            if frame[12:14] != CAPS_ETHERTYPE:
                continue
            caps = linkcaps.decode(frame)
            if caps is None or caps.kind != linkcaps.ACCEPT:
                continue
            self.negotiating = False
            log.info("link.offload", uri=str(self.uri), agreed=caps.describe())
            if not caps.vnet:
                return frames[:i] + frames[i + 1 :]
            rest = frames[i + 1 :]
            # Frames before the ACCEPT were plain: give them their empty header now, as
            # the caller will not (vnet_in is set below).
            head = [VNET_NONE + f for f in frames[:i]]
            self.vnet_in = True
            try:
                set_tap_offload(self.tap_fd, True)
            except OSError as e:
                log.warning("tap.offload_failed", error=str(e))
            commit = linkcaps.encode(linkcaps.COMMIT, self.mac, caps.flags, caps.max_frame)
            self._queue_out(self.framing.encode_many([commit]))
            self.vnet_out = True
            self.offload = "vnet"
            return head + rest
        self._caps_budget -= len(frames)
        if self._caps_budget <= 0:  # an older hostd (or not netferry): stay plain
            self.negotiating = False
            log.info("link.offload", uri=str(self.uri), agreed="none (no answer)")
        return frames

    def _write_tap(self) -> None:
        """Write the queued frames to the tap; what it will not take waits (link unread)."""
        backlog = self._tap_backlog
        write, fd = os.write, self.tap_fd
        while backlog:
            try:
                write(fd, backlog[0])
            except BlockingIOError:
                self.stats["tap_write_deferred"] += 1
                if self._sock_reading:
                    self._pause_sock()
                    self.loop.add_writer(fd, self._tap_writable)
                return
            except OSError as e:
                self.stats["tap_write_dropped"] += 1
                log.warning("tap.write_failed", error=str(e), size=len(backlog[0]))
            backlog.popleft()
        if not self._sock_reading:
            self.loop.remove_writer(fd)
            self._resume_sock()

    def _tap_writable(self) -> None:
        self._write_tap()

    def _tap_readable(self) -> None:
        frames = []
        for _ in range(TAP_READ_BATCH):
            try:
                frames.append(os.read(self.tap_fd, TAP_READ_SIZE))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._fail(f"tap read error: {e}")
                return
        if not frames:
            return
        if self.tap_vnet and not self.vnet_out:
            plain = []
            for f in frames:
                if f[0] or f[1]:  # a super-frame or partial checksum read before offload went off
                    self.stats["tap_gso_dropped"] += 1
                    continue
                plain.append(f[VNET_LEN:])
            frames = plain
        self.frames_out += len(frames)
        if self.stream:
            self._queue_out(self.framing.encode_many(frames))
        else:
            for frame in frames:
                try:
                    self.sock.send(frame)
                except (BlockingIOError, InterruptedError):
                    self.stats["link_datagrams_dropped"] += 1  # datagram link full: drop
                except OSError as e:
                    self._fail(f"write error: {e}")
                    return

    def _queue_out(self, pieces: list[bytes]) -> None:
        self._out.extend(pieces)
        self._out_size += sum(map(len, pieces))
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        """Send the queued pieces with sendmsg (gathered, no joining copy)."""
        q = self._out
        try:
            self._out_size -= send_queued(self.sock, q)
        except OSError as e:
            self._fail(f"write error: {e}")
            return
        if q:
            if not self._writing:
                self._writing = True
                self.loop.add_writer(self.sock.fileno(), self._flush)
            if self._out_size > HIGH_WATER:
                self._pause_tap()
        else:
            if self._writing:
                self._writing = False
                self.loop.remove_writer(self.sock.fileno())
            self._resume_tap()

    def counters(self) -> dict[str, object]:
        return dict(self.stats, frames_in=self.frames_in, frames_out=self.frames_out,
                    offload=self.offload, tap_backlog=len(self._tap_backlog))  # fmt: skip

    def stop(self) -> None:
        self._pause_tap()
        self._pause_sock()
        if self._tap_backlog or not self._sock_reading:
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self.tap_fd)
        fd = self.sock.fileno()
        if fd >= 0 and self._writing:
            self.loop.remove_writer(fd)
        _cleanup_bound_path(self.sock)
        self.sock.close()


class DhcpRunner:
    """Gets and keeps a lease on the tap: pyroute2's client, or udhcpc when asked."""

    def __init__(self, args: argparse.Namespace, resolv: ResolvConf | None = None) -> None:
        self.args = args
        self.resolv = resolv or ResolvConf(None)
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.bound = asyncio.Event()
        self.failed = asyncio.Event()  # the lease is outside --subnet: vm-switch must stop
        self.failure = ""

    def check_lease(self, ip: str) -> None:
        """`--subnet` (Rancher Desktop's -subnet) must agree with what hostd leases."""
        subnet = self.args.subnet
        if subnet is None or self.failed.is_set():
            return
        try:
            inside = ipaddress.ip_address(ip) in ipaddress.ip_network(subnet, strict=False)
        except ValueError:
            inside = False
        if not inside:
            self.failure = (
                f"-subnet {subnet} does not match hostd's network: the DHCP lease is {ip}; "
                f"start vm-switch with hostd's subnet (or without -subnet)"
            )
            log.error("dhcp.subnet_mismatch", subnet=subnet, lease=ip, error=self.failure)
            self.failed.set()

    def start(self) -> None:
        if self.args.dhcp_script:
            self.task = asyncio.get_running_loop().create_task(self._udhcpc(self.args.dhcp_script))
        elif self.args.dhcp_client == "udhcpc":
            self.task = asyncio.get_running_loop().create_task(self._udhcpc())
        elif self.args.dhcp_client == "pyroute2":
            self.task = asyncio.get_running_loop().create_task(self._pyroute2())

    async def _udhcpc(self, script_path: str | None = None) -> None:
        exe = shutil.which("udhcpc") or shutil.which("busybox")
        if exe is None:
            log.error("dhcp.udhcpc_missing", fix="apt-get install udhcpc")
            return
        script = script_path or resources.files("netferry.guestd").joinpath("udhcpc.script")
        watcher = None
        if script_path:  # a script of the user's own prints no lease line: watch the address
            watcher = asyncio.get_running_loop().create_task(self._watch_address())
        try:
            await self._run_udhcpc(exe, str(script))
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _run_udhcpc(self, exe: str, script: str) -> None:
        env = dict(os.environ)
        env.pop("NETFERRY_RESOLV_CONF", None)
        if self.args.resolv_conf and self.args.dhcp_script:  # a script of the user's own
            env["NETFERRY_RESOLV_CONF"] = self.args.resolv_conf
        cmd = [exe] if exe.endswith("udhcpc") else [exe, "udhcpc"]
        cmd += ["-f", "-i", self.args.tap_interface, "-s", script, "-t", "20", "-T", "1"]
        cmd += ["-A", "1", "-R"]  # retry soon after a failed round; release on exit
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("NETFERRY-LEASE"):
                fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                log.info("dhcp.bound", client="udhcpc", **fields)
                self.resolv.set_v4(
                    [d for d in fields.get("dns", "").split(",") if d],
                    [d for d in fields.get("search", "").split(",") if d],
                )
                self.check_lease(fields.get("ip", ""))
                self.bound.set()
            elif line:
                log.debug("dhcp.udhcpc", line=line)
        await self.proc.wait()

    async def _watch_address(self) -> None:
        """With `--dhcp-script`: the lease is whatever IPv4 address the script put on the tap."""
        while not self.bound.is_set():
            proc = await asyncio.create_subprocess_exec(
                "ip", "-4", "-o", "addr", "show", "dev", self.args.tap_interface,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            out, _ = await proc.communicate()
            words = out.decode().split()
            if "inet" in words:
                ip = words[words.index("inet") + 1].split("/")[0]
                log.info("dhcp.bound", client="udhcpc", script=self.args.dhcp_script, ip=ip)
                self.check_lease(ip)
                self.bound.set()
                return
            await asyncio.sleep(0.2)

    async def _pyroute2(self) -> None:
        from pyroute2.dhcp import fsm
        from pyroute2.dhcp.client import AsyncDHCPClient, ClientConfig
        from pyroute2.dhcp.enums import dhcp
        from pyroute2.dhcp.hooks import Trigger, add_default_gw, configure_ip, hook
        from pyroute2.dhcp.leases import JSONStdoutLease

        args = self.args

        class MemoryLease(JSONStdoutLease):
            def dump(self) -> None:  # kept in memory only: nothing written anywhere
                pass

        @hook(Trigger.BOUND, Trigger.RENEWED, Trigger.REBOUND)
        async def apply_lease(lease: MemoryLease) -> None:
            with contextlib.suppress(Exception):
                if lease.mtu and lease.mtu != args.mtu:
                    await set_mtu(args.tap_interface, int(lease.mtu))
            servers: list[str] = []
            with contextlib.suppress(Exception):
                servers = list(lease.name_servers)
            search: list[str] = []
            with contextlib.suppress(Exception):
                search = list(lease.domain_search)
            self.resolv.set_v4(servers, search)
            mtu = None
            with contextlib.suppress(Exception):
                mtu = lease.mtu
            log.info(
                "dhcp.bound",
                client="pyroute2",
                ip=f"{lease.ip}/{lease.prefixlen}",
                router=lease.default_gateway,
                dns=",".join(servers),
                mtu=mtu,
            )
            self.check_lease(str(lease.ip))
            self.bound.set()

        cfg = ClientConfig(
            interface=args.tap_interface,
            lease_type=MemoryLease,
            hooks=[configure_ip, add_default_gw, apply_lease],
            requested_parameters=(
                dhcp.Option.SUBNET_MASK,
                dhcp.Option.ROUTER,
                dhcp.Option.NAME_SERVER,
                dhcp.Option.DOMAIN_NAME,
                dhcp.Option.LEASE_TIME,
                dhcp.Option.RENEWAL_TIME,
                dhcp.Option.REBINDING_TIME,
                dhcp.Option.INTERFACE_MTU,
                dhcp.Option.DOMAIN_SEARCH,
            ),
            handle_signals=False,
            release=True,
        )
        async with AsyncDHCPClient(cfg) as client:
            await client.bootstrap()
            await client.wait_for_state(fsm.State.BOUND, timeout=None)
            await asyncio.Event().wait()  # keep renewing until cancelled

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 3)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.task is not None:
            self.task.cancel()  # pyroute2's client sends a RELEASE on its way out
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self.task, 1)


async def signal_ready(
    dhcp: DhcpRunner, fd: int, client: str, v6: Ipv6Guest | None = None, v6_timeout: float = 0
) -> None:
    if client != "none":
        await dhcp.bound.wait()
    if v6 is not None:
        if not await v6.wait_up(v6_timeout):  # no router (hostd's --no-ipv6): IPv4 alone
            log.warning("ipv6.not_up", waited=v6_timeout, hint="hostd offers no IPv6? "
                        "start vm-switch with --no-ipv6 to match")  # fmt: skip
    with contextlib.suppress(OSError):
        os.write(fd, b"ready\n")
        os.close(fd)


async def run(args: argparse.Namespace) -> int:
    if args.resolv_conf and os.path.realpath(args.resolv_conf) == "/etc/resolv.conf":
        if not args.allow_etc_resolv_conf:
            log.error(
                "resolv_conf.refused",
                path=args.resolv_conf,
                reason="would overwrite /etc/resolv.conf; pass --allow-etc-resolv-conf inside a "
                "private mount namespace",
            )
            return 2
    if args.give_tap is not None:
        return await run_give_tap(args)
    uri = parse_link_uri(args.connect)
    tap_vnet = uri.vnet or negotiates(uri)
    resolv = ResolvConf(args.resolv_conf)
    v6 = make_ipv6(args, resolv)
    tap_fd = await create_tap(args, tap_vnet, offload=uri.vnet, v6=v6)
    if tap_fd is None:
        if v6 is not None:
            await v6.stop()
        return 1
    mac = bytes.fromhex((args.tap_mac_address or "02:00:00:00:00:01").replace(":", ""))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    pump: Pump | None = None

    def log_counters() -> None:
        if pump is not None:
            log.info("vm-switch.stats", **pump.counters())

    loop.add_signal_handler(signal.SIGUSR1, log_counters)
    dhcp = DhcpRunner(args, resolv)
    backoff = 0.1
    started_dhcp = False
    ready_task: asyncio.Task[None] | None = None
    rc = 0
    try:
        while not stop.is_set():
            try:
                sock = await loop.run_in_executor(None, dial, uri)
            except (OSError, ValueError) as e:
                if uri.scheme == "fd" or isinstance(e, ValueError):
                    log.error("link.dial_failed", uri=str(uri), error=str(e))
                    rc = 1
                    break
                log.info("link.dial_failed", uri=str(uri), error=str(e), retry_in=backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            pump = Pump(tap_fd, sock, uri, tap_vnet, mac)
            pump.start()
            log.info("link.up", uri=str(uri))
            if not started_dhcp:
                started_dhcp = True
                dhcp.start()
                if v6 is not None:
                    v6.start()
                if args.ready_fd is not None:
                    ready_task = loop.create_task(
                        signal_ready(dhcp, args.ready_fd, args.dhcp_client, v6, args.ipv6_timeout)
                    )
            stopper = loop.create_task(stop.wait())
            failed = loop.create_task(dhcp.failed.wait())
            await asyncio.wait([pump.done, stopper, failed], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            failed.cancel()
            pump.stop()
            if dhcp.failed.is_set():
                rc = 1
                break
            if pump.done.done():
                log.warning("link.down", uri=str(uri), reason=pump.done.result(),
                            **pump.counters())  # fmt: skip
                if uri.scheme == "fd":
                    rc = 1
                    break
    finally:
        if ready_task is not None:
            ready_task.cancel()
        await dhcp.stop()
        if v6 is not None:
            await v6.stop()
        os.close(tap_fd)
        log.info("vm-switch.stopped", **(pump.counters() if pump is not None else {}))
    return rc


async def create_tap(
    args: argparse.Namespace, vnet: bool, offload: bool = True, v6: Ipv6Guest | None = None
) -> int | None:
    """Open and configure the tap; None (logged) when that fails. The IPv6 sysctls and the
    RA options' watcher come before the link is up: the kernel solicits at once."""
    try:
        tap_fd = open_tap(args.tap_interface, vnet_hdr=vnet, offload=offload)
        why = configure_sysctls(args.tap_interface, enabled=not args.no_ipv6)
        if why:
            log.warning("ipv6.sysctl_failed", error=why, ipv6=not args.no_ipv6)
        if v6 is not None:
            v6.open()
        await configure_link(args.tap_interface, args.tap_mac_address, args.mtu)
    except TapError as e:
        log.error("tap.failed", error=str(e))
        return None
    return tap_fd


def make_ipv6(args: argparse.Namespace, resolv: ResolvConf) -> Ipv6Guest | None:
    return None if args.no_ipv6 else Ipv6Guest(args.tap_interface, resolv, args.dhcpv6)


async def run_give_tap(args: argparse.Namespace) -> int:
    """Hand the tap itself to hostd (SCM_RIGHTS over the unix socket `--give-tap FD`) and
    keep only the DHCP client and resolv.conf here: frames then go kernel → hostd → kernel
    without this process in between (what `netferry run` does)."""
    resolv = ResolvConf(args.resolv_conf)
    v6 = make_ipv6(args, resolv)
    tap_fd = await create_tap(args, args.offload, v6=v6)
    if tap_fd is None:
        if v6 is not None:
            await v6.stop()
        return 1
    loop = asyncio.get_running_loop()
    try:
        with socket.socket(fileno=args.give_tap) as channel:
            socket.send_fds(channel, [b"tap"], [tap_fd])
            # Start DHCP only once hostd serves the tap: a lost DISCOVER costs a retry.
            go = await loop.run_in_executor(None, channel.recv, 1)
    except OSError as e:
        log.error("tap.handoff_failed", error=str(e))
        os.close(tap_fd)
        if v6 is not None:
            await v6.stop()
        return 1
    os.close(tap_fd)  # hostd holds the device now; it lives as long as hostd's fd
    if go != b"g":
        log.error("tap.handoff_failed", error="hostd did not start")
        if v6 is not None:
            await v6.stop()
        return 1
    log.info("tap.handed_over", interface=args.tap_interface, offload=args.offload)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    dhcp = DhcpRunner(args, resolv)
    dhcp.start()
    if v6 is not None:
        v6.start()
    ready_task = None
    if args.ready_fd is not None:
        ready_task = loop.create_task(
            signal_ready(dhcp, args.ready_fd, args.dhcp_client, v6, args.ipv6_timeout)
        )
    stopper = loop.create_task(stop.wait())
    failed = loop.create_task(dhcp.failed.wait())
    try:
        await asyncio.wait([stopper, failed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        failed.cancel()
        if ready_task is not None:
            ready_task.cancel()
        await dhcp.stop()
        if v6 is not None:
            await v6.stop()
        log.info("vm-switch.stopped")
    return 1 if dhcp.failed.is_set() else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vm-switch", description=__doc__.split("\n\n")[0])
    p.add_argument("--connect", metavar="URI", help="hostd link URI to dial")
    p.add_argument(
        "--give-tap",
        type=int,
        metavar="FD",
        help="instead of pumping frames, pass the tap fd to hostd over this unix socket fd "
        "and only run DHCP (hostd then uses tapfd://)",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="with --give-tap: open the tap with virtio-net headers and TSO/checksum offload",
    )
    p.add_argument("--tap-interface", default="eth0")
    p.add_argument("--tap-mac-address", default="5a:94:ef:e4:0c:ee")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument(
        "--dhcp-client",
        choices=["pyroute2", "udhcpc", "none"],
        default="pyroute2",
        help="how to get the address (default %(default)s)",
    )
    p.add_argument(
        "--resolv-conf",
        metavar="PATH",
        help="write the lease's DNS servers here, IPv4 and IPv6 (never /etc/resolv.conf "
        "unless allowed)",
    )
    p.add_argument(
        "--no-ipv6",
        action="store_true",
        help="disable IPv6 on the tap (match host-switch --no-ipv6)",
    )
    p.add_argument(
        "--dhcpv6",
        action="store_true",
        help="also run a DHCPv6 client (dhclient -6) for the stateful address; without it the "
        "tap gets SLAAC and the RA's DNS servers",
    )
    p.add_argument(
        "--ipv6-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="with --ready-fd: how long to wait for the IPv6 address and route (default "
        "%(default)s; then ready with IPv4 alone)",
    )
    p.add_argument("--allow-etc-resolv-conf", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--subnet",
        metavar="CIDR",
        help="hostd's network as this guest expects it: a lease outside it is an error "
        "(Rancher Desktop's -subnet; default: no check)",
    )
    p.add_argument(
        "--dhcp-script",
        metavar="PATH",
        help="run udhcpc with this script instead of netferry's DHCP client ('' = default)",
    )
    p.add_argument(
        "--trace-packets",
        action="store_true",
        help="accepted for Rancher Desktop; netferry logs no packets (use host-switch --pcap)",
    )
    p.add_argument(
        "--ready-fd",
        type=int,
        metavar="N",
        help="write 'ready' to fd N (then close it) once the first lease is applied",
    )
    add_logging_arguments(p)
    return p


def vsock_fd_uri(fd: int) -> str:
    """An inherited connection, as Rancher Desktop's network-setup passes it (fd 3): its
    frames are 2-byte little-endian, gvisor-tap-vsock's stdio framing."""
    return f"fd://{fd}?framing=len16le"


def _vsock_fd(value: str) -> list[str]:
    fd = int(value, 10)
    if fd < 0:
        raise ValueError("must be a file descriptor number")
    return [f"--connect={vsock_fd_uri(fd)}"]


# Rancher Desktop's vm-switch flags (Go syntax); -tap-interface, -tap-mac-address, -subnet,
# -dhcp-script, -trace-packets and -debug are ours under the same names.
GO_ALIASES = {
    "logfile": "--log-file",
    "vsock-fd": Alias("--connect", convert=_vsock_fd),
}
INHERITED_FD = 3


def _is_socket(fd: int) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_go_flags(parser, argv, GO_ALIASES)
    if args.connect is None and args.give_tap is None:
        # Rancher Desktop starts vm-switch with the connection as fd 3 and no flag for it.
        if not _is_socket(INHERITED_FD):
            parser.error(
                "give --connect URI or --give-tap FD, or pass the connection as fd 3 "
                "(as Rancher Desktop's network-setup does; -vsock-fd N names another fd)"
            )
        args.connect = vsock_fd_uri(INHERITED_FD)
    if args.connect is not None and args.give_tap is not None:
        parser.error("give exactly one of --connect URI and --give-tap FD")
    if args.subnet is not None:
        try:
            ipaddress.ip_network(args.subnet, strict=False)
        except ValueError as e:
            parser.error(f"--subnet: {e}")
    configure_logging(args.log_format, "debug" if args.debug else "info", args.log_file)
    if args.trace_packets:
        log.warning("trace_packets.unsupported", hint="use host-switch --pcap FILE")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
