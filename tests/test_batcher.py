"""Batching: groups by key, never mixes keys, flushes full groups at once and others after max-wait."""

from __future__ import annotations

from sdfleet.jobs import parse_job
from worker.intake import Batcher, Delivery


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def d(clock, n, width=512, steps=4):
    spec = parse_job({"prompt": f"p{n}", "width": width, "height": 512, "steps": steps, "seed": n})
    return Delivery(f"j{n}", "b", spec, clock())


def test_full_group_flushes_immediately_and_keys_never_mix():
    clock = Clock()
    b = Batcher(max_batch=3, max_wait_ms=50, clock=clock)
    for n in range(5):
        b.add(d(clock, n, width=512 if n % 2 == 0 else 768))
        clock.t += 0.001
    ready = b.ready()
    assert [(k.width, [x.job_id for x in g]) for k, g in ready] == [(512, ["j0", "j2", "j4"])]
    assert len(b) == 2
    clock.t += 0.060
    ready = b.ready()
    assert [(k.width, [x.job_id for x in g]) for k, g in ready] == [(768, ["j1", "j3"])]
    for key, group in ready:
        assert all(x.key == key for x in group)


def test_waits_for_max_wait_then_oldest_group_first():
    clock = Clock()
    b = Batcher(max_batch=8, max_wait_ms=50, clock=clock)
    b.add(d(clock, 1, steps=8))
    clock.t += 0.010
    b.add(d(clock, 2, steps=4))
    assert b.ready() == []
    assert abs(b.next_deadline() - (100.0 + 0.050)) < 1e-9
    clock.t += 0.045
    assert [g[0].job_id for _, g in b.ready()] == ["j1"]
    clock.t += 0.010
    assert [g[0].job_id for _, g in b.ready()] == ["j2"]


def test_force_flushes_everything_oldest_first():
    clock = Clock()
    b = Batcher(max_batch=8, max_wait_ms=1000, clock=clock)
    for n, steps in enumerate([4, 8, 4, 12]):
        b.add(d(clock, n, steps=steps))
        clock.t += 0.001
    ready = b.ready(force=True)
    assert [[x.job_id for x in g] for _, g in ready] == [["j0", "j2"], ["j1"], ["j3"]]
    assert len(b) == 0


def test_while_the_engine_is_busy_a_partial_group_keeps_filling_for_a_while():
    clock = Clock()
    b = Batcher(max_batch=3, max_wait_ms=50, clock=clock)
    hold = lambda key: 1.0  # noqa: E731  (a few runs of this shape)
    for n in range(2):
        b.add(d(clock, n))
    clock.t += 0.060  # past max wait, but only 2 of 3
    assert b.pop_ready(partial_wait=hold) is None
    b.add(d(clock, 2))
    key, group = b.pop_ready(partial_wait=hold)
    assert [x.job_id for x in group] == ["j0", "j1", "j2"]
    b.add(d(clock, 3))
    clock.t += 0.060
    assert b.pop_ready(partial_wait=hold) is None
    clock.t += 1.0  # held for its runs: it goes even though the engine is busy
    assert [x.job_id for x in b.pop_ready(partial_wait=hold)[1]] == ["j3"]
    b.add(d(clock, 4))
    clock.t += 0.060
    assert [x.job_id for x in b.pop_ready()[1]] == ["j4"]  # the engine is free: the partial group goes
