"""`netferry`: the command-line client."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netferry", description="netferry command-line client")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("demo", help="bring up hostd and a namespace guest and show it working")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from netferry.demo import main as demo_main

        return demo_main(rest)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
