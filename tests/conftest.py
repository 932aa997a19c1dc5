"""Shared fixtures: a real Redis (dedicated database, flushed per test), real worker processes, moto's S3 server.

If no Redis answers at SDFLEET_TEST_REDIS_URL (default redis://127.0.0.1:6379/15), a private redis-server
is started from PATH; if there is none, the run fails with a message (it never skips silently).

Under pytest-xdist (``make test`` runs ``-n 2``) each worker process takes databases of its own on that
server (:func:`redis_dbs`): one worker's flush must not empty another's queues.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import structlog

from sdfleet.redisconn import PrivateRedis, free_port, ping

ROOT = Path(__file__).resolve().parent.parent

#: Databases of a shared Redis per pytest-xdist worker (gw0, gw1, ...): the tests' own, flushed per test, and
#: a side one that a few tests keep apart from it (the webhook tests, the healthcheck test). A serial run and
#: gw0 use 15 and 13, as before; databases 0-3 are never used.
XDIST_DBS = ((15, 13), (14, 12), (11, 10), (9, 8), (7, 6), (5, 4))


def redis_dbs() -> tuple[int, int]:
    """(the tests' database, the side database) for this process."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker.removeprefix("gw"))
    if index >= len(XDIST_DBS):
        raise pytest.UsageError(f"pytest-xdist worker {worker}: at most {len(XDIST_DBS)} workers share one "
                                "Redis (each takes two databases of its own); run with fewer (-n)")
    return XDIST_DBS[index]


def with_db(url: str, db: int) -> str:
    """``url`` (``redis://host:port/N``) on database ``db``."""
    return f"{url.rsplit('/', 1)[0]}/{db}"


def in_xdist() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


@pytest.fixture(autouse=True)
def _logging_as_found():
    """Each test leaves this process's logging as it found it. A test that runs the CLI in this process
    (``cli.main``) configures logging onto the ``sys.stderr`` of that moment, pytest's capture of that test,
    closed once it ends: a later test in the same process that logs then fails on a closed file (seen under
    pytest-xdist, where a file whose tests log came right after tests/test_cli.py)."""
    from sdfleet import logs

    config, root = structlog.get_config(), logging.getLogger()
    level, ours = root.level, [h for h in root.handlers if isinstance(h, logs._LineHandler)]
    hooks = sys.excepthook, threading.excepthook
    yield
    structlog.configure(**config)
    for h in [h for h in root.handlers if isinstance(h, logs._LineHandler) and h not in ours]:
        root.removeHandler(h)
    for h in ours:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks


@pytest.fixture(scope="session")
def redis_base_url() -> str:
    url = os.environ.get("SDFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    if in_xdist():
        url = with_db(url, redis_dbs()[0])
    if ping(url):
        return url
    private = PrivateRedis()  # raises BrokerUnavailable with a fix when there is no redis-server
    return with_db(private.url, redis_dbs()[0])


@pytest.fixture(scope="session")
def redis_side_url(redis_base_url: str) -> str:
    """The same server, the side database (see :data:`XDIST_DBS`): not flushed by ``redis_url``."""
    return with_db(redis_base_url, redis_dbs()[1])


@pytest.fixture
def redis_url(redis_base_url: str) -> str:
    client = redis.Redis.from_url(redis_base_url)
    client.flushdb()
    return redis_base_url


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tiny-model cache for the session (built once, a few seconds)."""
    path = Path(os.environ.get("SDFLEET_CACHE_DIR") or tmp_path_factory.mktemp("cache"))
    return path


@pytest.fixture
def env(redis_url: str, cache_dir: Path, tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    e.update({"REDIS_URL": redis_url, "SDFLEET_CACHE_DIR": str(cache_dir), "SDFLEET_LOG_FORMAT": "json",
              "SDFLEET_OUT": f"file://{tmp_path / 'out'}", "PYTHONUNBUFFERED": "1"})
    return e


def wait_until(pred, timeout: float, what, poll: float = 0.1):
    """Poll ``pred`` until it returns something true (returned). ``what``: a string, or a callable that describes
    the state at the timeout (then, not before the wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")


def run_cli(args: list[str], env: dict[str, str], *, input: str | None = None, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdfleet.cli", *args], env=env, capture_output=True, text=True,
                          input=input, timeout=timeout, cwd=cwd or ROOT)


class WorkerProc:
    def __init__(self, proc: subprocess.Popen, worker_id: str, log_path: Path):
        self.proc, self.worker_id, self.log_path = proc, worker_id, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def start_worker(env: dict[str, str], r: redis.Redis, tmp_path: Path):
    """Start real ``sdfleet worker`` processes; waits until each has booted (its heartbeat exists)."""
    started: list[WorkerProc] = []

    def _start(*extra: str, model: str = "tiny", env_extra: dict[str, str] | None = None, wait: bool = True,
               boot_timeout: float = 120) -> WorkerProc:
        worker_id = f"test-{uuid.uuid4().hex[:8]}"
        log_path = tmp_path / f"{worker_id}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdfleet.cli", "worker", "--model", model, "--device", "cpu",
             "--worker-id", worker_id, *extra],
            env={**env, **(env_extra or {})}, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
        w = WorkerProc(proc, worker_id, log_path)
        started.append(w)
        if wait:
            deadline = time.monotonic() + boot_timeout
            while not r.exists(f"sdfleet:worker:{worker_id}"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"worker did not boot (rc={proc.poll()}):\n{w.log()[-4000:]}")
                time.sleep(0.1)
            time.sleep(0.3)  # the consumer starts right after the first heartbeat
        return w

    yield _start
    for w in started:
        w.stop(signal.SIGKILL if w.proc.poll() is None else signal.SIGTERM, timeout=5)


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server over HTTP on a free loopback port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str, env: dict[str, str]):
    """(env with S3 settings, a fresh bucket name, a boto3 client) against the moto server."""
    import boto3

    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(creds)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return {**env, **creds, "SDFLEET_S3_ENDPOINT_URL": s3_server}, bucket, client
