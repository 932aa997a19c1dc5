"""The Celery application: broker settings that make delivery at-least-once, and the tasks it knows.

acks_late + reject_on_worker_lost: a message is acknowledged only after its image is stored, and a
worker that dies mid-batch leaves its messages to be redelivered. The Redis transport redelivers an
unacknowledged message after ``visibility_timeout``; it must be longer than the longest batch (the
workers' reclaim sweep hands back the work of dead workers much sooner, from their heartbeats).

Task events and remote control are on, so ``celery -A sdfleet inspect|control|events`` and Flower see and
steer the fleet; the transport is kombu's Redis transport with one public method extended
(:mod:`sdfleet.broker`: a purge notes the jobs it removes).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from sdfleet.settings import Settings

GENERATE_TASK = "sdfleet.generate"
WEBHOOK_TASK = "sdfleet.webhook.deliver"


def make_app(settings: Settings, *, prefetch: int = 1) -> Celery:
    from sdfleet import broker

    broker.install()
    app = Celery("sdfleet", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        result_backend=None,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Redis restarts: keep retrying the connection rather than dying.
            "max_retries": None,
            "interval_start": 0.1,
            "interval_step": 0.5,
            "interval_max": 2.0,
        },
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_channel_error_retry=True,
        # Prefetch sized for batching: the worker must hold a whole batch's messages to group them.
        worker_prefetch_multiplier=prefetch,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=True,
        worker_enable_remote_control=True,
        task_send_sent_event=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    register_tasks(app)
    return app


def register_tasks(app: Celery) -> None:
    """Name the generation task on ``app`` so Celery's tools show it; the GPU worker consumes it through its
    own task Strategy (:mod:`worker.consumer`), never by running this body."""

    @app.task(name=GENERATE_TASK, acks_late=True, shared=False)
    def generate(**kwargs: Any) -> None:  # pragma: no cover - never run by an sdfleet worker
        raise RuntimeError("sdfleet.generate runs only on 'sdfleet worker' (it batches jobs for the GPU)")
