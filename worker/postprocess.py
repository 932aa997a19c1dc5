"""After the engine: PNG encoding, upload of image + JSON sidecar, and recording the outcome.

Runs on a thread pool so encoding and uploads overlap the next batch on the device. A job is marked
succeeded only after both objects are stored; its message is acknowledged only after that.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from sdfleet import keys
from sdfleet.errors import StorageError
from sdfleet.state import JobStore
from sdfleet.storage import StorageFactory, object_key
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
        self.pending: set[Future] = set()

    def submit(self, delivery: Delivery, image: np.ndarray, timings: dict[str, float]) -> None:
        fut = self.pool.submit(self._finish, delivery, image, timings)
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every submitted job is stored and recorded (used before shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending:
            fut = next(iter(self.pending), None)
            if fut is None:
                break
            fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)

    def _finish(self, d: Delivery, image: np.ndarray, timings: dict[str, float]) -> None:
        log = self.log.bind(job_id=d.job_id, batch_id=d.batch_id)
        spec = d.spec
        t0 = time.perf_counter()
        try:
            storage = self.storage.get(spec.out)
            png = encode_png(image, {"sdfleet:job_id": d.job_id, "sdfleet:seed": str(spec.seed)})
            t1 = time.perf_counter()
            url = storage.put(object_key(d.batch_id, spec.custom_id, ".png"), png, "image/png")
            timings = {**timings, "encode_png_s": t1 - t0, "upload_s": time.perf_counter() - t1,
                       "queue_wait_s": d.extra.get("started_at", 0) - d.extra.get("queued_at", 0)}
            sidecar = {
                "job_id": d.job_id, "batch_id": d.batch_id, "custom_id": spec.custom_id,
                "parameters": spec.model_dump(mode="json", exclude={"out", "webhook", "webhook_events"}),
                "seed": spec.seed, "model": spec.model, "engine": self.engine_info, "worker": self.worker_id,
                "attempt": d.attempts, "engine_run": d.extra.get("run"), "timings": {k: round(v, 6) for k, v in timings.items()},
                "image": url, "width": int(image.shape[1]), "height": int(image.shape[0]),
                "finished_at": time.time(),
            }
            sidecar_url = storage.put(object_key(d.batch_id, spec.custom_id, ".json"),
                                      json.dumps(sidecar, indent=1).encode(), "application/json")
        except StorageError as exc:
            # Not stored: give the job back (it is retried elsewhere or later) rather than failing it.
            log.error("storage failed; job handed back to the queue", error=str(exc))
            self.store.requeue(d.job_id, uncount_attempt=True)
            self.store.r.srem(keys.worker_held(self.worker_id), d.job_id)
            self.acks.put(d.reject, True)
            return
        except Exception as exc:  # encoding bugs etc.: record the outcome, never end silently
            log.exception("post-processing failed")
            self.finish_failed(d, f"post-processing failed: {type(exc).__name__}: {exc}")
            return
        tr = self.store.succeed(d.job_id, url=url, sidecar_url=sidecar_url,
                                timings=json.dumps(sidecar["timings"]), width=sidecar["width"],
                                height=sidecar["height"], run=d.extra.get("run", ""))
        self.store.r.srem(keys.worker_held(self.worker_id), d.job_id)
        if tr.applied:
            log.info("job succeeded", url=url, **{k: round(v, 4) for k, v in timings.items()})
            self.on_finished(d, "succeeded", tr)
        else:
            log.info("job already ended elsewhere; outcome kept", status=tr.previous)
        self.acks.put(d.ack)

    def finish_failed(self, d: Delivery, error: str) -> None:
        tr = self.store.fail(d.job_id, error)
        self.store.r.srem(keys.worker_held(self.worker_id), d.job_id)
        if tr.applied:
            self.log.warning("job failed", job_id=d.job_id, batch_id=d.batch_id, error=error)
            self.on_finished(d, "failed", tr)
        self.acks.put(d.ack)
