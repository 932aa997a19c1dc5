"""Handing back the work of dead workers, without waiting for the broker's visibility timeout.

Every worker keeps a heartbeat key with a short TTL and a hash of the messages it has received and not yet
acknowledged (``keys.worker_held``: job id -> delivery tag, written when the message arrives). Every worker
runs :func:`sweep` every few seconds, one at a time under a Redis lock (``sdfleet janitor`` runs the same
sweep, for fleets that want it separate), so a fleet with no janitor reclaims a dead worker's jobs within
heartbeat TTL plus one sweep interval. Messages go back through kombu's own ``QoS.restore_by_tag`` (to the
head of their queue, as kombu does after the visibility timeout). Redelivery is safe: state transitions are
compare-and-set, so a job never gets two outcomes, and only the run that records a job's outcome promotes
its objects.

The sweep also restores messages that kombu recorded as delivered but that no live worker holds (a worker
killed between kombu's record and its own), re-enqueues jobs whose message is nowhere (a worker killed
between kombu's pop and its record of the delivery; a Redis that lost its latest writes), and cancels, with
the reason, jobs whose messages a queue purge removed instead of enqueueing them again.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from sdfleet import broker, keys
from sdfleet.jobs import parse_job
from sdfleet.redisconn import release_owned
from sdfleet.state import QUEUED, RUNNING, STORING, JobStore


def held(r: redis.Redis, worker_id: str) -> dict[str, str]:
    return r.hgetall(keys.worker_held(worker_id))


def live_workers(r: redis.Redis) -> set[str]:
    return {w for w in r.smembers(keys.WORKERS) if r.exists(keys.worker(w))}


# A completed batch whose announcement did not come (Sweeper.announce_lost_completions): how long its report
# has to arrive before the sweep asks again (a large batch's own report can wait behind its job events on the
# webhook queue), how often it asks, and how far apart.
ANNOUNCE_GRACE_S = 600.0
ANNOUNCE_TRIES = 3
ANNOUNCE_RETRY_S = 1800.0


class Sweeper:
    """One process's view of the sweep: a Redis client, a kombu channel to restore with, an app to enqueue."""

    def __init__(self, r: redis.Redis, app: Any, settings: Any, log: Any, *, holder: str, grace_s: float,
                 lock_ttl_s: float = 30.0, housekeeping: Any = None):
        self.r = r
        self.settings = settings
        self.store = JobStore(r)
        self.app = app
        self.log = log
        self.holder = holder
        self.grace_s = grace_s
        self.lock_ttl_s = lock_ttl_s
        self.housekeeping = housekeeping
        self._conn: Any = None

    def _qos(self) -> Any:
        if self._conn is None:
            self._conn = self.app.connection_for_write()
        return self._conn.default_channel.qos

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:
                pass
            self._conn = None

    def restore(self, tag: str) -> bool:
        """Put one unacknowledged message back at the head of its queue (kombu's own restore)."""
        job_id, _ = broker.unacked_entry(self.r, tag)
        if job_id is None:
            return False
        try:
            self._qos().restore_by_tag(tag)
        except Exception:
            self.close()  # a connection lost with Redis: reconnect on the next call
            raise
        return True

    def run_once(self) -> dict[str, int] | None:
        """One sweep if this process gets the lock (None if another holds it)."""
        if not self.r.set(keys.SWEEP_LOCK, self.holder, nx=True, px=int(self.lock_ttl_s * 1000)):
            return None
        try:
            totals = self.sweep()
            if self.housekeeping is not None:
                try:
                    totals.update(self.housekeeping() or {})
                except Exception as exc:
                    self.log.warning("housekeeping failed", error=repr(exc))
            return totals
        finally:
            release_owned(self.r, keys.SWEEP_LOCK, self.holder)  # only our own lock

    def sweep(self) -> dict[str, int]:
        totals = {"dead_workers": 0, "restored": 0, "reenqueued": 0, "purged_cancelled": 0}
        for worker_id in self.r.smembers(keys.WORKERS):
            if self.r.exists(keys.worker(worker_id)):
                continue
            counts = self.reclaim_worker(worker_id)
            self.r.srem(keys.WORKERS, worker_id)
            totals["dead_workers"] += 1
            totals["restored"] += counts["restored"]
            totals["reenqueued"] += counts["reenqueued"]
        totals["restored"] += self.restore_orphans()
        lost = self.recover_lost()
        totals["reenqueued"] += lost["reenqueued"]
        totals["purged_cancelled"] += lost["cancelled"]
        try:
            totals["announced"] = self.announce_lost_completions()
        except Exception as exc:  # Redis or the broker: the rest of the sweep (and housekeeping after it) runs
            self.log.warning("could not look for unannounced batches", error=repr(exc))
        if any(totals.values()):
            self.log.info("sweep", **totals)
        return totals

    def announce_lost_completions(self, now: float | None = None) -> int:
        """Completed batches whose manifest and batch.completed have not come ANNOUNCE_GRACE_S after their
        completion (``keys.UNANNOUNCED``: the report of their end was lost, or its task failed): ask the
        webhook worker again, at most ANNOUNCE_TRIES times, ANNOUNCE_RETRY_S apart, so that a fleet whose
        webhook worker is down does not fill its queue; then it gives up on that completion (an error in the
        log). Returns how many were asked for now."""
        from sdfleet.events import Notifier

        now = time.time() if now is None else now
        late = self.r.zrangebyscore(keys.UNANNOUNCED, "-inf", now - ANNOUNCE_GRACE_S, start=0, num=500)
        if not late:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for batch_id in late:
            pipe.hmget(keys.batch(batch_id), "completed_at", "announced_for", "announce_asked")
        asked_now = 0
        notifier = None
        for batch_id, (completed_at, announced, asked) in zip(late, pipe.execute()):
            if not completed_at or announced == completed_at:
                self.r.zrem(keys.UNANNOUNCED, batch_id)  # reopened, expired or announced meanwhile
                continue
            # announce_asked: "<completed_at> <times asked> <last asked at>", for this completion only
            parts = (asked or "").split()
            tries, last = (int(parts[1]), float(parts[2])) if len(parts) == 3 and parts[0] == completed_at else (0, 0.0)
            if tries >= ANNOUNCE_TRIES:
                self.r.zrem(keys.UNANNOUNCED, batch_id)  # given up (logged as an error at the last ask)
                continue
            if now - last < ANNOUNCE_RETRY_S:
                continue
            notifier = notifier or Notifier(self.settings, self.r, self.log, app=self.app)
            notifier.announce_batch(batch_id)
            self.r.hset(keys.batch(batch_id), "announce_asked", f"{completed_at} {tries + 1} {now:.3f}")
            asked_now += 1
            log = self.log.warning if tries + 1 < ANNOUNCE_TRIES else self.log.error
            log("completed batch not announced; asked the webhook worker again", batch_id=batch_id,
                tries=tries + 1, of=ANNOUNCE_TRIES)
        return asked_now

    def reclaim_worker(self, worker_id: str) -> dict[str, int]:
        """Hand back everything ``worker_id`` holds (its heartbeat has expired)."""
        from producer.submit import enqueue

        entries = held(self.r, worker_id)
        self.r.set(keys.worker_reclaimed(worker_id), f"{time.time():.3f}", ex=3600)
        restored = reenqueued = 0
        for job_id, tag in sorted(entries.items()):
            if self.r.exists(keys.worker(worker_id)):
                break  # it came back under the same id: it keeps the rest
            if self.restore(tag):
                restored += 1
                continue
            # No message left (acknowledged, or restored already by kombu); a job not ended needs one.
            rec = self.store.job(job_id)
            if rec is not None and rec.status in (QUEUED, RUNNING, STORING) and rec.fields.get("worker") in (worker_id, None, ""):
                enqueue(self.app, rec.batch_id, [(job_id, parse_job(rec.spec))])
                reenqueued += 1
        if entries:
            self.r.hdel(keys.worker_held(worker_id), *entries)
            self.log.warning("reclaimed the work of a dead worker", dead_worker=worker_id, restored=restored,
                             reenqueued=reenqueued)
        return {"restored": restored, "reenqueued": reenqueued}

    def _live_tags(self) -> set[str]:
        tags: set[str] = set()
        for w in live_workers(self.r):
            tags |= set(held(self.r, w).values())
        return tags

    def restore_orphans(self) -> int:
        """Restore generation messages delivered over ``grace_s`` ago that no live worker holds."""
        old = broker.unacked_older_than(self.r, time.time() - self.grace_s)
        if not old:
            return 0
        live = self._live_tags()
        restored = 0
        for tag in old:
            if tag in live:
                continue
            job_id, routing_key = broker.unacked_entry(self.r, tag)
            # Only generation queues: the webhook worker's messages are not held anywhere by design.
            if job_id and routing_key and routing_key.startswith(keys.GEN_QUEUE_PREFIX) and self.restore(tag):
                restored += 1
        if restored:
            self.log.warning("restored orphaned messages", restored=restored)
        return restored

    def recover_lost(self, recent: int = 200) -> dict[str, int]:
        """Jobs not ended whose message is nowhere, looked for once their model's queue has drained (so it costs
        nothing while a backlog is worked off): re-enqueued, or cancelled if a purge removed them.

        Queued jobs, and running or storing jobs whose worker is gone: the dead-worker reclaim hands those back
        through the worker's held hash, and this is the net under it (a job must never stay ``running`` with
        no message anywhere and no worker to finish it)."""
        from producer.submit import enqueue
        from sdfleet.cancel import cancel_jobs
        from sdfleet.events import Notifier

        now = time.time()
        out = {"reenqueued": 0, "cancelled": 0}
        unacked: set[str] | None = None
        holders: set[str] = set()
        live: set[str] | None = None
        queue_empty: dict[str, bool] = {}
        for batch_id in self.r.zrevrange(keys.BATCHES, 0, recent - 1):
            meta = self.r.hmget(keys.batch(batch_id), "completed_at", "total", "models")
            counts = self.store.counts(batch_id)
            if meta[0] or not meta[1] or counts[QUEUED] + counts[RUNNING] + counts[STORING] == 0:
                continue
            models = meta[2].split(",") if meta[2] else []
            for model in models:
                if model not in queue_empty:
                    queue_empty[model] = broker.queue_depth(self.r, keys.queue_for_model(model)) == 0
            if models and not any(queue_empty[m] for m in models):
                continue  # every queue of its models still has a backlog: nothing to look at yet
            if self.r.exists(keys.submission(batch_id)):
                continue  # being (re)submitted: its messages are on their way
            lost, purged = [], []
            for rec in self.store.iter_batch_jobs(batch_id):
                if rec.status == QUEUED:
                    if now - float(rec.fields.get("queued_at") or now) < self.grace_s:
                        continue
                elif rec.status in (RUNNING, STORING):
                    if live is None:
                        live = live_workers(self.r)
                    since = float(rec.fields.get(f"{rec.status}_at") or rec.fields.get("running_at") or now)
                    if rec.fields.get("worker") in live or now - since < self.grace_s:
                        continue  # its worker is alive (or only just gone: the reclaim hands it back)
                else:
                    continue
                model = rec.spec.get("model", "")
                if model not in queue_empty:
                    queue_empty[model] = broker.queue_depth(self.r, keys.queue_for_model(model)) == 0
                if not queue_empty[model]:
                    continue
                if unacked is None:
                    unacked = {job for _, job, _ in broker.unacked_job_ids(self.r)}
                    for w in live_workers(self.r):
                        holders |= set(held(self.r, w))
                if rec.job_id in unacked or rec.job_id in holders:
                    continue
                if self.r.sismember(keys.PURGED, rec.job_id):
                    purged.append(rec.job_id)
                else:
                    lost.append((rec.job_id, parse_job(rec.spec)))
            if lost:
                enqueue(self.app, batch_id, lost)
                out["reenqueued"] += len(lost)
                self.log.warning("re-enqueued jobs whose message was lost", batch_id=batch_id, jobs=len(lost))
            if purged:
                notifier = Notifier(self.settings, self.r, self.log, app=self.app)
                out["cancelled"] += len(cancel_jobs(self.store, notifier, purged, "purged from its queue"))
                self.r.srem(keys.PURGED, *purged)
        return out

