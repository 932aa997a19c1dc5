"""Cancelling queued jobs: one mechanism for ``celery control revoke``, ``sdfleet cancel`` and purges.

A cancellation is recorded (compare-and-set queued -> cancelled, with the reason), announced (the job's
``job.cancelled`` webhook; ``batch.completed`` when it ends its batch) and broadcast as a Celery revoke, so
every worker drops its buffered copy and Celery's tools show the task revoked. A job already running is not
stopped: it finishes and records its own outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from sdfleet import logs as logs_mod
from sdfleet.errors import InvalidJob
from sdfleet.jobs import JobSpec, parse_job
from sdfleet.state import CANCELLED, QUEUED, JobStore

#: revoke messages carry at most this many ids (one broadcast message each)
REVOKE_CHUNK = 1000


@dataclass(frozen=True)
class JobRef:
    """What the notifier needs of a job: its ids and its spec (for the webhook fields)."""

    job_id: str
    batch_id: str
    spec: JobSpec


def cancel_jobs(store: JobStore, notifier: Any, job_ids: Sequence[str], reason: str, log: Any = None) -> list[str]:
    """Cancel those of ``job_ids`` that are still queued; announce each. Returns the ids cancelled now."""
    log = log or logs_mod.get("cancel")
    ids = list(dict.fromkeys(job_ids))
    done: list[str] = []
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        transitions = store.transition_many([(j, {"error": reason}) for j in chunk], CANCELLED, (QUEUED,))
        # also a job cancelled already whose cancel ended the batch (a retry after a lost reply): its batch's
        # end is announced again (deduplicated), or batch.completed would be lost with the reply
        applied = [(j, tr) for j, tr in zip(chunk, transitions)
                   if tr.applied or (tr.previous == CANCELLED and tr.batch_completed)]
        if not applied:
            continue
        for (job_id, tr), rec in zip(applied, store.jobs([j for j, _ in applied])):
            if tr.applied:
                done.append(job_id)
            if rec is None or notifier is None:
                continue
            try:
                spec = parse_job(rec.spec)
            except InvalidJob:  # validated at submit time; a record edited by hand is not announced
                continue
            notifier(JobRef(job_id, rec.batch_id, spec), "cancelled", tr)
    if done:
        log.info("jobs cancelled", jobs=len(done), reason=reason)
    return done


def revoke(app: Any, job_ids: Sequence[str]) -> None:
    """Broadcast a Celery revoke for ``job_ids`` (workers drop buffered copies; tools show them revoked)."""
    ids = list(job_ids)
    for i in range(0, len(ids), REVOKE_CHUNK):
        app.control.revoke(ids[i:i + REVOKE_CHUNK])


def cancel_batch(settings: Any, store: JobStore, app: Any, batch_id: str, log: Any = None) -> int:
    """``sdfleet cancel BATCH``: cancel every queued job of the batch, then revoke them. Returns how many."""
    import time

    from sdfleet import keys
    from sdfleet.events import Notifier

    store.batch(batch_id)  # BatchNotFound names the fix
    store.r.hset(keys.batch(batch_id), "cancelled_at", f"{time.time():.6f}")
    queued = [rec.job_id for rec in store.iter_batch_jobs(batch_id) if rec.status == QUEUED]
    notifier = Notifier(settings, store.r, log, app=app)
    done = cancel_jobs(store, notifier, queued, "cancelled by 'sdfleet cancel'", log)
    revoke(app, done)
    if not done and store.r.zscore(keys.UNANNOUNCED, batch_id) is not None:
        # Nothing left to cancel, but the batch's end was never announced (the cancel that ended it lost its
        # reply, and the retry lists no queued job): announce it now (once: complete_batch skips a repeat).
        notifier.announce_batch(batch_id)
    return len(done)


def cancel_purged(settings: Any, r: redis.Redis, queue: str, job_ids: Sequence[str]) -> int:
    """After a queue purge: the purged jobs end cancelled with the reason (the purge hook of sdfleet.celery)."""
    from sdfleet import keys
    from sdfleet.events import Notifier
    from sdfleet.queue import make_app
    from sdfleet.redisconn import connect

    if not job_ids:
        return 0
    client = connect(settings.redis_url)
    store = JobStore(client)
    done = cancel_jobs(store, Notifier(settings, client), job_ids, f"purged from queue {queue}")
    client.srem(keys.PURGED, *job_ids)
    revoke(make_app(settings), done)
    return len(done)
