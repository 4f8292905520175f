"""The flow table of the NAT edge: bounded, least recently used out first, idle flows swept.

UDP NAT flows (`hostd/nat/udp.py`), ICMP echo flows (`hostd/nat/icmp.py`) and UDP forward
sessions (`hostd/forwards.py`) are kept the same way: an ordered map from the flow's key
to the flow, most recently used last. `touch` moves a flow to the end; `make_room` evicts
from the front until one more fits under `max_flows` (call it before opening the new
flow's socket, so an evicted flow's descriptor is free again first).

With an `owner` (who a flow belongs to: the NAT passes the guest's switch port,
`Network.guest_owner`, or its address while the port is unknown, so a dual-stack guest's
IPv4 and IPv6 flows are one guest's), a full table makes room at the new flow's owner's
own oldest flow once that owner holds `share` of the table, else at the busiest owner's
oldest: a guest alone may use the whole table, and one guest flooding new flows evicts its
own, never another guest's flows below the share. The owner is asked once, when a flow is
added, and remembered with it, so a guest that moves or leaves still gives back its count.

A sweep every `idle_timeout / 4` (0.2 .. 5 s) closes flows idle for `idle_timeout` (the
gvproxy #622 lesson: one socket per DNS query held for 90 s starves a host of
descriptors). What a flow holds is released by the table user's `close` callback, which
every removal calls once.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, Protocol, TypeVar

import structlog

log = structlog.get_logger("hostd.nat.flows")


class Flow(Protocol):
    last_active: float


K = TypeVar("K", bound=Hashable)
F = TypeVar("F", bound=Flow)


class FlowTable(Generic[K, F]):
    def __init__(
        self,
        name: str,
        *,
        max_flows: int,
        idle_timeout: float,
        close: Callable[[F], None],
        owner: Callable[[K], Hashable] | None = None,
        share: float = 1.0,
    ) -> None:
        self.name = name  # in the sweep's log event: "<name>.flows_reaped"
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        self._close = close
        self.flows: OrderedDict[K, F] = OrderedDict()
        self._owner = owner
        self.share = share
        self._counts: dict[Hashable, int] = {}  # owner → flows it holds
        self._owners: dict[K, Hashable] = {}  # flow → its owner when it was added
        self.stats = {"opened": 0, "evicted": 0, "reaped": 0, "share_evicted": 0}
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.flows)

    def __contains__(self, key: object) -> bool:
        return key in self.flows

    def __iter__(self) -> Iterator[K]:
        return iter(self.flows)

    def get(self, key: K) -> F | None:
        return self.flows.get(key)

    def values(self) -> list[F]:
        return list(self.flows.values())

    def items(self) -> list[tuple[K, F]]:
        return list(self.flows.items())

    def touch(self, key: K, flow: F, now: float) -> None:
        """`flow` was used at `now`: it is the most recently used."""
        flow.last_active = now
        self.flows.move_to_end(key)

    def make_room(self, key: K | None = None) -> int:
        """Evict least recently used flows until one more fits (for the new flow `key`,
        whose owner gives way first once it holds its share); returns how many."""
        n = 0
        owner = self._owner
        mine = owner(key) if owner is not None and key is not None else None
        limit = max(1, int(self.max_flows * self.share))
        while self.flows and len(self.flows) >= self.max_flows:
            if owner is None:
                self._evict(next(iter(self.flows)))
            elif mine is not None and self._counts.get(mine, 0) >= limit:
                self._evict(self._oldest_of(mine))  # over its share: its own flow goes
                self.stats["share_evicted"] += 1
            else:
                busiest = max(self._counts, key=self._counts.__getitem__)
                self._evict(self._oldest_of(busiest))
            n += 1
        self.stats["evicted"] += n
        return n

    def _oldest_of(self, owner: Hashable) -> K:
        """The least recently used flow of `owner` (it holds at least one)."""
        owners = self._owners
        return next(k for k in self.flows if owners[k] == owner)

    def _evict(self, key: K) -> None:
        self._close(self._pop(key))

    def _pop(self, key: K) -> F:
        flow = self.flows.pop(key)
        if self._owner is not None:
            who = self._owners.pop(key)
            left = self._counts[who] - 1
            if left:
                self._counts[who] = left
            else:
                del self._counts[who]
        return flow

    def add(self, key: K, flow: F) -> None:
        """A new flow (after `make_room`), most recently used."""
        if self._owner is not None and key not in self.flows:
            who = self._owners[key] = self._owner(key)
            self._counts[who] = self._counts.get(who, 0) + 1
        self.flows[key] = flow
        self.flows.move_to_end(key)
        self.stats["opened"] += 1

    def remove(self, key: K) -> F | None:
        """Close and forget the flow under `key`, if any."""
        if key not in self.flows:
            return None
        flow = self._pop(key)
        self._close(flow)
        return flow

    def owners(self) -> dict[Hashable, int]:
        """Flows held per owner (empty without an owner function)."""
        return dict(self._counts)

    def reap(self, now: float) -> int:
        """Close flows idle for `idle_timeout` or longer; returns how many."""
        timeout = self.idle_timeout
        idle = [k for k, f in self.flows.items() if now - f.last_active >= timeout]
        for key in idle:
            self._close(self._pop(key))
        self.stats["reaped"] += len(idle)
        return len(idle)

    def start_sweeping(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = loop.create_task(self._sweep_forever(loop))

    async def _sweep_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        interval = max(0.2, min(5.0, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            n = self.reap(loop.time())
            if n:
                log.info(f"{self.name}.flows_reaped", reaped=n, active=len(self.flows))

    def close(self) -> None:
        """Stop sweeping and close every flow."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        flows, self.flows = self.flows, OrderedDict()
        self._counts.clear()
        self._owners.clear()
        for flow in flows.values():
            self._close(flow)
