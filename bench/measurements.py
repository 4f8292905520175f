"""The measurements: what each row runs against a contender that is up (iperf3, the
peers in bench/peers.py), and one MTU phase of a round."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from contenders import Contender
from harness import (
    GUEST_IPERF_PORT,
    PEERS,
    PY,
    REAPER,
    BenchError,
    cpu_seconds,
    free_port,
    listening,
    ns_cmd,
    rss_mib,
    run_json,
    tail,
    wait_for,
)
from vmlinks import VM_CONTENDERS, VM_ROWS

if TYPE_CHECKING:
    from report import Results

# key, label, unit, better ("higher" | "lower"), MTU phase
ROWS: list[tuple[str, str, str, str, int]] = [
    ("tcp_g2h_1500", "TCP guest→host, MTU 1500", "Gbit/s", "higher", 1500),
    ("tcp_h2g_1500", "TCP host→guest, MTU 1500", "Gbit/s", "higher", 1500),
    ("tcp_g2h_65520", "TCP guest→host, MTU 65520", "Gbit/s", "higher", 65520),
    ("tcp_h2g_65520", "TCP host→guest, MTU 65520", "Gbit/s", "higher", 65520),
    ("tcp6_g2h_1500", "TCP over IPv6 guest→host, MTU 1500", "Gbit/s", "higher", 1500),
    ("tcp6_h2g_1500", "TCP over IPv6 host→guest, MTU 1500", "Gbit/s", "higher", 1500),
    ("tcp_connrate", "TCP connect+close guest→host", "conn/s", "higher", 1500),
    ("tcp_rr", "TCP 1-byte request-response (median)", "µs", "lower", 1500),
    ("udp_g2h", "UDP guest→host 1400 B, received", "Gbit/s", "higher", 1500),
    ("udp_g2h_loss", "UDP guest→host 1400 B, loss", "%", "lower", 1500),
    ("fwd_h2g", "TCP port forward host→guest, MTU 1500", "Gbit/s", "higher", 1500),
    ("rss_1000", "host-side RSS, 1000 idle TCP conns", "MiB", "lower", 1500),
    ("cpu_g2h_1500", "CPU per GiB, TCP guest→host MTU 1500", "s/GiB", "lower", 1500),
    ("cpu_h2g_1500", "CPU per GiB, TCP host→guest MTU 1500", "s/GiB", "lower", 1500),
    ("cpu_g2h_65520", "CPU per GiB, TCP guest→host MTU 65520", "s/GiB", "lower", 65520),
    ("cpu_h2g_65520", "CPU per GiB, TCP host→guest MTU 65520", "s/GiB", "lower", 65520),
]
ROWS += VM_ROWS  # phase 0: bench/vmlinks.py
ROW_INFO = {r[0]: r for r in ROWS}


def applies(row: str, contender: str) -> bool:
    """Whether `contender` has a figure in `row` (the VM-link rows have two contenders)."""
    return ROW_INFO[row][4] != 0 or contender in VM_CONTENDERS


# ---- measurements -------------------------------------------------------------------------


@dataclass
class Opts:
    tput_secs: int
    connrate_secs: float
    rr_secs: float
    hold_n: int


def tcp_detail(data: dict) -> dict:
    """Retransmits and stalls (1-s intervals under 5% of the run's mean rate) of an iperf3
    TCP run, to tell a steady rate from bursts and stalls."""
    rates = [i["sum"]["bits_per_second"] for i in data.get("intervals", [])]
    mean = statistics.mean(rates) if rates else 0.0
    return {
        "retransmits": data["end"].get("sum_sent", {}).get("retransmits", 0),
        "intervals": len(rates),
        "stalled_intervals": sum(1 for r in rates if mean and r < 0.05 * mean),
    }


class Bench:
    def __init__(self, opts: Opts, peer_port: int) -> None:
        self.opts = opts
        self.peer_port = peer_port
        self.last_tcp: dict = {}

    # iperf3 server on the host (127.0.0.1), client in the guest namespace
    def _host_iperf_server(self, c: Contender, v6: bool = False) -> tuple[subprocess.Popen, int]:
        port = free_port()
        assert c.dir
        srv = REAPER.popen(
            ["iperf3", "-s", "-1", "-B", "::1" if v6 else "127.0.0.1", "-p", str(port)],
            stdout=open(c.dir / "iperf3-server.out", "ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: listening(srv.pid, port) or srv.poll() is not None, 10, "iperf3 server")
        if srv.poll() is not None:
            raise BenchError(f"iperf3 server exited: {tail(c.dir / 'iperf3-server.out', 3)}")
        return srv, port

    def _finish_server(self, srv: subprocess.Popen) -> None:
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            pass
        REAPER.stop(srv)

    def tcp_throughput(self, c: Contender, reverse: bool, v6: bool = False) -> tuple[float, float]:
        """Gbit/s received, CPU seconds per GiB of the contender's processes; with `v6` to
        the host's ::1 through the contender's IPv6 host-loopback address."""
        srv, port = self._host_iperf_server(c, v6)
        try:
            args = ns_cmd(
                c.ns,
                "iperf3",
                "-c",
                c.target6 if v6 else c.target,
                "-p",
                str(port),
                "-t",
                str(self.opts.tput_secs),
                "-J",
                "--connect-timeout",
                "5000",
            )
            if reverse:
                args.append("-R")
            per0 = {k: cpu_seconds([pid]) for k, pid in c.rss_pids().items()}
            cpu0 = cpu_seconds(c.cpu_pids())
            data = run_json(args, timeout=self.opts.tput_secs + 30)
            cpu1 = cpu_seconds(c.cpu_pids())
            per1 = {k: cpu_seconds([pid]) for k, pid in c.rss_pids().items()}
        finally:
            self._finish_server(srv)
        rcv = data["end"]["sum_received"]
        gib = rcv["bytes"] / 2**30
        self.last_tcp = tcp_detail(data)
        # per-process CPU seconds per GiB (host-switch vs vm-switch for netferry)
        self.last_tcp["cpu_split"] = {
            k: (per1[k] - per0[k]) / gib if gib else float("nan") for k in per0
        }
        return rcv["bits_per_second"] / 1e9, (cpu1 - cpu0) / gib if gib else float("nan")

    def udp_throughput(self, c: Contender) -> tuple[float, float]:
        """Received Gbit/s and loss % for 1400-byte datagrams sent as fast as possible."""
        srv, port = self._host_iperf_server(c)
        try:
            args = ns_cmd(
                c.ns,
                "iperf3",
                "-c",
                c.target,
                "-p",
                str(port),
                "-u",
                "-b",
                "0",
                "-l",
                "1400",
                "-t",
                str(self.opts.tput_secs),
                "-J",
                "--connect-timeout",
                "5000",
            )
            data = run_json(args, timeout=self.opts.tput_secs + 30)
        finally:
            self._finish_server(srv)
        s = data["end"]["sum"]
        packets, lost = s["packets"], s["lost_packets"]
        received_bits = (packets - lost) * 1400 * 8
        return received_bits / s["seconds"] / 1e9, (100.0 * lost / packets if packets else 100.0)

    def forward_throughput(self, c: Contender) -> float:
        """iperf3 server in the guest, client on the host through the contender's forward."""
        assert c.dir
        out = open(c.dir / "iperf3-guest.out", "ab")
        srv = REAPER.popen(
            ns_cmd(c.ns, "iperf3", "-s", "-1", "-B", "0.0.0.0", "-p", str(GUEST_IPERF_PORT)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        try:
            wait_for(
                lambda: listening(srv.pid, GUEST_IPERF_PORT) or srv.poll() is not None,
                10,
                "iperf3 server in the guest",
            )
            args = [
                "iperf3",
                "-c",
                "127.0.0.1",
                "-p",
                str(c.fwd_port),
                "-t",
                str(self.opts.tput_secs),
                "-J",
                "--connect-timeout",
                "5000",
            ]
            data = run_json(args, timeout=self.opts.tput_secs + 30)
        finally:
            self._finish_server(srv)
        return data["end"]["sum_received"]["bits_per_second"] / 1e9

    def connrate(self, c: Contender) -> float:
        data = run_json(
            ns_cmd(
                c.ns,
                PY,
                PEERS,
                "connrate",
                c.target,
                str(self.peer_port),
                str(self.opts.connrate_secs),
            ),
            timeout=self.opts.connrate_secs + 60,
        )
        if data["errors"]:
            c_err = f"{c.name} connrate: {data['errors']} errors, first {data['first_error']}"
            NOTES.append(c_err)
        return data["per_second"]

    def rr_latency(self, c: Contender) -> float:
        data = run_json(
            ns_cmd(
                c.ns,
                PY,
                PEERS,
                "pingpong",
                c.target,
                str(self.peer_port),
                str(self.opts.rr_secs),
                "200000",
            ),
            timeout=self.opts.rr_secs + 60,
        )
        return data["median_us"]

    def rss_with_idle_conns(self, c: Contender) -> dict[str, float]:
        client = REAPER.popen(
            ns_cmd(c.ns, PY, PEERS, "hold", c.target, str(self.peer_port), str(self.opts.hold_n)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            import select

            r, _, _ = select.select([client.stdout], [], [], 90)
            if not r:
                raise BenchError("hold client: no report in 90 s")
            line = client.stdout.readline()
            report = json.loads(line) if line.strip() else {}
            if report.get("alive") != self.opts.hold_n:
                NOTES.append(f"{c.name} hold: {report or 'client died'}")
                if not report.get("alive"):
                    raise BenchError(f"hold client: {report}")
            time.sleep(1.0)  # let the contender settle (timers, buffers) before sampling
            return {k: rss_mib(pid) for k, pid in c.rss_pids().items()}
        finally:
            if client.stdin:
                with contextlib.suppress(OSError):
                    client.stdin.close()
            try:
                client.wait(15)
            except subprocess.TimeoutExpired:
                pass
            REAPER.stop(client)


NOTES: list[str] = []


def measure_phase(
    bench: Bench,
    results: Results,
    contenders: list[Contender],
    mtu: int,
    round_no: int,
    rows_filter: set[str] | None,
) -> None:
    """Measure every row of this MTU phase on every contender that came up, in the
    (already rotated) order of `contenders`."""
    order = contenders

    def each(row_keys: list[str], fn) -> None:
        if rows_filter is not None and not (set(row_keys) & rows_filter):
            return
        for c in order:
            if not c.ns:
                continue
            t0 = time.monotonic()
            try:
                c.check_alive()
                fn(c)
            except BenchError as e:
                msg = f"round {round_no + 1}, MTU {mtu}, {c.name}, {'/'.join(row_keys)}: {e}"
                results.errors.append(msg)
                print(f"  ! {msg}", file=sys.stderr)
            except subprocess.TimeoutExpired as e:
                msg = (
                    f"round {round_no + 1}, MTU {mtu}, {c.name}, {'/'.join(row_keys)}: "
                    f"timed out ({e.timeout:.0f}s): {' '.join(map(str, e.cmd))[:160]}"
                )
                results.errors.append(msg)
                print(f"  ! {msg}", file=sys.stderr)
            print(
                f"  {'/'.join(row_keys):<28} {c.name:<12} {time.monotonic() - t0:5.1f}s",
                file=sys.stderr,
            )

    def tput(reverse: bool):
        d = "h2g" if reverse else "g2h"

        def fn(c: Contender) -> None:
            gbps, cpu = bench.tcp_throughput(c, reverse)
            results.add(f"tcp_{d}_{mtu}", c.name, gbps)
            results.add(f"cpu_{d}_{mtu}", c.name, cpu)
            detail = bench.last_tcp
            if len(detail["cpu_split"]) > 1:
                for proc, v in detail["cpu_split"].items():
                    results.add_extra(f"cpu_{d}_{mtu}:{proc}", c.name, v)
            results.add_extra(f"retransmits:tcp_{d}_{mtu}", c.name, detail["retransmits"])
            if detail["stalled_intervals"]:
                NOTES.append(
                    f"round {round_no + 1}: {c.name} tcp_{d}_{mtu}: "
                    f"{detail['stalled_intervals']} of {detail['intervals']} 1-s intervals "
                    f"stalled (<5% of mean), {detail['retransmits']} retransmits"
                )

        return fn

    each([f"tcp_g2h_{mtu}", f"cpu_g2h_{mtu}"], tput(False))
    each([f"tcp_h2g_{mtu}", f"cpu_h2g_{mtu}"], tput(True))
    if mtu != 1500:
        return

    def tput6(reverse: bool):
        key = f"tcp6_{'h2g' if reverse else 'g2h'}_1500"

        def fn(c: Contender) -> None:
            if not c.target6:  # the contender has no IPv6 (here): left out, with why
                NOTES.append(f"{c.name} has no figure in the IPv6 rows: {c.why_no_v6}")
                return
            gbps, _cpu = bench.tcp_throughput(c, reverse, v6=True)
            results.add(key, c.name, gbps)

        return fn

    each(["tcp6_g2h_1500"], tput6(False))
    each(["tcp6_h2g_1500"], tput6(True))
    each(["tcp_connrate"], lambda c: results.add("tcp_connrate", c.name, bench.connrate(c)))
    each(["tcp_rr"], lambda c: results.add("tcp_rr", c.name, bench.rr_latency(c)))

    def udp(c: Contender) -> None:
        gbps, loss = bench.udp_throughput(c)
        results.add("udp_g2h", c.name, gbps)
        results.add("udp_g2h_loss", c.name, loss)

    each(["udp_g2h", "udp_g2h_loss"], udp)
    each(["fwd_h2g"], lambda c: results.add("fwd_h2g", c.name, bench.forward_throughput(c)))

    def rss(c: Contender) -> None:
        r = bench.rss_with_idle_conns(c)
        main = r.get("host-switch", next(iter(r.values())))
        results.add("rss_1000", c.name, main)
        for k, v in r.items():
            results.add_extra(f"rss_1000:{k}", c.name, v)

    each(["rss_1000"], rss)
