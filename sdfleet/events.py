"""Webhook events: what happened to a job or a batch, as payloads put on the webhook queue.

:class:`Notifier` is called by the GPU worker after a job's outcome is recorded. It reads the job's record,
builds the event and publishes it to the webhook queue (a Redis write, about a millisecond); it never does
HTTP and never raises into the worker. When a job ends its batch, the manifest and the batch.completed
events are built by the webhook worker (task ``BATCH_TASK``), so a 50,000-job manifest never holds up the
GPU worker.

Event ids are derived from what the event is about (``msg_`` + hash of job or batch id, event type, the
time the outcome was recorded and the endpoint), so a retried or re-announced event keeps its webhook-id,
and ``keys.webhook_sent``, set once an event is on the queue, stops it being enqueued again. A job resubmitted after failing
gets a new outcome time, hence a new event.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

import redis
from celery import Celery

from sdfleet import keys
from sdfleet import logs as logs_mod
from sdfleet.errors import StorageError
from sdfleet.queue import make_app
from sdfleet.redisconn import release_owned
from sdfleet.settings import Settings
from sdfleet.state import JobStore
from sdfleet.storage import StorageFactory
from sdfleet.webhooks import outbox

JOB_SUCCEEDED, JOB_FAILED, BATCH_COMPLETED = "job.succeeded", "job.failed", "batch.completed"
JOB_CANCELLED = "job.cancelled"
JOB_EVENTS = {"succeeded": JOB_SUCCEEDED, "failed": JOB_FAILED, "cancelled": JOB_CANCELLED}
BATCH_TASK = "sdfleet.webhook.batch_completed"
MANIFEST_KEY = "{batch_id}/manifest.jsonl"


def event_id(*parts: str) -> str:
    """A webhook-id that depends only on ``parts``: the same event always gets the same id."""
    return "msg_" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def wants(events: Any, event_type: str) -> bool:
    """Whether a submission's event filter (None: every event) selects ``event_type``."""
    return events is None or event_type in tuple(events)


def iso_time(epoch: str | float | None) -> str:
    try:
        t = float(epoch) if epoch not in (None, "") else datetime.now(timezone.utc).timestamp()
    except ValueError:
        t = datetime.now(timezone.utc).timestamp()
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_field(raw: str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def job_event(event_type: str, job_id: str, batch_id: str, custom_id: str | None, status: str,
              fields: dict[str, str], seed: int | None) -> dict[str, Any]:
    """The payload of job.succeeded / job.failed, from the job's Redis record (``fields``)."""
    return {
        "type": event_type,
        "timestamp": iso_time(fields.get(f"{status}_at")),
        "data": {
            "job_id": job_id, "batch_id": batch_id, "custom_id": custom_id or fields.get("custom_id"),
            "status": status, "url": fields.get("url") or None, "sidecar_url": fields.get("sidecar_url") or None,
            "error": fields.get("error") or None, "timings": _json_field(fields.get("timings")), "seed": seed,
        },
    }


def batch_event(batch_id: str, counts: dict[str, int], total: int, manifest_url: str | None,
                completed_at: str | None) -> dict[str, Any]:
    return {"type": BATCH_COMPLETED, "timestamp": iso_time(completed_at),
            "data": {"batch_id": batch_id, "counts": counts, "total": total, "manifest_url": manifest_url}}


def emit(r: redis.Redis, app: Celery, *, url: str, event_type: str, payload: dict[str, Any], eid: str,
         batch_id: str, job_id: str | None = None) -> bool:
    """Enqueue one event for one endpoint unless it was already enqueued; True if enqueued now.

    Marked as sent only after it is on the queue: a process that dies in between leaves it unmarked, so
    the redelivered job's re-announcement enqueues it again. At worst a receiver sees the same event
    twice with the same webhook-id (which Standard Webhooks receivers deduplicate); it is never lost.
    """
    if r.get(keys.webhook_sent(eid)) == "sent":
        return False
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    outbox.publish(app, outbox.new_delivery(event_id=eid, event_type=event_type, url=url, body=body,
                                            batch_id=batch_id, job_id=job_id))
    r.set(keys.webhook_sent(eid), "sent", ex=keys.RECORD_TTL_S)
    return True


class Notifier:
    """``notifier(delivery, status, transition)``: announce a job's recorded outcome on the webhook queue.

    ``delivery`` has ``job_id``, ``batch_id`` and ``spec`` (``webhook``, ``webhook_events``, ``custom_id``,
    ``seed``, ``out``); ``status`` is "succeeded" or "failed"; ``transition.batch_completed`` is True for
    the job that ended its batch. Safe to call from several threads, and more than once per outcome.
    """

    def __init__(self, settings: Settings, redis_client: redis.Redis, log: Any = None, *, app: Celery | None = None):
        self.settings = settings
        self.r = redis_client
        self.log = log or logs_mod.get("events")
        self.app = app or make_app(settings)
        self.storage = StorageFactory(settings.s3_endpoint_url, settings.s3_region, settings.upload_retries)

    def __call__(self, delivery: Any, status: str, transition: Any) -> None:
        # Every batch gets its manifest stored when it completes, webhook or not (notify_batch); only
        # the job event needs a webhook.
        steps = [("batch", self.notify_batch)]
        if getattr(delivery.spec, "webhook", None):
            steps.insert(0, ("job", self.notify_job))
        # The outcome is recorded already: a notification that cannot be enqueued is logged, never raised.
        for what, step in steps:
            try:
                step(delivery, status, transition)
            except Exception as exc:
                self.log.error(f"{what} webhook event not enqueued", job_id=getattr(delivery, "job_id", None),
                               batch_id=getattr(delivery, "batch_id", None), error=repr(exc))

    def notify_job(self, delivery: Any, status: str, transition: Any = None) -> None:
        spec = delivery.spec
        url = getattr(spec, "webhook", None)
        event_type = JOB_EVENTS.get(status)
        if not (url and event_type and wants(getattr(spec, "webhook_events", None), event_type)):
            return
        fields = self.r.hgetall(keys.job(delivery.job_id))
        style, ttl = url_style_of(self.r, delivery.batch_id)
        if style != "s3":
            for name in ("url", "sidecar_url"):
                fields[name] = self.storage.public_url(fields.get(name), style, ttl) or ""
        payload = job_event(event_type, delivery.job_id, delivery.batch_id, getattr(spec, "custom_id", None),
                            status, fields, getattr(spec, "seed", None))
        eid = event_id(delivery.job_id, event_type, fields.get(f"{status}_at", ""), url)
        if emit(self.r, self.app, url=url, event_type=event_type, payload=payload, eid=eid,
                batch_id=delivery.batch_id, job_id=delivery.job_id):
            self.log.debug("webhook event enqueued", job_id=delivery.job_id, batch_id=delivery.batch_id,
                           event_type=event_type, webhook_id=eid)

    def notify_batch(self, delivery: Any, status: str, transition: Any) -> None:
        # The manifest and batch.completed are built on the webhook worker, from every job of the batch.
        if getattr(transition, "batch_completed", False):
            self.announce_batch(delivery.batch_id)

    def announce_batch(self, batch_id: str) -> None:
        """Have the webhook worker store the batch's manifest and send batch.completed (once a completion)."""
        outbox.send(self.app, BATCH_TASK, {"batch_id": batch_id})


MANIFEST_FIELDS = ("custom_id", "job_id", "status", "url", "sidecar_url", "prompt", "negative_prompt", "seed",
                   "width", "height", "steps", "guidance_scale", "model", "error")


def manifest_line(rec: Any, public_url: Any = None) -> dict[str, Any]:
    """One manifest line (``sdfleet results`` and the stored manifest): the job, its URLs and what made it.

    ``public_url``: renders a recorded URL in the batch's URL style (see StorageFactory.public_url).
    """
    render = public_url or (lambda u: u)
    spec = rec.spec
    return {"custom_id": rec.custom_id, "job_id": rec.job_id, "status": rec.status, "url": render(rec.url),
            "sidecar_url": render(rec.fields.get("sidecar_url") or None), "prompt": spec.get("prompt"),
            "negative_prompt": spec.get("negative_prompt") or "", "seed": spec.get("seed"),
            "width": spec.get("width"), "height": spec.get("height"), "steps": spec.get("steps"),
            "guidance_scale": spec.get("guidance_scale"), "model": spec.get("model"), "error": rec.error}


def url_style_of(r: redis.Redis, batch_id: str) -> tuple[str, int]:
    """The batch's URL style for manifests and webhooks ('s3', 'https', 'presigned') and presigned TTL."""
    style, ttl = r.hmget(keys.batch(batch_id), "url_style", "url_ttl_s")
    return style or "s3", int(ttl or 7 * 24 * 3600)


# Marks a completion announced, only if it is still the batch's completion (a task of an earlier completion,
# finishing after the batch reopened and ended again, must not mark the new one, nor recreate a deleted record).
_MARK_ANNOUNCED = """
if redis.call('HGET', KEYS[1], 'completed_at') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'announced_for', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""
ANNOUNCE_CLAIM_S = 600  # how long one webhook worker holds a completion it is announcing (its task's limit)


def complete_batch(settings: Settings, r: redis.Redis, app: Celery, storage: StorageFactory, batch_id: str,
                   log: Any = None) -> list[str]:
    """Write ``{batch_id}/manifest.jsonl`` next to the images, then enqueue batch.completed for every endpoint
    of the batch that wants it. Returns the event ids enqueued now. Runs on the webhook worker.

    Once a completion: a report of a completion announced already is skipped, and so is one that another
    worker is announcing (``keys.batch_announcing``), since each walks every job of the batch. The completion
    is marked announced (``announced_for``) only when every manifest is stored; until then a later report, or
    the sweep (``Sweeper.announce_lost_completions``), does it again."""
    log = (log or logs_mod.get("events")).bind(batch_id=batch_id)
    store = JobStore(r)
    meta = store.batch(batch_id)
    completed_at = meta.get("completed_at")
    if not completed_at:
        log.info("batch reopened before its completion was announced; skipped")
        return []
    if meta.get("announced_for") == completed_at:
        # A repeated report of the same completion (a retry, a second finisher, a redelivered job): the manifest
        # is stored and the events are enqueued already, and rebuilding a 50,000-job manifest is not free.
        log.info("batch completion announced already; skipped")
        return []
    claim = keys.batch_announcing(batch_id)
    if not r.set(claim, completed_at, nx=True, ex=ANNOUNCE_CLAIM_S):
        log.info("batch completion being announced by another worker; skipped")
        return []
    try:
        return _announce(r, app, storage, store, batch_id, meta, completed_at, log)
    finally:
        release_owned(r, claim, completed_at)  # only our own claim


def _announce(r: redis.Redis, app: Celery, storage: StorageFactory, store: JobStore, batch_id: str,
              meta: dict[str, Any], completed_at: str, log: Any) -> list[str]:
    style, ttl = url_style_of(r, batch_id)

    def render(url: str | None) -> str | None:
        return storage.public_url(url, style, ttl)

    lines: list[dict[str, Any]] = []
    outs: list[str] = []
    endpoints: list[str] = []
    for rec in store.iter_batch_jobs(batch_id):
        lines.append(manifest_line(rec, render))
        out = rec.spec.get("out")
        if out and out not in outs:
            outs.append(out)
        url = rec.spec.get("webhook")
        if url and url not in endpoints and wants(rec.spec.get("webhook_events"), BATCH_COMPLETED):
            endpoints.append(url)
    if r.hget(keys.batch(batch_id), "completed_at") != completed_at:
        log.info("batch reopened while its manifest was built; skipped")
        return []
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    manifest_url = None
    stored_all = True
    for out in outs:  # usually one location; a batch spread over several gets a manifest in each
        try:
            url = storage.get(out).put(MANIFEST_KEY.format(batch_id=batch_id), data, "application/x-ndjson")
        except StorageError as exc:  # already retried; announce the batch anyway ('sdfleet results' still works)
            log.error("manifest not stored", location=out, error=str(exc))
            stored_all = False
            continue
        manifest_url = manifest_url or render(url)
    counts = store.counts(batch_id)
    payload = batch_event(batch_id, counts, int(meta.get("total", 0) or 0), manifest_url, completed_at)
    sent = []
    for url in endpoints:
        eid = event_id(batch_id, BATCH_COMPLETED, completed_at, url)
        if emit(r, app, url=url, event_type=BATCH_COMPLETED, payload=payload, eid=eid, batch_id=batch_id):
            sent.append(eid)
    # Marked only now, and only with every manifest stored: a task that died part way through, or a manifest
    # the store refused, is done again (emit skips the events enqueued already).
    if stored_all:
        r.eval(_MARK_ANNOUNCED, 2, keys.batch(batch_id), keys.UNANNOUNCED, completed_at, batch_id)
    log.info("batch completed", manifest_url=manifest_url, endpoints=len(endpoints), enqueued=len(sent),
             manifests_stored=stored_all)
    return sent
