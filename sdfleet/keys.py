"""Every Redis key and TTL sdfleet uses, in one place."""

from __future__ import annotations

PREFIX = "sdfleet"

# Job and batch records live this long after their last write; long enough for a user to fetch results.
RECORD_TTL_S = 30 * 24 * 3600


def job(job_id: str) -> str:
    """Hash: status, spec (JSON), batch, timestamps, attempts, url, error, worker."""
    return f"{PREFIX}:job:{job_id}"


def batch(batch_id: str) -> str:
    """Hash: name, created_at, total, cancelled, completed_at, completed_by (the job record that ended it),
    announced_for (the completed_at whose manifest and batch.completed are done), announce_asked (the sweep's
    requests for a completion never announced: "<completed_at> <times> <last at>"), webhook, options."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_jobs(batch_id: str) -> str:
    """List of job ids in submission order."""
    return f"{PREFIX}:batch:{batch_id}:jobs"


def batch_counts(batch_id: str) -> str:
    """Hash: status -> number of jobs currently in that status."""
    return f"{PREFIX}:batch:{batch_id}:counts"


def batch_custom_ids(batch_id: str) -> str:
    """Hash: custom_id -> job_id (makes resubmission idempotent)."""
    return f"{PREFIX}:batch:{batch_id}:custom"


BATCHES = f"{PREFIX}:batches"  # sorted set: batch_id scored by creation time
# sorted set: completed batches whose manifest and batch.completed are not done yet, scored by completion time
# (added by the write that completes a batch, removed when its announcement is done or it reopens; the sweep
# asks again for those left too long). The transition and submit scripts name it literally.
UNANNOUNCED = f"{PREFIX}:batches:unannounced"


def worker(worker_id: str) -> str:
    """Hash with a TTL: the worker's heartbeat (device, model, pid, GPU memory, last beat)."""
    return f"{PREFIX}:worker:{worker_id}"


def worker_held(worker_id: str) -> str:
    """Hash job id -> delivery tag of the messages a worker has received and not acknowledged (handed back
    by the reclaim sweep if the worker dies)."""
    return f"{PREFIX}:worker:{worker_id}:held"


def worker_reclaimed(worker_id: str) -> str:
    """Set (with a TTL) by the sweep that handed a dead worker's jobs back: that worker, if it was only stalled
    and comes back, must not go on as if it still held them."""
    return f"{PREFIX}:worker:{worker_id}:reclaimed"


WORKERS = f"{PREFIX}:workers"  # set of worker ids ever seen (the janitor walks it)

WEBHOOK_DEAD = f"{PREFIX}:webhooks:dead"  # list of failed deliveries (JSON)


def webhook_endpoint_disabled(url_hash: str) -> str:
    return f"{PREFIX}:webhooks:disabled:{url_hash}"


def webhook_sent(event_id: str) -> str:
    """Set once a webhook event is enqueued, so a redelivered job does not send a second one."""
    return f"{PREFIX}:webhooks:sent:{event_id}"


GEN_QUEUE_PREFIX = "sdfleet.gen."


def queue_for_model(model: str) -> str:
    """The Celery queue that workers of ``model`` consume."""
    return f"{GEN_QUEUE_PREFIX}{model}"


# Set of job ids whose messages a queue purge removed: the sweep cancels them instead of re-enqueueing them.
PURGED = f"{PREFIX}:purged"

# Held by the one worker (or janitor) that runs the reclaim sweep at a time (value: its id; with a TTL).
SWEEP_LOCK = f"{PREFIX}:lock:sweep"


WEBHOOK_QUEUE = "sdfleet.webhooks"

# Sorted set of webhook deliveries waiting for their next attempt (member: the delivery as JSON, score: when
# it is due). The webhook worker moves due ones to WEBHOOK_QUEUE; no broker ETA is involved.
WEBHOOK_DUE = f"{PREFIX}:webhooks:due"
# How long a mover may hold a claimed due delivery before another mover may take it over.
WEBHOOK_CLAIM_S = 60


# --- scaling and metrics ----------------------------------------------------------------------------

def service_times(model: str) -> str:
    """Hash: bucket "<width>x<height>:<steps>" -> measured seconds per image (EWMA), written by workers."""
    return f"{PREFIX}:service:{model}"


def bucket_of(width: int, height: int, steps: int) -> str:
    """The field of :func:`service_times` for one shape: the scheduler prices a queued job by it."""
    return f"{width}x{height}:{steps}"


def queue_lists(model: str) -> list[str]:
    """Every Redis list that may hold queued messages of ``model``'s queue, the plain list first (kombu's
    layout of priorities, known only to :mod:`sdfleet.broker`)."""
    from sdfleet import broker

    return broker.queue_lists(queue_for_model(model))


SCHEDULER_STATE = f"{PREFIX}:scheduler"  # hash with a TTL: pool -> JSON of the scheduler's last decision


def batch_announcing(batch_id: str) -> str:
    """String, short-lived: the completion (its completed_at) whose announcement a webhook worker is building."""
    return f"{PREFIX}:batch:{batch_id}:announcing"


def submission(batch_id: str) -> str:
    """String with a TTL: the token of the producer submitting to this batch now (its lease).

    While it exists, a worker holds a message it cannot start yet (its record is not committed) instead of
    dropping it; once it is gone, such a message names no job that will ever exist and is dropped.
    """
    return f"{PREFIX}:batch:{batch_id}:submitting"


def submission_staging(batch_id: str, token: str) -> str:
    """List of the job records one submission will commit (JSON, in submission order); gone after the commit."""
    return f"{PREFIX}:batch:{batch_id}:staging:{token}"


# A staging list outlives its lease long enough to be committed, and no longer.
SUBMISSION_STAGING_TTL_S = 3600

# Set with a TTL by the process that ran housekeeping (state expiry, partial files, batch completion): the
# fleet's next pass waits until it expires, however many workers sweep in turn.
HOUSEKEEPING_DUE = f"{PREFIX}:housekeeping:ran"
HOUSEKEEPING_INTERVAL_S = 30
