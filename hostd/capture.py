"""pcap (libpcap classic format, LINKTYPE_ETHERNET) writing for `--pcap` and live capture.

Every frame that enters the switch from a link and every frame the gateway originates is
recorded once, with the wall-clock time it was handled. tshark and Wireshark read it.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from typing import BinaryIO

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


def pcap_header(snaplen: int = SNAPLEN) -> bytes:
    return _GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET)


def pcap_record(frame: bytes, ts: float, snaplen: int = SNAPLEN) -> bytes:
    sec = int(ts)
    usec = int((ts - sec) * 1_000_000)
    data = frame[:snaplen]
    return _RECORD.pack(sec, usec, len(data), len(frame)) + data


class PcapWriter:
    def __init__(self, stream: BinaryIO, snaplen: int = SNAPLEN) -> None:
        self.stream = stream
        self.snaplen = snaplen
        self.frames = 0
        stream.write(pcap_header(snaplen))

    @classmethod
    def open(cls, path: str) -> PcapWriter:
        return cls(open(path, "wb"))

    def write(self, frames: list[bytes], ts: float | None = None) -> None:
        if ts is None:
            ts = time.time()
        snaplen = self.snaplen
        self.stream.write(b"".join(pcap_record(f, ts, snaplen) for f in frames))
        self.frames += len(frames)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


class CaptureFilter:
    """The simple BPF-like filter of live captures: protocol ("tcp", "udp", "icmp", "arp" or
    None), host (IPv4 or IPv6 text, or "") and port (0: any). Unset fields match everything.

    IPv6 frames are matched the same way: "icmp" means ICMP and ICMPv6 (so NDP too), the
    transport is found by walking the extension headers (bounded), and a host matches the
    source or destination address of either family; ARP frames carry only IPv4 addresses."""

    PROTOCOL_NUMBERS = {"tcp": (6,), "udp": (17,), "icmp": (1, 58)}
    # IPv6 extension headers walked to the transport (hop-by-hop, routing, destination
    # options; fragment handled apart); at most this many, as a malformed chain may loop
    EXTENSIONS = frozenset({0, 43, 60})
    MAX_EXTENSIONS = 8

    def __init__(self, protocol: str | None, host: str, port: int) -> None:
        self.proto = protocol
        # ValueError: bad host
        self.host = ipaddress.ip_address(host).packed if host else None
        self.port = port

    def match(self, frame: bytes) -> bool:
        if len(frame) < 14:
            return self.proto is None and not self.host and not self.port
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype == 0x0806:
            if self.proto not in (None, "arp") or self.port:
                return False
            return self.host is None or self.host in (frame[28:32], frame[38:42])
        if ethertype == 0x86DD:
            return self._match_v6(frame)
        if ethertype != 0x0800 or len(frame) < 34:
            return self.proto is None and not self.host and not self.port
        if self.proto == "arp":
            return False
        proto = frame[23]
        if self.proto is not None and proto not in self.PROTOCOL_NUMBERS[self.proto]:
            return False
        if self.host is not None and self.host not in (frame[26:30], frame[30:34]):
            return False
        return self._match_port(frame, proto, 14 + (frame[14] & 0x0F) * 4, True)

    def _match_port(self, frame: bytes, proto: int, off: int, first: bool) -> bool:
        if not self.port:
            return True
        if proto not in (6, 17) or not first or len(frame) < off + 4:
            return False
        sport, dport = struct.unpack_from("!HH", frame, off)
        return self.port in (sport, dport)

    def _match_v6(self, frame: bytes) -> bool:
        if len(frame) < 54:
            return self.proto is None and not self.host and not self.port
        if self.proto == "arp":
            return False
        if self.host is not None and self.host not in (frame[22:38], frame[38:54]):
            return False
        proto, off, first = frame[20], 54, True
        for _ in range(self.MAX_EXTENSIONS):
            if proto == 44 and len(frame) >= off + 8:  # fragment: only the first has ports
                first = first and int.from_bytes(frame[off + 2 : off + 4], "big") >> 3 == 0
                proto, off = frame[off], off + 8
            elif proto in self.EXTENSIONS and len(frame) >= off + 2:
                proto, off = frame[off], off + (frame[off + 1] + 1) * 8
            else:
                break
        if self.proto is not None and proto not in self.PROTOCOL_NUMBERS[self.proto]:
            return False
        return self._match_port(frame, proto, off, first)


class CaptureBuffer:
    """Records queued for one live-capture client, bounded in bytes: a client that reads
    slowly (or not at all) costs at most `max_bytes`; what does not fit is dropped and
    counted. `take` hands them out in messages of at most `max_message` bytes, well under
    gRPC's 4 MiB default message limit."""

    def __init__(self, max_bytes: int = 4 << 20, max_message: int = 1 << 20) -> None:
        from collections import deque

        self.records: deque[bytes] = deque()
        self.bytes = 0
        self.max_bytes = max_bytes
        self.max_message = max_message
        self.dropped = 0

    def put(self, record: bytes) -> None:
        if self.bytes + len(record) > self.max_bytes:
            self.dropped += 1
            return
        self.records.append(record)
        self.bytes += len(record)

    def take(self, max_records: int = 0) -> tuple[bytes, int]:
        """(joined records, how many): at least one record when any is queued."""
        out: list[bytes] = []
        size = 0
        records = self.records
        while records and (not max_records or len(out) < max_records):
            if out and size + len(records[0]) > self.max_message:
                break
            record = records.popleft()
            out.append(record)
            size += len(record)
        self.bytes -= size
        return b"".join(out), len(out)
