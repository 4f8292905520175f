"""The state file: what users changed at run time survives a hostd restart.

What is kept: forwards added through an API, DNS changes (records, zones, gvproxy's regexp
records and DefaultIP) as a difference from what the flags made, dynamic DHCP leases, dynamic
DHCPv6 leases (`leases6`, with the client's DUID and IAID, so that a returning client's
RENEW finds its binding; the server's own DUID is the gateway MAC's DUID-LL, the same on
every start), and outbound policy rules added at run time. Flags are not copied in: they
are the source of truth for themselves, so a changed flag takes effect on the next start.

Writes: every change marks the state dirty; one write is scheduled on the loop (changes in
the same turn share it) and the JSON goes to disk in a worker thread (tmp file in the same
directory, fsync, rename, fsync of the directory), so the event loop never waits on the
disk. A change during a write schedules one more write after it. On SIGTERM the final
write is synchronous. Restore runs at start, before the links open.

A file that cannot be read or parsed is an error naming the file (hostd does not start), or,
with --state-reset-on-error, it is moved aside to PATH.corrupt-<time> and hostd starts
fresh, saying so in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import time
from typing import TYPE_CHECKING, Any

import structlog

from netferry.hostd.errors import ControlError
from netferry.hostd.policy import PolicyError, parse_rule
from netferry.hostd.services.dns import DnsRecord

if TYPE_CHECKING:
    from netferry.hostd.control import Control

log = structlog.get_logger("hostd.state")

VERSION = 1


class StateError(Exception):
    """The state file cannot be used; the message names the file and what is wrong."""


# ---- DNS as a difference from the flags ---------------------------------------------------

RecordKey = tuple[str, str, str, int]  # name, type, value, ttl


def dns_snapshot(control: Control) -> dict[str, dict[str, Any]]:
    """zone → {"records": set of RecordKey, "patterns": list of (regexp, ip), "default": ip}"""
    out: dict[str, dict[str, Any]] = {}
    for zone, records in control.dns_zones():
        patterns, default = control.dns_extras(zone)
        out[zone] = {
            "records": {(r.name, r.rtype, r.value, r.ttl) for r in records},
            "patterns": list(patterns),
            "default": default,
        }
    return out


def dns_diff(base: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> dict[str, Any]:
    zones = []
    for zone, cur in sorted(now.items()):
        old = base.get(zone, {"records": set(), "patterns": [], "default": None})
        entry: dict[str, Any] = {"name": zone}
        if zone not in base:
            entry["created"] = True
        added = sorted(cur["records"] - old["records"])
        removed = sorted(old["records"] - cur["records"])
        if added:
            entry["records"] = [list(r) for r in added]
        if removed:
            entry["removed"] = [list(r) for r in removed]
        p_added = [p for p in cur["patterns"] if p not in old["patterns"]]
        p_removed = [p[0] for p in old["patterns"] if p not in cur["patterns"]]
        if p_added:
            entry["patterns"] = [list(p) for p in p_added]
        if p_removed:
            entry["removed_patterns"] = p_removed
        if cur["default"] != old["default"]:
            entry["default"] = cur["default"] or ""
        if len(entry) > 1:
            zones.append(entry)
    removed_zones = sorted(z for z in base if z not in now)
    return {"zones": zones, "removed_zones": removed_zones}


class StateStore:
    def __init__(self, control: Control, path: str) -> None:
        self.control = control
        self.path = os.path.abspath(path)
        self.dns_base: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._writing: asyncio.Task[None] | None = None
        self._scheduled = False
        self.writes = 0

    # ---- load ---------------------------------------------------------------------------

    def read(self) -> dict[str, Any] | None:
        """The parsed file, None when it does not exist; StateError for anything else."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"state file {self.path}: cannot read: {e.strerror or e}") from None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise StateError(f"state file {self.path}: not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise StateError(
                f"state file {self.path}: not a netferry state file (version {VERSION} expected)"
            )
        for key, kind in (
            ("forwards", list),
            ("leases", list),
            ("leases6", list),
            ("policy", list),
            ("dns", dict),
        ):
            if not isinstance(data.get(key, kind()), kind):
                raise StateError(f"state file {self.path}: {key}: expected a {kind.__name__}")
        return data

    def move_aside(self) -> str:
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        os.replace(self.path, aside)
        return aside

    async def restore(self, data: dict[str, Any]) -> None:
        """Apply a state read by `read` on top of what the flags made. Entries that no
        longer apply (an expired lease, a port now taken) are logged and skipped; a
        malformed entry is a StateError naming it."""
        c = self.control
        try:
            self._restore_dns(data.get("dns", {}))
            for i, item in enumerate(data.get("policy", [])):
                try:
                    c.switch.network.policy.add(parse_rule(item["action"], item["rule"]))
                except (KeyError, TypeError, PolicyError) as e:
                    raise StateError(f"state file {self.path}: policy[{i}]: {e}") from None
            c.switch.apply_policy()
            self._restore_leases(data.get("leases", []))
            self._restore_leases6(data.get("leases6", []))
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"state file {self.path}: {type(e).__name__}: {e}") from None
        for item in data.get("forwards", []):
            try:
                protocol, local, remote = item["protocol"], item["local"], item["remote"]
            except (KeyError, TypeError):
                raise StateError(f"state file {self.path}: forwards: bad entry {item!r}") from None
            if (protocol, local) in c.forwards.table:
                continue  # also given as a flag
            try:
                await c.forwards.expose(protocol, local, remote)
            except ControlError as e:
                log.error("state.forward_not_restored", forward=f"{protocol} {local}", error=str(e))
        log.info(
            "state.restored",
            path=self.path,
            forwards=len(c.forwards.table) - len(c.static_forwards),
            leases=len(data.get("leases", [])),
            leases6=len(data.get("leases6", [])),
            policy_rules=len(data.get("policy", [])),
            dns_zones=len(data.get("dns", {}).get("zones", [])),
        )

    def _restore_dns(self, dns: dict[str, Any]) -> None:
        zones = self.control.switch.network.zones
        for zone in dns.get("removed_zones", []):
            zones.remove_zone(zone)
        for entry in dns.get("zones", []):
            zname = entry["name"]
            zones.add_zone(zname)
            removed = [DnsRecord(*r) for r in entry.get("removed", [])]
            if removed:
                current = dict(zones.zones()).get(zname, [])
                gone = {(r.name, r.rtype, r.value) for r in removed}
                owners = {r.name for r in removed}
                keep = [
                    r
                    for r in current
                    if r.name in owners and (r.name, r.rtype, r.value) not in gone
                ]
                zones.remove_records(zname, sorted(owners))
                if keep:
                    zones.add_records(zname, keep)
            records = [DnsRecord(*r) for r in entry.get("records", [])]
            if records:
                zones.add_records(zname, records)
            for pattern in entry.get("removed_patterns", []):
                zones.remove_pattern(zname, pattern)
            for pattern, address in entry.get("patterns", []):
                zones.add_pattern(zname, pattern, address)
            if "default" in entry:
                zones.set_default(zname, entry["default"] or None)

    def _restore_leases(self, leases: list[dict[str, Any]]) -> None:
        sw = self.control.switch
        now = sw.loop.time()
        offset = time.time() - now
        for i, item in enumerate(leases):
            if not isinstance(item, dict):
                raise StateError(f"state file {self.path}: leases[{i}]: not an object")
            ip = ipaddress.IPv4Address(item["ip"])
            expires = float(item["expires"]) - offset
            if not sw.network.dhcp.restore_lease(
                item["mac"], ip, expires, item.get("hostname") or None, now
            ):
                log.info("state.lease_not_restored", mac=item["mac"], ip=str(ip))

    def _restore_leases6(self, leases: list[dict[str, Any]]) -> None:
        from netferry.hostd.services.dhcpv6 import Lease as Lease6

        sw = self.control.switch
        dhcp6 = getattr(sw.network, "dhcp6", None)
        if dhcp6 is None:
            if leases:
                log.info("state.leases6_not_restored", leases=len(leases), reason="IPv6 is off")
            return
        now = sw.loop.time()
        offset = time.time() - now
        for i, item in enumerate(leases):
            if not isinstance(item, dict):
                raise StateError(f"state file {self.path}: leases6[{i}]: not an object")
            lease = Lease6(
                mac=str(item.get("mac", "")),
                ip=ipaddress.IPv6Address(item["ip"]),
                expires=float(item["expires"]) - offset,
                hostname=item.get("hostname") or None,
                static=False,
                duid=str(item["duid"]),
                iaid=int(item["iaid"]),
            )
            if not dhcp6.restore_lease(lease, now):
                log.info("state.lease6_not_restored", duid=lease.duid, ip=str(lease.ip))

    def _leases6_snapshot(self) -> list[dict[str, Any]]:
        sw = self.control.switch
        dhcp6 = getattr(sw.network, "dhcp6", None)
        if dhcp6 is None:
            return []
        now = sw.loop.time()
        offset = time.time() - now
        return [
            {
                "duid": lease.duid,
                "iaid": lease.iaid,
                "mac": lease.mac,
                "ip": str(lease.ip),
                "expires": round(lease.expires + offset, 3),
                "hostname": lease.hostname or "",
            }
            for lease in dhcp6.leases(now)
            if not lease.static
        ]

    # ---- save ---------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        c = self.control
        forwards = [
            {"protocol": f.protocol, "local": f.local, "remote": str(f.remote)}
            for f in c.list_forwards()
            if f.key not in c.static_forwards
        ]
        leases = [
            {
                "mac": lease.mac,
                "ip": str(lease.ip),
                "expires": round(lease.expires, 3),
                "hostname": lease.hostname or "",
            }
            for lease in c.leases()
            if not lease.static and lease.ip.version == 4  # DHCPv6's: leases6
        ]
        policy = [{"action": r.action, "rule": r.target} for r in c.switch.network.policy.rules]
        data = {
            "version": VERSION,
            "forwards": forwards,
            "dns": dns_diff(self.dns_base, dns_snapshot(c)),
            "leases": leases,
            "leases6": self._leases6_snapshot(),
            "policy": policy,
        }
        return json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"

    def write(self, data: bytes) -> None:
        """Atomically replace the file with `data` (blocking: call from a thread or at exit)."""
        directory = os.path.dirname(self.path) or "."
        tmp = f"{self.path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self.writes += 1

    def changed(self) -> None:
        """Mark dirty; one write follows (after the running one, if any)."""
        self._dirty = True
        if self._scheduled or self._writing is not None:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._start_write)

    def _start_write(self) -> None:
        self._scheduled = False
        if not self._dirty or self._writing is not None:
            return
        self._dirty = False
        data = self.snapshot()  # taken on the loop: consistent
        self._writing = asyncio.get_running_loop().create_task(self._write_async(data))

    async def _write_async(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self.write, data)
        except OSError as e:
            log.error("state.write_failed", path=self.path, error=str(e))
        finally:
            self._writing = None
        if self._dirty:
            self._start_write()

    async def close(self) -> None:
        """The final write (SIGTERM, SIGINT): wait for a running one, then write now."""
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await self._writing
        try:
            self.write(self.snapshot())
        except OSError as e:
            log.error("state.write_failed", path=self.path, error=str(e))
