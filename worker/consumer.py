"""The generation queue's consumer: messages claimed in bulk, driven by Celery's event loop.

Celery's own consumer takes one message at a time: kombu pops it, records it as unacknowledged, wraps it
in a message object, Celery builds a request and calls the task strategy. On a 2-core machine that path
alone drained a no-op task at about the rate the worker needs for its real work (docs/PERFORMANCE.md).
So the GPU worker stays a Celery worker (solo pool; Celery's signal handling, bootsteps, reconnects and
event loop) but Celery consumes no queue: :class:`GenerationStep` claims the generation queue's messages
itself, up to the free prefetch room in one round trip, into kombu's own bookkeeping of unacknowledged
messages (:class:`sdfleet.unacked.BulkQueue`), and hands them to the batcher.

Everything runs on the event-loop thread, driven by events (an idle worker does one blocking BLMOVE and
one claim a second, nothing more):
- acknowledgements queued by the post-processing threads wake the loop: they free prefetch room, and they
  are settled in the same round trip as the next claim;
- a claim that comes back short means the queue is empty: then a BLMOVE of the queue onto itself (which
  moves nothing) blocks on a connection of its own, watched by the loop, and returns as soon as a message
  arrives;
- a timer at the earliest max-wait deadline of the groups being filled runs them when it expires.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import redis
from celery import bootsteps

from sdfleet.errors import MalformedMessage
from sdfleet.unacked import BulkQueue
from worker.intake import Delivery, decode

if TYPE_CHECKING:
    from worker.app import WorkerContext

# An armed watch returns at least this often, so a wake-up lost with a dead connection costs a second.
WATCH_TIMEOUT_S = 1
# A watch still unanswered this long after its timeout is on a dead connection (see QueueWatch.arm).
WATCH_GRACE_S = 2
# After a Redis error that is not a lost connection (READONLY in a failover, OOM, BUSY), claim again after this.
RETRY_AFTER_ERROR_S = 1.0


@dataclass(slots=True)
class Claim:
    """One claimed message: what acknowledging it or handing it back needs."""

    tag: str
    held_id: str
    raw: str
    settled: bool = False


class QueueWatch:
    """Waits for an item on the queue without taking it: BLMOVE queue queue RIGHT RIGHT moves nothing."""

    def __init__(self, client: redis.Redis, queue: str, on_ready: Any, log: Any):
        self.pool = client.connection_pool
        self.queue = queue
        self.on_ready = on_ready
        self.log = log
        self.hub: Any = None
        self.conn: Any = None
        self.fd: int | None = None
        self.armed = False
        self._arms = 0
        self._retry_at = 0.0

    def start(self, hub: Any) -> None:
        self.hub = hub
        self._retry_at = 0.0
        self.connect()

    def connect(self) -> bool:
        """Connect and register with the loop, unless connected already or last tried under a second ago.

        Registered for as long as the connection lives, armed or not: the loop polls (and other threads can
        wake it) only while it has a reader; without one it sleeps up to 0.1 s at a time. A connection
        closed by the server reads as readable.
        """
        if self.conn is not None:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + WATCH_TIMEOUT_S
        try:
            self.conn = self.pool.make_connection()
            self.conn.connect()
            self.fd = self.conn._sock.fileno()
            self.hub.add_reader(self.fd, self._on_readable)
        except (redis.RedisError, OSError) as exc:
            self.log.warning("could not watch the queue", error=repr(exc))
            self.stop()
            return False
        return True

    def arm(self) -> bool:
        """Start waiting (no-op if already waiting). False if Redis could not be reached."""
        if self.armed:
            return True
        if not self.connect():
            return False
        try:
            self.conn.send_command("BLMOVE", self.queue, self.queue, "RIGHT", "RIGHT", WATCH_TIMEOUT_S)
        except (redis.RedisError, OSError) as exc:
            self.log.warning("could not watch the queue", error=repr(exc))
            self.stop()
            return False
        self.armed = True
        # A BLMOVE answers within WATCH_TIMEOUT_S; one that does not is on a half-open connection (a dropped
        # NAT entry, a failover) that would never become readable: drop it and claim again.
        self._arms += 1
        self.hub.call_later(WATCH_TIMEOUT_S + WATCH_GRACE_S, self._check_answered, self._arms)
        return True

    def _check_answered(self, arm: int) -> None:
        if self.armed and arm == self._arms:
            self.log.warning("queue watch got no answer; reconnecting")
            self.stop()
            self.on_ready()

    def _on_readable(self) -> None:
        try:
            self.conn.read_response()  # the item (left in place) or nil after the timeout
        except (redis.RedisError, OSError, AttributeError) as exc:
            self.log.warning("queue watch connection lost", error=repr(exc))
            self.stop()
        self.armed = False
        self.on_ready()

    def stop(self) -> None:
        self.armed = False
        if self.fd is not None and self.hub is not None:
            self.hub.remove_reader(self.fd)
        self.fd = None
        if self.conn is not None:
            self.conn.disconnect()
            self.conn = None


class GenerationConsumer:
    """Claims, acknowledges and hands back the generation queue's messages for one worker process."""

    def __init__(self, ctx: WorkerContext, queue: BulkQueue, prefetch: int):
        self.ctx = ctx
        self.queue = queue
        self.prefetch = prefetch
        # Claim in batch-sized chunks: one round trip per batch, not per acknowledgement.
        self.claim_min = min(ctx.options.max_batch, prefetch)
        self.watch = QueueWatch(ctx.redis, queue.queue, self._on_queue_ready, ctx.log)
        self.outstanding = 0  # claimed and not yet acknowledged or handed back
        self.acks: list[tuple[str, str]] = []
        self.requeues: list[tuple[str, str, str]] = []
        self.queue_empty = False
        self.running = False
        self.hub: Any = None
        self._loop_thread = 0
        self._pumping = False
        self._again = False
        self._deadline: Any = None  # the timer entry for the earliest max-wait deadline, and when it is due
        self._deadline_at = 0.0

    # --- lifecycle (GenerationStep) ----------------------------------------------------------------

    def start(self, hub: Any) -> None:
        self.hub = hub
        self._loop_thread = threading.get_ident()
        self.running = True
        self.queue_empty = False
        # Whatever was claimed before was settled by stop() or is handed back by reclaim_own().
        self.outstanding = 0
        self.watch.start(hub)
        self.ctx.acks.on_put = self._wake
        hub.call_soon(self.pump)

    def stop(self) -> None:
        """Stop claiming; unstarted messages go back to the head of the queue, in order, at once (other
        workers need not wait for this one's uploads); then uploads complete and are acknowledged."""
        if self.hub is None:
            return
        ctx = self.ctx
        self.running = False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.watch.stop()
        unstarted = sorted((d for group in ctx.batcher.groups.values() for d in group), key=lambda d: d.received_at)
        ctx.batcher.groups.clear()
        for d in unstarted:
            d.reject(True)
        self._settle_at_stop()
        ctx.post.wait(timeout=600)
        ctx.acks.drain()
        self._settle_at_stop()
        ctx.acks.on_put = None
        self.hub = None

    def _settle_at_stop(self) -> None:
        try:
            self._settle(claim=0)
        except redis.RedisError as exc:
            # Still unacknowledged in Redis: the janitor (or this worker id's next start) hands them back.
            self.ctx.log.warning("could not settle acknowledgements at stop", error=repr(exc))

    # --- the loop ----------------------------------------------------------------------------------

    def _wake(self) -> None:
        """Acknowledgements are waiting (called from any thread)."""
        hub = self.hub
        if self._pumping and threading.get_ident() == self._loop_thread:
            # The runner's own (jobs skipped at start): the hub would only look at call_soon after its next poll.
            self._again = True
        elif hub is not None:
            hub.call_soon(self.pump)

    def _on_queue_ready(self) -> None:
        self.queue_empty = False
        self.pump()

    def _on_deadline(self) -> None:
        self._deadline = None
        self.pump()

    def pump(self) -> None:
        """Settle acknowledgements, claim what there is room for, run the groups that are ready; again while
        that freed room at once. Then wait for the earliest max-wait deadline, if a group is being filled.

        A lost connection propagates (Celery restarts the consumer, which hands back what this worker
        holds). Any other Redis error (READONLY during a failover, OOM, BUSY) is logged and the pump runs
        again a second later: called from a timer, kombu would only log it, and nothing would wake the loop.
        """
        if not self.running or self._pumping:
            return
        self._pumping = True
        try:
            self._again = True
            while self._again and self.running:
                self._again = False
                self._pump_once()
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception as exc:
            self.ctx.log.error("could not claim or settle; trying again shortly", error=repr(exc))
            if self.running and self.hub is not None:
                self.hub.call_later(RETRY_AFTER_ERROR_S, self.pump)
        finally:
            self._pumping = False
            self._arm_deadline()

    def _arm_deadline(self) -> None:
        deadline = self.ctx.batcher.next_deadline()
        if deadline is None or not self.running or self.hub is None:
            return
        if self._deadline is None or deadline < self._deadline_at:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline_at = deadline
            self._deadline = self.hub.call_later(max(0.0, deadline - time.monotonic()), self._on_deadline)

    def _pump_once(self) -> None:
        ctx = self.ctx
        ctx.acks.drain()
        self.watch.connect()  # after a lost connection, so that the loop polls again
        room = self.prefetch - self.outstanding
        claim = room if not self.queue_empty and (room >= self.claim_min or self.outstanding == 0) else 0
        if claim or self.acks or self.requeues:
            got = self._settle(claim)
            if claim and got < claim:
                self.queue_empty = True
                if not self.watch.arm():  # Redis away: claim again in a second (or fail over to Celery's restart)
                    self.queue_empty = False
                    self.hub.call_later(WATCH_TIMEOUT_S, self.pump)
        for key, group in ctx.batcher.ready():
            try:
                ctx.runner.run(key, group)
            except Exception:
                # Bookkeeping failed (Redis down mid-claim, say): hand the messages back untouched.
                ctx.log.exception("batch could not run; messages returned to the queue", key=str(key))
                for d in group:
                    ctx.acks.put(d.reject, True)

    def _settle(self, claim: int) -> int:
        """Hand back what was rejected, settle acknowledgements and claim up to ``claim`` messages."""
        if self.requeues:
            requeues, self.requeues = self.requeues, []
            self.queue.requeue(requeues)
        acks, self.acks = self.acks, []
        claimed = self.queue.claim(claim, acks) if claim or acks else []
        for tag, raw in claimed:
            self._receive(tag, raw)
        return len(claimed)

    def _receive(self, tag: str, raw: str) -> None:
        ctx = self.ctx
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if not tag:
            # Off the queue and never recorded: nothing could ever run it, so dropping it loses nothing.
            ctx.log.error("dropped an unreadable item from the queue", item=raw[:80])
            return
        headers = payload.get("headers") if isinstance(payload, dict) else None
        held_id = headers.get("id") if isinstance(headers, dict) else None
        claim = Claim(tag, held_id if isinstance(held_id, str) else "", raw)
        self.outstanding += 1
        try:
            job_id, batch_id, spec = decode(payload)
        except MalformedMessage as exc:
            ctx.malformed(payload, exc)
            self._ack(claim)
            return
        ctx.batcher.add(Delivery(job_id, batch_id, spec, time.monotonic(), ack=partial(self._ack, claim),
                                 reject=partial(self._reject, claim)))

    def _ack(self, claim: Claim) -> None:
        if not claim.settled:
            claim.settled = True
            self.outstanding -= 1
            self.acks.append((claim.tag, claim.held_id))

    def _reject(self, claim: Claim, requeue: bool) -> None:
        if not requeue:
            return self._ack(claim)
        if not claim.settled:
            claim.settled = True
            self.outstanding -= 1
            self.requeues.append((claim.tag, claim.held_id, claim.raw))


class GenerationStep(bootsteps.StartStopStep):
    """Runs the worker's :class:`GenerationConsumer` on Celery's event loop.

    Stop (SIGTERM, or a lost connection): the batch in progress has finished, uploads complete and are
    acknowledged, unstarted messages go back to the queue. After a lost connection (Redis restarted) the
    consumer starts again and first hands back whatever this worker id still holds, rather than leaving
    it to the visibility timeout.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent, generation_consumer: GenerationConsumer | None = None, **kwargs):
        # ``generation_consumer`` is passed to ``app.Worker``; Celery hands worker options to every step.
        super().__init__(parent, **kwargs)
        self.consumer = generation_consumer
        self.starts = 0
        self._restore: Any = None

    def start(self, c):
        consumer = self.consumer
        assert consumer is not None and c.hub is not None, "the generation consumer needs Celery's event loop"
        self.starts += 1
        if self.starts > 1:
            try:
                consumer.ctx.reclaim_own()
            except Exception as exc:
                consumer.ctx.log.warning("could not hand back held jobs after reconnecting", error=repr(exc))
        consumer.start(c.hub)
        # kombu's visibility-timeout restore runs only for channels that consume a queue through kombu;
        # this worker's channel consumes none, so it is scheduled here, as kombu itself would.
        channel = c.connection.default_channel
        self._restore = c.hub.call_repeatedly(
            channel.unacked_restore_interval, _restore_visible, channel, consumer.ctx.log)

    def stop(self, c):
        if self._restore is not None:
            self._restore.cancel()
            self._restore = None
        if self.consumer is not None:
            self.consumer.stop()

    def shutdown(self, c):
        self.stop(c)


def _restore_visible(channel: Any, log: Any) -> None:
    try:
        channel.qos.restore_visible(num=channel.unacked_restore_limit, interval=channel.unacked_restore_throttle)
    except redis.RedisError as exc:
        log.warning("could not restore messages past their visibility timeout", error=repr(exc))
