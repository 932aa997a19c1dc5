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
from worker.intake import Delivery
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


class Settle:
    """What the worker's loop would do with the runner's and post-processing's reports, recorded."""

    def __init__(self):
        self.acked: list[str] = []
        self.rejected: list[str] = []
        self.outcomes: list[tuple[str, str]] = []
        self.deferred: list[str] = []
        self.retried: list[str] = []
        self.begun: list[str] = []

    def wake(self):
        pass

    def started(self, ds):
        self.begun += [d.job_id for d in ds]

    def finished(self, d, status, **info):
        self.outcomes.append((d.job_id, status))
        self.acked.append(d.job_id)

    def handback(self, ds):
        self.rejected += [d.job_id for d in ds]

    def retry_later(self, ds, exc):
        self.retried += [d.job_id for d in ds]

    def defer(self, d):
        self.deferred.append(d.job_id)

    def engine_time(self, key, images, seconds):
        pass

    def timeline(self, run):
        pass


@pytest.fixture
def setup(redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = JobStore(client)
    settings = Settings(redis_url=redis_url)
    posts: list[PostProcessor] = []

    def make(prompts, limit, worker_id="w1"):
        specs = [parse_job({"prompt": p, "model": "null", "width": 256, "height": 256, "seed": i, "custom_id": f"c{i}"})
                 for i, p in enumerate(prompts)]
        res = submit(specs, store=store, app=make_app(settings), storage=StorageFactory(),
                     default_out=f"file://{tmp_path}", batch_name="oom")
        ids = store.batch_job_ids(res.batch_id)
        settle = Settle()
        log = logs.get("test")
        notified: list[tuple[str, str]] = []
        post = PostProcessor(store=store, storage=StorageFactory(), settle=settle, worker_id=worker_id,
                             engine_info={}, notifier=lambda d, status, tr: notified.append((d.job_id, status)),
                             log=log, retry_cap_s=0.5)
        posts.append(post)
        engine = OomAbove(limit)
        runner = BatchRunner(engine=engine, store=store, post=post, settle=settle, worker_id=worker_id,
                             max_attempts=3, log=log)
        deliveries = [Delivery(jid, "oom", parse_job(json.loads(store.job(jid).fields["spec"])), 0.0) for jid in ids]
        return store, runner, post, settle, engine, deliveries, notified

    yield make
    for post in posts:
        post.shutdown()  # its storing process too


def test_oom_splits_in_halves_and_every_job_succeeds(setup):
    store, runner, post, settle, engine, deliveries, notified = setup([f"p{i}" for i in range(8)], limit=2)
    runner.run(deliveries[0].key, deliveries)
    post.wait(10)
    assert engine.calls == [8, 4, 2, 2, 4, 2, 2]
    assert sorted(settle.acked) == sorted(d.job_id for d in deliveries)
    assert store.counts("oom")["succeeded"] == 8
    assert sorted(s for _, s in notified) == ["succeeded"] * 8


def test_a_failing_job_does_not_fail_its_batch_mates(setup):
    store, runner, post, settle, engine, deliveries, notified = setup(["a", "boom", "c"], limit=8)
    runner.run(deliveries[0].key, deliveries)
    post.wait(10)
    statuses = {json.loads(store.job(d.job_id).fields["spec"])["prompt"]: store.job(d.job_id).status
                for d in deliveries}
    assert statuses == {"a": "succeeded", "boom": "failed", "c": "succeeded"}
    err = store.job(deliveries[1].job_id).error
    assert "engine error" in err and "kernel failed" in err
    assert len(settle.acked) == 3


def test_oom_of_a_single_job_fails_it_with_a_reason(setup):
    store, runner, post, settle, engine, deliveries, notified = setup(["a"], limit=0)
    runner.run(deliveries[0].key, deliveries)
    post.wait(10)
    assert store.job(deliveries[0].job_id).status == "failed"
    assert "out of memory" in store.job(deliveries[0].job_id).error


def test_claim_skips_finished_and_poisons_after_max_attempts(setup):
    store, runner, post, settle, engine, deliveries, notified = setup(["a", "b"], limit=8)
    a, b = deliveries
    # b "crashed" three workers already: its fourth start fails it as poison.
    for _ in range(3):
        assert store.start(b.job_id, "dead", 3).applied
    runner.run(a.key, [a, b])
    post.wait(10)
    assert store.job(a.job_id).status == "succeeded"
    rec = store.job(b.job_id)
    assert rec.status == "failed" and "poison" in rec.error
    settle.acked.clear()
    calls = list(engine.calls)
    runner.run(a.key, [a])  # a redelivered message of a finished job: acknowledged, not rerun
    assert settle.acked == [a.job_id] and engine.calls == calls


def test_only_the_run_in_the_engine_is_charged_an_attempt(setup):
    # A run that has left the engine is not blamed when a later run kills the worker, even while its jobs
    # are still being stored: its attempt is taken back when the next run starts.
    store, runner, post, settle, engine, deliveries, notified = setup(["a", "b", "c"], limit=8)
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
    store, runner, post, settle, engine, deliveries, notified = setup(["a", "b"], limit=8)
    bad = GenerationResult([np.zeros((8, 8, 3), np.uint8)] * 2, {})

    def fail():
        raise RuntimeError("device error surfacing at the copy")

    bad.pending = fail
    for d in deliveries:
        assert store.start(d.job_id, "w1", 3).applied
    post.submit_group(deliveries, bad, {"t_engine_start": 0.0})
    post.wait(10)
    assert sorted(settle.rejected) == sorted(d.job_id for d in deliveries) and not settle.acked
    assert {store.job(d.job_id).status for d in deliveries} == {"queued"}


def test_a_storing_process_that_dies_is_replaced_and_the_run_stored_without_rerunning(setup):
    store, runner, post, settle, engine, deliveries, notified = setup(["a", "b"], limit=8)
    assert post.writer.write([], []) == []  # the storing process is up
    children = multiprocessing.active_children()
    assert children
    for child in children:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    runner.run(deliveries[0].key, deliveries)
    post.wait(10)
    assert engine.calls == [2], "the images were kept and stored by a fresh process, not rendered again"
    assert sorted(settle.acked) == sorted(d.job_id for d in deliveries)
    assert [store.job(d.job_id).status for d in deliveries] == ["succeeded", "succeeded"]


def test_results_whose_copy_is_still_running_are_waited_for_by_post_processing(setup):
    """A GPU engine returns before its device-to-host copy lands; post-processing waits for it."""
    store, runner, post, settle, engine, deliveries, notified = setup(["a", "b"], limit=8)
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
    assert landed == [True], "waited for exactly once"
    for d in deliveries:
        rec = store.job(d.job_id)
        assert rec.status == "succeeded"
        assert json.loads(rec.fields["timings"])["engine_s"] == 0.25  # shared by the two jobs


def _objects(tmp_path, batch="oom"):
    root = tmp_path / batch
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_a_run_that_lost_its_jobs_never_touches_their_objects(setup, tmp_path):
    """A stalled worker's late outcome: another run took the job over and finished it. The late run's
    transition is refused by the run check, and its staged objects are dropped, never promoted."""
    store, runner, post, settle, engine, deliveries, notified = setup(["a"], limit=8)
    (d,) = deliveries
    # The stalled run claimed the job; then the job was handed back and another run owns it now.
    stale = GenerationResult([np.full((8, 8, 3), 9, np.uint8)], {})
    assert store.start_many([d.job_id], "w1", 3, run="w1:1")[0].applied
    d.extra["run"] = "w1:1"
    assert store.start_many([d.job_id], "w2", 3, run="w2:1")[0].applied
    post.submit_group([d], stale, {"t_engine_start": 0.0})
    post.wait(10)
    rec = store.job(d.job_id)
    assert rec.status == "running" and rec.fields["run"] == "w2:1"
    assert _objects(tmp_path) == [], "nothing promoted, staged objects dropped"
    assert settle.outcomes == [(d.job_id, "skipped")]


def test_a_job_left_storing_by_a_dead_worker_is_finished_from_its_staged_objects(setup, tmp_path):
    store, runner, post, settle, engine, deliveries, notified = setup(["a"], limit=8)
    (d,) = deliveries
    # Run w1:1 stored its staged objects and won the job, then its worker died before promoting.
    assert store.start_many([d.job_id], "w1", 3, run="w1:1")[0].applied
    d.extra["run"] = "w1:1"
    jobs = [{"job_id": d.job_id, "batch_id": "oom", "custom_id": "c0", "out": d.spec.out, "parameters": {},
             "seed": 0, "model": "null", "attempt": 1, "engine_run": "w1:1", "timings": {}}]
    (report,) = post.writer.write(jobs, [np.full((8, 8, 3), 5, np.uint8)])
    assert store.transition_many([(d.job_id, report[1])], "storing", ("running",), runs=["w1:1"])[0].applied
    assert _objects(tmp_path) == [".run-w1_1-c0.json", ".run-w1_1-c0.png"]
    # The redelivered message reaches another worker's runner: it promotes those objects, not new ones.
    calls = list(engine.calls)
    runner.run(d.key, [Delivery(d.job_id, "oom", d.spec, 0.0)])
    assert engine.calls == calls, "not rendered again"
    assert store.job(d.job_id).status == "succeeded"
    assert _objects(tmp_path) == ["c0.json", "c0.png"]
    sidecar = json.loads((tmp_path / "oom" / "c0.json").read_text())
    assert sidecar["engine_run"] == "w1:1" == store.job(d.job_id).fields["run"]
    assert notified == [(d.job_id, "succeeded")]


def test_a_storing_write_whose_reply_was_lost_is_recognised_as_this_runs_own(setup, tmp_path):
    """Redis restarts between running -> storing landing and its reply: the retry reads back "storing". The record
    holds this run and its staged objects, so the run won the job: its objects are promoted and the job succeeds
    (dropping them left the job storing for good, seen in tests/test_crash.py's Redis restart)."""
    store, runner, post, settle, engine, deliveries, notified = setup(["a", "b"], limit=8)
    real = store.transition_many
    lost_replies = []

    def reply_lost_once(items, to, allowed, **kw):
        out = real(items, to, allowed, **kw)
        if to == "storing" and not lost_replies:
            lost_replies.append([tr.applied for tr in out])
            raise redis.ConnectionError("Connection closed by server.")
        return out

    store.transition_many = reply_lost_once
    runner.run(deliveries[0].key, deliveries)
    post.wait(20)
    assert lost_replies == [[True, True]]
    assert [store.job(d.job_id).status for d in deliveries] == ["succeeded", "succeeded"]
    assert sorted(settle.outcomes) == sorted((d.job_id, "succeeded") for d in deliveries)
    assert sorted(notified) == sorted((d.job_id, "succeeded") for d in deliveries)
    assert _objects(tmp_path) == ["c0.json", "c0.png", "c1.json", "c1.png"]


def test_a_batch_ending_write_whose_reply_was_lost_still_announces_the_batch(setup):
    """Redis restarts between storing -> succeeded landing (it ended the batch) and its reply: the retry reads
    back "succeeded". It must still say that this write ended the batch, or batch.completed is never sent."""
    store, runner, post, settle, engine, deliveries, notified = setup(["a", "b"], limit=8)
    seen = []
    post.notifier = lambda d, status, tr: seen.append((d.job_id, status, tr.batch_completed))
    real = store.transition_many
    lost_replies = []

    def reply_lost_once(items, to, allowed, **kw):
        out = real(items, to, allowed, **kw)
        if to == "succeeded" and not lost_replies:
            lost_replies.append([(tr.applied, tr.batch_completed) for tr in out])
            raise redis.ConnectionError("Connection closed by server.")
        return out

    store.transition_many = reply_lost_once
    runner.run(deliveries[0].key, deliveries)
    post.wait(20)
    assert lost_replies == [[(True, False), (True, True)]]  # the second job's write ended the batch
    assert sorted(seen) == sorted([(deliveries[0].job_id, "succeeded", False),
                                   (deliveries[1].job_id, "succeeded", True)])
    # a later repeat of a batch mate's outcome (a redelivery) does not claim the batch's end
    again = real([(deliveries[0].job_id, {}), (deliveries[1].job_id, {})], "succeeded", ("storing",))
    assert [(tr.applied, tr.previous, tr.batch_completed) for tr in again] == [
        (False, "succeeded", False), (False, "succeeded", True)]


def test_a_failed_write_whose_reply_was_lost_still_announces_the_failure(setup):
    store, runner, post, settle, engine, deliveries, notified = setup(["a"], limit=8)
    (d,) = deliveries
    assert store.start_many([d.job_id], "w1", 3, run="w1:1")[0].applied
    d.extra["run"] = "w1:1"
    real = store.transition_many
    lost_replies = []

    def reply_lost_once(items, to, allowed, **kw):
        out = real(items, to, allowed, **kw)
        if to == "failed" and not lost_replies:
            lost_replies.append(out[0].applied)
            raise redis.ConnectionError("Connection closed by server.")
        return out

    store.transition_many = reply_lost_once
    post.finish_failed(d, "engine error: boom")
    assert lost_replies == [True] and store.job(d.job_id).status == "failed"
    assert notified == [(d.job_id, "failed")] and settle.outcomes == [(d.job_id, "failed")]
