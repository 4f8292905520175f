"""structlog set-up shared by every netferry daemon and tool.

`--log-format console|json`, `--log-file`, `--debug`. Per-packet events exist only behind
an explicit trace flag: per-packet logging once capped Rancher Desktop at 2 MB/s.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(fmt: str = "console", level: str = "info", path: str | None = None) -> None:
    stream = open(path, "a", buffering=1) if path else sys.stderr
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def add_logging_arguments(parser) -> None:  # argparse.ArgumentParser
    g = parser.add_argument_group("logging")
    g.add_argument("--log-format", choices=["console", "json"], default="console")
    g.add_argument("--log-file", metavar="PATH", help="append logs here instead of stderr")
    g.add_argument("--debug", action="store_true", help="debug-level logs")
