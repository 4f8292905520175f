"""What several unit test files share: a switch port that records frames, a guest that has
announced itself on it, and a unix echo server. Loopback and private paths only."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from scapy.layers.l2 import ARP, Ether

if TYPE_CHECKING:
    from netferry.hostd.switch import HostSwitch

GW_MAC = "5a:94:ef:e4:0c:dd"
GUEST_MAC = "5a:94:ef:e4:0c:ee"
GUEST_IP = "192.168.127.2"


class CollectLink:
    """A switch port that keeps what the switch sends it."""

    vnet = False
    port = 0
    name = "collect"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_frames(self, frames: list[bytes]) -> None:
        self.sent += frames

    def close(self, reason: str | None = None) -> None:
        pass


def guest_link(sw: HostSwitch, mac: str = GUEST_MAC, ip: str = GUEST_IP) -> CollectLink:
    """A port whose guest has announced itself (ARP), so frames to it need no resolution."""
    link = CollectLink()
    sw.link_opened(link)  # type: ignore[arg-type]
    arp = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=mac, psrc=ip, pdst="192.168.127.1"
    )
    sw.link_frames(link, [bytes(arp)])  # type: ignore[arg-type]
    link.sent.clear()
    return link


async def unix_echo(path: str) -> asyncio.base_events.Server:
    """Echo every byte back until EOF, on a unix socket at `path`."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    return await asyncio.start_unix_server(handle, path)
