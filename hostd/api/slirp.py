"""slirp4netns's JSON API socket (`--api-socket`), a thin translator over the control core.

What rootlesskit's and podman's slirp4netns port handlers and AutoHCK speak: a unix stream
socket, one JSON request per connection, one reply without a trailing newline, then close.

    {"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"127.0.0.1",
     "host_port":8080,"guest_addr":"10.0.2.100","guest_port":80}}  → {"return":{"id":1}}
    {"execute":"list_hostfwd"}                  → {"entries":[{"id":1,"proto":"tcp",...}]}
    {"execute":"remove_hostfwd","arguments":{"id":1}}              → {"return":{}}

Errors are `{"error":{"desc":"bad request: ..."}}` with slirp4netns 1.2.0's exact texts
(`reference/peers-observed.md`). Forwards are made through the control core (`Control`), so
the gRPC and HTTP APIs list what this API adds and the other way round, and a state file
keeps them; this module only keeps the
id ⇄ forward mapping. Ids count up from 1 and are never reused. A forward added through
another front end gets an id the first time it is listed here.

It never stalls the loop: each connection is a task, reads are bounded in size and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import math
import os
import socket
import stat
from typing import TYPE_CHECKING, Any

import structlog

from netferry.hostd.errors import ControlError

if TYPE_CHECKING:
    from netferry.hostd.control import Control
    from netferry.hostd.forwards import Forward

log = structlog.get_logger("hostd.api.slirp")

MAX_REQUEST = 4096  # slirp4netns reads a request into a 4096-byte buffer
READ_TIMEOUT = 5.0  # a client that never sends its request (or EOF) is dropped
SUN_PATH_MAX = 107  # sockaddr_un.sun_path without its terminating NUL


class SlirpApiError(Exception):
    """The socket cannot be served (path too long, in use, not a socket)."""


def _error(desc: str) -> dict[str, Any]:
    return {"error": {"desc": f"bad request: {desc}"}}


def _port(value: object) -> int | None:
    """A port as slirp4netns takes it: a JSON number 1..65535 (not a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value != int(value) or not 1 <= value <= 65535:
        return None
    return int(value)


def _ipv4(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        return None


class SlirpApi:
    def __init__(self, control: Control, path: str) -> None:
        self.control = control
        self.path = path
        self.guest_ip = str(control.switch.config.guest_ip)
        self.ids: dict[int, tuple[str, str]] = {}  # id → forward key (protocol, local)
        self.next_id = 1
        self.server: asyncio.AbstractServer | None = None
        self.inode: tuple[int, int] | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    # ---- the socket ----------------------------------------------------------------------

    async def start(self) -> None:
        if len(os.fsencode(self.path)) > SUN_PATH_MAX:
            raise SlirpApiError(
                f"API socket path too long ({len(os.fsencode(self.path))} bytes, "
                f"at most {SUN_PATH_MAX}): {self.path}"
            )
        self._replace_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise SlirpApiError(f"cannot listen on {self.path}: {e.strerror}") from None
        st = os.stat(self.path)
        self.inode = (st.st_dev, st.st_ino)
        self.server = await asyncio.start_unix_server(self._serve, sock=sock)
        log.info("slirp_api.listening", path=self.path)

    def _replace_stale(self) -> None:
        """A socket file nobody listens on (left by a SIGKILLed instance) is replaced; a live
        socket or any other file is not touched."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SlirpApiError(f"{self.path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError as e:
            if e.errno != errno.ECONNREFUSED:
                raise SlirpApiError(f"{self.path}: {e.strerror}") from None
            os.unlink(self.path)
            log.info("slirp_api.stale_socket_replaced", path=self.path)
            return
        finally:
            probe.close()
        raise SlirpApiError(f"{self.path} is in use by another running instance")

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            request = await self._read_request(reader)
            reply = await self.handle(request)
            writer.write(json.dumps(reply, separators=(",", ":")).encode())
            await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request: until EOF or a complete JSON text; None when too large."""
        data = b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_TIMEOUT
        while len(data) < MAX_REQUEST:
            try:
                chunk = await asyncio.wait_for(
                    reader.read(MAX_REQUEST - len(data)), deadline - loop.time()
                )
            except TimeoutError:
                return data
            if not chunk:
                return data
            data += chunk
            try:
                json.loads(data)
                return data  # complete: clients need not half-close
            except (ValueError, RecursionError):
                continue
        return None

    # ---- requests ------------------------------------------------------------------------

    async def handle(self, request: bytes | None) -> dict[str, Any]:
        if request is None:
            return _error("too large message")
        try:
            doc = json.loads(request)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            return _error("cannot parse JSON")
        if not isinstance(doc, dict):
            return _error("json_object() failed")
        execute = doc.get("execute")
        if not isinstance(execute, str):
            return _error("no execute found")
        arguments = doc.get("arguments")
        if not isinstance(arguments, dict):
            arguments = {}  # slirp4netns 1.2.0 crashes here; we answer with the first check
        if execute == "add_hostfwd":
            return await self.add_hostfwd(arguments)
        if execute == "list_hostfwd":
            return self.list_hostfwd()
        if execute == "remove_hostfwd":
            return await self.remove_hostfwd(arguments)
        return _error("unknown execute")

    async def add_hostfwd(self, args: dict[str, Any]) -> dict[str, Any]:
        proto = args.get("proto")
        if proto not in ("tcp", "udp"):
            return _error("add_hostfwd: bad arguments.proto")
        host_addr = _ipv4(args.get("host_addr", "0.0.0.0"))
        if host_addr is None:
            return _error("add_hostfwd: bad arguments.host_addr")
        host_port = _port(args.get("host_port"))
        if host_port is None:
            return _error("add_hostfwd: bad arguments.host_port")
        guest = args.get("guest_addr") or self.guest_ip
        guest_addr = _ipv4(guest)
        if guest_addr is None:
            return _error("add_hostfwd: bad arguments.guest_addr")
        guest_port = _port(args.get("guest_port"))
        if guest_port is None:
            return _error("add_hostfwd: bad arguments.guest_port")
        try:
            fwd = await self.control.expose(
                proto, f"{host_addr}:{host_port}", f"{guest_addr}:{guest_port}"
            )
        except ControlError as e:
            log.warning("slirp_api.add_hostfwd_failed", error=str(e))
            return _error("add_hostfwd: slirp_add_hostfwd failed")
        return {"return": {"id": self._id_for(fwd.key)}}

    def _id_for(self, key: tuple[str, str]) -> int:
        for fid, k in self.ids.items():
            if k == key:
                return fid
        fid = self.next_id
        self.next_id += 1
        self.ids[fid] = key
        return fid

    def _table(self) -> dict[tuple[str, str], Forward]:
        return {fwd.key: fwd for fwd in self.control.list_forwards()}

    def list_hostfwd(self) -> dict[str, Any]:
        table = self._table()
        for fid, key in list(self.ids.items()):
            if key not in table:
                del self.ids[fid]  # removed through another front end
        for fwd in table.values():
            if fwd.protocol in ("tcp", "udp"):
                self._id_for(fwd.key)
        entries = []
        for fid, key in sorted(self.ids.items()):
            fwd = table[key]
            host, _, port = fwd.local.rpartition(":")
            entries.append(
                {
                    "id": fid,
                    "proto": fwd.protocol,
                    "host_addr": host.strip("[]") or "0.0.0.0",
                    "host_port": int(port),
                    "guest_addr": fwd.remote.host,
                    "guest_port": fwd.remote.port,
                }
            )
        return {"entries": entries}

    async def remove_hostfwd(self, args: dict[str, Any]) -> dict[str, Any]:
        fid = args.get("id")
        key = self.ids.get(fid) if isinstance(fid, int) and not isinstance(fid, bool) else None
        if key is None or key not in self._table():
            return _error("remove_hostfwd: bad arguments.id")
        try:
            await self.control.unexpose(*key)
        except ControlError as e:
            log.warning("slirp_api.remove_hostfwd_failed", error=str(e))
            return _error("remove_hostfwd: slirp_remove_hostfwd failed")
        del self.ids[fid]
        return {"return": {}}
