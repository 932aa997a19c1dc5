"""What the scheduler reads from a real Redis: queued work per bucket (cancelled messages not counted), live
workers, the decision it publishes for KEDA and `sdfleet top`, and `sdfleet workers --json`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from scheduler import observe as obs
from scheduler.policy import PoolConfig
from scheduler.service import Scheduler
from scheduler.top import render, snapshot
from sdfleet import keys
from sdfleet.logs import get as get_log
from sdfleet.state import CANCELLED, QUEUED, JobStore
from tests.conftest import run_cli


def submit(tmp_path: Path, env: dict[str, str], batch: str, n: int, side: int, steps: int) -> None:
    f = tmp_path / f"{batch}.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{batch}{i}", "custom_id": f"c{i}", "width": side, "height": side,
                                     "steps": steps}) + "\n" for i in range(n)))
    res = run_cli(["submit", str(f), "--batch", batch], env)
    assert res.returncode == 0, res.stderr


def beat(r, worker_id: str, **fields: str) -> None:
    info = {"worker_id": worker_id, "pid": "1", "host": "h", "model": "tiny", "queue": keys.queue_for_model("tiny"),
            "device": "cpu", "gpu_uuid": "", "state": "busy", "current_run": "run1", "current_batch_size": "3",
            "images_per_s": "1.5", "last_beat": f"{time.time():.3f}", "max_batch": "4", "buffered": "2", **fields}
    r.hset(keys.worker(worker_id), mapping=info)
    r.expire(keys.worker(worker_id), 30)
    r.sadd(keys.WORKERS, worker_id)


def test_queued_work_per_bucket_skips_cancelled_jobs(tmp_path, env, r) -> None:
    submit(tmp_path, env, "big", 30, 512, 20)
    submit(tmp_path, env, "small", 10, 256, 4)
    store = JobStore(r)
    cancelled = store.batch_job_ids("big")[:10]
    # Cancelled jobs whose messages are still in the list (a worker drops them when it gets to them).
    store.transition_many([(j, {}) for j in cancelled], CANCELLED, (QUEUED,))
    raw, live, by_bucket = obs.sample_queue(r, "tiny")
    assert raw == 40
    assert round(live) == 30 and {b: round(n) for b, n in by_bucket.items()} == {"512x512:20": 20, "256x256:4": 10}
    # Sampling both ends of a long list estimates the same mix.
    raw, live, by_bucket = obs.sample_queue(r, "tiny", per_end=5)
    assert raw == 40 and set(by_bucket) <= {"512x512:20", "256x256:4"} and 0 < live <= 40


def test_tick_publishes_the_decision(tmp_path, env, r) -> None:
    submit(tmp_path, env, "b1", 20, 256, 4)
    r.hset(keys.service_times("tiny"), "256x256:4", 2.0)
    beat(r, "w-live")
    beat(r, "w-dead")
    r.delete(keys.worker("w-dead"))  # its heartbeat expired: listed, not live
    sched = Scheduler(r, PoolConfig(max_workers=10, target_drain_s=10, cooldown_s=0, max_batch=1), get_log("t"))
    d = sched.tick()["tiny"]
    # 20 queued + 5 held by the live worker, at 2 s each: 50 GPU-s over 10 s -> 5 workers.
    assert d.desired == 5
    doc = sched.scale_doc("tiny")
    assert doc["desired"] == 5 and doc["queued"] == 20 and doc["in_flight"] == 5 and doc["actual"] == 1
    assert doc["backlog_gpu_seconds"] == 50.0
    assert json.loads(r.hget(keys.SCHEDULER_STATE, "tiny"))["desired"] == 5
    assert sched.scale_doc("")["pools"]["tiny"]["desired"] == 5
    assert sched.scale_doc("other")["desired"] == 0, "a pool with no queue yet asks for its minimum"

    snap = snapshot(r)
    (pool,) = snap["pools"]
    assert pool["pool"] == "tiny" and pool["desired"] == 5 and pool["workers"] == 1
    assert [b["batch_id"] for b in snap["batches"]] == ["b1"]
    console = Console(width=160, record=True)
    console.print(render(snap))
    text = console.export_text()
    assert "w-live" in text and "w-dead" not in text and "b1" in text


def test_workers_json_one_line_per_live_worker(env, r) -> None:
    beat(r, "w1")
    beat(r, "w2", state="stalled", device="cuda:0", gpu_uuid="GPU-1", gpu_util_pct="97")
    res = run_cli(["workers", "--json"], env)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [row["id"] for row in rows] == ["w1", "w2"]
    assert rows[1]["state"] == "stalled" and rows[1]["device"] == "cuda:0" and rows[1]["gpu_util"] == 97
    assert rows[0]["model"] == "tiny" and rows[0]["current_batch"] == 3 and rows[0]["pool"] == "tiny"


def test_min_and_max_per_pool(tmp_path, env, r) -> None:
    import pytest

    from scheduler.service import parse_pool_limits
    from sdfleet.errors import ConfigError

    submit(tmp_path, env, "b2", 40, 256, 4)
    r.hset(keys.service_times("tiny"), "256x256:4", 10.0)
    base = PoolConfig(min_workers=0, max_workers=50, target_drain_s=10, cooldown_s=0, max_batch=1)
    limits = parse_pool_limits(["tiny=2:3", "idle-pool=1:4"], base)
    sched = Scheduler(r, base, get_log("t"), pools=["tiny", "idle-pool"], pool_configs=limits)
    d = sched.tick()
    assert d["tiny"].desired == 3, "the pool's own max, not --max-workers"
    assert d["idle-pool"].desired == 1, "the pool's own min with nothing queued"
    with pytest.raises(ConfigError, match="POOL=MIN:MAX"):
        parse_pool_limits(["tiny"], base)
    with pytest.raises(ConfigError, match="--max-workers"):
        parse_pool_limits(["tiny=5:2"], base)
    res = run_cli(["scheduler", "--pool", "tiny=5:2", "--once"], env)
    assert res.returncode == 2 and "--pool" in res.stderr


def test_jobs_held_by_workers_count_in_flight_dead_or_alive(tmp_path, env, r) -> None:
    """A dead worker's held jobs wait for the reclaim sweep: they are in no queue and in no heartbeat, yet
    they are work of the pool (ended ones are not). A live worker's held hash counts when it says more than
    its heartbeat (jobs storing after their batch left the engine)."""
    submit(tmp_path, env, "held", 6, 256, 4)
    store = JobStore(r)
    ids = store.batch_job_ids("held")
    for q in keys.queue_lists("tiny"):
        r.delete(q)  # the messages are with the workers now
    store.transition_many([(ids[0], {})], CANCELLED, (QUEUED,))
    r.sadd(keys.WORKERS, "w-dead")
    r.hset(keys.worker_held("w-dead"), mapping={ids[0]: "t0", ids[1]: "t1", ids[2]: "t2"})
    beat(r, "w-live", current_batch_size="1", buffered="0", current_bucket="256x256:4")
    r.hset(keys.worker_held("w-live"), mapping={ids[3]: "t3", ids[4]: "t4", ids[5]: "t5"})
    view = obs.observe(r, ["tiny"])["tiny"]
    assert view.queued == 0
    assert view.in_flight_by_bucket == {"256x256:4": 5.0}, "2 not ended of the dead worker's 3, and 3 live"
