"""Celery's own tools against a running fleet: `celery -A sdfleet inspect|control|purge`, events, Flower.

Real Redis, real `sdfleet worker` processes (null engine), real `celery` and `flower` processes.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from sdfleet.queue import GENERATE_TASK, make_app
from sdfleet.redisconn import free_port
from sdfleet.settings import Settings
from tests.conftest import ROOT, run_cli

SLOW = ("--max-batch", "2", "--max-wait-ms", "20", "--null-delay-ms", "1500")


def jsonl(tmp_path: Path, n: int, prefix: str = "p", name: str = "jobs.jsonl", **extra) -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps({"prompt": f"{prefix}{i}", "custom_id": f"{prefix}{i}", "model": "null",
                                     "width": 256, "height": 256, **extra}) + "\n" for i in range(n)))
    return p


def celery(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "celery", "-A", "sdfleet", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def counts(r, batch: str) -> dict[str, int]:
    return {k: int(v) for k, v in r.hgetall(f"sdfleet:batch:{batch}:counts").items() if int(v)}


def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def subscriptions(r) -> int:
    """Channels and patterns subscribed by the connections on ``r``'s database. Not PUBSUB NUMPAT/CHANNELS:
    they count the whole server's, which another pytest-xdist worker's tests (another database) change."""
    db = int(r.connection_pool.connection_kwargs.get("db", 0))
    return sum(int(c.get("sub", 0)) + int(c.get("psub", 0)) for c in r.client_list() if int(c.get("db", -1)) == db)


def job_ids(r, batch: str) -> dict[str, str]:
    return r.hgetall(f"sdfleet:batch:{batch}:custom")


def test_inspect_ping_stats_active_reserved(tmp_path, env, r, start_worker):
    w = start_worker(*SLOW, model="null")
    assert run_cli(["submit", str(jsonl(tmp_path, 24)), "--batch", "insp"], env).returncode == 0
    ids = job_ids(r, "insp")
    wait_until(lambda: r.hget(f"sdfleet:worker:{w.worker_id}", "state") == "busy", 30, "a batch in the engine")
    hostname = f"sdfleet@{w.worker_id}"

    ping = celery(["inspect", "ping", "--json", "-t", "5"], env)
    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout) == {hostname: {"ok": "pong"}}

    # The rest through the same public API in-process (each `celery` command costs seconds to start here).
    insp = make_app(Settings(redis_url=env["REDIS_URL"])).control.inspect(timeout=5, destination=[hostname])
    stats = insp.stats()[hostname]
    assert stats["pool"]["implementation"].endswith("solo:TaskPool")
    assert stats["prefetch_count"] >= 2 * 2  # a full batch can form while another runs
    for _ in range(20):  # the first reply may fall between two batches on a loaded machine
        active, reserved = insp.active()[hostname], insp.reserved()[hostname]
        if active and reserved:
            break
        time.sleep(0.2)
    assert 1 <= len(active) <= 2
    for task in active:
        assert task["name"] == GENERATE_TASK and task["id"] in ids.values()
        assert task["kwargs"]["job_id"] == task["id"] and task["time_start"]
    assert reserved and {t["id"] for t in reserved} <= set(ids.values()), (reserved, active)
    assert not {t["id"] for t in reserved} & {t["id"] for t in active}
    wait_until(lambda: counts(r, "insp") == {"succeeded": 24}, 90, "the batch")


def test_events_for_every_job_and_worker_heartbeats(tmp_path, env, r, start_worker):
    app = make_app(Settings(redis_url=env["REDIS_URL"]))
    seen: list[dict] = []
    ready = threading.Event()
    stop = threading.Event()

    def listen():
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"*": seen.append})
            ready.set()
            while not stop.is_set():
                try:
                    recv.capture(limit=None, timeout=0.5, wakeup=False)
                except (TimeoutError, OSError):
                    continue
                except Exception as exc:  # socket.timeout on older kombu
                    if "timed out" not in str(exc):
                        raise

    subscribed = subscriptions(r)
    t = threading.Thread(target=listen, daemon=True)
    t.start()
    ready.wait(10)
    # kombu subscribes to the event exchange on the receiver's first drain, not when it is made: wait for it, or
    # on a loaded machine the first events (the worker gathers task-received into one message) go unheard.
    wait_until(lambda: subscriptions(r) > subscribed, 30, "the event receiver")
    start_worker("--max-batch", "4", model="null")
    f = jsonl(tmp_path, 10)
    assert run_cli(["submit", str(f), "--batch", "ev"], env).returncode == 0
    # One job fails in the engine: it must show as task-failed.
    g = tmp_path / "bad.jsonl"
    g.write_text(json.dumps({"prompt": "x", "custom_id": "x", "model": "null", "width": 256, "height": 256}) + "\n")
    wait_until(lambda: counts(r, "ev") == {"succeeded": 10}, 60, "the batch")
    time.sleep(2.5)  # one more heartbeat and the last buffered task events
    stop.set()
    t.join(5)
    ids = set(job_ids(r, "ev").values())
    by_type: dict[str, set[str]] = {}
    for e in seen:
        by_type.setdefault(e["type"], set()).add(e.get("uuid"))
    for kind in ("task-received", "task-started", "task-succeeded"):
        assert ids <= by_type.get(kind, set()), f"{kind} missing for some jobs"
    assert "worker-heartbeat" in by_type and "worker-online" in by_type


def test_flower_shows_workers_tasks_and_queues(tmp_path, env, r, start_worker):
    w = start_worker("--max-batch", "4", model="null")
    port = free_port()
    flower_env = {**env, "FLOWER_UNAUTHENTICATED_API": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "sdfleet", "flower", f"--port={port}",
                             "--address=127.0.0.1"], env=flower_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _get(f"{base}/healthcheck") == "OK", 60, "flower to start")
        time.sleep(1.0)  # flower subscribes to events right after it starts listening
        assert run_cli(["submit", str(jsonl(tmp_path, 6)), "--batch", "fl"], env).returncode == 0
        wait_until(lambda: counts(r, "fl") == {"succeeded": 6}, 60, "the batch")
        ids = set(job_ids(r, "fl").values())

        def tasks_ok():
            tasks = json.loads(_get(f"{base}/api/tasks") or "{}")
            return tasks if ids <= {k for k, v in tasks.items() if v.get("state") == "SUCCESS"} else None

        tasks = wait_until(tasks_ok, 30, "flower to see every job succeed")
        assert all(tasks[i]["name"] == GENERATE_TASK for i in ids)
        workers = json.loads(_get(f"{base}/api/workers?refresh=1"))
        assert f"sdfleet@{w.worker_id}" in workers
        queues = json.loads(_get(f"{base}/api/queues/length") or "{}")
        assert any(q["name"] == "sdfleet.gen.null" for q in queues.get("active_queues", []))
    finally:
        proc.terminate()
        proc.wait(10)


def _get(url: str) -> str | None:
    try:
        resp = httpx.get(url, timeout=5)
        return resp.text if resp.status_code == 200 else None
    except httpx.HTTPError:
        return None


def test_revoke_before_running_cancels_records_and_announces(tmp_path, env, r, start_worker):
    start_worker(*SLOW, model="null")
    assert run_cli(["submit", str(jsonl(tmp_path, 8)), "--batch", "rv", "--webhook",
                    "https://hooks.example.com/x"], env).returncode == 0
    ids = job_ids(r, "rv")
    victim = ids["p7"]  # last in line: still in the queue while the first batches run
    res = celery(["control", "revoke", victim], env)
    assert res.returncode == 0, res.stderr
    wait_until(lambda: r.hget(f"sdfleet:job:{victim}", "status") == "cancelled", 20, "the revoke")
    rec = r.hgetall(f"sdfleet:job:{victim}")
    assert rec["error"] == "revoked"
    wait_until(lambda: counts(r, "rv") == {"succeeded": 7, "cancelled": 1}, 90, "the batch mates")
    # Its webhook was enqueued (the webhook worker delivers it): job.cancelled for the victim.
    kwargs = [json.loads(base64.b64decode(json.loads(m)["body"]))[1] for m in r.lrange("sdfleet.webhooks", 0, -1)]
    bodies = [json.loads(k["delivery"]["body"]) for k in kwargs if "delivery" in k]
    assert any(b["type"] == "job.cancelled" and b["data"]["job_id"] == victim for b in bodies)


def test_sdfleet_cancel_goes_through_revoke(tmp_path, env, r, start_worker):
    w = start_worker(*SLOW, model="null")
    assert run_cli(["submit", str(jsonl(tmp_path, 10)), "--batch", "cx"], env).returncode == 0
    wait_until(lambda: r.hget(f"sdfleet:worker:{w.worker_id}", "state") == "busy", 30, "a batch in the engine")
    res = run_cli(["cancel", "cx"], env)
    assert res.returncode == 0, res.stderr
    wait_until(lambda: counts(r, "cx").get("running", 0) == 0 and counts(r, "cx").get("storing", 0) == 0
               and counts(r, "cx").get("queued", 0) == 0, 60, "the running batch to finish")
    c = counts(r, "cx")
    assert c.get("cancelled", 0) >= 4 and c.get("succeeded", 0) + c["cancelled"] == 10
    revoked = json.loads(celery(["inspect", "revoked", "--json", "-t", "5"], env).stdout)
    cancelled = {j for j in job_ids(r, "cx").values() if r.hget(f"sdfleet:job:{j}", "status") == "cancelled"}
    assert cancelled <= set(revoked[f"sdfleet@{w.worker_id}"])


def test_purge_is_not_undone_and_status_agrees(tmp_path, env, r, start_worker):
    fast = {"SDFLEET_HEARTBEAT_INTERVAL": "0.3", "SDFLEET_HEARTBEAT_TTL": "1.5", "SDFLEET_SWEEP_INTERVAL_S": "0.5"}
    assert run_cli(["submit", str(jsonl(tmp_path, 12)), "--batch", "pg"], env).returncode == 0
    res = celery(["purge", "-Q", "sdfleet.gen.null", "-f"], env)
    assert res.returncode == 0, res.stderr
    wait_until(lambda: counts(r, "pg") == {"cancelled": 12}, 20, "purged jobs to end cancelled")
    rec = r.hgetall(f"sdfleet:job:{job_ids(r, 'pg')['p0']}")
    assert rec["status"] == "cancelled" and "purged from queue sdfleet.gen.null" in rec["error"]
    # A worker (with its reclaim sweep) does not bring them back.
    start_worker(model="null", env_extra=fast)
    time.sleep(6)
    assert counts(r, "pg") == {"cancelled": 12}
    st = json.loads(run_cli(["status", "pg", "--json"], env).stdout)
    assert st["counts"]["cancelled"] == 12 and st["counts"]["queued"] == 0


def test_a_message_with_a_celery_priority_is_served(tmp_path, env, r, start_worker):
    assert run_cli(["submit", str(jsonl(tmp_path, 2)), "--batch", "pri"], env).returncode == 0
    # Take the plain messages off and publish the same jobs again with priorities, as a Celery user would.
    app = make_app(Settings(redis_url=env["REDIS_URL"]))
    msgs = [json.loads(r.rpop("sdfleet.gen.null")) for _ in range(2)]
    assert r.llen("sdfleet.gen.null") == 0
    for msg, pri in zip(msgs, (3, 9)):
        body = json.loads(base64.b64decode(msg["body"]))
        app.send_task(GENERATE_TASK, kwargs=body[1], queue="sdfleet.gen.null", task_id=msg["headers"]["id"],
                      priority=pri)
    start_worker(model="null")
    wait_until(lambda: counts(r, "pri") == {"succeeded": 2}, 30, "prioritised jobs to run")


@pytest.mark.parametrize("cmd", [["inspect", "registered", "--json", "-t", "5"]])
def test_the_app_location_names_the_generation_task(env, start_worker, cmd):
    w = start_worker(model="null")
    res = celery(cmd, env)
    assert res.returncode == 0, res.stderr
    assert GENERATE_TASK in json.loads(res.stdout)[f"sdfleet@{w.worker_id}"]
