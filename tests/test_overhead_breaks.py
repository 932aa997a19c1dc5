"""Breaks found reviewing the worker-overhead changes, fixed: the gathered held-hash notes are written before a
drain waits (the loop is blocked in stop(), so the 20 ms flush timer cannot fire; a note written only after a
long drain would let the sweep take a live worker's messages for orphans), and while the busy-engine hold keeps
a partial group filling, the deadline timer is armed at the end of the hold (it used to spin at delay 0, which
made kombu's hub poll with a 1 s timeout and delayed the 20 ms flush and the 0.5 s tick to about 1 s).

Real ``GenerationConsumer``, ``Batcher`` and ``LoopCalls``; a recording stand-in for kombu's hub and for the
Redis client. No Redis, no Celery.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from sdfleet.jobs import parse_job
from tests.test_batching_starvation import NullLog, Timer
from worker.consumer import GenerationConsumer
from worker.engine_thread import ServiceTimes
from worker.intake import Batcher, Delivery, LoopCalls


class RecordingHub:
    """Enough of kombu's hub: timers are recorded (delay, callback), never fired by themselves."""

    def __init__(self):
        self.later: list[tuple[float, object]] = []

    def call_soon(self, fn, *args):
        return Timer()

    def call_later(self, delay, fn, *args):
        self.later.append((delay, fn))
        return Timer()

    def remove_reader(self, fd):
        pass


class RecordingRedis:
    """The worker's held hash as the consumer's pipelines leave it."""

    def __init__(self):
        self.held: dict[str, str] = {}

    def pipeline(self, transaction=False):
        r = self

        class Pipe:
            def __init__(self):
                self.ops = []

            def hset(self, key, mapping):
                self.ops.append(lambda: r.held.update(mapping))

            def hdel(self, key, *fields):
                self.ops.append(lambda: [r.held.pop(f, None) for f in fields])

            def execute(self):
                for op in self.ops:
                    op()

        return Pipe()


def spec(width=768):
    return parse_job({"prompt": "p", "width": width, "height": 512, "steps": 4, "seed": 1})


def context(engine_thread, redis=None, **extra):
    return SimpleNamespace(loop=LoopCalls(), batcher=Batcher(max_batch=4, max_wait_ms=50),
                           post=SimpleNamespace(backlog=lambda: 0, threads=2, wait=lambda timeout=None: True),
                           options=SimpleNamespace(overlap=True), log=NullLog(), redis=redis or RecordingRedis(),
                           worker_id="w", engine_thread=engine_thread, **extra)


def test_stop_writes_the_gathered_held_notes_before_it_waits_for_the_engine():
    seen: list[dict[str, str]] = []
    redis = RecordingRedis()

    def idle():
        seen.append(dict(redis.held))  # what the sweep would see while this worker drains
        return len(seen) > 3

    engine = SimpleNamespace(idle=idle, can_take=lambda: False, take_back=lambda: None, service=ServiceTimes())
    ctx = context(engine, redis, settings=SimpleNamespace(drain_timeout_s=5.0))
    consumer = GenerationConsumer(ctx)
    consumer.hub = RecordingHub()
    # A message received a moment before SIGTERM, as _receive leaves it: buffered, its note gathered.
    ctx.batcher.add(Delivery("j1", "b", spec(), time.monotonic()))
    consumer._held("j1", "tag-1")
    assert redis.held == {}
    try:
        consumer.stop()
    finally:
        ctx.loop.close()
    assert seen, "stop() did not wait for the engine"
    assert seen[0].get("j1") == "tag-1", f"held hash while draining: {seen[0]}"


def test_a_held_partial_group_arms_the_deadline_at_the_end_of_its_hold():
    service = ServiceTimes()
    service.observe(spec().key, 4, 3.0)  # a run of this shape takes 3 s: the hold is 2 x 3 s
    submitted = []
    engine = SimpleNamespace(idle=lambda: False, can_take=lambda: True, service=service,
                             submit=lambda key, group: submitted.append(group))
    ctx = context(engine)
    consumer = GenerationConsumer(ctx)
    hub = consumer.hub = RecordingHub()
    try:
        # One job of the shape, past max wait (50 ms), well inside its hold; the engine is busy.
        ctx.batcher.add(Delivery("j1", "b", spec(), time.monotonic() - 0.2))
        consumer.pump()
        assert not submitted  # held: it keeps filling while the engine is busy
        deadlines = [delay for delay, fn in hub.later if fn == consumer._on_deadline]
        assert deadlines, "no deadline armed for the buffered group"
        # Nothing can go before the hold ends (about 5.8 s from now): a timer due at once only spins.
        assert deadlines[-1] > 1.0, f"deadline armed {deadlines[-1]:.3f} s ahead while the hold has ~5.8 s left"
    finally:
        ctx.loop.close()
