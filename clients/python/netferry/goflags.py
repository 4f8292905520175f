"""Go `flag`-package command lines, turned into what a program's argparse parser takes.

The seeds (gvproxy, Rancher Desktop's host-switch, network-setup, vm-switch and wsl-proxy)
are Go programs, and the scripts that start them write Go's flag syntax: `-flag` and
`--flag` alike, `-flag=value` or `-flag value`, booleans as `-flag` or `-flag=true|false`
(never `-flag false`), and `--` or the first non-flag argument ends the flags. Each netferry
program keeps exactly one parser, its argparse parser; `normalize()` runs first and rewrites
the Go forms, plus a table of the seeds' flag names (aliases), into argparse's `--option`
forms. It reads the option table from the argparse parser itself, so a program's own options
accept Go syntax too (`-listen unix:///x` is `--listen unix:///x`).

What it emits: `--option=value` for an option that takes a value (so a value that starts
with `-`, or is empty, as in Rancher Desktop's `-dhcp-script ''`, reaches argparse intact);
`--option` once for a boolean whose last setting is true (Go: the last one wins, so
`-debug -debug=false` is off); everything from `--` or the first non-flag argument on,
unchanged. Errors use Go's wording and name the flag: `flag provided but not defined: -x`,
`flag needs an argument: -x`, `invalid boolean value "maybe" for -debug`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

# strconv.ParseBool's spellings, which Go's flag package accepts for booleans.
GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class GoFlagError(ValueError):
    """A command line the Go flag package would refuse; the message names the flag."""


@dataclass(frozen=True)
class Alias:
    """A seed's flag name for one of the program's options.

    `option` is the argparse option string it stands for (`--log-file`). `boolean` says the
    Go flag is a boolean (taken from the argparse action when the option is a store_true).
    `convert`, when given, turns the Go value into the argparse tokens to emit instead (e.g.
    `-vsock-fd 3` → `["--connect=fd://3?framing=len16le"]`); it may raise ValueError."""

    option: str
    boolean: bool | None = None
    convert: Callable[[str], list[str]] | None = None


AliasTable = Mapping[str, "Alias | str"]


@dataclass(frozen=True)
class _Flag:
    name: str  # as written, without dashes
    option: str  # argparse option string
    boolean: bool
    convert: Callable[[str], list[str]] | None = None


def _option_table(parser: argparse.ArgumentParser) -> dict[str, tuple[str, bool]]:
    """Long option name (no dashes) → (option string, takes no value)."""
    table: dict[str, tuple[str, bool]] = {}
    # argparse has no public list of its actions; `_actions` has been stable since 2.7.
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                table[opt[2:]] = (opt, action.nargs == 0)
            elif len(opt) == 2:  # -h: Go has no short options, but `-h` means help there too
                table[opt[1:]] = (opt, action.nargs == 0)
    return table


def _resolve(name: str, options: dict[str, tuple[str, bool]], aliases: AliasTable) -> _Flag:
    alias = aliases.get(name)
    if alias is not None:
        if isinstance(alias, str):
            alias = Alias(alias)
        key = alias.option.lstrip("-")
        boolean = alias.boolean
        if boolean is None:
            boolean = options.get(key, (alias.option, False))[1]
        return _Flag(name, alias.option, boolean, alias.convert)
    if name in options:
        option, boolean = options[name]
        return _Flag(name, option, boolean)
    raise GoFlagError(f"flag provided but not defined: -{name}")


def normalize(
    argv: Sequence[str], parser: argparse.ArgumentParser, aliases: AliasTable | None = None
) -> list[str]:
    """Go flag syntax (and the seeds' names in `aliases`) → argv for `parser`."""
    options = _option_table(parser)
    aliases = aliases or {}
    out: list[str] = []
    booleans: dict[str, bool] = {}  # option → last setting, emitted at the end
    i = 0
    args = list(argv)
    while i < len(args):
        token = args[i]
        if token == "--" or token == "-" or not token.startswith("-"):
            break  # Go: flags end here; the rest is the program's arguments
        body = token[2:] if token.startswith("--") else token[1:]
        if not body or body.startswith("-") or body.startswith("="):
            raise GoFlagError(f"bad flag syntax: {token}")
        name, has_value, value = body.partition("=")
        flag = _resolve(name, options, aliases)
        i += 1
        if flag.boolean:
            if not has_value:
                setting = True
            elif value in GO_TRUE:
                setting = True
            elif value in GO_FALSE:
                setting = False
            else:
                raise GoFlagError(f'invalid boolean value "{value}" for -{name}')
            if flag.convert is not None:
                out += flag.convert("true" if setting else "false")
            else:
                booleans.pop(flag.option, None)  # keep emission order = last setting order
                booleans[flag.option] = setting
            continue
        if not has_value:
            if i >= len(args):
                raise GoFlagError(f"flag needs an argument: -{name}")
            value = args[i]
            i += 1
        if flag.convert is not None:
            try:
                out += flag.convert(value)
            except ValueError as e:
                raise GoFlagError(f'invalid value "{value}" for flag -{name}: {e}') from None
        elif flag.option.startswith("--"):
            out.append(f"{flag.option}={value}")
        else:
            out += [flag.option, value]
    out += [option for option, on in booleans.items() if on]
    out += args[i:]
    return out


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    aliases: AliasTable | None = None,
) -> argparse.Namespace:
    """`parser.parse_args` after `normalize`; a Go-syntax error exits 2 via parser.error."""
    raw = sys.argv[1:] if argv is None else list(argv)
    try:
        normalized = normalize(raw, parser, aliases)
    except GoFlagError as e:
        parser.error(str(e))
    return parser.parse_args(normalized)


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool; ValueError otherwise."""
    if text in GO_TRUE:
        return True
    if text in GO_FALSE:
        return False
    raise ValueError(f"invalid boolean value {text!r}")


__all__ = ["Alias", "GoFlagError", "normalize", "parse_args", "parse_bool"]
