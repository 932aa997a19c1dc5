"""After the engine: PNG encoding, storing image + JSON sidecar, and recording the outcome.

Runs on a thread pool so storing and recording overlap the next batch on the device: one task per engine
run. The task waits for the run's device-to-host copy, has the storing process (:mod:`worker.objects`) encode
and write every job's objects under the run's own staged names, records the outcomes in one round trip (only
if this run still owns each job: a worker that stalled and lost its jobs to another run is refused), then
promotes the staged objects to the job's keys, announces, and asks for the acknowledgements. Once a job is
announced succeeded its objects never change: only the run that recorded the outcome promotes.

Nothing is re-rendered because a store or Redis is down: the images are held and the store (or the
recording) alone is retried with backoff. The worker meanwhile stops forming batches (the runs waiting here
are capped), so a long outage costs memory for a few runs, not GPU time. An error that waiting cannot fix
(no such bucket, access denied, not a directory) fails the job after ``storage_permanent_tries`` tries, with
the storage's own message.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import redis

from sdfleet.logs import Throttled
from sdfleet.state import JobStore
from sdfleet.storage import StorageFactory
from worker.engine.base import GenerationResult
from worker.intake import Delivery
from worker.objects import FAILED, STORAGE_FAILED, ObjectWriter

# Sidecar parameters: the job as submitted, less where it goes and whom to tell.
_NOT_PARAMETERS = {"out", "webhook", "webhook_events"}
# How often a dead storing process is replaced for one run before its jobs fail.
_STORER_DEATHS = 3


class Backoff:
    """Exponential waits with a cap: 0.5, 1, 2, ... ``cap`` seconds."""

    def __init__(self, first: float = 0.5, cap: float = 30.0):
        self.first, self.cap, self.n = first, cap, 0

    def next(self) -> float:
        # (the exponent capped: a float overflows past 2**1023, about a thousand tries)
        wait = min(self.cap, self.first * (2 ** min(self.n, 64)))
        self.n += 1
        return wait


class PostProcessor:
    def __init__(self, *, store: JobStore, storage: StorageFactory, settle: Any, worker_id: str,
                 engine_info: dict[str, Any], notifier: Any, log: Any, threads: int = 2,
                 permanent_tries: int = 5, retry_cap_s: float = 30.0):
        self.store = store
        self.settle = settle
        self.worker_id = worker_id
        self.notifier = notifier
        self.log = log
        self.threads = threads
        self.permanent_tries = permanent_tries
        self.retry_cap_s = retry_cap_s
        self.writer = ObjectWriter(storage, engine_info, worker_id)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="post")
        self.pending: set[Future] = set()
        self._lock = threading.Lock()
        #: set when the worker drains: retries give up at this monotonic time and hand their jobs back
        self.give_up_at: float | None = None
        self._wake = threading.Event()
        self._storage_log = Throttled(log, 10.0)
        self._redis_log = Throttled(log, 10.0)

    # --- the loop thread's view ------------------------------------------------------------------------

    def submit_group(self, group: Sequence[Delivery], result: GenerationResult, run: dict[str, Any]) -> None:
        """Store every image of an engine run, then record all outcomes in one round trip."""
        fut = self.pool.submit(self._process, list(group), result, run)
        with self._lock:
            self.pending.add(fut)
        fut.add_done_callback(self._done)

    def backlog(self) -> int:
        """Engine runs not yet stored and recorded."""
        with self._lock:
            return len(self.pending)

    def _done(self, fut: Future) -> None:
        with self._lock:
            self.pending.discard(fut)
        self.settle.wake()

    def wait(self, timeout: float | None = None) -> None:
        """Block until every submitted run is stored and recorded, or handed back (used when draining)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.give_up_at = deadline
        self._wake.set()
        while True:
            with self._lock:
                fut = next(iter(self.pending), None)
            if fut is None:
                return
            try:
                fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()) + 5)
            except Exception:
                return

    def resume(self) -> None:
        """Undo :meth:`wait` when the drain was not the end: Celery's consumer restarts after a lost
        connection. Left as they were, retries would never wait again (a busy loop) and would give up once
        the old drain deadline passed (handing back jobs whose images are held)."""
        self.give_up_at = None
        self._wake.clear()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
        self.writer.shutdown()

    # --- post threads ------------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> bool:
        """Wait before a retry; False when the worker is draining and its deadline has passed."""
        if self.give_up_at is not None:
            seconds = min(seconds, max(0.0, self.give_up_at - time.monotonic()))
        self._wake.wait(seconds)
        return self.give_up_at is None or time.monotonic() < self.give_up_at

    def _process(self, group: list[Delivery], result: GenerationResult, run: dict[str, Any]) -> None:
        """Never ends silently: whatever goes wrong, each job of the run is recorded or handed back."""
        settled: set[str] = set()
        try:
            self._process_run(group, result, run, settled)
        except Exception as exc:  # a device error surfacing at wait(), a bug
            self.log.exception("post-processing of an engine run failed; its jobs go back to the queue",
                               error=repr(exc))
            left = [d for d in group if d.job_id not in settled]
            for d in left:
                # The attempt stays counted: a run that fails this way every time ends as poison, not a loop.
                try:
                    self.store.requeue(d.job_id, run=d.extra.get("run", ""))
                except redis.RedisError as exc2:
                    self.log.warning("could not requeue job; its message goes back anyway", job_id=d.job_id,
                                     error=repr(exc2))
            self.settle.handback(left)

    def _process_run(self, group: list[Delivery], result: GenerationResult, run: dict[str, Any],
                     settled: set[str]) -> None:
        result.wait()  # the device-to-host copy of this batch
        run["t_d2h_done"] = time.time()
        n = len(result.images)
        timings = {**{k: v / n for k, v in result.timings.items() if isinstance(v, (int, float))},
                   "batch_size": n}
        run["gpu_s"] = result.timings.get("gpu_s")
        self.settle.engine_time(group[0].key, n, run["t_d2h_done"] - run["t_engine_start"])
        jobs = [{
            "job_id": d.job_id, "batch_id": d.batch_id, "custom_id": d.spec.custom_id, "out": d.spec.out,
            "parameters": d.spec.model_dump(mode="json", exclude=_NOT_PARAMETERS), "seed": d.spec.seed,
            "model": d.spec.model, "attempt": d.attempts, "engine_run": d.extra.get("run"),
            "timings": {**timings, "queue_wait_s": d.extra.get("started_at", 0) - d.extra.get("queued_at", 0)},
        } for d in group]
        stored = self._store(group, jobs, result.images, settled)
        run["t_stored"] = time.time()
        # The storing process encodes and writes each job in turn: the run's PNGs are all encoded when its last
        # job's is (its write follows).
        encoded = [d.extra.get("encoded_at") for d in group if d.extra.get("encoded_at")]
        run["t_encoded"] = max(encoded) if encoded else run["t_stored"]
        if stored:
            self._record(stored, settled)
        run["t_acked"] = time.time()
        self.settle.timeline(run)

    def _store(self, group: list[Delivery], jobs: list[dict[str, Any]], images: list[Any],
               settled: set[str]) -> list[tuple[Delivery, dict[str, Any]]]:
        """Write every job's staged objects, retrying the store alone while it is down."""
        todo = list(range(len(group)))
        tries = {i: 0 for i in todo}
        deaths = 0
        backoff = Backoff(0.5, self.retry_cap_s)
        stored: list[tuple[Delivery, dict[str, Any]]] = []
        while todo:
            try:
                reports = self.writer.write([jobs[i] for i in todo], [images[i] for i in todo])
            except BrokenProcessPool:
                deaths += 1
                self.log.error("storing process died", jobs=[group[i].job_id for i in todo], deaths=deaths)
                if deaths >= _STORER_DEATHS:
                    for i in todo:
                        self._fail(group[i], f"post-processing failed: the storing process died {deaths} times")
                        settled.add(group[i].job_id)
                    return stored
                continue
            waiting = []
            for i, report in zip(todo, reports):
                d = group[i]
                if report[0] == STORAGE_FAILED:
                    if report[2]:
                        tries[i] += 1
                        if tries[i] >= self.permanent_tries:
                            self._fail(d, f"storage failed: {report[1]}")
                            settled.add(d.job_id)
                            continue
                    waiting.append(i)
                    self._storage_log.error("storage failed; holding the image and retrying the store",
                                            job_id=d.job_id, batch_id=d.batch_id, error=report[1],
                                            permanent=report[2])
                elif report[0] == FAILED:
                    self.log.error("post-processing failed", job_id=d.job_id, batch_id=d.batch_id,
                                   error=report[1], trace=report[2])
                    self._fail(d, f"post-processing failed: {report[1]}")
                    settled.add(d.job_id)
                else:
                    fields = dict(report[1])
                    d.extra["encoded_at"] = fields.pop("encoded_at", None)  # for the timeline, not the record
                    d.extra["url"] = fields["url"]
                    stored.append((d, {**fields, "run": d.extra.get("run", ""), "error": ""}))
            todo = waiting
            if todo and not self._sleep(backoff.next()):
                # Draining and the store is still down: hand the jobs back (their attempt uncounted: nothing
                # crashed), so another worker stores them when it can.
                left = [group[i] for i in todo]
                self.log.warning("store still down at drain; jobs handed back", jobs=[d.job_id for d in left])
                for d in left:
                    self._redis_retry(lambda d=d: self.store.requeue(d.job_id, uncount_attempt=True,
                                                                     run=d.extra.get("run", "")))
                    settled.add(d.job_id)
                self.settle.handback(left)
                return stored
        return stored

    def _redis_retry(self, fn: Any) -> Any:
        """Run a Redis write, retrying with backoff (OOM, READONLY, a restart) until it lands or the drain ends."""
        backoff = Backoff(0.2, self.retry_cap_s)
        while True:
            try:
                return fn()
            except redis.RedisError as exc:
                self._redis_log.error("could not record in Redis; retrying", error=repr(exc))
                if not self._sleep(backoff.next()):
                    raise

    def _record(self, stored: list[tuple[Delivery, dict[str, Any]]], settled: set[str]) -> None:
        # running -> storing, only for jobs this run still owns: the first run to get here wins the job, and
        # its staged objects become the job's objects (whoever finishes promoting them).
        transitions = self._redis_retry(lambda: self.store.transition_many(
            [(d.job_id, fields) for d, fields in stored], "storing", ("running",),
            runs=[d.extra.get("run", "") for d, _ in stored]))
        won = [(d, fields) for (d, fields), tr in zip(stored, transitions) if tr.applied]
        lost = [(d, fields, tr) for (d, fields), tr in zip(stored, transitions) if not tr.applied]
        if any(tr.previous == "storing" for _, _, tr in lost):
            # A retried write whose first try landed (its reply lost when Redis restarted) reads back "storing":
            # if the record holds this run and this run's staged objects, that is this run's own write, so the
            # job is won. Dropping the objects would leave the job storing for good, its promotion impossible.
            recs = self._redis_retry(lambda: self.store.jobs([d.job_id for d, _, _ in lost]))
            mine = {d.job_id for (d, fields, tr), rec in zip(lost, recs)
                    if tr.previous == "storing" and rec is not None and d.extra.get("run")
                    and rec.fields.get("run") == d.extra["run"] and rec.fields.get("staged") == fields["staged"]}
            won += [(d, fields) for d, fields, _ in lost if d.job_id in mine]
            lost = [item for item in lost if item[0].job_id not in mine]
        if lost:
            # Another run owns these jobs now (this worker stalled and they were handed back) or won them
            # first: this run's staged objects are dropped; the winner's are never touched.
            moves = [tuple(m) for _, fields, _ in lost for m in json.loads(fields["staged"])]
            try:
                self.writer.discard(moves)
            except BrokenProcessPool:
                pass
            for d, _, tr in lost:
                self.log.info("job owned by another run or ended elsewhere; this run's objects dropped",
                              job_id=d.job_id, status=tr.previous, mismatch=tr.mismatch)
                self.settle.finished(d, "skipped", previous=tr.previous)
                settled.add(d.job_id)
        if won:
            self.complete([(d, json.loads(fields["staged"])) for d, fields in won])
            for d, _ in won:
                settled.add(d.job_id)

    def complete(self, items: list[tuple[Delivery, list[list[str]]]]) -> None:
        """Promote the winning runs' staged objects to the jobs' keys (retrying while the store is down), then
        record storing -> succeeded, announce and settle. Also finishes what a worker that died in between
        left (the runner calls it for a redelivered job found ``storing``): promoting the same staged objects
        again is harmless."""
        backoff = Backoff(0.5, self.retry_cap_s)
        todo = items
        while todo:
            moves = [tuple(m) for _, staged in todo for m in staged]
            try:
                errors = self.writer.promote(moves)
            except BrokenProcessPool:
                continue
            bad = {i for i, (_, staged) in enumerate(todo)
                   if any(errors[sum(len(s) for _, s in todo[:i]) + k] for k in range(len(staged)))}
            done = [d for i, (d, _) in enumerate(todo) if i not in bad]
            if done:
                transitions = self._redis_retry(lambda done=done: self.store.transition_many(
                    [(d.job_id, {}) for d in done], "succeeded", ("storing",)))
                for d, tr in zip(done, transitions):
                    rec_url = d.extra.get("url")
                    if tr.applied or tr.previous == "succeeded":
                        self.log.info("job succeeded", job_id=d.job_id, batch_id=d.batch_id, url=rec_url)
                        self.notifier(d, "succeeded", tr)
                    self.settle.finished(d, "succeeded" if tr.applied else "skipped", url=rec_url,
                                         previous=tr.previous)
            if bad:
                self._storage_log.error("could not promote stored objects; retrying",
                                        errors=[e for e in errors if e][:3])
            todo = [item for i, item in enumerate(todo) if i in bad]
            if todo and not self._sleep(backoff.next()):
                # Left unacknowledged: the message is redelivered and that worker finishes the promotion.
                raise RuntimeError("store down while promoting at drain")

    def _fail(self, d: Delivery, error: str) -> None:
        tr = self._redis_retry(lambda: self.store.transition_many(
            [(d.job_id, {"error": error})], "failed", ("queued", "running"), runs=[d.extra.get("run", "")])[0])
        if not tr.applied and tr.previous == "failed" and d.extra.get("run"):
            # as in _record: a retry after a lost reply reads back its own write (this run, this error)
            rec = self._redis_retry(lambda: self.store.job(d.job_id))
            if rec is not None and rec.fields.get("run") == d.extra["run"] and rec.fields.get("error") == error:
                tr = dataclasses.replace(tr, applied=True)
        if tr.applied:
            self.log.warning("job failed", job_id=d.job_id, batch_id=d.batch_id, error=error)
            self.notifier(d, "failed", tr)
        self.settle.finished(d, "failed" if tr.applied else "skipped", error=error, previous=tr.previous)

    def finish_failed(self, d: Delivery, error: str) -> None:
        """Record a job as failed (engine error, poison) and settle its message."""
        self._fail(d, error)
