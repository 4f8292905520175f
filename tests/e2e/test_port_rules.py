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
            "sh", "-c", f"curl -sS --fail --max-time 200 '{url}' | sha256sum", timeout=220
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
