"""One delivery attempt: check the URL, sign, POST, and decide what happens next.

2xx: delivered. 410 Gone: the endpoint is disabled (later deliveries to it go straight to the dead-letter
list) and this one is dead. Anything else (other statuses, timeouts, refused connections, names that do
not resolve): retried after the next step of ``Settings.webhook_schedule`` with jitter, or later if the
receiver's Retry-After asks for it; after the last step the delivery is dead. Secrets are never logged.

Signing: with the secrets this webhook worker is configured with, never with anything read from Redis:
SDFLEET_WEBHOOK_SECRET, plus SDFLEET_WEBHOOK_PREVIOUS_SECRETS during a rotation window (one signature per
secret, space separated, per Standard Webhooks). A restart with a new secret signs every later delivery,
of old batches too, with the new one.

Isolation: at most ``Settings.webhook_per_host`` deliveries to one receiver host are in flight in this
process. A delivery whose host is at its cap does not wait for a slot in its thread: it goes back to the
due set for DEFER_S seconds (not counted as an attempt), so a receiver that hangs holds at most its share
of the threads and every other receiver keeps its pace.
"""

from __future__ import annotations

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
from sdfleet.webhooks.policy import split_url, target_for
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
        self.http = http or httpx.Client(timeout=settings.webhook_timeout, follow_redirects=False, trust_env=False,
                                         limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))

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
        """Make one attempt unless its receiver host is at its cap (then DEFERRED: back in the due set shortly).

        Returns DELIVERED, RETRY, DEAD or DEFERRED.
        """
        try:
            host = split_url(delivery["url"])[1].lower()
        except WebhookError:
            host = ""
        if not self._take_slot(host):
            outbox.schedule(self.r, delivery, time.time() + DEFER_S * random.uniform(1.0, 1.5))
            return DEFERRED
        try:
            return self._attempt(delivery)
        finally:
            self._give_slot(host)

    def _attempt(self, delivery: dict[str, Any]) -> str:
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
        try:
            target = target_for(delivery["url"], allow_private=self.settings.webhook_allow_private)
        except WebhookError as exc:
            return self._bury(delivery, f"refused at send time: {exc}", log)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            return self.retry_later(delivery, f"cannot resolve the host: {exc}", None, None, log)

        body = delivery["body"]
        headers = signed_headers(secrets, delivery["id"], int(time.time()), body)
        headers["host"] = target.host_header
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
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
        except httpx.TimeoutException:
            return self.retry_later(delivery, f"no answer within {self.settings.webhook_timeout:g} s", None, None, log)
        except httpx.HTTPError as exc:
            return self.retry_later(delivery, f"{type(exc).__name__}: {exc}"[:300], None, None, log)
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

