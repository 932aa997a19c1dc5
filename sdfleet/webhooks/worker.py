"""The webhook worker: a Celery worker (threads pool) on the webhook queue, plus the due-retry mover.

It never touches a GPU; run one or two per fleet. Deliveries are I/O bound (up to
``Settings.webhook_timeout`` each), hence a pool of threads rather than processes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import redis
from celery import Celery

from sdfleet import keys
from sdfleet import logs as logs_mod
from sdfleet.queue import WEBHOOK_TASK, make_app
from sdfleet.redisconn import connect
from sdfleet.settings import Settings
from sdfleet.storage import StorageFactory
from sdfleet.webhooks import outbox
from sdfleet.webhooks.sender import Sender


class RetryMover(threading.Thread):
    """Moves due retries from ``keys.WEBHOOK_DUE`` to the webhook queue, every ``poll_s`` seconds."""

    def __init__(self, r: redis.Redis, app: Celery, log: Any, poll_s: float):
        super().__init__(name="webhook-retry-mover", daemon=True)
        self.r, self.app, self.log, self.poll_s = r, app, log, poll_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.poll_s):
            try:
                while outbox.move_due(self.r, self.app) >= 100:
                    pass
            except Exception as exc:  # Redis restarting: keep going once it is back
                self.log.warning("moving due webhook retries failed", error=repr(exc))


def poll_interval(schedule: tuple[float, ...]) -> float:
    """Fine enough for the shortest retry step, never busier than 50 Hz nor lazier than 1 s."""
    return min(1.0, max(0.02, min(schedule, default=4.0) / 4))


def register_tasks(app: Celery, settings: Settings, r: redis.Redis, log: Any, metrics: Any = None) -> Sender:
    from sdfleet.events import BATCH_TASK, complete_batch
    from sdfleet.metrics import WebhookMetrics

    metrics = metrics or WebhookMetrics()

    sender = Sender(settings, r, app, log)
    storage = StorageFactory(settings.s3_endpoint_url, settings.s3_region, settings.upload_retries)

    @app.task(name=WEBHOOK_TASK, acks_late=True, reject_on_worker_lost=True)
    def deliver(delivery: dict[str, Any] | None = None, **_: Any) -> str:
        if not (isinstance(delivery, dict) and all(isinstance(delivery.get(k), str) for k in ("id", "url", "body"))):
            ref = delivery.get("id") if isinstance(delivery, dict) else type(delivery).__name__
            log.error("malformed webhook delivery dropped", ref=str(ref)[:80])
            metrics.delivery("malformed")
            return "malformed"
        try:
            outcome = sender.deliver(delivery)
        except Exception as exc:  # a bug or Redis hiccup: keep the delivery on the retry schedule
            log.exception("webhook attempt crashed", webhook_id=delivery.get("id"))
            outcome = sender.retry_later(delivery, f"sender error: {type(exc).__name__}", None, None, log)
        metrics.delivery(outcome)
        return outcome

    # Redis hiccups retry the batch task with Celery's countdown: short delays, well inside the visibility
    # timeout, so the held message is not redelivered meanwhile (unlike hours-long webhook retries).
    @app.task(name=BATCH_TASK, acks_late=True, reject_on_worker_lost=True, max_retries=20,
              autoretry_for=(redis.RedisError, ConnectionError, TimeoutError), retry_backoff=2,
              retry_backoff_max=min(300, settings.visibility_timeout // 4), retry_jitter=True)
    def batch_completed(batch_id: str) -> None:
        complete_batch(settings, r, app, storage, batch_id, log)

    return sender


def run_webhook_worker(settings: Settings, *, threads: int = 8, worker_id: str | None = None,
                       metrics_port: int | None = None) -> int:
    """Consume the webhook queue until told to stop (SIGTERM: finish the attempts in flight, then exit)."""
    worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    # httpx logs every request's full URL at INFO; a receiver's URL may carry a token in its path or query.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    log = logs_mod.get("webhooks", worker_id=worker_id)
    app = make_app(settings, prefetch=1)
    r = connect(settings.redis_url)
    from sdfleet.metrics import WebhookMetrics

    metrics = WebhookMetrics(dead_letters=lambda: r.llen(keys.WEBHOOK_DEAD))
    if metrics_port is not None:
        metrics_port = metrics.serve(metrics_port)
    sender = register_tasks(app, settings, r, log, metrics)
    mover = RetryMover(r, app, log, poll_interval(settings.webhook_schedule))
    mover.start()
    log.info("webhook worker ready", queue=keys.WEBHOOK_QUEUE, threads=threads,
             schedule=list(settings.webhook_schedule), signing_secrets=len(sender.default_secrets),
             allow_private=settings.webhook_allow_private, metrics_port=metrics_port)
    worker = app.Worker(
        hostname=f"sdfleet-webhooks@{worker_id}", pool="threads", concurrency=threads,
        queues=[keys.WEBHOOK_QUEUE], without_mingle=True, without_gossip=True, without_heartbeat=True,
        loglevel=settings.log_level.upper(), quiet=True,
    )
    try:
        worker.start()
    finally:
        mover.stop_event.set()
        sender.close()
        log.info("webhook worker stopped")
    return worker.exitcode or 0
