"""Turning received Celery messages into batches.

The worker's task Strategy (:mod:`worker.consumer`) decodes each message of the generation task here and
puts the delivery in a buffer instead of executing it. Deliveries are grouped by their
:class:`~sdfleet.jobs.BatchKey`; a group runs as one engine batch when it reaches ``max_batch`` or when its
oldest delivery has waited ``max_wait_ms``. Keys are never mixed, the group holding the oldest delivery
runs first, and within a group deliveries run oldest first.

The buffer lives on the worker's event-loop thread. Everything that touches the message (acknowledging it,
handing it back, Celery events) is done there too: other threads ask for it through :class:`LoopCalls`.
"""

from __future__ import annotations

import os
import queue
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdfleet.errors import InvalidJob, MalformedMessage
from sdfleet.jobs import BatchKey, JobSpec, parse_job


@dataclass(eq=False)
class Delivery:
    """One received message: a job to run, and how to settle its message (on the loop thread)."""

    job_id: str
    batch_id: str
    spec: JobSpec
    received_at: float
    #: the Celery request (events, inspect); None in unit tests
    request: Any = None
    #: the kombu message; None in unit tests
    message: Any = None
    attempts: int = 0
    #: set once the message is acknowledged or handed back
    settled: bool = False
    #: not runnable before this monotonic time (a submission not yet committed)
    not_before: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> BatchKey:
        return self.spec.key


def decode_body(body: Any) -> tuple[str, str, JobSpec]:
    """(job_id, batch_id, spec) from a decoded protocol-2 body ``[args, kwargs, embed]``."""
    if not (isinstance(body, (list, tuple)) and len(body) == 3 and isinstance(body[1], dict)):
        raise MalformedMessage("body is not a Celery protocol-2 [args, kwargs, embed] triple")
    kwargs = body[1]
    job_id, batch_id, spec = kwargs.get("job_id"), kwargs.get("batch_id"), kwargs.get("spec")
    if not isinstance(job_id, str) or not job_id or len(job_id) > 64:
        raise MalformedMessage("missing or invalid job_id")
    if not isinstance(batch_id, str) or not batch_id or len(batch_id) > 64:
        raise MalformedMessage("missing or invalid batch_id")
    try:
        return job_id, batch_id, parse_job(spec)
    except InvalidJob as exc:
        raise MalformedMessage(f"job {job_id}: invalid spec: {exc}") from None


def named_ids(body: Any) -> tuple[str | None, str | None]:
    """The job and batch ids a (possibly malformed) body names, if any."""
    try:
        kwargs = body[1]
        job_id, batch_id = kwargs.get("job_id"), kwargs.get("batch_id")
    except (TypeError, IndexError, KeyError, AttributeError):
        return None, None
    ok = lambda v: v if isinstance(v, str) and 0 < len(v) <= 64 else None  # noqa: E731
    return ok(job_id), ok(batch_id)


class Batcher:
    """The buffer of deliveries, grouped by key."""

    def __init__(self, max_batch: int, max_wait_ms: float, clock: Callable[[], float] = time.monotonic):
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.clock = clock
        self.groups: OrderedDict[BatchKey, list[Delivery]] = OrderedDict()

    def add(self, delivery: Delivery) -> None:
        group = self.groups.setdefault(delivery.key, [])
        group.append(delivery)
        group.sort(key=lambda d: d.received_at)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def __iter__(self):
        for group in self.groups.values():
            yield from group

    def remove(self, job_ids: set[str]) -> list[Delivery]:
        """Take the deliveries of ``job_ids`` out of the buffer (revoked jobs)."""
        out = []
        for key in list(self.groups):
            keep = []
            for d in self.groups[key]:
                (out if d.job_id in job_ids else keep).append(d)
            if keep:
                self.groups[key] = keep
            else:
                del self.groups[key]
        return out

    def _due(self, group: list[Delivery], now: float, force: bool, partial_wait: float) -> list[Delivery]:
        runnable = [d for d in group if d.not_before <= now]
        if len(runnable) >= self.max_batch:
            return runnable[:self.max_batch]
        if runnable and (force or now - runnable[0].received_at >= partial_wait):
            return runnable
        return []

    def pop_ready(self, *, force: bool = False,
                  partial_wait: Callable[[BatchKey], float] | None = None) -> tuple[BatchKey, list[Delivery]] | None:
        """The due group holding the oldest delivery (full, or its oldest has waited max wait); None if none.

        ``partial_wait`` (the engine is busy): how long a key's partial group must have waited before it may go
        (never less than max wait). A batch of 3 in a bucket of 4 costs the GPU as much as 4 images, so while
        the engine is busy a partial group keeps filling; but only for so long, or a rare shape would wait
        behind other shapes' full groups for as long as they keep coming."""
        now = self.clock()
        best = None
        for key, group in self.groups.items():
            wait = self.max_wait if partial_wait is None else max(self.max_wait, partial_wait(key))
            due = self._due(group, now, force, wait)
            if due and (best is None or due[0].received_at < best[1][0].received_at):
                best = (key, due)
        if best is None:
            return None
        key, due = best
        taken = {id(d) for d in due}
        rest = [d for d in self.groups[key] if id(d) not in taken]
        if rest:
            self.groups[key] = rest
        else:
            del self.groups[key]
        return key, due

    def ready(self, *, force: bool = False) -> list[tuple[BatchKey, list[Delivery]]]:
        """Pop every group that is due now (all of them if forced), in the order they should run."""
        out = []
        while (nxt := self.pop_ready(force=force)) is not None:
            out.append(nxt)
        return out

    def next_deadline(self, partial_wait: Callable[[BatchKey], float] | None = None) -> float | None:
        """When the next group falls due (``partial_wait`` as for :meth:`pop_ready`: the engine is busy)."""
        times = []
        for key, group in self.groups.items():
            runnable = [d for d in group if d.not_before <= self.clock()]
            if runnable:
                wait = self.max_wait if partial_wait is None or len(runnable) >= self.max_batch \
                    else max(self.max_wait, partial_wait(key))
                times.append(runnable[0].received_at + wait)
            times += [d.not_before for d in group if d.not_before > self.clock()]
        return min(times) if times else None


class LoopCalls:
    """Calls requested from any thread, carried out on the event-loop thread.

    A request writes a byte to a pipe the loop watches, so the loop wakes at once even while it sleeps in
    poll() (kombu's hub would otherwise look at its ready queue only after the poll times out).
    """

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[..., Any], tuple]] = queue.SimpleQueue()
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self._signalled = False

    def put(self, fn: Callable[..., Any], *args: Any) -> None:
        self._q.put((fn, args))
        if not self._signalled:
            self._signalled = True
            try:
                os.write(self.wfd, b"x")
            except (BlockingIOError, OSError):  # the pipe is full: the loop is awake already
                pass

    def drain(self) -> int:
        # Cleared before draining: a request put after this point signals again, so none waits unseen.
        self._signalled = False
        try:
            while os.read(self.rfd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        n = 0
        while True:
            try:
                fn, args = self._q.get_nowait()
            except queue.Empty:
                return n
            fn(*args)
            n += 1

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass
