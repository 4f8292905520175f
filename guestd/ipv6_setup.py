"""IPv6 in the guest's namespace: what vm-switch does so the guest kernel configures itself
from hostd's router advertisements, and how the DNS servers they carry reach resolv.conf.

The kernel does SLAAC, the default route and the link MTU on its own once the tap accepts
RAs; vm-switch only sets the tap's sysctls (`disable_ipv6=0`, `accept_ra=2` so that a
forwarding namespace still takes them, `autoconf=1`) before the link comes up, and sends one
router solicitation when the link to hostd is served (the kernel's own may have gone out
while nothing listened). The RA's RDNSS and DNSSL options (RFC 8106) the kernel does not
apply itself: it hands them to userspace as RTM_NEWNDUSEROPT netlink messages, which
`RdnssWatcher` reads (`parse_nd_useropt` is the sans-IO parser). With `--dhcpv6`,
`Dhcpv6Client` also runs a real DHCPv6 client (ISC dhclient -6, or busybox udhcpc6) for the
stateful address (`::2` for the default MAC) and its DNS servers.

`ResolvConf` merges the IPv4 lease's servers with the IPv6 ones (IPv4 first) and rewrites the
file in place, so a bind mount of it (`netferry run`) sees every update.

`--no-ipv6` sets `disable_ipv6=1` on the tap: the guest then has no IPv6 at all, as hostd's
`--no-ipv6` has none to offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("vm-switch")

# <linux/rtnetlink.h>, <linux/neighbour.h>, <linux/netlink.h>
RTM_NEWNDUSEROPT = 68
RTNLGRP_ND_USEROPT = 20
NDUSEROPT_SRCADDR = 1
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NLMSG_HDR = struct.Struct("=IHHII")
NDUSEROPT_HDR = struct.Struct("=BBHiBBHI")  # family, pad, opts_len, ifindex, type, code, pads
ND_ROUTER_ADVERT = 134
ND_ROUTER_SOLICIT = 133
ND_OPT_RDNSS = 25
ND_OPT_DNSSL = 31
ALL_ROUTERS = "ff02::2"
# How long after our router solicitation an RA may take before readiness stops waiting for
# IPv6 (no router: hostd's --no-ipv6). A router answers a solicitation within 0.5 s, but
# not sooner than 3 s after its previous multicast RA (RFC 4861 6.2.6): 4 s covers both.
ROUTER_WAIT = 4.0

# (sysctl name, value when IPv6 is on) for the tap, set before it comes up
SYSCTLS_ON = (
    ("disable_ipv6", "0"),
    ("accept_ra", "2"),
    ("autoconf", "1"),
    ("accept_ra_defrtr", "1"),
    ("accept_ra_pinfo", "1"),
    ("accept_ra_mtu", "1"),
)
# Optimistic DAD (RFC 4429), where the kernel has it: the link-local and SLAAC addresses are
# usable while DAD runs, so the solicitation goes out at once and readiness does not wait a
# DAD second per address; without it the kernel simply does plain DAD.
SYSCTLS_OPTIONAL = (("optimistic_dad", "1"), ("use_optimistic", "1"))


def sysctl_path(ifname: str, key: str) -> str:
    return f"/proc/sys/net/ipv6/conf/{ifname}/{key}"


def configure_sysctls(ifname: str, enabled: bool) -> str | None:
    """Set the tap's IPv6 sysctls (this process's network namespace); None, or why not.

    Without /proc/sys/net/ipv6 the kernel has no IPv6 (ipv6.disable=1): nothing to do."""
    if not os.path.isdir("/proc/sys/net/ipv6/conf"):
        return "this kernel has no IPv6 (/proc/sys/net/ipv6 is missing)"
    settings = SYSCTLS_ON if enabled else (("disable_ipv6", "1"),)
    for key, value in settings:
        try:
            with open(sysctl_path(ifname, key), "w") as f:
                f.write(value)
        except OSError as e:
            return f"{sysctl_path(ifname, key)}: {e.strerror}"
    if enabled:
        for key, value in SYSCTLS_OPTIONAL:
            with contextlib.suppress(OSError):  # a kernel built without optimistic DAD
                with open(sysctl_path(ifname, key), "w") as f:
                    f.write(value)
    return None


# ---- RDNSS/DNSSL from the kernel (sans-IO) --------------------------------------------------


@dataclass
class UserOptions:
    """What one RA's RDNSS/DNSSL options said (lifetime 0 withdraws)."""

    ifindex: int
    servers: list[tuple[str, int]] = field(default_factory=list)  # (address, lifetime)
    search: list[tuple[str, int]] = field(default_factory=list)  # (domain, lifetime)


def _dns_names(data: bytes) -> list[str]:
    """Domain names in DNS wire format, zero padding at the end (RFC 8106 5.2)."""
    names, labels, i = [], [], 0
    while i < len(data):
        n = data[i]
        i += 1
        if n == 0:
            if labels:
                names.append(".".join(labels))
                labels = []
            continue
        if n > 63 or i + n > len(data):
            break  # malformed: keep what was complete
        labels.append(data[i : i + n].decode("ascii", "replace"))
        i += n
    return names


def parse_nd_options(ifindex: int, options: bytes) -> UserOptions:
    out = UserOptions(ifindex)
    i = 0
    while i + 8 <= len(options):
        kind, units = options[i], options[i + 1]
        if units == 0:
            break  # a zero length would loop forever (RFC 4861 4.6: discard)
        body = options[i : i + units * 8]
        if len(body) < units * 8:
            break
        lifetime = int.from_bytes(body[4:8], "big")
        if kind == ND_OPT_RDNSS:
            for off in range(8, len(body) - 15, 16):
                addr = ipaddress.IPv6Address(body[off : off + 16])
                out.servers.append((str(addr), lifetime))
        elif kind == ND_OPT_DNSSL:
            out.search += [(name, lifetime) for name in _dns_names(body[8:])]
        i += units * 8
    return out


def parse_nd_useropt(data: bytes) -> list[UserOptions]:
    """The RA user options in a buffer of netlink messages (others are skipped)."""
    found = []
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            break
        body = data[off + NLMSG_HDR.size : off + length]
        if kind == RTM_NEWNDUSEROPT and len(body) >= NDUSEROPT_HDR.size:
            family, _, opts_len, ifindex, icmp_type, _, _, _ = NDUSEROPT_HDR.unpack_from(body)
            opts = body[NDUSEROPT_HDR.size : NDUSEROPT_HDR.size + opts_len]
            if family == socket.AF_INET6 and icmp_type == ND_ROUTER_ADVERT:
                found.append(parse_nd_options(ifindex, opts))
        off += (length + 3) & ~3
    return found


class RdnssWatcher:
    """RTM_NEWNDUSEROPT messages for one interface → `on_change(servers, search)` whenever
    the set of live servers or domains changes. Open it before the link comes up: the kernel
    tells only those listening when the RA arrives."""

    def __init__(self, ifname: str, on_change: Callable[[list[str], list[str]], None]) -> None:
        self.ifindex = socket.if_nametoindex(ifname)
        self.on_change = on_change
        self.servers: dict[str, float] = {}  # address → expiry (loop time)
        self.search: dict[str, float] = {}
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        self.sock.setblocking(False)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_ND_USEROPT)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.messages = 0

    def _readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # ENOBUFS: some were lost; the next RA repeats them
            log.warning("ipv6.netlink_error", error=str(e))
            return
        now = self.loop.time()
        for opts in parse_nd_useropt(data):
            if opts.ifindex != self.ifindex:
                continue
            self.messages += 1
            self.update(opts, now)

    def update(self, opts: UserOptions, now: float) -> None:
        before = (self.live(self.servers, now), self.live(self.search, now))
        for table, entries in ((self.servers, opts.servers), (self.search, opts.search)):
            for key, lifetime in entries:
                if lifetime == 0:
                    table.pop(key, None)
                else:
                    table[key] = now + lifetime
        after = (self.live(self.servers, now), self.live(self.search, now))
        if after != before:
            self.on_change(*after)

    @staticmethod
    def live(table: dict[str, float], now: float) -> list[str]:
        return [k for k, expiry in table.items() if expiry > now]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


def router_solicitation() -> bytes:
    """An RS without the source link-layer option (valid from any source, :: included);
    the kernel fills in the ICMPv6 checksum of a raw IPPROTO_ICMPV6 socket."""
    return bytes([ND_ROUTER_SOLICIT, 0, 0, 0, 0, 0, 0, 0])


def send_router_solicitation(ifname: str) -> None:
    """Ask for an RA now rather than at hostd's next periodic one (OSError if IPv6 is off)."""
    ifindex = socket.if_nametoindex(ifname)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
        s.sendto(router_solicitation(), (ALL_ROUTERS, 0, 0, ifindex))


# ---- the state of the tap -------------------------------------------------------------------


def parse_ip_addr(text: str) -> list[tuple[str, int, bool]]:
    """`ip -6 -o addr show` lines → (address, prefixlen, usable: not dadfailed, and not
    tentative unless optimistic, RFC 4429)."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if "inet6" not in words:
            continue
        addr, _, plen = words[words.index("inet6") + 1].partition("/")
        usable = "dadfailed" not in words and ("tentative" not in words or "optimistic" in words)
        out.append((addr, int(plen or 128), usable))
    return out


async def _ip(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    return out.decode(errors="replace")


async def global_addresses(ifname: str) -> list[str]:
    """The tap's usable global IPv6 addresses."""
    text = await _ip("-6", "-o", "addr", "show", "dev", ifname, "scope", "global")
    return [a for a, _, usable in parse_ip_addr(text) if usable]


async def default_route6(ifname: str) -> str:
    return (await _ip("-6", "route", "show", "default", "dev", ifname)).strip()


async def link_local_ready(ifname: str) -> bool:
    text = await _ip("-6", "-o", "addr", "show", "dev", ifname, "scope", "link")
    return any(usable for _, _, usable in parse_ip_addr(text))


# ---- resolv.conf ----------------------------------------------------------------------------


class ResolvConf:
    """The guest's resolv.conf from both families: IPv4 lease first, then IPv6 (RDNSS or
    DHCPv6), search domains merged in order. Written in place (a bind mount of the file
    keeps its inode) and only when the text changes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.v4: tuple[list[str], list[str]] = ([], [])
        self.v6: dict[str, tuple[list[str], list[str]]] = {}  # source → (servers, search)
        self.written = ""

    def set_v4(self, servers: list[str], search: list[str]) -> None:
        self.v4 = (list(servers), list(search))
        self.write()

    def set_v6(self, source: str, servers: list[str], search: list[str]) -> None:
        self.v6[source] = (list(servers), list(search))
        self.write()

    def text(self) -> str:
        servers: list[str] = []
        search: list[str] = []
        for srv, dom in (self.v4, *self.v6.values()):
            servers += [s for s in srv if s not in servers]
            search += [d.rstrip(".") for d in dom if d.rstrip(".") not in search]
        lines = ["search " + " ".join(search)] if search else []
        lines += [f"nameserver {s}" for s in servers]
        return "\n".join(lines) + "\n"

    @property
    def has_v6(self) -> bool:
        return any(srv for srv, _ in self.v6.values())

    def write(self) -> None:
        if not self.path or not (self.v4[0] or self.has_v6):
            return
        text = self.text()
        if text == self.written:
            return
        write_in_place(self.path, text)
        self.written = text
        log.info("resolv_conf.written", path=self.path, text=text.strip().replace("\n", "; "))


def write_in_place(path: str, text: str) -> None:
    """Rewrite `path` keeping its inode (created if missing)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        data = text.encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


# ---- DHCPv6 ---------------------------------------------------------------------------------

DHCLIENT_SCRIPT = """#!/bin/sh
# netferry's dhclient -6 script: applies the address, tells vm-switch; never /etc/resolv.conf
case "$reason" in
  BOUND6|RENEW6|REBIND6|REBOOT6)
    if [ -n "$new_ip6_address" ]; then
      [ -n "$old_ip6_address" ] && [ "$old_ip6_address" != "$new_ip6_address" ] &&
        ip -6 addr del "$old_ip6_address/128" dev "$interface"
      ip -6 addr replace "$new_ip6_address/128" dev "$interface" \
        valid_lft "${new_max_life:-forever}" preferred_lft "${new_preferred_life:-forever}"
    fi
    echo "NETFERRY-LEASE6 ip=$new_ip6_address dns=$(echo $new_dhcp6_name_servers | tr ' ' ,)" \
      "search=$(echo $new_dhcp6_domain_search | tr ' ' ,)" > "%(out)s"
    ;;
  EXPIRE6|RELEASE6|STOP6)
    [ -n "$old_ip6_address" ] && ip -6 addr del "$old_ip6_address/128" dev "$interface"
    ;;
esac
exit 0
"""


def parse_lease6_line(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)


class Dhcpv6Client:
    """ISC `dhclient -6` in the foreground with netferry's own script and lease file in a
    private temp directory (removed on stop); `on_lease(ip, servers, search)` per binding."""

    def __init__(self, ifname: str, on_lease: Callable[[str, list[str], list[str]], None]) -> None:
        self.ifname = ifname
        self.on_lease = on_lease
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.tmp = ""

    @staticmethod
    def available() -> str | None:
        return shutil.which("dhclient") or next(
            (p for p in ("/sbin/dhclient", "/usr/sbin/dhclient") if os.path.exists(p)), None
        )

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        exe = self.available()
        if exe is None:
            log.error("dhcpv6.client_missing", fix="apt-get install isc-dhcp-client")
            return
        # dhclient -6 will not start before the link-local address has passed DAD
        while not await link_local_ready(self.ifname):
            await asyncio.sleep(0.1)
        self.tmp = tempfile.mkdtemp(prefix="vm-switch-dhcp6-")
        out = os.path.join(self.tmp, "lease6")
        script = os.path.join(self.tmp, "script")
        with open(script, "w") as f:
            f.write(DHCLIENT_SCRIPT % {"out": out})
        os.chmod(script, 0o700)
        conf = os.path.join(self.tmp, "dhclient6.conf")
        with open(conf, "w") as f:
            f.write("request dhcp6.name-servers, dhcp6.domain-search;\n")
        cmd = [exe, "-6", "-d", "-D", "LL", "-cf", conf, "-lf", os.path.join(self.tmp, "leases"),
               "-pf", os.path.join(self.tmp, "pid"), "-sf", script, self.ifname]  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        seen = ""
        while self.proc.returncode is None:
            with contextlib.suppress(FileNotFoundError):
                with open(out) as f:
                    line = f.read().strip()
                if line and line != seen:
                    seen = line
                    fields = parse_lease6_line(line)
                    log.info("dhcpv6.bound", client="dhclient", **fields)
                    self.on_lease(
                        fields.get("ip", ""),
                        [s for s in fields.get("dns", "").split(",") if s],
                        [s for s in fields.get("search", "").split(",") if s],
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 0.2)
        log.warning("dhcpv6.client_exited", rc=self.proc.returncode)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 3)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self.task, 1)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---- the whole -------------------------------------------------------------------------------


class Ipv6Guest:
    """vm-switch's IPv6 side for one tap: watcher, solicitation, optional DHCPv6, resolv.conf,
    and `ready` once the tap has a usable global address and a default route."""

    def __init__(self, ifname: str, resolv: ResolvConf, dhcpv6: bool) -> None:
        self.ifname = ifname
        self.resolv = resolv
        self.want_dhcpv6 = dhcpv6
        self.watcher: RdnssWatcher | None = None
        self.dhcp: Dhcpv6Client | None = None
        self.dhcp_address = ""
        self.ready = asyncio.Event()
        self.solicited = asyncio.Event()  # our router solicitation went out
        self.router_seen = asyncio.Event()  # an RA arrived (RDNSS, or the route it made)
        self.task: asyncio.Task[None] | None = None
        self.solicit_task: asyncio.Task[None] | None = None

    def open(self) -> None:
        """Before the link comes up: subscribe to the RA options."""
        try:
            self.watcher = RdnssWatcher(self.ifname, self._on_rdnss)
        except OSError as e:
            log.warning("ipv6.rdnss_watch_failed", error=str(e))

    def _on_rdnss(self, servers: list[str], search: list[str]) -> None:
        log.info("ipv6.rdnss", dns=",".join(servers), search=",".join(search))
        self.router_seen.set()
        self.resolv.set_v6("ra", servers, search)

    def _on_dhcpv6(self, ip: str, servers: list[str], search: list[str]) -> None:
        self.dhcp_address = ip
        self.resolv.set_v6("dhcpv6", servers, search)

    def start(self) -> None:
        """The link to hostd is served: solicit, start DHCPv6, watch for readiness."""
        loop = asyncio.get_running_loop()
        self.solicit_task = loop.create_task(self._solicit())
        if self.want_dhcpv6:
            self.dhcp = Dhcpv6Client(self.ifname, self._on_dhcpv6)
            self.dhcp.start()
        self.task = loop.create_task(self._wait_ready())

    async def _solicit(self) -> None:
        """One RS once the link-local address is usable (before that the kernel has no
        route for it: ENETUNREACH); the kernel's own RS may have found nobody listening."""
        for _ in range(100):
            if await link_local_ready(self.ifname):
                break
            await asyncio.sleep(0.1)
        try:
            send_router_solicitation(self.ifname)
        except OSError as e:
            log.warning("ipv6.solicit_failed", error=str(e))
        self.solicited.set()

    async def _wait_ready(self) -> None:
        """Poll the tap until IPv6 is up; stop early when no router answered our
        solicitation within ROUTER_WAIT (hostd without IPv6): the RA watcher still takes
        a later RA's DNS servers, and nothing polls for the rest of vm-switch's life."""
        loop = asyncio.get_running_loop()
        give_up: float | None = None
        while True:
            addrs = await global_addresses(self.ifname)
            route = await default_route6(self.ifname)
            if route:
                self.router_seen.set()
            dhcp_ok = not self.want_dhcpv6 or (self.dhcp_address and self.dhcp_address in addrs)
            if addrs and route and dhcp_ok and (self.resolv.has_v6 or not self.resolv.path):
                log.info("ipv6.up", addresses=",".join(addrs), route=route)
                self.ready.set()
                return
            if self.solicited.is_set() and not self.router_seen.is_set():
                if give_up is None:
                    give_up = loop.time() + ROUTER_WAIT
                elif loop.time() >= give_up:
                    log.info("ipv6.no_router", waited=ROUTER_WAIT)
                    return
            await asyncio.sleep(0.1)

    async def wait_up(self, timeout: float, router_wait: float = ROUTER_WAIT) -> bool:
        """True once IPv6 is up (within `timeout`). False at `timeout`, or as soon as no
        router answered our solicitation within `router_wait`: a hostd without IPv6 (its
        --no-ipv6, or netferry-gvproxy) must not hold readiness back for the whole timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(self.solicited.wait(), timeout)
            left = max(0.0, deadline - loop.time())
            await asyncio.wait_for(self.router_seen.wait(), min(router_wait, left))
            await asyncio.wait_for(self.ready.wait(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        for task in (self.task, self.solicit_task):
            if task is not None:
                task.cancel()
        if self.dhcp is not None:
            await self.dhcp.stop()
        if self.watcher is not None:
            self.watcher.close()
