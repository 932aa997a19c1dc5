"""Crash safety with real processes: SIGKILL mid-batch, poison jobs, SIGTERM drain, Redis restarts and
storage outages. Every job ends with exactly one outcome and exactly one object per file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from sdfleet.redisconn import PrivateRedis, free_port
from tests.conftest import ROOT, run_cli, wait_until

FAST_BEATS = {"SDFLEET_HEARTBEAT_INTERVAL": "0.3", "SDFLEET_HEARTBEAT_TTL": "1.5"}


def jsonl(tmp_path: Path, rows: list[dict], name: str = "jobs.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return p


def null_jobs(n: int, prefix: str = "p", **extra) -> list[dict]:
    return [{"prompt": f"{prefix}{i}", "custom_id": f"{prefix}{i}", "model": "null", "width": 256, "height": 256,
             **extra} for i in range(n)]


def counts(r: redis.Redis, batch: str) -> dict[str, int]:
    return {k: int(v) for k, v in r.hgetall(f"sdfleet:batch:{batch}:counts").items()}


@pytest.fixture
def janitor(env, tmp_path):
    procs = []

    def _start(e=None):
        # Its log is kept (``_start.log()``): a failure of a reclaim test is read from what the sweep did.
        with open(tmp_path / f"janitor-{len(procs)}.log", "w") as log:  # the child keeps its own copy
            p = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "janitor", "--interval", "0.3"],
                                 env={**env, **FAST_BEATS, **(e or {})}, cwd=ROOT, stdout=log,
                                 stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    _start.log = lambda: "".join(f.read_text(errors="replace") for f in sorted(tmp_path.glob("janitor-*.log")))
    yield _start
    for p in procs:
        p.kill()
        p.wait(10)


def objects(env, batch: str, *, partial: bool = False) -> list[str]:
    """The batch's stored objects, or with ``partial`` the hidden ``.tmp-*`` files of interrupted writes
    (the store writes to one and renames it: a worker killed mid-write leaves it behind, never a torn object)."""
    root = Path(env["SDFLEET_OUT"][len("file://"):]) / batch
    names = sorted(p.name for p in root.iterdir()) if root.exists() else []
    return [n for n in names if n.startswith(".tmp-") == partial]


def test_sigkill_mid_batch_every_job_is_redone_exactly_once(tmp_path, env, r, start_worker, janitor):
    from sdfleet.webhooks.signing import new_secret
    from tests.webhook_receiver import start_receiver

    secret = new_secret()
    receiver = start_receiver()
    hooks = {**FAST_BEATS, "SDFLEET_WEBHOOK_SECRET": secret, "SDFLEET_WEBHOOK_ALLOW_PRIVATE": "1"}
    janitor()
    webhook_worker = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "webhook-worker"],
                                      env={**env, **hooks}, cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
    try:
        _sigkill_mid_batch(tmp_path, env, r, start_worker, receiver, secret, hooks)
    finally:
        webhook_worker.kill()
        webhook_worker.wait(10)
        receiver.stop()


def _sigkill_mid_batch(tmp_path, env, r, start_worker, receiver, secret, hooks):
    from standardwebhooks import Webhook

    f = jsonl(tmp_path, null_jobs(24, webhook=receiver.url("/hook")))
    assert run_cli(["submit", str(f), "--batch", "kill"], {**env, **hooks}).returncode == 0
    a = start_worker("--max-batch", "4", "--null-delay-ms", "400", model="null", env_extra=hooks)
    wait_until(lambda: counts(r, "kill").get("succeeded", 0) >= 4 and counts(r, "kill").get("running", 0) > 0,
               30, "a batch in flight")
    a.stop(signal.SIGKILL)
    start_worker("--max-batch", "4", model="null", env_extra=hooks)
    wait_until(lambda: counts(r, "kill").get("succeeded", 0) == 24, 60, "all jobs to succeed")
    assert {k: v for k, v in counts(r, "kill").items() if v} == {"succeeded": 24}
    # (manifest.jsonl is written by the webhook worker once the batch has completed)
    expected = sorted(f"p{i}{ext}" for i in range(24) for ext in (".json", ".png"))
    assert [o for o in objects(env, "kill") if o != "manifest.jsonl"] == expected
    # the only leftovers: partial writes of this batch's objects, if the killed worker died inside one
    # (".tmp-<pid>-<thread>-<name>"; sweeping them is not implemented yet)
    assert all(n.split("-", 3)[-1] in expected for n in objects(env, "kill", partial=True))
    attempts = [int(r.hget(f"sdfleet:job:{jid}", "attempts")) for jid in r.lrange("sdfleet:batch:kill:jobs", 0, -1)]
    assert max(attempts) == 2, "the jobs of the killed batch ran twice, the others once"
    def job_messages_unacked() -> int:  # (webhook deliveries in flight are unacked too, legitimately)
        return sum(1 for raw in r.hvals("unacked") if json.loads(raw)[2] == "sdfleet.gen.null")

    wait_until(lambda: job_messages_unacked() == 0, 10, "the last acknowledgements")
    assert r.llen("sdfleet.gen.null") == 0
    # Exactly one terminal webhook per job (a resend would carry the same webhook-id), all verified.
    ids_per_job: dict[str, set] = {}

    def all_announced():
        ids_per_job.clear()
        for q in receiver.got("/hook"):
            payload = Webhook(secret).verify(q.body, q.headers)
            if payload["type"] == "job.succeeded":
                ids_per_job.setdefault(payload["data"]["job_id"], set()).add(q.headers["webhook-id"])
        return len(ids_per_job) == 24

    wait_until(all_announced, 30, "a webhook for every job")
    assert all(len(v) == 1 for v in ids_per_job.values())


def test_poison_job_fails_after_killing_three_workers(tmp_path, env, r, start_worker, janitor):
    janitor()
    f = jsonl(tmp_path, [*null_jobs(3), {"prompt": "segfault", "custom_id": "bad", "model": "null",
                                         "width": 256, "height": 256}])
    assert run_cli(["submit", str(f), "--batch", "poison"], env).returncode == 0
    deaths = 0
    while deaths < 6:
        w = start_worker("--max-batch", "1", "--null-crash-prompt", "segfault", model="null", env_extra=FAST_BEATS)
        try:
            w.proc.wait(15)
            deaths += 1
        except subprocess.TimeoutExpired:
            break  # this worker survived: the poison job no longer reaches it
    assert deaths == 3
    wait_until(lambda: counts(r, "poison").get("succeeded", 0) == 3 and counts(r, "poison").get("failed") == 1,
               30, lambda: f"the batch to end ({counts(r, 'poison')}, {[r.hgetall('sdfleet:job:' + j) for j in r.lrange('sdfleet:batch:poison:jobs', 0, -1)]} q={r.lrange('sdfleet.gen.null', 0, -1)} unacked={r.hkeys('unacked')} held={[(k, r.hgetall(k)) for k in r.keys('sdfleet:worker:*:held')]} marks={r.keys('sdfleet:worker:*')})\n"
               f"janitor: {janitor.log()[-6000:]}")
    bad = r.hget("sdfleet:batch:poison:custom", "bad")
    rec = r.hgetall(f"sdfleet:job:{bad}")
    assert rec["status"] == "failed" and "poison" in rec["error"] and "3 times" in rec["error"]
    res = run_cli(["wait", "poison"], env)
    assert res.returncode == 1


def test_sigterm_finishes_the_current_batch_and_exits_zero(tmp_path, env, r, start_worker):
    f = jsonl(tmp_path, null_jobs(12))
    assert run_cli(["submit", str(f), "--batch", "drain"], env).returncode == 0
    w = start_worker("--max-batch", "3", "--null-delay-ms", "1500", model="null")
    wait_until(lambda: counts(r, "drain").get("running", 0) > 0, 30, "a batch to start")
    running_before = counts(r, "drain")["running"]
    assert w.stop(signal.SIGTERM, timeout=30) == 0, w.log()[-3000:]
    c = counts(r, "drain")
    assert c.get("running", 0) == 0, f"a job was left running: {c}"
    assert c.get("succeeded", 0) >= running_before
    # Nothing the worker held is lost: a second worker finishes the rest.
    start_worker("--max-batch", "3", model="null")
    wait_until(lambda: counts(r, "drain").get("succeeded", 0) == 12, 60, "the rest to succeed")
    attempts = [int(r.hget(f"sdfleet:job:{jid}", "attempts")) for jid in r.lrange("sdfleet:batch:drain:jobs", 0, -1)]
    assert attempts == [1] * 12, "a drained worker must not leave jobs half-done"
    assert objects(env, "drain") == sorted(f"p{i}{ext}" for i in range(12) for ext in (".json", ".png"))


def test_redis_restart_mid_run_loses_nothing(tmp_path, env, start_worker, janitor):
    data = tmp_path / "redis-data"
    data.mkdir()
    port = free_port()
    server = PrivateRedis(appendonly=True, port=port, data_dir=str(data))
    url = f"redis://127.0.0.1:{port}/0"
    e = {**env, "REDIS_URL": url, "SDFLEET_VISIBILITY_TIMEOUT": "60"}
    rr = redis.Redis.from_url(url, decode_responses=True)
    try:
        f = jsonl(tmp_path, null_jobs(40))
        assert run_cli(["submit", str(f), "--batch", "rr"], e).returncode == 0
        janitor(e)
        w = start_worker("--max-batch", "4", "--null-delay-ms", "200", model="null",
                         env_extra={**e, **FAST_BEATS}, wait=False)
        wait_until(lambda: counts(rr, "rr").get("succeeded", 0) >= 8, 60, "progress before the restart")
        server.proc.kill()
        server.proc.wait(10)
        time.sleep(1.0)
        server = PrivateRedis(appendonly=True, port=port, data_dir=str(data))
        wait_until(lambda: counts(rr, "rr").get("succeeded", 0) == 40, 120, "all jobs after the restart")
        assert w.proc.poll() is None, "the worker survived the restart"
        assert {k: v for k, v in counts(rr, "rr").items() if v} == {"succeeded": 40}
        assert objects(e, "rr") == sorted(f"p{i}{ext}" for i in range(40) for ext in (".json", ".png"))
        # A producer reconnects too.
        g = jsonl(tmp_path, null_jobs(2, prefix="after"), "after.jsonl")
        assert run_cli(["submit", str(g), "--batch", "rr2", "--wait"], e, timeout=60).returncode == 0
    finally:
        server.stop()


def test_storage_outage_delays_but_never_loses_or_fakes_success(tmp_path, env, start_worker, r):
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket="outage")
    e = {**env, **creds, "SDFLEET_S3_ENDPOINT_URL": endpoint, "SDFLEET_UPLOAD_RETRIES": "2"}
    f = jsonl(tmp_path, null_jobs(6))
    assert run_cli(["submit", str(f), "--batch", "out", "--out", "s3://outage/x"], e).returncode == 0
    server.stop()  # the endpoint now refuses connections
    try:
        w = start_worker("--max-batch", "3", model="null", env_extra=e)
        time.sleep(6)
        c = counts(r, "out")
        assert c.get("succeeded", 0) == 0, "nothing may be marked done while storage is down"
        assert "storage failed" in w.log()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        wait_until(lambda: counts(r, "out").get("succeeded", 0) == 6, 90, "the batch once storage is back")
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="outage")["Contents"])
        assert keys == sorted(f"x/out/p{i}{ext}" for i in range(6) for ext in (".json", ".png"))
        attempts = [int(r.hget(f"sdfleet:job:{j}", "attempts")) for j in r.lrange("sdfleet:batch:out:jobs", 0, -1)]
        assert max(attempts) <= 1, "storage outages must not count towards the poison limit"
    finally:
        server.stop()
