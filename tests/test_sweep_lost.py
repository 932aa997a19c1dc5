"""The sweep's recovery of queued jobs whose message is gone, and the batch's ``models`` field that lets it
skip a batch while its models' queues still hold a backlog (instead of reading every record every 5 s)."""

from __future__ import annotations

import redis

from producer.submit import submit
from sdfleet import broker, keys
from sdfleet.jobs import parse_job
from sdfleet.logs import get as get_log
from sdfleet.queue import make_app
from sdfleet.reclaim import Sweeper
from sdfleet.settings import Settings
from sdfleet.state import JobStore
from sdfleet.storage import StorageFactory


def _submit(r, app, tmp_path, batch: str, n: int, model: str = "null") -> None:
    specs = [parse_job({"prompt": f"{batch} {i}", "model": model, "width": 512, "height": 512, "steps": 4})
             for i in range(n)]
    submit(specs, store=JobStore(r), app=app, storage=StorageFactory(), default_out=f"file://{tmp_path}",
           batch_name=batch)


def _sweeper(r, app, settings) -> Sweeper:
    return Sweeper(r, app, settings, get_log(), holder="test", grace_s=0.0)


def test_lost_jobs_are_found_once_their_models_queue_is_empty(redis_url, tmp_path):
    settings = Settings(redis_url=redis_url)
    app, r = make_app(settings), redis.Redis.from_url(redis_url, decode_responses=True)
    _submit(r, app, tmp_path, "lost", 3)
    store = JobStore(r)
    batch_id = r.zrevrange(keys.BATCHES, 0, 0)[0]
    assert store.batch_models(batch_id) == {"null"}
    queue = keys.queue_for_model("null")
    assert broker.queue_depth(r, queue) == 3
    sweeper = _sweeper(r, app, settings)
    # Their messages are on the queue: nothing is lost.
    assert sweeper.recover_lost() == {"reenqueued": 0, "cancelled": 0}
    # Lose two messages, keep one: the queue still holds a backlog, so the batch is not even read yet.
    for _ in range(2):
        r.rpop(queue)
    reads = []
    real = store.iter_batch_jobs
    sweeper.store.iter_batch_jobs = lambda b, *a, **k: (reads.append(b), real(b, *a, **k))[1]
    assert sweeper.recover_lost() == {"reenqueued": 0, "cancelled": 0} and reads == []
    # The queue drains (a worker took the last one): now the two lost jobs are found and enqueued again.
    r.rpop(queue)
    out = sweeper.recover_lost()
    assert reads == [batch_id]
    assert out["reenqueued"] == 3 and broker.queue_depth(r, queue) == 3  # the one taken was lost too
    sweeper.close()


def test_a_batch_from_before_the_models_field_is_still_read(redis_url, tmp_path):
    settings = Settings(redis_url=redis_url)
    app, r = make_app(settings), redis.Redis.from_url(redis_url, decode_responses=True)
    _submit(r, app, tmp_path, "old", 2)
    batch_id = r.zrevrange(keys.BATCHES, 0, 0)[0]
    r.hdel(keys.batch(batch_id), "models")  # as a batch committed before the field existed
    # Resubmitted with another job: its earlier jobs' models are unknown, so the batch keeps no field.
    _submit(r, app, tmp_path, "old", 3)
    assert JobStore(r).batch_models(batch_id) == set()
    queue = keys.queue_for_model("null")
    r.delete(queue)
    out = _sweeper(r, app, settings).recover_lost()
    assert out["reenqueued"] == 3 and broker.queue_depth(r, queue) == 3


def test_a_running_job_of_a_gone_worker_with_no_message_is_enqueued_again(redis_url, tmp_path):
    """The net under the dead-worker reclaim: a job left ``running`` (or ``storing``) by a worker that is gone,
    whose message is nowhere, gets one again; a running job of a live worker is left alone."""
    settings = Settings(redis_url=redis_url)
    app, r = make_app(settings), redis.Redis.from_url(redis_url, decode_responses=True)
    _submit(r, app, tmp_path, "stuck", 2)
    store = JobStore(r)
    batch_id = r.zrevrange(keys.BATCHES, 0, 0)[0]
    gone_job, live_job = store.batch_job_ids(batch_id)
    queue = keys.queue_for_model("null")
    r.delete(queue)  # both messages were taken by their workers (and are gone now)
    store.start_many([gone_job], "gone-worker", 3, run="gone-worker:1")
    store.start_many([live_job], "live-worker", 3, run="live-worker:1")
    r.sadd(keys.WORKERS, "live-worker", "gone-worker")
    r.set(keys.worker("live-worker"), "1", ex=60)  # its heartbeat
    sweeper = _sweeper(r, app, settings)
    sweeper.grace_s = 30.0
    assert sweeper.recover_lost() == {"reenqueued": 0, "cancelled": 0}  # only just started: within the grace
    sweeper.grace_s = 0.0
    assert sweeper.recover_lost() == {"reenqueued": 1, "cancelled": 0}
    assert broker.queued_job_ids(r, queue) == [gone_job]
    # Its message is back: the next sweep leaves it (the queue is not empty, and then a worker holds it).
    assert sweeper.recover_lost() == {"reenqueued": 0, "cancelled": 0}
    sweeper.close()
