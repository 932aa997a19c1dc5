"""Housekeeping: the janitor's remaining duties, run from the reclaim sweep (each worker in turn, under the
sweep lock) and from ``sdfleet janitor``.

- **State expiry.** Once a batch has completed, every key of it (batch, counts, job list, custom ids, each
  job's record) is given a Redis TTL of ``record_ttl_s`` from its completion, so Redis deletes it; batches
  still listed past that time are deleted here and leave the batch index. An open batch is never expired.
- **Partial files.** A write killed midway leaves a hidden ``.tmp-*`` file next to its object (``file://``
  storage; S3 puts are atomic). Those older than ``partial_file_grace_s`` under the folders of recent
  batches are deleted, and so are staged ``.run-*`` objects of engine runs older than the visibility
  timeout (their run can no longer promote them: the message has been redelivered by then), except those
  of a job still ``storing``: its outcome is recorded and they are its only copy, which its redelivered
  message promotes.
- **Batch completion.** A batch whose counts add up to its total but which has no ``completed_at`` (the
  transition that ended it ran before the total was raised, or its announcement was lost) is completed
  here, once, and its batch task (manifest, ``batch.completed``) is queued.

One pass runs at most every ``keys.HOUSEKEEPING_INTERVAL_S`` seconds across the fleet, and each duty's work
per pass is bounded, so a sweep stays short whatever the number of batches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import redis

from sdfleet import keys
from sdfleet.state import JobStore

#: batches looked at per pass (newest first) for expiry marks, partial files and completion
RECENT_BATCHES = 200
#: batches deleted per pass (oldest first)
DELETE_PER_PASS = 20
#: job keys given a TTL, and job keys deleted, per pass: ~0.15 s of Redis time each on the 2-core box
#: (docs/SCALING.md), well inside the sweep lock's 30 s
JOBS_PER_PASS = 20_000
JOB_CHUNK = 1000


def housekeep(r: redis.Redis, store: JobStore, storage_factory: Any, settings: Any, log: Any, *,
              app: Any = None, now: float | None = None, force: bool = False) -> dict[str, int]:
    """One pass of every duty (skipped, returning {}, if another process ran one within the interval)."""
    if not force and not r.set(keys.HOUSEKEEPING_DUE, "1", nx=True, ex=keys.HOUSEKEEPING_INTERVAL_S):
        return {}
    now = time.time() if now is None else now
    recent = [_text(b) for b in r.zrevrange(keys.BATCHES, 0, RECENT_BATCHES - 1)]
    totals = {
        "batches_completed": complete_batches(r, settings, recent, log, app=app, now=now),
        "batches_marked_expiring": mark_expiry(r, recent, settings.record_ttl_s, now),
        "batches_deleted": delete_expired(r, settings.record_ttl_s, now, log),
        "partial_files_removed": sweep_partial_files(r, storage_factory, recent, settings, now, log),
    }
    if any(totals.values()):
        log.info("housekeeping", **totals)
    return totals


# --- batch completion -----------------------------------------------------------------------------

def complete_batches(r: redis.Redis, settings: Any, batch_ids: Iterable[str], log: Any, *, app: Any = None,
                     now: float | None = None) -> int:
    """Complete open batches whose counts say every job has ended; returns how many."""
    from sdfleet.events import BATCH_TASK
    from sdfleet.state import TERMINAL
    from sdfleet.webhooks import outbox

    now = time.time() if now is None else now
    ids = list(batch_ids)
    pipe = r.pipeline(transaction=False)
    for bid in ids:
        pipe.hmget(keys.batch(bid), "completed_at", "total")
        pipe.hgetall(keys.batch_counts(bid))
        pipe.exists(keys.submission(bid))
    replies = pipe.execute()
    done = 0
    for i, bid in enumerate(ids):
        (completed_at, total), counts, submitting = replies[3 * i:3 * i + 3]
        if completed_at or submitting or not total or int(total) <= 0:
            continue
        ended = sum(int(counts.get(s, 0) or 0) for s in TERMINAL)
        if ended < int(total):
            continue
        if not r.hsetnx(keys.batch(bid), "completed_at", f"{now:.6f}"):
            continue  # completed meanwhile by the transition that ended it
        # as the transition script does: who completed it, and that its announcement is still to come
        r.pipeline(transaction=False).hset(keys.batch(bid), "completed_by", "housekeeping").zadd(
            keys.UNANNOUNCED, {bid: now}).execute()
        if app is None:
            from sdfleet.queue import make_app

            app = make_app(settings)
        outbox.send(app, BATCH_TASK, {"batch_id": bid})
        log.warning("batch completed by housekeeping (its counts were done, completed_at missing)", batch_id=bid,
                    total=int(total))
        done += 1
    return done


# --- state expiry ---------------------------------------------------------------------------------

def batch_keys(bid: str) -> list[str]:
    return [keys.batch(bid), keys.batch_jobs(bid), keys.batch_counts(bid), keys.batch_custom_ids(bid)]


def mark_expiry(r: redis.Redis, batch_ids: Iterable[str], ttl_s: int, now: float,
                budget: int = JOBS_PER_PASS) -> int:
    """Give each newly completed batch's keys a TTL of ``ttl_s`` from its completion; returns how many
    batches were finished. At most ``budget`` job keys per pass: a million-job batch is marked over a few
    passes (its progress kept in the batch hash), so no pass outlives the sweep lock."""
    marked = 0
    for bid in batch_ids:
        if budget <= 0:
            break
        completed_at, expiry_for, progress = r.hmget(keys.batch(bid), "completed_at", "expiry_for", "expiry_progress")
        if not completed_at or expiry_for == completed_at:
            continue  # open, or marked for this completion already (a reopened batch is marked again)
        done_for, _, pos_text = (progress or "").partition("|")
        pos = int(pos_text) if done_for == completed_at and pos_text.isdigit() else 0
        left = max(1, int(float(completed_at) + ttl_s - now))
        ids = r.lrange(keys.batch_jobs(bid), pos, pos + budget - 1)
        for chunk in _chunks(ids, JOB_CHUNK):
            # Only while the batch is still completed as read: a resubmission that reopens it in between
            # gives its job keys the full TTL (JobStore.commit_submission), and no later chunk undoes that.
            r.eval(_EXPIRE_IF_COMPLETED, 1 + len(chunk), keys.batch(bid), *[keys.job(_text(j)) for j in chunk],
                   completed_at, left)
        budget -= len(ids)
        pos += len(ids)
        if pos < r.llen(keys.batch_jobs(bid)):
            r.hset(keys.batch(bid), "expiry_progress", f"{completed_at}|{pos}")
            continue
        pipe = r.pipeline(transaction=False)
        for k in batch_keys(bid):
            pipe.expire(k, left)
        pipe.execute()
        # Compare and set: a batch reopened meanwhile keeps its fresh state unmarked.
        r.eval("if redis.call('HGET', KEYS[1], 'completed_at') == ARGV[1] then "
               "redis.call('HSET', KEYS[1], 'expiry_for', ARGV[1]) redis.call('HDEL', KEYS[1], 'expiry_progress') "
               "end return 0", 1, keys.batch(bid), completed_at)
        marked += 1
    return marked


# KEYS[1] batch hash, KEYS[2..] job keys; ARGV completed_at as read, TTL. Expires the job keys only if the
# batch's completed_at is still ARGV[1].
_EXPIRE_IF_COMPLETED = """
if redis.call('HGET', KEYS[1], 'completed_at') ~= ARGV[1] then return 0 end
for k = 2, #KEYS do redis.call('EXPIRE', KEYS[k], ARGV[2]) end
return #KEYS - 1
"""


def delete_expired(r: redis.Redis, ttl_s: int, now: float, log: Any, budget: int = JOBS_PER_PASS) -> int:
    """Delete batches completed more than ``ttl_s`` ago (oldest first, at most ``budget`` job keys per pass:
    a big batch's job list is consumed from its head over several passes); drop index entries of batches
    Redis has expired already. Returns how many batches were deleted in full."""
    # A batch completes after it is created, so only batches created before now - ttl can be due.
    old = [_text(b) for b in r.zrangebyscore(keys.BATCHES, "-inf", now - ttl_s, start=0, num=DELETE_PER_PASS)]
    deleted = 0
    for bid in old:
        if budget <= 0:
            break
        completed_at = r.hget(keys.batch(bid), "completed_at")
        if not r.exists(keys.batch(bid)):
            r.zrem(keys.BATCHES, bid)
            continue
        if not completed_at or float(completed_at) > now - ttl_s:
            continue
        ids = r.lrange(keys.batch_jobs(bid), 0, budget - 1)
        for chunk in _chunks(ids, JOB_CHUNK):
            r.unlink(*[keys.job(_text(j)) for j in chunk])
        budget -= len(ids)
        if ids:
            r.ltrim(keys.batch_jobs(bid), len(ids), -1)
        if r.llen(keys.batch_jobs(bid)):
            continue  # the rest next pass
        r.unlink(*batch_keys(bid))
        r.zrem(keys.BATCHES, bid)
        log.info("batch state expired", batch_id=bid, completed_at=float(completed_at))
        deleted += 1
    return deleted


# --- partial files --------------------------------------------------------------------------------

def batch_locations(r: redis.Redis, bid: str) -> set[str]:
    """The output locations of a batch, from its first and last jobs' specs (a batch rarely has two)."""
    import json

    ids = {_text(j) for j in r.lrange(keys.batch_jobs(bid), 0, 0) + r.lrange(keys.batch_jobs(bid), -1, -1)}
    out = set()
    for jid in ids:
        spec = r.hget(keys.job(jid), "spec")
        try:
            loc = json.loads(spec or "{}").get("out")
        except ValueError:
            continue
        if isinstance(loc, str) and loc:
            out.add(loc)
    return out


def sweep_partial_files(r: redis.Redis, storage_factory: Any, batch_ids: Iterable[str], settings: Any, now: float,
                        log: Any) -> int:
    removed = 0
    staged_grace = max(settings.partial_file_grace_s, float(getattr(settings, "visibility_timeout", 0)))
    for bid in batch_ids:
        keep: Any = None
        for loc in batch_locations(r, bid):
            if not loc.startswith("file://"):
                continue
            root = getattr(storage_factory.get(loc), "root", None)
            if root is None:
                continue
            if keep is None:
                keep = staged_in_use(r, storage_factory, bid)
            removed += remove_partials(os.path.join(str(root), bid), now, settings.partial_file_grace_s,
                                       staged_grace, log, keep=keep)
    return removed


def staged_in_use(r: redis.Redis, storage_factory: Any, bid: str) -> Any:
    """What of a batch's staged ``.run-*`` files must stay: a job ``storing`` has its outcome recorded and its
    images only under its run's staged names (the redelivered message promotes them), however old they are.

    Returns a set of paths, or ``ALL`` for an open batch too big to look through in one pass (nothing staged
    is deleted until its storing jobs have ended). A completed batch, or one with no job storing, keeps none.
    """
    import json

    from sdfleet.state import STORING

    completed_at, total = r.hmget(keys.batch(bid), "completed_at", "total")
    if completed_at or not int(r.hget(keys.batch_counts(bid), STORING) or 0):
        return set()
    if int(total or 0) > JOBS_PER_PASS:
        return ALL
    keep: set[str] = set()
    for chunk in _chunks([_text(j) for j in r.lrange(keys.batch_jobs(bid), 0, -1)], JOB_CHUNK):
        pipe = r.pipeline(transaction=False)
        for jid in chunk:
            pipe.hmget(keys.job(jid), "status", "staged")
        for status, staged in pipe.execute():
            if _text(status) != STORING:
                continue
            try:
                moves = json.loads(staged or "[]")
            except ValueError:
                return ALL  # unreadable: keep everything rather than guess
            for move in moves:
                try:
                    loc, staged_name = move[0], move[1]
                    root = getattr(storage_factory.get(loc), "root", None)
                except (TypeError, IndexError, KeyError, ValueError):
                    return ALL
                if root is not None:
                    keep.add(os.path.normpath(os.path.join(str(root), staged_name)))
    return keep


#: :func:`staged_in_use` answer that keeps every staged file of the batch
ALL = frozenset({"*"})


def remove_partials(folder: str, now: float, tmp_grace_s: float, staged_grace_s: float, log: Any,
                    keep: Any = frozenset()) -> int:
    """Delete ``.tmp-*`` files older than ``tmp_grace_s`` and ``.run-*`` older than ``staged_grace_s``,
    except staged files in ``keep`` (paths, or :data:`ALL`)."""
    removed = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            grace = tmp_grace_s if name.startswith(".tmp-") else staged_grace_s if name.startswith(".run-") else None
            if grace is None:
                continue
            path = os.path.join(dirpath, name)
            if name.startswith(".run-") and keep and (keep is ALL or os.path.normpath(path) in keep):
                continue
            try:
                if now - os.stat(path).st_mtime < grace:
                    continue
                os.unlink(path)
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
            removed += 1
            log.info("partial file removed", path=path)
    return removed


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
