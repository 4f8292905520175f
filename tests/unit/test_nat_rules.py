"""guestd/nat_rules.py: the nftables ruleset network-setup loads."""

from __future__ import annotations

from netferry.guestd import nat_rules


def test_nat_ruleset() -> None:
    text = nat_rules.ruleset("eth0", "veth-rd-ns", "192.168.143.0/24")
    assert 'iifname { "eth0", "veth-rd-ns" } fib daddr type local dnat ip to 127.0.0.1' in text
    assert 'ip saddr 192.168.143.0/24 oifname "eth0" masquerade' in text
    assert text.startswith("table ip netferry\ndelete table ip netferry\n")  # replace, atomically
    limited = nat_rules.ruleset(ports=[8080, 53, 8080])
    assert "th dport { 53, 8080 }" in limited
