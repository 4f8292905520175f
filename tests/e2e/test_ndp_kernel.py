"""The IPv6 building blocks against the Linux kernel as the guest: a veth pair between a guest
namespace and a gateway namespace, where an AF_PACKET socket feeds the sans-IO NdpResponder,
ipv6.parse_ipv6, the Reassembler, ipv6.fragment and icmpv6 (no hostd: its wiring comes with
IPv6 integration). The kernel must take our router advertisement (SLAAC address, default
route, MTU), pass DAD for its own address, resolve the gateway by neighbour solicitation, get
echo replies from it, and exchange UDP datagrams large enough to be fragmented both ways."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from ipaddress import IPv6Address

import pytest

from netferry.hostd.config import NetworkConfig
from netferry.hostd.stack import ethernet, icmpv6, ipv6, ndp
from netferry.hostd.stack.checksum import transport_checksum_v6, verify_transport_v6
from tests.conftest import Netns, wait_for
from tests.e2e.netns_socket import socket_in_netns

pytestmark = pytest.mark.e2e

GUEST_MAC = "5a:94:ef:e4:0c:ee"
ETH_P_ALL = 0x0003
NDP_TYPES = (133, 134, 135, 136)
ECHO_PORT = 7
CLOSED_PORT = 9  # answered with ICMPv6 port unreachable
SMALL_PATH_PORT = 10  # as if the path beyond had MTU 1280: packet too big, else echoed
UDP = struct.Struct("!HHHH")


class GatewayAdapter:
    """Frames of the gateway's veth end → NDP and echo; replies framed and sent back."""

    def __init__(self, ns: Netns, config: NetworkConfig) -> None:
        self.config = config
        self.own = frozenset(a.packed for a in config.virtual_addresses6)
        self.responder = ndp.NdpResponder(
            config.gateway_mac, self.own, ndp.router_advertisement_for(config), time.monotonic()
        )
        self.sock = socket_in_netns(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("eth0", 0))
        self.echo_replies = 0
        self.reassembler = ipv6.Reassembler()
        self.udp_echoed = 0
        self.checksums_ok = 0
        self.errors_sent: dict[int, int] = {}
        self.small_path_fragmented = 0
        self.fragments_out = 0
        self._ident = 0
        self.dropped: dict[str, int] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _send(self, dst_mac: bytes, src: bytes, dst: bytes, message: bytes, hops: int) -> None:
        packet = ipv6.build_ipv6(src, dst, ipv6.NH_ICMPV6, message, hop_limit=hops)
        mac = self.config.gateway_mac
        self.sock.send(ethernet.build_frame(dst_mac, mac, ethernet.ETHERTYPE_IPV6, packet))

    def _udp_echo(self, dst_mac: bytes, pkt: ipv6.Ipv6Packet, reassembled: bool) -> None:
        seg = bytes(pkt.payload)
        sport, dport, length, _csum = UDP.unpack_from(seg)
        if length != len(seg):
            return
        too_big = not reassembled and len(pkt.raw) > ipv6.MIN_MTU
        if dport == CLOSED_PORT or (dport == SMALL_PATH_PORT and too_big):
            if dport == CLOSED_PORT:
                kind, code, param = icmpv6.DEST_UNREACHABLE, icmpv6.PORT_UNREACHABLE, 0
            else:
                kind, code, param = icmpv6.PACKET_TOO_BIG, 0, ipv6.MIN_MTU
            assert icmpv6.may_send_error(pkt.src, pkt.dst, kind, code)
            err = icmpv6.build_error(pkt.dst, pkt.src, kind, code, pkt.raw, param)
            self.errors_sent[kind] = self.errors_sent.get(kind, 0) + 1
            self._send(dst_mac, pkt.dst, pkt.src, err, 64)
            return
        if dport not in (ECHO_PORT, SMALL_PATH_PORT):
            return
        self.small_path_fragmented += dport == SMALL_PATH_PORT and reassembled
        if reassembled:
            # a datagram the kernel fragmented had its checksum computed in full (an unfragmented
            # one leaves veth with only the pseudo-header part: checksum offload)
            self.checksums_ok += verify_transport_v6(pkt.src, pkt.dst, ipv6.NH_UDP, seg)
        reply = bytearray(UDP.pack(dport, sport, length, 0) + seg[8:])
        csum = transport_checksum_v6(pkt.dst, pkt.src, ipv6.NH_UDP, reply) or 0xFFFF
        reply[6:8] = csum.to_bytes(2, "big")
        self._ident += 1
        packets = ipv6.fragment(
            pkt.dst, pkt.src, ipv6.NH_UDP, bytes(reply), self.config.mtu, self._ident
        )
        self.fragments_out += len(packets) if len(packets) > 1 else 0
        mac = self.config.gateway_mac
        for p in packets:
            self.sock.send(ethernet.build_frame(dst_mac, mac, ethernet.ETHERTYPE_IPV6, p))
        self.udp_echoed += 1

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for r in self.responder.handle_timer(now):
                    self._send(r.dst_mac, r.src, r.dst, r.message, r.hop_limit)
                wait = max(0.0, min(0.1, self.responder.next_deadline() - now))
                if select.select([self.sock], [], [], wait)[0]:
                    frame, addr = self.sock.recvfrom(65535)
                    if addr[2] != socket.PACKET_OUTGOING:
                        self._frame(frame, time.monotonic())
        except BaseException as e:  # surfaced by the test
            self.errors.append(e)

    def _frame(self, frame: bytes, now: float) -> None:
        _dst_mac, src_mac, ethertype = ethernet.HEADER.unpack_from(frame)
        if ethertype != ethernet.ETHERTYPE_IPV6:
            return
        try:
            pkt = ipv6.parse_ipv6(memoryview(frame)[ethernet.HEADER_LEN :])
        except ipv6.Ipv6Error as e:
            self.dropped[e.args[0]] = self.dropped.get(e.args[0], 0) + 1
            return
        reassembled = pkt.fragment is not None
        if reassembled:
            whole = self.reassembler.add(pkt, now)
            if whole is None:
                return
            pkt = whole
        if pkt.next_header == ipv6.NH_UDP and pkt.dst in self.responder.own_addresses:
            self._udp_echo(src_mac, pkt, reassembled)
            return
        if pkt.next_header != ipv6.NH_ICMPV6 or len(pkt.payload) < 8:
            return
        kind = pkt.payload[0]
        if kind in NDP_TYPES:
            for r in self.responder.handle(
                src_mac, pkt.src, pkt.dst, pkt.hop_limit, pkt.payload, now
            ):
                self._send(r.dst_mac or src_mac, r.src, r.dst, r.message, r.hop_limit)
        elif kind == icmpv6.ECHO_REQUEST and pkt.dst in self.responder.own_addresses:
            msg = icmpv6.parse_icmpv6(pkt.src, pkt.dst, pkt.payload)
            reply = icmpv6.build_echo_reply(pkt.dst, pkt.src, msg.ident, msg.seq, bytes(msg.body))
            self.echo_replies += 1
            self._send(src_mac, pkt.dst, pkt.src, reply, 64)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


UDP_CLIENT = """
import hashlib, random, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(5)
rng = random.Random(15)
sizes = [1, 1352, 1353, 8000] + [rng.randint(1, 8000) for _ in range(296)]
for n in sizes:
    data = rng.randbytes(n)
    s.sendto(data, (sys.argv[1], int(sys.argv[2])))
    try:
        got, _ = s.recvfrom(65535)
    except TimeoutError:
        sys.exit(f"no echo of {n} bytes")
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), n
print(len(sizes), "ok")
"""

ERRORS_CLIENT = """
import errno, socket, sys, time
gw = sys.argv[1]
IPV6_MTU, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT = 24, 23, 0  # <linux/in6.h>
closed = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
closed.connect((gw, int(sys.argv[2])))
closed.settimeout(5)
closed.send(b"anyone?")
try:
    closed.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("silence")
path = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
path.connect((gw, int(sys.argv[3])))
path.settimeout(5)
path.send(b"p" * 1300)  # 1348 bytes on a 1400 link: fits, but not the path beyond
deadline = time.monotonic() + 10
while path.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU) != 1280:
    if time.monotonic() > deadline:
        sys.exit("path MTU never became 1280")
    time.sleep(0.05)
print("pmtu", path.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU))
try:
    path.send(b"q" * 1300)
    print("sent")
except OSError as e:  # the kernel reports the smaller path to the sender first
    print(errno.errorcode[e.errno])
path.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DONT)
path.send(b"r" * 1300)  # now fragmented to fit 1280
print("echo", len(path.recv(2000)))
"""


def test_kernel_slaac_default_route_mtu_dad_and_ping(netns):
    gw, guest = netns(), netns()
    # the gateway namespace's own kernel stays out of IPv6: only the adapter answers there
    for key in ("all", "default"):
        gw.run("sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1")
        guest.run("sysctl", "-q", "-w", f"net.ipv6.conf.{key}.addr_gen_mode=0")  # EUI-64
    gw.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", guest.name)
    gw.run("ip", "link", "set", "eth0", "address", "5a:94:ef:e4:0c:dd", "up")
    guest.run("ip", "link", "set", "eth0", "address", GUEST_MAC)
    config = NetworkConfig(mtu=1400, dns_search=["netferry.internal"])
    adapter = GatewayAdapter(gw, config)
    try:
        guest.run("ip", "link", "set", "eth0", "up")
        slaac = "fd00:192:168:127:5894:efff:fee4:cee"  # the prefix + EUI-64 of GUEST_MAC

        def configured() -> bool:
            out = guest.run("ip", "-6", "-o", "addr", "show", "dev", "eth0").stdout
            return f"inet6 {slaac}/64" in out and "tentative" not in out

        wait_for(configured, 60, "the guest kernel's SLAAC address to pass DAD")
        out = guest.run("ip", "-6", "-o", "addr", "show", "dev", "eth0").stdout
        assert "dadfailed" not in out and "scope global dynamic" in out
        route = guest.run("ip", "-6", "route", "show", "default").stdout
        assert f"default via {config.gateway6_link_local} dev eth0 proto ra" in route, route
        assert guest.run("cat", "/proc/sys/net/ipv6/conf/eth0/mtu").stdout.strip() == "1400"
        for target in (str(config.gateway6), str(config.host6)):
            r = guest.run("ping", "-6", "-c", "2", "-i", "0.2", "-W", "3", target, check=False)
            assert r.returncode == 0 and "2 received" in r.stdout, r.stdout + r.stderr
        r = guest.run("ping", "-6", "-c", "1", "-W", "3", f"{config.gateway6_link_local}%eth0")
        assert "1 received" in r.stdout
        neigh = guest.run("ip", "-6", "neigh", "show", "dev", "eth0").stdout
        assert f"{config.gateway6} lladdr 5a:94:ef:e4:0c:dd router" in neigh, neigh
        # UDP of 1..8000 bytes: the kernel fragments above 1352 bytes of payload at MTU 1400,
        # we reassemble, echo, and fragment the echo, which the kernel must reassemble
        r = guest.python(UDP_CLIENT, str(config.gateway6), str(ECHO_PORT))
        assert r.stdout.split() == ["300", "ok"], r.stdout + r.stderr
        # ICMPv6 errors as a kernel reads them: port unreachable → ECONNREFUSED on a connected
        # socket; packet too big → the socket's path MTU drops to 1280 and the next datagram
        # bigger than that fails with EMSGSIZE (the kernel's answer to a smaller path); allowed
        # to fragment, the kernel then sends it in 1280-byte fragments, which we reassemble
        r = guest.python(
            ERRORS_CLIENT, str(config.gateway6), str(CLOSED_PORT), str(SMALL_PATH_PORT)
        )
        want = ["refused", "pmtu", "1280", "EMSGSIZE", "echo", "1300"]
        assert r.stdout.split() == want, r.stdout + r.stderr
    finally:
        adapter.close()
    assert not adapter.errors
    stats = adapter.responder.stats
    assert stats["ndp_ra_out"] >= 1 and stats["ndp_na_out"] >= 2 and adapter.echo_replies >= 5
    learned = {IPv6Address(ip) for ip, mac in adapter.responder.cache.items()}
    assert IPv6Address(slaac) in learned
    assert stats.get("ndp_spoof_dropped", 0) == 0 and not adapter.dropped
    assert adapter.udp_echoed == 301 and adapter.fragments_out > 0
    assert adapter.small_path_fragmented == 1  # the kernel fragmented for the 1280 path
    assert adapter.reassembler.stats["reassembled"] > 0 and adapter.reassembler.held_bytes == 0
    assert adapter.checksums_ok == adapter.reassembler.stats["reassembled"]
    assert adapter.errors_sent == {icmpv6.DEST_UNREACHABLE: 1, icmpv6.PACKET_TOO_BIG: 1}
