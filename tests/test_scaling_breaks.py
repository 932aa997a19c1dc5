"""Holes found in the autoscaler and housekeeping by running them as an operator would: each test states what
must hold and fails while it does not.

Real Redis and real worker and CLI processes throughout; where a state is hard to reach at the right instant
with a real process (a job left ``storing`` by a worker killed between recording and promoting), the test
builds it through the job store's own transitions and says so.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from scheduler import observe as obs
from scheduler.housekeeping import housekeep
from scheduler.policy import PoolConfig
from scheduler.service import Scheduler
from sdfleet import keys
from sdfleet.logs import get as get_log
from sdfleet.settings import Settings
from sdfleet.state import QUEUED, RUNNING, STORING, JobStore
from sdfleet.storage import StorageFactory, object_key, staged_key
from tests.conftest import run_cli


def _submit(tmp_path: Path, env: dict[str, str], batch: str, prompts: list[str], *extra: str) -> None:
    f = tmp_path / f"{batch}-{len(list(tmp_path.iterdir()))}.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "custom_id": f"c{i}"}) + "\n" for i, p in enumerate(prompts)))
    res = run_cli(["submit", str(f), "--model", "null", "--batch", batch, *extra], env)
    assert res.returncode == 0, res.stderr


def _wait(pred, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_reclaimed_job_of_a_killed_worker_counts_as_backlog(tmp_path, env, r, start_worker) -> None:
    """A worker killed mid-batch leaves its job ``running``; the sweep puts the message back in the queue.
    That message is work nobody is doing: the scheduler must count it, or with --min-workers 0 the pool
    stays at zero (KEDA: zero replicas) and the job waits forever. Today ``sample_queue`` counts only
    messages whose job is ``queued``, so the reclaimed job is invisible to the policy."""
    _submit(tmp_path, env, "crashy", ["boom"])
    store = JobStore(r)
    (job_id,) = store.batch_job_ids("crashy")
    w = start_worker("--null-crash-prompt", "boom", model="null", env_extra={"SDFLEET_HEARTBEAT_TTL": "1"})
    assert w.proc.wait(60) != 0  # the engine "segfaulted" with the job claimed
    assert store.job(job_id).status == RUNNING
    queue = keys.queue_for_model("null")

    def reclaimed() -> bool:
        run_cli(["janitor", "--once"], env)
        return sum(r.llen(q) for q in keys.queue_lists("null")) >= 1

    _wait(reclaimed, what=f"the sweep to put the job back on {queue}")
    assert store.job(job_id).status == RUNNING  # the message is back; the record still says running

    view = obs.observe(r, ["null"])["null"]
    assert view.queued_raw == 1
    assert view.queued >= 1, "the reclaimed job's message is not counted as queued work"
    sched = Scheduler(r, PoolConfig(min_workers=0, max_workers=2, cooldown_s=0), get_log("t"), pools=["null"])
    assert sched.tick()["null"].desired >= 1, "no worker is wanted for a job that waits in the queue"


def test_housekeeping_keeps_the_staged_objects_of_a_job_still_storing(tmp_path, env, r) -> None:
    """A job ``storing`` has its outcome recorded and its images only under the run's staged names; the
    redelivered message promotes them (worker.runner finish_storing). Housekeeping deletes staged ``.run-*``
    files older than the visibility timeout without asking whether their job still needs them: once they are
    gone, promotion fails forever and the job never ends. The job reaches that age when no worker runs (the
    pool scaled to zero: see the test above, the reclaimed message is not counted) while the janitor does.
    The storing state is built through the job store's transitions (a real worker would have to be killed in
    the instant between recording and promoting)."""
    out = tmp_path / "out"
    _submit(tmp_path, env, "b", ["a picture"], "--out", f"file://{out}")
    store = JobStore(r)
    (job_id,) = store.batch_job_ids("b")
    rec = store.job(job_id)
    run = "run-old"
    final = object_key("b", rec.custom_id, ".png")
    staged = staged_key(final, run)
    (out / staged).parent.mkdir(parents=True, exist_ok=True)
    (out / staged).write_bytes(b"png")
    settings = Settings.from_env(env)
    old = time.time() - settings.visibility_timeout - 60
    os.utime(out / staged, (old, old))
    moves = [[f"file://{out}", staged, final]]
    assert store.transition_many([(job_id, {"run": run})], RUNNING, (QUEUED,))[0].applied
    assert store.transition_many([(job_id, {"staged": json.dumps(moves)})], STORING, (RUNNING,))[0].applied

    housekeep(r, store, StorageFactory(None, "us-east-1", 0), settings, get_log("t"), force=True)

    assert store.job(job_id).status == STORING
    assert (out / staged).exists(), "housekeeping deleted the only copy of a storing job's image"


def test_a_reopened_batch_keeps_its_finished_jobs(tmp_path, env, r, start_worker) -> None:
    """Once a batch completes, housekeeping gives its keys a TTL of ``record_ttl_s`` from completion. A
    resubmission with --replace (or of failed jobs) reopens the batch; its finished jobs must then live as
    long as the open batch. Today the reopened batch's hash gets a fresh TTL while the finished jobs keep the
    short one, so they vanish from `sdfleet results` and the manifest while the batch is still running."""
    _submit(tmp_path, env, "re", ["one", "two"])
    store = JobStore(r)
    w = start_worker(model="null")
    _wait(lambda: r.hget(keys.batch("re"), "completed_at"), what="the batch to complete")
    w.stop()
    settings = Settings.from_env(env, record_ttl_s=3600)
    housekeep(r, store, StorageFactory(None, "us-east-1", 0), settings, get_log("t"), force=True)
    ids = dict(zip(("c0", "c1"), store.batch_job_ids("re")))
    assert 0 < r.ttl(keys.job(ids["c0"])) <= 3600  # marked for expiry with the completed batch

    _submit(tmp_path, env, "re", ["one", "two, changed"], "--replace")  # reopens: c1 runs again
    assert not r.hget(keys.batch("re"), "completed_at")
    batch_ttl = r.ttl(keys.batch("re"))
    assert batch_ttl > 3600
    assert r.ttl(keys.job(ids["c0"])) >= batch_ttl - 60, \
        "a finished job of the open batch expires long before the batch"


def _scheduler(env: dict[str, str], log: Path, *args: str):
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "scheduler", "--driver", "local", "--model", "null",
                             "--interval", "0.5", *args], env=env, cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def test_a_restarted_scheduler_adopts_the_workers_of_the_one_that_died(tmp_path, env, r) -> None:
    """The local driver starts workers in their own sessions, so they outlive a scheduler that is killed
    (OOM, kill -9, a crash). The next scheduler knows nothing of them: it starts a worker per wanted slot on
    top of them (on a GPU host, a second process for a GPU that one already owns) and never drains the
    orphans, which then run forever whatever the backlog. --max-workers 1 must mean one worker."""
    import signal

    limits = ("--min-workers", "1", "--max-workers", "1", "--cooldown-s", "0")
    first = _scheduler(env, tmp_path / "s1.log", *limits)
    second = None
    try:
        _wait(lambda: any(w.get("state") == "idle" for w in obs.live_workers(r)), what="the first worker")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = _scheduler(env, tmp_path / "s2.log", *limits)
        start = time.time()
        _wait(lambda: json.loads(r.hget(keys.SCHEDULER_STATE, "null") or '{"at": 0}')["at"] > start + 1,
              what="the second scheduler's decisions")
        try:
            _wait(lambda: len(obs.live_workers(r)) >= 2, timeout=30)
        except AssertionError:
            pass  # it adopted the running worker (or started none beside it)
        live = obs.live_workers(r)
        assert len(live) <= 1, f"--max-workers 1, yet {len(live)} workers: {[w['worker_id'] for w in live]}"
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
        for w in obs.live_workers(r):  # the orphans the killed scheduler left: drain them
            try:
                os.kill(int(w["pid"]), signal.SIGTERM)
            except (ProcessLookupError, KeyError, ValueError):
                pass


def test_a_job_held_by_a_killed_worker_is_finished_by_the_scheduled_pool(tmp_path, env, r) -> None:
    """The operator's command from the issue (--min-workers 0, --cooldown-s 5) with no janitor: every worker
    runs the reclaim sweep, so the jobs a SIGKILLed worker held come back only through a live worker. The
    scheduler restarts the crashed one, and must keep a worker until those jobs have run: every job of the
    batch ends."""
    import signal

    _submit(tmp_path, env, "held", [f"p{i}" for i in range(8)])
    sched = _scheduler(env, tmp_path / "s.log", "--min-workers", "0", "--max-workers", "1", "--cooldown-s", "5",
                       "--worker-args", "--null-delay-ms 1500 --max-batch 4")
    try:
        store = JobStore(r)
        _wait(lambda: store.counts("held").get("running", 0) > 0, what="a batch in the engine")
        (victim,) = [w for w in obs.live_workers(r) if w.get("state") == "busy"] or [obs.live_workers(r)[0]]
        os.kill(int(victim["pid"]), signal.SIGKILL)
        try:
            _wait(lambda: store.counts("held").get("succeeded", 0) == 8, timeout=120)
        except AssertionError:
            pass
        counts = store.counts("held")
        assert counts.get("succeeded", 0) == 8, f"jobs left behind by the killed worker: {counts}"
    finally:
        sched.send_signal(signal.SIGTERM)
        sched.wait(120)
