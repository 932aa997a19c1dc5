"""Housekeeping against a real Redis and real files: batch completion, state expiry, partial-file sweep."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from scheduler.housekeeping import housekeep
from sdfleet import keys
from sdfleet.logs import get as get_log
from sdfleet.settings import Settings
from sdfleet.state import JobStore
from sdfleet.storage import StorageFactory
from tests.conftest import run_cli

LOG = get_log("test")


def submit(tmp_path: Path, env: dict[str, str], batch: str, n: int = 3) -> list[str]:
    f = tmp_path / f"{batch}.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}", "custom_id": f"c{i}", "width": 256, "height": 256,
                                     "steps": 2}) + "\n" for i in range(n)))
    res = run_cli(["submit", str(f), "--batch", batch], env)
    assert res.returncode == 0, res.stderr
    import redis

    return redis.Redis.from_url(env["REDIS_URL"], decode_responses=True).lrange(keys.batch_jobs(batch), 0, -1)


def all_done(r, batch: str, n: int) -> None:
    """The batch's counts as the transition script leaves them when every job has succeeded."""
    r.hset(keys.batch_counts(batch), mapping={"queued": 0, "running": 0, "succeeded": n})


def run(r, settings: Settings, *, now: float | None = None) -> dict[str, int]:
    storage = StorageFactory(None, "us-east-1", 0)
    return housekeep(r, JobStore(r), storage, settings, LOG, now=now, force=True)


def test_a_batch_whose_counts_are_done_is_completed_once(tmp_path, env, r) -> None:
    settings = Settings.from_env(env)
    submit(tmp_path, env, "late")
    submit(tmp_path, env, "open")
    submit(tmp_path, env, "leased")
    r.delete(keys.WEBHOOK_QUEUE)
    for b in ("late", "leased"):
        all_done(r, b, 3)
        r.hdel(keys.batch(b), "completed_at")
    r.set(keys.submission("leased"), "token", ex=60)  # still being submitted: its total may grow
    totals = run(r, settings)
    assert totals["batches_completed"] == 1
    assert r.hget(keys.batch("late"), "completed_at")
    assert not r.hget(keys.batch("open"), "completed_at") and not r.hget(keys.batch("leased"), "completed_at")
    (msg,) = r.lrange(keys.WEBHOOK_QUEUE, 0, -1)
    assert json.loads(msg)["headers"]["task"] == "sdfleet.webhook.batch_completed"
    assert run(r, settings)["batches_completed"] == 0, "completed once"


def test_completed_state_expires_after_the_ttl_and_open_state_never(tmp_path, env, r) -> None:
    settings = Settings.from_env(env, record_ttl_s=1000)
    done_ids = submit(tmp_path, env, "done")
    open_ids = submit(tmp_path, env, "still-open")
    now = time.time()
    all_done(r, "done", 3)
    r.hset(keys.batch("done"), "completed_at", f"{now - 100:.6f}")
    assert run(r, settings, now=now)["batches_marked_expiring"] == 1
    for k in [keys.job(done_ids[0]), keys.batch("done"), keys.batch_jobs("done")]:
        assert 850 <= r.ttl(k) <= 900, f"{k}: TTL {r.ttl(k)}, expected the rest of 1000 s after completion"
    assert r.ttl(keys.job(open_ids[0])) > 1000, "an open batch keeps its submit-time TTL"
    assert run(r, settings, now=now)["batches_marked_expiring"] == 0, "marked once per completion"

    later = now + 2000
    totals = run(r, settings, now=later)
    assert totals["batches_deleted"] == 1
    assert not r.exists(keys.batch("done"), keys.job(done_ids[0]), keys.batch_counts("done"))
    assert r.zscore(keys.BATCHES, "done") is None
    assert r.exists(keys.batch("still-open")) and r.exists(keys.job(open_ids[0]))
    # An index entry whose batch Redis expired by itself is dropped.
    r.zadd(keys.BATCHES, {"vanished": now - 5000})
    run(r, settings, now=later)
    assert r.zscore(keys.BATCHES, "vanished") is None


def test_old_partial_files_are_swept(tmp_path, env, r) -> None:
    settings = Settings.from_env(env, partial_file_grace_s=600)
    submit(tmp_path, env, "files")
    out = Path(env["SDFLEET_OUT"][len("file://"):]) / "files"
    out.mkdir(parents=True, exist_ok=True)
    now = time.time()
    paths = {}
    for name, age in (("c0.png", 99999), (".tmp-1-2-c1.png", 700), (".tmp-1-2-c2.png", 10),
                      (".run-w1-3-c3.png", 700), (".run-w1-3-c4.png", 99999)):
        p = out / name
        p.write_bytes(b"x")
        os.utime(p, (now - age, now - age))
        paths[name] = p
    assert run(r, settings, now=now)["partial_files_removed"] == 2
    left = sorted(p.name for p in out.iterdir())
    # Staged objects wait out the visibility timeout (7200 s): their run could still promote them before.
    assert left == sorted(["c0.png", ".tmp-1-2-c2.png", ".run-w1-3-c3.png"])


def test_one_pass_per_interval_across_the_fleet(env, r) -> None:
    settings = Settings.from_env(env)
    storage = StorageFactory(None, "us-east-1", 0)
    assert housekeep(r, JobStore(r), storage, settings, LOG) != {}
    assert housekeep(r, JobStore(r), storage, settings, LOG) == {}, "a second sweeper within the interval skips"
    assert 0 < r.ttl(keys.HOUSEKEEPING_DUE) <= keys.HOUSEKEEPING_INTERVAL_S


def test_a_big_batch_is_expired_over_several_bounded_passes(tmp_path, env, r) -> None:
    from scheduler.housekeeping import delete_expired, mark_expiry

    ids = submit(tmp_path, env, "big", n=25)
    now = time.time()
    all_done(r, "big", 25)
    r.hset(keys.batch("big"), "completed_at", f"{now:.6f}")
    assert mark_expiry(r, ["big"], 1000, now, budget=10) == 0, "not finished in one pass of 10"
    assert r.ttl(keys.job(ids[9])) <= 1000 < r.ttl(keys.job(ids[10]))
    assert mark_expiry(r, ["big"], 1000, now, budget=10) == 0
    assert mark_expiry(r, ["big"], 1000, now, budget=10) == 1
    assert all(r.ttl(keys.job(j)) <= 1000 for j in ids) and r.ttl(keys.batch("big")) <= 1000
    assert mark_expiry(r, ["big"], 1000, now, budget=10) == 0, "marked once"
    later = now + 5000
    assert delete_expired(r, 1000, later, LOG, budget=10) == 0
    assert not r.exists(keys.job(ids[0])) and r.exists(keys.job(ids[10]))
    assert delete_expired(r, 1000, later, LOG, budget=10) == 0
    assert delete_expired(r, 1000, later, LOG, budget=10) == 1
    assert not any(r.exists(keys.job(j)) for j in ids) and not r.exists(keys.batch("big"))
