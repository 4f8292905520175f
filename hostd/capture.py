"""pcap (libpcap classic format, LINKTYPE_ETHERNET) writing for `--pcap` and live capture.

Every frame that enters the switch from a link and every frame the gateway originates is
recorded once, with the wall-clock time it was handled. tshark and Wireshark read it.
"""

from __future__ import annotations

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
