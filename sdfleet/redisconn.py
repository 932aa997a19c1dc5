"""Connecting to Redis, and starting a private redis-server when none answers (demo and tests)."""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from sdfleet.errors import BrokerUnavailable


def connect(url: str, *, decode_responses: bool = True, single_connection: bool = False,
            retries: bool = True, socket_timeout: float | None = None) -> redis.Redis:
    """A client with retries on connection errors (Redis restarts are ridden out, not fatal).

    ``single_connection``: one connection, no pool, for a client used by one thread at a time; it skips
    the pool's per-command check that a borrowed connection has nothing left to read (a system call).
    ``retries=False``: a connection error surfaces at once instead of re-sending the command. For scripts
    that must not run twice (a claim whose reply was lost would claim a second set of messages).
    ``socket_timeout``: give up on a reply after this many seconds (a half-open connection never answers).
    """
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        single_connection_client=single_connection,
        socket_connect_timeout=5,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=20) if retries else Retry(NoBackoff(), 0),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError] if retries else [],
    )


def check_reachable(url: str, timeout: float = 3.0) -> None:
    """Raise BrokerUnavailable, in one line naming REDIS_URL and the address tried, if Redis does not answer.

    Commands are retried for about half a minute (see :func:`connect`); a CLI asked by a person fails fast.
    """
    from sdfleet.settings import redis_address

    where = redis_address(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    except redis.AuthenticationError as exc:
        raise BrokerUnavailable(f"Redis at {where} (REDIS_URL) refused the credentials ({exc}); "
                                "fix the user or password in REDIS_URL") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            raise BrokerUnavailable(
                f"TLS verification of Redis at {where} (REDIS_URL) failed ({_short(text)}); no CA option is set, "
                "so the system CA store was used: add ?ssl_ca_certs=/path/to/ca.pem to REDIS_URL") from None
        raise BrokerUnavailable(f"cannot reach Redis at {where} (REDIS_URL): {_short(text)}; start Redis "
                                "there or set REDIS_URL to a running one") from None
    except redis.RedisError as exc:
        raise BrokerUnavailable(f"Redis at {where} (REDIS_URL) answered with an error: {_short(str(exc))}") from None


def _short(text: str) -> str:
    return " ".join(text.split())[:200]


_DELETE_IF_OURS = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def release_owned(r: redis.Redis, key: str, token: str) -> bool:
    """Delete a lock or claim ``key`` only if it still holds ``token`` (compare and delete in one step: one
    that expired and was taken by another process stays theirs)."""
    return bool(r.eval(_DELETE_IF_OURS, 1, key, token))


def ping(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server from PATH on a free loopback port, for as long as this object lives."""

    def __init__(self, *, appendonly: bool = False, port: int | None = None, data_dir: str | None = None):
        exe = shutil.which("redis-server")
        if exe is None:
            raise BrokerUnavailable(
                "no Redis answers at REDIS_URL and no redis-server is on PATH; install one "
                "(Debian: apt-get install redis-server) or set REDIS_URL to a running Redis"
            )
        self.port = port or free_port()
        self.dir = data_dir or tempfile.mkdtemp(prefix="sdfleet-redis-")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
                "--appendonly", "yes" if appendonly else "no", "--daemonize", "no"]
        if appendonly:
            args += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while not ping(self.url, 0.2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise BrokerUnavailable(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def ensure_redis(url: str) -> tuple[str, PrivateRedis | None]:
    """``url`` if a Redis answers there, else a private redis-server's URL (and the handle keeping it alive)."""
    if ping(url):
        return url, None
    private = PrivateRedis()
    return private.url, private
