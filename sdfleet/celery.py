"""The conventional app location, so that ``celery -A sdfleet <command>`` works against a running fleet.

    celery -A sdfleet inspect ping | stats | active | reserved
    celery -A sdfleet control revoke JOB_ID          # the job ends cancelled (recorded, webhook sent)
    celery -A sdfleet purge -Q sdfleet.gen.<model>   # purged jobs end cancelled, with the reason
    celery -A sdfleet events --dump ; celery -A sdfleet flower

Celery's command line imports this module and wants a module-level ``app``, so this is the one place where
settings are read from the environment at import time (``REDIS_URL`` and ``SDFLEET_*``, as for ``sdfleet``).
"""

from __future__ import annotations

from sdfleet.queue import make_app
from sdfleet.settings import Settings


def _app():
    from sdfleet import broker
    from sdfleet.cancel import cancel_purged

    settings = Settings.from_env()
    broker.on_purge(lambda r, queue, ids: cancel_purged(settings, r, queue, ids))
    return make_app(settings)


app = _app()
