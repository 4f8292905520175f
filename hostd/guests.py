"""hostd's side of the guest handshake (`host-switch --guest URI`, repeatable).

For each guest, a task calls `netferry.v1.Guest/Handshake` on the guest's network-setup and
keeps it connected:

- The guest is reached at `unix:///path` (namespace mode) or `vsock://CID:PORT` (a VM).
  grpcio cannot dial vsock, so for vsock a private unix socket (in a 0700 temp directory) is
  bridged to a fresh vsock connection per gRPC connection. Nothing else dials vsock.
- The request offers the data address the guest must dial: `--guest-data URI`, else the first
  `--listen` that a guest can dial (`unix://` as is; `vsock://[CID]:PORT` offered as
  `vsock://2:PORT`, the host's CID; `tcp://` as is), with its `?framing=`.
- Retries: UNAVAILABLE, DEADLINE_EXCEEDED and the like are retried with backoff (0.2 s
  doubling to 5 s, forever); FAILED_PRECONDITION (incompatible versions) is logged as an
  error and retried every 30 s, so upgrading the guest heals it without restarting hostd.
- Which link is the guest's: the guest dials the data address before it answers, so the link
  that comes up on the data endpoint during the call is attributed to that guest (handshakes
  on one endpoint are serialised so two guests' links cannot be confused). No link within
  10 s means a phantom handshake (Rancher Desktop #10239): it is redone.
- Link drops (`link_down` in `switch.event_listeners`): network-setup redials on its own when
  its vm-switch exits; if a new link on the endpoint comes up within 3 s it is attributed
  and nothing else happens, otherwise the handshake is redone (with the same backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING

import grpc
import structlog

from netferry.streams import splice
from netferry.uri import LinkUri, parse_link_uri
from netferry.v1 import guest_pb2 as pb
from netferry.v1 import guest_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from netferry.hostd.switch import HostSwitch

log = structlog.get_logger("hostd.guests")

# The handshake protocol hostd speaks (guestd/network_setup.py has the same constant).
PROTOCOL_VERSION = 1
OFFERED_OFFLOADS = ("vnet_hdr",)  # virtio-net headers on the data link
ATTRIBUTE_TIMEOUT = 10.0  # seconds for the guest's data link to appear after a handshake
REDIAL_GRACE = 3.0  # seconds for the guest's own redial after its link drops
HOST_CID = 2


def version() -> str:
    try:
        return metadata.version("netferry")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def parse_guest_uri(text: str) -> LinkUri:
    uri = parse_link_uri(text)
    if uri.scheme == "vsock" and uri.cid is None:
        raise ValueError(f"--guest {text}: a vsock guest needs its CID (vsock://CID:PORT)")
    if uri.scheme not in ("unix", "vsock"):
        raise ValueError(f"--guest {text}: expected unix:///path or vsock://CID:PORT")
    return uri


def offered_data_address(listen: list[str], explicit: str | None) -> tuple[str, str]:
    """(data address to offer, link-name prefix of the endpoint it reaches)."""
    if explicit:
        want = parse_link_uri(explicit)
        for text in listen:
            uri = parse_link_uri(text)
            same = (uri.scheme, uri.path, uri.port) == (want.scheme, want.path, want.port)
            if same or (uri.scheme == want.scheme == "vsock" and uri.port == want.port):
                return explicit, f"{text}#"
        return explicit, ""  # not one of ours by name: any link on any endpoint counts
    for text in listen:
        uri = parse_link_uri(text)
        if uri.scheme in ("unix", "tcp"):
            return text, f"{text}#"
        if uri.scheme == "vsock":
            query = text.partition("?")[2]
            return f"vsock://{HOST_CID}:{uri.port}" + (f"?{query}" if query else ""), f"{text}#"
    raise ValueError("--guest needs a unix://, tcp:// or vsock:// --listen (or --guest-data)")


def validate_args(args) -> None:  # type: ignore[no-untyped-def]
    """For hostd's main: ValueError names the bad flag."""
    for text in getattr(args, "guest", None) or []:
        parse_guest_uri(text)
    if getattr(args, "guest", None):
        offered_data_address(args.listen, getattr(args, "guest_data", None))


class VsockDialBridge:
    """A private unix socket whose every connection is piped to a new vsock connection."""

    def __init__(self, cid: int, port: int, dial: Callable[[], socket.socket] | None = None):
        self.cid = cid
        self.port = port
        self.dial = dial or self._dial_vsock
        self.dir = tempfile.mkdtemp(prefix="netferry-guest-")
        self.path = os.path.join(self.dir, "bridge.sock")
        self.server: asyncio.base_events.Server | None = None
        self.last_error: str | None = None  # why the last dial failed (gRPC sees only EOF)

    def _dial_vsock(self) -> socket.socket:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((self.cid, self.port))
        except BaseException:
            s.close()
            raise
        s.setblocking(False)
        return s

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._handle, self.path)
        os.chmod(self.path, 0o600)

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(None, self.dial)
            sock.setblocking(False)
            vr, vw = await asyncio.open_connection(sock=sock)
        except OSError as e:
            self.last_error = f"vsock://{self.cid}:{self.port}: {e.strerror or e}"
            log.info("guest.bridge_dial_failed", cid=self.cid, port=self.port, error=str(e))
            w.close()
            return
        self.last_error = None

        await splice(r, w, vr, vw)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def handshake_failure_cause(e: grpc.aio.AioRpcError, bridge: VsockDialBridge | None) -> str:
    """Why a handshake failed, for the same log line: gRPC says only "Socket closed" when
    the vsock bridge could not dial; the bridge knows why. Else gRPC's own detail."""
    if bridge is not None and bridge.last_error:
        return bridge.last_error
    debug = e.debug_error_string() or ""
    for marker in ("last error: ", 'description:"', 'grpc_message:"'):
        if marker in debug:
            return debug.split(marker, 1)[1].split('"', 1)[0].strip()[:300]
    return (e.details() or e.code().name)[:300]


class GuestClient:
    """Handshakes with one guest and redoes it when the guest's data link is lost."""

    def __init__(self, manager: GuestManager, text: str) -> None:
        self.manager = manager
        self.text = text
        self.uri = parse_guest_uri(text)
        self.events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.link: str | None = None
        self.handshakes = 0
        self.last_response: pb.HandshakeResponse | None = None
        self.bridge: VsockDialBridge | None = None
        self.channel: grpc.aio.Channel | None = None

    def on_event(self, kind: str, fields: dict) -> None:
        if kind in ("link_up", "link_down") and str(fields.get("link", "")).startswith(
            self.manager.prefix
        ):
            self.events.put_nowait((kind, fields["link"]))

    async def _target(self) -> str:
        if self.uri.scheme == "unix":
            return f"unix:{self.uri.path}"
        if self.bridge is None:
            assert self.uri.cid is not None
            self.bridge = VsockDialBridge(self.uri.cid, self.uri.port)
            await self.bridge.start()
        return f"unix:{self.bridge.path}"

    async def handshake(self) -> pb.HandshakeResponse:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(await self._target())
        stub = pb_grpc.GuestStub(self.channel)
        cfg = self.manager.switch.config
        req = pb.HandshakeRequest(
            host_id=self.manager.host_id,
            host_version=version(),
            protocol_version=PROTOCOL_VERSION,
            subnet=str(cfg.subnet),
            mtu=cfg.mtu,
            # The data link negotiates these itself (netferry.linkcaps); a guest that does
            # not accept them runs vm-switch with ?offload=none.
            offered_offloads=list(OFFERED_OFFLOADS),
            data_address=self.manager.data_address,
            session=uuid.uuid4().hex,
        )
        resp = await stub.Handshake(req, timeout=30, wait_for_ready=False)
        if resp.session != req.session:
            raise RuntimeError(f"stale answer: session {resp.session!r} != {req.session!r}")
        return resp

    async def _next_link_up(self, timeout: float) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                kind, name = await asyncio.wait_for(self.events.get(), left)
            except TimeoutError:
                return None
            if kind == "link_up":
                return name
        return None

    async def run(self) -> None:
        backoff = 0.2
        while True:
            async with self.manager.lock:  # one handshake per data endpoint at a time
                while not self.events.empty():
                    self.events.get_nowait()
                try:
                    resp = await self.handshake()
                except grpc.aio.AioRpcError as e:
                    slow = e.code() == grpc.StatusCode.FAILED_PRECONDITION
                    delay = 30.0 if slow else backoff
                    (log.error if slow else log.info)(
                        "guest.handshake_failed",
                        guest=self.text,
                        code=e.code().name,
                        message=e.details(),
                        cause=handshake_failure_cause(e, self.bridge),
                        retry_in=delay,
                    )
                    backoff = min(backoff * 2, 5.0)
                    await asyncio.sleep(delay)
                    continue
                except (OSError, RuntimeError) as e:
                    log.info("guest.handshake_failed", guest=self.text, error=str(e))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                self.handshakes += 1
                self.last_response = resp
                link = await self._next_link_up(ATTRIBUTE_TIMEOUT)
            if link is None:
                log.warning("guest.no_data_link", guest=self.text, waited=ATTRIBUTE_TIMEOUT)
                continue
            backoff = 0.2
            self.link = link
            log.info(
                "guest.connected",
                guest=self.text,
                guest_id=resp.guest_id,
                guest_version=resp.guest_version,
                mac=resp.mac,
                namespace=resp.namespace,
                offloads=",".join(resp.accepted_offloads) or "none",
                link=link,
                data_address=self.manager.data_address,
            )
            self.manager.switch.emit_event("guest_connected", guest=self.text, link=link)
            while link is not None:
                kind, name = await self.events.get()
                if kind != "link_down" or name != link:
                    continue
                log.info("guest.link_down", guest=self.text, link=link, grace=REDIAL_GRACE)
                link = await self._next_link_up(REDIAL_GRACE)
                if link is not None:
                    self.link = link
                    log.info("guest.redialled", guest=self.text, link=link)
            self.link = None

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.bridge is not None:
            await self.bridge.close()


class GuestManager:
    """Every `--guest`: one GuestClient task each, fed by the switch's link events."""

    def __init__(self, switch: HostSwitch, guests: list[str], listen: list[str],
                 guest_data: str | None = None) -> None:  # fmt: skip
        self.switch = switch
        self.data_address, self.prefix = offered_data_address(listen, guest_data)
        self.host_id = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.lock = asyncio.Lock()
        self.clients = [GuestClient(self, text) for text in guests]
        self.tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_args(cls, switch: HostSwitch, args) -> GuestManager | None:  # type: ignore[no-untyped-def]
        if not getattr(args, "guest", None):
            return None
        return cls(switch, args.guest, args.listen, getattr(args, "guest_data", None))

    def _on_event(self, kind: str, fields: dict) -> None:
        for c in self.clients:
            c.on_event(kind, fields)

    def start(self) -> None:
        self.switch.event_listeners.append(self._on_event)
        loop = asyncio.get_running_loop()
        for c in self.clients:
            self.tasks.append(loop.create_task(c.run(), name=f"guest {c.text}"))
        log.info("guests.started", guests=[c.text for c in self.clients],
                 data_address=self.data_address, host_id=self.host_id)  # fmt: skip

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.switch.event_listeners.remove(self._on_event)
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for c in self.clients:
            await c.close()
