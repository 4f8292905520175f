"""The sans-IO core's logger: structlog, imported the first time the core logs.

structlog imports asyncio, socket and threading; the core (`hostd/stack/`, `hostd/services/`)
imports none of them, so that it can be loaded and driven without an event loop (tests,
fuzzers, tools; `tests/unit/test_imports.py` checks it). A core module takes
`core_logger(name)` instead of `structlog.get_logger(name)`: the same logger, bound on the
first call. In the daemon structlog is loaded long before, so nothing changes there: one
logging setup (`netferry.log.configure_logging`) renders the core's events with the rest.
"""

from __future__ import annotations

from typing import Any


class CoreLogger:
    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, method: str) -> Any:
        logger = self._logger
        if logger is None:
            import structlog

            logger = self._logger = structlog.get_logger(self._name)
        return getattr(logger, method)


def core_logger(name: str) -> CoreLogger:
    return CoreLogger(name)
