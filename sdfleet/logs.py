"""Structured logging: structlog with bound ids, JSON when not on a terminal, readable on one."""

from __future__ import annotations

import logging
import sys
import time

import structlog

_START = time.monotonic()


def _elapsed(_logger, _name, event_dict):
    event_dict.setdefault("elapsed_s", round(time.monotonic() - _START, 3))
    return event_dict


def configure(fmt: str = "auto", level: str = "info", stream=None) -> None:
    """Configure structlog once per process. ``fmt``: auto (JSON unless stderr is a TTY), json, console."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _elapsed,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get(name: str | None = None, **bound):
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**bound) if bound else log
