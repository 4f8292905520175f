"""The HostSwitch gRPC service, served by grpc.aio on hostd's own event loop.

Running in the switch's loop means every handler reads and changes the switch directly, with
no locks and no threads: a forward added here is listening before the reply is sent. The
server also serves reflection (grpcurl needs nothing but the address) and grpc.health.v1.

Every bad request gets a precise status: INVALID_ARGUMENT naming the field, ALREADY_EXISTS
naming the holder, NOT_FOUND naming what was looked up. The table is in the README.

Only hostd's owner gets in (hostd/api/auth.py): on a unix socket the gRPC server listens in
a private directory behind a gate that checks each peer's uid; on TCP every call must carry
the token.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
import time

import grpc
import structlog
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from netferry import reflection
from netferry.hostd.api.auth import (
    RefusingInterceptor,
    TokenInterceptor,
    UnixPeerGate,
    owner_only_message,
)
from netferry.hostd.capture import SNAPLEN, CaptureBuffer, CaptureFilter, pcap_header, pcap_record
from netferry.hostd.control import LIST_CHUNK, Control, DnsRecordSpec, StatsSnapshot
from netferry.hostd.errors import ControlError, shorten
from netferry.hostd.forwards import Forward
from netferry.hostd.nat.tcp import endpoint_text
from netferry.hostd.policy import Rule
from netferry.hostd.services.dns import DnsRecord
from netferry.hostd.stack import tcp
from netferry.unixsock import clear_stale_socket
from netferry.v1 import host_pb2 as pb
from netferry.v1 import host_pb2_grpc as pb_grpc

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
MAX_CAPTURES = 8  # live captures at once; each may hold CaptureBuffer's 4 MiB
# A tunnel's reads can hold more than a client takes in one message (gRPC's default 4 MiB).
TUNNEL_CHUNK = 1 << 20


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
        raise ControlError("invalid_argument", f"{field}: unknown value {value}") from None


CAPTURE_PROTOCOLS = {
    pb.CAPTURE_PROTOCOL_TCP: "tcp",
    pb.CAPTURE_PROTOCOL_UDP: "udp",
    pb.CAPTURE_PROTOCOL_ICMP: "icmp",
    pb.CAPTURE_PROTOCOL_ARP: "arp",
}


def stats_pb(snap: StatsSnapshot) -> pb.Stats:
    s = pb.Stats(time=timestamp(snap.time))
    s.frames_in, s.frames_out = snap.frames_in, snap.frames_out
    s.bytes_in, s.bytes_out = snap.bytes_in, snap.bytes_out
    for name, pc in snap.protocols.items():
        ps = getattr(s, name)
        ps.packets_from_guests, ps.bytes_from_guests = pc.packets_from_guests, pc.bytes_from_guests
        ps.packets_to_guests, ps.bytes_to_guests = pc.packets_to_guests, pc.bytes_to_guests
    s.drops.update(snap.drops)
    s.malformed, s.dropped = snap.malformed, snap.dropped
    s.tcp_connections, s.tcp_pending_dials = snap.tcp_connections, snap.tcp_pending_dials
    s.udp_flows, s.icmp_flows, s.forwards = snap.udp_flows, snap.icmp_flows, snap.forwards
    for link in snap.links:
        s.links.add(
            name=link.name, port=link.port, frames_in=link.frames_in, frames_out=link.frames_out,
            bytes_in=link.bytes_in, bytes_out=link.bytes_out, dropped_out=link.dropped_out,
            errors=link.errors,
        )  # fmt: skip
    s.counters.update(snap.counters)
    return s


CLIENT_DONE = object()  # queued by the request reader when the client half-closed


class HostSwitchService(pb_grpc.HostSwitchServicer):
    def __init__(self, control: Control) -> None:
        self.control = control
        self.switch = control.switch
        self.captures = 0  # live Capture calls

    async def _fail(self, context: grpc.aio.ServicerContext, e: ControlError) -> None:
        await context.abort(STATUS[e.kind], str(e))

    # ---- forwards ---------------------------------------------------------------------

    async def Expose(self, request, context):
        try:
            proto = protocol_name(request.protocol)
            fwd = await self.control.expose(proto, request.local, request.remote)
        except ControlError as e:
            await self._fail(context, e)
        return pb.ExposeResponse(forward=forward_pb(fwd))

    async def Unexpose(self, request, context):
        try:
            proto = protocol_name(request.protocol)
            fwd = await self.control.unexpose(proto, request.local)
        except ControlError as e:
            await self._fail(context, e)
        return pb.UnexposeResponse(forward=forward_pb(fwd))

    async def ListForwards(self, request, context):
        return pb.ListForwardsResponse(
            forwards=[forward_pb(f) for f in self.control.list_forwards()]
        )

    # ---- stats ------------------------------------------------------------------------

    def stats(self) -> pb.Stats:
        return stats_pb(self.control.stats())

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
        # In slices with a turn of the loop between: a long list never stalls the data plane.
        leases = await self.control.leases_async()
        out = pb.ListLeasesResponse()
        for start in range(0, len(leases), LIST_CHUNK):
            out.leases.extend(
                pb.Lease(
                    mac=lease.mac,
                    ip=str(lease.ip),
                    hostname=lease.hostname or "",
                    static=lease.static,
                    expires=timestamp(lease.expires),
                )
                for lease in leases[start : start + LIST_CHUNK]
            )
            await asyncio.sleep(0)
        return out

    def _zone_pb(self, name: str) -> pb.DnsZone:
        for zname, records in self.control.dns_zones():
            if zname == name:
                return pb.DnsZone(name=zname, records=[self._record_pb(r) for r in records])
        return pb.DnsZone(name=name)

    @staticmethod
    def _record_pb(r: DnsRecord) -> pb.DnsRecord:
        return pb.DnsRecord(name=r.name, type=RECORD_VALUES[r.rtype], value=r.value, ttl=r.ttl)

    async def AddDnsRecords(self, request, context):
        specs = [
            DnsRecordSpec(r.name, RECORD_TYPES.get(r.type, ""), r.value, r.ttl)
            for r in request.records
        ]
        try:
            zname = self.control.add_dns_records(request.zone, specs)
        except ControlError as e:
            await self._fail(context, e)
        return pb.AddDnsRecordsResponse(zone=self._zone_pb(zname))

    async def RemoveDnsRecords(self, request, context):
        try:
            removed = self.control.remove_dns_records(request.zone, list(request.names))
        except ControlError as e:
            await self._fail(context, e)
        return pb.RemoveDnsRecordsResponse(removed=removed)

    async def ListDnsZones(self, request, context):
        return pb.ListDnsZonesResponse(
            zones=[
                pb.DnsZone(name=z, records=[self._record_pb(r) for r in records])
                for z, records in self.control.dns_zones()
            ]
        )

    # ---- capture ----------------------------------------------------------------------

    async def Capture(self, request, context):
        try:
            flt = CaptureFilter(
                CAPTURE_PROTOCOLS.get(request.filter.protocol),
                request.filter.host,
                request.filter.port,
            )
        except ValueError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                shorten(f"filter.host: {request.filter.host!r} is not an IP address"),
            )
        if request.filter.port > 65535:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "filter.port: above 65535")
        snaplen = request.snaplen or SNAPLEN
        if snaplen > SNAPLEN or snaplen < 64:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"snaplen: must be 64..{SNAPLEN}")
        if self.captures >= MAX_CAPTURES:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {MAX_CAPTURES} captures at once; end one first",
            )
        buffer = CaptureBuffer()
        ready = asyncio.Event()

        def listener(frames: list[bytes]) -> None:
            ts = time.time()
            for frame in frames:
                if flt.match(frame):
                    buffer.put(pcap_record(frame, ts, snaplen))
            if buffer.records:
                ready.set()

        deadline = None
        if request.HasField("duration"):
            deadline = time.monotonic() + request.duration.ToTimedelta().total_seconds()
        self.captures += 1
        self.switch.add_capture(listener)
        try:
            yield pb.CaptureResponse(data=pcap_header(snaplen))
            count = 0
            while not request.max_frames or count < request.max_frames:
                timeout = None if deadline is None else deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    break
                if not buffer.records:
                    ready.clear()
                    try:
                        await asyncio.wait_for(ready.wait(), timeout)
                    except TimeoutError:
                        break
                left = request.max_frames - count if request.max_frames else 0
                data, n = buffer.take(left)
                count += n
                yield pb.CaptureResponse(data=data, dropped=buffer.dropped)
        finally:
            self.switch.remove_capture(listener)
            self.captures -= 1

    # ---- tunnel -----------------------------------------------------------------------

    async def Tunnel(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "open":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "open: the first message must open the tunnel"
            )
        sw = self.switch
        try:
            dest = self.control.tunnel_destination(first.open.address)
            session = self.control.open_tunnel(dest)
        except ControlError as e:
            await self._fail(context, e)
        conn = session.conn
        src_ip, src_port = conn.key[2], conn.key[3]
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
                            local_address=endpoint_text(src_ip, src_port)  # v4 or [v6]
                        )
                    )
                elif isinstance(event, tcp.DataReceived):
                    data = conn.read()
                    sw.tcp_nat.touch(conn)
                    for i in range(0, len(data), TUNNEL_CHUNK):
                        yield pb.TunnelResponse(data=data[i : i + TUNNEL_CHUNK])
                elif isinstance(event, tcp.PeerClosed):
                    data = conn.read()
                    for i in range(0, len(data), TUNNEL_CHUNK):
                        yield pb.TunnelResponse(data=data[i : i + TUNNEL_CHUNK])
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
                elif kind == "guest_connected":
                    ev.guest_connected.CopyFrom(
                        pb.GuestConnected(guest=f["guest"], link=str(f.get("link") or ""))
                    )
                elif kind == "flow_denied":
                    ev.flow_denied.CopyFrom(
                        pb.FlowDenied(
                            flow=pb.FlowVerdict(
                                time=ev.time, protocol=f["protocol"], source=f["source"],
                                destination=f["destination"], allowed=False, rule=f["rule"],
                            )
                        )
                    )  # fmt: skip
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

    # ---- outbound policy --------------------------------------------------------------

    async def ListPolicyRules(self, request, context):
        return pb.ListPolicyRulesResponse(
            rules=[policy_rule_pb(r) for r in self.control.policy_rules()]
        )

    async def AddPolicyRule(self, request, context):
        action = POLICY_ACTIONS.get(request.action)
        if action is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "action: must be ALLOW or DENY")
        index = request.index if request.HasField("index") else None
        try:
            at, rule = self.control.add_policy_rule(action, request.rule, index)
        except ControlError as e:
            await self._fail(context, e)
        return pb.AddPolicyRuleResponse(index=at, rule=policy_rule_pb(rule))

    async def RemovePolicyRule(self, request, context):
        try:
            rule = self.control.remove_policy_rule(request.index)
        except ControlError as e:
            await self._fail(context, e)
        return pb.RemovePolicyRuleResponse(rule=policy_rule_pb(rule))

    async def ListConnections(self, request, context):
        counters = self.control.policy_counters()
        return pb.ListConnectionsResponse(
            flows=[
                pb.FlowVerdict(
                    time=timestamp(v.time), protocol=v.protocol, source=v.source,
                    destination=v.destination, allowed=v.allowed, rule=v.rule,
                )
                for v in self.control.recent_flows()
            ],
            allowed=counters.get("allowed", 0),
            denied=counters.get("denied", 0),
        )  # fmt: skip


POLICY_ACTIONS = {pb.POLICY_ACTION_ALLOW: "allow", pb.POLICY_ACTION_DENY: "deny"}
POLICY_ACTION_VALUES = {v: k for k, v in POLICY_ACTIONS.items()}


def policy_rule_pb(rule: Rule) -> pb.PolicyRule:
    return pb.PolicyRule(
        action=POLICY_ACTION_VALUES[rule.action], rule=rule.target, static=rule.static
    )


def private_directory(public: str) -> str:
    """A 0700 directory for the gRPC servers behind the gate: beside the public socket, so a
    hostd killed with SIGKILL leaves nothing elsewhere and the next start on the same path
    clears it (the public path was just found stale, so no live hostd uses it); in /tmp
    when that path would be too long for a socket address."""
    d = os.path.join(os.path.dirname(public) or ".", f".{os.path.basename(public)}.private")
    if len(os.path.join(d, "refused.sock").encode()) >= 108:
        return tempfile.mkdtemp(prefix="netferry-api-")
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise FileExistsError(f"{d} exists and is not our private directory; remove it")
        shutil.rmtree(d)
    os.mkdir(d, 0o700)
    return d


def default_api_path() -> str:
    if os.geteuid() == 0:
        return "/run/netferry/hostd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/netferry-{os.getuid()}"
    return os.path.join(runtime, "netferry", "hostd.sock")


class ApiServer:
    """grpc.aio server for HostSwitch + reflection + health on a unix socket (0600, peer uid
    checked by `UnixPeerGate`) or TCP (a token required, see hostd/api/auth.py)."""

    def __init__(
        self, control: Control, uri: str, token: str | None = None, insecure_tcp: bool = False
    ) -> None:
        self.control = control
        self.uri = uri
        self.token = token
        self.insecure_tcp = insecure_tcp  # --insecure-tcp-api: TCP without a token
        self.server: grpc.aio.Server | None = None
        self.refuser: grpc.aio.Server | None = None
        self.gate: UnixPeerGate | None = None
        self.private_dir: str | None = None
        self.path: str | None = None

    async def start(self) -> None:
        uri = self.uri
        if uri.startswith("tcp://"):
            if not self.token and not self.insecure_tcp:
                raise OSError(f"--api {uri}: an API on TCP needs --api-token-file")
            interceptors = [TokenInterceptor(self.token)] if self.token else []
            server = grpc.aio.server(interceptors=interceptors)
        elif uri.startswith("unix://"):
            server = grpc.aio.server()
        else:
            raise ValueError(f"--api {uri!r}: expected unix:///path or tcp://HOST:PORT")
        pb_grpc.add_HostSwitchServicer_to_server(HostSwitchService(self.control), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        if uri.startswith("unix://"):
            path = uri[len("unix://") :]
            clear_stale_socket(path, make_parent=True)
            # gRPC itself listens in a private directory; the public path is the gate that
            # checks each peer's uid (grpc.aio shows handlers no credentials).
            self.private_dir = private_directory(path)
            inner = os.path.join(self.private_dir, "grpc.sock")
            refused = os.path.join(self.private_dir, "refused.sock")
            server.add_insecure_port(f"unix:{inner}")
            self.refuser = grpc.aio.server(interceptors=[RefusingInterceptor(owner_only_message())])
            self.refuser.add_insecure_port(f"unix:{refused}")
            self.gate = UnixPeerGate(path, inner, refused)
            self.path = path
        else:
            address = uri[len("tcp://") :]
            if server.add_insecure_port(address) == 0:
                raise OSError(f"cannot listen on {address}")
        await server.start()
        if self.refuser is not None:
            await self.refuser.start()
        if self.gate is not None:
            await self.gate.start()
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        log.info("api.listening", uri=uri)

    async def stop(self) -> None:
        if self.gate is not None:
            await self.gate.stop()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.refuser is not None:
            await self.refuser.stop(grace=None)
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)


__all__ = ["ApiServer", "Duration", "HostSwitchService", "default_api_path"]
