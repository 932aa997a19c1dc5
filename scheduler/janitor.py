"""The janitor: hands the work of dead workers back to the queue without waiting for the broker.

Every worker keeps a heartbeat key with a short TTL and a set of the job ids whose messages it has
claimed and not acknowledged (``keys.worker_held``, kept in the same scripts as the claims and the
acknowledgements: :mod:`sdfleet.unacked`). When a heartbeat has expired, the janitor takes each held
job's unacknowledged message out of the Redis transport's ``unacked`` hash and puts it back at the front
of its queue, exactly as the transport itself would after the visibility timeout, only minutes or hours
sooner. A held job with no message left (it was acknowledged) that has not ended gets a fresh message.
Redelivery is safe: state transitions are compare-and-set, so a job never gets two outcomes, and its
object keys are fixed, so a rerun overwrites rather than duplicates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from sdfleet import keys
from sdfleet.jobs import parse_job
from sdfleet.state import QUEUED, RUNNING, JobStore
from sdfleet.unacked import UNACKED, UNACKED_INDEX


def unacked_tags_by_job(r: redis.Redis) -> dict[str, str]:
    """job id (the Celery task id) -> delivery tag, for every unacknowledged message."""
    out: dict[str, str] = {}
    for tag, raw in r.hscan_iter(UNACKED, count=500):
        try:
            payload = json.loads(raw)[0]
            out[payload["headers"]["id"]] = tag
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return out


def restore_by_tag(r: redis.Redis, tag: str) -> bool:
    """Move one unacked message back to the front of its queue, atomically. False if it was gone."""
    with r.pipeline() as pipe:
        while True:
            try:
                pipe.watch(UNACKED)
                raw = pipe.hget(UNACKED, tag)
                if raw is None:
                    pipe.unwatch()
                    return False
                payload, _exchange, routing_key = json.loads(raw)
                payload.setdefault("headers", {})["redelivered"] = True
                payload.get("properties", {}).get("delivery_info", {})["redelivered"] = True
                pipe.multi()
                pipe.hdel(UNACKED, tag)
                pipe.zrem(UNACKED_INDEX, tag)
                # RPUSH: consumers pop from the right, so the message is next in line, as kombu does.
                pipe.rpush(routing_key, json.dumps(payload))
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def reclaim_worker(r: redis.Redis, store: JobStore, app: Any, worker_id: str, log: Any,
                   tags: dict[str, str] | None = None, skip: Iterable[str] = ()) -> dict[str, int]:
    """Hand back everything ``worker_id`` holds. Returns counts of restored messages and re-enqueued jobs."""
    from producer.submit import enqueue

    held = set(r.smembers(keys.worker_held(worker_id))) - set(skip)
    if not held:
        r.delete(keys.worker_held(worker_id))
        return {"restored": 0, "reenqueued": 0}
    tags = unacked_tags_by_job(r) if tags is None else tags
    restored = reenqueued = 0
    for job_id in sorted(held):
        tag = tags.get(job_id)
        if tag is not None and restore_by_tag(r, tag):
            restored += 1
            continue
        rec = store.job(job_id)
        if rec is not None and rec.status in (QUEUED, RUNNING):
            enqueue(app, rec.batch_id, [(job_id, parse_job(rec.spec))])
            reenqueued += 1
    r.srem(keys.worker_held(worker_id), *held)
    log.warning("reclaimed the work of a worker", dead_worker=worker_id, restored=restored, reenqueued=reenqueued)
    return {"restored": restored, "reenqueued": reenqueued}


def held_by_live_workers(r: redis.Redis) -> set[str]:
    """Job ids held by workers whose heartbeat is current."""
    held: set[str] = set()
    for w in r.smembers(keys.WORKERS):
        if r.exists(keys.worker(w)):
            held |= r.smembers(keys.worker_held(w))
    return held


def restore_orphans(r: redis.Redis, grace_s: float, log: Any) -> int:
    """Restore unacked messages older than ``grace_s`` that no live worker holds.

    A worker records a claimed message in its held set in the same script that claims it, and forgets it
    in the one that acknowledges it; a message still unacknowledged long after delivery and held by no
    live worker belongs to no one that will acknowledge it (a worker that could not settle at shutdown,
    a held set lost in a Redis restart). Without this it would wait for the visibility timeout.
    """
    old = r.zrangebyscore(UNACKED_INDEX, 0, time.time() - grace_s)
    if not old:
        return 0
    held = held_by_live_workers(r)
    restored = 0
    for tag in old:
        raw = r.hget(UNACKED, tag)
        if raw is None:
            continue
        try:
            job_id = json.loads(raw)[0]["headers"]["id"]
        except (ValueError, KeyError, TypeError, IndexError):
            job_id = None
        if job_id not in held and restore_by_tag(r, tag):
            restored += 1
    if restored:
        log.warning("restored orphaned messages", restored=restored)
    return restored


def recover_lost(r: redis.Redis, store: JobStore, app: Any, log: Any, grace_s: float, recent: int = 200) -> int:
    """Re-enqueue queued jobs whose message exists nowhere, once their model's queue has drained.

    Workers claim a message and record it as unacknowledged in one script, so they cannot lose one; but a
    producer killed between recording its jobs and enqueueing their messages, or a Redis that lost its
    latest writes, leaves a job 'queued' with no message in the queue, none unacked and no worker holding
    it. That can only be told apart from a job still waiting in line once the queue is empty, which is
    when this looks (so it costs nothing while a backlog is being worked off).
    """
    from producer.submit import enqueue

    now = time.time()
    found = 0
    tags: dict[str, str] | None = None
    held: set[str] = set()
    queue_empty: dict[str, bool] = {}  # one LLEN per model, not per job
    for batch_id in r.zrevrange(keys.BATCHES, 0, recent - 1):
        meta = r.hmget(keys.batch(batch_id), "completed_at", "total")
        if meta[0] or not meta[1] or store.counts(batch_id)["queued"] == 0:
            continue
        lost = []
        for rec in store.iter_batch_jobs(batch_id):
            if rec.status != QUEUED or now - float(rec.fields.get("queued_at") or now) < grace_s:
                continue
            model = rec.spec.get("model", "")
            if model not in queue_empty:
                queue_empty[model] = r.llen(keys.queue_for_model(model)) == 0
            if not queue_empty[model]:
                continue
            if tags is None:
                tags = unacked_tags_by_job(r)
                held = held_by_live_workers(r)
            if rec.job_id in tags or rec.job_id in held:
                continue
            lost.append((rec.job_id, parse_job(rec.spec)))
        if lost:
            enqueue(app, batch_id, lost)
            found += len(lost)
            log.warning("re-enqueued jobs whose message was lost", batch_id=batch_id, jobs=len(lost))
    return found


def sweep(r: redis.Redis, store: JobStore, app: Any, log: Any, grace_s: float = 30.0) -> dict[str, int]:
    """One pass: reclaim the work of every worker whose heartbeat has expired, then orphaned messages."""
    totals = {"dead_workers": 0, "restored": 0, "reenqueued": 0}
    dead = [w for w in r.smembers(keys.WORKERS) if not r.exists(keys.worker(w))]
    tags = unacked_tags_by_job(r) if dead else {}
    for worker_id in dead:
        # Re-check: a worker that came back under the same id keeps its work.
        if r.exists(keys.worker(worker_id)):
            continue
        counts = reclaim_worker(r, store, app, worker_id, log, tags)
        r.srem(keys.WORKERS, worker_id)
        totals["dead_workers"] += 1
        totals["restored"] += counts["restored"]
        totals["reenqueued"] += counts["reenqueued"]
    totals["restored"] += restore_orphans(r, grace_s, log)
    totals["reenqueued"] += recover_lost(r, store, app, log, grace_s)
    return totals


def run_janitor(settings: Any, *, interval: float = 2.0, once: bool = False, log: Any) -> int:
    from sdfleet.queue import make_app
    from sdfleet.redisconn import connect

    r = connect(settings.redis_url)
    store, app = JobStore(r), make_app(settings)
    # Long enough that a live worker has recorded what it received (one loop tick), with margin.
    grace = 2 * settings.heartbeat_ttl + 1
    log.info("janitor started", interval_s=interval, orphan_grace_s=grace)
    while True:
        try:
            totals = sweep(r, store, app, log, grace)
            if any(totals.values()):
                log.info("sweep", **totals)
        except redis.RedisError as exc:  # Redis restarting: try again next round
            log.warning("sweep failed", error=repr(exc))
        if once:
            return 0
        time.sleep(interval)
