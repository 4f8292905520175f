"""The flow table of the NAT edge: bounded, least recently used out first, idle flows swept.

UDP NAT flows (`hostd/nat/udp.py`), ICMP echo flows (`hostd/nat/icmp.py`) and UDP forward
sessions (`hostd/forwards.py`) are kept the same way: an ordered map from the flow's key
to the flow, most recently used last. `touch` moves a flow to the end; `make_room` evicts
from the front until one more fits under `max_flows` (call it before opening the new
flow's socket, so an evicted flow's descriptor is free again first); a sweep every
`idle_timeout / 4` (0.2 .. 5 s) closes flows idle for `idle_timeout` (the gvproxy #622
lesson: one socket per DNS query held for 90 s starves a host of descriptors). What a
flow holds is released by the owner's `close` callback, which every removal calls once.
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
    ) -> None:
        self.name = name  # in the sweep's log event: "<name>.flows_reaped"
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        self._close = close
        self.flows: OrderedDict[K, F] = OrderedDict()
        self.stats = {"opened": 0, "evicted": 0, "reaped": 0}
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

    def make_room(self) -> int:
        """Evict least recently used flows until one more fits; returns how many."""
        n = 0
        while self.flows and len(self.flows) >= self.max_flows:
            _, old = self.flows.popitem(last=False)
            self._close(old)
            n += 1
        self.stats["evicted"] += n
        return n

    def add(self, key: K, flow: F) -> None:
        """A new flow (after `make_room`), most recently used."""
        self.flows[key] = flow
        self.flows.move_to_end(key)
        self.stats["opened"] += 1

    def remove(self, key: K) -> F | None:
        """Close and forget the flow under `key`, if any."""
        flow = self.flows.pop(key, None)
        if flow is not None:
            self._close(flow)
        return flow

    def reap(self, now: float) -> int:
        """Close flows idle for `idle_timeout` or longer; returns how many."""
        timeout = self.idle_timeout
        idle = [k for k, f in self.flows.items() if now - f.last_active >= timeout]
        for key in idle:
            self._close(self.flows.pop(key))
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
        for flow in flows.values():
            self._close(flow)
