"""hostd's configuration: the virtual network's addresses and every limit, as one dataclass.

Defaults match gvproxy and Rancher Desktop (192.168.127.0/24, gateway .1 with MAC
5a:94:ef:e4:0c:dd, guest .2 for MAC 5a:94:ef:e4:0c:ee, host loopback at .254, MTU 1500)
so that guests and tools built for them work unchanged. Every address of the plan may be
set: slirp4netns's plan (10.0.2.0/24: guest .100, gateway and host loopback both .2, DNS .3,
DHCP .15-.30) is one such setting. Addresses left as None are derived in `__post_init__`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from hostd.stack.ethernet import parse_mac

DEFAULT_SUBNET = "192.168.127.0/24"
DEFAULT_GATEWAY_MAC = "5a:94:ef:e4:0c:dd"
DEFAULT_GUEST_MAC = "5a:94:ef:e4:0c:ee"
MIN_MTU = 576
MAX_MTU = 65520


@dataclass
class NetworkConfig:
    subnet: IPv4Network = field(default_factory=lambda: IPv4Network(DEFAULT_SUBNET))
    gateway_mac: bytes = parse_mac(DEFAULT_GATEWAY_MAC)
    mtu: int = 1500
    # .254 (the last usable address) reaches the host's 127.0.0.1, unless refused.
    host_loopback: bool = True
    static_leases: dict[str, IPv4Address] = field(default_factory=dict)
    dns_upstreams: list[tuple[str, int]] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    udp_idle_timeout: float = 90.0  # gvproxy's conntrack timeout
    udp_max_flows: int = 4096
    icmp_idle_timeout: float = 30.0
    icmp_max_flows: int = 1024
    reassembly_max_bytes: int = 4 << 20
    reassembly_timeout: float = 30.0
    lease_time: int = 3600
    tcp_connect_timeout: float = 30.0  # gvproxy's fix for #676 uses 30 s too
    tcp_max_pending: int = 1024
    # Guest connections in SYN_RECEIVED (dialling, or a gateway service's handshake) and
    # established ones, at once; each switch port may hold at most `tcp_port_share` of each.
    tcp_max_half_open: int = 4096
    tcp_max_connections: int = 65536
    tcp_port_share: float = 0.5
    tcp_buffer: int = 4 << 20
    tcp_time_wait: float = 60.0
    tcp_ack_delay: float = 0.002  # a reply from a loopback server usually comes sooner
    # The address plan (None: the gvproxy-derived default of the subnet). The gateway may be
    # the host-loopback address too (slirp4netns's .2); DNS may be an address of its own.
    gateway_ip: IPv4Address = None  # type: ignore[assignment]  # default: network + 1
    host_ip: IPv4Address = None  # type: ignore[assignment]  # default: broadcast - 1
    dns_ip: IPv4Address = None  # type: ignore[assignment]  # default: the gateway
    guest_ip: IPv4Address = None  # type: ignore[assignment]  # default: network + 2
    dhcp_range: tuple[IPv4Address, IPv4Address] | None = None  # default: net+3 .. broadcast-2

    def __post_init__(self) -> None:
        if self.subnet.prefixlen > 29:
            raise ValueError(f"subnet {self.subnet} is too small: need at least a /29")
        net = self.subnet
        if self.gateway_ip is None:
            self.gateway_ip = net.network_address + 1
        if self.host_ip is None:
            self.host_ip = net.broadcast_address - 1
        if self.dns_ip is None:
            self.dns_ip = self.gateway_ip
        if self.guest_ip is None:
            self.guest_ip = net.network_address + 2
        for name in ("gateway_ip", "host_ip", "dns_ip", "guest_ip"):
            ip = getattr(self, name)
            if not isinstance(ip, IPv4Address) or not (
                net.network_address < ip < net.broadcast_address
            ):
                raise ValueError(f"{name.replace('_ip', '')} address {ip} is not a host of {net}")
        if self.guest_ip in self.virtual_addresses:
            raise ValueError(f"guest address {self.guest_ip} is one of the switch's own")
        if self.dhcp_range is not None:
            first, last = self.dhcp_range
            if not (net.network_address < first <= last < net.broadcast_address):
                raise ValueError(f"DHCP range {first}-{last} is not a range of hosts of {net}")
        if not 0 < self.tcp_port_share <= 1:
            raise ValueError(f"TCP port share {self.tcp_port_share} out of range (0, 1]")
        if self.tcp_max_half_open < 1 or self.tcp_max_connections < 1:
            raise ValueError("TCP connection limits must be positive")
        if not 0 <= self.tcp_ack_delay <= 0.2:
            raise ValueError(f"TCP ACK delay {self.tcp_ack_delay} s out of range 0..0.2")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"MTU {self.mtu} out of range {MIN_MTU}..{MAX_MTU}")
        if not self.static_leases:
            self.static_leases = {DEFAULT_GUEST_MAC: self.guest_ip}
        for mac, ip in self.static_leases.items():
            if ip not in self.subnet or ip in self.virtual_addresses:
                raise ValueError(f"static lease {mac}={ip}: address not usable in {self.subnet}")

    @property
    def virtual_addresses(self) -> set[IPv4Address]:
        """The switch's own addresses (answered by ARP, never handed to a guest)."""
        return {self.gateway_ip, self.host_ip, self.dns_ip}


def parse_subnet(text: str) -> IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"bad subnet {text!r}: {e}") from None
    if not isinstance(net, IPv4Network):
        raise ValueError(f"bad subnet {text!r}: only IPv4 subnets are supported")
    return net


def parse_address(text: str, what: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise ValueError(f"bad {what} address {text!r}: expected an IPv4 address") from None


def parse_dhcp_range(text: str) -> tuple[IPv4Address, IPv4Address]:
    """'FIRST-LAST' (inclusive) → two addresses."""
    first, sep, last = text.partition("-")
    if not sep:
        raise ValueError(f"bad DHCP range {text!r}: expected FIRST-LAST")
    a, b = parse_address(first.strip(), "DHCP range"), parse_address(last.strip(), "DHCP range")
    if a > b:
        raise ValueError(f"bad DHCP range {text!r}: {a} is after {b}")
    return a, b
