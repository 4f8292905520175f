"""`netferry agent`: the guest agent. It reads port mappings from a source and publishes each
one twice: to wsl-proxy (`netferry.v1.PortProxy/StreamMappings`, so the port answers in the
default namespace) and to hostd (`HostSwitch.Expose`, so it answers on the host).

Sources (one per agent):
- `--stdin` (the default): one change per line, any of
  `{"action": "add", "protocol": "tcp", "host_ip": "127.0.0.1", "port": 8080}`,
  Rancher Desktop's PortMapping `{"remove": false, "ports": {"8080/tcp": [{"HostIp":
  "127.0.0.1", "HostPort": "8080"}]}}`, or text: `add tcp 127.0.0.1 8080`, `remove udp 5353`
  (no address means 127.0.0.1). The agent exits at end of input.
- `--file PATH`: the file is the desired set, one mapping per line (`tcp 127.0.0.1 8080`,
  `udp 5353`, or a JSON object); `#` starts a comment. It is polled (`--poll`, 0.5 s) and each
  change of content becomes adds and removes.
- `--docker-socket PATH`: Docker's events API (`/events`, container start/die/stop/kill) and
  `/containers/{id}/json` for the published ports (IPv4 bindings only, as Rancher Desktop's
  agent); running containers are read at start.

Sinks:
- wsl-proxy (`--wsl-proxy unix:///run/wsl-proxy.sock`, `none` to skip): one stream for the
  agent's life. On every (re)connect the agent sends `hello{agent, resync: true}`, every
  mapping it wants, then `sync_done`, so wsl-proxy drops what the agent no longer wants (the
  disconnected-agent rule: see guestd/wsl_proxy.py).
- hostd (`--api`, `none` to skip): Expose `HOST_IP:PORT` → `GUEST_ADDRESS:PORT`
  (`--guest-address`, 192.168.127.2). A hostd restart (its WatchEvents stream breaks) makes
  the agent expose everything again once hostd is back; ALREADY_EXISTS with the same remote
  counts as done. In a VM, hostd's API is reached over TCP through the host-loopback address
  (`--api tcp://192.168.127.254:PORT`).

Every answer is printed as a JSON line on stdout:
`{"sink": "wsl-proxy"|"hostd", "op": "add"|"remove", "mapping": "tcp 127.0.0.1:8080",
"ok": true|false, "error": "ADDRESS_IN_USE", "message": "..."}`.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc

from netferry.client import HostSwitchClient, NetferryError, grpc_target
from netferry.v1 import proxy_pb2 as ppb
from netferry.v1 import proxy_pb2_grpc as ppb_grpc

PROTO_VALUES = {"tcp": ppb.MAPPING_PROTOCOL_TCP, "udp": ppb.MAPPING_PROTOCOL_UDP}


@dataclass(frozen=True, order=True)
class PortMapping:
    protocol: str  # tcp | udp
    host_ip: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        return f"{self.protocol} {host}:{self.port}"

    @property
    def local(self) -> str:
        host = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        return f"{host}:{self.port}"

    def to_pb(self) -> ppb.Mapping:
        return ppb.Mapping(protocol=PROTO_VALUES[self.protocol], host_ip=self.host_ip,
                           port=self.port)  # fmt: skip


@dataclass(frozen=True)
class Change:
    add: bool
    mapping: PortMapping


class SourceError(ValueError):
    pass


def make_mapping(protocol: str, host_ip: str | None, port: object) -> PortMapping:
    proto = str(protocol or "tcp").lower()
    if proto not in PROTO_VALUES:
        raise SourceError(f"protocol {protocol!r}: expected tcp or udp")
    try:
        p = int(port)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise SourceError(f"port {port!r}: not a number") from None
    if not 1 <= p <= 65535:
        raise SourceError(f"port {p}: not 1..65535")
    host = (host_ip or "").strip().strip("[]") or "127.0.0.1"
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise SourceError(f"host ip {host_ip!r}: not an IP address") from None
    return PortMapping(proto, host, p)


def _from_docker_ports(ports: dict | None, ipv4_only: bool = True) -> list[PortMapping]:
    """Docker's `nat.PortMap`: {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}."""
    out = []
    for key, bindings in (ports or {}).items():
        _, _, proto = str(key).partition("/")
        for b in bindings or []:
            host_ip = b.get("HostIp") or "0.0.0.0"
            if ipv4_only and ":" in host_ip:
                continue
            if not b.get("HostPort"):
                continue
            out.append(make_mapping(proto or "tcp", host_ip, b["HostPort"]))
    return out


def _mapping_from_words(words: list[str]) -> PortMapping:
    if len(words) == 2:
        return make_mapping(words[0], None, words[1])
    if len(words) == 3:
        return make_mapping(words[0], words[1], words[2])
    raise SourceError(f"{' '.join(words)!r}: expected PROTOCOL [HOST_IP] PORT")


def _mapping_from_obj(obj: dict) -> PortMapping:
    return make_mapping(
        obj.get("protocol", "tcp"), obj.get("host_ip", obj.get("HostIp")),
        obj.get("port", obj.get("HostPort")),
    )  # fmt: skip


def parse_line(line: str) -> list[Change]:
    """One stdin line → its changes (an RD PortMapping can carry several); [] for blanks."""
    text = line.strip()
    if not text or text.startswith("#"):
        return []
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"bad JSON: {e}") from None
        if not isinstance(obj, dict):
            raise SourceError("expected a JSON object")
        if "ports" in obj:  # Rancher Desktop's PortMapping
            add = not obj.get("remove", False)
            return [Change(add, m) for m in _from_docker_ports(obj["ports"], ipv4_only=False)]
        action = str(obj.get("action", "add")).lower()
        if action not in ("add", "remove"):
            raise SourceError(f"action {action!r}: expected add or remove")
        return [Change(action == "add", _mapping_from_obj(obj))]
    words = text.split()
    action = words[0].lower()
    if action not in ("add", "remove", "rm"):
        raise SourceError(f"{text!r}: expected add|remove PROTOCOL [HOST_IP] PORT")
    return [Change(action == "add", _mapping_from_words(words[1:]))]


def parse_desired(text: str) -> set[PortMapping]:
    """A watched file's content → the mappings it wants."""
    out: set[PortMapping] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("{") else raw.strip()
        if not line:
            continue
        try:
            if line.startswith("{"):
                out.add(_mapping_from_obj(json.loads(line)))
            else:
                out.add(_mapping_from_words(line.split()))
        except (SourceError, json.JSONDecodeError) as e:
            raise SourceError(f"line {n}: {e}") from None
    return out


def diff(old: set[PortMapping], new: set[PortMapping]) -> list[Change]:
    return [Change(False, m) for m in sorted(old - new)] + [
        Change(True, m) for m in sorted(new - old)
    ]


# ---- sources ---------------------------------------------------------------------------------


def stdin_source(stream: Iterable[str], report: Callable[[dict], None]) -> Iterator[Change]:
    for line in stream:
        try:
            yield from parse_line(line)
        except SourceError as e:
            report({"source": "stdin", "ok": False, "message": str(e), "line": line.strip()})


def file_source(path: str, poll: float, stop: threading.Event,
                report: Callable[[dict], None]) -> Iterator[Change]:  # fmt: skip
    current: set[PortMapping] = set()
    seen: tuple | None = None
    while not stop.is_set():
        try:
            st = os.stat(path)
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            if sig != seen:
                seen = sig
                with open(path) as f:
                    wanted = parse_desired(f.read())
                yield from diff(current, wanted)
                current = wanted
        except FileNotFoundError:
            if seen is not None:
                seen = None
                yield from diff(current, set())
                current = set()
        except SourceError as e:
            report({"source": path, "ok": False, "message": str(e)})
        stop.wait(poll)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


def docker_get(path: str, url: str, timeout: float | None = 10.0) -> object:
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise OSError(f"docker {url}: HTTP {resp.status} {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


def docker_source(path: str, stop: threading.Event,
                  report: Callable[[dict], None]) -> Iterator[Change]:  # fmt: skip
    """Container start → its published ports added; die/stop/kill → removed."""
    held: dict[str, list[PortMapping]] = {}

    def inspect(cid: str) -> list[PortMapping]:
        info = docker_get(path, f"/containers/{cid}/json")
        return _from_docker_ports((info.get("NetworkSettings") or {}).get("Ports"))  # type: ignore[union-attr]

    backoff = 0.5
    while not stop.is_set():
        try:
            for c in docker_get(path, "/containers/json"):  # type: ignore[union-attr]
                if c["Id"] not in held:
                    held[c["Id"]] = inspect(c["Id"])
                    yield from (Change(True, m) for m in held[c["Id"]])
            filters = json.dumps({"type": ["container"], "event": ["start", "die", "stop", "kill"]})
            conn = _UnixHTTPConnection(path, None)
            conn.request("GET", "/events?filters=" + _quote(filters))
            resp = conn.getresponse()
            backoff = 0.5
            while not stop.is_set():
                line = resp.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                ev = json.loads(line)
                cid = ev.get("id") or (ev.get("Actor") or {}).get("ID", "")
                status = ev.get("status") or ev.get("Action")
                if status == "start" and cid not in held:
                    held[cid] = inspect(cid)
                    yield from (Change(True, m) for m in held[cid])
                elif status in ("die", "stop", "kill") and cid in held:
                    yield from (Change(False, m) for m in held.pop(cid))
            conn.close()
        except (OSError, ValueError, KeyError, http.client.HTTPException) as e:
            report({"source": "docker", "ok": False, "message": str(e), "retry_in": backoff})
            stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)


def _quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="")


# ---- sinks -----------------------------------------------------------------------------------

RESYNC = object()


class WslProxySink:
    """The StreamMappings stream, reopened (with a resync) whenever it ends."""

    name = "wsl-proxy"

    def __init__(self, target: str, agent: str, state: Agent) -> None:
        self.target = target
        self.agent = agent
        self.state = state
        self.q: queue.Queue = queue.Queue()
        self.next_id = 0
        self.pending: dict[int, tuple[str, PortMapping | None]] = {}
        self.thread = threading.Thread(target=self._run, daemon=True, name="wsl-proxy")
        self.connected = threading.Event()

    def submit(self, change: Change) -> None:  # called with state.lock held
        self.q.put(change)

    def _request(self, op: str, m: PortMapping | None = None) -> ppb.StreamMappingsRequest:
        self.next_id += 1
        self.pending[self.next_id] = (op, m)
        req = ppb.StreamMappingsRequest(id=self.next_id)
        if op == "hello":
            req.hello.agent = self.agent
            req.hello.resync = True
        elif op == "add":
            assert m is not None
            req.add.CopyFrom(m.to_pb())
        elif op == "remove":
            assert m is not None
            req.remove.CopyFrom(m.to_pb())
        else:
            req.sync_done.SetInParent()
        return req

    def _requests(self, q: queue.Queue, snapshot: list[PortMapping]) -> Iterator:
        yield self._request("hello")
        for m in snapshot:
            yield self._request("add", m)
        yield self._request("sync_done")
        while True:
            item = q.get()
            if item is None:
                return
            yield self._request("add" if item.add else "remove", item.mapping)

    def _run(self) -> None:
        backoff = 0.2
        while not self.state.stop.is_set():
            channel = grpc.insecure_channel(grpc_target(self.target))
            stub = ppb_grpc.PortProxyStub(channel)
            with self.state.lock:
                q: queue.Queue = queue.Queue()
                self.q = q
                snapshot = sorted(self.state.desired)
            try:
                for resp in stub.StreamMappings(self._requests(q, snapshot)):
                    backoff = 0.2
                    self.connected.set()
                    op, m = self.pending.pop(resp.id, ("?", None))
                    if op in ("hello", "sync_done"):
                        if resp.swept:
                            self.state.report({"sink": self.name, "op": "resync",
                                               "ok": True, "message": resp.message})  # fmt: skip
                        continue
                    ok = resp.status in (ppb.MAPPING_STATUS_APPLIED, ppb.MAPPING_STATUS_REMOVED)
                    self.state.report({
                        "sink": self.name, "op": op, "mapping": str(m), "ok": ok,
                        "error": ppb.MappingError.Name(resp.error).removeprefix("MAPPING_ERROR_")
                        if not ok else "", "message": resp.message,
                    })  # fmt: skip
                    self.state.acked(self.name)
            except grpc.RpcError as e:
                self.connected.clear()
                if self.state.stop.is_set():
                    break
                self.state.report({"sink": self.name, "ok": False, "op": "connect",
                                   "message": f"{e.code().name}: {e.details()}",
                                   "retry_in": backoff})  # fmt: skip
            finally:
                q.put(None)
                channel.close()
            self.state.stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def close(self) -> None:
        self.q.put(None)


class HostdSink:
    """Expose/Unexpose on hostd; everything is exposed again after hostd restarts."""

    name = "hostd"

    def __init__(self, target: str | None, guest_address: str, state: Agent) -> None:
        self.target = target
        self.guest_address = guest_address
        self.state = state
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="hostd")
        self.watcher = threading.Thread(target=self._watch, daemon=True, name="hostd-watch")
        self.client = HostSwitchClient(target, timeout=10)

    def submit(self, change: Change) -> None:
        self.q.put(change)

    def remote(self, m: PortMapping) -> str:
        return f"{self.guest_address}:{m.port}"

    def _apply(self, change: Change, resync: bool = False) -> bool:
        """True when done (success or a definite refusal); False when hostd is unreachable."""
        m = change.mapping
        try:
            if change.add:
                self.client.expose(m.protocol, m.local, self.remote(m))
            else:
                self.client.unexpose(m.protocol, m.local)
            ok, err, msg = True, "", ""
        except NetferryError as e:
            if e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and (
                not e.message.startswith("local:")  # hostd's own refusal (bind failed)
            ):
                return False  # hostd unreachable: retried
            held_same = e.code == grpc.StatusCode.ALREADY_EXISTS and self.remote(m) in e.message
            missing = e.code == grpc.StatusCode.NOT_FOUND and not change.add
            ok, err, msg = held_same or missing, e.code.name, e.message
        if not (resync and ok):
            self.state.report({"sink": self.name, "op": "add" if change.add else "remove",
                               "mapping": str(m), "ok": ok, "error": "" if ok else err,
                               "message": msg})  # fmt: skip
        self.state.acked(self.name)
        return True

    def _run(self) -> None:
        while not self.state.stop.is_set():
            item = self.q.get()
            if item is None:
                return
            backoff = 0.2
            while not self.state.stop.is_set():
                if item is RESYNC:
                    with self.state.lock:
                        wanted = sorted(self.state.desired)
                    if all(self._apply(Change(True, m), resync=True) for m in wanted):
                        self.state.report({"sink": self.name, "op": "resync", "ok": True,
                                           "message": f"{len(wanted)} exposed"})  # fmt: skip
                        break
                elif self._apply(item):
                    break
                self.state.stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _watch(self) -> None:
        """Expose everything again whenever hostd becomes reachable: at start and after its
        event stream broke (hostd stopped or restarted; its forwards went with it)."""
        was_up = False
        while not self.state.stop.is_set():
            try:
                self.client.forwards()
                up = True
            except NetferryError:
                up = False
            if up and not was_up:
                self.q.put(RESYNC)
            was_up = up
            if up:
                try:
                    for _ in self.client.events():
                        pass
                except NetferryError:
                    pass
                was_up = False
            self.state.stop.wait(0.5)

    def close(self) -> None:
        self.q.put(None)
        self.client.close()


class Agent:
    def __init__(self, out=None) -> None:  # type: ignore[no-untyped-def]
        self.desired: set[PortMapping] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sinks: list = []
        self.out = out or sys.stdout
        self._out_lock = threading.Lock()
        self.acks: dict[str, int] = {}
        self.ack_cond = threading.Condition()

    def report(self, record: dict) -> None:
        with self._out_lock:
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()

    def acked(self, sink: str) -> None:
        with self.ack_cond:
            self.acks[sink] = self.acks.get(sink, 0) + 1
            self.ack_cond.notify_all()

    def apply(self, change: Change) -> None:
        with self.lock:
            if change.add:
                self.desired.add(change.mapping)
            else:
                self.desired.discard(change.mapping)
            for sink in self.sinks:
                sink.submit(change)

    def drain(self, timeout: float) -> None:
        """Wait until every sink's queue is empty (best effort, bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s.q.empty() for s in self.sinks):
                time.sleep(0.3)  # the last request's answer
                return
            time.sleep(0.05)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="netferry agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--api", help="hostd's HostSwitch API ($NETFERRY_API); 'none' to skip")
    p.add_argument("--wsl-proxy", default="unix:///run/wsl-proxy.sock",
                   help="wsl-proxy's socket (default %(default)s); 'none' to skip")  # fmt: skip
    p.add_argument("--guest-address", default="192.168.127.2",
                   help="where hostd forwards to (default %(default)s)")  # fmt: skip
    p.add_argument("--agent-name", default="netferry-agent", help="owner name at wsl-proxy")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--stdin", action="store_true", help="changes as lines on stdin (default)")
    src.add_argument("--file", metavar="PATH", help="the desired mappings, one per line; watched")
    src.add_argument("--docker-socket", metavar="PATH", help="Docker's API socket")
    p.add_argument("--poll", type=float, default=0.5, help="file poll interval (seconds)")
    p.add_argument("--remove-on-exit", action="store_true",
                   help="remove every mapping when the agent ends")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    agent = Agent()
    if args.wsl_proxy != "none":
        agent.sinks.append(WslProxySink(args.wsl_proxy, args.agent_name, agent))
    if args.api != "none":
        agent.sinks.append(HostdSink(args.api, args.guest_address, agent))
    for s in agent.sinks:
        s.thread.start()
        if isinstance(s, HostdSink):
            s.watcher.start()
    try:
        if args.file:
            changes: Iterable[Change] = file_source(args.file, args.poll, agent.stop, agent.report)
        elif args.docker_socket:
            changes = docker_source(args.docker_socket, agent.stop, agent.report)
        else:
            changes = stdin_source(sys.stdin, agent.report)
        for change in changes:
            agent.apply(change)
    except KeyboardInterrupt:
        pass
    if args.remove_on_exit:
        for m in sorted(agent.desired):
            agent.apply(Change(False, m))
    agent.drain(10.0)
    agent.stop.set()
    for s in agent.sinks:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
