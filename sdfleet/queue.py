"""The Celery application: broker settings that make delivery at-least-once.

acks_late + reject_on_worker_lost: a message is acknowledged only after its image is stored, and a
worker that dies mid-batch leaves its messages to be redelivered. The Redis transport redelivers an
unacknowledged message after ``visibility_timeout``; it must be longer than the longest batch (the
janitor reclaims work of dead workers much sooner, from their heartbeats).
"""

from __future__ import annotations

from celery import Celery

from sdfleet.settings import Settings

GENERATE_TASK = "sdfleet.generate"
WEBHOOK_TASK = "sdfleet.webhook.deliver"


def make_app(settings: Settings, *, prefetch: int = 1) -> Celery:
    from sdfleet import transport

    transport.install()  # every role uses the hardened Redis transport
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
        # Prefetch sized for batching: the worker must see a whole batch's messages to group them.
        worker_prefetch_multiplier=prefetch,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
        task_send_sent_event=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
