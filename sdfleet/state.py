"""Job and batch state in Redis, with compare-and-set transitions.

Every status change goes through one Lua script, so two workers (a redelivered message, a reclaimed
job) can never both record an outcome, and the per-batch counters always add up to the batch total.

Statuses: queued -> running -> storing -> succeeded; queued | running -> failed; queued -> cancelled;
failed | cancelled -> queued
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
from sdfleet.errors import BatchNotFound, LeaseLost

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
# running -> storing: an engine run has stored the job's objects under its own staged names and won the job;
# whoever finishes promoting those objects records storing -> succeeded (see worker.postprocess).
STORING = "storing"
STATUSES = (QUEUED, RUNNING, STORING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

# The same transition for each job in KEYS. ARGV: new status, allowed-from (comma list), now, max attempts
# (0: no counting), then per job: the batch id, the spec (JSON) and the engine run its record must hold
# ('': not checked), the number of field/value pairs to set, then the pairs. The run check fences a worker
# that stalled and lost the job to another run: its outcome is refused, however late it arrives. The spec is compared as decoded JSON, as Python
# compares dicts, so two serializers of the same spec agree.
# Returns per job (flattened) {applied (1/0, or 2 when failed as poison), previous status ('' for no
# record), batch completed (1/0: this job's outcome ended the batch; also when the outcome was already recorded
# by the write that ended it, for a retry whose first reply was lost), attempts, queued_at, the checked field
# that did not match ('' if none)}. The batch record names the job that ended it (completed_by).
_TRANSITION = """
local allowed = {}
for s in string.gmatch(ARGV[2], '[^,]+') do allowed[s] = true end
local now = ARGV[3]
local maxatt = tonumber(ARGV[4])
local function terminal(s) return s == 'succeeded' or s == 'failed' or s == 'cancelled' end
local function same(x, y)
  if type(x) ~= type(y) then return false end
  if type(x) ~= 'table' then return x == y end
  for k, v in pairs(x) do if not same(v, y[k]) then return false end end
  for k in pairs(y) do if x[k] == nil then return false end end
  return true
end
local function same_json(stored, expected)
  local ok1, x = pcall(cjson.decode, stored or '')
  local ok2, y = pcall(cjson.decode, expected)
  return ok1 and ok2 and same(x, y)
end
local out = {}
local a = 5
for k = 1, #KEYS do
  local want_batch, want_spec, want_run = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local first, last = a + 4, a + 3 + 2 * tonumber(ARGV[a + 3])
  a = last + 1
  local cur = redis.call('HGET', KEYS[k], 'status')
  local queued_at = redis.call('HGET', KEYS[k], 'queued_at') or ''
  local mismatch = ''
  if cur and want_batch ~= '' and redis.call('HGET', KEYS[k], 'batch') ~= want_batch then
    mismatch = 'batch'
  elseif cur and want_spec ~= '' and not same_json(redis.call('HGET', KEYS[k], 'spec'), want_spec) then
    mismatch = 'spec'
  elseif cur and want_run ~= '' and redis.call('HGET', KEYS[k], 'run') ~= want_run then
    mismatch = 'run'
  end
  if not cur then
    for _, v in ipairs({0, '', 0, 0, '', ''}) do out[#out + 1] = v end
  elseif mismatch ~= '' or not allowed[cur] then
    local done = 0
    if mismatch == '' and cur == ARGV[1] and terminal(cur) then
      -- The job already holds this outcome: a retry of a write whose reply was lost (Redis restarted), or a
      -- second finisher. If that write ended the batch, say so again, or its batch.completed would be lost
      -- with the reply (the announcement is deduplicated by its event id).
      local bkey = 'sdfleet:batch:' .. (redis.call('HGET', KEYS[k], 'batch') or '')
      if redis.call('HGET', bkey, 'completed_by') == KEYS[k] then done = 1 end
    end
    for _, v in ipairs({0, cur, done, 0, queued_at, mismatch}) do out[#out + 1] = v end
  else
    local new = ARGV[1]
    local applied = 1
    local attempts = 0
    if maxatt > 0 then
      -- attempts: times started; charged: starts whose worker died with the job in its engine (see
      -- _RELEASE), what the poison limit counts
      attempts = redis.call('HINCRBY', KEYS[k], 'attempts', 1)
      local charged = redis.call('HINCRBY', KEYS[k], 'charged', 1)
      if charged > maxatt then
        new = 'failed'
        applied = 2
        redis.call('HSET', KEYS[k], 'error', 'poison: processing started ' .. (charged - 1) ..
          ' times without finishing (the worker died each time); not retried again')
      end
    end
    redis.call('HSET', KEYS[k], 'status', new, new .. '_at', now)
    if applied == 1 then
      for i = first, last, 2 do redis.call('HSET', KEYS[k], ARGV[i], ARGV[i + 1]) end
    end
    local batch = redis.call('HGET', KEYS[k], 'batch')
    local ckey = 'sdfleet:batch:' .. batch .. ':counts'
    if cur ~= new then
      redis.call('HINCRBY', ckey, cur, -1)
      redis.call('HINCRBY', ckey, new, 1)
    end
    local done = 0
    if terminal(new) and not terminal(cur) then
      local bkey = 'sdfleet:batch:' .. batch
      local total = tonumber(redis.call('HGET', bkey, 'total') or '0')
      local c = redis.call('HMGET', ckey, 'succeeded', 'failed', 'cancelled')
      local sum = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0) + (tonumber(c[3]) or 0)
      if sum >= total and redis.call('HSETNX', bkey, 'completed_at', now) == 1 then
        done = 1
        redis.call('HSET', bkey, 'completed_by', KEYS[k])
        redis.call('ZADD', 'sdfleet:batches:unannounced', now, batch)  -- keys.UNANNOUNCED
      end
    end
    for _, v in ipairs({applied, cur, done, attempts, queued_at, ''}) do out[#out + 1] = v end
  end
end
return out
"""
# KEYS: job records. ARGV[1]: worker id. Takes back the charge of the last start of each job this worker still
# runs (the job left the engine: a crash from now on is not its doing). Returns how many were taken back.
_RELEASE = """
local n = 0
for k = 1, #KEYS do
  local f = redis.call('HMGET', KEYS[k], 'status', 'worker', 'charged')
  if f[1] == 'running' and f[2] == ARGV[1] and (tonumber(f[3]) or 0) > 0 then
    redis.call('HINCRBY', KEYS[k], 'charged', -1)
    n = n + 1
  end
end
return n
"""
# Jobs per script call: one call holds Redis for its whole run, so long lists go in chunks.
_TRANSITION_CHUNK = 500


@dataclass(frozen=True)
class Transition:
    applied: bool
    previous: str  # the status before ('' when there is no such job)
    batch_completed: bool
    attempts: int
    poisoned: bool = False
    #: 'batch', 'spec' or 'run' when the record did not hold what the caller expected (nothing was changed)
    mismatch: str = ""
    queued_at: float = 0.0


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
        self._release = client.register_script(_RELEASE)
        self._commit = client.register_script(_COMMIT)
        self._renew = client.register_script(_RENEW)
        self._release_lease = client.register_script(_RELEASE_LEASE)

    # --- transitions -----------------------------------------------------------------------------

    def transition(self, job_id: str, to: str, allowed: Sequence[str], *, count_attempt: int = 0,
                   **fields: Any) -> Transition:
        return self.transition_many([(job_id, fields)], to, allowed, count_attempt=count_attempt)[0]

    def transition_many(self, items: Sequence[tuple[str, dict[str, Any]]], to: str, allowed: Sequence[str], *,
                        count_attempt: int = 0,
                        expect: Sequence[tuple[str, str]] | None = None,
                        runs: Sequence[str] | None = None) -> list[Transition]:
        """The same transition for many jobs in one round trip (atomic as a whole; in chunks if many).

        ``expect``: per job, the (batch id, spec as JSON) its record must hold for the transition to apply;
        ``runs``: per job, the engine run that must own it. A job whose record differs is left untouched and
        reported with ``mismatch``.
        """
        now = f"{time.time():.6f}"
        out: list[Transition] = []
        for i in range(0, len(items), _TRANSITION_CHUNK):
            chunk = items[i:i + _TRANSITION_CHUNK]
            checks = expect[i:i + _TRANSITION_CHUNK] if expect is not None else [("", "")] * len(chunk)
            owners = runs[i:i + _TRANSITION_CHUNK] if runs is not None else [""] * len(chunk)
            args: list[Any] = [to, ",".join(allowed), now, count_attempt]
            for (_, fields), (batch_id, spec_json), run in zip(chunk, checks, owners):
                args += [batch_id, spec_json, run, len(fields)]
                for name, value in fields.items():
                    args += [name, value if isinstance(value, str) else json.dumps(value)]
            flat = self._transition(keys=[keys.job(job_id) for job_id, _ in chunk], args=args)
            for j in range(0, len(flat), 6):
                applied, prev, done, attempts, queued_at, mismatch = flat[j:j + 6]
                out.append(Transition(applied > 0, _str(prev), bool(done), int(attempts), poisoned=applied == 2,
                                      mismatch=_str(mismatch), queued_at=float(queued_at or 0)))
        return out

    def start(self, job_id: str, worker_id: str, max_attempts: int) -> Transition:
        """queued|running -> running, counting an attempt; fails the job once it exceeds ``max_attempts``."""
        return self.start_many([job_id], worker_id, max_attempts)[0]

    def start_many(self, job_ids: Sequence[str], worker_id: str, max_attempts: int, *,
                   expect: Sequence[tuple[str, str]] | None = None, run: str = "") -> list[Transition]:
        """:meth:`start` for many jobs in one round trip; ``expect`` as for :meth:`transition_many`.

        ``run`` names the engine run that now owns the jobs: only it may record their outcome.
        """
        return self.transition_many([(j, {"worker": worker_id, "run": run}) for j in job_ids], RUNNING,
                                    (QUEUED, RUNNING), count_attempt=max_attempts, expect=expect)

    def succeed(self, job_id: str, **fields: Any) -> Transition:
        return self.transition(job_id, SUCCEEDED, (RUNNING,), error="", **fields)

    def fail(self, job_id: str, error: str, **fields: Any) -> Transition:
        return self.transition(job_id, FAILED, (QUEUED, RUNNING), error=error, **fields)

    def requeue(self, job_id: str, *, uncount_attempt: bool = False, run: str = "") -> Transition:
        """running -> queued: hand a job back (drain, hung engine) without recording an outcome.

        ``uncount_attempt``: the attempt ended cleanly (nothing crashed), so it must not count towards
        the poison-pill limit. ``run``: only if this run still owns the job.
        """
        # the run is cleared: a late write of the run that gave the job back (a retry after a lost reply)
        # then fails its run check instead of landing on the queued job
        tr = self.transition_many([(job_id, {"run": ""})], QUEUED, (RUNNING,), runs=[run])[0]
        if tr.applied and uncount_attempt:
            key = keys.job(job_id)
            attempts, charged = self.r.hmget(key, "attempts", "charged")
            pipe = self.r.pipeline(transaction=False)
            if int(attempts or 0) > 0:
                pipe.hincrby(key, "attempts", -1)
            if int(charged or 0) > 0:
                pipe.hincrby(key, "charged", -1)
            pipe.execute()
        return tr

    def release_attempts(self, job_ids: Sequence[str], worker_id: str, *, client: Any = None) -> int:
        """Take back the poison charge of jobs that ``worker_id`` runs and that have left its engine.

        Each start counts an attempt (``attempts``, times started) and a charge (``charged``, what the
        poison limit counts), so a job that kills the worker is caught. The charge is taken back once the
        job's engine run is over (when the worker starts its next run), so jobs that merely wait for their
        upload when a later run kills the worker are not blamed for it.
        """
        if not job_ids:
            return 0
        if client is not None:  # queued on a pipeline: its reply comes with the pipeline's
            self._release(keys=[keys.job(j) for j in job_ids], args=[worker_id], client=client)
            return 0
        return int(self._release(keys=[keys.job(j) for j in job_ids], args=[worker_id]))

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

    def batch_exists(self, batch_id: str) -> bool:
        return bool(self.r.exists(keys.batch(batch_id)))

    def batch_models(self, batch_id: str) -> set[str]:
        """The models a batch's jobs use, as its submissions recorded them (empty for a batch that predates it)."""
        raw = self.r.hget(keys.batch(batch_id), "models")
        return set(raw.split(",")) if raw else set()

    def batch_job_ids(self, batch_id: str) -> list[str]:
        return self.r.lrange(keys.batch_jobs(batch_id), 0, -1)

    def iter_batch_jobs(self, batch_id: str, chunk: int = 1000) -> Iterator[JobRecord]:
        ids = self.batch_job_ids(batch_id)
        for i in range(0, len(ids), chunk):
            for rec in self.jobs(ids[i:i + chunk]):
                if rec is not None:
                    yield rec

    # --- submission: a lease, a staging list, one atomic commit ------------------------------------------

    def acquire_submission(self, batch_id: str, token: str, lease_s: float) -> bool:
        """Take the batch's submission lease; False while another producer holds it."""
        return bool(self.r.set(keys.submission(batch_id), token, nx=True, px=int(lease_s * 1000)))

    def renew_submission(self, batch_id: str, token: str, lease_s: float) -> bool:
        """Extend our lease (and our staging list with it); False when the lease is no longer ours (it expired:
        this submission must not commit)."""
        return bool(self._renew(keys=[keys.submission(batch_id), keys.submission_staging(batch_id, token)],
                                args=[token, int(lease_s * 1000), int(staging_ttl_s(lease_s) * 1000)]))

    def release_submission(self, batch_id: str, token: str) -> None:
        """Give the lease back and drop the staged records (a submission that stopped before its commit)."""
        self._release_lease(keys=[keys.submission(batch_id), keys.submission_staging(batch_id, token)],
                            args=[token])

    def submission_in_progress(self, batch_id: str) -> bool:
        return bool(self.r.exists(keys.submission(batch_id)))

    def stage(self, batch_id: str, token: str, records: Sequence[StagedJob], *,
              lease_s: float = keys.SUBMISSION_STAGING_TTL_S) -> None:
        """Append records to this submission's staging list (invisible to everything until the commit).

        The list lives a little longer than the lease: a producer killed before its commit leaves it only
        until then."""
        if not records:
            return
        key = keys.submission_staging(batch_id, token)
        # MULTI/EXEC: a producer killed between the append and the TTL would leave a staging list forever;
        # Redis drops an unfinished transaction with its connection.
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(key, *[json.dumps({"j": x.job_id, "c": x.custom_id, "s": x.spec_json, "m": x.mode},
                                     separators=(",", ":")) for x in records])
        pipe.pexpire(key, int(staging_ttl_s(lease_s) * 1000))
        pipe.execute()

    def commit_submission(self, batch_id: str, token: str, *, name: str,
                          meta: dict[str, str] | None = None, record_ttl_s: int | None = None) -> CommitResult:
        """Make every staged record, the custom-id map, the job list, the counts, ``total`` and the TTLs
        (``record_ttl_s``, the configured ``SDFLEET_RECORD_TTL_S``; default ``keys.RECORD_TTL_S``) visible at
        once (one script), if the lease is still ``token``'s; then delete the lease. Reopening a completed
        batch gives every job key of it that TTL again (housekeeping may have shortened them).

        Raises LeaseLost when the lease expired or another producer holds it: nothing was committed.
        """
        ttl = keys.RECORD_TTL_S if record_ttl_s is None else int(record_ttl_s)
        args: list[Any] = [token, f"{time.time():.6f}", ttl, batch_id, name, len(meta or {})]
        for k, v in (meta or {}).items():
            args += [k, v]
        out = self._commit(keys=[keys.submission(batch_id), keys.submission_staging(batch_id, token),
                                 keys.batch(batch_id), keys.batch_jobs(batch_id), keys.batch_counts(batch_id),
                                 keys.batch_custom_ids(batch_id), keys.BATCHES], args=args)
        if int(out[0]) != 1:
            raise LeaseLost(batch_id)
        return CommitResult(added=int(out[1]), requeued=int(out[2]), skipped=int(out[3]), total=int(out[4]))


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _record(job_id: str, data: dict[str, str]) -> JobRecord:
    spec = json.loads(data.get("spec", "{}"))
    return JobRecord(job_id, data.get("batch", ""), data.get("custom_id", ""), data.get("status", ""), spec, data)


# --- submission commit ------------------------------------------------------------------------------------
# KEYS: 1 lease, 2 staging list, 3 batch hash, 4 batch job list, 5 counts, 6 custom-id map, 7 batch index.
# ARGV: token, now, record TTL, batch id, batch name, number of meta pairs, then the pairs.
# Staged records (JSON): j job id, c custom id, s spec (JSON), m mode: 'new' (no record yet), 'requeue'
# (a failed or cancelled job runs again), 'replace' (a job whose parameters changed; not while it is running
# or storing its objects).
# Returns {1, added, requeued, skipped, total}, or {0} when the lease is not the caller's (nothing written).
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
local now, ttl, batch = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local added, requeued, skipped = 0, 0, 0
local new_ids = {}
for _, raw in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local rec = cjson.decode(raw)
  local jkey = 'sdfleet:job:' .. rec.j
  local cur = redis.call('HGET', jkey, 'status')
  if rec.m == 'new' then
    if cur then
      skipped = skipped + 1
    else
      redis.call('HSET', jkey, 'status', 'queued', 'batch', batch, 'custom_id', rec.c, 'spec', rec.s,
                 'created_at', now, 'queued_at', now, 'attempts', 0, 'charged', 0)
      redis.call('EXPIRE', jkey, ttl)
      redis.call('HSET', KEYS[6], rec.c, rec.j)
      new_ids[#new_ids + 1] = rec.j
      added = added + 1
    end
  elseif cur and cur ~= 'running' and cur ~= 'storing' and
         (rec.m == 'replace' or cur == 'failed' or cur == 'cancelled') then
    redis.call('HSET', jkey, 'status', 'queued', 'spec', rec.s, 'queued_at', now, 'attempts', 0, 'charged', 0,
               'error', '')
    -- the last run's name goes: a late write of that run (a retry after a lost reply) fails its run check
    redis.call('HDEL', jkey, 'run')
    if rec.m == 'replace' then redis.call('HDEL', jkey, 'url', 'sidecar_url') end
    redis.call('EXPIRE', jkey, ttl)
    if cur ~= 'queued' then
      redis.call('HINCRBY', KEYS[5], cur, -1)
      redis.call('HINCRBY', KEYS[5], 'queued', 1)
    end
    requeued = requeued + 1
  else
    skipped = skipped + 1
  end
end
for i = 1, #new_ids, 4000 do
  redis.call('RPUSH', KEYS[4], unpack(new_ids, i, math.min(i + 3999, #new_ids)))
end
if added > 0 then redis.call('HINCRBY', KEYS[5], 'queued', added) end
redis.call('HSETNX', KEYS[3], 'created_at', now)
redis.call('HSET', KEYS[3], 'batch_id', batch, 'name', ARGV[5], 'updated_at', now)
local n = tonumber(ARGV[6])
for i = 7, 6 + 2 * n, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
if added + requeued > 0 then
  -- Reopening a completed batch: housekeeping may have given its job keys the short TTL of a finished batch
  -- (each chunk only while completed_at is unchanged); the open batch's jobs live as long as it again.
  if redis.call('HEXISTS', KEYS[3], 'completed_at') == 1 then
    for _, id in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do redis.call('EXPIRE', 'sdfleet:job:' .. id, ttl) end
    redis.call('HDEL', KEYS[3], 'expiry_for', 'expiry_progress')
  end
  redis.call('HDEL', KEYS[3], 'completed_at', 'completed_by', 'cancelled_at')
  redis.call('ZREM', 'sdfleet:batches:unannounced', batch)  -- keys.UNANNOUNCED: reopened
end
redis.call('ZADD', KEYS[7], 'NX', now, batch)
local total = redis.call('HLEN', KEYS[6])
redis.call('HSET', KEYS[3], 'total', total)
for k = 3, 6 do redis.call('EXPIRE', KEYS[k], ttl) end
redis.call('DEL', KEYS[2], KEYS[1])
return {1, added, requeued, skipped, total}
"""
# KEYS[1] lease, KEYS[2] staging list; ARGV token, lease ms, staging ms. Extends both only if the lease is
# still the caller's.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


def staging_ttl_s(lease_s: float) -> float:
    """How long a staging list outlives its last renewal: past the lease, so a commit never finds it gone."""
    return min(2 * lease_s + 30, keys.SUBMISSION_STAGING_TTL_S)
# KEYS[1] lease, KEYS[2] staging list; ARGV token. Drops the staging list; deletes the lease if it is ours.
_RELEASE_LEASE = """
redis.call('DEL', KEYS[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class StagedJob:
    """One job of a submission, staged until the commit. ``mode``: 'new', 'requeue' or 'replace'."""

    job_id: str
    custom_id: str
    spec_json: str
    mode: str = "new"


@dataclass(frozen=True)
class CommitResult:
    added: int
    requeued: int
    skipped: int
    total: int
