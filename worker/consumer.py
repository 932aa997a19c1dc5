"""The generation queue's consumer: a task Strategy that buffers jobs, and the bootstep that runs batches.

The GPU worker is a plain Celery worker (solo pool) consuming its model's queue through Celery's own
consumer and kombu's Redis transport, so Celery's tools see it: ``inspect active|reserved|stats``, events
(task-received, -started, -succeeded, -failed, -revoked, worker heartbeats), revoke, Flower. What it changes
is what happens to a received message, through Celery's public extension points (as celery-batches does):

- the task's ``Strategy`` (:meth:`GenerationConsumer.strategy`) decodes the message, checks it, records it
  in the worker's held hash (so the reclaim sweep can hand it back if the worker dies), marks it reserved
  and buffers it in the :class:`~worker.intake.Batcher` instead of executing it;
- :class:`GenerationStep`, a consumer bootstep, forms batches on the event loop and hands them to the
  engine thread (:mod:`worker.engine_thread`); post-processing threads store and record; every message
  operation and Celery event happens back on the loop thread (:class:`~worker.intake.LoopCalls`).

The prefetch (Celery's QoS) is sized so that a full batch can form while one runs and one is stored.
Revokes are applied as they arrive: the job is recorded cancelled and announced, and its buffered copy is
dropped. SIGTERM drains: no new batch starts, the batch in the engine finishes and is stored and
acknowledged; buffered messages are left unacknowledged, and kombu puts them back at the head of the queue
when the channel closes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.worker import state as worker_state
from celery.worker.request import Request

from sdfleet import keys
from sdfleet.errors import MalformedMessage
from sdfleet.logs import Throttled
from sdfleet.state import TERMINAL
from worker.intake import Delivery, decode_body, named_ids
from worker.postprocess import Backoff

if TYPE_CHECKING:
    from worker.app import WorkerContext

# How often the loop looks for revokes that arrived by remote control and for a stalled engine.
TICK_S = 0.5
# How long the held-hash writes and the task events are gathered before they go out in one round trip each.
# kombu delivers one message per loop turn, so flushing every turn cost two round trips per job; a dispatch
# flushes at once, so no batch waits for this (and the claim sees every job held). Events keep the time they
# happened. A worker that dies inside it leaves orphans, which the sweep restores after its grace (twice the
# heartbeat TTL).
INTAKE_FLUSH_S = 0.02
# While the engine is busy, a partial group waits for more jobs of its shape for at most this many of its runs
# before it takes the hand-off slot anyway (it runs next, padded to its graph bucket).
PARTIAL_HOLD_RUNS = 2


class GenerationConsumer:
    """Receives, buffers and settles the generation queue's messages for one worker process."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.log = ctx.log
        self.hub: Any = None
        self.draining = False
        self._deadline: Any = None
        self._deadline_at = 0.0
        self._tick: Any = None
        self._seen_revoked: set[str] = set()
        self._retry = Backoff(0.5, 30.0)
        self._retry_log = Throttled(ctx.log, 10.0)
        self._pumping = False
        # Writes to this worker's held hash, gathered and sent in one round trip per loop turn.
        self._held_add: dict[str, str] = {}
        self._held_del: set[str] = set()
        self._held_flush_due = False
        # Task events not sent yet, in order: (request, type, fields with their timestamp).
        self._events: list[tuple[Any, str, dict[str, Any]]] = []
        self._eventer: Any = None

    # --- the task Strategy (Celery calls it with each message of the generation task) ---------------

    def strategy(self, task: Any, app: Any, consumer: Any, **_: Any):
        hostname = consumer.hostname
        eventer = self._eventer = consumer.event_dispatcher
        connection_errors = consumer.connection_errors

        def on_message(message, body, ack, reject, callbacks, **kw):
            self._receive(message, lambda: Request(
                message, on_ack=ack, on_reject=reject, app=app, hostname=hostname, eventer=eventer, task=task,
                connection_errors=connection_errors, utc=True))

        return on_message

    def _receive(self, message: Any, make_request: Any) -> None:
        ctx = self.ctx
        try:
            body = message.decode()
        except Exception as exc:
            return self._malformed(message, None, MalformedMessage(f"undecodable body: {exc}"))
        try:
            job_id, batch_id, spec = decode_body(body)
        except MalformedMessage as exc:
            return self._malformed(message, body, exc)
        if spec.model != ctx.served_model:
            # A forged or misrouted message: this worker runs only the model it serves.
            self.log.error("message for another model refused", job_id=job_id, batch_id=batch_id,
                           model=spec.model[:64], serves=ctx.served_model)
            return self._ack_message(message, job_id)
        request = make_request()
        d = Delivery(job_id, batch_id, spec, time.monotonic(), request=request, message=message)
        # Noted for the held hash (written at the end of this loop turn, before any batch can start): if this
        # worker dies, the sweep hands it back; dying before the write leaves an orphan the sweep restores too.
        self._held(job_id, message.delivery_tag)
        worker_state.task_reserved(request)
        self._event(request, "task-received", name=request.name, args=request.argsrepr,
                    kwargs=request.kwargsrepr, root_id=request.root_id, parent_id=request.parent_id, retries=0)
        # No check of Celery's revoked set here: a revoke was recorded as a cancellation when it arrived
        # (_apply_revokes), so the claim skips the job; and a job resubmitted after its batch was cancelled
        # (same job id, queued again) must run, however long ago its earlier self was revoked.
        ctx.batcher.add(d)
        self.pump()

    def _malformed(self, message: Any, body: Any, exc: MalformedMessage) -> None:
        """A message that is not a valid job: fail the job it names, only if that job belongs to the batch
        the message names; never raise."""
        job_id, batch_id = named_ids(body)
        self.ctx.malformed(job_id, batch_id, exc)
        self._ack_message(message, job_id)

    def _ack_message(self, message: Any, job_id: str | None) -> None:
        try:
            if not message.acknowledged:
                message.ack()
        except Exception as exc:  # a channel closed by a lost connection: kombu redelivers the message
            self.log.warning("could not acknowledge a message", job_id=job_id, error=repr(exc))
        # Not held any more either way: if kombu could not restore it (Redis refusing writes), the sweep
        # restores it as an orphan instead of leaving it to the visibility timeout.
        if job_id:
            self._held(job_id, None)

    def _held(self, job_id: str, tag: str | None) -> None:
        if tag is None:
            self._held_add.pop(job_id, None)
            self._held_del.add(job_id)
        else:
            self._held_del.discard(job_id)
            self._held_add[job_id] = tag
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._held_flush_due and self.hub is not None:
            self._held_flush_due = True
            self.hub.call_later(INTAKE_FLUSH_S, self.flush_intake)

    def flush_intake(self) -> None:
        """The gathered held-hash writes, then the gathered task events (Celery publishes them together at the
        end of this loop turn)."""
        self.flush_held()
        self._send_events()

    def publish_events(self) -> None:
        """Publish what Celery's event dispatcher holds now (it does so itself at the end of each loop turn)."""
        try:
            if self._eventer is not None:
                self._eventer.flush()
        except Exception as exc:
            self.log.warning("could not send the last task events", error=repr(exc))

    def _event(self, request: Any, type_: str, **fields: Any) -> None:
        """A task event, sent with the next flush and stamped now (Celery keeps a given timestamp)."""
        fields["timestamp"] = time.time()
        self._events.append((request, type_, fields))
        if self.hub is None:  # not on the loop (stopping): at once, in order
            self._send_events()
        else:
            self._schedule_flush()

    def _send_events(self) -> None:
        pending, self._events = self._events, []
        for request, type_, fields in pending:
            request.send_event(type_, **fields)

    def flush_held(self) -> None:
        self._held_flush_due = False
        add, self._held_add = self._held_add, {}
        drop, self._held_del = self._held_del, set()
        if not add and not drop:
            return
        key = keys.worker_held(self.ctx.worker_id)
        pipe = self.ctx.redis.pipeline(transaction=False)
        if add:
            pipe.hset(key, mapping=add)
        if drop:
            pipe.hdel(key, *drop)
        try:
            pipe.execute()
        except Exception as exc:  # Redis away or refusing writes: keep them for the next turn
            for j, t in add.items():
                self._held_add.setdefault(j, t)
            self._held_del |= drop - set(self._held_add)
            self._retry_log.warning("could not update the held hash; retrying", error=repr(exc))
            if self.hub is not None and not self._held_flush_due:
                self._held_flush_due = True
                self.hub.call_later(1.0, self.flush_intake)

    # --- settling (these run on the loop thread; other threads call them through ctx.loop) ----------

    def settle(self, d: Delivery, *, ack: bool = True) -> None:
        if d.settled:
            return
        d.settled = True
        if d.request is not None:
            worker_state.task_ready(d.request)
            d.request.acknowledged = True
        if d.message is not None:
            if ack:
                self._ack_message(d.message, d.job_id)
            else:
                try:
                    d.message.reject(requeue=True)
                except Exception as exc:  # a closed channel: kombu redelivers it (or the sweep, see above)
                    self.log.warning("could not hand a message back", job_id=d.job_id, error=repr(exc))
                self._held(d.job_id, None)

    def on_started(self, deliveries: Sequence[Delivery]) -> None:
        now = time.time()
        for d in deliveries:
            req = d.request
            if req is None:
                continue
            req.worker_pid = os.getpid()
            req.time_start = now
            worker_state.task_accepted(req)
            self._event(req, "task-started")

    def on_finished(self, d: Delivery, status: str, info: dict[str, Any]) -> None:
        req = d.request
        if req is not None and not d.settled:
            if status == "succeeded":
                runtime = time.time() - (req.time_start or time.time())
                self._event(req, "task-succeeded", result=repr(info.get("url")), runtime=runtime)
            elif status == "failed":
                self._event(req, "task-failed", exception=str(info.get("error"))[:500], traceback="")
            elif status == "cancelled":
                self._event(req, "task-revoked", terminated=False, signum=None, expired=False)
            else:  # skipped (ended elsewhere) or dropped (forged, expired)
                previous = info.get("previous") or ""
                if previous == "succeeded":
                    self._event(req, "task-succeeded", result="'already succeeded'", runtime=0.0)
                elif previous == "cancelled":
                    self._event(req, "task-revoked", terminated=False, signum=None, expired=False)
                else:
                    self._event(req, "task-failed", exception=f"not run: {previous or status}", traceback="")
            if status == "succeeded":
                worker_state.task_ready(req, successful=True)
        self.settle(d)
        self.pump()

    def on_handback(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            if d.request is not None and not d.settled:
                self._event(d.request, "task-rejected", requeue=True)
            self.settle(d, ack=False)
        self.pump()

    def on_retry_later(self, deliveries: Sequence[Delivery], exc: BaseException) -> None:
        wait = self._retry.next()
        self._retry_log.error("batch could not start (Redis error); jobs kept, trying again",
                              error=repr(exc), retry_in_s=wait)
        for d in deliveries:
            d.not_before = time.monotonic() + wait
            self.ctx.batcher.add(d)
        self.pump()

    def on_defer(self, d: Delivery) -> None:
        self.ctx.batcher.add(d)
        self.pump()

    # --- the loop ----------------------------------------------------------------------------------

    def start(self, hub: Any) -> None:
        self.hub = hub
        self.draining = False
        self.ctx.post.resume()
        hub.add_reader(self.ctx.loop.rfd, self._on_wake)
        self._tick = hub.call_repeatedly(TICK_S, self._on_tick)
        hub.call_soon(self.pump)

    def _on_wake(self, *_: Any) -> None:
        self.pump()

    def _on_tick(self) -> None:
        try:
            self._apply_revokes()
            self.ctx.check_engine()
        except Exception as exc:  # a Redis hiccup must not stop the loop's timer
            self.log.warning("periodic check failed", error=repr(exc))
        self.pump()

    def pump(self) -> None:
        """Carry out what other threads asked for, then start the next batch if the engine has room."""
        if self._pumping or self.hub is None:
            return
        self._pumping = True
        try:
            self.ctx.loop.drain()
            ctx = self.ctx
            while (not self.draining and ctx.engine_thread.can_take()
                   and ctx.post.backlog() <= ctx.post.threads
                   and (ctx.options.overlap or (ctx.engine_thread.idle() and ctx.post.backlog() == 0))):
                # While the engine is busy a partial group keeps filling (for up to PARTIAL_HOLD_RUNS runs of its
                # shape) instead of taking the hand-off slot; once the engine is free the oldest due group goes.
                nxt = ctx.batcher.pop_ready(partial_wait=None if ctx.engine_thread.idle() else self._partial_wait)
                if nxt is None:
                    break
                key, group = nxt
                self.flush_intake()  # every job of a batch is in the held hash before its claim
                now = time.time()
                for d in group:
                    d.extra["dispatched_at"] = now
                ctx.engine_thread.submit(key, group)
                self._retry.n = 0
            self.ctx.loop.drain()
        finally:
            self._pumping = False
        self._arm_deadline()

    def _partial_wait(self, key: Any) -> float:
        """How long a partial group of ``key`` may keep filling while the engine is busy: a few of its runs (from
        this worker's measured service times; the slowest known shape's before its own is measured)."""
        service = self.ctx.engine_thread.service
        per = service.per_image(key)
        if per is None:
            per = max(service.snapshot().values(), default=0.0)
        return PARTIAL_HOLD_RUNS * per * self.ctx.batcher.max_batch

    def _arm_deadline(self) -> None:
        busy = not self.ctx.engine_thread.idle()
        deadline = self.ctx.batcher.next_deadline(self._partial_wait if busy else None)
        if deadline is None or self.draining or self.hub is None:
            return
        if self._deadline is None or deadline < self._deadline_at - 1e-4:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline_at = deadline
            self._deadline = self.hub.call_later(max(0.0, deadline - time.monotonic()), self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        self.pump()

    def _apply_revokes(self) -> None:
        """Revokes that arrived by remote control: record and announce the cancellation at once (the job may
        sit in Redis for hours before a worker sees its message), and drop buffered copies."""
        new = [i for i in worker_state.revoked if i not in self._seen_revoked]
        if not new:
            return
        self._seen_revoked.update(new)
        buffered = self.ctx.batcher.remove(set(new))
        self._cancel_revoked(new, buffered)

    def _cancel_revoked(self, job_ids: list[str], buffered: list[Delivery]) -> None:
        from sdfleet.cancel import cancel_jobs

        cancel_jobs(self.ctx.store, self.ctx.notifier, job_ids, "revoked", self.log)
        states = {rec.job_id: rec.status for rec in self.ctx.store.jobs([d.job_id for d in buffered]) if rec}
        for d in buffered:
            if states.get(d.job_id) in TERMINAL or states.get(d.job_id) is None:
                self.on_finished(d, "cancelled", {})
            else:  # revoked while running elsewhere: not this worker's to settle; hand its copy back
                self.ctx.batcher.add(d)

    def stop(self, *, restarting: bool = False) -> None:
        """Drain: start no new batch, let the engine and post-processing finish what they have, then settle.

        ``restarting``: Celery is only restarting its consumer after a lost connection. Then nothing is waited
        for (the loop must get back to reconnecting): the engine and post-processing go on, their outcomes are
        recorded, and the messages of this channel come back through kombu (a redelivered finished job is
        acknowledged without running again).
        """
        if self.hub is None:
            return
        ctx = self.ctx
        self.draining = True
        # Before any wait: the loop is blocked in here, so the flush timer cannot fire, and a held note written
        # only after a long drain would let the sweep take this live worker's messages for orphans.
        try:
            self.flush_intake()
        except Exception as exc:
            self.log.warning("could not update the held hash at stop", error=repr(exc))
        for timer in (self._deadline, self._tick):
            if timer is not None:
                timer.cancel()
        self._deadline = self._tick = None
        waiting = ctx.engine_thread.take_back()
        deadline = time.monotonic() + (0.0 if restarting else ctx.settings.drain_timeout_s)
        while not ctx.engine_thread.idle() and time.monotonic() < deadline:
            ctx.loop.drain()
            time.sleep(0.02)
        if not restarting:
            ctx.post.wait(timeout=max(1.0, deadline - time.monotonic()))
        ctx.loop.drain()
        unstarted = list(ctx.batcher) + (waiting[1] if waiting else [])
        ctx.batcher.groups.clear()
        for d in unstarted:
            # Left to kombu (below); if its restore fails (Redis refusing writes), the sweep restores them
            # as orphans, which it does only for messages no live worker holds.
            self._held(d.job_id, None)
        try:
            self.flush_intake()
        except Exception as exc:
            self.log.warning("could not update the held hash at stop", error=repr(exc))
        self.publish_events()  # the loop has stopped: nothing else publishes what was just sent
        if unstarted:
            # Left unacknowledged on purpose: kombu restores this channel's unacknowledged messages to the
            # head of their queue when the channel closes (and the sweep does if this process dies first).
            self.log.info("draining: unstarted jobs go back to the queue", jobs=len(unstarted))
            for d in unstarted:
                if d.request is not None:
                    worker_state.task_ready(d.request)
        try:
            self.hub.remove_reader(ctx.loop.rfd)
        except Exception:
            pass
        self.hub = None


class GenerationStep(bootsteps.StartStopStep):
    """Runs the worker's :class:`GenerationConsumer` on Celery's event loop (a consumer bootstep)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent, generation_consumer: GenerationConsumer | None = None, **kwargs):
        # ``generation_consumer`` is passed to ``app.Worker``; Celery hands worker options to every step.
        super().__init__(parent, **kwargs)
        self.consumer = generation_consumer
        self.starts = 0

    def start(self, c):
        consumer = self.consumer
        assert consumer is not None and c.hub is not None, "the generation consumer needs Celery's event loop"
        self.starts += 1
        if self.starts > 1:
            # After a lost connection kombu redelivers what this worker held; the buffer is stale.
            consumer.ctx.batcher.groups.clear()
        consumer.start(c.hub)

    def stop(self, c):
        if self.consumer is not None:
            # The worker's own blueprint still runs while Celery restarts the consumer after a lost connection;
            # at a shutdown it has left RUN already.
            restarting = getattr(getattr(c, "controller", None), "blueprint", None) is not None and \
                c.controller.blueprint.state == bootsteps.RUN
            self.consumer.stop(restarting=restarting)

    def shutdown(self, c):
        if self.consumer is not None:
            self.consumer.stop()
