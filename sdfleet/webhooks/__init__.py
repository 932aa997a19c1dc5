"""Signed webhook delivery: URL policy, Standard Webhooks signing, the delivery queue and its worker."""

from sdfleet.webhooks.policy import check_url
from sdfleet.webhooks.signing import new_secret, parse_secrets

__all__ = ["check_url", "new_secret", "parse_secrets", "run_webhook_worker"]


def run_webhook_worker(settings, **kwargs):  # imported lazily: Celery worker machinery is heavy
    """Run the webhook worker (see :func:`sdfleet.webhooks.worker.run_webhook_worker`)."""
    from sdfleet.webhooks.worker import run_webhook_worker as run

    return run(settings, **kwargs)
