"""The thread that runs engine batches, and the watchdog that notices when one hangs.

The engine runs on a thread of its own so that Celery's event loop stays free while a batch is on the GPU:
remote control (``inspect ping``, ``revoke``) answers, events and heartbeats go out, acknowledgements are
settled and the next batch is formed. One batch runs at a time; one more may wait in the hand-off slot, so
the engine starts the next batch the moment it returns (its device-to-host copy still running).

The watchdog compares how long the running batch has taken with what it should take (seconds per image
measured for its bucket on this worker, times the batch size, times ``stall_multiple``, never less than
``stall_floor_s``). A batch past that is stalled: the worker reports it and exits so its supervisor restarts
it (a hung CUDA call cannot be interrupted from Python).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdfleet.jobs import BatchKey
from worker.intake import Delivery


@dataclass
class Running:
    key: BatchKey
    deliveries: list[Delivery]
    started: float  # monotonic
    expected_s: float | None


class ServiceTimes:
    """Seconds per image by bucket, learned from this worker's own engine runs (EWMA)."""

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self._by_bucket: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def bucket(key: BatchKey) -> str:
        return f"{key.width}x{key.height}:{key.steps}"

    def observe(self, key: BatchKey, images: int, seconds: float) -> float:
        per = seconds / max(1, images)
        b = self.bucket(key)
        with self._lock:
            old = self._by_bucket.get(b)
            self._by_bucket[b] = per if old is None else (1 - self.alpha) * old + self.alpha * per
            return self._by_bucket[b]

    def per_image(self, key: BatchKey) -> float | None:
        with self._lock:
            return self._by_bucket.get(self.bucket(key))

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._by_bucket)


class EngineThread(threading.Thread):
    """Runs ``run(key, deliveries)`` for each batch handed to :meth:`submit`, one at a time."""

    def __init__(self, run: Callable[[BatchKey, list[Delivery]], Any], on_done: Callable[[], None],
                 service: ServiceTimes, log: Any):
        super().__init__(name="engine", daemon=True)
        self._run = run
        self._on_done = on_done
        self.service = service
        self.log = log
        self._slot: queue.Queue[tuple[BatchKey, list[Delivery]] | None] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self.running: Running | None = None
        self.pending: tuple[BatchKey, list[Delivery]] | None = None
        self.images_done = 0
        self._rate: list[tuple[float, int]] = []  # (finished monotonic, images) of recent runs

    # --- loop thread ---------------------------------------------------------------------------------

    def can_take(self) -> bool:
        """Room for one more batch: nothing waits in the slot."""
        with self._lock:
            return self.pending is None

    def idle(self) -> bool:
        with self._lock:
            return self.pending is None and self.running is None

    def submit(self, key: BatchKey, deliveries: list[Delivery]) -> None:
        item = (key, deliveries)
        with self._lock:
            assert self.pending is None, "one batch waits at a time"
            self.pending = item
        self._slot.put(item)

    def take_back(self) -> tuple[BatchKey, list[Delivery]] | None:
        """Remove the batch waiting in the slot (drain); None if the engine already took it."""
        with self._lock:
            item, self.pending = self.pending, None
            if item is None:
                return None
            try:
                self._slot.get_nowait()
            except queue.Empty:  # pragma: no cover - pending and slot change together under the lock
                return None
        return item

    def stop(self) -> None:
        try:
            self._slot.put_nowait(None)
        except queue.Full:
            pass

    def images_per_s(self, window_s: float = 60.0) -> float:
        now = time.monotonic()
        with self._lock:
            self._rate = [(t, n) for t, n in self._rate if now - t <= window_s]
            if not self._rate:
                return 0.0
            span = max(now - self._rate[0][0], 1.0)
            return sum(n for _, n in self._rate) / span

    def overdue(self, multiple: float, floor_s: float) -> Running | None:
        """The running batch if it has run longer than it may; else None."""
        with self._lock:
            cur = self.running
        if cur is None:
            return None
        limit = max(floor_s, multiple * cur.expected_s) if cur.expected_s else floor_s
        return cur if time.monotonic() - cur.started > limit else None

    # --- engine thread -------------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            item = self._slot.get()
            if item is None:
                return
            key, deliveries = item
            per = self.service.per_image(key)
            with self._lock:
                if self.pending is not item:  # taken back meanwhile
                    continue
                self.pending = None
                self.running = Running(key, deliveries, time.monotonic(),
                                       per * len(deliveries) if per else None)
            try:
                self._run(key, deliveries)
            except Exception:  # the runner settles every job itself; this is a bug, not a job's fault
                self.log.exception("engine thread: batch runner raised", key=str(key))
            finally:
                with self._lock:
                    self.running = None
                    self._rate.append((time.monotonic(), len(deliveries)))
                self.images_done += len(deliveries)
                self._on_done()
