"""gvproxy's HTTP API, a translator over the control core (`hostd.control`).

Served where gvproxy serves it, with its paths, methods, status codes and bodies
(`shared/reference/peers-observed.md`), so that curl lines from gvisor-tap-vsock's README,
podman's machine code and Rancher Desktop's guest agent work unchanged:

- on host sockets (`host-switch --http-api unix:///path|tcp://HOST:PORT`): every endpoint,
  plus `POST /connect`, which turns the connection into a switch port with 2-byte
  little-endian frames (gvforwarder's link), and `/tunnel?ip=&port=`, which answers a raw
  `OK` and then carries a TCP stream to the guest, dialled from the gateway;
- inside the virtual network on the gateway's port 80: only
  `/services/forwarder/{all,expose,unexpose}`; everything else is 404 there. A guest may
  expose (and unexpose) only forwards to its own address, and only TCP and UDP, unless
  hostd runs with `--guest-expose any`.

Success is 200 with `text/plain; charset=utf-8` and a JSON body ending in a newline (or an
empty body); errors are the message and a newline with `X-Content-Type-Options: nosniff`,
as Go's `http.Error` writes them. Where gvproxy has a known bug (#681: a unix expose deletes
whatever file is at the path) netferry does the safe thing: the path is never replaced.

HTTP/1.1 is parsed by h11 (sans-IO, the same shape as the rest of hostd; no framework):
`HttpApiProtocol` drives it on host sockets, `GatewayHttpSession` on guest TCP connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import ipaddress
import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import structlog

from netferry.framing import MAX_FRAME
from netferry.hostd.api.auth import bearer_ok, owner_may_connect, peer_uid, refusal
from netferry.hostd.control import Control, DnsRecordSpec, StatsSnapshot
from netferry.hostd.errors import ControlError
from netferry.hostd.forwards import Forward
from netferry.hostd.links.stream import StreamLink, bind_unix_socket, remove_socket_file
from netferry.hostd.stack import tcp

log = structlog.get_logger("hostd.api.http")

HTTP_PORT = 80
MAX_BODY = 1 << 20  # requests are small JSON documents
CONNECT_FRAMING = "len16le"  # gvforwarder's frames after POST /connect
# gvproxy's status for each kind of control error (it answers most failures with 500).
ERROR_STATUS = {
    "invalid_argument": 400,
    "already_exists": 500,
    "not_found": 500,
    "permission_denied": 500,
    "unavailable": 500,
}
FORWARDER_PATHS = (
    "/services/forwarder/all",
    "/services/forwarder/expose",
    "/services/forwarder/unexpose",
)


@dataclass
class Response:
    status: int
    body: bytes = b""
    error: bool = False  # an http.Error: nosniff header

    @classmethod
    def json(cls, value: object) -> Response:
        # Go's json.Encoder: no spaces, a newline at the end, map keys sorted.
        return cls(200, json.dumps(value, separators=(",", ":")).encode() + b"\n")

    @classmethod
    def fail(cls, status: int, message: str) -> Response:
        return cls(status, message.encode() + b"\n", error=True)


NOT_FOUND = Response.fail(404, "404 page not found")


@dataclass
class Hijack:
    """The request takes the connection over: `connect` (a link) or `tunnel` (to dest)."""

    kind: str
    dest: object = None


class BadRequest(Exception):
    pass


def _decode_object(body: bytes, what: str) -> dict[str, Any]:
    """A JSON object from the body, with Go's decoder's leniency on key case."""
    try:
        value = json.loads(body.decode("utf-8") if body else "")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"invalid JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"json: cannot unmarshal {type(value).__name__} into {what}")
    return {str(k).lower(): v for k, v in value.items()}


def _string(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key.lower(), "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"json: cannot unmarshal {type(value).__name__} into {what}.{key}")
    return value


def _split_host_port(text: str) -> tuple[str, str]:
    """Go's net.SplitHostPort, with its messages."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadRequest(f"address {text}: missing ']' in address")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise BadRequest(f"address {text}: missing port in address")
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep:
        raise BadRequest(f"address {text}: missing port in address")
    if ":" in host:
        raise BadRequest(f"address {text}: too many colons in address")
    return host, port


class GvproxyApi:
    """The endpoints, as a function of (method, target, body, caller) → Response | Hijack."""

    def __init__(self, control: Control, *, inside: bool, allow_any: bool = False) -> None:
        self.control = control
        self.inside = inside  # served on the gateway's port 80 to guests
        self.allow_any = allow_any  # --guest-expose any

    async def handle(
        self, method: str, target: str, body: bytes, caller: str | None, connect: bool = True
    ) -> Response | Hijack:
        url = urlsplit(target)
        path = url.path
        if self.inside and path not in FORWARDER_PATHS:
            return NOT_FOUND
        try:
            if path == "/services/forwarder/all":
                return Response.json(self._forwards(caller))
            if path == "/services/forwarder/expose":
                return await self._post(method, self._expose, body, caller)
            if path == "/services/forwarder/unexpose":
                return await self._post(method, self._unexpose, body, caller)
            if path in ("/services/dhcp/leases", "/leases"):
                return Response.json(await self._leases())
            if path == "/services/dns/all":
                return Response.json(self._zones())
            if path == "/services/dns/add":
                return await self._post(method, self._dns_add, body, caller)
            if path == "/services/dns/remove":
                return await self._post(method, self._dns_remove, body, caller)
            if path == "/services/dns/remove/record":
                return await self._post(method, self._dns_remove_record, body, caller)
            if path == "/stats":
                return Response.json(gvproxy_stats(self.control.stats()))
            if path == "/cam":
                return Response.json(self.control.switch_table())
            if path == "/tunnel":
                return self._tunnel(url.query)
            if path == "/connect" and connect:
                return Hijack("connect")
        except BadRequest as e:
            return Response.fail(400, str(e))
        except Forbidden as e:
            return Response.fail(403, str(e))
        except ControlError as e:
            return Response.fail(ERROR_STATUS[e.kind], str(e))
        return NOT_FOUND

    @staticmethod
    async def _post(method: str, handler, body: bytes, caller: str | None) -> Response:  # type: ignore[no-untyped-def]
        if method != "POST":
            return Response.fail(400, "post only")
        await handler(body, caller)
        return Response(200)

    # ---- forwarder ----------------------------------------------------------------------

    def _forwards(self, caller: str | None) -> list[dict[str, str]]:
        rows = [
            {"local": f.local, "remote": _remote_text(f), "protocol": f.protocol}
            for f in self.control.list_forwards()
            if self._visible(f, caller)
        ]
        return sorted(rows, key=lambda r: (r["local"], r["protocol"]))

    def _visible(self, fwd: Forward, caller: str | None) -> bool:
        return not self.inside or self.allow_any or fwd.remote.host == caller

    def _protocol(self, obj: dict[str, Any]) -> str:
        protocol = _string(obj, "protocol", "types.ExposeRequest") or "tcp"
        if protocol not in ("tcp", "udp", "unix"):
            raise ControlError("unavailable", f"unknown protocol {protocol}")
        if self.inside and not self.allow_any and protocol == "unix":
            raise Forbidden(
                "unix forwards cannot be made from inside the virtual network "
                "(hostd --guest-expose any allows it)"
            )
        return protocol

    async def _expose(self, body: bytes, caller: str | None) -> None:
        obj = _decode_object(body, "types.ExposeRequest")
        protocol = self._protocol(obj)
        local = _string(obj, "local", "types.ExposeRequest")
        remote = _string(obj, "remote", "types.ExposeRequest")
        if protocol == "unix":
            scheme, sep, rest = remote.partition("://")
            if not sep or scheme != "tcp":
                raise BadRequest(
                    f"remote {remote!r}: a unix forward needs tcp://ADDRESS:PORT "
                    "(ssh-tunnel:// is not supported by netferry)"
                )
            remote = rest
        host, port = _split_host_port(remote)
        if not host:
            if caller is None:
                raise BadRequest(
                    f"remote {remote}: the host may be left out only by a caller inside the "
                    "virtual network"
                )
            host = caller
        if self.inside and not self.allow_any and host != caller:
            raise Forbidden(
                f"remote {host}: a guest may only expose its own address ({caller}); "
                "hostd --guest-expose any allows more"
            )
        await self.control.expose(
            protocol, local, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        )

    async def _unexpose(self, body: bytes, caller: str | None) -> None:
        obj = _decode_object(body, "types.UnexposeRequest")
        protocol = self._protocol(obj)
        local = _string(obj, "local", "types.UnexposeRequest")
        try:
            fwd = self.control.forwards.find(protocol, local)
        except ControlError:
            fwd = None
        if fwd is None:
            raise ControlError("not_found", "proxy not found")
        if not self._visible(fwd, caller):
            raise Forbidden(f"{fwd.describe()} does not forward to the caller ({caller})")
        await self.control.unexpose(protocol, local)

    # ---- leases and DNS ---------------------------------------------------------------

    async def _leases(self) -> dict[str, str]:
        network = self.control.switch.network
        table = {
            str(ipaddress.IPv4Address(network.gateway_ip)): ":".join(
                f"{b:02x}" for b in network.gateway_mac
            )
        }
        # DHCPv6 leases too (IPv6 address → MAC, "" when the client's MAC is not known);
        # gvproxy serves no IPv6, so its clients never see one unless IPv6 is turned on.
        for lease in await self.control.leases_async():  # built in slices, yielding
            table[str(lease.ip)] = lease.mac
        return dict(sorted(table.items()))

    def _zones(self) -> list[dict[str, object]]:
        out = []
        for zone, records in self.control.dns_zones():
            rows: list[dict[str, object]] = []
            for r in records:
                if r.rtype == "CNAME":
                    continue  # gvproxy's records are addresses only
                name = r.name[: -len(zone) - 1] if r.name.endswith("." + zone) else ""
                rows.append({"Name": name, "IP": r.value, "Regexp": None})
            patterns, default = self.control.dns_extras(zone)
            rows += [{"Name": "", "IP": ip, "Regexp": p} for p, ip in patterns]
            out.append({"Name": zone, "Records": rows, "DefaultIP": default or ""})
        return out

    @staticmethod
    def _zone_body(body: bytes) -> tuple[str, list[dict[str, Any]], str]:
        """(zone name, records with lower-case keys, DefaultIP) of a types.Zone body."""
        obj = _decode_object(body, "types.Zone")
        name = _string(obj, "Name", "types.Zone")
        records = obj.get("records") or []
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise BadRequest("json: cannot unmarshal Records into types.Zone.Records")
        rows = [{str(k).lower(): v for k, v in r.items()} for r in records]
        for i, row in enumerate(rows):
            for key in ("name", "ip", "regexp"):
                _string(row, key, f"types.Zone.Records[{i}]")
        return name, rows, _string(obj, "DefaultIP", "types.Zone")

    async def _dns_add(self, body: bytes, caller: str | None) -> None:
        zone, rows, default = self._zone_body(body)
        specs = []
        for row in rows:
            ip = row.get("ip") or ""
            if row.get("regexp"):
                continue
            specs.append(DnsRecordSpec(row.get("name") or "", "AAAA" if ":" in ip else "A", ip))
        for i, row in enumerate(rows):  # checked before anything changes: all or nothing
            if row.get("regexp"):
                try:
                    re.compile(row["regexp"])
                    ipaddress.ip_address(row.get("ip") or "")
                except (re.error, ValueError) as e:
                    raise BadRequest(f"Records[{i}]: {e}") from None
        if specs:
            self.control.add_dns_records(zone, specs)
        else:
            self.control.add_dns_zone(zone)
        for row in rows:
            if row.get("regexp"):
                self.control.add_dns_pattern(zone, row["regexp"], row.get("ip") or "")
        if default:
            self.control.set_dns_default(zone, default)

    async def _dns_remove(self, body: bytes, caller: str | None) -> None:
        zone, _, _ = self._zone_body(body)
        self.control.remove_dns_zone(zone)

    async def _dns_remove_record(self, body: bytes, caller: str | None) -> None:
        zone, rows, _ = self._zone_body(body)
        if not rows:
            raise BadRequest("Records: is empty")
        for row in rows:
            name, ip, pattern = row.get("name") or "", row.get("ip") or "", row.get("regexp")
            if pattern:
                self.control.remove_dns_pattern(zone, pattern)
            elif ip:
                self.control.remove_dns_record(zone, name, ip)
            else:
                self.control.remove_dns_records(zone, [name])

    # ---- tunnel -------------------------------------------------------------------------

    def _tunnel(self, query: str) -> Response | Hijack:
        params = parse_qs(query)
        ip = (params.get("ip") or [""])[0]
        port = (params.get("port") or [""])[0]
        if not ip:
            return Response.fail(500, "ip is mandatory")
        if not port:
            return Response.fail(500, "port is mandatory")
        try:
            dest = self.control.tunnel_destination(f"{ip}:{port}", "address")
        except ControlError as e:
            return Response.fail(500, str(e))
        return Hijack("tunnel", dest)


class Forbidden(ControlError):
    """A guest asked for more than `--guest-expose` allows: 403 (gvproxy has no such rule)."""

    def __init__(self, message: str) -> None:
        super().__init__("permission_denied", message)


def _remote_text(fwd: Forward) -> str:
    return f"tcp://{fwd.remote}" if fwd.protocol == "unix" else str(fwd.remote)


def gvproxy_stats(snap: StatsSnapshot) -> dict[str, object]:
    """netferry's counters under gvproxy's (gVisor's) top-level keys where they mean the
    same; all of netferry's own under "Netferry"."""
    c = snap.counters
    p = snap.protocols

    def n(key: str) -> int:
        return c.get(key, 0)

    ip_in = n("network.ipv4_in")
    ip_malformed = sum(v for k, v in snap.drops.items() if k.startswith(("ipv4_bad", "ipv4_tr")))
    return {
        "BytesSent": snap.bytes_out,
        "BytesReceived": snap.bytes_in,
        "DroppedPackets": snap.dropped + snap.malformed,
        "ARP": {
            "PacketsReceived": p["arp"].packets_from_guests,
            "OutgoingRequestsSent": n("network.arp_requests_out"),
            "OutgoingRepliesSent": n("network.arp_replies_out"),
        },
        "ICMP": {
            "V4": {
                "PacketsReceived": {
                    "Echo": n("network.icmp_in") - n("network.icmp_non_echo_dropped")
                },
                "PacketsSent": {"EchoReply": n("network.icmp_echo_replies")},
            },
            # gVisor has the V6 group too (zero in gvproxy, which serves no IPv6)
            "V6": {
                "PacketsReceived": {
                    "Echo": n("network.icmpv6_in") - n("network.icmpv6_non_echo_dropped"),
                    "RouterSolicit": n("network.ndp_rs_in"),
                    "NeighborSolicit": n("network.ndp_ns_in"),
                    "NeighborAdvert": n("network.ndp_na_in"),
                },
                "PacketsSent": {
                    "RouterAdvert": n("network.ndp_ra_out"),
                    "NeighborSolicit": n("network.ndp_ns_out"),
                    "NeighborAdvert": n("network.ndp_na_out"),
                },
            },
        },
        "IGMP": {},
        "IP": {
            "PacketsReceived": ip_in,
            "ValidPacketsReceived": ip_in - ip_malformed,
            "MalformedPacketsReceived": ip_malformed,
            "PacketsSent": sum(p[k].packets_to_guests for k in ("tcp", "udp", "icmp")),
        },
        "NICs": {
            "Tx": {"Packets": snap.frames_out, "Bytes": snap.bytes_out},
            "Rx": {"Packets": snap.frames_in, "Bytes": snap.bytes_in},
            "MalformedL4RcvdPackets": snap.malformed,
        },
        "TCP": {
            "ActiveConnectionOpenings": n("network.tcp_connects_out"),
            "PassiveConnectionOpenings": n("network.tcp_syns"),
            "CurrentConnected": snap.tcp_connections,
            "FailedConnectionAttempts": (
                n("tcp_nat.refused") + n("tcp_nat.timed_out") + n("tcp_nat.unreachable")
            ),
            "ValidSegmentsReceived": n("network.tcp_segments_in"),
            "SegmentsSent": p["tcp"].packets_to_guests,
            "ChecksumErrors": n("network.tcp_bad_checksum"),
        },
        "UDP": {
            "PacketsReceived": n("network.udp_in"),
            "PacketsSent": p["udp"].packets_to_guests,
            "ChecksumErrors": n("network.udp_bad_checksum"),
        },
        "Netferry": {
            "drops": snap.drops,
            "flows": {
                "tcp_connections": snap.tcp_connections,
                "tcp_pending_dials": snap.tcp_pending_dials,
                "udp_flows": snap.udp_flows,
                "icmp_flows": snap.icmp_flows,
                "forwards": snap.forwards,
            },
            "links": [vars(link) for link in snap.links],
            "counters": snap.counters,
        },
    }


def _render(conn: h11.Connection, response: Response) -> bytes:
    headers = [("Date", email.utils.formatdate(usegmt=True))]
    if response.body:
        headers.append(("Content-Type", "text/plain; charset=utf-8"))
    if response.error:
        headers.append(("X-Content-Type-Options", "nosniff"))
    headers.append(("Content-Length", str(len(response.body))))
    reason = http.HTTPStatus(response.status).phrase.encode()
    out = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    out = out or b""
    if response.body:
        out += conn.send(h11.Data(data=response.body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


class HttpExchange:
    """One HTTP/1.1 connection's requests, whatever carries the bytes: feed bytes in, get
    (response bytes | a hijack, trailing bytes) out, one request at a time."""

    def __init__(
        self, api: GvproxyApi, caller: str | None, connect: bool, token: str | None = None
    ) -> None:
        self.api = api
        self.caller = caller
        self.connect = connect
        self.token = token  # a TCP API: every request must carry it (Authorization: Bearer)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=64 << 10)
        self.request: h11.Request | None = None
        self.body = bytearray()

    def feed(self, data: bytes) -> None:
        self.h11.receive_data(data)

    def next_request(self) -> tuple[str, str, bytes] | Response | None:
        """A complete request, an error response (then close), or None: need more bytes."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                return Response.fail(e.error_status_hint, f"bad request: {e}")
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                if self.token is not None and not bearer_ok(
                    dict(event.headers).get(b"authorization"), self.token
                ):
                    return Response.fail(401, "this API needs 'Authorization: Bearer TOKEN'")
                self.request = event
                self.body.clear()
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > MAX_BODY:
                    return Response.fail(413, "request body too large")
            elif isinstance(event, h11.EndOfMessage) and self.request is not None:
                req = self.request
                self.request = None
                return (req.method.decode(), req.target.decode("latin-1"), bytes(self.body))
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def answer(self, method: str, target: str, body: bytes) -> bytes | Hijack:
        """The response's bytes (or the hijack); a bug in a handler is a 500, never a hang."""
        try:
            result = await self.api.handle(method, target, body, self.caller, self.connect)
        except Exception:
            log.exception("http.handler_failed", target=target)
            result = Response.fail(500, "internal error")
        if isinstance(result, Hijack):
            return result
        return _render(self.h11, result)

    def render_error(self, response: Response) -> bytes:
        with contextlib.suppress(h11.LocalProtocolError):
            return _render(self.h11, response)
        return b""

    def next_cycle(self) -> bool:
        """Ready for the next request on this connection (keep-alive)."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    @property
    def trailing(self) -> bytes:
        return self.h11.trailing_data[0]


# ---- host sockets -------------------------------------------------------------------------


class HttpApiProtocol(asyncio.Protocol):
    """The API on one host-socket connection; `/connect` and `/tunnel` take it over."""

    def __init__(self, server: HttpApiServer) -> None:
        self.server = server
        self.exchange = HttpExchange(server.api, None, server.connect, server.token)
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a request is being answered: later bytes wait in h11
        self.hijacked = False
        self.refused = ""  # the peer is not hostd's owner: why

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.server.scheme == "unix":
            sock = transport.get_extra_info("socket")
            try:
                uid = peer_uid(sock)
            except OSError:
                uid = -1
            if not owner_may_connect(uid):
                log.warning("http_api.peer_refused", uid=uid, socket=self.server.address)
                self.refused = refusal(uid)
                self.hijacked = True  # nothing is parsed or answered but the 403
                # Answer once the client has spoken (a reply before its request arrives
                # would meet a reset); one that never speaks is closed soon.
                asyncio.get_running_loop().call_later(10.0, transport.close)

    def _refuse(self) -> None:
        assert self.transport is not None
        body = (self.refused + "\n").encode()
        self.transport.write(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if self.refused:
            self._refuse()
            return
        self.exchange.feed(data)
        if not self.busy:
            self._next()

    def eof_received(self) -> bool:
        if self.refused:
            return False  # closes
        self.exchange.feed(b"")
        if not self.busy:
            self._next()
        return True  # close after answering what came before the EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def _next(self) -> None:
        if self.transport is None or self.hijacked:
            return
        got = self.exchange.next_request()
        if got is None:
            if self.exchange.h11.their_state is h11.CLOSED:
                self.transport.close()
            return
        if isinstance(got, Response):
            self.transport.write(self.exchange.render_error(got))
            self.transport.close()
            return
        self.busy = True
        task = asyncio.get_running_loop().create_task(self._answer(*got))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _answer(self, method: str, target: str, body: bytes) -> None:
        out = await self.exchange.answer(method, target, body)
        if self.transport is None:
            return
        if isinstance(out, Hijack):
            self.hijacked = True
            self._hijack(out)
            return
        self.transport.write(out)
        self.busy = False
        if self.exchange.next_cycle():
            self._next()
        else:
            self.transport.close()

    def _hijack(self, how: Hijack) -> None:
        transport = self.transport
        assert transport is not None
        trailing = self.exchange.trailing
        if how.kind == "connect":
            # The connection is a link from here on: no reply (gvforwarder reads none).
            link = StreamLink(
                self.server.control.switch, f"{self.server.uri}/connect", CONNECT_FRAMING,
                MAX_FRAME,
            )  # fmt: skip
            transport.set_protocol(link)
            link.connection_made(transport)
            if trailing:
                link.data_received(trailing)
            return
        # /tunnel: the raw socket goes to the splicer; the transport lets go of it.
        sock = transport.get_extra_info("socket")
        raw = socket.socket(fileno=os.dup(sock.fileno()))
        transport.pause_reading()
        transport.abort()  # closes its descriptor only: `raw` still holds the connection
        try:
            raw.setblocking(True)
            raw.sendall(b"OK")
        except OSError:
            raw.close()
            return
        try:
            self.server.control.splice_tunnel(how.dest, raw, trailing)  # type: ignore[arg-type]
        except ControlError as e:
            log.warning("http.tunnel_failed", error=str(e))
            raw.close()


def parse_http_api_uri(uri: str) -> tuple[str, str, bool]:
    """'unix:///path' | 'tcp://HOST:PORT', optional '?connect=0' → (scheme, address,
    connect)."""
    base, _, query = uri.partition("?")
    connect = True
    if query:
        params = parse_qs(query, keep_blank_values=True)
        unknown = set(params) - {"connect"}
        if unknown:
            raise ValueError(f"--http-api {uri!r}: unknown parameter {sorted(unknown)[0]!r}")
        value = params["connect"][0]
        if value not in ("0", "1"):
            raise ValueError(f"--http-api {uri!r}: connect must be 0 or 1")
        connect = value == "1"
    if base.startswith("unix://") and len(base) > len("unix://"):
        return "unix", base[len("unix://") :], connect
    if base.startswith("tcp://"):
        _, sep, port = base[len("tcp://") :].rpartition(":")
        if sep and port.isdigit() and 0 < int(port) < 65536:
            return "tcp", base[len("tcp://") :], connect
    raise ValueError(f"--http-api {uri!r}: expected unix:///path or tcp://HOST:PORT")


class HttpApiServer:
    """gvproxy's HTTP API on one host socket (gvproxy's `-listen`/`-services`)."""

    def __init__(
        self, control: Control, uri: str, token: str | None = None, insecure_tcp: bool = False
    ) -> None:
        self.control = control
        self.uri = uri
        self.scheme, self.address, self.connect = parse_http_api_uri(uri)
        # A TCP socket cannot tell users apart: a token is required there (hostd/api/auth.py)
        # unless --insecure-tcp-api (gvproxy's behaviour) says otherwise.
        self.token = token if self.scheme == "tcp" else None
        if self.scheme == "tcp" and not token and not insecure_tcp:
            raise ValueError(f"--http-api {uri}: an API on TCP needs --api-token-file")
        self.api = GvproxyApi(control, inside=False)
        self.server: asyncio.base_events.Server | None = None
        self.path: str | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.scheme == "unix":
            sock = bind_unix_socket(self.address, socket.SOCK_STREAM)  # 0600
            self.path = self.address
            self.server = await loop.create_unix_server(lambda: HttpApiProtocol(self), sock=sock)
        else:
            host, _, port = self.address.rpartition(":")
            self.server = await loop.create_server(
                lambda: HttpApiProtocol(self), host.strip("[]") or None, int(port)
            )
        log.info("http_api.listening", uri=self.uri, connect=self.connect)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        remove_socket_file(self.path)


# ---- inside the virtual network: the gateway's port 80 ----------------------------------


class GatewayHttpSession:
    """The forwarder API on one guest TCP connection to the gateway's port 80."""

    def __init__(
        self, conn: tcp.TcpConnection, api: GvproxyApi, touch: Callable[[tcp.TcpConnection], None]
    ) -> None:
        self.conn = conn
        self.touch = touch
        caller = str(ipaddress.ip_address(conn.key[0]))  # a v4 or a v6 guest
        self.exchange = HttpExchange(api, caller, connect=False)
        self.busy = False
        self.task: asyncio.Task[None] | None = None

    def on_event(self, event: tcp.TcpEvent) -> None:
        if isinstance(event, tcp.DataReceived):
            self.exchange.feed(self.conn.read())
        elif isinstance(event, tcp.PeerClosed):
            self.exchange.feed(self.conn.read())
            self.exchange.feed(b"")
        elif isinstance(event, tcp.ConnectionReset | tcp.Closed):
            if self.task is not None:
                self.task.cancel()
            return
        else:
            return
        if not self.busy:
            self._next()

    def _next(self) -> None:
        if self.conn.state is tcp.TcpState.CLOSED:
            return
        got = self.exchange.next_request()
        if got is None:
            if self.exchange.h11.their_state is h11.CLOSED:
                self._close()
            return
        if isinstance(got, Response):
            self._send(self.exchange.render_error(got))
            self._close()
            return
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(self._answer(*got))

    async def _answer(self, method: str, target: str, body: bytes) -> None:
        out = await self.exchange.answer(method, target, body)
        assert not isinstance(out, Hijack)  # no /connect or /tunnel inside
        self._send(out)
        self.busy = False
        if self.exchange.next_cycle():
            self._next()
        else:
            self._close()

    def _send(self, data: bytes) -> None:
        try:
            sent = self.conn.send(data)  # answers are small; the send buffer is MiBs
        except tcp.TcpStateError:
            return
        if sent < len(data):
            self.conn.abort()
        self.touch(self.conn)

    def _close(self) -> None:
        if self.conn.state is not tcp.TcpState.CLOSED:
            with contextlib.suppress(tcp.TcpStateError):
                self.conn.close()
            self.touch(self.conn)


def serve_gateway_http(control: Control, *, allow_any: bool) -> None:
    """Open the gateway's port 80 to guests with the forwarder endpoints."""
    switch = control.switch
    api = GvproxyApi(control, inside=True, allow_any=allow_any)
    switch.tcp_nat.services["http"] = lambda conn: GatewayHttpSession(
        conn, api, switch.tcp_nat.touch
    )
    switch.network.gateway_tcp_services[HTTP_PORT] = "http"
