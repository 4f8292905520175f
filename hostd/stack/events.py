"""Events the network layer hands to the NAT and the control plane (beside the transport's).

They live apart from network.py so that its IPv4 and IPv6 halves (network6.py) both make
them; network.py re-exports them. Addresses are `bytes` of 4 or 16 (the family is the length).
"""

from __future__ import annotations

from dataclasses import dataclass

from netferry.hostd.policy import FlowVerdict


@dataclass(slots=True)
class IcmpEchoOutbound:
    guest_ip: bytes
    dst_ip: bytes
    target_ip: str
    ident: int
    seq: int
    payload: bytes


@dataclass(slots=True)
class DnsQueryOutbound:
    """A query the local zones do not answer: forward it upstream, reply from the gateway."""

    guest_ip: bytes
    guest_port: int
    query: bytes
    server_ip: bytes = b""  # the DNS address the guest asked (v4 or dns6): the reply's source


@dataclass(slots=True)
class LeaseEvent:
    mac: str
    ip: str
    hostname: str | None
    released: bool = False  # released, declined or expired (else granted or renewed)


@dataclass(slots=True)
class FlowDenied:
    """A new flow the outbound policy refused (already answered with RST or ICMP)."""

    verdict: FlowVerdict
