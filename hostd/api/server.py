"""The HostSwitch gRPC service, served by grpc.aio on hostd's own event loop.

Running in the switch's loop means every handler reads and changes the switch directly, with
no locks and no threads: a forward added here is listening before the reply is sent. The
server also serves reflection (grpcurl needs nothing but the address) and grpc.health.v1.

Every bad request gets a precise status: INVALID_ARGUMENT naming the field, ALREADY_EXISTS
naming the holder, NOT_FOUND naming what was looked up. The table is in the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import struct
import time
from typing import TYPE_CHECKING

import grpc
import structlog
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hostd.capture import SNAPLEN, pcap_header, pcap_record
from hostd.forwards import Forward, ForwardError
from hostd.services.dns import DnsRecord, _name_error, normalize_name
from hostd.stack import tcp
from netferry.address import AddressError, parse_remote
from netferry.unixsock import clear_stale_socket
from netferry.v1 import host_pb2 as pb
from netferry.v1 import host_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from hostd.switch import HostSwitch

log = structlog.get_logger("hostd.api")

PROTOCOL_NAMES = {pb.PROTOCOL_TCP: "tcp", pb.PROTOCOL_UDP: "udp", pb.PROTOCOL_UNIX: "unix"}
PROTOCOL_VALUES = {v: k for k, v in PROTOCOL_NAMES.items()}
RECORD_TYPES = {
    pb.DNS_RECORD_TYPE_A: "A",
    pb.DNS_RECORD_TYPE_AAAA: "AAAA",
    pb.DNS_RECORD_TYPE_CNAME: "CNAME",
}
RECORD_VALUES = {v: k for k, v in RECORD_TYPES.items()}
STATUS = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HostSwitch"].full_name
CAPTURE_QUEUE = 8192  # frames buffered per capture client before dropping
MALFORMED_PREFIXES = (
    "malformed_",
    "ipv4_bad",
    "ipv4_truncated",
    "ipv4_reserved",
    "udp_bad",
    "udp_truncated",
    "icmp_bad",
    "icmp_truncated",
    "tcp_bad",
    "tcp_malformed",
)


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def forward_pb(fwd: Forward) -> pb.Forward:
    c = fwd.counters
    return pb.Forward(
        protocol=PROTOCOL_VALUES[fwd.protocol],
        local=fwd.local,
        remote=str(fwd.remote),
        active=max(0, c["active"]),
        total=c["total"],
        bytes_to_guest=c["bytes_to_guest"],
        bytes_from_guest=c["bytes_from_guest"],
        created=timestamp(fwd.created),
    )


def protocol_name(value: int, field: str = "protocol") -> str:
    if value == pb.PROTOCOL_UNSPECIFIED:
        return "tcp"  # as gvproxy: an empty protocol means TCP
    try:
        return PROTOCOL_NAMES[value]
    except KeyError:
        raise ForwardError("invalid_argument", f"{field}: unknown value {value}") from None


class CaptureFilter:
    """The simple BPF-like filter: protocol, host, port. Unset fields match everything."""

    def __init__(self, f: pb.CaptureFilter) -> None:
        self.proto = f.protocol
        self.host = ipaddress.IPv4Address(f.host).packed if f.host else None
        self.port = f.port

    def match(self, frame: bytes) -> bool:
        if len(frame) < 14:
            return self.proto == pb.CAPTURE_PROTOCOL_UNSPECIFIED and not self.host and not self.port
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype == 0x0806:
            if self.proto not in (pb.CAPTURE_PROTOCOL_UNSPECIFIED, pb.CAPTURE_PROTOCOL_ARP):
                return False
            if self.port:
                return False
            return self.host is None or self.host in (frame[28:32], frame[38:42])
        if ethertype != 0x0800 or len(frame) < 34:
            return self.proto == pb.CAPTURE_PROTOCOL_UNSPECIFIED and not self.host and not self.port
        proto = frame[23]
        want = {
            pb.CAPTURE_PROTOCOL_TCP: 6,
            pb.CAPTURE_PROTOCOL_UDP: 17,
            pb.CAPTURE_PROTOCOL_ICMP: 1,
        }
        if self.proto == pb.CAPTURE_PROTOCOL_ARP:
            return False
        if self.proto in want and proto != want[self.proto]:
            return False
        if self.host is not None and self.host not in (frame[26:30], frame[30:34]):
            return False
        if self.port:
            if proto not in (6, 17):
                return False
            ihl = (frame[14] & 0x0F) * 4
            off = 14 + ihl
            if len(frame) < off + 4:
                return False
            sport, dport = struct.unpack_from("!HH", frame, off)
            if self.port not in (sport, dport):
                return False
        return True


CLIENT_DONE = object()  # queued by the request reader when the client half-closed


class TunnelSession:
    """The guest side of a Tunnel RPC: a TCP connection opened from the gateway."""

    def __init__(self, conn: tcp.TcpConnection, touch) -> None:  # type: ignore[no-untyped-def]
        self.conn = conn
        self.touch = touch
        self.events: asyncio.Queue[object] = asyncio.Queue()
        self.space = asyncio.Event()
        self.detached = False

    def on_event(self, event: tcp.TcpEvent) -> None:
        if self.detached:
            return  # the RPC is over; the connection finishes its close (TIME_WAIT) alone
        if isinstance(event, tcp.SendSpaceAvailable):
            self.space.set()
        self.events.put_nowait(event)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.conn.send(view)
            view = view[n:]
            self.touch(self.conn)
            if view:
                self.space.clear()
                await self.space.wait()


class HostSwitchService(pb_grpc.HostSwitchServicer):
    def __init__(self, switch: HostSwitch) -> None:
        self.switch = switch

    async def _fail(self, context: grpc.aio.ServicerContext, e: ForwardError) -> None:
        await context.abort(STATUS[e.kind], str(e))

    # ---- forwards ---------------------------------------------------------------------

    async def Expose(self, request, context):
        try:
            proto = protocol_name(request.protocol)
            if not request.local:
                raise ForwardError("invalid_argument", "local: is empty")
            if not request.remote:
                raise ForwardError("invalid_argument", "remote: is empty")
            fwd = await self.switch.forwards.expose(proto, request.local, request.remote)
        except ForwardError as e:
            await self._fail(context, e)
        return pb.ExposeResponse(forward=forward_pb(fwd))

    async def Unexpose(self, request, context):
        try:
            proto = protocol_name(request.protocol)
            if not request.local:
                raise ForwardError("invalid_argument", "local: is empty")
            fwd = await self.switch.forwards.unexpose(proto, request.local)
        except ForwardError as e:
            await self._fail(context, e)
        return pb.UnexposeResponse(forward=forward_pb(fwd))

    async def ListForwards(self, request, context):
        return pb.ListForwardsResponse(
            forwards=[forward_pb(f) for f in self.switch.forwards.list()]
        )

    # ---- stats ------------------------------------------------------------------------

    def stats(self) -> pb.Stats:
        sw = self.switch
        raw = sw.stats()
        net: dict[str, int] = raw["network"]  # type: ignore[assignment]
        s = pb.Stats(time=timestamp(time.time()))
        links = list(sw.links.values())
        s.frames_in = sum(link.counters.frames_in for link in links) + sw.closed_link_totals[0]
        s.frames_out = sum(link.counters.frames_out for link in links) + sw.closed_link_totals[1]
        s.bytes_in = sum(link.counters.bytes_in for link in links) + sw.closed_link_totals[2]
        s.bytes_out = sum(link.counters.bytes_out for link in links) + sw.closed_link_totals[3]
        for name in ("tcp", "udp", "icmp", "arp"):
            ps = getattr(s, name)
            ps.packets_from_guests = net.get(f"{name}_packets_in", 0)
            ps.bytes_from_guests = net.get(f"{name}_bytes_in", 0)
            if name == "arp":
                ps.packets_to_guests = net.get("arp_replies_out", 0) + net.get(
                    "arp_requests_out", 0
                )
                ps.bytes_to_guests = 28 * ps.packets_to_guests
            else:
                ps.packets_to_guests = net.get(f"{name}_packets_out", 0)
                ps.bytes_to_guests = net.get(f"{name}_bytes_out", 0)
        drops: dict[str, int] = {}
        for key, value in net.items():
            if (
                key.startswith(MALFORMED_PREFIXES)
                or key.endswith("_dropped")
                or key.endswith("_refused")
            ):
                drops[key] = value
        for key, value in raw["reassembly"].items():  # type: ignore[union-attr]
            if key.endswith("_dropped"):
                drops["reassembly_" + key] = value
        s.drops.update(drops)
        s.malformed = sum(v for k, v in drops.items() if k.startswith(MALFORMED_PREFIXES))
        s.dropped = sum(drops.values()) - s.malformed
        s.tcp_connections = len(sw.network.tcp_conns)
        s.tcp_pending_dials = len(sw.network.tcp_pending)
        s.udp_flows = sw.udp_nat.active + len(sw.network.udp_sessions)
        s.icmp_flows = len(sw.icmp_nat.flows)
        s.forwards = len(sw.forwards.table)
        for link in links:
            c = link.counters
            s.links.add(
                name=link.name, port=link.port, frames_in=c.frames_in, frames_out=c.frames_out,
                bytes_in=c.bytes_in, bytes_out=c.bytes_out, dropped_out=c.dropped_out,
                errors=c.errors,
            )  # fmt: skip
        for group, values in raw.items():
            if isinstance(values, dict) and group != "links":
                for key, value in values.items():
                    if isinstance(value, int) and value >= 0:
                        s.counters[f"{group}.{key}"] = value
        return s

    async def GetStats(self, request, context):
        return pb.GetStatsResponse(stats=self.stats())

    async def WatchStats(self, request, context):
        interval = (
            request.interval.ToTimedelta().total_seconds() if request.HasField("interval") else 1.0
        )
        if interval < 0.05:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"interval: {interval}s is below the 50 ms minimum",
            )
        while True:
            yield pb.WatchStatsResponse(stats=self.stats())
            await asyncio.sleep(interval)

    # ---- leases and DNS -----------------------------------------------------------------

    async def ListLeases(self, request, context):
        now_mono = self.switch.loop.time()
        offset = time.time() - now_mono
        leases = [
            pb.Lease(
                mac=lease.mac,
                ip=str(lease.ip),
                hostname=lease.hostname or "",
                static=lease.static,
                expires=timestamp(lease.expires + offset),
            )
            for lease in self.switch.network.dhcp.leases(now_mono)
        ]
        return pb.ListLeasesResponse(leases=leases)

    def _zone_pb(self, name: str) -> pb.DnsZone:
        for zname, records in self.switch.network.zones.zones():
            if zname == name:
                return pb.DnsZone(name=zname, records=[self._record_pb(r) for r in records])
        return pb.DnsZone(name=name)

    @staticmethod
    def _record_pb(r: DnsRecord) -> pb.DnsRecord:
        return pb.DnsRecord(name=r.name, type=RECORD_VALUES[r.rtype], value=r.value, ttl=r.ttl)

    async def AddDnsRecords(self, request, context):
        zone = request.zone.strip()
        if not zone:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "zone: is empty")
        if not request.records:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "records: is empty")
        zones = self.switch.network.zones
        zname = normalize_name(zone)
        if why := _name_error(zname):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"zone: {zone!r} {why}")
        try:
            records = []
            for i, r in enumerate(request.records):
                if r.type not in RECORD_TYPES:
                    raise ValueError(f"records[{i}].type: must be A, AAAA or CNAME")
                name = r.name.strip()
                if not name:
                    raise ValueError(f"records[{i}].name: is empty")
                fqdn = normalize_name(name)
                if not (fqdn == zname or fqdn.endswith("." + zname)):
                    fqdn = normalize_name(name.rstrip(".") + "." + zname)  # relative name
                try:
                    record = DnsRecord(fqdn, RECORD_TYPES[r.type], r.value, r.ttl)  # type: ignore[arg-type]
                    record.validate()
                except ValueError as e:
                    raise ValueError(f"records[{i}]: {e}") from None
                records.append(record)
            if zname not in [z for z, _ in zones.zones()]:
                zones.add_zone(zname)
                try:
                    zones.add_records(zname, records)
                except ValueError:
                    zones.remove_zone(zname)
                    raise
            else:
                zones.add_records(zname, records)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.AddDnsRecordsResponse(zone=self._zone_pb(zname))

    async def RemoveDnsRecords(self, request, context):
        zones = self.switch.network.zones
        if not request.zone.strip():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "zone: is empty")
        zname = normalize_name(request.zone)
        if why := _name_error(zname):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"zone: {request.zone!r} {why}")
        if not request.names:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "names: is empty")
        if zname not in [z for z, _ in zones.zones()]:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"zone {zname} does not exist")
        names = []
        for i, n in enumerate(request.names):
            if not n.strip():
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"names[{i}]: is empty")
            fq = normalize_name(n)
            if not (fq == zname or fq.endswith("." + zname)):
                fq = normalize_name(n.strip().rstrip(".") + "." + zname)  # relative name
            if why := _name_error(fq):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"names[{i}]: {n!r} {why}")
            names.append(fq)
        removed = zones.remove_records(zname, names)
        if not removed:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"none of {', '.join(names)} has records in {zname}"
            )
        return pb.RemoveDnsRecordsResponse(removed=removed)

    async def ListDnsZones(self, request, context):
        return pb.ListDnsZonesResponse(
            zones=[
                pb.DnsZone(name=z, records=[self._record_pb(r) for r in records])
                for z, records in self.switch.network.zones.zones()
            ]
        )

    # ---- capture ----------------------------------------------------------------------

    async def Capture(self, request, context):
        try:
            flt = CaptureFilter(request.filter)
        except ValueError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"filter.host: {request.filter.host!r} is not an IPv4 address",
            )
        if request.filter.port > 65535:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "filter.port: above 65535")
        snaplen = request.snaplen or SNAPLEN
        if snaplen > SNAPLEN or snaplen < 64:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"snaplen: must be 64..{SNAPLEN}")
        queue: asyncio.Queue[bytes] = asyncio.Queue(CAPTURE_QUEUE)
        dropped = 0

        def listener(frames: list[bytes]) -> None:
            nonlocal dropped
            ts = time.time()
            for frame in frames:
                if flt.match(frame):
                    if queue.full():
                        dropped += 1
                    else:
                        queue.put_nowait(pcap_record(frame, ts, snaplen))

        deadline = None
        if request.HasField("duration"):
            deadline = time.monotonic() + request.duration.ToTimedelta().total_seconds()
        self.switch.add_capture(listener)
        try:
            yield pb.CaptureResponse(data=pcap_header(snaplen))
            count = 0
            while not request.max_frames or count < request.max_frames:
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    break
                try:
                    first = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    break
                chunk = [first]
                count += 1
                while not queue.empty() and (not request.max_frames or count < request.max_frames):
                    chunk.append(queue.get_nowait())
                    count += 1
                yield pb.CaptureResponse(data=b"".join(chunk), dropped=dropped)
        finally:
            self.switch.remove_capture(listener)

    # ---- tunnel -----------------------------------------------------------------------

    async def Tunnel(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "open":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "open: the first message must open the tunnel"
            )
        try:
            dest = parse_remote(first.open.address, "open.address")
        except AddressError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        sw = self.switch
        network = sw.network
        if ipaddress.IPv4Address(dest.host) not in network.subnet:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"open.address: {dest.host} is not inside the virtual network {network.subnet}",
            )
        guest_ip = ipaddress.IPv4Address(dest.host).packed
        for _ in range(64):
            src_port = random.randint(32768, 60999)
            conn = network.tcp_connect(
                guest_ip, dest.port, network.gateway_ip, src_port, sw.loop.time()
            )
            if conn is not None:
                break
        else:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free source port")
        session = TunnelSession(conn, sw.tcp_nat.touch)
        conn.app = session  # type: ignore[attr-defined]
        sw.tcp_nat.touch(conn)
        client_done = False  # the client half-closed (TunnelClose, or its stream ended)
        peer_done = False  # the guest half-closed and we told the client

        async def pump_requests() -> None:
            async for req in request_iterator:
                kind = req.WhichOneof("message")
                if kind == "data":
                    try:
                        await session.send(req.data)
                    except tcp.TcpStateError:
                        return  # the guest side is gone; the main loop reports how
                elif kind == "close":
                    break
            # A TunnelClose, or the request stream simply ended: FIN to the guest either way.
            if conn.state is not tcp.TcpState.CLOSED:
                conn.close()
                sw.tcp_nat.touch(conn)
            session.events.put_nowait(CLIENT_DONE)

        reader: asyncio.Task[None] | None = None
        try:
            while not (client_done and peer_done):
                event = await session.events.get()
                if event is CLIENT_DONE:
                    client_done = True
                elif isinstance(event, tcp.Connected):
                    reader = asyncio.ensure_future(pump_requests())
                    yield pb.TunnelResponse(
                        connected=pb.TunnelConnected(
                            local_address=f"{ipaddress.IPv4Address(network.gateway_ip)}:{src_port}"
                        )
                    )
                elif isinstance(event, tcp.DataReceived):
                    data = conn.read()
                    sw.tcp_nat.touch(conn)
                    if data:
                        yield pb.TunnelResponse(data=data)
                elif isinstance(event, tcp.PeerClosed):
                    data = conn.read()
                    if data:
                        yield pb.TunnelResponse(data=data)
                    yield pb.TunnelResponse(close=pb.TunnelClose())
                    peer_done = True
                elif isinstance(event, tcp.ConnectionFailed):
                    what = (
                        "refused the connection" if event.reason == "refused" else "did not answer"
                    )
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"open.address: {dest} {what}")
                elif isinstance(event, tcp.ConnectionReset):
                    await context.abort(grpc.StatusCode.ABORTED, f"{dest} reset the connection")
                elif isinstance(event, tcp.Closed):
                    return
        finally:
            if reader is not None:
                reader.cancel()
            session.detached = True
            if not (client_done and peer_done) and conn.state is not tcp.TcpState.CLOSED:
                conn.abort()  # the call ended early (cancelled, error): reset the guest side
                sw.tcp_nat.touch(conn)

    # ---- events -----------------------------------------------------------------------

    async def WatchEvents(self, request, context):
        queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue(1024)

        def listener(kind: str, fields: dict) -> None:
            if not queue.full():
                queue.put_nowait((kind, fields))

        self.switch.event_listeners.append(listener)
        try:
            while True:
                kind, f = await queue.get()
                ev = pb.Event(time=timestamp(f.get("time", time.time())))
                if kind == "link_up":
                    ev.link_up.CopyFrom(pb.LinkUp(link=f["link"], port=f["port"]))
                elif kind == "link_down":
                    ev.link_down.CopyFrom(
                        pb.LinkDown(link=f["link"], port=f["port"], reason=f["reason"])
                    )
                elif kind == "lease_granted":
                    ev.lease_granted.CopyFrom(
                        pb.LeaseGranted(mac=f["mac"], ip=f["ip"], hostname=f["hostname"])
                    )
                elif kind == "forward_added":
                    ev.forward_added.CopyFrom(pb.ForwardAdded(forward=forward_pb(f["forward"])))
                elif kind == "forward_removed":
                    ev.forward_removed.CopyFrom(pb.ForwardRemoved(forward=forward_pb(f["forward"])))
                elif kind == "connection_error":
                    ev.connection_error.CopyFrom(
                        pb.ConnectionError(protocol=f["protocol"], source=f["source"],
                                           destination=f["destination"], reason=f["reason"])
                    )  # fmt: skip
                else:
                    continue
                yield pb.WatchEventsResponse(event=ev)
        finally:
            self.switch.event_listeners.remove(listener)


def default_api_path() -> str:
    if os.geteuid() == 0:
        return "/run/netferry/hostd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/netferry-{os.getuid()}"
    return os.path.join(runtime, "netferry", "hostd.sock")


class ApiServer:
    """grpc.aio server for HostSwitch + reflection + health on a unix socket (0600) or TCP."""

    def __init__(self, switch: HostSwitch, uri: str) -> None:
        self.switch = switch
        self.uri = uri
        self.server: grpc.aio.Server | None = None
        self.path: str | None = None
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_HostSwitchServicer_to_server(HostSwitchService(self.switch), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        uri = self.uri
        if uri.startswith("unix://"):
            path = uri[len("unix://") :]
            clear_stale_socket(path, make_parent=True)
            old = os.umask(0o177)  # the socket is created 0600: only our user may drive us
            try:
                server.add_insecure_port(f"unix:{path}")
            finally:
                os.umask(old)
            self.path = path
        elif uri.startswith("tcp://"):
            address = uri[len("tcp://") :]
            if server.add_insecure_port(address) == 0:
                raise OSError(f"cannot listen on {address}")
        else:
            raise ValueError(f"--api {uri!r}: expected unix:///path or tcp://HOST:PORT")
        await server.start()
        if self.path is not None:
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        log.info("api.listening", uri=uri)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.path and self._inode:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)


__all__ = ["ApiServer", "Duration", "HostSwitchService", "default_api_path"]
