"""guestd/wsl_proxy.py: mapping keys, the forwarding table (127.0.0.2 -> 127.0.0.1), the
service's resync, Rancher Desktop's JSON PortMapping and the front listener. Loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile

import pytest

from netferry.guestd.wsl_proxy import Key, MappingFault, MappingTable, PortProxyService, key_from_pb
from netferry.v1 import proxy_pb2 as pb


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


def test_rancher_desktop_port_mapping_parsing() -> None:
    from netferry.guestd.wsl_proxy import JsonRequestError, parse_port_mapping

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
    from netferry.guestd.wsl_proxy import H2_PREFACE, FrontListener, JsonPortMappings

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
