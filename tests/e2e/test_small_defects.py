"""Issue 17's smaller defects, each against the real thing: the CLI's tunnel timeout and
refusals, `expose udp:...`, guest_connected in WatchEvents with the handshake's cause on one
log line, ?offload=vnet on packet and stdio links, stdio's end, short error messages for
huge inputs, and link error counters that outlive their link."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from netferry.client import NetferryError
from tests.conftest import STARTED, _bin, free_tcp_port, wait_for
from tests.e2e.test_api import GUEST_FILE_SERVER
from tests.e2e.test_guest_side import stack  # noqa: F401  (the guest side's fixture)

pytestmark = pytest.mark.e2e

GUEST_MAC = bytes.fromhex("5a94efe40cee")
VNET_NONE = bytes(10)


def arp_request(sender_ip: str = "192.168.127.2", target_ip: str = "192.168.127.1") -> bytes:
    eth = b"\xff" * 6 + GUEST_MAC + b"\x08\x06"
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + socket.inet_aton(sender_ip)
    return eth + body + bytes(6) + socket.inet_aton(target_ip)


def is_arp_reply_from_gateway(frame: bytes) -> bool:
    return (
        frame[12:14] == b"\x08\x06"
        and frame[20:22] == b"\x00\x02"
        and frame[28:32] == (socket.inet_aton("192.168.127.1"))
    )


def cli(h, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_bin("netferry"), "--api", h.api, *args], capture_output=True, text=True, timeout=timeout
    )


def test_tunnel_timeout_and_refusal_are_reported_as_such(hostd, guest) -> None:
    h = hostd()
    g = guest(h)
    # The guest's kernel resets a closed port: a refusal by the guest, hostd was reached.
    r = cli(h, "--timeout", "10", "tunnel", f"{g.ip}:9")
    assert r.returncode == 1, r.stderr
    assert "refused the connection" in r.stderr and "cannot reach hostd" not in r.stderr
    # Nobody at .77: the SYN goes unanswered; --timeout ends it (hostd would wait ~127 s).
    r = cli(h, "--timeout", "2", "tunnel", "192.168.127.77:22", timeout=60)
    assert r.returncode == 1, r.stderr
    assert "192.168.127.77:22 did not answer within 2s" in r.stderr
    assert "cannot reach hostd" not in r.stderr
    # And hostd itself unreachable is still said plainly (exit 3).
    r = subprocess.run(
        [_bin("netferry"), "--api", f"unix://{h.dir}/nothing.sock", "tunnel", "192.168.127.2:22"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 3 and "cannot reach hostd" in r.stderr


def test_expose_with_protocol_prefix(hostd) -> None:
    h = hostd()
    port = free_tcp_port()
    r = cli(h, "--json", "expose", f"udp:127.0.0.1:{port}", "192.168.127.2:53")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["protocol"] == "PROTOCOL_UDP"
    assert json.loads(r.stdout)["local"] == f"127.0.0.1:{port}"
    r = cli(h, "expose", "-p", "tcp", f"udp:127.0.0.1:{port}", "192.168.127.2:53")
    assert r.returncode == 2 and "says udp, but -p says tcp" in r.stderr
    r = cli(h, "unexpose", f"udp:127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr
    assert cli(h, "--json", "forwards").stdout.strip() == "[]"


def test_guest_connected_event_and_handshake_cause(hostd, stack, short_tmp: Path) -> None:  # noqa: F811
    guest_sock = short_tmp / "guest.sock"
    h = hostd("--guest", f"unix://{guest_sock}")  # nothing there yet: hostd retries
    failed = wait_for(
        lambda: [e for e in h.log_events() if e.get("event") == "guest.handshake_failed"],
        15,
        "a failed handshake in hostd's log",
    )
    assert "No such file or directory" in failed[0]["cause"], failed[0]
    events: queue.Queue = queue.Queue()
    client = h.client()

    def watch() -> None:
        with contextlib.suppress(NetferryError):
            for ev in client.events():
                events.put(ev)

    threading.Thread(target=watch, daemon=True).start()
    # The subscription is live once an event made after it arrives.
    probe = f"127.0.0.1:{free_tcp_port()}"
    while True:
        with contextlib.suppress(NetferryError):
            client.expose("tcp", probe, "192.168.127.2:22")
            client.unexpose("tcp", probe)
        with contextlib.suppress(queue.Empty):
            if events.get(timeout=1).WhichOneof("kind") == "forward_added":
                break
    st = stack(start_hostd=False)
    assert st.guest_sock == guest_sock
    while True:
        ev = events.get(timeout=60)
        if ev.WhichOneof("kind") == "guest_connected":
            break
    assert ev.guest_connected.guest == f"unix://{guest_sock}"
    assert ev.guest_connected.link
    client.close()


def test_bridge_dial_failure_is_the_cause(tmp_path: Path) -> None:
    """Over vsock, gRPC sees only "Socket closed" when the bridge cannot dial: the bridge's
    own error is the cause on the log line (the dial is faked: no vsock is touched)."""
    from netferry.hostd.guests import VsockDialBridge, handshake_failure_cause
    from netferry.v1 import guest_pb2 as gpb
    from netferry.v1 import guest_pb2_grpc as gpb_grpc

    def refuse() -> socket.socket:
        raise ConnectionRefusedError(111, "Connection refused")

    async def main() -> str:
        bridge = VsockDialBridge(3, 1024, dial=refuse)
        await bridge.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{bridge.path}") as channel:
                stub = gpb_grpc.GuestStub(channel)
                try:
                    await stub.Handshake(gpb.HandshakeRequest(), timeout=10)
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                    return handshake_failure_cause(e, bridge)
            raise AssertionError("the handshake did not fail")
        finally:
            await bridge.close()

    assert asyncio.run(main()) == "vsock://3:1024: Connection refused"


def test_offload_vnet_on_unixpacket(hostd, short_tmp: Path) -> None:
    path = short_tmp / "bess.sock"
    h = hostd("--listen", f"unixpacket://{path}?offload=vnet")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    try:
        s.connect(str(path))
        s.send(VNET_NONE + arp_request())
        reply = s.recv(65536)
    finally:
        s.close()
    assert reply[:10] == VNET_NONE and is_arp_reply_from_gateway(reply[10:])
    assert h.proc.poll() is None


def test_offload_vnet_on_unixgram(hostd, short_tmp: Path) -> None:
    path = short_tmp / "vfkit.sock"
    h = hostd("--listen", f"unixgram://{path}?offload=vnet")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.settimeout(10)
    try:
        s.bind(str(short_tmp / "peer.sock"))  # a bound peer: hostd learns it
        s.sendto(VNET_NONE + arp_request(), str(path))
        reply = s.recv(65536)
    finally:
        s.close()
    assert reply[:10] == VNET_NONE and is_arp_reply_from_gateway(reply[10:])
    assert h.proc.poll() is None


def test_stdio_link_offload_and_exit_on_stdin_close(short_tmp: Path) -> None:
    proc = subprocess.Popen(
        [_bin("host-switch"), "--listen", "stdio://?offload=vnet", "--api", "none",
         "--dns-upstream", "127.0.0.1:9", "--log-format", "json",
         "--log-file", str(short_tmp / "hostd.log")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    STARTED.append(proc)
    assert proc.stdin is not None and proc.stdout is not None
    frame = VNET_NONE + arp_request()
    proc.stdin.write(struct.pack("<H", len(frame)) + frame)
    proc.stdin.flush()
    (length,) = struct.unpack("<H", proc.stdout.read(2))
    reply = proc.stdout.read(length)
    assert reply[:10] == VNET_NONE and is_arp_reply_from_gateway(reply[10:])
    proc.stdin.close()  # the VM is gone: hostd must go too
    assert proc.wait(timeout=30) == 0
    assert '"hostd.stdin_closed"' in (short_tmp / "hostd.log").read_text()


def test_huge_inputs_get_short_invalid_argument(hostd) -> None:
    h = hostd()
    huge = "x" * 1_000_000
    with h.client() as api:
        for call in (
            lambda: api.expose("tcp", huge, "192.168.127.2:80"),
            lambda: api.expose("tcp", "127.0.0.1:1", huge),
            lambda: api.dns_add("containers.internal.", [(huge, "A", "192.168.127.9", 0)]),
            lambda: api.dns_add(huge, [("a", "A", "192.168.127.9", 0)]),
            lambda: list(api.capture(host=huge, max_frames=1)),
            lambda: list(api.tunnel(huge, [])),
        ):
            with pytest.raises(NetferryError) as e:
                call()
            assert e.value.code.name == "INVALID_ARGUMENT", e.value
            assert len(e.value.message) <= 400 and "characters]" in e.value.message


def test_link_error_counters_survive_the_link(hostd) -> None:
    h = hostd()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(h.link_path)
    s.sendall(b"\xff\xff\xff\xff" + b"junk")  # a 4 GiB frame: a framing error
    s.settimeout(10)
    assert s.recv(1) == b""  # hostd closed the link
    s.close()
    with h.client() as api:
        wait_for(lambda: not api.stats().links, 10, "the link to be gone")
        counters = api.stats().counters
    assert counters["links.errors.framing_error"] == 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))


def test_tunnel_carries_more_than_a_grpc_message_holds(hostd, guest, short_tmp: Path) -> None:
    """A guest that sends faster than the client reads piles up more than gRPC's 4 MiB
    message limit in hostd: the tunnel sends it in pieces (it failed RESOURCE_EXHAUSTED)."""
    import hashlib
    import os

    h = hostd()
    g = guest(h)
    payload = os.urandom(64 << 20)
    (short_tmp / "payload").write_bytes(payload)
    server = g.ns.popen(
        sys.executable, "-c", GUEST_FILE_SERVER, "9000", str(short_tmp / "payload"),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout.readline().strip() == "listening"
        with open(short_tmp / "got", "wb") as out:
            r = subprocess.run(
                [_bin("netferry"), "--api", h.api, "tunnel", f"{g.ip}:9000"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE, timeout=120,
            )  # fmt: skip
        assert r.returncode == 0, r.stderr
        got = (short_tmp / "got").read_bytes()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    finally:
        server.kill()
        server.wait()
