"""The Python SDK for hostd's HostSwitch API: a thin, typed wrapper over the generated stubs.

    from netferry.client import HostSwitchClient
    with HostSwitchClient("unix:///run/netferry/hostd.sock") as api:
        api.expose("tcp", "127.0.0.1:8080", "192.168.127.2:80")
        print(api.stats().tcp.bytes_to_guests)

Every failed call raises `NetferryError` with the gRPC status name and hostd's message, which
names the field or the holder of an address.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from datetime import timedelta

import grpc

from netferry.v1 import host_pb2 as pb
from netferry.v1 import host_pb2_grpc as pb_grpc

PROTOCOLS = {"tcp": pb.PROTOCOL_TCP, "udp": pb.PROTOCOL_UDP, "unix": pb.PROTOCOL_UNIX}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
RECORD_TYPES = {
    "A": pb.DNS_RECORD_TYPE_A,
    "AAAA": pb.DNS_RECORD_TYPE_AAAA,
    "CNAME": pb.DNS_RECORD_TYPE_CNAME,
}
RECORD_TYPE_NAMES = {v: k for k, v in RECORD_TYPES.items()}
CAPTURE_PROTOCOLS = {
    "tcp": pb.CAPTURE_PROTOCOL_TCP,
    "udp": pb.CAPTURE_PROTOCOL_UDP,
    "icmp": pb.CAPTURE_PROTOCOL_ICMP,
    "arp": pb.CAPTURE_PROTOCOL_ARP,
}


class NetferryError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def default_target() -> str:
    """$NETFERRY_API, else the path hostd uses by default for this user."""
    env = os.environ.get("NETFERRY_API")
    if env:
        return env
    if os.geteuid() == 0:
        return "unix:///run/netferry/hostd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/netferry-{os.getuid()}"
    return f"unix://{runtime}/netferry/hostd.sock"


def grpc_target(target: str) -> str:
    """Accepts unix:///path, a bare /path, tcp://host:port or host:port."""
    if target.startswith("/"):
        return f"unix:{target}"
    if target.startswith("unix://"):
        return "unix:" + target[len("unix://") :]
    if target.startswith("tcp://"):
        return target[len("tcp://") :]
    return target


def read_token(token_file: str | None = None) -> str | None:
    """The API token: from `token_file` (its first line), else $NETFERRY_API_TOKEN."""
    if token_file:
        with open(token_file) as f:
            return f.readline().strip() or None
    return os.environ.get("NETFERRY_API_TOKEN") or None


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call (hostd's API on TCP needs it)."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details):  # type: ignore[no-untyped-def]
        metadata = [*(details.metadata or ()), self.header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


def _call(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as e:
        raise NetferryError(e.code(), e.details() or "") from None


class HostSwitchClient:
    def __init__(
        self, target: str | None = None, timeout: float = 10.0, token: str | None = None
    ) -> None:
        """`token`: for an API on TCP (default: $NETFERRY_API_TOKEN)."""
        self.target = target or default_target()
        self.timeout = timeout
        self.channel = grpc.insecure_channel(grpc_target(self.target))
        token = token or read_token()
        channel = self.channel
        if token:
            channel = grpc.intercept_channel(self.channel, _BearerToken(token))
        self.stub = pb_grpc.HostSwitchStub(channel)

    def __enter__(self) -> HostSwitchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # forwards
    def expose(self, protocol: str, local: str, remote: str) -> pb.Forward:
        req = pb.ExposeRequest(protocol=PROTOCOLS[protocol], local=local, remote=remote)
        return _call(self.stub.Expose, req, timeout=self.timeout).forward

    def unexpose(self, protocol: str, local: str) -> pb.Forward:
        req = pb.UnexposeRequest(protocol=PROTOCOLS[protocol], local=local)
        return _call(self.stub.Unexpose, req, timeout=self.timeout).forward

    def forwards(self) -> list[pb.Forward]:
        return list(
            _call(self.stub.ListForwards, pb.ListForwardsRequest(), timeout=self.timeout).forwards
        )

    # stats
    def stats(self) -> pb.Stats:
        return _call(self.stub.GetStats, pb.GetStatsRequest(), timeout=self.timeout).stats

    def watch_stats(self, interval: float = 1.0) -> Iterator[pb.Stats]:
        req = pb.WatchStatsRequest()
        req.interval.FromTimedelta(timedelta(seconds=interval))
        stream = self.stub.WatchStats(req)
        try:
            for resp in stream:
                yield resp.stats
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise NetferryError(e.code(), e.details() or "") from None
        finally:
            stream.cancel()

    # leases and DNS
    def leases(self) -> list[pb.Lease]:
        return list(
            _call(self.stub.ListLeases, pb.ListLeasesRequest(), timeout=self.timeout).leases
        )

    def dns_add(self, zone: str, records: Iterable[tuple[str, str, str, int]]) -> pb.DnsZone:
        req = pb.AddDnsRecordsRequest(zone=zone)
        for name, rtype, value, ttl in records:
            if rtype.upper() not in RECORD_TYPES:
                raise ValueError(f"record type {rtype!r}: expected A, AAAA or CNAME")
            req.records.add(name=name, type=RECORD_TYPES[rtype.upper()], value=value, ttl=ttl)
        return _call(self.stub.AddDnsRecords, req, timeout=self.timeout).zone

    def dns_remove(self, zone: str, names: Iterable[str]) -> int:
        req = pb.RemoveDnsRecordsRequest(zone=zone, names=list(names))
        return _call(self.stub.RemoveDnsRecords, req, timeout=self.timeout).removed

    def dns_zones(self) -> list[pb.DnsZone]:
        return list(
            _call(self.stub.ListDnsZones, pb.ListDnsZonesRequest(), timeout=self.timeout).zones
        )

    # outbound policy
    def policy_rules(self) -> list[pb.PolicyRule]:
        req = pb.ListPolicyRulesRequest()
        return list(_call(self.stub.ListPolicyRules, req, timeout=self.timeout).rules)

    def policy_add(self, action: str, rule: str, index: int | None = None) -> int:
        """Add a run-time rule ("allow"/"deny"); returns its index."""
        actions = {"allow": pb.POLICY_ACTION_ALLOW, "deny": pb.POLICY_ACTION_DENY}
        req = pb.AddPolicyRuleRequest(action=actions[action], rule=rule)
        if index is not None:
            req.index = index
        return _call(self.stub.AddPolicyRule, req, timeout=self.timeout).index

    def policy_remove(self, index: int) -> pb.PolicyRule:
        req = pb.RemovePolicyRuleRequest(index=index)
        return _call(self.stub.RemovePolicyRule, req, timeout=self.timeout).rule

    def connections(self) -> pb.ListConnectionsResponse:
        return _call(self.stub.ListConnections, pb.ListConnectionsRequest(), timeout=self.timeout)

    # capture, tunnel, events
    def capture(
        self,
        protocol: str | None = None,
        host: str = "",
        port: int = 0,
        max_frames: int = 0,
        duration: float | None = None,
        snaplen: int = 0,
    ) -> Iterator[bytes]:
        """pcap bytes: the global header first, then records, as they happen."""
        req = pb.CaptureRequest(max_frames=max_frames, snaplen=snaplen)
        req.filter.protocol = CAPTURE_PROTOCOLS[protocol] if protocol else 0
        req.filter.host = host
        req.filter.port = port
        if duration is not None:
            req.duration.FromTimedelta(timedelta(seconds=duration))
        stream = self.stub.Capture(req)
        try:
            for resp in stream:
                yield resp.data
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise NetferryError(e.code(), e.details() or "") from None
        finally:
            stream.cancel()

    def tunnel(
        self, address: str, data: Iterable[bytes], connect_timeout: float | None = None
    ) -> Iterator[bytes]:
        """Send `data` (then a half-close) to `address` in the virtual network; yields what
        comes back until the peer closes. With `connect_timeout`, a guest that has not
        answered the connect by then ends it with DEADLINE_EXCEEDED."""

        def requests() -> Iterator[pb.TunnelRequest]:
            yield pb.TunnelRequest(open=pb.TunnelOpen(address=address))
            for chunk in data:
                if chunk:
                    yield pb.TunnelRequest(data=chunk)
            yield pb.TunnelRequest(close=pb.TunnelClose())

        stream = self.stub.Tunnel(requests())
        connected = threading.Event()
        timed_out = threading.Event()

        def give_up() -> None:
            if not connected.is_set():
                timed_out.set()
                stream.cancel()

        timer = None
        if connect_timeout is not None:
            timer = threading.Timer(connect_timeout, give_up)
            timer.daemon = True
            timer.start()
        try:
            for resp in stream:
                kind = resp.WhichOneof("message")
                if kind == "connected":
                    connected.set()
                elif kind == "data":
                    yield resp.data
                elif kind == "close":
                    return
        except grpc.RpcError as e:
            if timed_out.is_set():
                raise NetferryError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{address} did not answer within {connect_timeout:g}s",
                ) from None
            raise NetferryError(e.code(), e.details() or "") from None
        finally:
            if timer is not None:
                timer.cancel()
            stream.cancel()

    def events(self) -> Iterator[pb.Event]:
        stream = self.stub.WatchEvents(pb.WatchEventsRequest())
        try:
            for resp in stream:
                yield resp.event
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise NetferryError(e.code(), e.details() or "") from None
        finally:
            stream.cancel()
