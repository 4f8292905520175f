"""`wsl-proxy`: port mappings in the default namespace, forwarded into the guest namespace.

It runs in the default (WSL) network namespace, where other distros and Windows look for
`localhost` ports, and serves `netferry.v1.PortProxy` over gRPC on a unix socket (default
`/run/wsl-proxy.sock`, mode 0600; reflection and grpc.health.v1 as on every netferry server).
The guest agent streams mappings to it; for each one wsl-proxy listens on the requested
address and port and forwards both ways to the same port on `--upstream-address`
(192.168.143.1, the inside end of network-setup's veth pair, where the NAT rules DNAT it to
the guest namespace's 127.0.0.1).

What it owns: one listener per mapping, keyed by (protocol, host ip, port), so two addresses
on one port are two mappings (Rancher Desktop keyed by port only and let them overwrite each
other). TCP: each accepted connection dials the upstream (5 s timeout) and copies both ways
with half-close; either side's end closes both. UDP: one upstream socket per client address
(a session), replies relayed back to that client (the reference relayed one direction only),
sessions idle out after `--udp-idle-timeout` and are bounded by `--udp-max-sessions`
(least recently used evicted).

Every change gets one answer with the request's id: APPLIED (also for a repeat), REMOVED, or
ERROR with a precise code: ADDRESS_IN_USE, BAD_ADDRESS, PERMISSION_DENIED, NOT_FOUND,
INVALID_ARGUMENT. An error never ends the stream.

The disconnected-agent rule: mappings belong to the agent named in the stream's `hello`.
When its stream ends they stay, listening and forwarding, so an agent restart (or crash)
causes no outage. A reconnecting agent sends `hello{resync: true}`, re-adds everything it
wants and then `sync_done`; its mappings it did not re-add are removed then and listed in
the answer. A removal by anyone removes the mapping, whoever added it.

Rancher Desktop's wire, on the same socket path: its guest agent connects, writes one JSON
PortMapping (`{"remove": false, "ports": {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort":
"8080"}]}}`, newline-terminated) and closes. The public socket is a small front listener
that peeks at the first bytes: the HTTP/2 preface (`PRI * HTTP/2.0`) is a gRPC client and
its connection is piped byte for byte to grpcio's server on a private socket (in a 0700
directory beside the public one; grpcio cannot take an accepted connection); `{` is a JSON
PortMapping (see `JsonPortMappings`); anything else gets a JSON error line and is closed.
Rancher Desktop's own wsl-proxy wrote nothing back; this one answers every PortMapping with
one JSON line (the ack), and a client that closed without reading it loses nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from netferry.goflags import parse_args as parse_go_flags
from netferry.log import add_logging_arguments, configure_logging
from netferry.reflection import enable_server_reflection
from netferry.streams import pump, splice
from netferry.unixsock import clear_stale_socket
from netferry.v1 import proxy_pb2 as pb
from netferry.v1 import proxy_pb2_grpc as pb_grpc

log = structlog.get_logger("wsl-proxy")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PortProxy"].full_name
DEFAULT_SOCKET = "/run/wsl-proxy.sock"
PROTOCOLS = {pb.MAPPING_PROTOCOL_TCP: "tcp", pb.MAPPING_PROTOCOL_UDP: "udp"}
PROTOCOL_VALUES = {v: k for k, v in PROTOCOLS.items()}


class MappingFault(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, order=True)
class Key:
    protocol: str  # "tcp" | "udp"
    host_ip: str  # normalised: "127.0.0.1", "0.0.0.0", "::1"
    port: int

    def __str__(self) -> str:
        host = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        return f"{self.protocol} {host}:{self.port}"

    def to_pb(self) -> pb.Mapping:
        return pb.Mapping(
            protocol=PROTOCOL_VALUES[self.protocol], host_ip=self.host_ip, port=self.port
        )


def key_from_pb(m: pb.Mapping) -> Key:
    """Validate and normalise a mapping; MappingFault names the field."""
    if m.protocol not in PROTOCOLS:
        raise MappingFault(
            pb.MAPPING_ERROR_INVALID_ARGUMENT, f"protocol: {m.protocol} is not TCP or UDP"
        )
    if not 1 <= m.port <= 65535:
        raise MappingFault(pb.MAPPING_ERROR_INVALID_ARGUMENT, f"port: {m.port} is not 1..65535")
    text = m.host_ip.strip().strip("[]") or "127.0.0.1"
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise MappingFault(
            pb.MAPPING_ERROR_BAD_ADDRESS, f"host_ip: {m.host_ip!r} is not an IP address"
        ) from None
    if ip.is_multicast:
        raise MappingFault(pb.MAPPING_ERROR_BAD_ADDRESS, f"host_ip: {ip} is a multicast address")
    return Key(PROTOCOLS[m.protocol], str(ip), m.port)


def fault_from_oserror(key: Key, e: OSError) -> MappingFault:
    what = e.strerror or str(e)
    if e.errno == errno.EADDRINUSE:
        return MappingFault(pb.MAPPING_ERROR_ADDRESS_IN_USE, f"{key}: port in use ({what})")
    if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL):
        return MappingFault(
            pb.MAPPING_ERROR_BAD_ADDRESS, f"{key}: bad address, not one of this namespace ({what})"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return MappingFault(pb.MAPPING_ERROR_PERMISSION_DENIED, f"{key}: permission denied")
    return MappingFault(pb.MAPPING_ERROR_BAD_ADDRESS, f"{key}: cannot listen ({what})")


# ---- forwarding ---------------------------------------------------------------------------


@dataclass
class Entry:
    key: Key
    agent: str
    upstream: tuple[str, int]
    active: int = 0
    total: int = 0
    server: asyncio.base_events.Server | None = None
    udp: UdpListener | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    created: float = field(default_factory=time.time)


async def _pipe(
    entry: Entry,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    connect_timeout: float,
) -> None:
    entry.active += 1
    entry.total += 1
    up_w: asyncio.StreamWriter | None = None
    try:
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(*entry.upstream), connect_timeout
            )
        except (OSError, TimeoutError) as e:
            log.info("tcp.upstream_failed", mapping=str(entry.key), error=str(e) or "timeout")
            return
        await splice(reader, writer, up_r, up_w)
    finally:
        entry.active -= 1
        for w in (writer, up_w):
            if w is not None:
                w.close()


class _UdpUpstream(asyncio.DatagramProtocol):
    def __init__(self, listener: UdpListener, client: tuple) -> None:  # type: ignore[type-arg]
        self.listener = listener
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        self.listener.reply(self.client, data)

    def error_received(self, exc: Exception) -> None:
        pass


class UdpSession:
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: list[bytes] = []
        self.last = time.monotonic()


class UdpListener(asyncio.DatagramProtocol):
    """A UDP mapping: one upstream socket per client address, replies sent back."""

    def __init__(self, entry: Entry, idle_timeout: float, max_sessions: int) -> None:
        self.entry = entry
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[tuple, UdpSession] = OrderedDict()  # type: ignore[type-arg]
        self.transport: asyncio.DatagramTransport | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport
        self._reaper = self.loop.create_task(self._reap())

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        s = self.sessions.get(addr)
        if s is None:
            while len(self.sessions) >= self.max_sessions:
                _, old = self.sessions.popitem(last=False)
                if old.transport is not None:
                    old.transport.close()
            s = UdpSession()
            self.sessions[addr] = s
            self.entry.total += 1
            self.loop.create_task(self._open(addr, s))
        else:
            self.sessions.move_to_end(addr)
        s.last = time.monotonic()
        if s.transport is None:
            if len(s.pending) < 64:
                s.pending.append(data)
        else:
            s.transport.sendto(data)

    async def _open(self, addr: tuple, s: UdpSession) -> None:  # type: ignore[type-arg]
        try:
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _UdpUpstream(self, addr), remote_addr=self.entry.upstream
            )
        except OSError as e:
            log.info("udp.upstream_failed", mapping=str(self.entry.key), error=str(e))
            self.sessions.pop(addr, None)
            return
        if self.sessions.get(addr) is not s:  # evicted or closed meanwhile
            transport.close()
            return
        s.transport = transport
        for data in s.pending:
            transport.sendto(data)
        s.pending.clear()

    def reply(self, client: tuple, data: bytes) -> None:  # type: ignore[type-arg]
        s = self.sessions.get(client)
        if s is not None:
            s.last = time.monotonic()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, client)

    @property
    def active(self) -> int:
        return len(self.sessions)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_timeout, 5.0))
            cutoff = time.monotonic() - self.idle_timeout
            for addr, s in list(self.sessions.items()):
                if s.last < cutoff:
                    self.sessions.pop(addr, None)
                    if s.transport is not None:
                        s.transport.close()

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for s in self.sessions.values():
            if s.transport is not None:
                s.transport.close()
        self.sessions.clear()
        if self.transport is not None:
            self.transport.close()


class MappingTable:
    """The mappings and their listeners; the logic behind the gRPC service."""

    def __init__(
        self,
        upstream_address: str = "192.168.143.1",
        connect_timeout: float = 5.0,
        udp_idle_timeout: float = 60.0,
        udp_max_sessions: int = 1024,
        udp_buffer: int | None = None,
    ) -> None:
        self.upstream_address = upstream_address
        self.udp_buffer = udp_buffer  # SO_RCVBUF of each UDP mapping's socket
        self.connect_timeout = connect_timeout
        self.udp_idle_timeout = udp_idle_timeout
        self.udp_max_sessions = udp_max_sessions
        self.entries: dict[Key, Entry] = {}
        self.connected: dict[str, int] = {}  # agent → open streams

    async def add(self, key: Key, agent: str = "") -> tuple[Entry, bool]:
        """Listen for `key`; returns (entry, created). Raises MappingFault."""
        entry = self.entries.get(key)
        if entry is not None:
            entry.agent = agent
            return entry, False
        entry = Entry(key, agent, (self.upstream_address, key.port))
        self.entries[key] = entry  # reserved before the first await
        loop = asyncio.get_running_loop()
        try:
            if key.protocol == "tcp":

                async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                    task = asyncio.current_task()
                    assert task is not None
                    entry.tasks.add(task)
                    try:
                        await _pipe(entry, r, w, self.connect_timeout)
                    finally:
                        entry.tasks.discard(task)

                entry.server = await asyncio.start_server(
                    handle, key.host_ip, key.port, reuse_address=True, backlog=1024
                )
            else:
                family = socket.AF_INET6 if ":" in key.host_ip else socket.AF_INET
                _, proto = await loop.create_datagram_endpoint(
                    lambda: UdpListener(entry, self.udp_idle_timeout, self.udp_max_sessions),
                    local_addr=(key.host_ip, key.port),
                    family=family,
                )
                entry.udp = proto
                if self.udp_buffer:
                    sock = proto.transport.get_extra_info("socket") if proto.transport else None
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.udp_buffer)
        except OSError as e:
            self.entries.pop(key, None)
            raise fault_from_oserror(key, e) from None
        except BaseException:
            self.entries.pop(key, None)
            raise
        log.info("mapping.added", mapping=str(key), agent=agent, upstream=f"{entry.upstream}")
        return entry, True

    async def remove(self, key: Key) -> Entry:
        entry = self.entries.pop(key, None)
        if entry is None:
            raise MappingFault(pb.MAPPING_ERROR_NOT_FOUND, f"{key}: no such mapping")
        await self._close(entry)
        log.info("mapping.removed", mapping=str(key))
        return entry

    async def _close(self, entry: Entry) -> None:
        if entry.server is not None:
            entry.server.close()
            for t in list(entry.tasks):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(entry.server.wait_closed(), 2)
        if entry.udp is not None:
            entry.udp.close()

    def active(self, entry: Entry) -> int:
        return entry.udp.active if entry.udp is not None else entry.active

    def list(self) -> list[Entry]:
        return [self.entries[k] for k in sorted(self.entries)]

    async def close(self) -> None:
        for entry in list(self.entries.values()):
            await self._close(entry)
        self.entries.clear()


# ---- gRPC ---------------------------------------------------------------------------------


class PortProxyService(pb_grpc.PortProxyServicer):
    def __init__(self, table: MappingTable) -> None:
        self.table = table

    async def handle(self, req: pb.StreamMappingsRequest, state: dict) -> pb.StreamMappingsResponse:
        """One change → its answer; `state` is the stream's: agent name and resync marks."""
        t = self.table
        resp = pb.StreamMappingsResponse(id=req.id)
        kind = req.WhichOneof("change")
        try:
            if kind == "hello":
                old = state["agent"]
                if old is not None:
                    t.connected[old] -= 1
                state["agent"] = req.hello.agent
                t.connected[req.hello.agent] = t.connected.get(req.hello.agent, 0) + 1
                if req.hello.resync:
                    state["marked"] = {
                        k for k, e in t.entries.items() if e.agent == req.hello.agent
                    }
                resp.status = pb.MAPPING_STATUS_OK
                resp.message = f"hello {req.hello.agent!r}" + (
                    ", resync" if req.hello.resync else ""
                )
            elif kind == "add":
                key = key_from_pb(req.add)
                resp.mapping.CopyFrom(key.to_pb())
                _, created = await t.add(key, state["agent"] or "")
                if state["marked"] is not None:
                    state["marked"].discard(key)
                resp.status = pb.MAPPING_STATUS_APPLIED
                resp.message = f"{key} → {t.upstream_address}:{key.port}" + (
                    "" if created else " (already applied)"
                )
            elif kind == "remove":
                key = key_from_pb(req.remove)
                resp.mapping.CopyFrom(key.to_pb())
                await t.remove(key)
                resp.status = pb.MAPPING_STATUS_REMOVED
                resp.message = f"{key} removed"
            elif kind == "sync_done":
                marked = state["marked"]
                state["marked"] = None
                if marked is None:
                    raise MappingFault(
                        pb.MAPPING_ERROR_INVALID_ARGUMENT,
                        "sync_done: no resync in progress (send hello{resync: true} first)",
                    )
                for key in sorted(marked):
                    e = t.entries.get(key)
                    if e is not None and e.agent == (state["agent"] or ""):
                        await t.remove(key)
                        resp.swept.append(key.to_pb())
                resp.status = pb.MAPPING_STATUS_OK
                resp.message = f"resync done, {len(resp.swept)} removed"
            else:
                raise MappingFault(pb.MAPPING_ERROR_INVALID_ARGUMENT, "change: is empty")
        except MappingFault as f:
            resp.status = pb.MAPPING_STATUS_ERROR
            resp.error = f.code  # type: ignore[assignment]
            resp.message = str(f)
            log.info("mapping.refused", message=str(f))
        return resp

    async def StreamMappings(self, request_iterator, context):
        state: dict = {"agent": None, "marked": None}
        try:
            async for req in request_iterator:
                yield await self.handle(req, state)
        finally:
            if state["agent"] is not None:
                self.table.connected[state["agent"]] -= 1

    async def ListMappings(self, request, context):
        t = self.table
        return pb.ListMappingsResponse(
            mappings=[
                pb.MappingInfo(
                    mapping=e.key.to_pb(),
                    agent=e.agent,
                    agent_connected=t.connected.get(e.agent, 0) > 0,
                    upstream=f"{e.upstream[0]}:{e.upstream[1]}",
                    active=t.active(e),
                    total=e.total,
                )
                for e in t.list()
            ]
        )


class UnixGrpcServer:
    """grpc.aio on a unix socket (0600) with reflection and health: netferry's conventions."""

    def __init__(self, path: str, services: list[str], add) -> None:  # type: ignore[no-untyped-def]
        self.path = path
        self.services = services
        self.add = add
        self.server: grpc.aio.Server | None = None
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        server = grpc.aio.server()
        self.add(server)
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        enable_server_reflection(  # resolves Service.Method too (grpcurl describe)
            (*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        clear_stale_socket(self.path, make_parent=True)
        old = os.umask(0o177)
        try:
            server.add_insecure_port(f"unix:{self.path}")
        finally:
            os.umask(old)
        await server.start()
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        for name in (*self.services, ""):
            await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)


# ---- Rancher Desktop's JSON PortMapping wire ----------------------------------------------

RD_AGENT = "rancher-desktop"  # owner of mappings made through the JSON wire
JSON_MAX_BYTES = 1 << 20
JSON_READ_TIMEOUT = 10.0
ERROR_NAMES = {v: k.removeprefix("MAPPING_ERROR_") for k, v in pb.MappingError.items()}
STATUS_NAMES = {v: k.removeprefix("MAPPING_STATUS_") for k, v in pb.MappingStatus.items()}


def _truncated(e: json.JSONDecodeError) -> bool:
    """The text so far is a valid beginning: the error is at its end (only whitespace after
    it) or inside a string not yet closed."""
    return not e.doc[e.pos :].strip() or e.msg.startswith("Unterminated string")


class JsonRequestError(Exception):
    """The request as a whole is unusable (not JSON, wrong shape): nothing was changed."""


def parse_port_mapping(doc: object) -> tuple[bool, list[tuple[str, pb.Mapping | None, str]]]:
    """A Rancher Desktop PortMapping → (remove, [(label, mapping or None, why not)]).

    `ports` is docker's nat.PortMap: "PORT[/PROTO]" (tcp when absent, as docker) → a list of
    {"HostIp", "HostPort"}. As in Rancher Desktop, the mapping listens on HostIp:HostPort and
    forwards to the upstream's HostPort; an empty HostIp means every address (0.0.0.0).
    A bad binding is reported on its own and does not stop the others."""
    if not isinstance(doc, dict):
        raise JsonRequestError(f"expected a JSON object (a PortMapping), got {type(doc).__name__}")
    remove = doc.get("remove", False)
    if not isinstance(remove, bool):
        raise JsonRequestError(f'"remove": expected true or false, got {remove!r}')
    ports = doc.get("ports")
    if ports is None:
        ports = {}
    if not isinstance(ports, dict):
        raise JsonRequestError('"ports": expected an object like {"8080/tcp": [...]}')
    items: list[tuple[str, pb.Mapping | None, str]] = []
    for port_key, bindings in ports.items():
        _, _, proto = str(port_key).partition("/")
        proto = (proto or "tcp").lower()
        if bindings is None:
            bindings = []
        if not isinstance(bindings, list):
            items.append((str(port_key), None, f'ports["{port_key}"]: expected a list'))
            continue
        for b in bindings:
            label = f"{port_key} {json.dumps(b)}"
            if not isinstance(b, dict):
                items.append((label, None, f'ports["{port_key}"]: a binding must be an object'))
                continue
            if proto not in PROTOCOL_VALUES:
                items.append((label, None, f'ports["{port_key}"]: protocol {proto!r} is not '
                                           "tcp or udp"))  # fmt: skip
                continue
            host_ip = b.get("HostIp") or "0.0.0.0"
            host_port = b.get("HostPort")
            if not isinstance(host_ip, str):
                items.append((label, None, f"HostIp: {host_ip!r} is not a string"))
                continue
            try:
                port = int(str(host_port), 10)
            except ValueError:
                items.append((label, None, f"HostPort: {host_port!r} is not a port number"))
                continue
            m = pb.Mapping(protocol=PROTOCOL_VALUES[proto], host_ip=host_ip, port=port)
            items.append((label, m, ""))
    return remove, items


class JsonPortMappings:
    """Serves one Rancher Desktop PortMapping per connection and writes the ack.

    The ack is one line of JSON, written once every binding of the request was handled:
    `{"ok": true|false, "results": [{"mapping": "tcp 0.0.0.0:8080", "status": "APPLIED",
    "message": "..."}]}`; a binding that failed has `"status": "ERROR"`, `"error"` (the
    PortProxy error name: ADDRESS_IN_USE, BAD_ADDRESS, PERMISSION_DENIED, NOT_FOUND,
    INVALID_ARGUMENT) and `"message"`; `ok` is true when every binding succeeded. A request
    that is not a PortMapping (bad JSON, wrong shape, over 1 MiB, no complete object within
    10 s) changes nothing and gets `{"ok": false, "error": "INVALID_ARGUMENT", "message":
    "...", "results": []}`. Then the connection is closed. The mapping is applied whether or
    not the client is still there to read the ack (Rancher Desktop's agent closes at once)."""

    def __init__(self, service: PortProxyService) -> None:
        self.service = service
        self.requests = 0

    async def serve(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.requests += 1
        try:
            doc = await self._read(first, reader)
            reply = await self.apply(doc)
        except JsonRequestError as e:
            log.info("json.refused", message=str(e))
            reply = {"ok": False, "error": "INVALID_ARGUMENT", "message": str(e), "results": []}
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), 5)

    async def _read(self, buf: bytes, reader: asyncio.StreamReader) -> object:
        """One JSON value: done when it parses (a newline is not needed, and a value spread
        over several lines or writes is waited for), refused as soon as it cannot become
        valid, or at the end of input, 1 MiB or 10 s."""
        deadline = asyncio.get_running_loop().time() + JSON_READ_TIMEOUT
        while True:
            try:
                return json.loads(buf)
            except UnicodeDecodeError as e:
                if len(buf) - e.end > 3:  # not a multi-byte character cut short
                    raise JsonRequestError(f"bad JSON: {e}") from None
            except json.JSONDecodeError as e:
                if not _truncated(e):
                    raise JsonRequestError(f"bad JSON: {e}") from None
            if len(buf) > JSON_MAX_BYTES:
                raise JsonRequestError(f"request over {JSON_MAX_BYTES} bytes")
            left = deadline - asyncio.get_running_loop().time()
            try:
                chunk = await asyncio.wait_for(reader.read(1 << 16), max(left, 0))
            except TimeoutError:
                raise JsonRequestError(
                    f"no complete JSON object within {JSON_READ_TIMEOUT:g} s"
                ) from None
            except (ConnectionError, OSError):
                chunk = b""
            if not chunk:
                try:
                    return json.loads(buf)
                except (ValueError, UnicodeDecodeError) as e:
                    raise JsonRequestError(f"bad JSON: {e}") from None
            buf += chunk

    async def apply(self, doc: object) -> dict:
        remove, items = parse_port_mapping(doc)
        state: dict = {"agent": RD_AGENT, "marked": None}
        results = []
        for label, mapping, why in items:
            if mapping is None:
                results.append({"mapping": label, "status": "ERROR",
                                "error": "INVALID_ARGUMENT", "message": why})  # fmt: skip
                continue
            req = pb.StreamMappingsRequest(**{"remove" if remove else "add": mapping})
            resp = await self.service.handle(req, state)
            result = {
                "mapping": str(key_from_pb(resp.mapping)) if resp.HasField("mapping") else label,
                "status": STATUS_NAMES[resp.status],
                "message": resp.message,
            }
            if resp.status == pb.MAPPING_STATUS_ERROR:
                result["error"] = ERROR_NAMES[resp.error]
            results.append(result)
        ok = all(r["status"] != "ERROR" for r in results)
        log.info("json.request", remove=remove, results=len(results), ok=ok)
        return {"ok": ok, "results": results}


# ---- the public socket: gRPC and JSON side by side ----------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_PREFIX = H2_PREFACE[:14]  # "PRI * HTTP/2.0": enough to tell


class FrontListener:
    """The public unix socket (0600). It peeks at each connection's first bytes: gRPC
    (HTTP/2) is piped to `grpc_path`, a JSON PortMapping goes to `json_server`."""

    def __init__(self, path: str, grpc_path: str, json_server: JsonPortMappings) -> None:
        self.path = path
        self.grpc_path = grpc_path
        self.json_server = json_server
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        clear_stale_socket(self.path, make_parent=True)
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._handle, self.path)
        finally:
            os.umask(old)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            kind, first = await self._classify(reader)
            if kind == "grpc":
                await self._pipe_to_grpc(first, reader, writer)
            elif kind == "json":
                await self.json_server.serve(first, reader, writer)
            elif kind == "unknown":
                log.info("front.unknown_protocol", first=first[:16].hex())
                msg = "expected a gRPC client (HTTP/2) or a JSON PortMapping starting with '{'"
                reply = {"ok": False, "error": "INVALID_ARGUMENT", "message": msg, "results": []}
                with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await asyncio.wait_for(writer.drain(), 5)
        finally:
            writer.close()
            self.tasks.discard(task)

    async def _classify(self, reader: asyncio.StreamReader) -> tuple[str, bytes]:
        buf = b""
        while True:
            head = buf.lstrip()
            if head[:1] == b"{":
                return "json", buf
            if buf[: len(H2_PREFIX)] == H2_PREFIX:
                return "grpc", buf
            if head and not H2_PREFIX.startswith(buf[: len(H2_PREFIX)]):
                return "unknown", buf
            try:
                chunk = await asyncio.wait_for(reader.read(1 << 16), JSON_READ_TIMEOUT)
            except (TimeoutError, ConnectionError, OSError):
                return "closed", buf
            if not chunk:
                return "closed", buf
            buf += chunk

    async def _pipe_to_grpc(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_r, up_w = await asyncio.open_unix_connection(self.grpc_path)
        except OSError as e:
            log.warning("front.grpc_unreachable", path=self.grpc_path, error=str(e))
            return
        try:
            up_w.write(first)
            await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
        finally:
            up_w.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)


async def run(args: argparse.Namespace) -> int:
    table = MappingTable(
        args.upstream_address,
        args.connect_timeout,
        args.udp_idle_timeout,
        args.udp_max_sessions,
        args.udp_buffer,
    )
    service = PortProxyService(table)
    # grpcio listens privately; the public path is the front listener (gRPC and JSON).
    parent = os.path.dirname(os.path.abspath(args.socket))
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        private = tempfile.mkdtemp(prefix=".wsl-proxy-", dir=parent)
    except OSError as e:
        log.error("startup.failed", error=str(e))
        return 1
    server = UnixGrpcServer(
        os.path.join(private, "grpc.sock"),
        [SERVICE_NAME],
        lambda s: pb_grpc.add_PortProxyServicer_to_server(service, s),
    )
    front = FrontListener(args.socket, server.path, JsonPortMappings(service))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        await front.start()
    except OSError as e:
        log.error("startup.failed", error=str(e))
        await front.stop()
        await server.stop()
        with contextlib.suppress(OSError):
            os.rmdir(private)
        return 1
    log.info("wsl-proxy.ready", socket=args.socket, upstream=args.upstream_address)
    if args.ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
    await stop.wait()
    await front.stop()
    await server.stop()
    with contextlib.suppress(OSError):
        os.rmdir(private)
    await table.close()
    log.info("wsl-proxy.stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsl-proxy", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--socket", default=DEFAULT_SOCKET, help="gRPC unix socket (default %(default)s)"
    )
    p.add_argument(
        "--upstream-address",
        default="192.168.143.1",
        help="where mappings forward to: the guest namespace's veth (default %(default)s)",
    )
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--udp-idle-timeout", type=float, default=60.0, metavar="SECONDS")
    p.add_argument("--udp-max-sessions", type=int, default=1024, help="per UDP mapping")
    p.add_argument(
        "--udp-buffer",
        type=int,
        metavar="BYTES",
        help="SO_RCVBUF of each UDP mapping's socket (Rancher Desktop's -udpBuffer; default: "
        "the kernel's)",
    )
    p.add_argument("--ready-fd", type=int, metavar="N", help="write 'ready' to fd N when serving")
    add_logging_arguments(p)
    return p


# Rancher Desktop's wsl-proxy flags (Go syntax: `-debug=false -logfile=F`).
GO_ALIASES = {
    "logfile": "--log-file",
    "socketFile": "--socket",
    "upstreamAddress": "--upstream-address",
    "udpBuffer": "--udp-buffer",
}


def main(argv: list[str] | None = None) -> int:
    args = parse_go_flags(build_parser(), argv, GO_ALIASES)
    configure_logging(args.log_format, "debug" if args.debug else "info", args.log_file)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
