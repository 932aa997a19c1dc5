"""Structured logging: structlog with bound ids, JSON when not on a terminal, readable on one.

Every line goes through structlog, Celery's own and Python warnings included: the standard library's root
logger gets a handler whose formatter is structlog's, so a line from kombu or a ``DeprecationWarning`` comes
out as the same JSON object as ours, with the process's ids (``bind_process``: worker id, device) added.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import structlog

_START = time.monotonic()
_PROCESS: dict[str, Any] = {}


def _elapsed(_logger, _name, event_dict):
    event_dict.setdefault("elapsed_s", round(time.monotonic() - _START, 3))
    return event_dict


def _process_ids(_logger, _name, event_dict):
    for k, v in _PROCESS.items():
        event_dict.setdefault(k, v)
    return event_dict


def bind_process(**ids: Any) -> None:
    """Ids every line of this process carries, from every thread (worker id, device)."""
    _PROCESS.update({k: v for k, v in ids.items() if v is not None})


def configure(fmt: str = "auto", level: str = "info", stream=None) -> None:
    """Configure structlog and the standard library's logging once per process.

    ``fmt``: auto (JSON unless the stream is a TTY), json, console.
    """
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _elapsed,
        _process_ids,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: _LineLogger(stream),
        cache_logger_on_first_use=False,
    )
    # The standard library's records (Celery, kombu, warnings) rendered by structlog too.
    handler = _LineHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.format_exc_info,
                    renderer]))
    handler.addFilter(_RepeatFilter(10.0))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    logging.captureWarnings(True)
    # Uncaught exceptions (a thread's, or the process's last) as JSON lines too, not plain tracebacks.
    threading.excepthook = _thread_excepthook
    sys.excepthook = _excepthook


def _thread_excepthook(args: Any) -> None:
    name = args.thread.name if args.thread is not None else None
    structlog.get_logger("thread").error("uncaught exception in a thread", thread=name,
                                         exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _excepthook(exc_type: Any, exc: BaseException, tb: Any) -> None:
    structlog.get_logger("process").critical("uncaught exception", exc_info=(exc_type, exc, tb))


# Every line of the process, ours and the standard library's, is written whole under this one lock, in one write
# with its newline. Two locks (structlog's and the handler's) or a separate newline let another thread's line land
# inside ours: on an unbuffered stderr (PYTHONUNBUFFERED, as in the images) a long line into a pipe goes out in
# PIPE_BUF pieces, and another thread's write could come between them.
_WRITE_LOCK = threading.Lock()


def _write_line(stream: Any, line: str) -> None:
    with _WRITE_LOCK:
        stream.write(line + "\n")
        stream.flush()


class _LineLogger:
    """structlog's logger: each rendered event as one whole line (see ``_WRITE_LOCK``)."""

    def __init__(self, stream: Any):
        self._stream = stream

    def msg(self, message: str) -> None:
        _write_line(self._stream, message)

    log = debug = info = warn = warning = fatal = failure = err = error = critical = exception = msg


class _LineHandler(logging.StreamHandler):
    """The standard library's records (Celery, kombu, warnings), written the same way as ours."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self.stream, self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class _RepeatFilter(logging.Filter):
    """The standard library's repeated records (kombu's and Celery's, in a Redis outage: one traceback a
    second) let through once per ``interval_s`` per logger and message, with how many were held back."""

    def __init__(self, interval_s: float):
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e18) < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like it in the last {self.interval_s:g} s)"
        return True


def get(name: str | None = None, **bound):
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**bound) if bound else log


class Throttled:
    """A repeated error logged once per ``interval_s`` with how many times it happened meanwhile.

    For loops that retry (Redis refusing writes, a store down): a line per try would be tens of thousands
    of tracebacks a minute.
    """

    def __init__(self, log: Any, interval_s: float = 10.0):
        self.log = log
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        with self._lock:
            self._count[event] = self._count.get(event, 0) + 1
            if now - self._last.get(event, -1e18) < self.interval_s:
                return
            self._last[event] = now
            count, self._count[event] = self._count[event], 0
        getattr(self.log, level)(event, repeated=count, **fields)
