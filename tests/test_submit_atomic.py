"""Submission is all or nothing: real Redis, real ``sdfleet submit`` processes killed at random points.

No worker runs here: what a worker would consume is counted in the queue's Redis list.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.submit import job_id_for
from sdfleet import keys
from sdfleet.errors import LeaseLost
from sdfleet.state import JobStore, StagedJob, staging_ttl_s
from tests.conftest import ROOT, run_cli

N = 20_000
LEASE_S = "3"


def _jobs_file(tmp_path: Path, n: int = N) -> Path:
    p = tmp_path / "jobs.jsonl"
    with p.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"prompt {i}", "custom_id": f"c{i}", "width": 256, "height": 256,
                                "steps": 4, "seed": i}) + "\n")
    return p


def _recorded(r, batch: str, n: int) -> int:
    """How many of the batch's n jobs have a record."""
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.exists(keys.job(job_id_for(batch, f"c{i}")))
    return sum(pipe.execute())


def _batch_keys(r, batch: str) -> list[str]:
    return [k for k in (keys.batch(batch), keys.batch_jobs(batch), keys.batch_counts(batch),
                        keys.batch_custom_ids(batch)) if r.exists(k)]


def test_sigkill_at_random_points_leaves_all_or_nothing(tmp_path, env, r):
    jobs = _jobs_file(tmp_path)
    e = {**env, "SDFLEET_SUBMISSION_LEASE_S": LEASE_S}
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    kills = 6
    # One kill in each slice of the first ~9 s (a whole submit takes 3-8 s here), so reading, staging,
    # publishing, the commit and the exit all get hit across runs.
    delays = [0.3 + (k + rng.random()) * 9.0 / kills for k in range(kills)]
    outcomes = []
    for k, delay in enumerate(delays):
        batch, model = f"kill{k}", f"kill{k}"
        proc = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "submit", str(jobs), "--batch", batch,
                                 "--model", model], env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        committed = r.exists(keys.batch(batch))
        messages = sum(r.llen(q) for q in keys.queue_lists(model))  # every priority list of the queue
        what = f"seed={seed} kill {k} at {delay:.2f}s, rc={proc.returncode}"
        if committed:
            assert _recorded(r, batch, N) == N, what
            assert r.hget(keys.batch(batch), "total") == str(N), what
            assert r.llen(keys.batch_jobs(batch)) == N and r.hlen(keys.batch_custom_ids(batch)) == N, what
            assert r.hget(keys.batch_counts(batch), "queued") == str(N), what
            assert messages == N, what  # every recorded job has its message
            assert r.ttl(keys.batch(batch)) > 0 and not r.exists(keys.submission(batch)), what
        else:
            assert _recorded(r, batch, N) == 0 and _batch_keys(r, batch) == [], what
            assert messages <= N, what  # published before the kill: they name no job, workers drop them
            for staging in r.keys(f"sdfleet:batch:{batch}:staging:*"):  # invisible, and gone soon after the lease
                assert 0 < r.pttl(staging) <= staging_ttl_s(float(LEASE_S)) * 1000, what
        # wait always ends: exit 3 with what is still queued (committed: at its timeout), exit 2 once the
        # lease is gone (uncommitted: the timeout outlasts the 3 s lease, so the wait must see it end)
        res = run_cli(["wait", batch, "--timeout", "2" if committed else "8"], env, timeout=60)
        assert res.returncode == (3 if committed else 2), (what, res.stderr)
        assert ("20000 still queued" in res.stderr) if committed else ("no batch" in res.stderr), res.stderr
        assert "Traceback" not in res.stderr
        outcomes.append(bool(committed))
    print(f"seed={seed} delays={[round(d, 2) for d in delays]} committed={outcomes}")


def test_failed_line_serialisation_and_lone_surrogates_write_nothing(tmp_path, env, r):
    lines = [json.dumps({"prompt": f"p{i}"}) for i in range(1999)] + ['{"prompt": "x\\ud800"}']
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    res = run_cli(["submit", str(f), "--batch", "sur"], env)
    assert res.returncode == 2, res.stderr
    assert "line 2000" in res.stderr and "surrogate" in res.stderr and "Traceback" not in res.stderr
    assert r.dbsize() == 0
    res = run_cli(["wait", "sur", "--timeout", "1"], env)
    assert res.returncode == 2 and "no batch" in res.stderr


def test_second_submission_to_a_batch_is_refused_while_the_first_holds_the_lease(tmp_path, env, r):
    store = JobStore(r)
    assert store.acquire_submission("busy", "other-producer", 8)
    f = tmp_path / "p.txt"
    f.write_text("a cat\n")
    res = run_cli(["submit", str(f), "--batch", "busy"], env)
    assert res.returncode == 2 and "in progress" in res.stderr and "--batch" in res.stderr, res.stderr
    assert r.get(keys.submission("busy")) == "other-producer"  # not taken over, not deleted
    st = run_cli(["status", "busy"], env)
    assert st.returncode == 0 and "submission in progress" in st.stdout, st.stdout + st.stderr
    res = run_cli(["wait", "busy", "--timeout", "0.2"], env)
    assert res.returncode == 3 and "submission in progress" in res.stderr, res.stderr
    # The other producer died: its lease expires, and a wait without a timeout ends by itself.
    res = run_cli(["wait", "busy"], env, timeout=30)
    assert res.returncode == 2 and "no batch 'busy'" in res.stderr, res.stderr
    assert run_cli(["submit", str(f), "--batch", "busy"], env).returncode == 0
    assert r.hget(keys.batch("busy"), "total") == "1"


def test_commit_refuses_a_lost_lease_and_a_refused_submission_hands_the_lease_back(tmp_path, env, r):
    store = JobStore(r)
    assert store.acquire_submission("lost", "t1", 30)
    store.stage("lost", "t1", [StagedJob("j1", "c1", json.dumps({"prompt": "a", "model": "tiny"}))])
    r.delete(keys.submission("lost"))  # expired while the producer was stalled
    assert store.acquire_submission("lost", "t2", 30)  # another producer took the batch meanwhile
    with pytest.raises(LeaseLost):
        store.commit_submission("lost", "t1", name="lost")
    assert not r.exists(keys.job("j1")) and _batch_keys(r, "lost") == []
    assert r.get(keys.submission("lost")) == "t2"
    store.release_submission("lost", "t1")  # not ours: left alone
    assert r.get(keys.submission("lost")) == "t2"
    store.release_submission("lost", "t2")
    assert not r.exists(keys.submission("lost"))

    # A submission refused after taking the lease (a conflict) gives it back at once.
    f = tmp_path / "p.txt"
    f.write_text("a cat\n")
    assert run_cli(["submit", str(f), "--batch", "conf"], env).returncode == 0
    res = run_cli(["submit", str(f), "--batch", "conf", "--steps", "9"], env)
    assert res.returncode == 2 and "line-000001 (steps)" in res.stderr
    assert not r.exists(keys.submission("conf"))
    assert [k for k in r.keys("sdfleet:batch:conf:staging:*")] == []
