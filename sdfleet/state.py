"""Job and batch state in Redis, with compare-and-set transitions.

Every status change goes through one Lua script, so two workers (a redelivered message, a reclaimed
job) can never both record an outcome, and the per-batch counters always add up to the batch total.

Statuses: queued -> running -> succeeded | failed; queued -> cancelled; failed | cancelled -> queued
(resubmission). ``running -> running`` is a restart after a crash and counts an attempt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from sdfleet import keys
from sdfleet.errors import BatchNotFound

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

# ARGV: new status, allowed-from (comma list), now, max attempts (0: no counting), then field/value pairs.
# Returns {applied (1/0, or 2 when failed as poison), previous status, batch completed (1/0), attempts}.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, '', 0, 0} end
local ok = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == cur then ok = true end end
if not ok then return {0, cur, 0, 0} end
local new = ARGV[1]
local now = ARGV[3]
local maxatt = tonumber(ARGV[4])
local applied = 1
local attempts = 0
if maxatt > 0 then
  attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  if attempts > maxatt then
    new = 'failed'
    applied = 2
    redis.call('HSET', KEYS[1], 'error', 'poison: processing started ' .. (attempts - 1) ..
      ' times without finishing (the worker died each time); not retried again')
  end
end
redis.call('HSET', KEYS[1], 'status', new, new .. '_at', now)
if applied == 1 then
  for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
local batch = redis.call('HGET', KEYS[1], 'batch')
local ckey = 'sdfleet:batch:' .. batch .. ':counts'
if cur ~= new then
  redis.call('HINCRBY', ckey, cur, -1)
  redis.call('HINCRBY', ckey, new, 1)
end
local done = 0
local function terminal(s) return s == 'succeeded' or s == 'failed' or s == 'cancelled' end
if terminal(new) and not terminal(cur) then
  local bkey = 'sdfleet:batch:' .. batch
  local total = tonumber(redis.call('HGET', bkey, 'total') or '0')
  local c = redis.call('HMGET', ckey, 'succeeded', 'failed', 'cancelled')
  local sum = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0) + (tonumber(c[3]) or 0)
  if sum >= total and redis.call('HSETNX', bkey, 'completed_at', now) == 1 then done = 1 end
end
return {applied, cur, done, attempts}
"""


@dataclass(frozen=True)
class Transition:
    applied: bool
    previous: str
    batch_completed: bool
    attempts: int
    poisoned: bool = False


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    batch_id: str
    custom_id: str
    status: str
    spec: dict[str, Any]
    fields: dict[str, str]

    @property
    def error(self) -> str | None:
        return self.fields.get("error") or None

    @property
    def url(self) -> str | None:
        return self.fields.get("url") or None


class JobStore:
    """Reads and writes job and batch records. One per process; safe to share between threads."""

    def __init__(self, client: redis.Redis):
        self.r = client
        self._transition = client.register_script(_TRANSITION)

    # --- transitions -----------------------------------------------------------------------------

    def transition(self, job_id: str, to: str, allowed: Sequence[str], *, count_attempt: int = 0,
                   **fields: Any) -> Transition:
        return self.transition_many([(job_id, fields)], to, allowed, count_attempt=count_attempt)[0]

    def transition_many(self, items: Sequence[tuple[str, dict[str, Any]]], to: str, allowed: Sequence[str], *,
                        count_attempt: int = 0) -> list[Transition]:
        """The same transition for many jobs in one round trip (each still atomic on its own)."""
        pipe = self.r.pipeline(transaction=False)
        now = f"{time.time():.6f}"
        for job_id, fields in items:
            args: list[Any] = [to, ",".join(allowed), now, count_attempt]
            for name, value in fields.items():
                args += [name, value if isinstance(value, str) else json.dumps(value)]
            self._transition(keys=[keys.job(job_id)], args=args, client=pipe)
        out = []
        for applied, prev, done, attempts in pipe.execute():
            prev = prev.decode() if isinstance(prev, bytes) else prev
            out.append(Transition(applied > 0, prev, bool(done), int(attempts), poisoned=applied == 2))
        return out

    def start(self, job_id: str, worker_id: str, max_attempts: int) -> Transition:
        """queued|running -> running, counting an attempt; fails the job once it exceeds ``max_attempts``."""
        return self.start_many([job_id], worker_id, max_attempts)[0]

    def start_many(self, job_ids: Sequence[str], worker_id: str, max_attempts: int) -> list[Transition]:
        return self.transition_many([(j, {"worker": worker_id}) for j in job_ids], RUNNING, (QUEUED, RUNNING),
                                    count_attempt=max_attempts)

    def succeed(self, job_id: str, **fields: Any) -> Transition:
        return self.transition(job_id, SUCCEEDED, (RUNNING,), error="", **fields)

    def fail(self, job_id: str, error: str, **fields: Any) -> Transition:
        return self.transition(job_id, FAILED, (QUEUED, RUNNING), error=error, **fields)

    def requeue(self, job_id: str, *, uncount_attempt: bool = False) -> Transition:
        """running -> queued: hand a job back (storage outage, janitor) without recording an outcome.

        ``uncount_attempt``: the attempt ended cleanly (nothing crashed), so it must not count towards
        the poison-pill limit.
        """
        tr = self.transition(job_id, QUEUED, (RUNNING,))
        if tr.applied and uncount_attempt:
            self.r.hincrby(keys.job(job_id), "attempts", -1)
        return tr

    # --- reads -----------------------------------------------------------------------------------

    def job(self, job_id: str) -> JobRecord | None:
        data = self.r.hgetall(keys.job(job_id))
        return _record(job_id, data) if data else None

    def jobs(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        pipe = self.r.pipeline(transaction=False)
        for jid in job_ids:
            pipe.hgetall(keys.job(jid))
        return [_record(jid, d) if d else None for jid, d in zip(job_ids, pipe.execute())]

    def batch(self, batch_id: str) -> dict[str, str]:
        data = self.r.hgetall(keys.batch(batch_id))
        if not data:
            raise BatchNotFound(batch_id)
        return data

    def counts(self, batch_id: str) -> dict[str, int]:
        raw = self.r.hgetall(keys.batch_counts(batch_id))
        return {s: int(raw.get(s, 0)) for s in STATUSES}

    def batch_job_ids(self, batch_id: str) -> list[str]:
        return self.r.lrange(keys.batch_jobs(batch_id), 0, -1)

    def iter_batch_jobs(self, batch_id: str, chunk: int = 1000) -> Iterator[JobRecord]:
        ids = self.batch_job_ids(batch_id)
        for i in range(0, len(ids), chunk):
            for rec in self.jobs(ids[i:i + chunk]):
                if rec is not None:
                    yield rec

    def cancel_batch(self, batch_id: str) -> int:
        """Cancel every queued job of the batch; returns how many were cancelled. Running jobs finish."""
        self.batch(batch_id)
        self.r.hset(keys.batch(batch_id), "cancelled_at", f"{time.time():.6f}")
        n = 0
        for rec in self.iter_batch_jobs(batch_id):
            if rec.status == QUEUED and self.transition(rec.job_id, CANCELLED, (QUEUED,)).applied:
                n += 1
        return n


def _record(job_id: str, data: dict[str, str]) -> JobRecord:
    spec = json.loads(data.get("spec", "{}"))
    return JobRecord(job_id, data.get("batch", ""), data.get("custom_id", ""), data.get("status", ""), spec, data)
