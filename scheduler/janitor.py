"""``sdfleet janitor``: the reclaim sweep and housekeeping as a process of their own.

Every worker already runs the same sweep (one at a time, under a Redis lock: :mod:`sdfleet.reclaim`), so a
fleet needs no janitor; this is for fleets that want the duty separate, or a sweep while no worker runs.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import redis


def housekeeping_for(settings: Any, r: redis.Redis, log: Any):
    """The janitor's remaining duties (state expiry, partial-file sweep, batch completion), if available."""
    try:
        from scheduler.housekeeping import housekeep
    except ImportError:  # pragma: no cover - the module ships with the scheduler
        return None
    from sdfleet.state import JobStore
    from sdfleet.storage import StorageFactory

    store = JobStore(r)
    storage = StorageFactory(settings.s3_endpoint_url, settings.s3_region, settings.upload_retries)
    return lambda: housekeep(r, store, storage, settings, log)


def run_janitor(settings: Any, *, interval: float = 2.0, once: bool = False, log: Any) -> int:
    import os

    from sdfleet.queue import make_app
    from sdfleet.reclaim import Sweeper
    from sdfleet.redisconn import connect

    r = connect(settings.redis_url)
    # Long enough that a live worker has recorded what it received (one loop tick), with margin.
    grace = 2 * settings.heartbeat_ttl + 1
    sweeper = Sweeper(r, make_app(settings), settings, log, holder=f"janitor@{socket.gethostname()}-{os.getpid()}",
                      grace_s=grace, housekeeping=housekeeping_for(settings, r, log))
    log.info("janitor started", interval_s=interval, orphan_grace_s=grace)
    while True:
        try:
            sweeper.run_once()
        except redis.RedisError as exc:  # Redis restarting: try again next round
            log.warning("sweep failed", error=repr(exc))
        if once:
            return 0
        time.sleep(interval)
