"""wsl-proxy speaks Rancher Desktop's guest-agent wire beside gRPC on the same socket path.

wsl-proxy is started with Rancher Desktop's flag forms (`-debug=false -logfile=F
-socketFile P -upstreamAddress A -udpBuffer N`). Everything is on loopback: mappings listen
on 127.0.0.1:PORT and forward to the upstream 127.0.0.2:PORT, where this test serves a TCP
and a UDP echo (127.0.0.0/8 is all local, so the two bind the same port on two addresses).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from netferry.v1 import proxy_pb2 as ppb
from netferry.v1 import proxy_pb2_grpc as ppb_grpc
from tests.conftest import STARTED, _bin, stop_process, wait_for
from tests.e2e.test_guest_side import free_port_pair

pytestmark = pytest.mark.e2e

UPSTREAM = "127.0.0.2"


@dataclass
class Proxy:
    proc: subprocess.Popen
    sock: Path
    log: Path

    def send(self, payload: bytes, read_reply: bool = True) -> dict | None:
        """One connection, as Rancher Desktop's agent makes it; the ack if asked for."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(15)
            s.connect(str(self.sock))
            s.sendall(payload)
            if not read_reply:
                return None
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)

    def mapping(self, remove: bool, ports: dict) -> dict:
        reply = self.send(json.dumps({"remove": remove, "ports": ports}).encode() + b"\n")
        assert reply is not None
        return reply

    def listed(self) -> set[tuple[int, str, int, str]]:
        with grpc.insecure_channel(f"unix:{self.sock}") as ch:
            got = ppb_grpc.PortProxyStub(ch).ListMappings(ppb.ListMappingsRequest(), timeout=5)
        return {(m.mapping.protocol, m.mapping.host_ip, m.mapping.port, m.agent)
                for m in got.mappings}  # fmt: skip


@pytest.fixture
def proxy(short_tmp: Path) -> Iterator[Proxy]:
    sock, log = short_tmp / "wslp.sock", short_tmp / "wsl-proxy.log"
    proc = subprocess.Popen(
        [_bin("wsl-proxy"), "-debug=false", f"-logfile={log}", "-socketFile", str(sock),
         "-upstreamAddress", UPSTREAM, "-udpBuffer", "8388608", "--log-format", "json"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    STARTED.append(proc)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, 15, "wsl-proxy's socket")
        assert proc.poll() is None, f"wsl-proxy exited {proc.returncode}"
        assert (os.stat(sock).st_mode & 0o777) == 0o600
        yield Proxy(proc, sock, log)
    finally:
        stop_process(proc)
    assert proc.returncode == 0
    # nothing left beside the socket: the public one and grpcio's private one are gone
    assert not sock.exists() and not any(
        p.name.startswith(".wsl-proxy") for p in short_tmp.iterdir()
    )


@pytest.fixture
def upstream_echo() -> Iterator[int]:
    """TCP and UDP echo on 127.0.0.2:PORT (the mapping's upstream)."""
    port = free_port_pair()
    tcp = socket.create_server((UPSTREAM, port))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((UPSTREAM, port))
    stop = threading.Event()

    def tcp_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = tcp.accept()
            except OSError:
                return

            def echo(c: socket.socket) -> None:
                with c, contextlib.suppress(OSError):  # a reset by the proxy ends it
                    while data := c.recv(1 << 16):
                        c.sendall(data)

            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def udp_loop() -> None:
        while not stop.is_set():
            try:
                data, addr = udp.recvfrom(65535)
            except OSError:
                return
            udp.sendto(data, addr)

    threads = [threading.Thread(target=f, daemon=True) for f in (tcp_loop, udp_loop)]
    for t in threads:
        t.start()
    try:
        yield port
    finally:
        stop.set()
        tcp.close()
        udp.close()


def tcp_roundtrip_sha(port: int, size: int = 8 << 20) -> tuple[str, str]:
    data = os.urandom(size)
    got = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:

        def send() -> None:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=send)
        t.start()
        while chunk := s.recv(1 << 16):
            got.update(chunk)
        t.join()
    return hashlib.sha256(data).hexdigest(), got.hexdigest()


def test_rancher_desktop_json_maps_tcp_and_udp(proxy: Proxy, upstream_echo: int) -> None:
    port = upstream_echo
    ports = {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}],
             f"{port}/udp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}  # fmt: skip
    reply = proxy.mapping(False, ports)
    assert reply["ok"], reply
    assert sorted((r["mapping"], r["status"]) for r in reply["results"]) == [
        (f"tcp 127.0.0.1:{port}", "APPLIED"),
        (f"udp 127.0.0.1:{port}", "APPLIED"),
    ]
    # TCP: 8 MiB each way, byte-exact
    sent, echoed = tcp_roundtrip_sha(port)
    assert sent == echoed
    # UDP: datagrams of several sizes come back byte-exact (replies are relayed)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        for size in (1, 1400, 8000, 60000):
            payload = os.urandom(size)
            u.sendto(payload, ("127.0.0.1", port))
            data, _ = u.recvfrom(65535)
            assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
    # the same mappings, seen over gRPC on the same path
    assert proxy.listed() == {
        (ppb.MAPPING_PROTOCOL_TCP, "127.0.0.1", port, "rancher-desktop"),
        (ppb.MAPPING_PROTOCOL_UDP, "127.0.0.1", port, "rancher-desktop"),
    }
    # a repeat is applied again, harmlessly
    again = proxy.mapping(False, {f"{port}/tcp": ports[f"{port}/tcp"]})
    assert again["ok"] and "already applied" in again["results"][0]["message"]
    # remove: the ack says REMOVED and the port is closed
    reply = proxy.mapping(True, ports)
    assert reply["ok"] and {r["status"] for r in reply["results"]} == {"REMOVED"}, reply
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert proxy.listed() == set()
    # removing again: NOT_FOUND, named
    reply = proxy.mapping(True, {f"{port}/tcp": ports[f"{port}/tcp"]})
    assert not reply["ok"] and reply["results"][0]["error"] == "NOT_FOUND", reply


def test_agent_that_never_reads_the_ack(proxy: Proxy, upstream_echo: int) -> None:
    """Rancher Desktop's agent writes the JSON line and closes at once: still applied."""
    port = upstream_echo
    pm = {"remove": False,
          "ports": {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]},
          "connectAddrs": None}  # fmt: skip
    proxy.send(json.dumps(pm).encode() + b"\n", read_reply=False)
    wait_for(lambda: proxy.listed() == {(ppb.MAPPING_PROTOCOL_TCP, "127.0.0.1", port,
                                         "rancher-desktop")}, 10, "the mapping")  # fmt: skip
    sent, echoed = tcp_roundtrip_sha(port, 1 << 20)
    assert sent == echoed
    # and the same without a trailing newline, closing the write side (end of input)
    pm["remove"] = True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(proxy.sock))
        s.sendall(json.dumps(pm).encode())
        s.shutdown(socket.SHUT_WR)
        ack = json.loads(s.makefile("rb").readline())
    assert ack["ok"] and ack["results"][0]["status"] == "REMOVED"
    assert proxy.listed() == set()


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"{not json\n", "bad JSON"),
        (b'{"remove": false} [1]\n', "bad JSON: Extra data"),
        (b'{"remove": "yes", "ports": {}}\n', '"remove": expected true or false'),
        (b'{"ports": [1]}\n', '"ports": expected an object'),
        (b"{" + b" " * (1 << 20) + b"\n", "request over 1048576 bytes"),
        (b'{"remove": false,\n "ports": {}} x', "bad JSON: Extra data"),
        (b"GET / HTTP/1.1\r\n\r\n", "expected a gRPC client (HTTP/2) or a JSON PortMapping"),
    ],
)
def test_bad_requests_get_a_clear_error(proxy: Proxy, payload: bytes, message: str) -> None:
    reply = proxy.send(payload)
    assert reply is not None and reply["ok"] is False and reply["results"] == []
    assert reply["error"] == "INVALID_ARGUMENT" and message in reply["message"], reply
    assert proxy.proc.poll() is None and proxy.listed() == set()


def test_bad_bindings_are_named_and_the_rest_applied(proxy: Proxy, upstream_echo: int) -> None:
    port = upstream_echo
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        busy_port = busy.getsockname()[1]
        reply = proxy.mapping(False, {
            "53/sctp": [{"HostIp": "127.0.0.1", "HostPort": "5353"}],
            "80/tcp": [{"HostIp": "127.0.0.1"}, {"HostIp": "nonsense", "HostPort": "8080"},
                       {"HostIp": "127.0.0.1", "HostPort": str(busy_port)},
                       {"HostIp": "127.0.0.1", "HostPort": str(port)}],
        })  # fmt: skip
    finally:
        busy.close()
    assert reply["ok"] is False
    results = reply["results"]
    assert [r["status"] for r in results] == ["ERROR", "ERROR", "ERROR", "ERROR", "APPLIED"]
    assert "protocol 'sctp' is not tcp or udp" in results[0]["message"]
    assert "HostPort: None is not a port number" in results[1]["message"]
    assert results[2]["error"] == "BAD_ADDRESS" and "nonsense" in results[2]["message"]
    assert results[3]["error"] == "ADDRESS_IN_USE"
    assert proxy.listed() == {(ppb.MAPPING_PROTOCOL_TCP, "127.0.0.1", port, "rancher-desktop")}
    sent, echoed = tcp_roundtrip_sha(port, 1 << 20)
    assert sent == echoed


def test_grpc_stream_on_the_same_path(proxy: Proxy, upstream_echo: int) -> None:
    """The agent's gRPC stream still works through the front listener, beside JSON."""
    port = upstream_echo
    reqs = [
        ppb.StreamMappingsRequest(id=1, hello=ppb.Hello(agent="grpc-agent")),
        ppb.StreamMappingsRequest(id=2, add=ppb.Mapping(protocol=ppb.MAPPING_PROTOCOL_UDP,
                                                        host_ip="127.0.0.1", port=port)),
    ]  # fmt: skip
    with grpc.insecure_channel(f"unix:{proxy.sock}") as ch:
        answers = list(ppb_grpc.PortProxyStub(ch).StreamMappings(iter(reqs), timeout=10))
    assert [a.status for a in answers] == [ppb.MAPPING_STATUS_OK, ppb.MAPPING_STATUS_APPLIED]
    reply = proxy.mapping(True, {f"{port}/udp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]})
    assert reply["ok"] and reply["results"][0]["status"] == "REMOVED"
    assert proxy.listed() == set()


def test_a_value_over_several_lines_and_writes(proxy: Proxy, upstream_echo: int) -> None:
    """A pretty-printed PortMapping written in pieces is waited for, not cut at a newline."""
    port = upstream_echo
    text = json.dumps({"remove": False, "ports": {f"{port}/tcp": [
        {"HostIp": "127.0.0.1", "HostPort": str(port)}]}}, indent=2).encode()  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)
        s.connect(str(proxy.sock))
        cut = text.index(b"\n", 5) + 1
        s.sendall(text[:cut])
        time.sleep(0.2)  # so the first piece is read on its own
        s.sendall(text[cut:])  # no trailing newline, write side still open
        ack = json.loads(s.makefile("rb").readline())
    assert ack["ok"] and ack["results"][0]["status"] == "APPLIED", ack
    assert proxy.listed() == {(ppb.MAPPING_PROTOCOL_TCP, "127.0.0.1", port, "rancher-desktop")}
