"""Running one group of deliveries (on the engine thread): claim each job, run the engine, hand images on.

Claiming is a compare-and-set (queued|running -> running) that counts an attempt and names the engine run
that now owns the job: a job already finished elsewhere is skipped (its outcome re-announced), a cancelled one
never runs, and one started too many times without finishing (it keeps killing workers) is failed instead of
looping. A message whose job is not recorded yet, while its submission is still being committed, is held
and tried again shortly. An out-of-memory error splits the batch in halves and retries them; any other
engine error is isolated by running the jobs one by one, so one bad job cannot fail its batch mates.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import redis

from sdfleet import keys
from sdfleet.jobs import BatchKey
from sdfleet.state import JobStore, Transition
from worker.engine.base import Engine, GenerationRequest
from worker.intake import Delivery
from worker.postprocess import PostProcessor

#: a message of a submission still being committed is tried again after these many seconds (then the last,
#: again and again): the commit usually lands within milliseconds of the last message
DEFER_S = (0.01, 0.02, 0.05, 0.1, 0.25)


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


class BatchRunner:
    def __init__(self, *, engine: Engine, store: JobStore, post: PostProcessor, settle: Any, worker_id: str,
                 max_attempts: int, log: Any, on_oom: Callable[[], None] | None = None):
        self.engine = engine
        self.store = store
        self.post = post
        self.settle = settle
        self.worker_id = worker_id
        self.max_attempts = max_attempts
        self.log = log
        self.on_oom = on_oom or (lambda: None)
        self.batches_run = 0
        #: job ids of the last run to enter the engine (their attempts are taken back at the next run)
        self._in_engine: list[str] = []

    def run(self, key: BatchKey, deliveries: Sequence[Delivery]) -> None:
        """Run a group. Jobs whose last start never left an engine (their worker died or hung with them
        inside) run alone, each in an engine run of its own: a poison job then charges only itself, and its
        batch mates are not failed with it."""
        try:
            suspects, committing = self._prepare(deliveries)
        except redis.RedisError as exc:
            # Redis refusing writes (OOM, READONLY) or away: keep the jobs and try again with backoff; handing
            # the messages back would only bring them straight back (a hot loop).
            self.settle.retry_later(list(deliveries), exc)
            return
        if len(deliveries) > 1 and suspects:
            rest = [d for d in deliveries if d.job_id not in suspects]
            if rest:
                self._run(key, rest, committing)
            for d in deliveries:
                if d.job_id in suspects:
                    self._run(key, [d], committing)
            return
        self._run(key, deliveries, committing)

    def _prepare(self, deliveries: Sequence[Delivery]) -> tuple[set[str], set[str]]:
        """One round trip before the claim: take back the previous run's charge (it has left the engine: if the
        worker dies from now on, it is not that run's doing; its jobs may still be uploading, and counting
        their attempt would fail innocent jobs as poison), read which jobs carry a charge (their last start
        never finished), and which batches are still being committed.

        The leases are read BEFORE the claim: the commit writes the records and drops the lease in one script,
        so a lease seen here means a record missing or different at the claim may still arrive (the message
        is held), and no lease means the records are final (dropped if bad)."""
        batches = sorted({d.batch_id for d in deliveries})
        pipe = self.store.r.pipeline(transaction=False)
        released = bool(self._in_engine)
        if released:
            self.store.release_attempts(self._in_engine, self.worker_id, client=pipe)
        for d in deliveries:
            pipe.hget(keys.job(d.job_id), "charged")
        for b in batches:
            pipe.exists(keys.submission(b))
        replies = pipe.execute()[1 if released else 0:]
        self._in_engine = []
        charged, leases = replies[:len(deliveries)], replies[len(deliveries):]
        suspects = {d.job_id for d, c in zip(deliveries, charged) if int(c or 0) > 0}
        return suspects, {b for b, held in zip(batches, leases) if held}

    def _run(self, key: BatchKey, deliveries: Sequence[Delivery], committing: set[str]) -> None:
        try:
            if self._in_engine:
                self.store.release_attempts(self._in_engine, self.worker_id)
                self._in_engine = []
            run_id = f"{self.worker_id}:{self.batches_run + 1}"
            claimed = self._claim(deliveries, run_id, committing)
        except redis.RedisError as exc:
            self.settle.retry_later(list(deliveries), exc)
            return
        if not claimed:
            return
        self.batches_run += 1
        for d in claimed:
            d.extra["run"] = run_id
        log = self.log.bind(key=str(key), size=len(claimed), run=run_id)
        self.settle.started(claimed)
        t0 = time.perf_counter()
        self._in_engine = [d.job_id for d in claimed]
        timeline = {"run": run_id, "key": str(key), "size": len(claimed), "jobs": [d.job_id for d in claimed],
                    "t_dispatch": min(d.extra.get("dispatched_at", time.time()) for d in claimed),
                    "t_engine_start": time.time()}
        self._generate(key, claimed, log, timeline)
        log.info("batch ran", batch_s=round(time.perf_counter() - t0, 4), jobs=[d.job_id for d in claimed][:16])

    def _claim(self, deliveries: Sequence[Delivery], run_id: str, committing: set[str]) -> list[Delivery]:
        # One round trip: each job starts only if its record names this batch and holds this spec, so a
        # forged or stale message never runs.
        transitions = self.store.start_many(
            [d.job_id for d in deliveries], self.worker_id, self.max_attempts,
            expect=[(d.batch_id, d.spec.model_dump_json()) for d in deliveries], run=run_id)
        claimed = []
        now = time.time()
        for d, tr in zip(deliveries, transitions):
            if d.batch_id in committing and (not tr.applied and tr.previous != "storing"):
                # Not yet recorded, a resubmission of a failed/cancelled job, or a --replace whose new spec is
                # not committed yet: try again shortly.
                n = d.extra.get("defers", 0)
                d.extra["defers"] = n + 1
                d.not_before = time.monotonic() + DEFER_S[min(n, len(DEFER_S) - 1)]
                self.settle.defer(d)
            elif not tr.previous or tr.mismatch == "batch":
                self.log.error("message names no known job; dropped (forged, expired or an aborted submission)",
                               job_id=d.job_id, batch_id=d.batch_id)
                self.settle.finished(d, "dropped")
            elif tr.mismatch:
                self.log.error("message disagrees with the job record; dropped (forged or tampered)",
                               job_id=d.job_id, batch_id=d.batch_id)
                self.settle.finished(d, "dropped")
            elif tr.poisoned:
                self.log.error("job failed as poison", job_id=d.job_id, batch_id=d.batch_id, attempts=tr.attempts)
                self.post.notifier(d, "failed", tr)
                self.settle.finished(d, "failed", error="poison")
            elif not tr.applied and tr.previous == "storing":
                # A run stored this job and won it, then its worker died before promoting: finish that.
                self.finish_storing(d)
            elif not tr.applied:
                self.log.info("job not runnable; skipped", job_id=d.job_id, batch_id=d.batch_id, status=tr.previous)
                if tr.previous in ("succeeded", "failed"):
                    self.reannounce(d, tr.previous)
                self.settle.finished(d, "cancelled" if tr.previous == "cancelled" else "skipped",
                                     previous=tr.previous)
            else:
                d.attempts = tr.attempts
                d.extra["queued_at"] = tr.queued_at
                d.extra["started_at"] = now
                claimed.append(d)
        return claimed

    def reannounce(self, d: Delivery, status: str) -> None:
        """Announce an outcome recorded by a worker that may have died before announcing it. Event ids derive
        from the outcome: none is sent twice."""
        # Only the job that ended the batch re-announces the batch's end (each report is a manifest rebuild);
        # a batch completed before completed_by was recorded: any of its jobs
        completed_at, by = self.store.r.hmget(keys.batch(d.batch_id), "completed_at", "completed_by")
        completed = bool(completed_at) and (by == keys.job(d.job_id) if by else True)
        self.post.notifier(d, status, Transition(False, status, completed, 0))

    def finish_storing(self, d: Delivery) -> None:
        rec = self.store.job(d.job_id)
        staged = json.loads(rec.fields.get("staged") or "[]") if rec is not None else []
        d.extra["url"] = rec.fields.get("url") if rec is not None else None
        self.log.warning("finishing a job whose worker died while promoting its objects", job_id=d.job_id,
                         run=rec.fields.get("run") if rec is not None else None)
        self.post.complete([(d, staged)])

    def _generate(self, key: BatchKey, group: list[Delivery], log: Any, timeline: dict[str, Any]) -> None:
        requests = [GenerationRequest(d.job_id, d.spec.prompt, d.spec.negative_prompt, d.spec.seed) for d in group]
        try:
            result = self.engine.generate(key, requests)
        except Exception as exc:
            if _is_oom(exc) and len(group) > 1:
                log.warning("out of memory; splitting the batch in halves", size=len(group))
                self.on_oom()
                half = len(group) // 2
                self._generate(key, group[:half], log, dict(timeline))
                self._generate(key, group[half:], log, dict(timeline))
                return
            if len(group) > 1:
                log.warning("engine error; retrying the jobs one by one", error=repr(exc))
                for d in group:
                    self._generate(key, [d], log, dict(timeline))
                return
            reason = "out of memory even alone" if _is_oom(exc) else f"{type(exc).__name__}: {exc}"
            log.error("engine failed for job", job_id=group[0].job_id, error=reason,
                      trace=traceback.format_exc(limit=5))
            self.post.finish_failed(group[0], f"engine error: {reason}")
            return
        timeline.update({"t_engine_end": time.time(), "size": len(group), "jobs": [d.job_id for d in group]})
        # Not waited for here: the device-to-host copy may still run while the next batch starts.
        self.post.submit_group(group, result, timeline)
