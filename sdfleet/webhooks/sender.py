"""One delivery attempt: check the URL, sign, POST, and decide what happens next.

2xx: delivered. 410 Gone: the endpoint is disabled (later deliveries to it go straight to the dead-letter
list) and this one is dead. Anything else (other statuses, timeouts, refused connections, names that do
not resolve): retried after the next step of ``Settings.webhook_schedule`` with jitter, or later if the
receiver's Retry-After asks for it; after the last step the delivery is dead. Secrets are never logged.

Signing: with the secrets this webhook worker is configured with, never with anything read from Redis:
SDFLEET_WEBHOOK_SECRET, plus SDFLEET_WEBHOOK_PREVIOUS_SECRETS during a rotation window (one signature per
secret, space separated, per Standard Webhooks). A restart with a new secret signs every later delivery,
of old batches too, with the new one.

Isolation: at most ``Settings.webhook_per_host`` deliveries to one receiver are in flight in this process,
counted by the address the URL resolves to (127.0.0.1, 2130706433 and 127.1 are one receiver; so are any
number of wildcard DNS names). A delivery whose receiver is at its cap does not wait for a slot in its thread: it goes back to the
due set for DEFER_S seconds (not counted as an attempt), so a receiver that hangs holds at most its share
of the threads and every other receiver keeps its pace. Each attempt has one deadline,
``Settings.webhook_timeout`` from connect to the last byte read: a receiver that trickles its answer a byte
at a time is cut off there (httpx's own timeout applies to each read). Each attempt has its own connection,
so the deadline can close it.

Credentials in the URL (``https://user:token@host/x``) are sent as HTTP Basic auth, since the request goes to
the pinned address and the URL it is built from carries no user part.
"""

from __future__ import annotations

import base64
import random
import socket
import threading
import time
from collections import Counter
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import redis
from celery import Celery

from sdfleet import keys
from sdfleet.errors import ConfigError, WebhookError
from sdfleet.settings import Settings
from sdfleet.webhooks import outbox
from sdfleet.webhooks.policy import Target, target_for
from sdfleet.webhooks.signing import parse_secrets, signed_headers

DELIVERED, RETRY, DEAD, DEFERRED = "delivered", "retry", "dead", "deferred"
# A delivery whose receiver host is at its cap goes back to the due set for this long (not an attempt).
DEFER_S = 0.25
JITTER = 0.25  # each scheduled delay is scaled by a random factor in [1 - JITTER, 1 + JITTER]
MAX_RETRY_AFTER_S = 24 * 3600
_SNIPPET_BYTES = 512


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    now = time.time() if now is None else now
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def backoff(schedule: tuple[float, ...], attempts_made: int, retry_after: float | None,
            rng: random.Random | None = None) -> float | None:
    """Delay before the next attempt after ``attempts_made`` failed ones; None when the schedule is spent."""
    if attempts_made < 1 or attempts_made > len(schedule):
        return None
    base = schedule[attempts_made - 1]
    delay = base * (rng or random).uniform(1 - JITTER, 1 + JITTER)
    return max(delay, retry_after) if retry_after is not None else delay


class Sender:
    """Performs delivery attempts. One per webhook-worker process; safe to share between threads."""

    def __init__(self, settings: Settings, redis_client: redis.Redis, app: Celery, log: Any,
                 *, http: httpx.Client | None = None):
        self.settings = settings
        self.r = redis_client
        self.app = app
        self.log = log
        self.default_secrets = parse_secrets(settings.webhook_secret) + [
            s for s in parse_secrets(settings.webhook_previous_secrets, name="SDFLEET_WEBHOOK_PREVIOUS_SECRETS")
            if s not in parse_secrets(settings.webhook_secret)]
        self.per_host = settings.webhook_per_host
        self._in_flight: Counter[str] = Counter()
        self._slots = threading.Lock()
        # No proxies from the environment (they would bypass the address pinning), no redirects (a 3xx
        # could point anywhere, internal addresses included).
        # No keep-alive: the attempt's deadline cuts its connection, which must therefore be its own.
        self.http = http or httpx.Client(timeout=settings.webhook_timeout, follow_redirects=False, trust_env=False,
                                         limits=httpx.Limits(max_connections=64, max_keepalive_connections=0))

    def close(self) -> None:
        self.http.close()

    def secrets_for(self, delivery: dict[str, Any]) -> list[str]:
        """The secrets every delivery is signed with: the current one first, then the previous ones."""
        return self.default_secrets

    def _take_slot(self, host: str) -> bool:
        with self._slots:
            if self._in_flight[host] >= self.per_host:
                return False
            self._in_flight[host] += 1
            return True

    def _give_slot(self, host: str) -> None:
        with self._slots:
            self._in_flight[host] -= 1
            if self._in_flight[host] <= 0:
                del self._in_flight[host]

    def deliver(self, delivery: dict[str, Any]) -> str:
        """Make one attempt unless its receiver is at its cap (then DEFERRED: back in the due set shortly).

        Returns DELIVERED, RETRY, DEAD or DEFERRED.
        """
        try:
            target: Target | Exception = target_for(delivery["url"],
                                                    allow_private=self.settings.webhook_allow_private)
        except (WebhookError, socket.gaierror, UnicodeError, OSError) as exc:
            target = exc  # no connection is made: reported by the attempt, without a slot
        if not isinstance(target, Target):
            return self._attempt(delivery, target)
        # The slot is the receiver's address, not the URL's spelling of its host.
        if not self._take_slot(target.address):
            outbox.schedule(self.r, delivery, time.time() + DEFER_S * random.uniform(1.0, 1.5))
            return DEFERRED
        try:
            return self._attempt(delivery, target)
        finally:
            self._give_slot(target.address)

    def _attempt(self, delivery: dict[str, Any], target: Target | Exception) -> str:
        log = self.log.bind(webhook_id=delivery.get("id"), event_type=delivery.get("type"), job_id=delivery.get("job_id"),
                            batch_id=delivery.get("batch_id"), attempt=int(delivery.get("attempt", 0)) + 1,
                            endpoint=outbox.url_hash(delivery["url"]))
        disabled = self.r.get(keys.webhook_endpoint_disabled(outbox.url_hash(delivery["url"])))
        if disabled:
            return self._bury(delivery, f"endpoint disabled: {disabled}; 'sdfleet webhooks replay' re-enables it",
                              log)
        try:
            secrets = self.secrets_for(delivery)
        except ConfigError as exc:
            return self._bury(delivery, str(exc), log)
        if not secrets:
            return self._bury(delivery, "no signing secret: set SDFLEET_WEBHOOK_SECRET on the webhook worker "
                                        "(sdfleet webhooks new-secret), then 'sdfleet webhooks replay'", log)
        if isinstance(target, WebhookError):
            return self._bury(delivery, f"refused at send time: {target}", log)
        if not isinstance(target, Target):
            return self.retry_later(delivery, f"cannot resolve the host: {target}", None, None, log)

        body = delivery["body"]
        headers = signed_headers(secrets, delivery["id"], int(time.time()), body)
        headers["host"] = target.host_header
        credentials = basic_auth(delivery["url"])
        if credentials:
            headers["authorization"] = credentials
        deadline = _Deadline(self.settings.webhook_timeout)
        extensions: dict[str, Any] = {"trace": deadline.trace}
        if target.scheme == "https":
            extensions["sni_hostname"] = target.host
        t0 = time.perf_counter()
        try:
            with self.http.stream("POST", target.pinned_url, content=body.encode(), headers=headers,
                                  extensions=extensions) as resp:
                status = resp.status_code
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
                snippet = b""
                for chunk in resp.iter_bytes():
                    snippet += chunk
                    if len(snippet) >= _SNIPPET_BYTES:
                        break
        except httpx.HTTPError as exc:
            if deadline.expired or isinstance(exc, httpx.TimeoutException):
                return self.retry_later(delivery, f"no complete answer within {self.settings.webhook_timeout:g} s",
                                        None, None, log)
            return self.retry_later(delivery, f"{type(exc).__name__}: {exc}"[:300], None, None, log)
        finally:
            deadline.cancel()
        elapsed = round(time.perf_counter() - t0, 4)
        if 200 <= status < 300:
            log.info("webhook delivered", status=status, elapsed_s=elapsed)
            return DELIVERED
        text = snippet[:200].decode("utf-8", "replace").strip()
        reason = f"HTTP {status}" + (f": {text}" if text else "")
        if status == 410:
            note = f"HTTP 410 Gone at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
            self.r.set(keys.webhook_endpoint_disabled(outbox.url_hash(delivery["url"])), note,
                       ex=keys.RECORD_TTL_S)
            log.warning("webhook endpoint answered 410 Gone; disabled")
            return self._bury(delivery, f"{reason} (endpoint disabled)", log, status=status)
        return self.retry_later(delivery, reason, status, retry_after, log)

    def retry_later(self, delivery: dict[str, Any], reason: str, status: int | None, retry_after: float | None,
               log: Any) -> str:
        made = int(delivery.get("attempt", 0)) + 1
        delay = backoff(self.settings.webhook_schedule, made, retry_after)
        if delay is None:
            return self._bury(delivery, f"gave up after {made} attempt(s); last: {reason}", log, status=status)
        outbox.schedule(self.r, {**delivery, "attempt": made}, time.time() + delay)
        log.warning("webhook attempt failed; retry scheduled", reason=reason, retry_in_s=round(delay, 3),
                    retry_after_s=retry_after)
        return RETRY

    def _bury(self, delivery: dict[str, Any], reason: str, log: Any, *, status: int | None = None) -> str:
        outbox.bury(self.r, delivery, reason, last_status=status)
        log.error("webhook delivery dead", reason=reason)
        return DEAD



def basic_auth(url: str) -> str | None:
    """The Authorization header for a URL's ``user:password@`` part, or None when it has none."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return None
    pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


class _Deadline:
    """One attempt's deadline: when it passes, the attempt's socket is shut down, which ends any read in
    progress however slowly the receiver trickles bytes. The socket comes from httpcore's public ``trace``
    extension (the connect_tcp event returns the network stream)."""

    def __init__(self, seconds: float):
        self.expired = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete" and info.get("return_value") is not None:
            with self._lock:
                self._socket = info["return_value"].get_extra_info("socket")
                if self.expired:
                    self._shutdown()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()
