"""After the engine: PNG encoding, upload of image + JSON sidecar, and recording the outcome.

Runs on a thread pool so storing and recording overlap the next batch on the device: one task per engine
run (handing each job to a thread of its own cost more than the job's work, in GIL hand-offs). The task
waits for the run's device-to-host copy, has the storing process (:mod:`worker.objects`) encode and write
every job's objects, then records all the outcomes in one round trip and asks for the acknowledgements.
A job is marked succeeded only after both objects are stored; its message is acknowledged only after that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from sdfleet import keys
from sdfleet.state import JobStore, Transition
from sdfleet.storage import StorageFactory
from worker.engine.base import GenerationResult
from worker.intake import AckQueue, Delivery
from worker.objects import FAILED, STORAGE_FAILED, ObjectWriter

# Sidecar parameters: the job as submitted, less where it goes and whom to tell.
_NOT_PARAMETERS = {"out", "webhook", "webhook_events"}


class PostProcessor:
    def __init__(self, *, store: JobStore, storage: StorageFactory, acks: AckQueue, worker_id: str,
                 engine_info: dict[str, Any], on_finished: Callable[..., None], log: Any, threads: int = 2):
        self.store = store
        self.acks = acks
        self.worker_id = worker_id
        self.on_finished = on_finished
        self.log = log
        self.writer = ObjectWriter(storage, engine_info, worker_id)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="post")
        self.pending: set[Future] = set()
        self._lock = threading.Lock()

    def submit_group(self, group: Sequence[Delivery], result: GenerationResult) -> None:
        """Store every image of an engine run, then record all outcomes in one round trip."""
        fut = self.pool.submit(self._process, list(group), result)
        with self._lock:
            self.pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future) -> None:
        with self._lock:
            self.pending.discard(fut)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every submitted job is stored and recorded (used before shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                fut = next(iter(self.pending), None)
            if fut is None:
                return
            try:
                fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except Exception:
                pass

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
        self.writer.shutdown()

    def _process(self, group: list[Delivery], result: GenerationResult) -> None:
        """Never ends silently: whatever goes wrong, each job of the run is recorded or handed back."""
        settled: set[str] = set()
        try:
            self._process_run(group, result, settled)
        except Exception as exc:  # a device error surfacing at wait(), Redis refusing a write, a bug
            self.log.exception("post-processing of an engine run failed; its jobs go back to the queue",
                               error=repr(exc))
            for d in group:
                if d.job_id in settled:
                    continue
                # The attempt stays counted: a run that fails this way every time ends as poison, not a loop.
                try:
                    self.store.requeue(d.job_id)
                except Exception as exc2:
                    self.log.warning("could not requeue job; its message goes back anyway", job_id=d.job_id,
                                     error=repr(exc2))
                self.acks.put(d.reject, True)

    def _process_run(self, group: list[Delivery], result: GenerationResult, settled: set[str]) -> None:
        result.wait()  # the device-to-host copy of this batch
        n = len(result.images)
        timings = {**{k: v / n for k, v in result.timings.items()}, "batch_size": n}
        jobs = [{
            "job_id": d.job_id, "batch_id": d.batch_id, "custom_id": d.spec.custom_id, "out": d.spec.out,
            "parameters": d.spec.model_dump(mode="json", exclude=_NOT_PARAMETERS), "seed": d.spec.seed,
            "model": d.spec.model, "attempt": d.attempts, "engine_run": d.extra.get("run"),
            "timings": {**timings, "queue_wait_s": d.extra.get("started_at", 0) - d.extra.get("queued_at", 0)},
        } for d in group]
        try:
            reports = self.writer.write(jobs, result.images)
        except BrokenProcessPool:
            # The storing process died (killed, out of memory). Hand the jobs back with the attempt counted,
            # so a job that kills it every time ends as poison rather than looping.
            self.log.error("storing process died; jobs handed back to the queue", jobs=[d.job_id for d in group])
            for d in group:
                self.store.requeue(d.job_id)
                self.acks.put(d.reject, True)
                settled.add(d.job_id)
            return
        done: list[tuple[Delivery, dict[str, Any]]] = []
        for d, report in zip(group, reports):
            if report[0] == STORAGE_FAILED:
                # Not stored: give the job back (retried here or elsewhere later) rather than failing it.
                self.log.error("storage failed; job handed back to the queue", job_id=d.job_id,
                               batch_id=d.batch_id, error=report[1])
                self.store.requeue(d.job_id, uncount_attempt=True)
                self.acks.put(d.reject, True)
                settled.add(d.job_id)
            elif report[0] == FAILED:
                self.log.error("post-processing failed", job_id=d.job_id, batch_id=d.batch_id, error=report[1],
                               trace=report[2])
                self.finish_failed(d, f"post-processing failed: {report[1]}")
                settled.add(d.job_id)
            else:
                done.append((d, {**report[1], "run": d.extra.get("run", ""), "error": ""}))
        if not done:
            return
        transitions = self.store.transition_many([(d.job_id, fields) for d, fields in done], "succeeded",
                                                 ("running",))
        for (d, fields), tr in zip(done, transitions):
            if tr.applied:
                self.log.info("job succeeded", job_id=d.job_id, batch_id=d.batch_id, url=fields["url"])
                self.on_finished(d, "succeeded", tr)
            else:
                self.log.info("job already ended elsewhere; outcome kept", job_id=d.job_id, status=tr.previous)
                if tr.previous == "succeeded":
                    self.reannounce(d, tr.previous)
            self.acks.put(d.ack)
            settled.add(d.job_id)

    def reannounce(self, d: Delivery, status: str) -> None:
        """Announce an outcome recorded by a worker that may have died before announcing it.

        The notifier's event ids are derived from the outcome, so an event already sent is not sent again.
        """
        completed = bool(self.store.r.hexists(keys.batch(d.batch_id), "completed_at"))
        self.on_finished(d, status, Transition(False, status, completed, 0))

    def finish_failed(self, d: Delivery, error: str) -> None:
        tr = self.store.fail(d.job_id, error)
        if tr.applied:
            self.log.warning("job failed", job_id=d.job_id, batch_id=d.batch_id, error=error)
            self.on_finished(d, "failed", tr)
        self.acks.put(d.ack)
