"""Port security: which addresses a switch port may use as a source (sans-IO).

Theory of operation. One guest must not be able to take another's traffic by claiming its
address. The binding table maps each guest address to the MAC and port that own it:

* a DHCP lease binds its address to the lease's MAC and the port the request came in on
  (`bind`, authoritative: it replaces whatever held the address, since the server just
  decided who has it); a release or expiry unbinds it;
* a static guest (no DHCP) binds an address of the subnet by using it first: the first
  frame whose source is an unbound address binds it to that frame's MAC and port while the
  port holds fewer than `max_addresses_per_port` (a guest cannot claim the whole subnet);
  addresses outside the subnet are not bound (the gateway drops them as martians);
* a port's bindings go with the port (`forget_port`, when its link closes);
* within a port, an address may move from one MAC to another: the port is the unit of
  trust (one guest), and the CAM table bounds the MACs a port may use.

`source_allowed(port, mac, ip)` checks an IPv4 source and `arp_allowed(port, sender_mac,
sender_ip)` an ARP sender (a gratuitous ARP for another guest's address is refused before
it is flooded or reaches the neighbour table); `claim` is the rule under both, with the
caller's counter names. MAC-level rules (a port's MAC limit, MAC theft, aging) live in the
CAM table (ethernet.CamTable); `admit_mac` applies them to every frame. The receive path in
network.py calls `admit_mac` for every frame, `arp_allowed` for every ARP sender and the
source rule for every IPv4 frame that is switched, flooded, or whose source is not yet the
neighbour entry of its MAC.

Refusals are counted in `stats` by reason and logged at most once per `log_interval` per
reason, with how many were dropped since. With `enabled` False (setups that bridge other
hosts through a port) everything is allowed and nothing is bound.
IPv6 (network6.py) uses the binding table for DHCPv6 leases (`bind`, `unbind`, `owner`)
and leaves SLAAC addresses to the neighbour cache's rule (an address in use by another live
port's MAC stays there), so a guest's many SLAAC addresses do not use up its IPv4 limit;
IPv6 leases are counted per port apart from IPv4's, against a limit of the same size.
It does no I/O and reads no clock: `now` comes in where a log line may be due.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from netferry.hostd.corelog import core_logger
from netferry.hostd.stack.ethernet import CamTable, mac_to_str

log = core_logger("hostd.port_security")

ANY_V4 = b"\x00\x00\x00\x00"


class PortSecurity:
    def __init__(
        self,
        cam: CamTable | None = None,
        enabled: bool = True,
        max_addresses_per_port: int = 16,
        log_interval: float = 5.0,
        stats: Counter[str] | None = None,
        subnet: tuple[int, int] | None = None,
    ) -> None:
        self.cam = cam if cam is not None else CamTable(secure=enabled)
        self.enabled = enabled
        self.max_addresses_per_port = max_addresses_per_port
        self.log_interval = log_interval
        self._owner: dict[bytes, tuple[bytes, int]] = {}  # ip → (mac, port)
        self._port_ips: dict[int, set[bytes]] = {}  # IPv4 addresses per port
        self._port_ips6: dict[int, set[bytes]] = {}  # IPv6 (DHCPv6 leases) per port, apart
        self.stats: Counter[str] = Counter() if stats is None else stats  # may be the switch's
        self._logged: dict[str, tuple[float, int]] = {}  # reason → (when, count then)
        self.now = 0.0  # the latest batch's time (the receive path sets it): log pacing
        # (network, mask) as integers: only addresses inside are bound by first use; others
        # pass unbound (the stack drops them as martians at the gateway).
        self._subnet = subnet

    # ---- the binding table ---------------------------------------------------------------

    def _ips_of(self, ip: bytes) -> dict[int, set[bytes]]:
        """The per-port sets of `ip`'s family: each family has its own limit."""
        return self._port_ips6 if len(ip) == 16 else self._port_ips

    def bind(self, port: int, mac: bytes, ip: bytes) -> None:
        """A DHCP lease: `ip` belongs to `mac` on `port` from now on. DHCPv4 caps its leases
        per port; DHCPv6 does not, so an IPv6 lease beyond `max_addresses_per_port` is left
        unbound (counted; the neighbour cache's rule still guards it)."""
        if not self.enabled:
            return
        by_port = self._ips_of(ip)
        old = self._owner.get(ip)
        if old is not None:
            if old == (mac, port):
                return
            by_port[old[1]].discard(ip)
            self.stats["port_security_rebound"] += 1
        ips = by_port.setdefault(port, set())
        if len(ip) == 16 and len(ips) >= self.max_addresses_per_port:
            self._owner.pop(ip, None)
            self.refuse("ipv6_lease_limit_unbound", ip)
            return
        self._owner[ip] = (mac, port)
        ips.add(ip)
        self.stats["port_security_bound"] += 1

    def unbind(self, ip: bytes, mac: bytes) -> None:
        """A lease released or expired: `ip` is free again (if `mac` still held it)."""
        old = self._owner.get(ip)
        if old is not None and old[0] == mac:
            del self._owner[ip]
            self._ips_of(ip)[old[1]].discard(ip)

    def forget_port(self, port: int) -> None:
        for ip in self._port_ips.pop(port, ()):
            del self._owner[ip]
        for ip in self._port_ips6.pop(port, ()):
            del self._owner[ip]

    def owner(self, ip: bytes) -> tuple[bytes, int] | None:
        return self._owner.get(ip)

    def bindings(self) -> list[tuple[bytes, bytes, int]]:
        """(ip, mac, port) for every bound address."""
        return [(ip, mac, port) for ip, (mac, port) in self._owner.items()]

    def __len__(self) -> int:
        return len(self._owner)

    # ---- the switch's entry points -------------------------------------------------------

    def admit_mac(self, port: int, src_mac: bytes, now: float) -> bool:
        """Every frame from `port`: its source MAC learnt in the CAM table, within the port's
        MAC limit and not another live port's. False: drop it (counted, logged)."""
        if self.cam.learn(src_mac, port, now):
            return True
        self.now = now
        return self.refuse(self.cam.last_refusal, b"", src_mac)

    # ---- checks --------------------------------------------------------------------------

    def source_allowed(self, port: int, mac: bytes, ip: bytes) -> bool:
        """May `port` send IPv4 from `ip` with Ethernet source `mac`?"""
        return self.claim(port, mac, ip, "ipv4_source_conflict_dropped", "ip_limit_dropped")

    def arp_allowed(self, port: int, sender_mac: bytes, sender_ip: bytes) -> bool:
        """May `port` announce `sender_ip` at `sender_mac` (ARP request, reply, gratuitous)?"""
        return self.claim(
            port, sender_mac, sender_ip, "arp_address_theft_dropped", "arp_limit_dropped"
        )

    def claim(self, port: int, mac: bytes, ip: bytes, theft_reason: str, limit_reason: str) -> bool:
        """May `port` use `ip` at `mac`? An address bound to another port is refused (counted
        as `theft_reason`); an unbound one is bound to this port within its limit; within a
        port the address follows the MAC. ANY (an RFC 5227 probe) claims nothing."""
        if not self.enabled or ip == ANY_V4:
            return True
        owner = self._owner.get(ip)
        if owner is not None:
            if owner[1] != port:
                return self.refuse(theft_reason, ip)
            if owner[0] != mac:
                self._rebind_mac(ip, mac, port)
            return True
        return self._claim(port, mac, ip, limit_reason)

    def _rebind_mac(self, ip: bytes, mac: bytes, port: int) -> None:
        """The address moved to another MAC of the same port (one guest, whose MACs the CAM
        table already bounds): follow it, as a switch port is the unit of trust."""
        self._owner[ip] = (mac, port)
        self.stats["port_security_rebound"] += 1

    def _claim(self, port: int, mac: bytes, ip: bytes, limit_reason: str) -> bool:
        """An unbound address used by `port`: bound to it (a static guest), within limits.
        Leases bind beyond the limit (DHCP caps them per port on its own)."""
        subnet = self._subnet
        if subnet is not None and int.from_bytes(ip, "big") & subnet[1] != subnet[0]:
            return True
        ips = self._port_ips.get(port)
        if ips is None:
            ips = self._port_ips[port] = set()
        if len(ips) >= self.max_addresses_per_port:
            return self.refuse(limit_reason, ip)
        ips.add(ip)
        self._owner[ip] = (mac, port)
        self.stats["port_security_learned"] += 1
        return True

    def refuse(self, reason: str, ip: bytes, mac: bytes | None = None) -> bool:
        """Count the drop (CAM refusals are counted by the CAM table); log it at most once
        per `log_interval` per reason, with how many went since the last line."""
        stats = self.stats
        cam_reason = mac is not None
        count = self.cam.stats[reason] if cam_reason else stats[reason] + 1
        if not cam_reason:
            stats[reason] = count
        last = self._logged.get(reason)
        if last is None or self.now - last[0] >= self.log_interval:
            fields: dict[str, object] = {"reason": reason}
            if cam_reason:
                fields["mac"] = mac_to_str(mac)
                owner_port = self.cam.lookup(mac)
                if owner_port is not None:
                    fields["owner_port"] = owner_port
            else:
                owner = self._owner.get(ip)
                fields["address"] = str(ipaddress.ip_address(ip)) if ip else ""
                if owner is not None:
                    fields["owner_mac"] = mac_to_str(owner[0])
                    fields["owner_port"] = owner[1]
            log.warning(
                "port security dropped frames",
                dropped_since_last_log=count - (last[1] if last else 0),
                **fields,
            )
            self._logged[reason] = (self.now, count)
        return False
