"""After the engine: PNG encoding, upload of image + JSON sidecar, and recording the outcome.

Runs on a thread pool so encoding and uploads overlap the next batch on the device. A job is marked
succeeded only after both objects are stored; its message is acknowledged only after that.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from sdfleet import keys
from sdfleet.errors import StorageError
from sdfleet.state import JobStore, Transition
from sdfleet.storage import StorageFactory, object_key
from worker.engine.base import GenerationResult
from worker.intake import AckQueue, Delivery


def encode_png(image: np.ndarray, meta: dict[str, str] | None = None) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in (meta or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    # compress_level 1: several times faster than the default for a few percent more bytes.
    Image.fromarray(image).save(buf, format="PNG", compress_level=1, pnginfo=info)
    return buf.getvalue()


class PostProcessor:
    def __init__(self, *, store: JobStore, storage: StorageFactory, acks: AckQueue, worker_id: str,
                 engine_info: dict[str, Any], on_finished: Callable[..., None], log: Any, threads: int = 4):
        self.store = store
        self.storage = storage
        self.acks = acks
        self.worker_id = worker_id
        self.engine_info = engine_info
        self.on_finished = on_finished
        self.log = log
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="post")
        # Recording outcomes waits on the uploads; it gets its own thread so it never starves the pool.
        self.recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="record")
        self.pending: set[Future] = set()
        self._lock = threading.Lock()

    def submit_group(self, group: Sequence[Delivery], result: GenerationResult) -> None:
        """Store every image of an engine run in parallel, then record all outcomes in one round trip."""
        stored = [self.pool.submit(self._store, d, result, i) for i, d in enumerate(group)]
        fut = self.recorder.submit(self._record, list(group), stored)
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
        self.recorder.shutdown(wait=True)

    def _store(self, d: Delivery, result: GenerationResult, index: int) -> dict[str, Any]:
        """Encode and upload one job's PNG and sidecar; returns the fields to record."""
        spec = d.spec
        result.wait()  # the device-to-host copy of this batch
        image = result.images[index]
        n = len(result.images)
        timings = {**{k: v / n for k, v in result.timings.items()}, "batch_size": n}
        t0 = time.perf_counter()
        storage = self.storage.get(spec.out)
        png = encode_png(image)  # parameters live in the sidecar; text chunks cost more than the pixels here
        t1 = time.perf_counter()
        url = storage.put(object_key(d.batch_id, spec.custom_id, ".png"), png, "image/png")
        timings = {**timings, "encode_png_s": t1 - t0, "upload_s": time.perf_counter() - t1,
                   "queue_wait_s": d.extra.get("started_at", 0) - d.extra.get("queued_at", 0)}
        sidecar = {
            "job_id": d.job_id, "batch_id": d.batch_id, "custom_id": spec.custom_id,
            "parameters": spec.model_dump(mode="json", exclude={"out", "webhook", "webhook_events"}),
            "seed": spec.seed, "model": spec.model, "engine": self.engine_info, "worker": self.worker_id,
            "attempt": d.attempts, "engine_run": d.extra.get("run"),
            "timings": {k: round(v, 6) for k, v in timings.items()},
            "image": url, "width": int(image.shape[1]), "height": int(image.shape[0]), "finished_at": time.time(),
        }
        # No indent: json's C encoder only runs without one (the indented form was a third of the CPU).
        sidecar_url = storage.put(object_key(d.batch_id, spec.custom_id, ".json"),
                                  json.dumps(sidecar).encode(), "application/json")
        return {"url": url, "sidecar_url": sidecar_url, "timings": json.dumps(sidecar["timings"]),
                "width": sidecar["width"], "height": sidecar["height"], "run": d.extra.get("run", "")}

    def _record(self, group: list[Delivery], stored: list[Future]) -> None:
        done: list[tuple[Delivery, dict[str, Any]]] = []
        for d, fut in zip(group, stored):
            log = self.log.bind(job_id=d.job_id, batch_id=d.batch_id)
            try:
                done.append((d, fut.result()))
            except StorageError as exc:
                # Not stored: give the job back (retried here or elsewhere later) rather than failing it.
                log.error("storage failed; job handed back to the queue", error=str(exc))
                self.store.requeue(d.job_id, uncount_attempt=True)
                self.store.r.srem(keys.worker_held(self.worker_id), d.job_id)
                self.acks.put(d.reject, True)
            except Exception as exc:  # encoding bugs etc.: record the outcome, never end silently
                log.exception("post-processing failed")
                self.finish_failed(d, f"post-processing failed: {type(exc).__name__}: {exc}")
        if not done:
            return
        transitions = self.store.transition_many([(d.job_id, {**f, "error": ""}) for d, f in done], "succeeded",
                                                 ("running",))
        self.store.r.srem(keys.worker_held(self.worker_id), *[d.job_id for d, _ in done])
        for (d, fields), tr in zip(done, transitions):
            if tr.applied:
                self.log.info("job succeeded", job_id=d.job_id, batch_id=d.batch_id, url=fields["url"])
                self.on_finished(d, "succeeded", tr)
            else:
                self.log.info("job already ended elsewhere; outcome kept", job_id=d.job_id, status=tr.previous)
                if tr.previous == "succeeded":
                    self.reannounce(d, tr.previous)
            self.acks.put(d.ack)

    def reannounce(self, d: Delivery, status: str) -> None:
        """Announce an outcome recorded by a worker that may have died before announcing it.

        The notifier's event ids are derived from the outcome, so an event already sent is not sent again.
        """
        completed = bool(self.store.r.hexists(keys.batch(d.batch_id), "completed_at"))
        self.on_finished(d, status, Transition(False, status, completed, 0))

    def finish_failed(self, d: Delivery, error: str) -> None:
        tr = self.store.fail(d.job_id, error)
        self.store.r.srem(keys.worker_held(self.worker_id), d.job_id)
        if tr.applied:
            self.log.warning("job failed", job_id=d.job_id, batch_id=d.batch_id, error=error)
            self.on_finished(d, "failed", tr)
        self.acks.put(d.ack)
