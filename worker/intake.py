"""Turning claimed queue messages into batches.

The worker's consumer (:mod:`worker.consumer`) decodes each claimed Celery message here and puts the
delivery in a buffer instead of executing it. Deliveries are grouped by their :class:`~sdfleet.jobs.BatchKey`;
a group runs as one engine batch when it reaches ``max_batch`` or when its oldest delivery has waited
``max_wait_ms``. Keys are never mixed, the group holding the oldest delivery runs first, and within a
group deliveries run oldest first.

Everything here runs on the worker's event-loop thread (solo pool): acknowledgements requested by the
post-processing threads are queued and performed there, never from another thread.
"""

from __future__ import annotations

import base64
import json
import queue
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdfleet.errors import InvalidJob, MalformedMessage
from sdfleet.jobs import BatchKey, JobSpec, parse_job
from sdfleet.queue import GENERATE_TASK


@dataclass
class Delivery:
    """One received message: a job to run, and how to acknowledge it."""

    job_id: str
    batch_id: str
    spec: JobSpec
    received_at: float
    ack: Callable[[], Any]
    reject: Callable[[bool], Any]
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> BatchKey:
        return self.spec.key


def message_body(payload: Any) -> Any:
    """The body ([args, kwargs, embed]) of a Celery protocol-2 message of the generate task, decoded.

    ``payload`` is the message as it sits on the queue, parsed from JSON: ``headers``, ``properties``
    (``body_encoding``), ``content-type`` and ``body``. MalformedMessage if it is not such a message.
    """
    if not isinstance(payload, dict):
        raise MalformedMessage("not a message object")
    headers = payload.get("headers")
    task = headers.get("task") if isinstance(headers, dict) else None
    if task != GENERATE_TASK:
        raise MalformedMessage(f"not a {GENERATE_TASK} message (task {str(task)[:60]!r})")
    if payload.get("content-type") != "application/json":
        raise MalformedMessage(f"content type {str(payload.get('content-type'))[:40]!r}, not application/json")
    properties = payload.get("properties")
    encoding = properties.get("body_encoding") if isinstance(properties, dict) else None
    body = payload.get("body")
    try:
        if encoding == "base64":
            body = base64.b64decode(body, validate=True)
        elif encoding is not None:
            raise ValueError(f"unknown body encoding {str(encoding)[:20]!r}")
        return json.loads(body)
    except (ValueError, TypeError) as exc:  # (binascii.Error is a ValueError)
        raise MalformedMessage(f"undecodable body: {exc}") from None


def decode(payload: Any) -> tuple[str, str, JobSpec]:
    """(job_id, batch_id, spec) from a queued Celery protocol-2 message; MalformedMessage if it is not one of ours."""
    body = message_body(payload)
    if not (isinstance(body, (list, tuple)) and len(body) == 3 and isinstance(body[1], dict)):
        raise MalformedMessage("body is not a Celery protocol-2 [args, kwargs, embed] triple")
    kwargs = body[1]
    job_id, batch_id, spec = kwargs.get("job_id"), kwargs.get("batch_id"), kwargs.get("spec")
    if not isinstance(job_id, str) or not job_id or len(job_id) > 64:
        raise MalformedMessage("missing or invalid job_id")
    if not isinstance(batch_id, str) or not batch_id:
        raise MalformedMessage("missing or invalid batch_id")
    try:
        return job_id, batch_id, parse_job(spec)
    except InvalidJob as exc:
        raise MalformedMessage(f"job {job_id}: invalid spec: {exc}") from None


class Batcher:
    """The buffer of deliveries, grouped by key."""

    def __init__(self, max_batch: int, max_wait_ms: float, clock: Callable[[], float] = time.monotonic):
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.clock = clock
        self.groups: OrderedDict[BatchKey, list[Delivery]] = OrderedDict()

    def add(self, delivery: Delivery) -> None:
        self.groups.setdefault(delivery.key, []).append(delivery)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def ready(self, *, force: bool = False) -> list[tuple[BatchKey, list[Delivery]]]:
        """Pop the groups that should run now, oldest first: full ones, expired ones (or all, if forced)."""
        now = self.clock()
        out = []
        for key, group in sorted(self.groups.items(), key=lambda kv: kv[1][0].received_at):
            while len(group) >= self.max_batch:
                out.append((key, group[:self.max_batch]))
                del group[:self.max_batch]
            if group and (force or now - group[0].received_at >= self.max_wait):
                out.append((key, list(group)))
                group.clear()
        for key in [k for k, g in self.groups.items() if not g]:
            del self.groups[key]
        out.sort(key=lambda kv: kv[1][0].received_at)
        return out

    def next_deadline(self) -> float | None:
        if not self.groups:
            return None
        return min(g[0].received_at for g in self.groups.values()) + self.max_wait


class AckQueue:
    """Acknowledgements requested from any thread, carried out on the event-loop thread.

    ``on_put`` (set by the consumer) wakes the event loop: an acknowledgement frees prefetch room. It is
    called once per round of requests, not once per request.
    """

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[..., Any], tuple]] = queue.SimpleQueue()
        self.on_put: Callable[[], Any] | None = None
        self._signalled = False

    def put(self, fn: Callable[..., Any], *args: Any) -> None:
        self._q.put((fn, args))
        if self.on_put is not None and not self._signalled:
            self._signalled = True
            self.on_put()

    def drain(self) -> int:
        # Cleared before draining: a request put after this point signals again, so none waits unseen.
        self._signalled = False
        n = 0
        while True:
            try:
                fn, args = self._q.get_nowait()
            except queue.Empty:
                return n
            fn(*args)
            n += 1
