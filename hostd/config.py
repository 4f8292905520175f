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
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from netferry.hostd.stack.ethernet import parse_mac
from netferry.hostd.stack.ipv6 import link_local_from_mac

DEFAULT_SUBNET = "192.168.127.0/24"
DEFAULT_GATEWAY_MAC = "5a:94:ef:e4:0c:dd"
DEFAULT_GUEST_MAC = "5a:94:ef:e4:0c:ee"
MIN_MTU = 576
MAX_MTU = 65520
RA_INTERVAL_MIN = 4.0  # --ra-interval's range: RFC 4861 6.2.1's MaxRtrAdvInterval
RA_INTERVAL_MAX = 1800.0

# ---- IPv6 address plan (issue 15) -----------------------------------------------------------
# A ULA /64 that mirrors the IPv4 default's digits; /64 because SLAAC (RFC 4862) forms 64-bit
# interface identifiers. slirp4netns's own plan is `slirp4netns_plan6()`.
DEFAULT_SUBNET6 = "fd00:192:168:127::/64"
SLIRP4NETNS_SUBNET6 = "fd00::/64"


def slirp4netns_plan6(subnet6: IPv6Network | None = None) -> dict[str, object]:
    """slirp4netns's IPv6 plan as NetworkConfig fields: guest ::100, gateway and host ::2,
    DNS ::3 (of fd00::/64 unless another /64 is given)."""
    net = subnet6 or IPv6Network(SLIRP4NETNS_SUBNET6)
    base = net.network_address
    return {
        "subnet6": net,
        "gateway6": base + 2,
        "host6": base + 2,
        "dns6": base + 3,
        "guest6": base + 0x100,
    }


# ---- end of the IPv6 address plan constants -------------------------------------------------


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
    # IPv4 and IPv6 fragment reassembly, each: bytes held at once and how long a partial
    # datagram waits for its missing fragments (IPv6: at least 1 s).
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
    # The part of a full UDP or ICMP flow table beyond which a guest's new flow evicts its
    # own oldest (not another guest's): a guest opening flows without end evicts its own.
    flow_guest_share: float = 0.5
    tcp_buffer: int = 4 << 20
    tcp_time_wait: float = 60.0
    tcp_ack_delay: float = 0.002  # a reply from a loopback server usually comes sooner
    # Host sockets guests may hold at once (None: the descriptor limit less a reserve,
    # hostd/nat/budget.py) and each guest's share of them (None: half). A guest is its switch
    # port (Network.guest_owner), for the flow tables' `flow_guest_share` too.
    max_connections: int | None = None
    max_connections_per_guest: int | None = None
    # Port security (issue 16.1): addresses bound to the port DHCP or first use gave them,
    # MACs per port bounded and never taken from a live port. Off: for setups that bridge.
    port_security: bool = True
    port_max_macs: int = 64  # MACs one port may use (with port security)
    port_max_leases: int = 16  # DHCP offers and leases, and bound addresses, per port (0: any)
    mac_age: float = 300.0  # a MAC unseen this long may be replaced or move (Linux bridge's)
    # The address plan (None: the gvproxy-derived default of the subnet). The gateway may be
    # the host-loopback address too (slirp4netns's .2); DNS may be an address of its own.
    gateway_ip: IPv4Address = None  # type: ignore[assignment]  # default: network + 1
    host_ip: IPv4Address = None  # type: ignore[assignment]  # default: broadcast - 1
    dns_ip: IPv4Address = None  # type: ignore[assignment]  # default: the gateway
    guest_ip: IPv4Address = None  # type: ignore[assignment]  # default: network + 2
    dhcp_range: tuple[IPv4Address, IPv4Address] | None = None  # default: net+3 .. broadcast-2
    # ---- IPv6 address plan (issue 15) ---------------------------------------------------------
    # Addresses left as None are derived in `_check_ipv6`: gateway ::1 (plus its EUI-64
    # link-local, `gateway6_link_local`), host loopback ::254 → the host's ::1, the default
    # MAC's DHCPv6 lease ::2, DNS on the gateway; the DHCPv6 pool ::1000-::1fff.
    ipv6: bool = True  # --no-ipv6 turns it off: IPv6 frames dropped and counted, as before
    subnet6: IPv6Network = field(default_factory=lambda: IPv6Network(DEFAULT_SUBNET6))
    gateway6: IPv6Address = None  # type: ignore[assignment]  # default: prefix ::1
    host6: IPv6Address = None  # type: ignore[assignment]  # default: prefix ::254
    dns6: IPv6Address = None  # type: ignore[assignment]  # default: the gateway
    guest6: IPv6Address = None  # type: ignore[assignment]  # default: prefix ::2
    static_leases6: dict[str, IPv6Address] = field(default_factory=dict)  # MAC or DUID → address
    dhcp6_range: tuple[IPv6Address, IPv6Address] | None = None  # default: ::1000 .. ::1fff
    # IPv6 neighbour discovery: the neighbour cache (least recently used evicted at the
    # bound), the packets held while a solicitation asks for an unknown on-link address (per
    # address, and addresses at once), the longest wait between unsolicited RAs (RFC 4861).
    ndp_max_neighbours: int = 4096
    ndp_pending_packets: int = 64
    ndp_pending_addresses: int = 256
    ra_interval: float = 600.0
    # ---- end of the IPv6 address plan ---------------------------------------------------------

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
        if not 0 < self.flow_guest_share <= 1:
            raise ValueError(f"flow guest share {self.flow_guest_share} out of range (0, 1]")
        if self.tcp_max_half_open < 1 or self.tcp_max_connections < 1:
            raise ValueError("TCP connection limits must be positive")
        if not 0 <= self.tcp_ack_delay <= 0.2:
            raise ValueError(f"TCP ACK delay {self.tcp_ack_delay} s out of range 0..0.2")
        for name in ("max_connections", "max_connections_per_guest"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', '-')} {value} must be at least 1")
        self._check_limits()
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"MTU {self.mtu} out of range {MIN_MTU}..{MAX_MTU}")
        if not self.static_leases:
            self.static_leases = {DEFAULT_GUEST_MAC: self.guest_ip}
        for mac, ip in self.static_leases.items():
            if ip not in self.subnet or ip in self.virtual_addresses:
                raise ValueError(f"static lease {mac}={ip}: address not usable in {self.subnet}")
        self._check_ipv6()

    def _check_limits(self) -> None:
        """The limits that are flags, named as the flags are (a usage error names the flag)."""
        for name in (
            "reassembly_max_bytes", "ndp_max_neighbours", "ndp_pending_packets",
            "ndp_pending_addresses",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value} must be at least 1")
        if not 0 < self.reassembly_timeout <= 3600:
            raise ValueError(
                f"--reassembly-timeout {self.reassembly_timeout} out of range (0, 3600] seconds"
            )
        if not RA_INTERVAL_MIN <= self.ra_interval <= RA_INTERVAL_MAX:
            raise ValueError(
                f"--ra-interval {self.ra_interval} out of range "
                f"{RA_INTERVAL_MIN:g}..{RA_INTERVAL_MAX:g} seconds (RFC 4861 MaxRtrAdvInterval)"
            )

    @property
    def virtual_addresses(self) -> set[IPv4Address]:
        """The switch's own addresses (answered by ARP, never handed to a guest)."""
        return {self.gateway_ip, self.host_ip, self.dns_ip}

    # ---- IPv6 address plan (issue 15) ---------------------------------------------------------

    def _check_ipv6(self) -> None:
        """Derive and validate the IPv6 plan; checked even with ipv6 off, so that turning it
        on later never meets a plan that was wrong all along."""
        net = self.subnet6
        if not isinstance(net, IPv6Network):
            raise ValueError(f"IPv6 subnet {net!r} is not an IPv6 network")
        if net.prefixlen != 64:
            raise ValueError(
                f"IPv6 subnet {net} must be a /64: SLAAC forms 64-bit interface identifiers"
            )
        base = net.network_address
        if self.gateway6 is None:
            self.gateway6 = base + 1
        if self.host6 is None:
            self.host6 = base + 0x254  # "::254", as the issue writes it
        if self.dns6 is None:
            self.dns6 = self.gateway6
        if self.guest6 is None:
            self.guest6 = base + 2
        for name in ("gateway6", "host6", "dns6", "guest6"):
            ip = getattr(self, name)
            if not isinstance(ip, IPv6Address) or ip not in net or ip == base:
                raise ValueError(f"{name[:-1]} IPv6 address {ip} is not a host of {net}")
        if self.guest6 in self.virtual_addresses6:
            raise ValueError(f"guest IPv6 address {self.guest6} is one of the switch's own")
        if self.dhcp6_range is None:
            self.dhcp6_range = (base + 0x1000, base + 0x1FFF)
        first, last = self.dhcp6_range
        if not (
            isinstance(first, IPv6Address)
            and isinstance(last, IPv6Address)
            and base < first <= last
            and last in net
        ):
            raise ValueError(f"DHCPv6 range {first}-{last} is not a range of hosts of {net}")
        if not self.static_leases6:
            self.static_leases6 = {DEFAULT_GUEST_MAC: self.guest6}
        for key, ip in self.static_leases6.items():
            if not isinstance(ip, IPv6Address) or ip not in net or ip in self.virtual_addresses6:
                raise ValueError(f"static IPv6 lease {key}={ip}: address not usable in {net}")

    @property
    def gateway6_link_local(self) -> IPv6Address:
        """The gateway's fe80:: address (EUI-64 of its MAC): the source of its RAs and NDP."""
        return IPv6Address(link_local_from_mac(self.gateway_mac))

    @property
    def virtual_addresses6(self) -> set[IPv6Address]:
        """The switch's own IPv6 addresses (answered by NDP, defended in DAD)."""
        return {self.gateway6, self.host6, self.dns6, self.gateway6_link_local}


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


def parse_subnet6(text: str) -> IPv6Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"bad IPv6 subnet {text!r}: {e}") from None
    if not isinstance(net, IPv6Network):
        raise ValueError(f"bad IPv6 subnet {text!r}: not an IPv6 network")
    return net


def parse_address6(text: str, what: str) -> IPv6Address:
    try:
        return IPv6Address(text)
    except ValueError:
        raise ValueError(f"bad {what} address {text!r}: expected an IPv6 address") from None


def parse_dhcp_range(text: str) -> tuple[IPv4Address, IPv4Address]:
    """'FIRST-LAST' (inclusive) → two addresses."""
    first, sep, last = text.partition("-")
    if not sep:
        raise ValueError(f"bad DHCP range {text!r}: expected FIRST-LAST")
    a, b = parse_address(first.strip(), "DHCP range"), parse_address(last.strip(), "DHCP range")
    if a > b:
        raise ValueError(f"bad DHCP range {text!r}: {a} is after {b}")
    return a, b
