"""Webhooks: URL policy, Standard Webhooks signatures and rotation, retries, Retry-After, 410, dead letters,
replay, Notifier dedupe and batch.completed; against a real HTTP receiver and real worker processes.

Runs on its own Redis database (WEBHOOK_TEST_REDIS_URL, default redis://127.0.0.1:6379/13; under pytest-xdist
the worker's side database of tests/conftest.py), flushed per test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from standardwebhooks import Webhook, WebhookVerificationError

from sdfleet import keys
from sdfleet.errors import ConfigError, WebhookError
from sdfleet.events import JOB_SUCCEEDED, Notifier, event_id
from sdfleet.jobs import parse_job
from sdfleet.queue import make_app
from sdfleet.redisconn import PrivateRedis, ping
from sdfleet.settings import Settings
from sdfleet.state import JobStore
from sdfleet.webhooks import outbox, policy
from sdfleet.webhooks.sender import backoff, parse_retry_after
from sdfleet.webhooks.signing import new_secret, parse_secrets, signed_headers
from tests.conftest import in_xdist, redis_dbs, with_db
from tests.webhook_receiver import Receiver, start_receiver

ROOT = Path(__file__).resolve().parent.parent
NEW, OLD = new_secret(), new_secret()
SCHEDULE = "0.1,0.2"  # three attempts in all


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wh_redis_url() -> str:
    url = os.environ.get("WEBHOOK_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
    if in_xdist():  # each pytest-xdist worker its own side database (tests/conftest.py)
        url = with_db(url, redis_dbs()[1])
    if ping(url):
        return url
    private = PrivateRedis()  # fails with a fix when there is no redis-server at all
    return with_db(private.url, redis_dbs()[1])


@pytest.fixture
def wr(wh_redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(wh_redis_url, decode_responses=True)
    client.flushdb()
    return client


@pytest.fixture(scope="module")
def receiver() -> Receiver:
    rec = start_receiver()
    yield rec
    rec.stop()


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    e.update({"REDIS_URL": redis_url, "SDFLEET_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1",
              "SDFLEET_WEBHOOK_SECRET": f"{NEW} {OLD}", "SDFLEET_WEBHOOK_ALLOW_PRIVATE": "1",
              "SDFLEET_WEBHOOK_SCHEDULE": SCHEDULE, "SDFLEET_WEBHOOK_TIMEOUT": "3"})
    e.update(extra)
    return e


@pytest.fixture(scope="module")
def webhook_worker(wh_redis_url: str, tmp_path_factory):
    """One real ``sdfleet webhook-worker`` process for the module (the DB is flushed under it per test)."""
    log_path = tmp_path_factory.mktemp("whw") / "webhook-worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "webhook-worker", "--threads", "4"],
                            env=_env(wh_redis_url), stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 30
    while "webhook worker ready" not in log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)  # the consumer starts right after the ready line
    yield SimpleNamespace(proc=proc, log_path=log_path)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _settings(url: str, **kw) -> Settings:
    return Settings(redis_url=url, webhook_secret=f"{NEW} {OLD}", webhook_allow_private=True,
                    webhook_schedule=(0.1, 0.2), **kw)


def _job(wr: redis.Redis, url: str, *, hook: str, events=None, batch_id: str | None = None, status="succeeded"):
    """A recorded job outcome (through the real state machine) and the delivery the worker would pass."""
    batch_id = batch_id or "b" + uuid.uuid4().hex[:8]
    job_id = uuid.uuid4().hex
    spec = parse_job({"prompt": "p", "custom_id": "c" + job_id[:6], "seed": 7, "webhook": hook,
                      **({"webhook_events": list(events)} if events is not None else {})})
    wr.hincrby(keys.batch(batch_id), "total", 1)
    wr.hset(keys.job(job_id), mapping={"status": "queued", "batch": batch_id, "custom_id": spec.custom_id,
                                       "spec": spec.model_dump_json()})
    wr.hincrby(keys.batch_counts(batch_id), "queued", 1)
    store = JobStore(wr)
    store.start(job_id, "w1", 3)
    if status == "succeeded":
        tr = store.succeed(job_id, url=f"file:///x/{job_id}.png", sidecar_url=f"file:///x/{job_id}.json",
                           timings=json.dumps({"engine_s": 0.5}))
    else:
        tr = store.fail(job_id, "boom")
    return SimpleNamespace(job_id=job_id, batch_id=batch_id, spec=spec), tr


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdfleet.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def _wait(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- pure functions -----------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://10.0.0.1/x", "http://[::1]:8080/", "http://169.254.169.254/latest/meta-data",
    "http://192.168.1.5", "http://172.16.0.1", "http://0.0.0.0", "http://224.0.0.1", "http://100.64.0.1",
    "http://[::ffff:127.0.0.1]/", "http://[fe80::1]/", "http://[fc00::1]/", "http://2130706433/",
    "http://localhost:9000/", "https://240.0.0.1/",
    # IPv6 forms that reach a refused IPv4 address: 6to4 (2002::/16), Teredo, NAT64, IPv4-compatible
    "http://[2002:7f00:1::1]/", "http://[2002:a9fe:a9fe::1]/latest", "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/",
    "http://[64:ff9b::a00:1]/", "http://[64:ff9b:1::7f00:1]/", "http://[::127.0.0.1]/",
])
def test_private_and_special_addresses_refused(url: str) -> None:
    with pytest.raises(WebhookError, match="address|localhost"):
        policy.check_url(url)
    with pytest.raises(WebhookError):
        policy.target_for(url)
    policy.check_url(url, allow_private=True)  # allowed by configuration


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "gopher://x", "javascript:alert(1)",
                                 "example.com/hook", "http://", "http://exa mple.com/", "http://host:99999/"])
def test_non_http_and_malformed_urls_refused(url: str) -> None:
    with pytest.raises(WebhookError):
        policy.check_url(url, allow_private=True)


def test_public_urls_pass_and_rebinding_is_caught_at_send_time(monkeypatch) -> None:
    policy.check_url("https://8.8.8.8/hook")
    answers = {"hooks.example.test": ["93.184.216.34"]}
    monkeypatch.setattr(policy, "resolve", lambda host, port: answers[host])
    policy.check_url("https://hooks.example.test/h")  # submit time: public
    t = policy.target_for("https://hooks.example.test:8443/h?a=1")
    assert (t.pinned_url, t.host_header) == ("https://93.184.216.34:8443/h?a=1", "hooks.example.test:8443")
    answers["hooks.example.test"] = ["93.184.216.34", "10.1.2.3"]  # the DNS answer changed: one internal address
    with pytest.raises(WebhookError, match="private"):
        policy.target_for("https://hooks.example.test/h")
    with pytest.raises(WebhookError, match="private"):
        policy.check_url("https://hooks.example.test/h")


def test_signature_matches_standardwebhooks_and_rotation() -> None:
    body = json.dumps({"type": "job.succeeded", "data": {"job_id": "j"}})
    headers = signed_headers([NEW, OLD], "msg_abc", int(time.time()), body)
    assert headers["webhook-id"] == "msg_abc"
    sigs = headers["webhook-signature"].split(" ")
    assert len(sigs) == 2 and all(s.startswith("v1,") for s in sigs)
    assert Webhook(NEW).verify(body, headers) == json.loads(body)  # a receiver that knows only the new secret
    assert Webhook(OLD).verify(body, headers)  # ... or only the old one
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(NEW).verify(body + " ", headers)


def test_secret_lists() -> None:
    assert parse_secrets(f" {NEW}, {OLD} {NEW}") == [NEW, OLD]
    assert parse_secrets(None) == []
    with pytest.raises(ConfigError, match="item 2") as exc:
        parse_secrets(f"{NEW} whsec_!!notbase64")
    assert NEW not in str(exc.value)
    s = Settings.from_env({"SDFLEET_WEBHOOK_SECRET": f"{NEW},{OLD}"})
    assert s.webhook_secret == f"{NEW},{OLD}" and NEW not in repr(s)
    with pytest.raises(ConfigError, match="SDFLEET_WEBHOOK_SECRET"):
        Settings.from_env({"SDFLEET_WEBHOOK_SECRET": f"{NEW} plaintext"})


def test_retry_after_and_backoff() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == pytest.approx(20.0)
    assert parse_retry_after("Tue, 14 Nov 2000 22:13:40 GMT", now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None and parse_retry_after(None) is None
    assert parse_retry_after("99999999", now=now) == 24 * 3600
    schedule = (5.0, 30.0, 120.0)
    for made, base in ((1, 5.0), (2, 30.0), (3, 120.0)):
        d = backoff(schedule, made, None)
        assert 0.75 * base <= d <= 1.25 * base
    assert backoff(schedule, 4, None) is None
    assert backoff(schedule, 1, 60.0) == 60.0  # Retry-After later than the schedule wins
    assert event_id("j", JOB_SUCCEEDED, "1.0", "u") == event_id("j", JOB_SUCCEEDED, "1.0", "u") != event_id(
        "j", "job.failed", "1.0", "u")


def test_sender_timeout_and_send_time_refusals(wr, receiver, wh_redis_url) -> None:
    """One attempt at a time, in-process: a slow receiver, a private URL at send time, no secret."""
    from sdfleet import logs
    from sdfleet.webhooks.sender import DEAD, RETRY, Sender

    log = logs.get("test")
    app = make_app(_settings(wh_redis_url))
    slow = f"/slow/{uuid.uuid4().hex}"
    receiver.delays[slow] = 1.0
    sender = Sender(_settings(wh_redis_url, webhook_timeout=0.3), wr, app, log)
    d = outbox.new_delivery(event_id="msg_t", event_type="job.succeeded", url=receiver.url(slow), body="{}",
                            batch_id="b1")
    t0 = time.monotonic()
    assert sender.deliver(d) == RETRY and time.monotonic() - t0 < 0.9
    ((waiting, _),) = outbox.pending(wr)
    assert waiting["attempt"] == 1 and waiting["id"] == "msg_t"

    strict = Sender(Settings(redis_url=wh_redis_url, webhook_secret=NEW), wr, app, log)
    assert strict.deliver({**d, "id": "msg_p", "url": receiver.url("/never")}) == DEAD
    unsigned = Sender(Settings(redis_url=wh_redis_url, webhook_allow_private=True), wr, app, log)
    assert unsigned.deliver({**d, "id": "msg_s", "url": receiver.url("/never")}) == DEAD
    reasons = {e["id"]: e["reason"] for e in outbox.dead(wr)}
    assert "refused at send time" in reasons["msg_p"] and "loopback" in reasons["msg_p"]
    assert "no signing secret" in reasons["msg_s"]
    assert receiver.got("/never") == []
    for s in (sender, strict, unsigned):
        s.close()


# --- with a real webhook worker process --------------------------------------------------------------------

def test_job_webhook_delivered_signed_with_rotation(wr, receiver, webhook_worker, wh_redis_url) -> None:
    path = f"/ok/{uuid.uuid4().hex}"
    notifier = Notifier(_settings(wh_redis_url), wr)
    delivery, tr = _job(wr, wh_redis_url, hook=receiver.url(path))
    notifier(delivery, "succeeded", tr)
    (req,) = receiver.wait_for(path, 1)
    assert len(req.headers["webhook-signature"].split(" ")) == 2
    payload = Webhook(NEW).verify(req.body, req.headers)  # the receiver knows only the new secret
    assert payload["type"] == "job.succeeded" and payload["timestamp"].endswith("Z")
    data = payload["data"]
    assert data["job_id"] == delivery.job_id and data["batch_id"] == delivery.batch_id
    assert data["custom_id"] == delivery.spec.custom_id and data["status"] == "succeeded" and data["seed"] == 7
    assert data["url"].endswith(".png") and data["sidecar_url"].endswith(".json") and data["error"] is None
    assert data["timings"] == {"engine_s": 0.5}
    assert req.headers["webhook-id"] == event_id(delivery.job_id, "job.succeeded",
                                                 wr.hget(keys.job(delivery.job_id), "succeeded_at"), receiver.url(path))


def test_notifier_dedupes_and_filters(wr, receiver, webhook_worker, wh_redis_url) -> None:
    path = f"/dedupe/{uuid.uuid4().hex}"
    notifier = Notifier(_settings(wh_redis_url), wr)
    delivery, tr = _job(wr, wh_redis_url, hook=receiver.url(path), status="failed")
    notifier(delivery, "failed", tr)
    notifier(delivery, "failed", tr)  # a redelivered job announcing the same outcome again
    Notifier(_settings(wh_redis_url), wr)(delivery, "failed", tr)  # ... from another worker process
    (req,) = receiver.wait_for(path, 1)
    payload = Webhook(NEW).verify(req.body, req.headers)
    assert payload["type"] == "job.failed" and payload["data"]["error"] == "boom"
    # Filtered out: this submission asked only for batch.completed.
    other, tr2 = _job(wr, wh_redis_url, hook=receiver.url(path), events=["batch.completed"])
    notifier(other, "succeeded", tr2)
    time.sleep(0.8)
    assert len(receiver.got(path)) == 1


def test_retry_keeps_the_webhook_id(wr, receiver, webhook_worker, wh_redis_url) -> None:
    path = f"/flaky/{uuid.uuid4().hex}"
    receiver.answer(path, 500, 200)
    delivery, tr = _job(wr, wh_redis_url, hook=receiver.url(path))
    Notifier(_settings(wh_redis_url), wr)(delivery, "succeeded", tr)
    first, second = receiver.wait_for(path, 2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    for req in (first, second):
        Webhook(NEW).verify(req.body, req.headers)
    time.sleep(0.5)
    assert len(receiver.got(path)) == 2 and wr.llen(keys.WEBHOOK_DEAD) == 0


def test_retry_after_is_honoured(wr, receiver, webhook_worker, wh_redis_url) -> None:
    path = f"/busy/{uuid.uuid4().hex}"
    receiver.answer(path, (503, {"Retry-After": "1"}), 200)
    delivery, tr = _job(wr, wh_redis_url, hook=receiver.url(path))
    Notifier(_settings(wh_redis_url), wr)(delivery, "succeeded", tr)
    receiver.wait_for(path, 1)
    # The retry waits in Redis (not in a broker ETA message): due about 1 s after the first attempt.
    ((waiting, due),) = _wait(lambda: outbox.pending(wr), what="scheduled retry")
    assert waiting["attempt"] == 1 and waiting["job_id"] == delivery.job_id and "secret" not in json.dumps(waiting)
    first, second = receiver.wait_for(path, 2)
    assert due == pytest.approx(first.at + 1.0, abs=0.3)
    assert second.at - first.at >= 0.95  # the schedule alone would have retried after about 0.1 s


def test_410_disables_the_endpoint(wr, receiver, webhook_worker, wh_redis_url) -> None:
    path = f"/gone/{uuid.uuid4().hex}"
    receiver.answer(path, 410)
    notifier = Notifier(_settings(wh_redis_url), wr)
    delivery, tr = _job(wr, wh_redis_url, hook=receiver.url(path))
    notifier(delivery, "succeeded", tr)
    receiver.wait_for(path, 1)
    dead = _wait(lambda: outbox.dead(wr), what="dead letter")
    assert "410" in dead[0]["reason"] and "disabled" in dead[0]["reason"]
    assert wr.exists(keys.webhook_endpoint_disabled(outbox.url_hash(receiver.url(path))))
    later, tr2 = _job(wr, wh_redis_url, hook=receiver.url(path))
    notifier(later, "succeeded", tr2)
    dead = _wait(lambda: len(outbox.dead(wr)) == 2 and outbox.dead(wr), what="second dead letter")
    assert dead[1]["job_id"] == later.job_id and "endpoint disabled" in dead[1]["reason"]
    time.sleep(0.3)
    assert len(receiver.got(path)) == 1  # nothing more was sent to it


def test_exhausted_schedule_dead_list_and_replay(wr, receiver, webhook_worker, wh_redis_url) -> None:
    path = f"/down/{uuid.uuid4().hex}"
    receiver.answer(path, 500)
    delivery, tr = _job(wr, wh_redis_url, hook=receiver.url(path))
    Notifier(_settings(wh_redis_url), wr)(delivery, "succeeded", tr)
    attempts = receiver.wait_for(path, 3)
    dead = _wait(lambda: outbox.dead(wr), what="dead letter")
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    assert "gave up after 3 attempt(s)" in dead[0]["reason"] and dead[0]["last_status"] == 500
    env = _env(wh_redis_url)
    listed = _cli(["webhooks", "list-failed", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    (entry,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["id"] == attempts[0].headers["webhook-id"] and entry["job_id"] == delivery.job_id
    human = _cli(["webhooks", "list-failed"], env)
    assert entry["id"] in human.stdout and "1 failed delivery" in human.stderr
    assert NEW not in listed.stdout + human.stdout + human.stderr

    receiver.answer(path, 200)
    missing = _cli(["webhooks", "replay", "msg_nope"], env)
    assert missing.returncode == 2 and "msg_nope" in missing.stderr
    replayed = _cli(["webhooks", "replay", entry["id"]], env)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.split() == [entry["id"]]
    got = receiver.wait_for(path, 4)
    assert got[3].headers["webhook-id"] == entry["id"]
    Webhook(NEW).verify(got[3].body, got[3].headers)
    assert wr.llen(keys.WEBHOOK_DEAD) == 0
    assert _cli(["webhooks", "replay"], env).returncode == 2  # neither ids nor --all


def test_submit_refuses_private_webhook_urls(wr, wh_redis_url, tmp_path) -> None:
    env = {**_env(wh_redis_url, SDFLEET_OUT=f"file://{tmp_path / 'out'}"), "SDFLEET_WEBHOOK_ALLOW_PRIVATE": "0"}
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a red fox\n")
    for url in ("http://127.0.0.1:9/x", "http://169.254.169.254/latest", "ftp://example.com/x"):
        res = _cli(["submit", str(jobs), "--webhook", url], env)
        assert res.returncode == 2, res.stderr
        assert "--webhook" in res.stderr
    lines = tmp_path / "jobs.jsonl"
    lines.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "webhook": "http://10.0.0.1/h"}) + "\n")
    res = _cli(["submit", str(lines)], env)
    assert res.returncode == 2 and "line 2" in res.stderr and "webhook" in res.stderr and "private" in res.stderr
    assert wr.zcard(keys.BATCHES) == 0 and wr.llen(keys.queue_for_model("tiny")) == 0  # nothing enqueued


def test_batch_completed_end_to_end(wr, receiver, webhook_worker, wh_redis_url, tmp_path) -> None:
    """Real processes: submit (CLI) -> null GPU worker -> Notifier -> webhook worker -> HTTP."""
    path = f"/batch/{uuid.uuid4().hex}"
    out = tmp_path / "out"
    env = _env(wh_redis_url, SDFLEET_OUT=f"file://{out}")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": f"p{i}", "custom_id": f"c{i}", "model": "null", "width": 256,
                                        "height": 256}) + "\n" for i in range(3)))
    res = _cli(["submit", str(jobs), "--batch", "whbatch", "--webhook", receiver.url(path)], env)
    assert res.returncode == 0, res.stderr
    log_path = tmp_path / "gpu-worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "worker", "--model", "null", "--device", "cpu",
                               "--worker-id", "whtest", "--max-wait-ms", "20"],
                              env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        got = receiver.wait_for(path, 4, timeout=30)
    except AssertionError:
        raise AssertionError(log_path.read_text()[-3000:] + webhook_worker.log_path.read_text()[-3000:]) from None
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
    time.sleep(0.5)
    got = receiver.got(path)
    payloads = [Webhook(NEW).verify(g.body, g.headers) for g in got]  # the webhook worker's own secret
    types = sorted(p["type"] for p in payloads)
    assert types == ["batch.completed", "job.succeeded", "job.succeeded", "job.succeeded"], log_path.read_text()[-2000:]
    assert len({g.headers["webhook-id"] for g in got}) == 4
    (batch,) = [p for p in payloads if p["type"] == "batch.completed"]
    data = batch["data"]
    assert data["batch_id"] == "whbatch" and data["total"] == 3 and data["counts"]["succeeded"] == 3
    assert data["manifest_url"] == f"file://{out}/whbatch/manifest.jsonl"
    manifest = [json.loads(x) for x in (out / "whbatch" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(m["custom_id"] for m in manifest) == ["c0", "c1", "c2"]
    assert all(m["status"] == "succeeded" and m["url"] and m["sidecar_url"] and m["prompt"] for m in manifest)
    assert {p["data"]["custom_id"] for p in payloads if p["type"] == "job.succeeded"} == {"c0", "c1", "c2"}


# --- manifests and URL styles ---------------------------------------------------------------------------------

def test_manifest_is_stored_for_a_batch_without_webhooks_and_webhooks_use_the_url_style(
        wr, receiver, webhook_worker, wh_redis_url, tmp_path) -> None:
    out = tmp_path / "out"
    env = _env(wh_redis_url, SDFLEET_OUT=f"file://{out}")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a red fox\nan owl\n")
    assert _cli(["submit", str(jobs), "--batch", "plain"], env).returncode == 0
    path = f"/styled/{uuid.uuid4().hex}"
    styled = tmp_path / "styled.jsonl"
    styled.write_text(json.dumps({"prompt": "a heron", "custom_id": "h1"}) + "\n")
    res = _cli(["submit", str(styled), "--batch", "styled", "--url-style", "https", "--webhook", receiver.url(path)],
               env)
    assert res.returncode == 0, res.stderr
    settings = Settings(redis_url=wh_redis_url, webhook_secret=NEW, webhook_allow_private=True,
                        s3_endpoint_url="http://objects.example.test:9000")
    store = JobStore(wr)
    for batch in ("plain", "styled"):
        for jid in wr.lrange(keys.batch_jobs(batch), 0, -1):
            rec = store.job(jid)
            # The outcome as a worker records it (an S3 URL), then announced by the worker's Notifier.
            store.start(jid, "w1", 3)
            tr = store.succeed(jid, url=f"s3://images/{batch}/{rec.custom_id}.png",
                               sidecar_url=f"s3://images/{batch}/{rec.custom_id}.json")
            Notifier(settings, wr)(SimpleNamespace(job_id=jid, batch_id=batch, spec=parse_job(rec.spec)),
                                   "succeeded", tr)
    manifest = _wait(lambda: (out / "plain" / "manifest.jsonl").exists() and (out / "plain" / "manifest.jsonl"),
                     timeout=15, what="manifest of a batch without webhooks")
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert [(m["custom_id"], m["prompt"], m["url"], m["sidecar_url"]) for m in rows] == [
        ("line-000001", "a red fox", "s3://images/plain/line-000001.png", "s3://images/plain/line-000001.json"),
        ("line-000002", "an owl", "s3://images/plain/line-000002.png", "s3://images/plain/line-000002.json")]
    got = receiver.wait_for(path, 2)  # job.succeeded and batch.completed
    payloads = {p["type"]: p["data"] for p in (Webhook(NEW).verify(g.body, g.headers) for g in got)}
    job = payloads["job.succeeded"]
    assert job["url"] == "http://objects.example.test:9000/images/styled/h1.png"
    assert job["sidecar_url"] == "http://objects.example.test:9000/images/styled/h1.json"
    styled_rows = [json.loads(x) for x in (out / "styled" / "manifest.jsonl").read_text().splitlines()]
    # The webhook worker writes the manifest with its own settings: no S3 endpoint there, so AWS addresses.
    assert styled_rows[0]["url"] == "https://images.s3.us-east-1.amazonaws.com/styled/h1.png"
    assert payloads["batch.completed"]["manifest_url"] == f"file://{out}/styled/manifest.jsonl"


def test_a_malformed_delivery_is_dropped_not_retried(wr, receiver, webhook_worker, wh_redis_url) -> None:
    # (An item that is not JSON at all ends the consuming process, as for the GPU worker: kombu decodes it
    # before any public hook; see tests/test_e2e.py and docs/RELIABILITY.md.)
    outbox.send(make_app(_settings(wh_redis_url)), "sdfleet.webhook.deliver", {"delivery": {"id": "msg_x"}})
    path = f"/after-garbage/{uuid.uuid4().hex}"
    delivery, tr = _job(wr, wh_redis_url, hook=receiver.url(path))
    Notifier(_settings(wh_redis_url), wr)(delivery, "succeeded", tr)
    receiver.wait_for(path, 1)
    assert webhook_worker.proc.poll() is None
    assert not outbox.pending(wr) and not outbox.dead(wr)  # the malformed delivery was dropped, not retried


def test_secrets_never_logged(webhook_worker) -> None:
    text = webhook_worker.log_path.read_text()
    assert "webhook worker ready" in text and "webhook delivered" in text
    for secret in (NEW, OLD):
        assert secret not in text and secret[len("whsec_"):] not in text


# --- secrets stay out of Redis; rotation -------------------------------------------------------------------

def _private_worker(redis_url: str, log_path: Path, **extra: str) -> subprocess.Popen:
    env = _env(redis_url, **extra)
    for name in [k for k, v in extra.items() if v is None]:
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "webhook-worker", "--threads", "4"],
                            env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 30
    while "webhook worker ready" not in log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)  # the consumer starts right after the ready line
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _redis_text(client: redis.Redis) -> str:
    """Everything stored in Redis, as text (hashes, strings, lists, sets, sorted sets)."""
    parts = []
    for k in client.keys("*"):
        t = client.type(k)
        value = {"hash": client.hgetall, "string": client.get, "list": lambda x: client.lrange(x, 0, -1),
                 "set": client.smembers, "zset": lambda x: client.zrange(x, 0, -1)}[t](k)
        parts.append(f"{k}={value}")
    return "\n".join(parts)


def test_rotation_signs_with_the_configured_secrets_only_and_no_secret_reaches_redis(receiver, tmp_path) -> None:
    """A batch submitted under secret A; the webhook worker restarts with B (A as previous), then with B alone.
    Deliveries follow the worker's configuration, not anything stored with the batch."""
    private = PrivateRedis()  # its own Redis: the module's webhook worker must not take these deliveries
    client = redis.Redis.from_url(private.url, decode_responses=True)
    a, b = new_secret(), new_secret()
    path = f"/rotate/{uuid.uuid4().hex}"
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a red fox\nan owl\na heron\na wren\n")  # one more than is finished: no batch.completed
    env = _env(private.url, SDFLEET_WEBHOOK_SECRET=a, SDFLEET_OUT=f"file://{tmp_path / 'out'}")
    res = _cli(["submit", str(jobs), "--batch", "rot", "--webhook", receiver.url(path)], env)
    assert res.returncode == 0, res.stderr
    settings = Settings(redis_url=private.url, webhook_allow_private=True)
    job_ids = client.lrange(keys.batch_jobs("rot"), 0, -1)
    store = JobStore(client)

    def finish(n: int) -> None:  # job n's outcome recorded as a worker records it, then announced
        jid = job_ids[n]
        spec = parse_job(json.loads(client.hget(keys.job(jid), "spec")))
        store.start(jid, "w1", 3)
        tr = store.succeed(jid, url=f"file:///x/{jid}.png")
        Notifier(settings, client)(SimpleNamespace(job_id=jid, batch_id="rot", spec=spec), "succeeded", tr)

    stages = [({"SDFLEET_WEBHOOK_SECRET": a}, [a], [b]),
              ({"SDFLEET_WEBHOOK_SECRET": b, "SDFLEET_WEBHOOK_PREVIOUS_SECRETS": a}, [b, a], []),
              ({"SDFLEET_WEBHOOK_SECRET": b}, [b], [a])]  # the window is over: A is gone
    try:
        for n, (config, accepted, refused) in enumerate(stages):
            proc = _private_worker(private.url, tmp_path / f"whw{n}.log", **config)
            try:
                finish(n)
                req = receiver.wait_for(path, n + 1)[n]
            finally:
                _stop(proc)
            assert len(req.headers["webhook-signature"].split(" ")) == len(accepted)
            for secret in accepted:
                assert Webhook(secret).verify(req.body, req.headers)["data"]["job_id"] == job_ids[n]
            for secret in refused:
                with pytest.raises(WebhookVerificationError):
                    Webhook(secret).verify(req.body, req.headers)
        stored = _redis_text(client)
        for secret in (a, b):
            assert secret not in stored and secret.removeprefix("whsec_") not in stored
        assert "webhook_key_id" in client.hgetall(keys.batch("rot"))
    finally:
        private.stop()


def test_settings_reject_malformed_previous_secrets() -> None:
    with pytest.raises(ConfigError, match="SDFLEET_WEBHOOK_PREVIOUS_SECRETS"):
        Settings.from_env({"SDFLEET_WEBHOOK_PREVIOUS_SECRETS": "plaintext"})
    s = Settings.from_env({"SDFLEET_WEBHOOK_SECRET": NEW, "SDFLEET_WEBHOOK_PREVIOUS_SECRETS": f"{OLD} {NEW}"})
    assert OLD not in repr(s)


# --- one slow receiver cannot stall the others -------------------------------------------------------------

def test_a_hanging_receiver_does_not_delay_another_receivers_webhooks(tmp_path) -> None:
    """16 deliveries to a receiver that hangs 60 s, then deliveries to another host: each of those arrives
    within 1 s of being enqueued (4 sender threads, at most 2 per host)."""
    private = PrivateRedis()
    client = redis.Redis.from_url(private.url, decode_responses=True)
    hanging, other = start_receiver("127.0.0.1"), start_receiver("127.0.0.2")  # two hosts
    hang_path, ok_path = "/hang", "/ok"
    hanging.delays[hang_path] = 60.0
    proc = _private_worker(private.url, tmp_path / "whw.log", SDFLEET_WEBHOOK_TIMEOUT="70",
                           SDFLEET_WEBHOOK_PER_HOST="2")
    app = make_app(Settings(redis_url=private.url))
    try:
        for i in range(16):
            outbox.publish(app, outbox.new_delivery(event_id=f"msg_h{i}", event_type="job.succeeded",
                                                    url=hanging.url(hang_path), body="{}", batch_id="b"))
        hanging.wait_for(hang_path, 2)
        time.sleep(1.0)  # every thread has met the hanging deliveries by now
        assert len(hanging.got(hang_path)) == 2, "no more than the per-host cap is in flight"
        lags = []
        for i in range(6):
            sent = time.time()
            outbox.publish(app, outbox.new_delivery(event_id=f"msg_o{i}", event_type="job.succeeded",
                                                    url=other.url(ok_path), body="{}", batch_id="b"))
            got = other.wait_for(ok_path, i + 1, timeout=30)[i]
            lags.append(got.at - sent)
            Webhook(NEW).verify(got.body, got.headers)
        assert max(lags) < 1.0, lags
        assert len(hanging.got(hang_path)) == 2
        assert not client.lrange(keys.WEBHOOK_DEAD, 0, -1)  # deferred deliveries are not failed attempts
    finally:
        proc.kill()
        proc.wait(10)
        for rec in (hanging, other):
            rec.stop()
        private.stop()

