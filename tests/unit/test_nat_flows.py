"""hostd/nat/flows.py: the one flow table of UDP NAT, ICMP NAT and UDP forwards."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from netferry.hostd.nat.flows import FlowTable


@dataclass
class Flow:
    name: str
    last_active: float


def table(max_flows: int = 3, idle: float = 10.0) -> tuple[FlowTable[str, Flow], list[str]]:
    closed: list[str] = []
    t: FlowTable[str, Flow] = FlowTable(
        "test", max_flows=max_flows, idle_timeout=idle, close=lambda f: closed.append(f.name)
    )
    return t, closed


def test_make_room_evicts_the_least_recently_used() -> None:
    t, closed = table(max_flows=3)
    for i, name in enumerate("abc"):
        t.make_room()
        t.add(name, Flow(name, float(i)))
    t.touch("a", t.get("a"), 5.0)  # a is now the most recent: b goes first
    assert t.make_room() == 1
    assert closed == ["b"]
    t.add("d", Flow("d", 6.0))
    assert list(t) == ["c", "a", "d"]
    assert t.stats == {"opened": 4, "evicted": 1, "reaped": 0, "share_evicted": 0}


def test_one_owner_evicts_its_own_flows_never_another_owners() -> None:
    """Keys "A1", "B7": the owner is the first letter (the guest). A floods new flows: once
    the table is full and A holds its share, A gives way at its own oldest; B's flows,
    older still, all stay."""
    closed: list[str] = []
    t: FlowTable[str, Flow] = FlowTable(
        "test", max_flows=8, idle_timeout=10.0, close=lambda f: closed.append(f.name),
        owner=lambda k: k[0], share=0.5,
    )  # fmt: skip
    for i in range(3):
        t.make_room(f"B{i}")
        t.add(f"B{i}", Flow(f"B{i}", 0.0))
    for i in range(100):
        t.make_room(f"A{i}")
        t.add(f"A{i}", Flow(f"A{i}", 1.0 + i))
    assert {k for k in t if k[0] == "B"} == {"B0", "B1", "B2"}
    assert t.owners() == {"B": 3, "A": 5} and len(t) == 8
    assert closed == [f"A{i}" for i in range(95)]  # oldest first
    assert t.stats["share_evicted"] == 95
    # A full table without anyone over the share gives way at the busiest owner's oldest.
    closed2: list[str] = []
    t2: FlowTable[str, Flow] = FlowTable(
        "t2", max_flows=4, idle_timeout=10.0, close=lambda f: closed2.append(f.name),
        owner=lambda k: k[0], share=1.0,
    )  # fmt: skip
    for k in ("B0", "A0", "A1", "A2"):
        t2.make_room(k)
        t2.add(k, Flow(k, 0.0))
    assert t2.make_room("C0") == 1 and closed2 == ["A0"]  # not B0, the oldest of all
    t2.remove("A1")
    t2.reap(100.0)
    assert t2.owners() == {} and closed2 == ["A0", "A1", "B0", "A2"]


def test_reap_closes_only_flows_idle_for_the_timeout() -> None:
    t, closed = table(max_flows=10, idle=10.0)
    t.add("old", Flow("old", 0.0))
    t.add("edge", Flow("edge", 5.0))
    t.add("new", Flow("new", 9.0))
    assert t.reap(15.0) == 2  # idle 15 and exactly 10
    assert closed == ["old", "edge"]
    assert list(t) == ["new"] and t.stats["reaped"] == 2


def test_remove_and_close_call_close_once_per_flow() -> None:
    t, closed = table()
    t.add("a", Flow("a", 0.0))
    t.add("b", Flow("b", 0.0))
    assert t.remove("a") is not None and t.remove("a") is None
    t.close()
    assert closed == ["a", "b"] and len(t) == 0


def test_the_sweeper_reaps_and_logs() -> None:
    async def main() -> tuple[list[str], list[dict]]:
        t, closed = table(idle=0.2)
        loop = asyncio.get_running_loop()
        t.add("a", Flow("a", loop.time()))
        with structlog.testing.capture_logs() as logs:
            t.start_sweeping(loop)
            for _ in range(100):
                await asyncio.sleep(0.05)
                if closed:
                    break
            t.close()
        return closed, logs

    closed, logs = asyncio.run(main())
    assert closed == ["a"]
    assert [e["event"] for e in logs] == ["test.flows_reaped"]


def test_a_flow_keeps_the_owner_it_was_added_with() -> None:
    """The owner (a guest's switch port) may change while its flows live (the guest moved,
    its port went): each flow gives its count back to the owner it was counted for."""
    where = {"g": "port1"}
    t: FlowTable[str, Flow] = FlowTable(
        "test", max_flows=4, idle_timeout=10.0, close=lambda f: None,
        owner=lambda k: where[k[0]], share=0.5,
    )  # fmt: skip
    t.add("g0", Flow("g0", 0.0))
    where["g"] = "port2"
    t.add("g1", Flow("g1", 1.0))
    assert t.owners() == {"port1": 1, "port2": 1}
    t.remove("g0")
    assert t.owners() == {"port2": 1}
    t.reap(100.0)
    assert t.owners() == {} and len(t) == 0
