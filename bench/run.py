#!/usr/bin/env python3
"""netferry vs slirp4netns vs pasta, side by side, on the same machine in the same run.

    .venv/bin/python bench/run.py              # 9 rounds: bench/results/<ts>.{md,json,png}
    .venv/bin/python bench/run.py --rounds 3
    .venv/bin/python bench/run.py --quick      # 1 round, short durations, writes nothing
    .venv/bin/python bench/run.py --profile    # netferry only, py-spy on hostd + vm-switch

Needs root (network namespaces, taps). See bench/README.md for what each row measures and
how each contender is set up.

Network safety: every byte the benchmark moves goes to host loopback (127.0.0.1) or into a
namespace made here. Through slirp4netns the guest talks only to 10.0.2.2 (slirp's alias
for host loopback), through pasta only to its gateway address (which this build maps to
host loopback; verified with strace), through netferry only to 192.168.127.254. DNS is off
or pointed at a dead loopback port for all three, pasta runs with --no-icmp, nothing pings.

Layout of a run: the contenders are brought up together, one namespace each, at one MTU
(first 1500, then 65520); each row is then measured on every contender in turn, the order
rotating by round, before the next row; then the contenders are torn down. Every process,
namespace and temp dir made here is removed on exit, on Ctrl-C and on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from contenders import CONTENDERS, Contender, default_contenders, make_contender
from harness import (
    DASH,
    REAPER,
    RESULTS,
    TIMES,
    VENV_BIN,
    BenchError,
    _on_signal,
    remove_stale_namespaces,
    start_peer_server,
    versions,
)
from measurements import NOTES, ROW_INFO, ROWS, Bench, Opts, measure_phase
from report import Results, fmt, markdown_table, plot
from vmlinks import VM_CONTENDERS, Servers, measure_qemu, measure_uml, qemu_image


def bring_up(
    names: list[str], mtu: int, results: Results, round_no: int, commands: dict[str, list[str]]
) -> list[Contender]:
    up = []
    for i, name in enumerate(names):
        c = make_contender(name)
        try:
            c.setup(mtu, round_no * 10 + i)
            results.came_up.add((name, mtu))
            if c.target6:
                results.came_up.add((name, "ipv6"))  # type: ignore[arg-type]
            else:
                results.no_v6.add(name)
            up.append(c)
            commands.setdefault(f"{name} (MTU {mtu})", c.commands)
        except (BenchError, subprocess.SubprocessError, OSError) as e:
            msg = f"round {round_no + 1}: {name} at MTU {mtu} did not come up: {e}"
            results.errors.append(msg)
            print(f"  ! {msg}", file=sys.stderr)
            c.teardown()
            c.ns = ""
            up.append(c)  # keeps its place in the rotation; rows skip it
    return up


def tear_down(
    contenders: list[Contender], warnings: dict[str, int], drops: dict[str, dict[str, int]]
) -> None:
    for c in contenders:
        c.teardown()
        for k, v in getattr(c, "warnings", {}).items():
            key = f"{k} ({c.name})"
            warnings[key] = warnings.get(key, 0) + v
        per = drops.setdefault(c.name, {})
        for k, v in getattr(c, "drops", {}).items():
            per[k] = per.get(k, 0) + v


VM_SERVERS: list[Servers] = []
# Rows whose guest is missing here (UML's kernel, QEMU's cached image): left out of the table,
# with a note saying why, instead of a row of empty cells that reads as failed measurements.
SKIPPED_ROWS: set[str] = set()


def measure_vm_links(
    results: Results, names: list[str], round_no: int, quick: bool, rows_filter: set[str] | None
) -> None:
    """The VM-link rows (bench/vmlinks.py) for the contenders that have them, alternating."""
    contenders = [c for c in VM_CONTENDERS if c in names]
    if round_no % 2:
        contenders.reverse()
    mib = 16 if quick else 256
    qemu_mib = 8 if quick else 32
    if not VM_SERVERS:
        VM_SERVERS.append(Servers(mib))
    servers = VM_SERVERS[0]
    workdir = REAPER.mkdtemp()
    want = rows_filter or set(ROW_INFO)
    uml = None
    try:
        from tests.interop.uml_guest import UmlMissing, find_uml

        try:
            uml = find_uml()
        except UmlMissing as e:
            NOTES.append(f"UML rows skipped: {e}")
    except ImportError as e:
        NOTES.append(f"UML rows skipped: {e}")
    if uml is None:
        SKIPPED_ROWS.update({"uml_fetch", "uml_upload", "uml_connrate"})
    image = qemu_image()
    if image is None and "qemu_fetch" in want:
        SKIPPED_ROWS.add("qemu_fetch")
        NOTES.append("QEMU row skipped: no cached guest image (run tests/interop/test_qemu.py)")
    for c in contenders:
        for kind, ok, fn in (
            ("uml", uml is not None and want & {"uml_fetch", "uml_upload", "uml_connrate"},
             lambda c=c: measure_uml(c, servers, mib, 20 if quick else 100, workdir)),
            ("qemu", image is not None and "qemu_fetch" in want,
             lambda c=c: measure_qemu(c, servers, qemu_mib, image, workdir)),
        ):  # fmt: skip
            if not ok:
                continue
            t0 = time.monotonic()
            for key in ROW_INFO:
                if key.startswith(kind + "_") and key in want:
                    results.came_up.add((c, key))  # a figure is due in each of these rows
            try:
                figures = fn()
                for key, value in figures.items():
                    results.add(key, c, value)
            except (BenchError, subprocess.SubprocessError, OSError) as e:
                msg = f"round {round_no + 1}, {kind} {c}: {e}"
                results.errors.append(msg)
                print(f"  ! {msg}", file=sys.stderr)
            print(f"  {kind:<28} {c:<12} {time.monotonic() - t0:5.1f}s", file=sys.stderr)


def run_bench(args: argparse.Namespace) -> int:
    names = [c.strip() for c in (args.contenders or ",".join(default_contenders())).split(",")]
    names = [c for c in names if c]
    for n in names:
        if n not in CONTENDERS:
            raise SystemExit(f"unknown contender {n!r} (have {', '.join(CONTENDERS)})")
    rows_filter = set(args.rows.split(",")) if args.rows else None
    if rows_filter and rows_filter - set(ROW_INFO):
        raise SystemExit(f"unknown rows {sorted(rows_filter - set(ROW_INFO))}")
    opts = Opts(
        tput_secs=2 if args.quick else 5,
        connrate_secs=1.0 if args.quick else 3.0,
        rr_secs=1.0 if args.quick else 2.0,
        hold_n=1000,
    )
    rounds = 1 if args.quick else args.rounds
    results = Results(names)
    warnings: dict[str, int] = {}
    drops: dict[str, dict[str, int]] = {}
    commands: dict[str, list[str]] = {}
    work = REAPER.mkdtemp()
    peer, peer_port = start_peer_server(work)
    bench = Bench(opts, peer_port)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for r in range(rounds):
        for mtu in (1500, 65520):
            if rows_filter is not None and not any(
                ROW_INFO[k][4] == mtu for k in rows_filter if k in ROW_INFO
            ):
                continue
            order = names[r % len(names) :] + names[: r % len(names)]
            print(f"round {r + 1}/{rounds}, MTU {mtu}: {', '.join(order)}", file=sys.stderr)
            if peer.poll() is not None:
                peer, peer_port = start_peer_server(work)
                bench.peer_port = peer_port
            cs = bring_up(order, mtu, results, r, commands)
            try:
                measure_phase(bench, results, cs, mtu, r, rows_filter)
            finally:
                tear_down(cs, warnings, drops)
        if rows_filter is None or any(ROW_INFO[k][4] == 0 for k in rows_filter):
            measure_vm_links(results, names, r, args.quick, rows_filter)
    elapsed = time.monotonic() - started
    summary = results.summary()
    shown = (set(rows_filter) if rows_filter is not None else set(ROW_INFO)) - SKIPPED_ROWS
    table = markdown_table(summary, names, shown)
    meta = {
        "timestamp": stamp,
        "rounds": rounds,
        "quick": args.quick,
        "durations": opts.__dict__,
        "elapsed_s": round(elapsed, 1),
        "versions": versions(),
        "loadavg_start": load_start,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    print()
    print(
        f"netferry benchmark, {rounds} round(s), {elapsed:.0f} s, "
        f"{meta['versions']['cpus']} CPUs, kernel {meta['versions']['kernel']}, "
        f"load average {' '.join(load_start)} at start, {' '.join(meta['loadavg_end'])} at end"
    )
    print(table)
    extra_lines = []
    for key, per in sorted(results.extra.items()):
        if key.startswith("cpu_") and key.endswith(":host-switch"):
            row = key.split(":")[0]
            for c, vals in per.items():
                vm = results.extra.get(f"{row}:vm-switch", {}).get(c, [])
                if vals and vm:
                    extra_lines.append(
                        f"- {c} {row}: host-switch {fmt(statistics.median(vals))} + "
                        f"vm-switch {fmt(statistics.median(vm))} s/GiB (medians)"
                    )
        if key.startswith("rss_") and key.endswith(":vm-switch"):
            for c, vals in per.items():
                extra_lines.append(
                    f"- {c} vm-switch RSS with {opts.hold_n} idle conns: "
                    f"{fmt(statistics.median(vals))} MiB (median); the row above "
                    f"is host-switch alone"
                )
    # A contender that came up must have a figure in every row of its phase: a cell left
    # "—" is a failed measurement, and the run fails (the CI smoke run with it).
    for key, _label, _unit, _better, mtu in ROWS:
        if (rows_filter is not None and key not in rows_filter) or key in SKIPPED_ROWS:
            continue
        for c in names:
            due = (c, mtu) in results.came_up if mtu else (c, key) in results.came_up
            if key.startswith("tcp6_"):  # only where the contender had IPv6
                due = (c, "ipv6") in results.came_up
            if due and not results.values[key][c]:
                results.errors.append(f"{c} came up at MTU {mtu} but has no figure for {key}")
    notes = extra_lines + [f"- {n}" for n in dict.fromkeys(NOTES)]  # once, not per round
    for c, per in drops.items():
        if per:
            notes.append(
                f"- {c} counters summed over its runs: "
                + ", ".join(f"{k} {v}" for k, v in sorted(per.items()))
            )
    notes += [f"- error: {e}" for e in results.errors]
    notes += [f"- logged {k} {TIMES}{v}" for k, v in sorted(warnings.items())]
    if notes:
        print("\n" + "\n".join(notes))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        base = RESULTS / stamp
        md = [
            f"# netferry benchmark {stamp}",
            "",
            f"{rounds} rounds, interleaved; median (min{DASH}max) per contender; "
            f"ratio = netferry median ÷ contender median (↑ higher is better, "
            f"↓ lower is better).",
            "",
            "Machine: "
            + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
            + f"; load average {' '.join(load_start)} at start, "
            + f"{' '.join(meta['loadavg_end'])} at end",
            "",
            table,
            "",
        ]
        if notes:
            md += ["## Notes", "", *notes, ""]
        md += ["## Commands", ""]
        for k, cmds in commands.items():
            md += [f"{k}:", "", "```", *cmds, "```", ""]
        (base.with_suffix(".md")).write_text("\n".join(md))
        (base.with_suffix(".json")).write_text(
            json.dumps(
                {
                    "meta": meta,
                    "rows": summary,
                    "extra": results.extra,
                    "notes": NOTES,
                    "errors": results.errors,
                    "netferry_warnings": warnings,
                    "commands": commands,
                    "counters": drops,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        try:
            title = f"netferry vs slirp4netns vs pasta, {stamp}, {rounds} rounds"
            plot(summary, names, base.with_suffix(".png"), f"{title} (median, min{DASH}max)")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        print(f"\nwrote {base}.md, .json, .png")
    if results.errors:
        print(f"\n{len(results.errors)} measurement(s) failed: see the errors", file=sys.stderr)
        return 1
    return 0


# ---- profiling ------------------------------------------------------------------------------


def run_profile(args: argparse.Namespace) -> int:
    """One workload through netferry with py-spy on host-switch (and vm-switch, when it is
    in the data path): a file per process and, for the `raw` format, the hottest functions
    by own time and by total time printed here."""
    pyspy = shutil.which("py-spy", path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if not pyspy:
        raise SystemExit("py-spy is not installed (.venv/bin/pip install py-spy)")
    secs = args.profile_seconds
    work = args.profile_work
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = REAPER.mkdtemp()
    peer, peer_port = start_peer_server(tmp) if work in ("connrate", "rr") else (None, 0)
    c = make_contender(args.profile_contender)
    c.setup(args.profile_mtu, 0)
    bench = Bench(Opts(tput_secs=secs, connrate_secs=secs, rr_secs=secs, hold_n=0), peer_port)
    ext = {"raw": "txt", "speedscope": "speedscope.json", "flamegraph": "svg"}[args.profile_format]
    written = []
    try:
        spies = []
        for key, pid in c._daemons().items():
            tag = f"{work}-{args.profile_direction}" if work == "tcp" else work
            out = RESULTS / f"profile-{stamp}-{key}-{tag}-mtu{args.profile_mtu}.{ext}"
            err = open(c.dir / f"py-spy-{key}.err", "ab")
            spies.append(
                (
                    out,
                    REAPER.popen(
                        [pyspy, "record", "--pid", str(pid), "--rate", "250"]
                        + ["--duration", str(secs + 1), "--format", args.profile_format]
                        + ["--output", str(out)]
                        # native unwinding has to stop the process to read its stack
                        + ([] if args.profile_native else ["--nonblocking"])
                        + (["--idle"] if args.profile_idle else [])
                        + (["--native"] if args.profile_native else []),
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    ),
                )
            )
            err.close()
        time.sleep(1.0)
        if work == "tcp":
            gbps, cpu = bench.tcp_throughput(c, args.profile_direction == "h2g")
            result = f"{gbps:.3f} Gbit/s, {cpu:.1f} CPU s/GiB"
        elif work == "udp":
            gbps, loss = bench.udp_throughput(c)
            result = f"{gbps:.3f} Gbit/s received, {loss:.1f} % lost"
        elif work == "connrate":
            result = f"{bench.connrate(c):,.0f} connections/s"
        else:
            result = f"{bench.rr_latency(c):.0f} µs median round trip"
        print(f"{work} MTU {args.profile_mtu} under py-spy (slower than unprofiled): {result}")
        for out, sp in spies:
            try:
                sp.wait(secs + 30)
            except subprocess.TimeoutExpired:
                pass
            REAPER.stop(sp)
            if out.exists():
                written.append(out)
            else:
                print(f"py-spy wrote nothing to {out}", file=sys.stderr)
    finally:
        c.teardown()
        if peer is not None:
            REAPER.stop(peer)
    for w in written:
        print(f"wrote {w}")
        if args.profile_format == "raw":
            print(summarize_collapsed(w.read_text(), top=args.profile_top))
    return 0


def summarize_collapsed(text: str, top: int = 25) -> str:
    """py-spy's collapsed stacks ("a;b;c COUNT" per line) → own and total time per function."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        # "func (path/file.py:LINE)" → "func file.py": lines of one function add up
        frames = [
            f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")").split(":")[0]
            for f in stack.split(";")
        ]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            total[f] = total.get(f, 0) + n
    if not samples:
        return "  (no samples)"
    lines = [f"  {samples} samples; own time:"]
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / samples:5.1f} %  {f}")
    lines.append("  total time (function and what it calls):")
    for f, n in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * n / samples:5.1f} %  {f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="1 round, short durations, write nothing (CI smoke)"
    )
    ap.add_argument("--rounds", type=int, default=9, help="rounds (default 9)")
    ap.add_argument(
        "--contenders",
        default="",
        help="comma-separated subset of: " + ", ".join(CONTENDERS) + " (default: all but "
        "gvproxy, which is added when gvproxy and gvforwarder are on PATH)",
    )
    ap.add_argument(
        "--rows",
        default="",
        help="comma-separated subset of rows: " + ", ".join(k for k, *_ in ROWS),
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="netferry only: one workload (--profile-work) under py-spy on host-switch "
        "and vm-switch; files go to bench/results/, the raw format is summarized here",
    )
    ap.add_argument("--profile-work", choices=("tcp", "connrate", "rr", "udp"), default="tcp")
    ap.add_argument("--profile-format", choices=("raw", "speedscope", "flamegraph"), default="raw")
    ap.add_argument("--profile-top", type=int, default=25, help="functions listed per table")
    ap.add_argument("--profile-idle", action="store_true", help="sample idle (waiting) stacks too")
    ap.add_argument("--profile-native", action="store_true", help="C frames too (py-spy --native)")
    ap.add_argument("--profile-direction", choices=("g2h", "h2g"), default="g2h")
    ap.add_argument("--profile-mtu", type=int, default=1500)
    ap.add_argument("--profile-contender", choices=("netferry", "netferry-vm"), default="netferry")
    ap.add_argument("--profile-seconds", type=int, default=10)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/run.py needs root (network namespaces and taps)")
    for tool in ("iperf3", "ip") + (() if args.profile else ("slirp4netns", "pasta")):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    with contextlib.suppress(ValueError, OSError):
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        remove_stale_namespaces()
        return run_profile(args) if args.profile else run_bench(args)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'SIGINT'}): cleaning up", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        # no second Ctrl-C may interrupt the teardown
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        REAPER.cleanup()
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
