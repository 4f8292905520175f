"""hostd/nat/budget.py: guest sockets counted until closed, refusals at the limit."""

from __future__ import annotations

import resource
import socket

import pytest

from netferry.hostd.nat.budget import (
    RESERVE_MIN,
    BudgetExceeded,
    DescriptorBudget,
    default_max_connections,
    raise_nofile_limit,
)

G1, G2 = b"\xc0\xa8\x7f\x02", b"\xc0\xa8\x7f\x03"


def test_default_keeps_a_reserve() -> None:
    assert default_max_connections(1024) == 1024 - RESERVE_MIN
    assert default_max_connections(20000) == 20000 - 2500
    assert default_max_connections(100) == 0


def test_sockets_are_counted_until_closed_wherever_they_close() -> None:
    budget = DescriptorBudget(2, per_guest=2)
    a = budget.open(socket.AF_INET, socket.SOCK_DGRAM, guest=G1, what="t")
    b = budget.open(socket.AF_INET, socket.SOCK_DGRAM, guest=G1, what="t")
    assert budget.in_use == 2 and budget.by_guest == {G1: 2}
    assert not a.getblocking()
    with pytest.raises(BudgetExceeded):
        budget.open(socket.AF_INET, socket.SOCK_DGRAM, guest=G2, what="t")
    assert budget.stats["refused"] == 1
    a.close()
    a.close()  # twice: counted once
    assert budget.in_use == 1
    with b:  # a context manager closes through close() too
        pass
    assert budget.in_use == 0 and budget.by_guest == {}


def test_a_guest_cannot_take_more_than_its_share() -> None:
    budget = DescriptorBudget(10, per_guest=1)
    s1 = budget.open(socket.AF_INET, socket.SOCK_DGRAM, guest=G1, what="t")
    with pytest.raises(BudgetExceeded) as e:
        budget.open(socket.AF_INET, socket.SOCK_DGRAM, guest=G1, what="t")
    assert isinstance(e.value, OSError)  # callers that catch OSError still cope
    s2 = budget.open(socket.AF_INET, socket.SOCK_DGRAM, guest=G2, what="t")  # another guest
    assert budget.stats["refused_guest_share"] == 1 and budget.in_use == 2
    s1.close()
    s2.close()


def test_adopt_counts_an_accepted_socket_or_resets_it() -> None:
    budget = DescriptorBudget(1)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        c1 = socket.create_connection(listener.getsockname())
        c2 = socket.create_connection(listener.getsockname())
        s1 = budget.adopt(listener.accept()[0], what="t")
        assert budget.in_use == 1
        raw, _ = listener.accept()
        with pytest.raises(BudgetExceeded):
            budget.adopt(raw, what="t")
        assert raw.fileno() == -1  # closed
        with pytest.raises(ConnectionResetError):  # and reset, not a clean FIN
            c2.recv(1)
        s1.sendall(b"x")
        assert c1.recv(1) == b"x"
        s1.close()
        assert budget.in_use == 0
        c1.close()
        c2.close()


def test_raise_nofile_limit_raises_the_soft_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 64:
        pytest.skip(f"hard limit {hard}: nothing to raise to")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        before, after = raise_nofile_limit()
        assert before == 64 and after == resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 64
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
