"""Link URIs: how `host-switch --listen` and `vm-switch --connect` name a frame transport.

    unix:///path           stream, 4-byte big-endian length (QEMU -netdev stream, passt)
    tcp://HOST:PORT        stream, same framing (QEMU -netdev socket)
    unixpacket:///path     SOCK_SEQPACKET, one frame per packet (UML's bess)
    unixgram:///path       SOCK_DGRAM, one frame per datagram (vfkit); peer learned on receive
    vsock://[CID]:PORT     AF_VSOCK stream (CID optional when listening)
    fd://N                 an inherited socket; stream or packet by its SO_TYPE
    tapfd://N              an inherited tap device fd (hostd reads and writes the guest's
                           tap itself: `netferry run` gets it from inside the namespace)
    stdio://               standard input/output as a stream (2-byte LE length by default,
                           as gvproxy's -listen-stdio and gvforwarder's stdio: speak)

Stream links take ``?framing=len32be|len16le``; any link takes ``?max-frame=N``.
Between netferry's own ends (vm-switch dialling hostd over a stream link) a 10-byte
virtio-net header before every frame (checksum and segmentation offload) is negotiated by
the capability exchange in `netferry.linkcaps`; ``?offload=vnet`` forces it on (both ends
must then say it, and nothing is negotiated), ``?offload=none`` keeps plain frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from netferry.framing import FRAMINGS, MAX_FRAME

STREAM_SCHEMES = {"unix", "tcp", "vsock", "stdio"}
PACKET_SCHEMES = {"unixpacket", "unixgram"}
SCHEMES = STREAM_SCHEMES | PACKET_SCHEMES | {"fd", "tapfd"}
VMADDR_CID_ANY = 0xFFFFFFFF


@dataclass(frozen=True)
class LinkUri:
    scheme: str
    path: str = ""  # unix, unixpacket, unixgram
    host: str = ""  # tcp
    port: int = 0  # tcp, vsock
    cid: int | None = None  # vsock; None = any (listen) / required (connect)
    fd: int = -1  # fd
    framing: str = "len32be"
    max_frame: int = MAX_FRAME
    vnet: bool = False  # ?offload=vnet: every frame carries a virtio-net header
    offload: str = ""  # the ?offload= value: "" (negotiate), "vnet" or "none"
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.scheme + "://"


def parse_link_uri(text: str) -> LinkUri:
    """Parse a link URI; ValueError says what is wrong and what was expected."""
    if "://" not in text:
        raise ValueError(f"link URI {text!r} has no scheme: expected one of {_schemes()}")
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"link URI {text!r}: unknown scheme {scheme!r}, expected {_schemes()}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"framing", "max-frame", "offload"}
    if unknown:
        raise ValueError(f"link URI {text!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
    framing = "len16le" if scheme == "stdio" else "len32be"
    if "framing" in query:
        framing = query["framing"][-1]
        if framing not in FRAMINGS:
            raise ValueError(
                f"link URI {text!r}: framing {framing!r} is not one of {', '.join(FRAMINGS)}"
            )
        if scheme in PACKET_SCHEMES:
            raise ValueError(f"link URI {text!r}: {scheme} carries bare frames, no framing")
    max_frame = MAX_FRAME
    if "max-frame" in query:
        try:
            max_frame = int(query["max-frame"][-1])
        except ValueError:
            raise ValueError(f"link URI {text!r}: max-frame must be an integer") from None
        if not 64 <= max_frame <= MAX_FRAME:
            raise ValueError(f"link URI {text!r}: max-frame must be in 64..{MAX_FRAME}")
    offload = ""
    if "offload" in query:
        offload = query["offload"][-1]
        if offload not in ("vnet", "none"):
            raise ValueError(f"link URI {text!r}: offload must be 'vnet' or 'none'")
    common = {
        "framing": framing,
        "max_frame": max_frame,
        "text": text,
        "vnet": offload == "vnet",
        "offload": offload,
    }
    if scheme in {"unix", "unixpacket", "unixgram"}:
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
        if not path:
            raise ValueError(f"link URI {text!r}: missing socket path (unix:///path)")
        return LinkUri(scheme, path=path, **common)
    if scheme == "tcp":
        try:
            host, port = parts.hostname, parts.port
        except ValueError as e:
            raise ValueError(f"link URI {text!r}: bad port ({e})") from None
        if not host or port is None:
            raise ValueError(f"link URI {text!r}: expected tcp://HOST:PORT")
        return LinkUri(scheme, host=host, port=port, **common)
    if scheme == "vsock":
        netloc = parts.netloc
        cid_text, sep, port_text = netloc.rpartition(":")
        if not sep:
            cid_text, port_text = "", netloc
        try:
            port = int(port_text)
            cid = int(cid_text) if cid_text else None
        except ValueError:
            raise ValueError(f"link URI {text!r}: expected vsock://[CID]:PORT") from None
        if not 0 < port < 2**32 or (cid is not None and not 0 <= cid < 2**32):
            raise ValueError(f"link URI {text!r}: CID and port must be 32-bit unsigned")
        return LinkUri(scheme, port=port, cid=cid, **common)
    if scheme in ("fd", "tapfd"):
        try:
            fd = int(parts.netloc)
        except ValueError:
            raise ValueError(f"link URI {text!r}: expected {scheme}://N") from None
        if fd < 0:
            raise ValueError(f"link URI {text!r}: fd must be >= 0")
        return LinkUri(scheme, fd=fd, **common)
    return LinkUri(scheme, **common)  # stdio


def _schemes() -> str:
    return ", ".join(sorted(SCHEMES))
