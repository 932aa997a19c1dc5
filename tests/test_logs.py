"""Log lines stay whole when several threads (ours through structlog, Celery's and kombu's through the standard
library) write to one stream at once. A worker started by the scheduler's local driver shares the scheduler's
stderr, so a line split by another thread's line is a line no log shipper can parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lines_from_structlog_and_stdlib_threads_never_interleave(tmp_path) -> None:
    # In a child process, so that configuring logging does not touch the test runner's own handlers.
    script = _threads_script(pad=200, lines_per_thread=3000)
    out = tmp_path / "log.jsonl"
    with open(out, "w") as f:
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, stderr=f, check=True, timeout=300)
    lines = out.read_text().splitlines()
    bad = [x for x in lines if not _is_json_object(x)]
    assert not bad, f"{len(bad)} of {len(lines)} lines are not one JSON object, e.g. {bad[0][:400]!r}"
    assert len(lines) == 12000


def _threads_script(pad: int, lines_per_thread: int) -> str:
    """A child that logs from four threads at once: two through structlog (ours), two through the standard
    library (as Celery and kombu do)."""
    return textwrap.dedent(f"""
        import logging, threading
        from sdfleet import logs
        logs.configure("json", "info")
        log = logs.get("t")
        std = logging.getLogger("kombu.t")
        pad = "x" * {pad}

        def ours(i):
            for n in range({lines_per_thread}):
                log.info("ours", thread=i, n=n, pad=pad)

        def theirs(i):
            for n in range({lines_per_thread}):
                std.info("theirs %s %s %s", i, n, pad)

        ts = [threading.Thread(target=f, args=(i,)) for i, f in enumerate([ours, theirs, ours, theirs])]
        for t in ts: t.start()
        for t in ts: t.join()
    """)


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False




def test_long_lines_into_a_pipe_on_an_unbuffered_stderr_stay_whole() -> None:
    # The images set PYTHONUNBUFFERED, and a container's stderr is a pipe: a line over PIPE_BUF (4 KiB; a
    # traceback is often longer) is written in pieces, and the writes of two threads must not interleave.
    script = _threads_script(pad=6000, lines_per_thread=150)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, check=True, timeout=300,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = res.stderr.decode().splitlines()
    bad = [x for x in lines if not _is_json_object(x)]
    assert not bad, f"{len(bad)} of {len(lines)} lines are not one JSON object, e.g. {bad[0][:300]!r}"
    assert len(lines) == 600


def test_the_storing_child_logs_json_too() -> None:
    # The storing process is spawned (a fresh interpreter): its botocore/urllib3 warnings must not come out as
    # plain text among the worker's lines.
    script = textwrap.dedent("""
        import logging, os, warnings
        from worker import objects
        objects._init(None, "us-east-1", 1, {}, "w-1", os.getppid())
        logging.getLogger("urllib3.connectionpool").warning("Connection pool is full, discarding connection")
        warnings.warn("a user warning")
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, check=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")})
    lines = res.stderr.decode().splitlines()
    assert len(lines) == 2 and all(_is_json_object(x) for x in lines), lines
    assert all(json.loads(x)["process"] == "storer" and json.loads(x)["worker_id"] == "w-1" for x in lines)


def test_uncaught_exceptions_are_json_lines_with_their_traceback() -> None:
    script = textwrap.dedent("""
        import threading
        from sdfleet import logs
        logs.configure("json", "info")
        t = threading.Thread(target=lambda: 1 / 0, name="boom"); t.start(); t.join()
        raise KeyError("last")
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, timeout=120)
    assert res.returncode == 1
    lines = res.stderr.decode().splitlines()
    assert len(lines) == 2 and all(_is_json_object(x) for x in lines), lines
    thread, last = (json.loads(x) for x in lines)
    assert thread["thread"] == "boom" and "ZeroDivisionError" in thread["exception"]
    assert last["level"] == "critical" and "KeyError: 'last'" in last["exception"]
