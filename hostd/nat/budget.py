"""The descriptor budget: guest traffic may hold only so many host sockets.

hostd's descriptors are one pool (RLIMIT_NOFILE) shared by what must never fail -- links,
the API servers and their clients, the DNS forwarder, the pcap and state files -- and what
guests open at will: NAT connections and dials, UDP and ICMP flows, forwarded connections.
At start the soft limit is raised to the hard one (`raise_nofile_limit`, before privileges
are dropped); guest traffic then draws from `--max-connections`, by default the limit less a
reserve of an eighth (at least 256 descriptors), and each guest from a share of it
(`--max-connections-per-guest`, by default half), so one guest cannot take every slot. A
guest is who `guest_owner` says a guest address belongs to: hostd passes
`Network.guest_owner`, the switch port the address sits on (its address while the port is
unknown), so a dual-stack guest's IPv4 and IPv6 sockets draw from one share. The UDP and
ICMP flow tables ask the budget's `owner_of` too, for their `--flow-guest-share`.

A socket opened through `DescriptorBudget.open` (or adopted after `accept`) is counted until
it is closed: its `close` returns the slot, wherever in the NAT it happens. Over the budget,
`open` raises `BudgetExceeded` at once -- nothing is opened and the caller refuses the
guest's connection (TCP RST, ICMP unreachable for UDP/ICMP) -- and the refusal is counted.
A `socket()` that fails anyway (EMFILE from a descriptor leak elsewhere, ENOBUFS) is counted
and logged at most every 5 s; callers treat it as a failed dial, never as an exception that
reaches a link.
"""

from __future__ import annotations

import errno
import resource
import socket
import struct
import time
from collections.abc import Callable, Hashable

import structlog

log = structlog.get_logger("hostd.nat.budget")

RESERVE_MIN = 256  # descriptors kept for links, the API and DNS at any limit
NOFILE_CAP = 1 << 20  # an "unlimited" hard limit is not a budget to hand out whole
_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST


class BudgetExceeded(OSError):
    def __init__(self, what: str) -> None:
        super().__init__(errno.EMFILE, f"descriptor budget exhausted ({what})")
        self.what = what


def nofile_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return NOFILE_CAP if soft == resource.RLIM_INFINITY else min(soft, NOFILE_CAP)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (capped at fs.nr_open and NOFILE_CAP);
    returns (before, after). Needs no privilege; a refusal leaves the limit as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CAP if hard == resource.RLIM_INFINITY else min(hard, NOFILE_CAP)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            target = min(target, int(f.read()))
    except (OSError, ValueError):
        pass
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as e:
            log.warning("budget.rlimit_not_raised", soft=soft, hard=hard, error=str(e))
            return soft, soft
        return soft, target
    return soft, soft


def default_max_connections(limit: int) -> int:
    """Guest sockets allowed under a descriptor limit: all but the reserve."""
    return max(0, limit - max(RESERVE_MIN, limit // 8))


class _BudgetSocket(socket.socket):
    """A socket that returns its slot to the budget when it is closed."""

    __slots__ = ("_budget", "_guest")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._budget: DescriptorBudget | None = None
        self._guest: Hashable | None = None  # its owner's key in `by_guest`

    def close(self) -> None:
        budget = self._budget
        if budget is not None:
            self._budget = None
            budget._release(self._guest)
        super().close()


def _the_address(guest: bytes) -> Hashable:
    return guest


class DescriptorBudget:
    def __init__(
        self,
        limit: int,
        per_guest: int | None = None,
        guest_owner: Callable[[bytes], Hashable] | None = None,
    ) -> None:
        self.limit = limit
        self.per_guest = per_guest if per_guest is not None else max(1, limit // 2)
        # Who holds a guest address's sockets (Network.guest_owner: its switch port); asked
        # once per socket, remembered on it until it closes. Default: the address itself.
        self.owner_of: Callable[[bytes], Hashable] = guest_owner or _the_address
        self.in_use = 0
        self.by_guest: dict[Hashable, int] = {}  # owner → sockets it holds
        self.stats = {"refused": 0, "refused_guest_share": 0, "socket_errors": 0}
        self._error_logged = float("-inf")
        self._refusal_logged = float("-inf")

    def _check(self, guest: Hashable | None, what: str) -> None:
        if self.in_use >= self.limit:
            self._refuse("refused", what)
        if guest is not None and self.by_guest.get(guest, 0) >= self.per_guest:
            self._refuse("refused_guest_share", what)

    def _refuse(self, counter: str, what: str) -> None:
        self.stats[counter] += 1
        now = time.monotonic()
        if now >= self._refusal_logged + 5.0:  # a warning, not one per SYN
            self._refusal_logged = now
            log.warning(
                "budget.refused",
                what=what,
                in_use=self.in_use,
                limit=self.limit,
                per_guest=self.per_guest,
                refused=self.stats["refused"] + self.stats["refused_guest_share"],
            )
        raise BudgetExceeded(what)

    def _take(self, sock: _BudgetSocket, guest: Hashable | None) -> _BudgetSocket:
        sock._budget = self
        sock._guest = guest
        self.in_use += 1
        if guest is not None:
            self.by_guest[guest] = self.by_guest.get(guest, 0) + 1
        return sock

    def _release(self, guest: Hashable | None) -> None:
        self.in_use -= 1
        if guest is not None:
            n = self.by_guest.get(guest, 0) - 1
            if n > 0:
                self.by_guest[guest] = n
            else:
                self.by_guest.pop(guest, None)

    def socket_failed(self, e: OSError, what: str) -> None:
        """Count (and now and then log) a socket that could not be made."""
        self.stats["socket_errors"] += 1
        now = time.monotonic()
        if now >= self._error_logged + 5.0:
            self._error_logged = now
            log.warning(
                "budget.socket_failed",
                what=what,
                error=str(e),
                in_use=self.in_use,
                total=self.stats["socket_errors"],
            )

    def open(
        self, family: int, type_: int, proto: int = 0, *, guest: bytes | None = None, what: str
    ) -> socket.socket:
        """A new non-blocking socket counted against the budget (and `guest`'s share).
        BudgetExceeded over the budget; OSError when socket() fails (the caller reports it
        with `socket_failed` or its own counter)."""
        owner = None if guest is None else self.owner_of(guest)
        self._check(owner, what)
        sock = _BudgetSocket(family, type_, proto)
        sock.setblocking(False)
        return self._take(sock, owner)

    def adopt(self, sock: socket.socket, *, guest: bytes | None = None, what: str) -> socket.socket:
        """Count an accepted socket; over the budget it is reset (RST) and closed, and
        BudgetExceeded raised."""
        owner = None if guest is None else self.owner_of(guest)
        try:
            self._check(owner, what)
        except BudgetExceeded:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            sock.close()
            raise
        counted = _BudgetSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        return self._take(counted, owner)

    def as_dict(self) -> dict[str, int]:
        return dict(self.stats, limit=self.limit, per_guest=self.per_guest, in_use=self.in_use)
