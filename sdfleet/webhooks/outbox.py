"""Where webhook deliveries wait: the Celery queue, the due-retry sorted set and the dead-letter list.

A delivery is a JSON-able dict (see :func:`new_delivery`); it never holds a signing secret. Retries are
not Celery ETA/countdown tasks: on the Redis transport a message held for hours by a worker is redelivered
after the broker's visibility timeout (so a long delay would be sent early, and twice). Instead a failed
delivery goes into ``keys.WEBHOOK_DUE`` scored by its due time, and the webhook worker's mover publishes it
to ``keys.WEBHOOK_QUEUE`` when it is due. Nothing waits in a worker's memory, so a restart loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis
from celery import Celery

from sdfleet import keys
from sdfleet.queue import WEBHOOK_TASK

# The fields of a delivery; dead-list entries add reason, failed_at and last_status.
FIELDS = ("id", "type", "url", "body", "batch_id", "job_id", "attempt", "created_at")

# KEYS[1] due set; ARGV now, lease-until, limit. Claims due members by pushing their score to the lease end,
# so two movers never publish the same one, and a mover that dies holding one only delays it.
_CLAIM = """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(items) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], m) end
return items
"""


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:24]


def new_delivery(*, event_id: str, event_type: str, url: str, body: str, batch_id: str,
                 job_id: str | None = None) -> dict[str, Any]:
    return {"id": event_id, "type": event_type, "url": url, "body": body, "batch_id": batch_id,
            "job_id": job_id, "attempt": 0, "created_at": round(time.time(), 6)}


def send(app: Celery, task: str, kwargs: dict[str, Any]) -> None:
    """Publish one task message straight onto the webhook queue's list.

    Like ``producer.submit.enqueue``: the anonymous exchange routes by queue name alone, so delivery does
    not depend on exchange bindings having been declared in Redis (by this process, since a restart).
    """
    ref = kwargs["delivery"].get("id") if "delivery" in kwargs else kwargs.get("batch_id")
    msg = app.amqp.create_task_message(uuid.uuid4().hex, task, (), kwargs, argsrepr="()",
                                       kwargsrepr=f"{{'ref': {ref!r}}}")  # the body stays out of worker logs
    with app.producer_or_acquire() as producer:
        producer.publish(msg.body, exchange="", routing_key=keys.WEBHOOK_QUEUE, headers=msg.headers,
                         serializer="json", retry=True, **msg.properties)


def publish(app: Celery, delivery: dict[str, Any]) -> None:
    """Put one delivery on the webhook queue (its next attempt runs as soon as a webhook worker is free)."""
    send(app, WEBHOOK_TASK, {"delivery": {k: delivery.get(k) for k in FIELDS}})


def schedule(r: redis.Redis, delivery: dict[str, Any], due: float) -> None:
    """Keep ``delivery`` until ``due`` (epoch seconds); the mover publishes it then."""
    r.zadd(keys.WEBHOOK_DUE, {json.dumps(delivery, sort_keys=True): due})


def move_due(r: redis.Redis, app: Celery, *, now: float | None = None, limit: int = 100) -> int:
    """Publish every due delivery to the webhook queue; returns how many were moved."""
    now = time.time() if now is None else now
    claimed = r.eval(_CLAIM, 1, keys.WEBHOOK_DUE, repr(now), repr(now + keys.WEBHOOK_CLAIM_S), limit)
    for member in claimed:
        member = member.decode() if isinstance(member, bytes) else member
        # Publish, then remove: a crash in between sends it twice (receivers dedupe on webhook-id), never zero.
        publish(app, json.loads(member))
        r.zrem(keys.WEBHOOK_DUE, member)
    return len(claimed)


def pending(r: redis.Redis) -> list[tuple[dict[str, Any], float]]:
    return [(json.loads(m), score) for m, score in r.zrange(keys.WEBHOOK_DUE, 0, -1, withscores=True)]


# --- dead letters ---------------------------------------------------------------------------------------

def bury(r: redis.Redis, delivery: dict[str, Any], reason: str, *, last_status: int | None = None) -> dict[str, Any]:
    """Append ``delivery`` to the dead-letter list with why it stopped."""
    entry = {**{k: delivery.get(k) for k in FIELDS}, "reason": reason, "last_status": last_status,
             "failed_at": round(time.time(), 6)}
    r.rpush(keys.WEBHOOK_DEAD, json.dumps(entry, sort_keys=True))
    return entry


def dead(r: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in r.lrange(keys.WEBHOOK_DEAD, 0, -1)]


def replay(r: redis.Redis, app: Celery, ids: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """Re-enqueue dead deliveries (all, or those whose webhook-id is in ``ids``) with the same webhook-id.

    Replaying also re-enables an endpoint that answered 410 (the operator asked for it explicitly).
    Returns (replayed ids, requested ids not found).
    """
    wanted = None if ids is None else list(dict.fromkeys(ids))
    replayed: list[str] = []
    for raw in r.lrange(keys.WEBHOOK_DEAD, 0, -1):
        entry = json.loads(raw)
        if wanted is not None and entry.get("id") not in wanted:
            continue
        delivery = {**{k: entry.get(k) for k in FIELDS}, "attempt": 0}
        r.delete(keys.webhook_endpoint_disabled(url_hash(delivery["url"])))
        publish(app, delivery)
        r.lrem(keys.WEBHOOK_DEAD, 1, raw)
        replayed.append(delivery["id"])
    missing = [] if wanted is None else [i for i in wanted if i not in replayed]
    return replayed, missing
