"""`network-setup`: the guest's supervisor. It answers hostd's handshake, makes the isolated
network namespace, the veth pair and the NAT rules, and runs vm-switch and the guest's init.

Where it runs: the guest's default network namespace (WSL's), as root. It serves
`netferry.v1.Guest` over gRPC on a unix socket (mode 0600, reflection and health); in a VM
`--listen vsock://:PORT` adds an AF_VSOCK listener whose connections are bridged byte for
byte to that unix socket, because grpcio cannot listen on vsock.

The first successful Handshake (protocol version 1; any other gets FAILED_PRECONDITION naming
both versions) does, in this order:
1. dial the data address hostd offered (`unix:///path`, or `vsock://2:PORT` in a VM) from
   the default namespace, where AF_VSOCK works (it does not follow network namespaces);
2. `ip netns add NAMESPACE` (a stale one, with no processes in it, is replaced; one in use
   is refused) and the veth pair: `veth-rd-ns` 192.168.143.1/24 inside, `veth-rd-wsl`
   192.168.143.2/24 outside (a stale `veth-rd-wsl` is deleted first, as Rancher Desktop
   does);
3. the NAT table `ip netferry` in the namespace (guestd/nat_rules.py: DNAT to 127.0.0.1 for
   connections to the namespace's own addresses from the tap or the veth, masquerade from
   the veth out through eth0, route_localnet and ip_forward);
4. vm-switch inside the namespace (`nsenter --net`) with the data connection dup'ed to its
   fd 3 (`--connect fd://3`); it brings IPv6 up on the tap too (SLAAC and the RA's DNS
   servers, `--dhcpv6` for a DHCPv6 client as well, `--no-ipv6` for none);
5. the init: `unshare --pid --fork --mount-proc --kill-child UNSHARE_ARGS...` inside the
   namespace, so the init is pid 1 of a new pid namespace with its own /proc; its pid (as
   seen from here) is written to `--pid-file`, so `nsenter -t $(cat PIDFILE) -n -p -m`
   enters the guest.

Re-handshake (hostd restarted, or its data link dropped): the new data address is dialled
and vm-switch alone is restarted with the new connection (a running vm-switch cannot take a
new fd, and a fd link that drops makes it exit). The tap `eth0` is re-created and re-leased;
the namespace, the veth, the NAT table and the init are untouched. vm-switch exiting on its
own (its link dropped, or it was killed) is handled the same way without waiting for hostd:
network-setup redials the last data address with backoff (0.2 s doubling to 5 s) and starts
a new vm-switch; a handshake meanwhile supersedes the redial.

The init is the guest: when it exits, network-setup stops vm-switch, removes what it
created and exits with the init's status. On SIGTERM or SIGINT it stops both children
(SIGTERM, then SIGKILL after `--stop-timeout`; killing pid 1 of the pid namespace ends every
process in it), deletes the NAT table, the veth pair, the namespace, the pid file and its
socket, and exits 0. Rancher Desktop's network-setup watched only vm-switch and left the
init unmonitored.

Children are started with posix_spawn (no preexec hooks in a threaded process), each in its
own process group so a terminal's Ctrl-C reaches only network-setup, which then stops them
in order; their exits are watched through pidfds.
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
import subprocess
import sys
import time
from importlib import metadata

import grpc
import structlog

from netferry.goflags import parse_args as parse_go_flags
from netferry.guestd import nat_rules
from netferry.guestd.wsl_proxy import UnixGrpcServer
from netferry.log import add_logging_arguments, configure_logging
from netferry.streams import splice
from netferry.uri import LinkUri, parse_link_uri
from netferry.v1 import guest_pb2 as pb
from netferry.v1 import guest_pb2_grpc as pb_grpc

log = structlog.get_logger("network-setup")

# The handshake protocol this guest speaks (hostd/guests.py has the same constant).
PROTOCOL_VERSION = 1
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Guest"].full_name
# vm-switch negotiates virtio-net headers with hostd on the data link (netferry.linkcaps);
# when hostd does not offer them here, vm-switch gets ?offload=none and never asks.
SUPPORTED_OFFLOADS: frozenset[str] = frozenset({"vnet_hdr"})
DEFAULT_SOCKET = "/run/netferry/guest.sock"
VMADDR_CID_ANY = 0xFFFFFFFF


def version() -> str:
    try:
        return metadata.version("netferry")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class SetupError(RuntimeError):
    pass


def sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, input=input)
    if check and r.returncode != 0:
        raise SetupError(f"{' '.join(argv)}: {r.stderr.strip() or f'exit {r.returncode}'}")
    return r


def dial_data(uri: LinkUri, timeout: float = 10.0) -> socket.socket:
    """Connect to hostd's data address (blocking; run it in an executor)."""
    if uri.scheme == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = uri.path
    elif uri.scheme == "vsock":
        if uri.cid is None:
            raise ValueError(f"{uri}: dialling needs a CID (vsock://2:PORT for the host)")
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        target = (uri.cid, uri.port)
    elif uri.scheme == "tcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (uri.host, uri.port)
    else:
        raise ValueError(f"{uri}: data address must be unix://, vsock:// or tcp://")
    s.settimeout(timeout)
    try:
        s.connect(target)  # type: ignore[arg-type]
    except BaseException:
        s.close()
        raise
    s.settimeout(None)
    return s


def fd_uri(uri: LinkUri, fd: int = 3, vnet_hdr: bool = True) -> str:
    """`fd://3`, keeping the data address's ?framing=, ?max-frame= and ?offload=; without
    `vnet_hdr` (hostd did not offer it) `?offload=none`, so vm-switch does not negotiate."""
    query = uri.text.partition("?")[2]
    if not vnet_hdr and not uri.offload:
        query = f"{query}&offload=none" if query else "offload=none"
    return f"fd://{fd}" + (f"?{query}" if query else "")


# ---- children -------------------------------------------------------------------------------


class Child:
    """A process started with posix_spawn and watched through a pidfd."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid = 0
        self.starts = 0
        self.exited: asyncio.Future[int] | None = None
        self._pidfd = -1

    def start(self, argv: list[str], fds: dict[int, int] | None = None) -> None:
        loop = asyncio.get_running_loop()
        actions: list[tuple] = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        for dst, src in (fds or {}).items():
            actions.append((os.POSIX_SPAWN_DUP2, src, dst))
        self.pid = os.posix_spawnp(
            argv[0], argv, dict(os.environ), file_actions=actions, setpgroup=0
        )
        self.starts += 1
        self._pidfd = os.pidfd_open(self.pid)
        self.exited = loop.create_future()
        loop.add_reader(self._pidfd, self._on_exit)
        log.info("child.started", child=self.name, pid=self.pid, argv=argv)

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        _, status = os.waitpid(self.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        log.info("child.exited", child=self.name, pid=self.pid, rc=rc)
        self.pid = 0
        assert self.exited is not None
        if not self.exited.done():
            self.exited.set_result(rc)

    @property
    def running(self) -> bool:
        return self.pid != 0

    def signal(self, sig: int, pid: int | None = None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid or self.pid, sig)

    async def stop(self, timeout: float, first_target: int | None = None) -> int | None:
        """SIGTERM (to `first_target` if given, e.g. the init inside), then SIGKILL."""
        if not self.running or self.exited is None:
            return None
        self.signal(signal.SIGTERM, first_target)
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            if first_target:
                self.signal(signal.SIGKILL, first_target)
            self.signal(signal.SIGKILL)
            return await self.exited


# ---- the vsock bridge ------------------------------------------------------------------------


class Bridge:
    """Every connection accepted on `sock` (vsock in a VM) is piped to the unix socket
    `target` (the gRPC server): grpcio cannot listen on AF_VSOCK itself."""

    def __init__(self, sock: socket.socket, target: str) -> None:
        self.sock = sock
        self.target = target
        self.server: asyncio.base_events.Server | None = None
        self.connections = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, sock=self.sock)

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            ur, uw = await asyncio.open_unix_connection(self.target)
        except OSError as e:
            log.warning("bridge.target_unreachable", target=self.target, error=str(e))
            w.close()
            return
        await splice(r, w, ur, uw)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def vsock_listener(uri: LinkUri) -> socket.socket:
    if not hasattr(socket, "AF_VSOCK"):
        raise OSError("AF_VSOCK is not available on this platform")
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        s.bind((VMADDR_CID_ANY if uri.cid is None else uri.cid, uri.port))
        s.listen(16)
    except OSError:
        s.close()
        raise
    s.setblocking(False)
    return s


# ---- the supervisor --------------------------------------------------------------------------


class Guest:
    """The state behind the Guest service: namespace, veth, NAT, vm-switch and init."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.guest_id = f"{socket.gethostname()}/{os.getpid()}"
        self.lock = asyncio.Lock()
        self.vm_switch = Child("vm-switch")
        self.init = Child("init")
        self.init_pid = 0  # pid 1 of the guest's pid namespace, as seen from here
        self.setup_done = False
        self.created: list[str] = []  # what to undo: "netns", "veth", "nat", "pidfile"
        self.data_uri: LinkUri | None = None
        self.host_id = ""
        self.handshakes = 0
        self.offloads: frozenset[str] = frozenset()  # accepted in the last handshake
        self.mtu = args.mtu
        self.generation = 0  # bumped by every handshake: a running redial loop gives up
        self.stopping = False
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._watchers: set[asyncio.Task[None]] = set()

    # -- handshake ---------------------------------------------------------------------------

    async def handshake(self, req: pb.HandshakeRequest) -> pb.HandshakeResponse:
        """Raises grpc-style (code, message) through HandshakeRefused."""
        if req.protocol_version != PROTOCOL_VERSION:
            raise HandshakeRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"incompatible versions: host {req.host_id or '?'} speaks guest protocol "
                f"{req.protocol_version} (netferry {req.host_version or '?'}), this guest "
                f"speaks protocol {PROTOCOL_VERSION} (netferry {version()})",
            )
        try:
            uri = parse_link_uri(req.data_address)
        except ValueError as e:
            raise HandshakeRefused(grpc.StatusCode.INVALID_ARGUMENT, f"data_address: {e}") from None
        if uri.scheme not in ("unix", "vsock", "tcp"):
            raise HandshakeRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"data_address: {req.data_address!r} must be unix://, vsock:// or tcp://",
            )
        if req.mtu and not 68 <= req.mtu <= 65520:
            raise HandshakeRefused(
                grpc.StatusCode.INVALID_ARGUMENT, f"mtu: {req.mtu} is not 68..65520"
            )
        mismatch = subnet_mismatch(self.args.subnet, req.subnet)
        if mismatch:
            log.error("handshake.subnet_mismatch", subnet=self.args.subnet, host_subnet=req.subnet)
            raise HandshakeRefused(grpc.StatusCode.FAILED_PRECONDITION, mismatch)
        if self.stopping:
            raise HandshakeRefused(grpc.StatusCode.UNAVAILABLE, "network-setup is stopping")
        self.generation += 1
        async with self.lock:
            loop = asyncio.get_running_loop()
            try:
                sock = await loop.run_in_executor(None, dial_data, uri)
            except (OSError, ValueError) as e:
                raise HandshakeRefused(
                    grpc.StatusCode.UNAVAILABLE, f"data_address: cannot dial {uri}: {e}"
                ) from None
            try:
                if self.args.mtu is None and req.mtu:
                    self.mtu = req.mtu
                self.offloads = SUPPORTED_OFFLOADS & set(req.offered_offloads)
                if not self.setup_done:
                    await loop.run_in_executor(None, self.setup_namespace)
                await self._replace_vm_switch(sock, uri)
                if not self.init.running and self.args.unshare_arg and not self.setup_done:
                    await self.start_init()
                self.setup_done = True
            except SetupError as e:
                raise HandshakeRefused(grpc.StatusCode.INTERNAL, f"setup failed: {e}") from None
            finally:
                sock.close()  # vm-switch holds its own copy
            self.data_uri = uri
            self.host_id = req.host_id
            self.handshakes += 1
        log.info(
            "handshake.done",
            host_id=req.host_id,
            host_version=req.host_version,
            data_address=str(uri),
            handshakes=self.handshakes,
        )
        return pb.HandshakeResponse(
            guest_id=self.guest_id,
            guest_version=version(),
            protocol_version=PROTOCOL_VERSION,
            accepted_offloads=sorted(self.offloads),
            mtu=self.mtu or 1500,
            mac=self.args.tap_mac_address,
            session=req.session,
            namespace=self.args.namespace,
            handshakes=self.handshakes,
        )

    # -- set-up and tear-down ----------------------------------------------------------------

    def setup_namespace(self) -> None:
        a = self.args
        ns = a.namespace
        if ns in list_netns():
            if subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True
            ).stdout.strip():
                raise SetupError(f"namespace {ns} exists and has processes; not touching it")
            log.warning("netns.stale_replaced", namespace=ns)
            sh("ip", "netns", "del", ns)
        sh("ip", "netns", "add", ns)
        self.created.append("netns")
        if sh("ip", "link", "show", a.veth_outside, check=False).returncode == 0:
            log.warning("veth.stale_deleted", name=a.veth_outside)
            sh("ip", "link", "del", a.veth_outside)
        sh("ip", "link", "add", a.veth_outside, "type", "veth", "peer", "name", a.veth_inside,
           "netns", ns)  # fmt: skip
        self.created.append("veth")
        sh("ip", "addr", "add", a.veth_outside_address, "dev", a.veth_outside)
        sh("ip", "link", "set", a.veth_outside, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", a.veth_inside_address, "dev", a.veth_inside)
        sh("ip", "-n", ns, "link", "set", a.veth_inside, "up")
        if not a.no_nat:
            subnet = str(ipaddress.ip_interface(a.veth_inside_address).network)
            try:
                nat_rules.apply(ns, a.tap_interface, a.veth_inside, subnet, a.nat_port)
            except nat_rules.NatError as e:
                raise SetupError(str(e)) from None
            self.created.append("nat")
        log.info(
            "netns.ready",
            namespace=ns,
            veth_inside=f"{a.veth_inside} {a.veth_inside_address}",
            veth_outside=f"{a.veth_outside} {a.veth_outside_address}",
            nat=not a.no_nat,
        )

    def netns_path(self) -> str:
        return f"/run/netns/{self.args.namespace}"

    async def _replace_vm_switch(self, sock: socket.socket, uri: LinkUri) -> None:
        if self.vm_switch.running:
            log.info("vm-switch.replacing", pid=self.vm_switch.pid, data_address=str(uri))
            await self.vm_switch.stop(self.args.stop_timeout)
        a = self.args
        data = fd_uri(uri, vnet_hdr="vnet_hdr" in self.offloads)
        argv = ["nsenter", f"--net={self.netns_path()}", "--", a.vm_switch_path,
                "--connect", data, "--tap-interface", a.tap_interface,
                "--tap-mac-address", a.tap_mac_address, "--dhcp-client", a.dhcp_client]  # fmt: skip
        if self.mtu:
            argv += ["--mtu", str(self.mtu)]
        if a.resolv_conf:
            argv += ["--resolv-conf", a.resolv_conf]
        if a.vm_switch_log_file:
            argv += ["--log-format", "json", "--log-file", a.vm_switch_log_file]
        if a.debug:
            argv.append("--debug")
        if a.subnet:
            argv += ["--subnet", a.subnet]
        if a.dhcp_script:
            argv += ["--dhcp-script", a.dhcp_script]
        if a.no_ipv6:
            argv.append("--no-ipv6")
        elif a.dhcpv6:
            argv.append("--dhcpv6")
        self.vm_switch.start(argv, {3: sock.fileno()})
        self._watch(self._watch_vm_switch(self.vm_switch.exited))

    async def start_init(self) -> None:
        a = self.args
        argv = ["nsenter", f"--net={self.netns_path()}", "--", "unshare", "--pid", "--fork",
                "--mount-proc", "--kill-child", *a.unshare_arg]  # fmt: skip
        self.init.start(argv)
        # The init is unshare's only child: pid 1 inside, this pid out here.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.init.running:
            kids = _children(self.init.pid)
            if kids:
                self.init_pid = kids[0]
                break
            await asyncio.sleep(0.02)
        if not self.init_pid:
            raise SetupError("the init did not start (unshare has no child)")
        if a.pid_file:
            tmp = f"{a.pid_file}.tmp{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(f"{self.init_pid}\n")
            os.replace(tmp, a.pid_file)
            self.created.append("pidfile")
        log.info("init.started", pid=self.init_pid, unshare_pid=self.init.pid, pid_file=a.pid_file)
        self._watch(self._watch_init(self.init.exited))

    def _watch(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(coro)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch_init(self, exited: asyncio.Future[int] | None) -> None:
        assert exited is not None
        rc = await exited
        if not self.stopping and not self.done.done():
            log.warning("init.exited", rc=rc, action="stopping the guest")
            self.done.set_result(rc if rc >= 0 else 128 - rc)

    async def _watch_vm_switch(self, exited: asyncio.Future[int] | None) -> None:
        assert exited is not None
        rc = await exited
        if self.stopping or self.vm_switch.running:
            return  # stopped by us, or already replaced
        generation = self.generation
        log.warning("vm-switch.exited", rc=rc, action="redialling the last data address")
        backoff = 0.2
        loop = asyncio.get_running_loop()
        while not self.stopping and generation == self.generation and self.data_uri:
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            async with self.lock:
                if self.stopping or generation != self.generation or self.vm_switch.running:
                    return  # a handshake took over
                uri = self.data_uri
                try:
                    sock = await loop.run_in_executor(None, dial_data, uri)
                except (OSError, ValueError) as e:
                    log.info("data.redial_failed", data_address=str(uri), error=str(e),
                             retry_in=backoff)  # fmt: skip
                    continue
                try:
                    await self._replace_vm_switch(sock, uri)
                finally:
                    sock.close()
                log.info("data.redialled", data_address=str(uri))
                return

    async def shutdown(self) -> None:
        self.stopping = True
        t = self.args.stop_timeout
        await self.vm_switch.stop(t)
        await self.init.stop(t, first_target=self.init_pid or None)
        for task in list(self._watchers):
            task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.teardown)

    def teardown(self) -> None:
        a = self.args
        ns = a.namespace
        if "nat" in self.created:
            nat_rules.remove(ns)
        if "veth" in self.created:
            sh("ip", "link", "del", a.veth_outside, check=False)
        if "netns" in self.created:
            sh("ip", "netns", "del", ns, check=False)
        if "pidfile" in self.created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(a.pid_file)
        log.info("teardown.done", removed=self.created)
        self.created.clear()

    def status(self) -> pb.StatusResponse:
        a = self.args
        return pb.StatusResponse(
            guest_id=self.guest_id,
            guest_version=version(),
            namespace=a.namespace if self.setup_done else "",
            init_pid=self.init_pid if self.init.running else 0,
            children=[
                pb.ChildStatus(name=c.name, pid=c.pid, starts=c.starts)
                for c in (self.vm_switch, self.init)
            ],
            data_address=str(self.data_uri) if self.data_uri else "",
            data_link_up=self.vm_switch.running,
            host_id=self.host_id,
            handshakes=self.handshakes,
            veth_inside=f"{a.veth_inside} {a.veth_inside_address}" if self.setup_done else "",
            veth_outside=f"{a.veth_outside} {a.veth_outside_address}" if self.setup_done else "",
        )


def subnet_mismatch(mine: str | None, hosts: str) -> str:
    """'' when `-subnet` (if given) is the network hostd's handshake announces, else why not."""
    if not mine:
        return ""
    try:
        if ipaddress.ip_network(hosts, strict=False) == ipaddress.ip_network(mine, strict=False):
            return ""
    except ValueError:
        pass
    return (
        f"subnet: hostd's network is {hosts or '(not announced)'} but network-setup was started "
        f"with -subnet {mine}; start both with the same subnet"
    )


class HandshakeRefused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class GuestService(pb_grpc.GuestServicer):
    def __init__(self, guest: Guest) -> None:
        self.guest = guest

    async def Handshake(self, request, context):
        try:
            return await self.guest.handshake(request)
        except HandshakeRefused as e:
            log.warning("handshake.refused", code=e.code.name, message=str(e))
            await context.abort(e.code, str(e))

    async def Status(self, request, context):
        return self.guest.status()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return []


def list_netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


async def run(args: argparse.Namespace) -> int:
    unix_paths, vsock_uris = [], []
    for text in args.listen or [f"unix://{DEFAULT_SOCKET}"]:
        uri = parse_link_uri(text)
        (unix_paths if uri.scheme == "unix" else vsock_uris).append(uri)
    path = unix_paths[0].path if unix_paths else DEFAULT_SOCKET
    guest = Guest(args)
    server = UnixGrpcServer(
        path, [SERVICE_NAME], lambda s: pb_grpc.add_GuestServicer_to_server(GuestService(guest), s)
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bridges: list[Bridge] = []
    try:
        if args.namespace in list_netns():
            out = subprocess.run(["ip", "netns", "pids", args.namespace], capture_output=True,
                                 text=True).stdout.strip()  # fmt: skip
            if out:
                raise OSError(f"namespace {args.namespace} exists and has processes ({out})")
        await server.start()
        for uri in vsock_uris:
            b = Bridge(vsock_listener(uri), path)
            await b.start()
            bridges.append(b)
            log.info("bridge.listening", uri=str(uri), target=path)
    except OSError as e:
        log.error("startup.failed", error=str(e))
        await server.stop()
        return 1
    log.info("network-setup.ready", socket=path, namespace=args.namespace, version=version())
    if args.ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
    stopper = loop.create_task(stop.wait())
    await asyncio.wait([stopper, guest.done], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    rc = guest.done.result() if guest.done.done() else 0
    log.info("network-setup.stopping", reason="init exited" if guest.done.done() else "signal")
    for b in bridges:
        b.close()
    await server.stop()
    await guest.shutdown()
    log.info("network-setup.stopped", rc=rc)
    return rc


def _default_vm_switch() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "vm-switch")
    return beside if os.path.exists(beside) else (shutil.which("vm-switch") or "vm-switch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="network-setup", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="URI",
        help=f"Guest API: unix:///path (gRPC, 0600) and/or vsock://[CID]:PORT (bridged to the "
        f"unix socket; default unix://{DEFAULT_SOCKET})",
    )
    p.add_argument("--namespace", default="netferry", help="isolated netns name (ip netns)")
    p.add_argument("--veth-inside", default="veth-rd-ns")
    p.add_argument("--veth-outside", default="veth-rd-wsl")
    p.add_argument("--veth-inside-address", default="192.168.143.1/24")
    p.add_argument("--veth-outside-address", default="192.168.143.2/24")
    p.add_argument("--tap-interface", default="eth0")
    p.add_argument("--tap-mac-address", default="5a:94:ef:e4:0c:ee")
    p.add_argument(
        "--subnet",
        metavar="CIDR",
        help="the network this guest expects (Rancher Desktop's -subnet): a handshake for "
        "another is refused, and vm-switch checks its lease (default: no check)",
    )
    p.add_argument("--dhcp-script", metavar="PATH", help="passed to vm-switch ('' = default)")
    p.add_argument(
        "--trace-packets",
        action="store_true",
        help="accepted for Rancher Desktop; netferry logs no packets (use host-switch --pcap)",
    )
    p.add_argument("--mtu", type=int, help="tap MTU (default: what the handshake says)")
    p.add_argument("--dhcp-client", choices=["pyroute2", "udhcpc", "none"], default="pyroute2")
    p.add_argument("--resolv-conf", metavar="PATH", help="passed to vm-switch")
    p.add_argument(
        "--no-ipv6",
        action="store_true",
        help="no IPv6 on the tap (passed to vm-switch; match host-switch --no-ipv6)",
    )
    p.add_argument(
        "--dhcpv6",
        action="store_true",
        help="vm-switch also runs a DHCPv6 client (default: SLAAC and the RA's DNS servers)",
    )
    p.add_argument("--vm-switch-path", default=_default_vm_switch())
    p.add_argument("--vm-switch-log-file", metavar="PATH")
    p.add_argument(
        "--unshare-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="appended to `unshare --pid --fork --mount-proc --kill-child` (repeatable): the "
        "init command and its arguments, or extra unshare options before them",
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="-- INIT [ARGS...]: the init command (after the --unshare-arg values)",
    )
    p.add_argument("--pid-file", default="/run/wsl-init.pid", help="the init's pid goes here")
    p.add_argument("--no-nat", action="store_true", help="do not install the netferry nft table")
    p.add_argument(
        "--nat-port",
        type=int,
        action="append",
        default=[],
        help="DNAT only these ports to 127.0.0.1 (repeatable; default all)",
    )
    p.add_argument("--stop-timeout", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--ready-fd", type=int, metavar="N", help="write 'ready' once serving")
    add_logging_arguments(p)
    return p


# Rancher Desktop's network-setup flags (Go syntax: `--logfile F -debug --unshare-arg S`);
# -vm-switch-path, -unshare-arg, -tap-interface, -tap-mac-address, -subnet, -dhcp-script,
# -trace-packets and -debug are ours under the same names.
GO_ALIASES = {
    "logfile": "--log-file",
    "vm-switch-logfile": "--vm-switch-log-file",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_go_flags(parser, argv, GO_ALIASES)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    args.unshare_arg = [*args.unshare_arg, *command]
    if args.subnet:
        try:
            ipaddress.ip_network(args.subnet, strict=False)
        except ValueError as e:
            parser.error(f"--subnet: {e}")
    configure_logging(args.log_format, "debug" if args.debug else "info", args.log_file)
    if args.trace_packets:
        log.warning("trace_packets.unsupported", hint="use host-switch --pcap FILE")
    for text in args.listen:
        try:
            uri = parse_link_uri(text)
        except ValueError as e:
            build_parser().error(str(e))
        if uri.scheme not in ("unix", "vsock"):
            build_parser().error(f"--listen {text}: expected unix:///path or vsock://[CID]:PORT")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 130


__all__ = ["PROTOCOL_VERSION", "Bridge", "Guest", "dial_data", "main"]
