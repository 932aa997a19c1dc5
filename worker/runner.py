"""Running one group of deliveries: claim each job, run the engine, hand images to post-processing.

Claiming is a compare-and-set (queued|running -> running) that counts an attempt: a job already
finished elsewhere is acknowledged and skipped, a cancelled one never runs, and one that has been
started too many times without finishing (it keeps killing workers) is failed instead of looping.
An out-of-memory error splits the batch in halves and retries them; any other engine error is
isolated by running the jobs one by one, so one bad job cannot fail its batch mates.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from sdfleet.jobs import BatchKey
from sdfleet.state import JobStore
from worker.engine.base import Engine, GenerationRequest
from worker.intake import AckQueue, Delivery
from worker.postprocess import PostProcessor


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


class BatchRunner:
    def __init__(self, *, engine: Engine, store: JobStore, post: PostProcessor, acks: AckQueue, worker_id: str,
                 max_attempts: int, log: Any, on_oom: Callable[[], None] | None = None):
        self.engine = engine
        self.store = store
        self.post = post
        self.acks = acks
        self.worker_id = worker_id
        self.max_attempts = max_attempts
        self.log = log
        self.on_oom = on_oom or (lambda: None)
        self.batches_run = 0
        #: job ids of the last run to enter the engine (their attempts are taken back at the next run)
        self._in_engine: list[str] = []

    def run(self, key: BatchKey, deliveries: Sequence[Delivery]) -> None:
        if self._in_engine:
            # The previous run has left the engine: if the worker dies from now on, it is not that run's
            # doing. (Its jobs may still be uploading; counting their attempt would fail innocent jobs as
            # poison when a poison job keeps killing workers right after them.)
            self.store.release_attempts(self._in_engine, self.worker_id)
            self._in_engine = []
        claimed = self._claim(deliveries)
        if not claimed:
            return
        self.batches_run += 1
        run_id = f"{self.worker_id}:{self.batches_run}"
        for d in claimed:
            d.extra["run"] = run_id
        log = self.log.bind(key=str(key), size=len(claimed), run=run_id)
        t0 = time.perf_counter()
        self._in_engine = [d.job_id for d in claimed]
        self._generate(key, claimed, log)
        log.info("batch ran", batch_s=round(time.perf_counter() - t0, 4),
                 jobs=[d.job_id for d in claimed][:16])

    def _claim(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        # One round trip: each job starts only if its record names this batch and holds this spec, so a
        # forged or stale message never runs.
        transitions = self.store.start_many(
            [d.job_id for d in deliveries], self.worker_id, self.max_attempts,
            expect=[(d.batch_id, d.spec.model_dump_json()) for d in deliveries])
        claimed = []
        now = time.time()
        for d, tr in zip(deliveries, transitions):
            if not tr.previous or tr.mismatch == "batch":
                self.log.error("message names no known job; dropped (forged or expired)", job_id=d.job_id,
                               batch_id=d.batch_id)
            elif tr.mismatch:
                self.log.error("message disagrees with the job record; dropped (forged or tampered)",
                               job_id=d.job_id, batch_id=d.batch_id)
            elif tr.poisoned:
                self.log.error("job failed as poison", job_id=d.job_id, batch_id=d.batch_id, attempts=tr.attempts)
                self.post.on_finished(d, "failed", tr)
            elif not tr.applied:
                self.log.info("job not runnable; skipped", job_id=d.job_id, batch_id=d.batch_id, status=tr.previous)
                if tr.previous in ("succeeded", "failed"):
                    self.post.reannounce(d, tr.previous)
            else:
                d.attempts = tr.attempts
                d.extra["queued_at"] = tr.queued_at
                d.extra["started_at"] = now
                claimed.append(d)
                continue
            self.acks.put(d.ack)
        return claimed

    def _generate(self, key: BatchKey, group: list[Delivery], log: Any) -> None:
        requests = [GenerationRequest(d.job_id, d.spec.prompt, d.spec.negative_prompt, d.spec.seed) for d in group]
        try:
            result = self.engine.generate(key, requests)
        except Exception as exc:
            if _is_oom(exc) and len(group) > 1:
                log.warning("out of memory; splitting the batch in halves", size=len(group))
                self.on_oom()
                half = len(group) // 2
                self._generate(key, group[:half], log)
                self._generate(key, group[half:], log)
                return
            if len(group) > 1:
                log.warning("engine error; retrying the jobs one by one", error=repr(exc))
                for d in group:
                    self._generate(key, [d], log)
                return
            reason = "out of memory even alone" if _is_oom(exc) else f"{type(exc).__name__}: {exc}"
            log.error("engine failed for job", job_id=group[0].job_id, error=reason,
                      trace=traceback.format_exc(limit=5))
            self.post.finish_failed(group[0], f"engine error: {reason}")
            return
        # Not waited for here: the device-to-host copy may still run while the next batch starts.
        self.post.submit_group(group, result)
