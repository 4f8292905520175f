"""clients/python/netferry/agent.py: the port-mapping agent's sources (lines, the desired file,
stdin, a fake Docker API on a private unix socket)."""

from __future__ import annotations

import json
import os
import socketserver
import tempfile
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from netferry import agent


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
