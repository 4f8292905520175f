"""gvproxy's HTTP API and gvforwarder's link, end to end, with curl and a real guest kernel.

Every status, header and body is compared with what the real gvproxy answered
(shared/reference/peers-observed.md). The guests are the Linux kernel in namespaces:
vm-switch for the API tests, and for gvforwarder's wire our own peer
(`gvforwarder_peer.py`: the 85-byte `POST /connect`, then 2-byte LE frames) on a tap with
udhcpc.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import STARTED, free_tcp_port, stop_process, wait_for
from tests.e2e.test_api import http_in_guest

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
GVPROXY_STATS_KEYS = {
    "ARP", "BytesReceived", "BytesSent", "DroppedPackets", "ICMP", "IGMP", "IP", "NICs", "TCP",
    "UDP",
}  # fmt: skip


def curl(*args: str, sock: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one curl call (over the unix socket `sock` if given)."""
    cmd = ["curl", "-sS", "-i", "--max-time", "30"]
    if sock:
        cmd += ["--unix-socket", sock]
    r = subprocess.run(cmd + list(args), capture_output=True, timeout=60)
    assert r.returncode == 0, f"curl {args} failed: {r.stderr.decode()}"
    return parse_response(r.stdout)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def assert_error(result: tuple[int, dict[str, str], bytes], status: int, message: str) -> None:
    got_status, headers, body = result
    assert got_status == status, result
    assert body == message.encode() + b"\n", body
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"


def test_readme_curl_commands_and_an_8_mib_forward(hostd, guest, short_tmp) -> None:
    """Acceptance 1: the curl lines of gvisor-tap-vsock's README against --http-api, with
    gvproxy's statuses and bodies; the forward carries 8 MiB sha256-exact."""
    api = str(short_tmp / "network.sock")
    h = hostd("--http-api", f"unix://{api}", "--port-forward", "127.0.0.1:2222=192.168.127.2:22")
    assert oct(os.stat(api).st_mode & 0o777) == "0o600"
    g = guest(h)
    www = short_tmp / "www"
    www.mkdir()
    blob = os.urandom(8 << 20)
    (www / "blob").write_bytes(blob)
    server = http_in_guest(g, str(www), 6443)
    try:
        status, headers, body = curl("http:/unix/stats", sock=api)
        assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8"
        stats = json.loads(body)
        assert GVPROXY_STATS_KEYS <= set(stats), sorted(stats)
        assert stats["BytesReceived"] > 0 and stats["BytesSent"] > 0  # the guest's DHCP
        assert "Netferry" in stats

        port = free_tcp_port()
        expose = json.dumps({"local": f":{port}", "remote": "192.168.127.2:6443"})
        assert curl("http:/unix/services/forwarder/expose", "-X", "POST", "-d", expose,
                    sock=api)[::2] == (200, b"")  # fmt: skip
        status, _, body = curl("http:/unix/services/forwarder/all", sock=api)
        assert status == 200
        assert json.loads(body) == sorted(
            [
                {"local": f":{port}", "remote": "192.168.127.2:6443", "protocol": "tcp"},
                {"local": "127.0.0.1:2222", "remote": "192.168.127.2:22", "protocol": "tcp"},
            ],
            key=lambda r: r["local"],
        )
        assert body.endswith(b"]\n") and b" " not in body
        # The forward is the one gRPC lists too: one control core.
        assert f":{port}" in {f.local for f in h.client().forwards()}

        r = subprocess.run(
            ["curl", "-sS", "--max-time", "60", f"http://127.0.0.1:{port}/blob"],
            capture_output=True, timeout=90,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(blob).hexdigest()

        again = curl("http:/unix/services/forwarder/expose", "-X", "POST", "-d", expose, sock=api)
        assert again[0] == 500 and f":{port}".encode() in again[2]
        unexpose = json.dumps({"local": f":{port}"})
        assert curl("http:/unix/services/forwarder/unexpose", "-X", "POST", "-d", unexpose,
                    sock=api)[::2] == (200, b"")  # fmt: skip
        assert_error(
            curl("http:/unix/services/forwarder/unexpose", "-X", "POST", "-d", unexpose, sock=api),
            500,
            "proxy not found",
        )
        assert json.loads(curl("http:/unix/services/forwarder/all", sock=api)[2]) == [
            {"local": "127.0.0.1:2222", "remote": "192.168.127.2:22", "protocol": "tcp"}
        ]
        r = subprocess.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/blob"],
                           capture_output=True, timeout=30)  # fmt: skip
        assert r.returncode != 0  # refused: the listener is gone

        status, _, body = curl("http:/unix/services/dhcp/leases", sock=api)
        assert status == 200
        assert (
            body == b'{"192.168.127.1":"5a:94:ef:e4:0c:dd","192.168.127.2":"5a:94:ef:e4:0c:ee"}\n'
        )
        assert curl("http:/unix/leases", sock=api)[2] == body
        status, _, body = curl("http:/unix/cam", sock=api)
        assert status == 200 and list(json.loads(body)) == ["5a:94:ef:e4:0c:ee"]
    finally:
        stop_process(server)


def test_dns_endpoints_answer_the_guest(hostd, guest, short_tmp) -> None:
    api = str(short_tmp / "network.sock")
    h = hostd("--http-api", f"unix://{api}")
    g = guest(h)
    status, _, body = curl("http:/unix/services/dns/all", sock=api)
    assert status == 200
    assert json.loads(body)[0] == {
        "Name": "containers.internal.",
        "Records": [
            {"Name": "gateway", "IP": "192.168.127.1", "Regexp": None},
            {"Name": "host", "IP": "192.168.127.254", "Regexp": None},
            # host-switch serves IPv6 by default (netferry-gvproxy does not, as gvproxy)
            {"Name": "gateway", "IP": "fd00:192:168:127::1", "Regexp": None},
            {"Name": "host", "IP": "fd00:192:168:127::254", "Regexp": None},
        ],
        "DefaultIP": "",
    }
    zone = {"Name": "test.internal.", "Records": [{"Name": "db", "IP": "192.168.127.7"}]}
    assert curl("http:/unix/services/dns/add", "-d", json.dumps(zone), sock=api)[::2] == (200, b"")
    zones = {z["Name"]: z for z in json.loads(curl("http:/unix/services/dns/all", sock=api)[2])}
    assert zones["test.internal."]["Records"] == [
        {"Name": "db", "IP": "192.168.127.7", "Regexp": None}
    ]
    dig = g.ns.run("dig", "+short", "+time=2", "+tries=2", "@192.168.127.1", "db.test.internal")
    assert dig.stdout.split() == ["192.168.127.7"]
    # CRC's shape: a regexp record for every app name, and a zone catch-all
    crc = {"Name": "apps-crc.testing.",
           "Records": [{"Name": "", "IP": "192.168.127.11", "Regexp": "^.*-console$"}],
           "DefaultIP": "192.168.127.12"}  # fmt: skip
    assert curl("http:/unix/services/dns/add", "-d", json.dumps(crc), sock=api)[0] == 200
    zones = {z["Name"]: z for z in json.loads(curl("http:/unix/services/dns/all", sock=api)[2])}
    assert zones["apps-crc.testing."] == {
        "Name": "apps-crc.testing.",
        "Records": [{"Name": "", "IP": "192.168.127.11", "Regexp": "^.*-console$"}],
        "DefaultIP": "192.168.127.12",
    }
    for name, want in (("web-console", "192.168.127.11"), ("other", "192.168.127.12")):
        dig = g.ns.run("dig", "+short", "+time=2", "+tries=2", "@192.168.127.1",
                       f"{name}.apps-crc.testing")  # fmt: skip
        assert dig.stdout.split() == [want], (name, dig.stdout)
    bad = {"Name": "x.test.", "Records": [{"IP": "192.168.127.3", "Regexp": "(unclosed"}]}
    status, _, msg = curl("http:/unix/services/dns/add", "-d", json.dumps(bad), sock=api)
    assert status == 400 and b"Records[0]" in msg
    # gvisor-tap-vsock's newer removal endpoints
    one = {"Name": "test.internal.", "Records": [{"Name": "db", "IP": "192.168.127.7"}]}
    assert curl("http:/unix/services/dns/remove/record", "-d", json.dumps(one), sock=api)[0] == 200
    dig = g.ns.run("dig", "+time=2", "+tries=2", "@192.168.127.1", "db.test.internal")
    assert "NXDOMAIN" in dig.stdout
    gone = {"Name": "test.internal."}
    assert curl("http:/unix/services/dns/remove", "-d", json.dumps(gone), sock=api)[0] == 200
    assert "test.internal." not in {
        z["Name"] for z in json.loads(curl("http:/unix/services/dns/all", sock=api)[2])
    }
    assert_error(curl("http:/unix/services/dns/remove", "-d", json.dumps(gone), sock=api), 500,
                 "zone test.internal. does not exist")  # fmt: skip
    assert_error(curl("http:/unix/services/dns/add", sock=api), 400, "post only")


def test_bad_requests_get_gvproxys_statuses(hostd, short_tmp) -> None:
    """Acceptance 7: each gets gvproxy's status and a clear message; nothing crashes; a unix
    forward never deletes a file it did not create."""
    api = str(short_tmp / "network.sock")
    h = hostd("--http-api", f"unix://{api}")
    url = "http:/unix/services/forwarder/expose"

    def post(path: str, body: str) -> tuple[int, dict[str, str], bytes]:
        return curl(f"http:/unix{path}", "-X", "POST", "-d", body, sock=api)

    bad_json = post("/services/forwarder/expose", "not json")
    assert bad_json[0] == 400 and bad_json[1]["x-content-type-options"] == "nosniff"
    assert_error(
        post("/services/forwarder/expose",
             '{"local":":16443","remote":"192.168.127.2:6443","protocol":"sctp"}'),
        500, "unknown protocol sctp",
    )  # fmt: skip
    assert_error(post("/services/forwarder/expose", '{"local":":16443","remote":"192.168.127.2"}'),
                 400, "address 192.168.127.2: missing port in address")  # fmt: skip
    for path in ("/services/forwarder/expose", "/services/forwarder/unexpose",
                 "/services/dns/add"):  # fmt: skip
        assert_error(curl(f"http:/unix{path}", sock=api), 400, "post only")
    port = free_tcp_port()
    ok = json.dumps({"local": f"127.0.0.1:{port}", "remote": "192.168.127.2:6443"})
    assert post("/services/forwarder/expose", ok)[0] == 200
    twice = post("/services/forwarder/expose", ok)
    assert twice[0] == 500 and b"held by the forward" in twice[2]
    assert_error(post("/services/forwarder/unexpose", '{"local":"127.0.0.1:1"}'), 500,
                 "proxy not found")  # fmt: skip
    assert_error(curl("http:/unix/nothing/here", sock=api), 404, "404 page not found")
    assert_error(curl("-X", "POST", "http:/unix/tunnel?port=80", sock=api), 500, "ip is mandatory")
    # A unix forward onto an existing file: refused, the file is untouched (gvproxy #681).
    victim = short_tmp / "precious.txt"
    victim.write_text("keep me")
    unix = {"local": str(victim), "remote": "tcp://192.168.127.2:80", "protocol": "unix"}
    refused = post("/services/forwarder/expose", json.dumps(unix))
    assert refused[0] == 500 and b"never replaced" in refused[2]
    assert victim.read_text() == "keep me"
    unix["local"] = str(short_tmp / "fwd.sock")
    assert post("/services/forwarder/expose", json.dumps(unix))[0] == 200
    assert Path(unix["local"]).exists()
    assert post("/services/forwarder/unexpose", json.dumps({"local": unix["local"],
                "protocol": "unix"}))[0] == 200  # fmt: skip
    assert not Path(unix["local"]).exists()
    # Garbage on the socket: an HTTP 400 and a closed connection, then the API still answers.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(api)
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        s.settimeout(10)
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert curl(url.replace("expose", "all"), sock=api)[0] == 200
    assert h.proc.poll() is None


def test_tunnel_answers_ok_then_streams(hostd, guest, short_tmp) -> None:
    api = str(short_tmp / "network.sock")
    h = hostd("--http-api", f"unix://{api}")
    g = guest(h)
    echo = g.ns.popen(
        sys.executable, "-c",
        "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.bind(('0.0.0.0',7000));s.listen(1);print('listening',flush=True)\n"
        "c,_=s.accept()\nwhile d:=c.recv(65536): c.sendall(d)\nc.close()",
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    STARTED.append(echo)
    try:
        assert echo.stdout.readline().strip() == "listening"
        payload = os.urandom(1 << 20)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(api)
            s.settimeout(30)
            s.sendall(b"POST /tunnel?ip=192.168.127.2&port=7000 HTTP/1.1\r\nHost: unix\r\n\r\n")
            assert s.recv(2) == b"OK"
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := s.recv(1 << 16):
                got += chunk
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    finally:
        stop_process(echo)


@pytest.mark.parametrize("where", ["listen", "http-api"])
def test_gvforwarder_guest_gets_a_lease_and_fetches(where, hostd, netns, short_tmp, http_server):
    """Acceptance 2: a guest speaking gvforwarder's protocol (85-byte POST /connect, then
    2-byte LE frames) on a tap with udhcpc, through --listen and through --http-api."""
    api = str(short_tmp / "network.sock")
    h = hostd("--http-api", f"unix://{api}")
    sock = h.link_path if where == "listen" else api
    ns = netns()
    ns.run("ip", "tuntap", "add", "tap0", "mode", "tap")
    ns.run("ip", "link", "set", "tap0", "address", "5a:94:ef:e4:0c:ee", "up")
    peer = ns.popen(sys.executable, str(HERE / "gvforwarder_peer.py"), sock, "tap0",
                    stdout=subprocess.PIPE, text=True)  # fmt: skip
    STARTED.append(peer)
    try:
        assert peer.stdout.readline().strip() == "connected"
        script = Path(__file__).parents[2] / "guestd" / "udhcpc.script"
        lease = ns.run("udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "2", "-i", "tap0", "-s",
                       str(script), timeout=60)  # fmt: skip
        assert "NETFERRY-LEASE ip=192.168.127.2 " in lease.stdout, lease.stdout + lease.stderr
        ns.run("ping", "-c", "1", "-W", "5", "192.168.127.1")
        r = ns.run("sh", "-c", f"curl -sS --max-time 60 http://192.168.127.254:{http_server.port}"
                   "/blob?mib=16 | sha256sum", timeout=90)  # fmt: skip
        want = hashlib.sha256(http_server.blob.path.read_bytes()[: 16 << 20]).hexdigest()
        assert r.stdout.split()[0] == want
        assert '"link.connect_preface"' in h.log_text() or where == "http-api"
    finally:
        stop_process(peer)


def test_expose_from_inside_the_guest(hostd, guest, short_tmp) -> None:
    """Acceptance 3: a guest exposes its own port through http://192.168.127.1/... (as
    podman's and Rancher Desktop's guest code do); the host fetches through it; /stats is 404
    inside; a guest may not expose another address or a unix socket."""
    h = hostd()
    g = guest(h)
    www = short_tmp / "www"
    www.mkdir()
    (www / "index.html").write_text("served from the guest\n")
    server = http_in_guest(g, str(www), 8080)
    port = free_tcp_port()
    base = "http://192.168.127.1/services/forwarder"

    def inside(*args: str) -> tuple[int, dict[str, str], bytes]:
        r = g.ns.run("curl", "-sS", "-i", "--max-time", "20", *args, timeout=40, text=False)
        return parse_response(r.stdout)

    try:
        body = json.dumps({"local": f"127.0.0.1:{port}", "remote": ":8080"})
        assert inside("-X", "POST", "-d", body, f"{base}/expose")[::2] == (200, b"")
        r = subprocess.run(["curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{port}/"],
                           capture_output=True, text=True, timeout=40)  # fmt: skip
        assert r.stdout == "served from the guest\n", r.stderr
        listed = json.loads(inside(f"{base}/all")[2])
        assert listed == [{"local": f"127.0.0.1:{port}", "remote": f"{g.ip}:8080",
                           "protocol": "tcp"}]  # fmt: skip
        assert_error(inside("http://192.168.127.1/stats"), 404, "404 page not found")
        assert_error(inside("http://192.168.127.1/services/dhcp/leases"), 404,
                     "404 page not found")  # fmt: skip
        other = json.dumps({"local": f"127.0.0.1:{port + 1}", "remote": "192.168.127.9:80"})
        status, _, msg = inside("-X", "POST", "-d", other, f"{base}/expose")
        assert status == 403 and b"only expose its own address" in msg
        unix = json.dumps({"local": "/tmp/x.sock", "remote": f"tcp://{g.ip}:80",
                           "protocol": "unix"})  # fmt: skip
        assert inside("-X", "POST", "-d", unix, f"{base}/expose")[0] == 403
        assert not os.path.exists("/tmp/x.sock")
        gone = json.dumps({"local": f"127.0.0.1:{port}"})
        assert inside("-X", "POST", "-d", gone, f"{base}/unexpose")[::2] == (200, b"")
        assert h.client().forwards() == []
    finally:
        stop_process(server)


def test_guest_expose_off_closes_port_80(hostd, guest) -> None:
    h = hostd("--guest-expose", "off")
    g = guest(h)
    r = g.ns.run("curl", "-sS", "--max-time", "10", "http://192.168.127.1/services/forwarder/all",
                 check=False)  # fmt: skip
    assert r.returncode == 7, (r.returncode, r.stderr)  # connection refused
    wait_for(lambda: h.proc.poll() is None, 1, "hostd alive")


def test_dns_regexp_and_default_flags(hostd, guest) -> None:
    """host-switch --dns-regexp / --dns-default (what netferry-gvproxy's -config passes on)."""
    h = hostd("--dns-regexp", "apps.test=192.168.127.11=-console$",
              "--dns-default", "apps.test=192.168.127.12")  # fmt: skip
    g = guest(h)
    for name, want in (("web-console", "192.168.127.11"), ("other", "192.168.127.12")):
        dig = g.ns.run("dig", "+short", "+time=2", "+tries=2", "@192.168.127.1",
                       f"{name}.apps.test")  # fmt: skip
        assert dig.stdout.split() == [want], (name, dig.stdout)
