"""A deterministic, lossy relay between vm-switch and hostd (4-byte BE framing).

    python lossy_link.py LISTEN_PATH HOSTD_PATH SEED

Frames that carry TCP payload are dropped, duplicated or swapped with the next one at
fixed, seeded rates in both directions; everything else passes untouched (so DHCP, ARP
and the handshake stay reliable). Counts are printed on stdout when a side closes.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import threading

DROP, DUP, SWAP = 0.02, 0.02, 0.03


def frames(sock: socket.socket):
    buf = b""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return
        buf += data
        while len(buf) >= 4:
            (n,) = struct.unpack_from("!I", buf)
            if len(buf) < 4 + n:
                break
            yield buf[4 : 4 + n]
            buf = buf[4 + n :]


def carries_tcp_payload(f: bytes) -> bool:
    if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6:
        return False
    ihl = (f[14] & 0x0F) * 4
    total = struct.unpack_from("!H", f, 16)[0]
    doff = (f[14 + ihl + 12] >> 4) * 4
    return total - ihl - doff > 0


def pump(src: socket.socket, dst: socket.socket, rng: random.Random, counts: dict) -> None:
    held: bytes | None = None
    try:
        for f in frames(src):
            out = [f]
            if carries_tcp_payload(f):
                r = rng.random()
                if r < DROP:
                    counts["dropped"] += 1
                    out = []
                elif r < DROP + DUP:
                    counts["duplicated"] += 1
                    out = [f, f]
                elif r < DROP + DUP + SWAP and held is None:
                    counts["reordered"] += 1
                    held = f
                    continue
            if held is not None and out:
                out.append(held)  # the held frame goes after its successor
                held = None
            dst.sendall(b"".join(struct.pack("!I", len(x)) + x for x in out))
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main() -> None:
    listen_path, hostd_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(listen_path)
    srv.listen(1)
    print("ready", flush=True)
    guest, _ = srv.accept()
    host = socket.socket(socket.AF_UNIX)
    host.connect(hostd_path)
    counts = {"dropped": 0, "duplicated": 0, "reordered": 0}
    threads = [
        threading.Thread(target=pump, args=(guest, host, random.Random(seed), counts)),
        threading.Thread(target=pump, args=(host, guest, random.Random(seed + 1), counts)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    os.unlink(listen_path)


if __name__ == "__main__":
    main()
