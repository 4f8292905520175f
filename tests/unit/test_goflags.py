"""Go flag syntax → argparse: every form the Go flag package accepts, and its errors."""

from __future__ import annotations

import argparse

import pytest

from netferry.goflags import Alias, GoFlagError, normalize, parse_args, parse_bool


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prog")
    p.add_argument("--listen", action="append", default=[])
    p.add_argument("--log-file")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--debug", action="store_true")
    p.add_argument("--dhcp-script", default=None)
    p.add_argument("--connect")
    p.add_argument("command", nargs=argparse.REMAINDER)
    return p


ALIASES = {
    "logfile": "--log-file",
    "vsock-fd": Alias("--connect", convert=lambda v: [f"--connect=fd://{int(v)}"]),
}


def ns(argv: list[str]) -> argparse.Namespace:
    return parse_args(parser(), argv, ALIASES)


@pytest.mark.parametrize(
    "argv",
    [
        ["-listen", "unix:///a"],
        ["--listen", "unix:///a"],
        ["-listen=unix:///a"],
        ["--listen=unix:///a"],
    ],
)
def test_value_forms(argv: list[str]) -> None:
    assert ns(argv).listen == ["unix:///a"]


def test_repeatable_keeps_order_and_values_starting_with_dash() -> None:
    a = ns(["-listen", "unix:///a", "--listen=unix:///b", "-mtu", "-1", "-listen", "-x"])
    assert a.listen == ["unix:///a", "unix:///b", "-x"]
    assert a.mtu == -1


def test_empty_value_as_rancher_desktop_passes_it() -> None:
    assert ns(["-dhcp-script", "", "-debug"]).dhcp_script == ""
    assert ns(["-dhcp-script="]).dhcp_script == ""


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["-debug"], True),
        (["--debug"], True),
        (["-debug=true"], True),
        (["-debug=1"], True),
        (["-debug=T"], True),
        (["-debug=false"], False),
        (["-debug=0"], False),
        (["-debug=False"], False),
        (["-debug", "-debug=false"], False),  # Go: the last setting wins
        (["-debug=false", "-debug"], True),
        ([], False),
    ],
)
def test_booleans(argv: list[str], expected: bool) -> None:
    assert ns(argv).debug is expected


def test_aliases_and_conversions() -> None:
    a = ns(["-logfile", "/tmp/f", "-vsock-fd=3"])
    assert a.log_file == "/tmp/f" and a.connect == "fd://3"


def test_double_dash_and_first_positional_end_flags() -> None:
    a = ns(["-debug", "--", "sh", "-c", "-debug"])
    assert a.debug and a.command == ["--", "sh", "-c", "-debug"]
    assert normalize(["-mtu", "9000", "init", "-listen", "x"], parser()) == [
        "--mtu=9000",
        "init",
        "-listen",
        "x",
    ]


def test_normalized_form() -> None:
    out = normalize(["-debug=false", "-logfile", "F", "-debug", "-listen", "-"], parser(), ALIASES)
    assert out == ["--log-file=F", "--listen=-", "--debug"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-nonsense"], "flag provided but not defined: -nonsense"),
        (["--nonsense=1"], "flag provided but not defined: -nonsense"),
        (["-lis", "x"], "flag provided but not defined: -lis"),  # no abbreviations in Go
        (["-listen"], "flag needs an argument: -listen"),
        (["-debug", "-logfile"], "flag needs an argument: -logfile"),
        (["-debug=maybe"], 'invalid boolean value "maybe" for -debug'),
        (["-debug=yes"], 'invalid boolean value "yes" for -debug'),
        (["---listen", "x"], "bad flag syntax: ---listen"),
        (["-=x"], "bad flag syntax: -=x"),
        (["-vsock-fd", "three"], 'invalid value "three" for flag -vsock-fd'),
    ],
)
def test_errors_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(GoFlagError) as e:
        normalize(argv, parser(), ALIASES)
    assert message in str(e.value)


def test_parse_args_exits_2_with_the_message(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        ns(["-frobnicate"])
    assert e.value.code == 2
    assert "flag provided but not defined: -frobnicate" in capsys.readouterr().err


def test_a_boolean_given_a_separate_value_is_not_consumed() -> None:
    # Go: `-debug false` sets debug and "false" is the first argument (flags end there).
    assert normalize(["-debug", "false", "-mtu", "1"], parser()) == [
        "--debug",
        "false",
        "-mtu",
        "1",
    ]


def test_parse_bool() -> None:
    assert parse_bool("true") and not parse_bool("0")
    with pytest.raises(ValueError, match="invalid boolean"):
        parse_bool("on")


# ---- the seeds' command lines, as Rancher Desktop writes them ------------------------------


def test_rancher_desktop_network_setup_argv() -> None:
    from netferry.guestd import network_setup

    a = parse_args(
        network_setup.build_parser(),
        ["--logfile", "/l/ns.log", "--vm-switch-path", "/usr/local/bin/vm-switch",
         "--vm-switch-logfile", "/l/vs.log", "-debug", "-trace-packets", "--unshare-arg",
         "/usr/local/bin/wsl-init", "-subnet=192.168.127.0/24", "-dhcp-script", ""],
        network_setup.GO_ALIASES,
    )  # fmt: skip
    assert (a.log_file, a.vm_switch_path, a.vm_switch_log_file) == (
        "/l/ns.log", "/usr/local/bin/vm-switch", "/l/vs.log",
    )  # fmt: skip
    assert a.debug and a.trace_packets and a.unshare_arg == ["/usr/local/bin/wsl-init"]
    assert a.subnet == "192.168.127.0/24" and a.dhcp_script == ""


def test_rancher_desktop_vm_switch_argv() -> None:
    from netferry.guestd import vm_switch

    argv = ["-tap-interface", "eth0", "-subnet", "192.168.127.0/24", "-tap-mac-address",
            "5a:94:ef:e4:0c:ee", "-dhcp-script", "", "-logfile", "/l/vs.log", "-debug"]  # fmt: skip
    a = parse_args(vm_switch.build_parser(), argv, vm_switch.GO_ALIASES)
    assert (a.tap_interface, a.subnet, a.tap_mac_address, a.dhcp_script, a.log_file) == (
        "eth0", "192.168.127.0/24", "5a:94:ef:e4:0c:ee", "", "/l/vs.log",
    )  # fmt: skip
    assert a.debug and a.connect is None  # main() then takes the inherited fd 3
    a = parse_args(vm_switch.build_parser(), ["-vsock-fd", "5"], vm_switch.GO_ALIASES)
    assert a.connect == "fd://5?framing=len16le"
    with pytest.raises(SystemExit):
        parse_args(vm_switch.build_parser(), ["-vsock-fd=-1"], vm_switch.GO_ALIASES)


def test_rancher_desktop_wsl_proxy_argv() -> None:
    from netferry.guestd import wsl_proxy

    a = parse_args(
        wsl_proxy.build_parser(),
        ["-debug=false", "-logfile=/l/wp.log", "-socketFile", "/run/x.sock",
         "-upstreamAddress=192.168.143.1", "-udpBuffer", "8388608"],
        wsl_proxy.GO_ALIASES,
    )  # fmt: skip
    assert not a.debug and a.log_file == "/l/wp.log" and a.socket == "/run/x.sock"
    assert a.upstream_address == "192.168.143.1" and a.udp_buffer == 8 << 20


def test_rancher_desktop_host_switch_argv() -> None:
    from netferry.hostd import cli

    a = parse_args(
        cli.build_parser(),
        ["-debug", "-subnet", "192.168.127.0/24", "--port-forward",
         "127.0.0.1:6443=192.168.127.2:6443", "-listen", "unix:///x"],
    )  # fmt: skip
    assert a.debug and a.subnet == "192.168.127.0/24" and a.listen == ["unix:///x"]
    assert a.port_forward == ["127.0.0.1:6443=192.168.127.2:6443"]
