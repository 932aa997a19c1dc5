"""The janitor: hands the work of dead workers back to the queue without waiting for the broker.

Every worker keeps a heartbeat key with a short TTL and a set of the job ids it has received and not
finished (``keys.worker_held``). When a heartbeat has expired, the janitor takes each held job's
unacknowledged message out of the Redis transport's ``unacked`` hash and puts it back at the front of
its queue, exactly as the transport itself would after the visibility timeout, only minutes or hours
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

# The Redis transport's own bookkeeping keys (kombu.transport.redis defaults).
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"


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
                # RPUSH: consumers BRPOP from the right, so the message is next in line, as kombu does.
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


def sweep(r: redis.Redis, store: JobStore, app: Any, log: Any) -> dict[str, int]:
    """One pass: reclaim the work of every worker whose heartbeat has expired."""
    totals = {"dead_workers": 0, "restored": 0, "reenqueued": 0}
    dead = [w for w in r.smembers(keys.WORKERS) if not r.exists(keys.worker(w))]
    if not dead:
        return totals
    tags = unacked_tags_by_job(r)
    for worker_id in dead:
        # Re-check: a worker that came back under the same id keeps its work.
        if r.exists(keys.worker(worker_id)):
            continue
        counts = reclaim_worker(r, store, app, worker_id, log, tags)
        r.srem(keys.WORKERS, worker_id)
        totals["dead_workers"] += 1
        totals["restored"] += counts["restored"]
        totals["reenqueued"] += counts["reenqueued"]
    return totals


def run_janitor(settings: Any, *, interval: float = 2.0, once: bool = False, log: Any) -> int:
    from sdfleet.queue import make_app
    from sdfleet.redisconn import connect

    r = connect(settings.redis_url)
    store, app = JobStore(r), make_app(settings)
    log.info("janitor started", interval_s=interval)
    while True:
        try:
            totals = sweep(r, store, app, log)
            if totals["dead_workers"]:
                log.info("sweep", **totals)
        except redis.RedisError as exc:  # Redis restarting: try again next round
            log.warning("sweep failed", error=repr(exc))
        if once:
            return 0
        time.sleep(interval)
