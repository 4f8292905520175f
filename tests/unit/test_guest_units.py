"""Unit tests of the guest side: the agent's sources, wsl-proxy's mapping logic, the vsock
bridges (with unix sockets standing in: nothing here connects to AF_VSOCK) and the NAT
ruleset. Sockets are on loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import socketserver
import tempfile
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from guestd import nat_rules
from guestd import network_setup as ns
from guestd.wsl_proxy import Key, MappingFault, MappingTable, PortProxyService, key_from_pb
from hostd import guests
from netferry import agent
from netferry.uri import parse_link_uri
from netferry.v1 import proxy_pb2 as pb

# ---- the agent's sources -------------------------------------------------------------------


def m(proto: str, host: str, port: int) -> agent.PortMapping:
    return agent.PortMapping(proto, host, port)


def test_parse_line_forms() -> None:
    assert agent.parse_line("add tcp 127.0.0.1 8080") == [
        agent.Change(True, m("tcp", "127.0.0.1", 8080))
    ]
    assert agent.parse_line("remove udp 5353") == [agent.Change(False, m("udp", "127.0.0.1", 5353))]
    assert agent.parse_line(
        '{"action": "remove", "protocol": "UDP", "host_ip": "0.0.0.0", "port": "53"}'
    ) == [agent.Change(False, m("udp", "0.0.0.0", 53))]
    rd = {"remove": False, "ports": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}],
                                     "53/udp": [{"HostIp": "", "HostPort": "5353"}]}}  # fmt: skip
    assert sorted(agent.parse_line(json.dumps(rd)), key=lambda c: c.mapping) == [
        agent.Change(True, m("tcp", "127.0.0.1", 8080)),
        agent.Change(True, m("udp", "0.0.0.0", 5353)),
    ]
    assert agent.parse_line("   ") == [] and agent.parse_line("# comment") == []
    assert agent.parse_line("add tcp [::1] 80") == [agent.Change(True, m("tcp", "::1", 80))]


@pytest.mark.parametrize(
    "line, why",
    [
        ("add sctp 80", "protocol"),
        ("add tcp 70000", "1..65535"),
        ("add tcp host.example 80", "not an IP"),
        ("frobnicate tcp 80", "expected add|remove"),
        ("{bad json", "bad JSON"),
        ('{"action": "toggle", "port": 1}', "action"),
        ("add tcp", "expected PROTOCOL"),
    ],
)
def test_parse_line_errors(line: str, why: str) -> None:
    with pytest.raises(agent.SourceError, match=why):
        agent.parse_line(line)


def test_desired_file_and_diff() -> None:
    text = "tcp 127.0.0.1 8080   # web\nudp 5353\n\n# nothing\n" + json.dumps(
        {"protocol": "tcp", "host_ip": "0.0.0.0", "port": 9000}
    )
    want = agent.parse_desired(text)
    assert want == {
        m("tcp", "127.0.0.1", 8080),
        m("udp", "127.0.0.1", 5353),
        m("tcp", "0.0.0.0", 9000),
    }
    changes = agent.diff({m("tcp", "127.0.0.1", 8080), m("tcp", "127.0.0.1", 1)}, want)
    assert changes[0] == agent.Change(False, m("tcp", "127.0.0.1", 1))
    assert {c.mapping for c in changes[1:]} == want - {m("tcp", "127.0.0.1", 8080)}
    with pytest.raises(agent.SourceError, match="line 2"):
        agent.parse_desired("tcp 1\nudp nope\n")


def test_stdin_source_reports_bad_lines() -> None:
    reports: list[dict] = []
    got = list(agent.stdin_source(["add tcp 80\n", "junk\n", "remove tcp 80\n"], reports.append))
    assert [c.add for c in got] == [True, False]
    assert len(reports) == 1 and not reports[0]["ok"] and reports[0]["line"] == "junk"


def test_docker_ports_ipv4_only() -> None:
    v4, v6 = {"HostIp": "0.0.0.0", "HostPort": "8080"}, {"HostIp": "::", "HostPort": "8080"}
    ports = {"80/tcp": [v4, v6], "53/udp": None,
             "443/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}  # fmt: skip
    assert agent._from_docker_ports(ports) == [m("tcp", "0.0.0.0", 8080)]


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def test_docker_source_against_a_fake_docker_api() -> None:
    """Running containers at start, then start/die events from /events."""
    events_ready = threading.Event()
    release = threading.Event()

    def ports(key: str, ip: str, port: str) -> dict:
        return {"NetworkSettings": {"Ports": {key: [{"HostIp": ip, "HostPort": port}]}}}

    inspect = {"c1": ports("80/tcp", "127.0.0.1", "8081"), "c2": ports("53/udp", "0.0.0.0", "5353")}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def address_string(self) -> str:
            return "unix"

        def _json(self, obj) -> None:  # type: ignore[no-untyped-def]
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/containers/json":
                self._json([{"Id": "c1"}])
            elif self.path.startswith("/containers/"):
                self._json(inspect[self.path.split("/")[2]])
            elif self.path.startswith("/events"):
                assert "container" in self.path
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for ev in (
                    {"status": "start", "id": "c2"},
                    {"Action": "die", "Actor": {"ID": "c1"}},
                ):
                    line = (json.dumps(ev) + "\n").encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                events_ready.set()
                release.wait(5)
                self.wfile.write(b"0\r\n\r\n")

    d = tempfile.mkdtemp(prefix="nf-docker-")
    path = os.path.join(d, "docker.sock")
    server = _UnixHTTPServer(path, Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    try:
        src = agent.docker_source(path, stop, lambda r: None)
        got = [next(src) for _ in range(3)]
        assert got == [
            agent.Change(True, m("tcp", "127.0.0.1", 8081)),
            agent.Change(True, m("udp", "0.0.0.0", 5353)),
            agent.Change(False, m("tcp", "127.0.0.1", 8081)),
        ]
        stop.set()
        release.set()
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        os.unlink(path)
        os.rmdir(d)


# ---- wsl-proxy -------------------------------------------------------------------------------


def mapping(proto: int, host: str, port: int) -> pb.Mapping:
    return pb.Mapping(protocol=proto, host_ip=host, port=port)


def test_key_normalisation_and_validation() -> None:
    assert key_from_pb(mapping(pb.MAPPING_PROTOCOL_TCP, "", 80)) == Key("tcp", "127.0.0.1", 80)
    assert key_from_pb(mapping(pb.MAPPING_PROTOCOL_UDP, "[::1]", 80)) == Key("udp", "::1", 80)
    assert str(Key("udp", "::1", 80)) == "udp [::1]:80"
    for bad, code in [
        (mapping(0, "", 80), pb.MAPPING_ERROR_INVALID_ARGUMENT),
        (mapping(pb.MAPPING_PROTOCOL_TCP, "", 0), pb.MAPPING_ERROR_INVALID_ARGUMENT),
        (mapping(pb.MAPPING_PROTOCOL_TCP, "", 65536), pb.MAPPING_ERROR_INVALID_ARGUMENT),
        (mapping(pb.MAPPING_PROTOCOL_TCP, "local host", 80), pb.MAPPING_ERROR_BAD_ADDRESS),
        (mapping(pb.MAPPING_PROTOCOL_UDP, "224.0.0.1", 80), pb.MAPPING_ERROR_BAD_ADDRESS),
    ]:
        with pytest.raises(MappingFault) as e:
            key_from_pb(bad)
        assert e.value.code == code


def free_port() -> int:
    for _ in range(100):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.2", port))
            return port
        except OSError:
            continue
        finally:
            u.close()
    raise RuntimeError("no port")


async def _tcp_upstream(port: int) -> asyncio.base_events.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # until the client half-closes
        w.write(b"up:" + data)
        await w.drain()
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


def test_table_tcp_and_udp_forward_both_ways() -> None:
    """Listener on 127.0.0.2:P forwards to the upstream 127.0.0.1:P, replies come back."""

    async def main() -> None:
        port = free_port()
        up = await _tcp_upstream(port)
        loop = asyncio.get_running_loop()

        class Echo(asyncio.DatagramProtocol):
            def connection_made(self, t):  # type: ignore[no-untyped-def]
                self.t = t

            def datagram_received(self, data, addr):  # type: ignore[no-untyped-def]
                self.t.sendto(b"echo:" + data, addr)

        udp_up, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", port))
        table = MappingTable("127.0.0.1", udp_idle_timeout=30)
        try:
            tk = Key("tcp", "127.0.0.2", port)
            entry, created = await table.add(tk, "a")
            assert created
            _, again = await table.add(tk, "b")  # a repeat is idempotent, owner updated
            assert not again and entry.agent == "b"
            r, w = await asyncio.open_connection("127.0.0.2", port)
            w.write(b"ping")
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b"up:ping"
            w.close()
            uk = Key("udp", "127.0.0.2", port)
            await table.add(uk)
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.setblocking(False)
            c.connect(("127.0.0.2", port))
            for payload in (b"one", b"two"):
                await loop.sock_sendall(c, payload)
                assert await asyncio.wait_for(loop.sock_recv(c, 100), 5) == b"echo:" + payload
            assert table.active(table.entries[uk]) == 1 and table.entries[uk].total == 1
            c.close()
            # in use: a second table cannot take the same TCP address
            other = MappingTable("127.0.0.1")
            with pytest.raises(MappingFault) as e:
                await other.add(tk)
            assert e.value.code == pb.MAPPING_ERROR_ADDRESS_IN_USE and "port in use" in str(e.value)
            assert not other.entries
            with pytest.raises(MappingFault) as e:
                await other.add(Key("tcp", "192.0.2.77", port))  # not an address of ours
            assert e.value.code == pb.MAPPING_ERROR_BAD_ADDRESS
            await table.remove(tk)
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.2", port)
            with pytest.raises(MappingFault) as e:
                await table.remove(tk)
            assert e.value.code == pb.MAPPING_ERROR_NOT_FOUND
        finally:
            await table.close()
            up.close()
            udp_up.close()

    asyncio.run(main())


def test_service_resync_sweeps_only_that_agents_unrepeated_mappings() -> None:
    async def main() -> None:
        table = MappingTable("127.0.0.1")
        svc = PortProxyService(table)
        p1, p2, p3 = free_port(), free_port(), free_port()

        def req(i: int, **kw) -> pb.StreamMappingsRequest:  # type: ignore[no-untyped-def]
            return pb.StreamMappingsRequest(id=i, **kw)

        def add(port: int) -> pb.Mapping:
            return mapping(pb.MAPPING_PROTOCOL_TCP, "127.0.0.2", port)

        try:
            s1: dict = {"agent": None, "marked": None}
            assert (
                await svc.handle(req(1, hello=pb.Hello(agent="x")), s1)
            ).status == pb.MAPPING_STATUS_OK
            for i, p in enumerate((p1, p2), 2):
                r = await svc.handle(req(i, add=add(p)), s1)
                assert (r.id, r.status) == (i, pb.MAPPING_STATUS_APPLIED)
            s2: dict = {"agent": None, "marked": None}
            await svc.handle(req(1, hello=pb.Hello(agent="y")), s2)
            await svc.handle(req(2, add=add(p3)), s2)
            # agent x reconnects: re-adds only p1; p2 is swept, y's p3 untouched
            s3: dict = {"agent": None, "marked": None}
            await svc.handle(req(1, hello=pb.Hello(agent="x", resync=True)), s3)
            await svc.handle(req(2, add=add(p1)), s3)
            done = await svc.handle(req(3, sync_done=pb.SyncDone()), s3)
            assert [x.port for x in done.swept] == [p2]
            assert sorted(k.port for k in table.entries) == sorted([p1, p3])
            again = await svc.handle(req(4, sync_done=pb.SyncDone()), s3)
            assert again.status == pb.MAPPING_STATUS_ERROR
            assert again.error == pb.MAPPING_ERROR_INVALID_ARGUMENT
            empty = await svc.handle(req(5), s3)
            assert empty.error == pb.MAPPING_ERROR_INVALID_ARGUMENT
        finally:
            await table.close()

    asyncio.run(main())


# ---- bridges, handshake plumbing, NAT ---------------------------------------------------------


async def _unix_echo(path: str) -> asyncio.base_events.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    return await asyncio.start_unix_server(handle, path)


def test_guest_bridge_pipes_to_the_grpc_socket() -> None:
    """network-setup's vsock bridge, with a unix listener standing in for AF_VSOCK."""

    async def main() -> None:
        d = tempfile.mkdtemp(prefix="nf-br-")
        target, front = os.path.join(d, "t.sock"), os.path.join(d, "f.sock")
        echo = await _unix_echo(target)
        lsock = socket.socket(socket.AF_UNIX)
        lsock.bind(front)
        lsock.listen()
        lsock.setblocking(False)
        bridge = ns.Bridge(lsock, target)
        await bridge.start()
        try:
            r, w = await asyncio.open_unix_connection(front)
            w.write(b"x" * 200000)
            got = await asyncio.wait_for(r.readexactly(200000), 5)
            assert got == b"x" * 200000 and bridge.connections == 1
            w.close()
        finally:
            bridge.close()
            echo.close()
            for p in (target, front):
                os.unlink(p)
            os.rmdir(d)

    asyncio.run(main())


def test_hostd_vsock_dial_bridge_with_a_fake_dialer() -> None:
    async def main() -> None:
        d = tempfile.mkdtemp(prefix="nf-br-")
        target = os.path.join(d, "t.sock")
        echo = await _unix_echo(target)

        def dial() -> socket.socket:  # stands in for AF_VSOCK connect((cid, port))
            s = socket.socket(socket.AF_UNIX)
            s.connect(target)
            return s

        bridge = guests.VsockDialBridge(3, 6669, dial)
        await bridge.start()
        try:
            assert oct(os.stat(bridge.path).st_mode & 0o777) == "0o600"
            r, w = await asyncio.open_unix_connection(bridge.path)
            w.write(b"hello")
            assert await asyncio.wait_for(r.readexactly(5), 5) == b"hello"
            w.close()
        finally:
            await bridge.close()
            echo.close()
            os.unlink(target)
            os.rmdir(d)
        assert not os.path.exists(bridge.dir)

    asyncio.run(main())


def test_vsock_listener_binds_without_connecting() -> None:
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK in this Python")
    try:
        s = ns.vsock_listener(parse_link_uri(f"vsock://:{40000 + os.getpid() % 20000}"))
    except OSError as e:
        pytest.skip(f"vsock not available here ({e})")
    assert s.family == socket.AF_VSOCK
    s.close()


def test_versions_and_data_addresses() -> None:
    assert guests.PROTOCOL_VERSION == ns.PROTOCOL_VERSION
    listen = ["unixgram:///x/g.sock", "unix:///run/nf/link.sock?framing=len16le"]
    assert guests.offered_data_address(listen, None) == (
        "unix:///run/nf/link.sock?framing=len16le", "unix:///run/nf/link.sock?framing=len16le#",
    )  # fmt: skip
    assert guests.offered_data_address(["vsock://:1024"], None) == (
        "vsock://2:1024",
        "vsock://:1024#",
    )
    assert guests.offered_data_address(["unix:///a"], "vsock://2:1024") == ("vsock://2:1024", "")
    with pytest.raises(ValueError, match="needs a unix"):
        guests.offered_data_address(["unixgram:///x"], None)
    with pytest.raises(ValueError, match="CID"):
        guests.parse_guest_uri("vsock://:6669")
    with pytest.raises(ValueError, match="expected"):
        guests.parse_guest_uri("tcp://1.2.3.4:5")
    assert ns.fd_uri(parse_link_uri("unix:///p?framing=len16le")) == "fd://3?framing=len16le"
    assert ns.fd_uri(parse_link_uri("vsock://2:1024")) == "fd://3"
    # hostd did not offer virtio-net headers: vm-switch must not negotiate them
    assert ns.fd_uri(parse_link_uri("vsock://2:1024"), vnet_hdr=False) == "fd://3?offload=none"
    assert (
        ns.fd_uri(parse_link_uri("unix:///p?framing=len16le"), vnet_hdr=False)
        == "fd://3?framing=len16le&offload=none"
    )
    assert (
        parse_link_uri(ns.fd_uri(parse_link_uri("unix:///p?framing=len16le"))).framing == "len16le"
    )


def test_nat_ruleset() -> None:
    text = nat_rules.ruleset("eth0", "veth-rd-ns", "192.168.143.0/24")
    assert 'iifname { "eth0", "veth-rd-ns" } fib daddr type local dnat ip to 127.0.0.1' in text
    assert 'ip saddr 192.168.143.0/24 oifname "eth0" masquerade' in text
    assert text.startswith("table ip netferry\ndelete table ip netferry\n")  # replace, atomically
    limited = nat_rules.ruleset(ports=[8080, 53, 8080])
    assert "th dport { 53, 8080 }" in limited


# ---- wsl-proxy: Rancher Desktop's JSON PortMapping -----------------------------------------


def test_rancher_desktop_port_mapping_parsing() -> None:
    from guestd.wsl_proxy import JsonRequestError, parse_port_mapping

    remove, items = parse_port_mapping(
        {"remove": True, "connectAddrs": None,
         "ports": {"8080/TCP": [{"HostIp": "", "HostPort": "18080"}],
                   "53": [{"HostIp": "127.0.0.1", "HostPort": "5353"}],
                   "9/udp": None}}
    )  # fmt: skip
    assert remove is True
    assert [(m.protocol, m.host_ip, m.port) for _, m, _ in items if m is not None] == [
        (pb.MAPPING_PROTOCOL_TCP, "0.0.0.0", 18080),  # empty HostIp: every address (docker)
        (pb.MAPPING_PROTOCOL_TCP, "127.0.0.1", 5353),  # no /proto: tcp, as docker
    ]
    assert parse_port_mapping({}) == (False, [])
    _, bad = parse_port_mapping({"ports": {"1/tcp": [{"HostPort": "x"}], "2/tcp": {}}})
    assert [why for _, m, why in bad] == [
        "HostPort: 'x' is not a port number",
        'ports["2/tcp"]: expected a list',
    ]
    for doc, why in (([1], "expected a JSON object"), ({"remove": 1}, '"remove": expected')):
        with pytest.raises(JsonRequestError, match=why):
            parse_port_mapping(doc)


def test_front_listener_tells_grpc_from_json_and_pipes_exactly() -> None:
    """The HTTP/2 preface, even split across writes, goes to the gRPC socket byte for byte;
    other first bytes get an error line; a connection closed at once costs nothing."""
    from guestd.wsl_proxy import H2_PREFACE, FrontListener, JsonPortMappings

    async def main() -> None:
        d = tempfile.mkdtemp(prefix="nf-front-")
        front_path, grpc_path = os.path.join(d, "front.sock"), os.path.join(d, "grpc.sock")
        got = bytearray()
        done = asyncio.Event()

        async def fake_grpc(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                got.extend(data)
            w.write(b"reply")
            await w.drain()
            w.close()
            done.set()

        upstream = await asyncio.start_unix_server(fake_grpc, grpc_path)
        front = FrontListener(
            front_path, grpc_path, JsonPortMappings(PortProxyService(MappingTable()))
        )
        await front.start()
        try:
            assert os.stat(front_path).st_mode & 0o777 == 0o600
            r, w = await asyncio.open_unix_connection(front_path)
            w.write(H2_PREFACE[:5])
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(H2_PREFACE[5:] + b"\x00frames")
            w.write_eof()
            assert await r.read() == b"reply"
            await done.wait()
            assert bytes(got) == H2_PREFACE + b"\x00frames"
            w.close()
            # not HTTP/2, not JSON
            r, w = await asyncio.open_unix_connection(front_path)
            w.write(b"PUT / HTTP/1.1\r\n\r\n")
            reply = json.loads(await r.readline())
            assert reply["ok"] is False and "expected a gRPC client" in reply["message"]
            w.close()
            # closed before a byte: nothing happens
            r, w = await asyncio.open_unix_connection(front_path)
            w.close()
            # JSON after leading whitespace
            r, w = await asyncio.open_unix_connection(front_path)
            w.write(b'  \n {"remove": false, "ports": {}}\n')
            assert json.loads(await r.readline()) == {"ok": True, "results": []}
            w.close()
        finally:
            await front.stop()
            upstream.close()
            os.unlink(grpc_path)
            assert not os.path.exists(front_path)
            os.rmdir(d)

    asyncio.run(main())
