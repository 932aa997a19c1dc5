"""A batch's end is announced once, and never lost: through retries after lost replies, second finishers,
redelivered messages, a cancel retried by hand and a resubmission while an old run's write is in flight.

Each ``batch_completed`` report sends a manifest task, and the task walks every job of the batch: it must
run for real once a completion, and at least once.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import redis

from producer.submit import submit
from sdfleet import keys, logs
from sdfleet.cancel import cancel_batch
from sdfleet.events import BATCH_TASK, Notifier, complete_batch
from sdfleet.jobs import parse_job
from sdfleet.queue import make_app
from sdfleet.reclaim import ANNOUNCE_GRACE_S, ANNOUNCE_RETRY_S, ANNOUNCE_TRIES, Sweeper
from sdfleet.settings import Settings
from sdfleet.state import JobStore
from sdfleet.storage import StorageFactory
from worker.intake import Delivery
from worker.postprocess import PostProcessor
from worker.runner import BatchRunner


class Settle:
    def __init__(self):
        self.outcomes = []

    def finished(self, d, status, **info):
        self.outcomes.append((d.job_id, status))

    def handback(self, ds):
        pass


def _setup(redis_url, tmp_path, prompts, batch="end"):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    store, settings = JobStore(r), Settings(redis_url=redis_url)
    specs = [parse_job({"prompt": p, "model": "null", "width": 256, "height": 256, "seed": i, "custom_id": f"c{i}"})
             for i, p in enumerate(prompts)]
    res = submit(specs, store=store, app=make_app(settings), storage=StorageFactory(),
                 default_out=f"file://{tmp_path}", batch_name=batch)
    return r, store, settings, res


def _resubmit(store, settings, tmp_path, prompts, batch="end"):
    specs = [parse_job({"prompt": p, "model": "null", "width": 256, "height": 256, "seed": i, "custom_id": f"c{i}"})
             for i, p in enumerate(prompts)]
    return submit(specs, store=store, app=make_app(settings), storage=StorageFactory(),
                  default_out=f"file://{tmp_path}", batch_name=batch)


def _batch_tasks(r) -> int:
    return sum(json.loads(raw)["headers"]["task"] == BATCH_TASK for raw in r.lrange(keys.WEBHOOK_QUEUE, 0, -1))


def _delivery(store, jid, batch="end"):
    return Delivery(jid, batch, parse_job(json.loads(store.job(jid).fields["spec"])), 0.0)


def test_a_completion_reported_twice_builds_its_manifest_once(redis_url, tmp_path):
    # two finishers of the last job (a redelivered message finishing a storing job beside its first worker)
    r, store, settings, res = _setup(redis_url, tmp_path, ["a", "b"])
    a, b = store.batch_job_ids(res.batch_id)
    store.start_many([a, b], "w1", 3, run="w1:1")
    store.transition_many([(a, {}), (b, {})], "storing", ("running",), runs=["w1:1", "w1:1"])
    store.transition_many([(a, {})], "succeeded", ("storing",))
    first = store.transition_many([(b, {})], "succeeded", ("storing",))[0]
    second = store.transition_many([(b, {})], "succeeded", ("storing",))[0]
    assert (first.applied, first.batch_completed) == (True, True)
    assert (second.applied, second.batch_completed) == (False, True)
    app = make_app(settings)
    complete_batch(settings, r, app, StorageFactory(), res.batch_id)
    manifest = tmp_path / res.batch_id / "manifest.jsonl"
    assert manifest.exists()
    manifest.unlink()
    complete_batch(settings, r, app, StorageFactory(), res.batch_id)  # the second report's task
    assert not manifest.exists(), "a repeat of the same completion rebuilt the manifest"
    # a reopened and again completed batch is announced again
    assert _resubmit(store, settings, tmp_path, ["a", "b", "c"]).enqueued == 1
    (c,) = [j for j in store.batch_job_ids(res.batch_id) if j not in (a, b)]
    assert store.transition_many([(c, {"error": "x"})], "cancelled", ("queued",))[0].batch_completed
    complete_batch(settings, r, app, StorageFactory(), res.batch_id)
    assert manifest.exists()


def test_only_the_job_that_ended_the_batch_reannounces_it(redis_url, tmp_path):
    # redelivered messages of finished jobs (a worker killed before its acks): one manifest task, not one each
    r, store, settings, res = _setup(redis_url, tmp_path, ["a", "b", "c"])
    ids = store.batch_job_ids(res.batch_id)
    store.transition_many([(j, {"error": "x"}) for j in ids], "failed", ("queued",))
    assert r.hget(keys.batch(res.batch_id), "completed_by") == keys.job(ids[-1])
    runner = SimpleNamespace(store=store, post=SimpleNamespace(notifier=Notifier(settings, r, app=make_app(settings))))
    for j in ids:
        BatchRunner.reannounce(runner, _delivery(store, j), "failed")
    assert _batch_tasks(r) == 1


def test_a_cancel_whose_reply_was_lost_still_announces_the_batch(redis_url, tmp_path):
    r, store, settings, res = _setup(redis_url, tmp_path, ["a", "b"])
    app = make_app(settings)
    real = store.transition_many

    def reply_lost(items, to, allowed, **kw):
        real(items, to, allowed, **kw)
        raise redis.ConnectionError("Connection closed by server.")

    store.transition_many = reply_lost
    try:
        cancel_batch(settings, store, app, res.batch_id)
        raise AssertionError("the lost reply was not raised")
    except redis.ConnectionError:
        pass
    store.transition_many = real
    assert "completed_at" in store.batch(res.batch_id) and _batch_tasks(r) == 0
    assert cancel_batch(settings, store, app, res.batch_id) == 0  # the operator runs it again: nothing to cancel
    assert _batch_tasks(r) == 1
    complete_batch(settings, r, app, StorageFactory(), res.batch_id)
    assert cancel_batch(settings, store, app, res.batch_id) == 0  # announced now: not again
    assert _batch_tasks(r) == 1
    # a retried cancel of the job that ended the batch reports the end too
    ids = store.batch_job_ids(res.batch_id)
    trs = store.transition_many([(j, {"error": "x"}) for j in ids], "cancelled", ("queued",))
    assert [(t.applied, t.batch_completed) for t in trs] == [(False, False), (False, True)]


def test_an_old_runs_late_failure_does_not_land_on_a_resubmitted_job(redis_url, tmp_path):
    # the failed write lands and its reply is lost; before the retry, the batch is resubmitted (the failed job
    # queued again): the retry must fail its run check, not fail the new job that never ran
    r, store, settings, res = _setup(redis_url, tmp_path, ["a"])
    (a,) = store.batch_job_ids(res.batch_id)
    store.start_many([a], "w1", 3, run="w1:1")
    seen = []
    post = PostProcessor(store=store, storage=StorageFactory(), settle=Settle(), worker_id="w1", engine_info={},
                         notifier=lambda d, status, tr: seen.append((status, tr.applied)),
                         log=logs.get("test"), retry_cap_s=0.2)
    real = store.transition_many
    calls = []

    def lost_reply_then_resubmit(items, to, allowed, **kw):
        out = real(items, to, allowed, **kw)
        calls.append(to)
        if len(calls) == 1:
            assert _resubmit(store, settings, tmp_path, ["a"]).enqueued == 1
            raise redis.ConnectionError("Connection closed by server.")
        return out

    try:
        store.transition_many = lost_reply_then_resubmit
        d = _delivery(store, a)
        d.extra["run"] = "w1:1"
        post._fail(d, "engine error: kernel failed")
    finally:
        store.transition_many = real
        post.shutdown()
    assert store.job(a).status == "queued" and "run" not in store.job(a).fields
    assert "completed_at" not in store.batch(res.batch_id)
    assert seen == []


def test_a_requeued_job_forgets_the_run_that_gave_it_back(redis_url, tmp_path):
    r, store, settings, res = _setup(redis_url, tmp_path, ["a"])
    (a,) = store.batch_job_ids(res.batch_id)
    store.start_many([a], "w1", 3, run="w1:1")
    assert store.requeue(a, run="w1:1").applied
    assert store.job(a).fields.get("run", "") == ""
    late = store.transition_many([(a, {"error": "late"})], "failed", ("queued", "running"), runs=["w1:1"])[0]
    assert not late.applied and late.mismatch == "run" and store.job(a).status == "queued"


def test_the_sweep_asks_again_for_a_completion_never_announced(redis_url, tmp_path):
    # a path that lost the report and does not retry (a process that died between its write and the
    # announcement): the sweep asks the webhook worker, a few times and far apart
    r, store, settings, res = _setup(redis_url, tmp_path, ["a"])
    app = make_app(settings)
    (a,) = store.batch_job_ids(res.batch_id)
    assert store.transition_many([(a, {"error": "x"})], "failed", ("queued",))[0].batch_completed  # report lost
    done_at = float(store.batch(res.batch_id)["completed_at"])
    assert r.zscore(keys.UNANNOUNCED, res.batch_id) == done_at
    sweeper = Sweeper(r, app, settings, logs.get("test"), holder="test", grace_s=0.0)
    try:
        assert sweeper.announce_lost_completions(now=done_at + 1) == 0  # its own report may still come
        t = done_at + ANNOUNCE_GRACE_S + 1
        asked = []
        for _ in range(ANNOUNCE_TRIES + 2):
            asked.append(sweeper.announce_lost_completions(now=t))
            asked.append(sweeper.announce_lost_completions(now=t + 1))  # too soon after the last
            t += ANNOUNCE_RETRY_S + 1
        assert asked == [1, 0] * ANNOUNCE_TRIES + [0, 0] * 2 and _batch_tasks(r) == ANNOUNCE_TRIES
        assert r.zscore(keys.UNANNOUNCED, res.batch_id) is None  # given up: not read by every sweep from now on
        # a new completion (the batch reopened and ended again) starts afresh; once announced, no more asking
        assert _resubmit(store, settings, tmp_path, ["a"]).enqueued == 1
        assert r.zscore(keys.UNANNOUNCED, res.batch_id) is None  # reopened
        assert store.transition_many([(a, {"error": "y"})], "failed", ("queued",))[0].batch_completed
        again = float(store.batch(res.batch_id)["completed_at"])
        t = again + ANNOUNCE_GRACE_S + 1
        assert sweeper.announce_lost_completions(now=t) == 1
        complete_batch(settings, r, app, StorageFactory(), res.batch_id)  # the webhook worker runs it
        assert r.zscore(keys.UNANNOUNCED, res.batch_id) is None
        assert sweeper.announce_lost_completions(now=t + ANNOUNCE_RETRY_S + 1) == 0
        # the sweep itself runs it: a completion left unannounced long enough is asked for
        r.hdel(keys.batch(res.batch_id), "announced_for", "announce_asked")
        r.hset(keys.batch(res.batch_id), "completed_at", f"{again - ANNOUNCE_GRACE_S - 5:.6f}")
        r.zadd(keys.UNANNOUNCED, {res.batch_id: again - ANNOUNCE_GRACE_S - 5})
        assert sweeper.sweep()["announced"] == 1
    finally:
        sweeper.close()


def test_a_batch_completed_by_housekeeping_is_announced_by_the_sweep_if_its_report_is_lost(redis_url, tmp_path):
    from scheduler.housekeeping import complete_batches

    r, store, settings, res = _setup(redis_url, tmp_path, ["a"])
    (a,) = store.batch_job_ids(res.batch_id)
    store.transition_many([(a, {"error": "x"})], "failed", ("queued",))
    r.hdel(keys.batch(res.batch_id), "completed_at", "completed_by")  # as if the transition's completion was lost
    r.zrem(keys.UNANNOUNCED, res.batch_id)
    r.delete(keys.WEBHOOK_QUEUE)
    assert complete_batches(r, settings, [res.batch_id], logs.get("test"), app=make_app(settings)) == 1
    assert r.hget(keys.batch(res.batch_id), "completed_by") == "housekeeping"
    assert r.zscore(keys.UNANNOUNCED, res.batch_id) is not None


def test_a_manifest_the_store_refused_leaves_the_completion_unannounced(redis_url, tmp_path):
    from sdfleet.errors import StorageError

    r, store, settings, res = _setup(redis_url, tmp_path, ["a"])
    app = make_app(settings)
    (a,) = store.batch_job_ids(res.batch_id)
    store.transition_many([(a, {"error": "x"})], "failed", ("queued",))

    class Refusing(StorageFactory):
        def get(self, url):
            inner = super().get(url)

            class Put:
                def put(self, *a, **k):
                    raise StorageError("store down")

            return Put() if url.startswith("file://") else inner

    complete_batch(settings, r, app, Refusing(), res.batch_id)
    assert "announced_for" not in store.batch(res.batch_id) and r.zscore(keys.UNANNOUNCED, res.batch_id) is not None
    complete_batch(settings, r, app, StorageFactory(), res.batch_id)  # the store is back: a later report
    assert (tmp_path / res.batch_id / "manifest.jsonl").exists()
    assert store.batch(res.batch_id)["announced_for"] == store.batch(res.batch_id)["completed_at"]


def test_an_old_completions_task_does_not_mark_the_new_completion(redis_url, tmp_path):
    # the batch reopens and ends again while a task of its first completion builds the manifest
    r, store, settings, res = _setup(redis_url, tmp_path, ["a"])
    app = make_app(settings)
    (a,) = store.batch_job_ids(res.batch_id)
    store.transition_many([(a, {"error": "x"})], "failed", ("queued",))
    store2 = JobStore(r)
    real = JobStore.iter_batch_jobs

    def reopen_midway(self, batch_id, *args, **kw):
        yield from real(self, batch_id, *args, **kw)
        if not getattr(reopen_midway, "done", False):
            reopen_midway.done = True
            assert _resubmit(store2, settings, tmp_path, ["a"]).enqueued == 1
            store2.transition_many([(a, {"error": "y"})], "failed", ("queued",))

    JobStore.iter_batch_jobs = reopen_midway
    try:
        complete_batch(settings, r, app, StorageFactory(), res.batch_id)
    finally:
        JobStore.iter_batch_jobs = real
    meta = store.batch(res.batch_id)
    assert "announced_for" not in meta and not (tmp_path / res.batch_id / "manifest.jsonl").exists()
    assert r.zscore(keys.UNANNOUNCED, res.batch_id) == float(meta["completed_at"])
    complete_batch(settings, r, app, StorageFactory(), res.batch_id)  # the new completion's own task
    assert store.batch(res.batch_id)["announced_for"] == meta["completed_at"]


def test_a_completion_another_worker_is_announcing_is_skipped(redis_url, tmp_path):
    r, store, settings, res = _setup(redis_url, tmp_path, ["a"])
    app = make_app(settings)
    (a,) = store.batch_job_ids(res.batch_id)
    store.transition_many([(a, {"error": "x"})], "failed", ("queued",))
    completed_at = store.batch(res.batch_id)["completed_at"]
    r.set(keys.batch_announcing(res.batch_id), completed_at, ex=60)
    complete_batch(settings, r, app, StorageFactory(), res.batch_id)
    assert not (tmp_path / res.batch_id / "manifest.jsonl").exists()
    r.delete(keys.batch_announcing(res.batch_id))  # it died: its claim expired
    complete_batch(settings, r, app, StorageFactory(), res.batch_id)
    assert (tmp_path / res.batch_id / "manifest.jsonl").exists() and not r.exists(keys.batch_announcing(res.batch_id))


def test_a_retried_cancel_that_ended_the_batch_announces_it(redis_url, tmp_path):
    from sdfleet.cancel import cancel_jobs

    r, store, settings, res = _setup(redis_url, tmp_path, ["a", "b"])
    ids = store.batch_job_ids(res.batch_id)
    store.transition_many([(j, {"error": "x"}) for j in ids], "cancelled", ("queued",))  # reply lost
    seen = []
    assert cancel_jobs(store, lambda d, status, tr: seen.append((d.job_id, tr.batch_completed)), ids, "again") == []
    assert seen == [(ids[1], True)]  # only the job whose cancel ended the batch (its batch mate is not re-announced)


def test_the_scripts_name_the_unannounced_set_as_keys_does():
    from sdfleet import state

    assert f"'{keys.UNANNOUNCED}'" in state._TRANSITION and f"'{keys.UNANNOUNCED}'" in state._COMMIT
