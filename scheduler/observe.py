"""What the scheduler, ``sdfleet top`` and ``sdfleet workers`` read from Redis: queues, workers, pools.

Queued work per bucket is estimated from a sample of each queue list: both ends (the next jobs to run and
the newest), every message when the list is short. Each sampled message's job record says whether it is
still to run (queued, or running / storing when the reclaim sweep handed a dead worker's message back), so
cancelled jobs (whose messages stay in the list until a worker drops them) and duplicates of finished jobs
are not counted, which a raw list length would. The estimate costs a few
round trips per pool however long the queue is. Work in flight is what workers hold: their heartbeats and
held hashes, including those of dead workers whose messages the reclaim sweep has not handed back yet.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from sdfleet import broker, keys

#: messages read from each end of each queue list per observation
SAMPLE_PER_END = 100
LIVE_STATES = ("booting", "idle", "busy", "draining", "stalled")
#: job statuses whose queued message still has work to do
UNENDED = ("queued", "running", "storing")


@dataclass
class PoolView:
    pool: str
    queued_raw: int = 0  # messages in the queue lists
    queued: float = 0.0  # of which the estimated jobs still to run (not ended)
    queued_by_bucket: dict[str, float] = field(default_factory=dict)
    in_flight_by_bucket: dict[str, float] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)  # bucket -> seconds per image
    workers: list[dict[str, str]] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return round(sum(self.in_flight_by_bucket.values()))

    def count(self, *states: str) -> int:
        return sum(1 for w in self.workers if w.get("state", "") in states)


def message_job(raw: str | bytes) -> tuple[str, str] | None:
    """(job id, bucket) of one queued Celery message as the Redis transport stores it; None if unreadable."""
    try:
        msg = json.loads(raw)
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        kwargs = decoded[1] if isinstance(decoded, list) else decoded.get("kwargs", {})
        spec = kwargs["spec"]
        return str(kwargs["job_id"]), keys.bucket_of(int(spec["width"]), int(spec["height"]), int(spec["steps"]))
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def sample_queue(r: redis.Redis, model: str, per_end: int = SAMPLE_PER_END) -> tuple[int, float, dict[str, float]]:
    """(messages, estimated live queued jobs, estimated live queued jobs per bucket) of ``model``'s queue."""
    lists = keys.queue_lists(model)
    pipe = r.pipeline(transaction=False)
    for name in lists:
        pipe.llen(name)
    lengths = pipe.execute()
    total = sum(lengths)
    if total == 0:
        return 0, 0.0, {}
    pipe = r.pipeline(transaction=False)
    for name, n in zip(lists, lengths):
        if n == 0:
            continue
        if n <= 2 * per_end:
            pipe.lrange(name, 0, -1)
        else:
            pipe.lrange(name, 0, per_end - 1)
            pipe.lrange(name, -per_end, -1)
    raws = [m for chunk in pipe.execute() for m in chunk]
    parsed = [p for p in (message_job(m) for m in raws) if p is not None]
    if not parsed:
        return total, float(total), {"unknown": float(total)}
    pipe = r.pipeline(transaction=False)
    for job_id, _ in parsed:
        pipe.hget(keys.job(job_id), "status")
    statuses = pipe.execute()
    # A message whose job has not ended is work nobody is doing yet: queued, or handed back by the reclaim
    # sweep while its record still says running or storing (the worker that held it died).
    live = Counter(bucket for (_, bucket), st in zip(parsed, statuses) if _text(st) in UNENDED)
    scale = total / len(raws)  # unreadable messages count like the readable ones
    return total, sum(live.values()) * scale, {b: n * scale for b, n in live.items()}


def live_workers(r: redis.Redis) -> list[dict[str, str]]:
    """The heartbeat hash of every worker whose heartbeat has not expired, sorted by worker id."""
    ids = sorted(_text(w) for w in r.smembers(keys.WORKERS))
    pipe = r.pipeline(transaction=False)
    for w in ids:
        pipe.hgetall(keys.worker(w))
    out = []
    for wid, beat in zip(ids, pipe.execute()):
        if beat:
            info = {_text(k): _text(v) for k, v in beat.items()}
            info.setdefault("worker_id", wid)
            out.append(info)
    return out


def worker_pool(info: dict[str, str]) -> str:
    """The pool (model queue name) a heartbeat belongs to."""
    queue = info.get("queue", "")
    prefix = keys.queue_for_model("")
    return queue[len(prefix):] if queue.startswith(prefix) else info.get("model", "")


def in_flight(info: dict[str, str]) -> tuple[int, str]:
    """(jobs held, their bucket) from one heartbeat: the batch in the engine plus what it buffers."""
    n = 0
    for name in ("current_batch_size", "buffered"):
        try:
            n += int(float(info.get(name) or 0))
        except ValueError:
            continue
    return n, info.get("current_bucket", "") or "unknown"


def discover_pools(r: redis.Redis, workers: Iterable[dict[str, str]]) -> list[str]:
    """Pools with a queue list in Redis or a live worker."""
    prefix = keys.queue_for_model("")
    found = {worker_pool(w) for w in workers}
    for name in r.scan_iter(match=f"{prefix}*", count=500):
        name = _text(name)
        base = name.split(broker.PRIORITY_SEP, 1)[0]
        if base.startswith(prefix) and base != keys.WEBHOOK_QUEUE:
            found.add(base[len(prefix):])
    return sorted(p for p in found if p)


def observe(r: redis.Redis, pools: Iterable[str], workers: list[dict[str, str]] | None = None) -> dict[str, PoolView]:
    workers = live_workers(r) if workers is None else workers
    held = held_in_flight(r, workers)
    views: dict[str, PoolView] = {}
    for pool in pools:
        v = PoolView(pool)
        v.queued_raw, v.queued, v.queued_by_bucket = sample_queue(r, pool)
        raw = r.hgetall(keys.service_times(pool))
        for k, s in raw.items():
            try:
                v.measured[_text(k)] = float(s)
            except ValueError:
                continue
        v.workers = [w for w in workers if worker_pool(w) == pool]
        flight: Counter[str] = held.get(pool, Counter())
        v.in_flight_by_bucket = {b: float(n) for b, n in flight.items() if n}
        views[pool] = v
    return views


def held_in_flight(r: redis.Redis, workers: list[dict[str, str]]) -> dict[str, Counter[str]]:
    """pool -> bucket -> jobs held by workers, live or dead: a live worker's batch and buffer (its heartbeat,
    or its held hash when that says more: jobs still storing), and every job not ended in the held hash of a
    worker whose heartbeat expired. A dead worker's jobs wait for the reclaim sweep; counting them keeps
    a worker in the pool to run them once they are back in the queue."""
    out: dict[str, Counter[str]] = {}
    live = {w.get("worker_id", ""): w for w in workers}
    ids = sorted(_text(w) for w in r.smembers(keys.WORKERS))
    pipe = r.pipeline(transaction=False)
    for wid in ids:
        if wid in live:
            pipe.hlen(keys.worker_held(wid))
        else:
            pipe.hkeys(keys.worker_held(wid))
    dead_jobs: list[str] = []
    held_n: dict[str, int] = {}
    for wid, reply in zip(ids, pipe.execute()):
        if wid in live:
            held_n[wid] = int(reply)
        else:
            dead_jobs += [_text(j) for j in reply]
    for wid, w in live.items():
        n, bucket = in_flight(w)
        out.setdefault(worker_pool(w), Counter())[bucket] += max(n, held_n.get(wid, 0))
    if dead_jobs:
        pipe = r.pipeline(transaction=False)
        for jid in dead_jobs:
            pipe.hmget(keys.job(jid), "status", "spec")
        for status, spec in pipe.execute():
            if _text(status) not in UNENDED:
                continue
            try:
                sp = json.loads(spec)
                pool, bucket = str(sp["model"]), keys.bucket_of(int(sp["width"]), int(sp["height"]), int(sp["steps"]))
            except (ValueError, KeyError, TypeError):
                continue
            out.setdefault(pool, Counter())[bucket] += 1
    return out


def worker_row(info: dict[str, str], now: float | None = None) -> dict[str, Any]:
    """One line of ``sdfleet workers --json``: the heartbeat with numbers as numbers."""
    now = time.time() if now is None else now

    def num(name: str, cast: Any = float) -> Any:
        try:
            return cast(float(info[name]))
        except (KeyError, ValueError):
            return None

    beat = num("last_beat")
    return {
        "id": info.get("worker_id", ""), "pool": worker_pool(info), "model": info.get("model", ""),
        "device": info.get("device", ""), "gpu_uuid": info.get("gpu_uuid", ""), "state": info.get("state", ""),
        "host": info.get("host", ""), "pid": num("pid", int), "current_run": info.get("current_run", ""),
        "current_batch": num("current_batch_size", int) or 0, "max_batch": num("max_batch", int),
        "images_per_s": num("images_per_s"), "gpu_util": num("gpu_util_pct"),
        "beat_age_s": round(now - beat, 3) if beat is not None else None,
    }


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))
