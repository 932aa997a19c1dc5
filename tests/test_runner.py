"""The batch runner against a real Redis and file storage, with an engine that runs out of memory.

The engine here is a stand-in for what cannot happen on a CPU test machine (a CUDA OOM on a batch
larger than the card holds); everything around it is real.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

import numpy as np
import pytest
import redis
import torch

from producer.submit import submit
from sdfleet import logs
from sdfleet.jobs import BatchKey, parse_job
from sdfleet.queue import make_app
from sdfleet.settings import Settings
from sdfleet.state import JobStore
from sdfleet.storage import StorageFactory
from worker.engine.base import Engine, GenerationResult
from worker.intake import AckQueue, Delivery
from worker.postprocess import PostProcessor
from worker.runner import BatchRunner


class OomAbove(Engine):
    """Raises CUDA's OOM error for batches larger than ``limit``; fails jobs whose prompt is 'boom'."""

    model_name = "null"

    def __init__(self, limit: int):
        self.limit = limit
        self.calls: list[int] = []

    def load(self):
        pass

    def generate(self, key: BatchKey, requests):
        self.calls.append(len(requests))
        if len(requests) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if any(r.prompt == "boom" for r in requests):
            raise RuntimeError("kernel failed")
        return GenerationResult([np.full((8, 8, 3), r.seed % 200, np.uint8) for r in requests], {"engine_s": 0.0})


@pytest.fixture
def setup(redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(client)
    settings = Settings(redis_url=redis_url)
    posts: list[PostProcessor] = []

    def make(prompts, limit):
        specs = [parse_job({"prompt": p, "model": "null", "width": 256, "height": 256, "seed": i})
                 for i, p in enumerate(prompts)]
        res = submit(specs, store=store, app=make_app(settings), storage=StorageFactory(),
                     default_out=f"file://{tmp_path}", batch_name="oom")
        ids = store.batch_job_ids(res.batch_id)
        acks = AckQueue()
        acked: list[str] = []
        finished: list[tuple[str, str]] = []
        log = logs.get("test")
        post = PostProcessor(store=store, storage=StorageFactory(), acks=acks, worker_id="w1", engine_info={},
                             on_finished=lambda d, status, tr: finished.append((d.job_id, status)), log=log)
        posts.append(post)
        engine = OomAbove(limit)
        runner = BatchRunner(engine=engine, store=store, post=post, acks=acks, worker_id="w1", max_attempts=3, log=log)
        deliveries = [Delivery(jid, "oom", s.with_seed(), 0.0, ack=lambda j=jid: acked.append(j),
                               reject=lambda requeue: None)
                      for jid, s in zip(ids, [parse_job(json.loads(store.job(j).fields["spec"])) for j in ids])]
        return store, runner, post, acks, engine, deliveries, acked, finished

    yield make
    for post in posts:
        post.shutdown()  # its storing process too


def test_oom_splits_in_halves_and_every_job_succeeds(setup):
    store, runner, post, acks, engine, deliveries, acked, finished = setup([f"p{i}" for i in range(8)], limit=2)
    runner.run(deliveries[0].key, deliveries)
    post.wait(10)
    acks.drain()
    assert engine.calls == [8, 4, 2, 2, 4, 2, 2]
    assert sorted(acked) == sorted(d.job_id for d in deliveries)
    assert store.counts("oom")["succeeded"] == 8
    assert sorted(s for _, s in finished) == ["succeeded"] * 8


def test_a_failing_job_does_not_fail_its_batch_mates(setup):
    store, runner, post, acks, engine, deliveries, acked, finished = setup(["a", "boom", "c"], limit=8)
    runner.run(deliveries[0].key, deliveries)
    post.wait(10)
    acks.drain()
    statuses = {store.job(d.job_id).fields["spec"] and json.loads(store.job(d.job_id).fields["spec"])["prompt"]:
                store.job(d.job_id).status for d in deliveries}
    assert statuses == {"a": "succeeded", "boom": "failed", "c": "succeeded"}
    err = store.job(deliveries[1].job_id).error
    assert "engine error" in err and "kernel failed" in err
    assert len(acked) == 3


def test_oom_of_a_single_job_fails_it_with_a_reason(setup):
    store, runner, post, acks, engine, deliveries, acked, finished = setup(["a"], limit=0)
    runner.run(deliveries[0].key, deliveries)
    post.wait(10)
    acks.drain()
    assert store.job(deliveries[0].job_id).status == "failed"
    assert "out of memory" in store.job(deliveries[0].job_id).error


def test_claim_skips_finished_and_poisons_after_max_attempts(setup):
    store, runner, post, acks, engine, deliveries, acked, finished = setup(["a", "b"], limit=8)
    a, b = deliveries
    # b "crashed" three workers already: its fourth start fails it as poison.
    for _ in range(3):
        assert store.start(b.job_id, "dead", 3).applied
    runner.run(a.key, [a, b])
    post.wait(10)
    acks.drain()
    assert store.job(a.job_id).status == "succeeded"
    rec = store.job(b.job_id)
    assert rec.status == "failed" and "poison" in rec.error
    acked.clear()
    calls = list(engine.calls)
    runner.run(a.key, [a])  # a redelivered message of a finished job: acknowledged, not rerun
    acks.drain()
    assert acked == [a.job_id] and engine.calls == calls


def test_only_the_run_in_the_engine_is_charged_an_attempt(setup):
    # A run that has left the engine is not blamed when a later run kills the worker, even while its jobs
    # are still being stored: its attempt is taken back when the next run starts.
    store, runner, post, acks, engine, deliveries, acked, finished = setup(["a", "b", "c"], limit=8)
    a, b, c = deliveries
    runner.run(a.key, [a])
    assert int(store.job(a.job_id).fields["charged"]) == 1  # in the engine (or uploading)
    runner.run(b.key, [b])  # b enters the engine: a's charge is taken back, b's counts
    assert int(store.job(b.job_id).fields["charged"]) == 1
    post.wait(10)
    assert int(store.job(a.job_id).fields["charged"]) == 0
    assert int(store.job(a.job_id).fields["attempts"]) == 1  # it did start once
    # only jobs this worker still runs are touched: not another worker's, not finished ones
    assert store.start(c.job_id, "other", 3).applied
    assert store.release_attempts([c.job_id, a.job_id], "w1") == 0
    assert int(store.job(c.job_id).fields["charged"]) == 1


def test_post_processing_that_fails_hands_every_job_back(setup):
    store, runner, post, acks, engine, deliveries, acked, finished = setup(["a", "b"], limit=8)
    rejected: list[str] = []
    for d in deliveries:
        d.reject = lambda requeue, j=d.job_id: rejected.append(j)
    bad = GenerationResult([np.zeros((8, 8, 3), np.uint8)] * 2, {})

    def fail():
        raise RuntimeError("device error surfacing at the copy")

    bad.pending = fail
    for d in deliveries:
        assert store.start(d.job_id, "w1", 3).applied
    post.submit_group(deliveries, bad)
    post.wait(10)
    acks.drain()
    assert sorted(rejected) == sorted(d.job_id for d in deliveries) and not acked
    assert {store.job(d.job_id).status for d in deliveries} == {"queued"}


def test_a_storing_process_that_dies_hands_its_run_back_and_is_replaced(setup):
    store, runner, post, acks, engine, deliveries, acked, finished = setup(["a", "b"], limit=8)
    rejected: list[tuple[str, bool]] = []
    for d in deliveries:
        d.reject = lambda requeue, j=d.job_id: rejected.append((j, requeue))
    assert post.writer.write([], []) == []  # the storing process is up
    children = multiprocessing.active_children()
    assert children
    for child in children:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    runner.run(deliveries[0].key, deliveries)
    post.wait(10)
    acks.drain()
    assert sorted(rejected) == sorted((d.job_id, True) for d in deliveries) and not acked
    for d in deliveries:  # handed back with the attempt counted: a job that kills it every time ends as poison
        rec = store.job(d.job_id)
        assert rec.status == "queued" and rec.fields["attempts"] == "1"
    runner.run(deliveries[0].key, deliveries)  # the redelivery, stored by a fresh process
    post.wait(10)
    acks.drain()
    assert sorted(acked) == sorted(d.job_id for d in deliveries)
    assert [store.job(d.job_id).status for d in deliveries] == ["succeeded", "succeeded"]


def test_results_whose_copy_is_still_running_are_waited_for_by_post_processing(setup):
    """A GPU engine returns before its device-to-host copy lands; post-processing waits for it."""
    store, runner, post, acks, engine, deliveries, acked, finished = setup(["a", "b"], limit=8)
    landed = []

    def late(key, requests):
        res = GenerationResult([np.zeros((8, 8, 3), np.uint8) for _ in requests], {})

        def finish():
            for img in res.images:
                img[:] = 7  # the copy lands
            res.timings["engine_s"] = 0.5
            landed.append(True)

        res.pending = finish
        return res

    engine.generate = late
    runner.run(deliveries[0].key, deliveries)
    post.wait(10)
    acks.drain()
    assert landed == [True], "waited for exactly once"
    for d in deliveries:
        rec = store.job(d.job_id)
        assert rec.status == "succeeded"
        assert json.loads(rec.fields["timings"])["engine_s"] == 0.25  # shared by the two jobs
