"""netferry-gvproxy: every gvproxy flag and YAML key → host-switch's command line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netferry.hostd import cli as hostd_cli
from netferry.hostd.gvproxy_cli import (
    GvproxyError,
    main,
    remove_pid_file,
    translate,
    write_pid_file,
)

BASE_TAIL = ["--api", "none", "--no-ipv6"]  # gvproxy serves no IPv6


def argv_of(*gvproxy: str) -> list[str]:
    return translate(list(gvproxy)).argv


def pairs(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def test_defaults_as_gvproxy() -> None:
    argv = argv_of("-listen-qemu", "unix:///tmp/q.sock")
    assert argv == [
        "--listen", "unix:///tmp/q.sock",
        "--subnet", "192.168.127.0/24", "--mtu", "1500",
        "--port-forward", "127.0.0.1:2222=192.168.127.2:22",
        *BASE_TAIL,
    ]  # fmt: skip
    # and host-switch's own parser takes it
    hostd_cli.build_parser().parse_args(argv)


@pytest.mark.parametrize(
    "flags, option, values",
    [
        (["-listen", "unix:///n.sock", "--listen=tcp://127.0.0.1:7777"], "--http-api",
         ["unix:///n.sock", "tcp://127.0.0.1:7777"]),
        (["-services", "unix:///s.sock"], "--http-api", ["unix:///s.sock?connect=0"]),
        (["-services", "unix:///s.sock?x=1"], "--http-api", ["unix:///s.sock?x=1&connect=0"]),
        (["-listen-qemu", "tcp://127.0.0.1:1234"], "--listen", ["tcp://127.0.0.1:1234"]),
        (["-listen-bess", "unixpacket:///b.sock"], "--listen", ["unixpacket:///b.sock"]),
        (["-listen-stdio", "yes"], "--listen", ["stdio://"]),
        (["-listen-vfkit", "unixgram:///v.sock"], "--listen", ["unixgram:///v.sock"]),
        (["-listen-qemu", "unix:///q", "-mtu", "0"], "--mtu", ["1500"]),
        (["-listen-qemu", "unix:///q", "-mtu=9000"], "--mtu", ["9000"]),
        (["-listen-qemu", "unix:///q", "-subnet", "10.0.5.0/24"], "--subnet", ["10.0.5.0/24"]),
        (["-listen-qemu", "unix:///q", "-subnet", "10.0.5.7/24"], "--subnet", ["10.0.5.0/24"]),
        (["-listen-qemu", "unix:///q", "-pcap", "/t/c.pcap"], "--pcap", ["/t/c.pcap"]),
        (["-listen-qemu", "unix:///q", "-log-file", "/t/l"], "--log-file", ["/t/l"]),
        (["-listen-qemu", "unix:///q", "-ssh-port", "-1"], "--port-forward", []),
        (["-listen-qemu", "unix:///q", "-ssh-port", "2022"], "--port-forward",
         ["127.0.0.1:2022=192.168.127.2:22"]),
        (["-listen-qemu", "unix:///q", "-subnet", "10.0.5.0/24"], "--port-forward",
         ["127.0.0.1:2222=10.0.5.2:22"]),
        (["-listen-qemu", "unix:///q", "-deviceIP", "192.168.127.9"], "--port-forward",
         ["127.0.0.1:2222=192.168.127.9:22"]),
        (["-listen-qemu", "unix:///q", "-deviceIP", "192.168.127.9"], "--guest-ip",
         ["192.168.127.9"]),
        (["-listen-qemu", "unix:///q", "-gatewayIP", "192.168.127.7"], "--gateway-ip",
         ["192.168.127.7"]),
        (["-listen-qemu", "unix:///q", "-hostIP", "192.168.127.200"], "--host-ip",
         ["192.168.127.200"]),
        # the subnet-derived defaults are not emitted
        (["-listen-qemu", "unix:///q", "-gatewayIP", "192.168.127.1", "-deviceIP",
          "192.168.127.2", "-hostIP", "192.168.127.254"], "--gateway-ip", []),
        (["-listen-qemu", "unix:///q", "-api", "unix:///g.sock"], "--api", ["unix:///g.sock"]),
        (["-listen-qemu", "unix:///q", "-dns-upstream", "127.0.0.1:5353"], "--dns-upstream",
         ["127.0.0.1:5353"]),
    ],
)  # fmt: skip
def test_flag_translation(flags: list[str], option: str, values: list[str]) -> None:
    assert pairs(argv_of(*flags), option) == values


def test_debug_flag() -> None:
    assert "--debug" in argv_of("-debug", "-listen-qemu", "unix:///q")
    assert "--debug" not in argv_of("-debug=false", "-listen-qemu", "unix:///q")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-listen-vpnkit", "unix:///v"], "-listen-vpnkit: not supported"),
        (["-listen-qemu", "unix:///q", "-forward-sock", "/s"], "-forward-sock: not supported"),
        (["-listen-qemu", "unix:///q", "-forward-dest", "/d"], "-forward-dest: not supported"),
        (["-listen-qemu", "unix:///q", "-forward-user", "u"], "-forward-user: not supported"),
        (["-listen-qemu", "unix:///q", "-forward-identity", "k"],
         "-forward-identity: not supported"),
        (["-listen-qemu", "unix:///q", "-ec2-metadata-access"], "-ec2-metadata-access: not"),
        (["-listen-qemu", "unix:///q", "-notification", "unix:///n"], "-notification: not"),
        (["-listen-bess", "unix:///b"], "bess listen address must be unixpacket://"),
        (["-listen-vfkit", "unix:///v"], "vfkit listen address must be unixgram://"),
        (["-listen-qemu", "vsock://3:1"], "expected unix://PATH or tcp://HOST:PORT"),
        (["-listen-qemu", "unix:///q", "-listen-bess", "unixpacket:///b"], "cannot be used"),
        (["-listen-qemu", "unix:///q", "-ssh-port", "22"], "-ssh-port 22: must be -1"),
        (["-listen-qemu", "unix:///q", "-ssh-port", "70000"], "-ssh-port 70000"),
        (["-listen-qemu", "unix:///q", "-subnet", "nope"], "-subnet: invalid subnet 'nope'"),
        (["-listen-qemu", "unix:///q", "-subnet", "fd00::/64"], "only IPv4"),
        (["-listen-qemu", "unix:///q", "-mtu", "-5"], "-mtu -5"),
        (["-listen-qemu", "unix:///q", "-deviceIP", "10.1.1.1"], "-deviceIP 10.1.1.1: not in"),
        (["-listen-qemu", "unix:///q", "-hostIP", "192.168.127.1"], "three different"),
        (["-listen-qemu", "unix:///q", "-gatewayIP", "x"], "-gatewayIP: 'x' is not an IPv4"),
        ([], "no listener"),
        (["-nonsense"], "flag provided but not defined: -nonsense"),
        (["-listen-qemu"], "flag needs an argument: -listen-qemu"),
        (["-debug=maybe", "-listen-qemu", "unix:///q"], 'invalid boolean value "maybe"'),
    ],
)  # fmt: skip
def test_flag_errors(flags: list[str], message: str) -> None:
    with pytest.raises(GvproxyError) as e:
        translate(flags)
    assert message in str(e.value)
    assert e.value.exit_code == 2


def test_main_exits_2_naming_the_flag(capsys) -> None:
    assert main(["-listen-vpnkit", "unix:///v"]) == 2
    assert "-listen-vpnkit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["-frobnicate"])
    assert e.value.code == 2
    assert "flag provided but not defined: -frobnicate" in capsys.readouterr().err
    assert main(["-version"]) == 0
    assert "gvproxy version" in capsys.readouterr().out


# ---- -config: gvproxy's YAML -----------------------------------------------------------------

FULL_CONFIG = """
listen: [unix:///tmp/network.sock]
log-level: debug
stack:
  debug: false
  capture-file: /tmp/cap.pcap
  mtu: 4000
  subnet: 10.9.0.0/24
  gatewayIP: 10.9.0.1
  deviceIP: 10.9.0.2
  hostIP: 10.9.0.254
  gatewayMacAddress: 5a:94:ef:e4:0c:aa
  dns:
    - name: containers.internal.
      records:
        - {name: gateway, ip: 10.9.0.1}
        - {name: host, ip: 10.9.0.254}
  dnsSearchDomains: [example.com, corp.test]
  forwards: {"127.0.0.1:2223": "10.9.0.2:22", "udp:127.0.0.1:5353": "10.9.0.2:53"}
  nat: {10.9.0.254: 127.0.0.1}
  gatewayVirtualIPs: [10.9.0.254]
  dhcpStaticLeases: {10.9.0.2: "5a:94:ef:e4:0c:ee"}
  vpnKitUUIDMacAddresses: {c3d68012-0208-11ea-9fd7-f2189899ab08: "5a:94:ef:e4:0c:ee"}
  ec2MetadataAccess: false
  tcpMaxInFlight: 128
  tcpConnectTimeout: 30
interfaces: {vpnkit: "", qemu: "unix:///tmp/qemu.sock", bess: "", stdio: "", vfkit: ""}
forwards: []
pid-file: /tmp/gvproxy.pid
log-file: /tmp/gvproxy.log
services: unix:///tmp/services.sock
ec2-metadata-access: false
notification: ""
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "gvproxy.yaml"
    p.write_text(text)
    return str(p)


def test_full_config(tmp_path: Path) -> None:
    t = translate(["-config", write(tmp_path, FULL_CONFIG)])
    a = t.argv
    assert pairs(a, "--listen") == ["unix:///tmp/qemu.sock"]
    assert pairs(a, "--http-api") == ["unix:///tmp/network.sock",
                                      "unix:///tmp/services.sock?connect=0"]  # fmt: skip
    assert pairs(a, "--subnet") == ["10.9.0.0/24"] and pairs(a, "--mtu") == ["4000"]
    assert pairs(a, "--gateway-ip") == pairs(a, "--guest-ip") == pairs(a, "--host-ip") == []
    assert pairs(a, "--gateway-mac") == ["5a:94:ef:e4:0c:aa"]
    assert pairs(a, "--static-lease") == ["5a:94:ef:e4:0c:ee=10.9.0.2"]
    assert pairs(a, "--dns-record") == ["gateway.containers.internal=A:10.9.0.1",
                                        "host.containers.internal=A:10.9.0.254"]  # fmt: skip
    assert pairs(a, "--dns-search") == ["example.com", "corp.test"]
    # config mode: no SSH forward of its own, only the file's forwards
    assert pairs(a, "--port-forward") == ["tcp:127.0.0.1:2223=10.9.0.2:22",
                                          "udp:127.0.0.1:5353=10.9.0.2:53"]  # fmt: skip
    assert pairs(a, "--tcp-max-pending") == ["128"]
    assert pairs(a, "--tcp-connect-timeout") == ["30.0"]
    assert pairs(a, "--pcap") == ["/tmp/cap.pcap"] and "--debug" in a
    assert pairs(a, "--log-file") == ["/tmp/gvproxy.log"] and t.pid_file == "/tmp/gvproxy.pid"
    assert t.warnings == []
    parsed = hostd_cli.build_parser().parse_known_args(a)[0]  # --http-api etc. come with the lead
    assert hostd_cli.config_from_args(parsed).mtu == 4000
    for spec in parsed.port_forward:
        hostd_cli.parse_port_forward(spec)


def test_flags_override_the_config(tmp_path: Path) -> None:
    t = translate(["-config", write(tmp_path, FULL_CONFIG), "-listen-qemu", "unix:///o.sock",
                   "-mtu", "1500", "-pid-file", "/o.pid", "-listen", "unix:///o-api.sock",
                   "-ssh-port", "2022", "-pcap", "/o.pcap"])  # fmt: skip
    a = t.argv
    assert pairs(a, "--listen") == ["unix:///o.sock"] and pairs(a, "--mtu") == ["1500"]
    assert pairs(a, "--http-api")[0] == "unix:///o-api.sock" and t.pid_file == "/o.pid"
    assert pairs(a, "--pcap") == ["/o.pcap"]
    assert "127.0.0.1:2022" not in " ".join(a)  # -ssh-port is ignored with -config, as gvproxy
    assert any("-ssh-port is ignored" in w for w in t.warnings)


def test_minimal_and_empty_config(tmp_path: Path) -> None:
    a = translate(["-config", write(tmp_path, "interfaces: {qemu: unix:///q}\n")]).argv
    assert a == ["--listen", "unix:///q", "--subnet", "192.168.127.0/24", "--mtu", "1500",
                 *BASE_TAIL]  # fmt: skip
    a = translate(["-config", write(tmp_path, ""), "-listen-qemu", "unix:///q"]).argv
    assert "--port-forward" not in a
    # empty nat / gatewayVirtualIPs are gvproxy's defaults
    a = translate(["-config", write(tmp_path, "stack: {nat: {}, gatewayVirtualIPs: []}\n"),
                   "-listen-qemu", "unix:///q"]).argv  # fmt: skip
    assert "--subnet" in a


def test_unknown_keys_warn(tmp_path: Path) -> None:
    text = "colour: blue\nstack: {shade: 3}\ninterfaces: {qemu: 'unix:///q', tap: x}\n"
    t = translate(["-config", write(tmp_path, text)])
    assert t.warnings == [
        "config: unknown key 'colour' ignored (gvproxy ignores it too)",
        "config: unknown key interfaces.tap ignored",
        "config: unknown key stack.shade ignored",
    ]


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("stack: {dns: [{name: z., records: [{regexp: '^.*$', ip: bad}]}]}",
         "stack.dns[0].records[0].ip: 'bad' is not an IPv4"),
        ("stack: {dns: [{name: z., defaultIP: 1.2.x}]}", "stack.dns[0].defaultIP"),
        ("stack: {dns: [{name: z., records: [{name: a, ip: nope}]}]}",
         "stack.dns[0].records[0].ip: 'nope' is not an IPv4"),
        ("stack: {dns: [{records: []}]}", "stack.dns[0].name: a zone needs a name"),
        ("stack: {nat: {192.168.127.254: 10.0.0.1}}", "stack.nat: only"),
        ("stack: {nat: {192.168.127.9: 127.0.0.1}}", "stack.nat: only"),
        ("stack: {gatewayVirtualIPs: [192.168.127.254, 192.168.127.9]}",
         "stack.gatewayVirtualIPs: only [192.168.127.254]"),
        ("stack: {ec2MetadataAccess: true}", "stack.ec2MetadataAccess: not supported"),
        ("ec2-metadata-access: true", "ec2-metadata-access: not supported"),
        ("notification: unix:///n.sock", "notification: notifications are not implemented"),
        ("forwards: [{socket: /s, dest: /d, user: root, identity: /k}]",
         "forwards: SSH unix-socket forwards are not supported"),
        ("interfaces: {vpnkit: unix:///v}", "interfaces.vpnkit"),
        ("stack: {mtu: big}", "stack.mtu: 'big' is not a number"),
        ("stack: {tcpMaxInFlight: many}", "stack.tcpMaxInFlight: 'many' is not a number"),
        ("stack: {tcpConnectTimeout: [1]}", "stack.tcpConnectTimeout: [1] is not a number"),
        ("stack: [1]", "stack: expected a mapping"),
        ("listen: unix:///x", "listen: expected a list"),
        ("- 1\n- 2", "expected a mapping at the top level"),
        ("stack: {mtu: [", "not valid YAML"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(tmp_path: Path, yaml_text: str, message: str) -> None:
    with pytest.raises(GvproxyError) as e:
        translate(["-config", write(tmp_path, yaml_text), "-listen-qemu", "unix:///q"])
    assert message in str(e.value)
    assert e.value.exit_code == 1


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(GvproxyError, match="No such file"):
        translate(["-config", str(tmp_path / "absent.yaml")])


def test_pid_file_is_ours_only(tmp_path: Path) -> None:
    p = tmp_path / "g.pid"
    write_pid_file(str(p))
    assert p.read_text() == f"{os.getpid()}\n"
    remove_pid_file(str(p))
    assert not p.exists()
    p.write_text("1\n")  # another process's: left alone
    remove_pid_file(str(p))
    assert p.exists()


def test_regexp_records_and_default_ip_pass_through(tmp_path: Path) -> None:
    text = (
        "stack:\n  dns:\n    - name: apps-crc.testing.\n      records:\n"
        "        - {regexp: '^.*=x$', ip: 192.168.127.11}\n"
        "        - {name: api, ip: 192.168.127.12}\n"
        "      defaultIP: 192.168.127.13\n"
    )
    argv = translate(["-listen-qemu", "unix:///q.sock", "-config", write(tmp_path, text)]).argv
    assert argv[argv.index("--dns-regexp") + 1] == "apps-crc.testing.=192.168.127.11=^.*=x$"
    assert argv[argv.index("--dns-default") + 1] == "apps-crc.testing.=192.168.127.13"
    assert argv[argv.index("--dns-record") + 1] == "api.apps-crc.testing=A:192.168.127.12"


def test_tcp_listen_is_served_without_a_token_as_gvproxy() -> None:
    assert "--insecure-tcp-api" in translate(["-listen", "tcp://127.0.0.1:7777"]).argv
    assert "--insecure-tcp-api" not in translate(["-listen", "unix:///n.sock"]).argv


def test_ipv6_is_off_as_gvproxy_unless_asked_for() -> None:
    base = ["-listen-qemu", "unix:///q"]
    off = argv_of(*base)
    assert "--no-ipv6" in off and "--subnet6" not in off
    assert (
        hostd_cli.config_from_args(
            hostd_cli.build_parser().parse_args([*off, "--dns-upstream", "127.0.0.1"])
        ).ipv6
        is False
    )
    on = argv_of(*base, "-ipv6")
    assert "--no-ipv6" not in on
    config = hostd_cli.config_from_args(
        hostd_cli.build_parser().parse_args([*on, "--dns-upstream", "127.0.0.1"])
    )
    assert config.ipv6 is True and str(config.subnet6) == "fd00:192:168:127::/64"
    moved = argv_of(*base, "-ipv6=true", "-subnet6", "fd00:1:2:3::/64")
    assert moved[moved.index("--subnet6") + 1] == "fd00:1:2:3::/64"
    assert "--no-ipv6" in argv_of(*base, "-ipv6=false")


def test_subnet6_without_ipv6_is_refused() -> None:
    with pytest.raises(GvproxyError, match="-subnet6 needs -ipv6"):
        translate(["-listen-qemu", "unix:///q", "-subnet6", "fd00:1::/64"])
