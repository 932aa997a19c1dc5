"""Breaks of the producer side found by attacking it with the CLI, real Redis and real processes.

Each test states the input, what happens today and what should happen; each fails until its break is fixed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import redis
from standardwebhooks import Webhook

from sdfleet import keys
from sdfleet.jobs import parse_job
from sdfleet.queue import make_app
from sdfleet.redisconn import PrivateRedis
from sdfleet.settings import Settings
from sdfleet.webhooks import outbox
from sdfleet.webhooks.signing import new_secret
from tests.conftest import ROOT, run_cli
from tests.webhook_receiver import start_receiver

SECRET = new_secret()


def _queued(r: redis.Redis, model: str) -> int:
    return int(r.llen(keys.queue_for_model(model)))


# --- 1. a derived custom_id that collides with one given on another line ---------------------------------

def test_a_given_custom_id_equal_to_another_lines_derived_one_is_rejected(tmp_path, env, r) -> None:
    """Line 1 has no custom_id, so it gets 'j' + its content hash; line 2 gives that very id with another
    prompt. Today: exit 0, "1 enqueued (1 in batch)": line 2's job silently never exists, and two messages
    for one job id sit in the queue. Should: exit 2 naming line 2 and the custom_id, nothing enqueued (as for
    two lines that give the same custom_id)."""
    derived = "j" + parse_job({"prompt": "a", "model": "null"}).identity()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "custom_id": derived}) + "\n")
    p = run_cli(["submit", str(jobs), "--batch", "collide", "--model", "null"], env)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert derived in p.stderr and "line 2" in p.stderr, p.stderr
    assert not r.exists(keys.batch("collide")) and _queued(r, "null") == 0


def test_a_given_custom_id_equal_to_a_repeat_suffix_is_rejected(tmp_path, env, r) -> None:
    """Two identical lines without custom_id get 'jHASH' and 'jHASH-2'; a third line that gives 'jHASH-2' with
    another prompt is dropped the same way (exit 0, 2 of 3 jobs exist). Should: exit 2, nothing enqueued."""
    derived = "j" + parse_job({"prompt": "a", "model": "null"}).identity()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(x) + "\n" for x in
                            ({"prompt": "a"}, {"prompt": "a"}, {"prompt": "c", "custom_id": f"{derived}-2"})))
    p = run_cli(["submit", str(jobs), "--batch", "collide2", "--model", "null"], env)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert not r.exists(keys.batch("collide2")) and _queued(r, "null") == 0


# --- 2. TLS options on a plain redis:// URL ---------------------------------------------------------------

def test_tls_options_on_a_plain_redis_url_are_a_configuration_error(tmp_path, env, redis_url) -> None:
    """REDIS_URL=redis://host:6379/12?ssl_ca_certs=/ca.pem passes the strict parser (the option is known), then
    redis-py raises TypeError (unexpected keyword 'ssl_ca_certs'): a traceback and exit 1. Should: exit 2, one
    line naming REDIS_URL and the fix (TLS options need rediss://)."""
    for option in ("ssl_ca_certs=/etc/ssl/certs/ca-certificates.crt", "ssl_cert_reqs=required"):
        p = run_cli(["status", "nosuchbatch"], {**env, "REDIS_URL": f"{redis_url}?{option}"})
        assert p.returncode == 2, (option, p.returncode, p.stderr[-600:])
        assert "Traceback" not in p.stderr and "REDIS_URL" in p.stderr, p.stderr[-600:]
        assert "rediss" in p.stderr, p.stderr[-600:]


def test_an_unknown_tls_option_value_is_a_configuration_error(tmp_path, env, redis_url) -> None:
    """The parser checks option names, not values: REDIS_URL=rediss://host:6379/12?ssl_cert_reqs=bogus (or
    ssl_check_hostname=maybe) passes, and the command fails later with exit 1 ("answered with an error:
    Invalid SSL Certificate Requirements Flag: bogus", or a connection timeout). Should: exit 2, naming
    REDIS_URL, the option and its allowed values (none, optional, required; true or false)."""
    base = redis_url.replace("redis://", "rediss://", 1)
    for option in ("ssl_cert_reqs=bogus", "ssl_check_hostname=maybe"):
        p = run_cli(["status", "nosuchbatch"], {**env, "REDIS_URL": f"{base}?{option}"}, timeout=60)
        assert p.returncode == 2, (option, p.returncode, p.stderr[-600:])
        assert "REDIS_URL" in p.stderr and option.split("=")[0] in p.stderr, p.stderr[-600:]


# --- 3. per-host isolation keyed by the URL's spelling, not by the receiver ----------------------------------

def _webhook_worker(redis_url: str, log_path: Path, threads: int = 4) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    e.update({"REDIS_URL": redis_url, "SDFLEET_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1",
              "SDFLEET_WEBHOOK_SECRET": SECRET, "SDFLEET_WEBHOOK_ALLOW_PRIVATE": "1",
              "SDFLEET_WEBHOOK_TIMEOUT": "70", "SDFLEET_WEBHOOK_PER_HOST": "2"})
    proc = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "webhook-worker", "--threads", str(threads)],
                            env=e, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 30
    while "webhook worker ready" not in log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)  # the consumer starts right after the ready line
    return proc


def test_one_receiver_spelled_several_ways_cannot_take_every_sender_thread(tmp_path) -> None:
    """The per-host cap counts URL host strings. One hanging receiver reached as 127.0.0.1, 2130706433,
    0x7f000001 and 127.1 (one address, four spellings; with wildcard DNS, any number of names) gets 2 slots
    per spelling: all 4 threads hang and another receiver's webhook waits for the 60 s hang. Should: the cap
    applies to the receiver (the resolved address), so the other receiver's webhook arrives within 1 s."""
    private = PrivateRedis()
    hanging, other = start_receiver("127.0.0.1"), start_receiver("127.0.0.2")
    hanging.delays["/hang"] = 60.0
    port = hanging.server.server_address[1]
    proc = _webhook_worker(private.url, tmp_path / "whw.log")
    app = make_app(Settings(redis_url=private.url))
    try:
        spellings = ("127.0.0.1", "2130706433", "0x7f000001", "127.1")
        for i in range(16):
            url = f"http://{spellings[i % len(spellings)]}:{port}/hang"
            outbox.publish(app, outbox.new_delivery(event_id=f"msg_h{i}", event_type="job.succeeded", url=url,
                                                    body="{}", batch_id="b"))
        hanging.wait_for("/hang", 2)
        time.sleep(1.5)  # every thread has met the hanging deliveries by now
        sent = time.time()
        outbox.publish(app, outbox.new_delivery(event_id="msg_ok", event_type="job.succeeded",
                                                url=other.url("/ok"), body="{}", batch_id="b"))
        held = len(hanging.got("/hang"))
        try:
            got = other.wait_for("/ok", 1, timeout=10)[0]
        except AssertionError:
            raise AssertionError(f"the other receiver got nothing in 10 s; the hanging one holds {held} "
                                 "deliveries (cap 2)") from None
        Webhook(SECRET).verify(got.body, got.headers)
        assert got.at - sent < 1.0, got.at - sent
        assert len(hanging.got("/hang")) <= 2, "one receiver holds no more than the per-host cap"
    finally:
        proc.kill()
        proc.wait(10)
        for rec in (hanging, other):
            rec.stop()
        private.stop()


# --- 4. an unbounded input is read whole into memory ---------------------------------------------------------

def _limit_memory() -> None:
    import resource

    # 1.5 GB of address space: plenty for the CLI and a real job file, not for reading without a bound.
    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))


def test_an_endless_input_is_refused_without_reading_it_whole(tmp_path, env, r) -> None:
    """``sdfleet submit /dev/zero`` (or an endless pipe to ``submit -``, or a multi-GB file) is read whole with
    read_bytes() before the first line is checked: a MemoryError traceback, exit 1 (or the OOM killer without
    a limit). Should: the file is read line by line with a bound on its size, and exit 2 names the file and
    the limit, nothing written."""
    p = subprocess.run([sys.executable, "-m", "sdfleet.cli", "submit", "/dev/zero", "--batch", "zero",
                        "--model", "null"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
                       preexec_fn=_limit_memory)
    assert p.returncode == 2, (p.returncode, p.stderr[-800:])
    assert "Traceback" not in p.stderr and "MemoryError" not in p.stderr, p.stderr[-800:]
    assert not r.exists(keys.batch("zero")) and _queued(r, "null") == 0


# --- 5. terminal escapes from a job file reach the terminal ------------------------------------------------

def test_escape_sequences_in_a_job_files_field_names_are_not_echoed_raw(tmp_path, env, r) -> None:
    """A job file (from a customer, say) whose field name is ESC ] 0 ; ... BEL ESC [ 2 J: the error line prints
    the name raw (``field '\\x1b]0;pwned\\x07\\x1b[2J'``), so the file retitles and clears the operator's
    terminal (or erases the error lines above it). Values are shown with repr; field names should be too:
    no ESC or BEL byte on stderr."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"\\u001b]0;pwned\\u0007\\u001b[2J": 1, "prompt": "a"}\n'
                    '{"prompt": "a", "\\u001b[1A\\u001b[2K": 1, "\\u001b[1A\\u001b[2K": 2}\n')
    p = run_cli(["submit", str(jobs), "--batch", "esc", "--model", "null"], env)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "\x1b" not in p.stderr and "\x07" not in p.stderr, repr(p.stderr)
    assert "line 1" in p.stderr and "line 2" in p.stderr


# --- 6. URL edge cases ---------------------------------------------------------------------------------------

def test_https_urls_of_a_bucket_with_dots_verify_against_aws_certificates() -> None:
    """``--url-style https`` on AWS builds virtual-host URLs: for a bucket named ``my.images`` that is
    ``https://my.images.s3.us-east-1.amazonaws.com/...``, which AWS's ``*.s3.us-east-1.amazonaws.com``
    certificate does not cover (a wildcard spans one label), so every consumer's TLS check fails. Should:
    path style (``https://s3.us-east-1.amazonaws.com/my.images/...``) for bucket names with a dot.
    (The URL is computed locally: no S3 is involved.)"""
    from urllib.parse import urlsplit

    from sdfleet.storage import StorageFactory

    url = StorageFactory(None, "us-east-1").public_url("s3://my.images/batch/c1.png", "https")
    host = urlsplit(url).hostname
    suffix = ".s3.us-east-1.amazonaws.com"
    assert not (host.endswith(suffix) and "." in host[:-len(suffix)]), url


def test_a_file_url_with_a_host_is_not_a_relative_directory(tmp_path, env, r) -> None:
    """``--out file://localhost/DIR`` (the RFC 8089 spelling of file:///DIR) is taken as the relative path
    ``localhost/DIR`` under the producer's working directory: the submit succeeds and creates
    ./localhost/DIR. Should: the local host's DIR (or exit 2 refusing a file URL with a host), never a
    directory named after the host."""
    target = tmp_path / "images"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a cat\n")
    p = run_cli(["submit", str(jobs), "--batch", "loc", "--model", "null", "--out", f"file://localhost{target}"],
                env, cwd=cwd)
    assert not (cwd / "localhost").exists(), "a directory named after the URL's host was created"
    if p.returncode == 0:
        spec = json.loads(r.hget(keys.job(r.hget(keys.batch_custom_ids("loc"), "line-000001")), "spec"))
        assert spec["out"] == f"file://{target}", spec["out"]
    else:
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr


def test_an_upper_case_url_scheme_is_an_http_url(tmp_path, env, r) -> None:
    """URL schemes are case-insensitive (RFC 3986 3.1), and the send-time check lower-cases them, but
    ``--webhook HTTPS://example.com/hook`` is refused at submit: "is not an http(s) URL", exit 2."""
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a cat\n")
    p = run_cli(["submit", str(jobs), "--batch", "up", "--model", "null", "--webhook", "HTTPS://example.com/hook"],
                env)
    assert p.returncode == 0, p.stderr


# --- 7. --out problems that escape as tracebacks or blame another field -----------------------------------

def test_an_out_directory_that_is_a_symlink_loop_is_a_usage_error(tmp_path, env, r) -> None:
    """``--out file://DIR/loop1`` where loop1 -> loop2 -> loop1: Path.resolve() raises RuntimeError ("Symlink
    loop"), a traceback, exit 1. Should: exit 2 naming --out and the fix, nothing written."""
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a cat\n")
    p = run_cli(["submit", str(jobs), "--batch", "loop", "--model", "null", "--out", f"file://{tmp_path}/loop1"],
                env)
    assert p.returncode == 2, (p.returncode, p.stderr[-600:])
    assert "Traceback" not in p.stderr and "--out" in p.stderr, p.stderr[-600:]
    assert not r.exists(keys.batch("loop"))


def test_a_non_utf8_byte_in_out_or_webhook_is_reported_against_that_flag(tmp_path, env, r) -> None:
    """``--out file:///tmp/x<0xff>`` or ``--webhook http://example.com/<0xff>`` (argv bytes that are not UTF-8)
    are refused with exit 2, but the message blames "field 'custom_id line-000001': cannot be serialised
    (... UnicodeEncodeError ...)": a field the user never set. Should: name --out / --webhook (as a
    non-UTF-8 --negative-prompt already does)."""
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a cat\n")
    bad = os.fsdecode(b"\xff")  # how Python hands a non-UTF-8 argv byte to the program
    for flag, value in (("--out", f"file://{tmp_path}/x{bad}"), ("--webhook", f"http://example.com/{bad}")):
        p = subprocess.run([os.fsencode(sys.executable), b"-m", b"sdfleet.cli", b"submit", os.fsencode(str(jobs)),
                            b"--batch", b"bytes", b"--model", b"null", os.fsencode(flag), os.fsencode(value)],
                           env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == 2, (flag, p.returncode, p.stderr)
        assert flag in p.stderr and "custom_id" not in p.stderr, (flag, p.stderr)
    assert not r.exists(keys.batch("bytes"))


# --- 8. resubmitting a cancelled batch ------------------------------------------------------------------------

def test_resubmitting_a_cancelled_batch_runs_its_jobs(tmp_path, env, r, start_worker) -> None:
    """README: resubmitting to the same --batch runs again the jobs that were cancelled. Today: ``sdfleet cancel``
    revokes the job ids; a live worker keeps them in Celery's revoked set, the resubmission reuses the same
    job ids (derived from batch and custom_id), prints "5 enqueued", and the worker cancels all 5 again:
    "0 succeeded, 5 cancelled of 5". Should: the resubmitted jobs run and succeed.
    (The worker is paused with SIGSTOP only so that the jobs are still queued when they are cancelled.)"""
    import signal

    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(f"prompt {i}\n" for i in range(5)))
    w = start_worker(model="null")
    w.proc.send_signal(signal.SIGSTOP)
    try:
        p = run_cli(["submit", str(jobs), "--batch", "cr", "--model", "null"], env)
        assert p.returncode == 0, p.stderr
        p = run_cli(["cancel", "cr"], env)
        assert p.returncode == 0, p.stderr
    finally:
        w.proc.send_signal(signal.SIGCONT)
    st = {}
    for _ in range(100):  # the worker drops the cancelled messages
        st = json.loads(run_cli(["status", "cr", "--json"], env).stdout)
        if st["counts"]["cancelled"] == 5 and not r.llen(keys.queue_for_model("null")):
            break
        time.sleep(0.2)
    assert st["counts"]["cancelled"] == 5, st
    p = run_cli(["submit", str(jobs), "--batch", "cr", "--model", "null"], env)
    assert p.returncode == 0 and "5 enqueued" in p.stderr, p.stderr
    p = run_cli(["wait", "cr", "--timeout", "60"], env)
    assert p.returncode == 0, (p.stderr[-400:], w.log()[-2000:])


# --- 9. a receiver that answers one byte at a time ------------------------------------------------------------

def _trickling_receiver(stop_after_s: float = 40.0):
    """A TCP receiver that reads the request, then answers one header byte a second. Returns (port, result):
    result['closed_after'] is set to how long after the first byte the client hung up."""
    import socket
    import threading

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    result: dict[str, float] = {}

    def serve() -> None:
        conn, _ = srv.accept()
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        start = time.monotonic()
        payload = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000
        try:
            for byte in payload:
                conn.sendall(bytes([byte]))
                time.sleep(1.0)
                conn.settimeout(0.01)
                try:
                    if conn.recv(1) == b"":  # the client hung up
                        break
                except (TimeoutError, BlockingIOError):
                    pass
                if time.monotonic() - start > stop_after_s:
                    break
        except OSError:
            pass
        result["closed_after"] = time.monotonic() - start
        conn.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], result


def test_a_receiver_trickling_its_answer_is_cut_off_at_the_webhook_timeout(tmp_path) -> None:
    """SDFLEET_WEBHOOK_TIMEOUT is applied per socket read, not to the whole delivery: a receiver that sends
    its status line and headers one byte a second keeps a sender thread for as long as it likes (here the
    attempt was still running after 40 s with a 3 s timeout). With the per-host cap bypass above, a few such
    receivers hold every thread. Should: an attempt ends within about the timeout, whatever the receiver
    does."""
    private = PrivateRedis()
    port, result = _trickling_receiver()
    e = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    e.update({"REDIS_URL": private.url, "SDFLEET_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1",
              "SDFLEET_WEBHOOK_SECRET": SECRET, "SDFLEET_WEBHOOK_ALLOW_PRIVATE": "1", "SDFLEET_WEBHOOK_TIMEOUT": "3"})
    log_path = tmp_path / "whw.log"
    proc = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "webhook-worker", "--threads", "2"], env=e,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    app = make_app(Settings(redis_url=private.url))
    try:
        deadline = time.monotonic() + 30
        while "webhook worker ready" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        outbox.publish(app, outbox.new_delivery(event_id="msg_slow", event_type="job.succeeded",
                                                url=f"http://127.0.0.1:{port}/slow", body="{}", batch_id="b"))
        deadline = time.monotonic() + 60
        while "closed_after" not in result and time.monotonic() < deadline:
            time.sleep(0.2)
        assert result.get("closed_after", 99) < 8.0, result
    finally:
        proc.kill()
        proc.wait(10)
        private.stop()


# --- 10. a webhook URL with credentials ---------------------------------------------------------------------

def test_credentials_in_a_webhook_url_reach_the_receiver(tmp_path) -> None:
    """``--webhook https://user:token@hooks.example.com/x`` passes every check, but the sender connects to the
    pinned address with a URL rebuilt from scheme, address, port and path: the user:token part is dropped,
    no Authorization header is sent, and a receiver behind basic auth answers 401 until the delivery is
    dead. Should: send the credentials (Authorization: Basic), or refuse such URLs at submit with exit 2."""
    import base64

    private = PrivateRedis()
    rec = start_receiver("127.0.0.1")
    proc = _webhook_worker(private.url, tmp_path / "whw.log", threads=2)
    app = make_app(Settings(redis_url=private.url))
    try:
        port = rec.server.server_address[1]
        outbox.publish(app, outbox.new_delivery(event_id="msg_auth", event_type="job.succeeded",
                                                url=f"http://hook-user:s3cret@127.0.0.1:{port}/auth", body="{}",
                                                batch_id="b"))
        got = rec.wait_for("/auth", 1, timeout=15)[0]
        expected = "Basic " + base64.b64encode(b"hook-user:s3cret").decode()
        assert got.headers.get("authorization") == expected, got.headers
    finally:
        proc.kill()
        proc.wait(10)
        rec.stop()
        private.stop()


# --- 11. a refused submission still creates its --out directory -------------------------------------------

def test_a_refused_resubmission_creates_no_out_directory(tmp_path, env, r) -> None:
    """A resubmission refused as a conflict (exit 2, "Nothing was enqueued") has already made its --out
    directory tree: the writability check (mkdir -p and a probe file) runs before the conflict check. The
    issue asks: exit 2 writes nothing. Should: check conflicts (and the batch's lease) first, or check
    writability without creating the tree."""
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text(json.dumps({"prompt": "a", "custom_id": "c1", "steps": 4}) + "\n")
    second.write_text(json.dumps({"prompt": "a", "custom_id": "c1", "steps": 5}) + "\n")
    assert run_cli(["submit", str(first), "--batch", "refused", "--model", "null"], env).returncode == 0
    fresh = tmp_path / "fresh" / "images"
    p = run_cli(["submit", str(second), "--batch", "refused", "--model", "null", "--out", f"file://{fresh}"], env)
    assert p.returncode == 2 and "c1 (steps)" in p.stderr, p.stderr
    assert not (tmp_path / "fresh").exists(), "exit 2 created the --out directory"


# --- 12. presigned results without credentials ----------------------------------------------------------------

def test_presigned_results_without_credentials_are_one_line_not_a_traceback(tmp_path, r, s3, start_worker) -> None:
    """``sdfleet results BATCH --url-style presigned`` run where no AWS credentials are configured (a consumer's
    laptop, say): botocore's NoCredentialsError escapes as a traceback, exit 1. Should: one line saying that
    presigning needs S3 credentials and naming the alternatives (--url-style https or s3), no traceback."""
    env, bucket, _ = s3
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a cat\n")
    start_worker(model="null", env_extra=env)
    p = run_cli(["submit", str(jobs), "--batch", "ps", "--model", "null", "--out", f"s3://{bucket}/run"], env)
    assert p.returncode == 0, p.stderr
    assert run_cli(["wait", "ps", "--timeout", "60"], env).returncode == 0
    bare = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    bare.update({"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
                 "AWS_EC2_METADATA_DISABLED": "true"})
    p = run_cli(["results", "ps", "--url-style", "presigned"], bare)
    assert "Traceback" not in p.stderr, p.stderr[-800:]
    assert p.returncode in (1, 2) and "credentials" in p.stderr.lower(), (p.returncode, p.stderr[-800:])


# --- 13. the lease is not renewed while the submission is planned and serialised ------------------------------

def test_a_live_producer_keeps_its_lease_however_large_the_submission(tmp_path, env, r) -> None:
    """The lease is renewed only between staging and publishing chunks; planning (reading the batch's existing
    jobs) and serialising every job run in between without a renewal, about 46 us a job here. So a producer
    that is alive and working loses its lease whenever plan + serialise outlast it: 100,000 lines with a 2 s
    lease always end "the submission lease expired ... submit again" (exit 1), and with the default 30 s lease
    any file of more than ~650,000 lines can never be submitted, however often it is retried. Should: the
    lease is renewed throughout, so only a producer that stops working loses it."""
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("".join(f"prompt {i}\n" for i in range(100_000)))
    p = run_cli(["submit", str(jobs), "--batch", "big", "--model", "null"],
                {**env, "SDFLEET_SUBMISSION_LEASE_S": "2"}, timeout=300)
    assert p.returncode == 0, p.stderr[-600:]
    assert r.hget(keys.batch("big"), "total") == "100000"


# --- 14. random weights and real weights on one queue ---------------------------------------------------------

def test_random_weight_builtins_do_not_share_a_queue_with_real_model_directories() -> None:
    """``--model large`` (SD3.5 Large with random weights: noise) serves ``sdfleet.gen.sd3.5-large``, the queue
    of ``--model /models/sd3.5-large`` (the real weights), and ``/models/null`` serves the null engine's
    queue. A test or bench worker started with ``large`` beside the production fleet takes customers' jobs
    and stores noise, recorded as succeeded. Should: the random-weight built-ins get queue names no model
    directory can have (or a directory named like a built-in is refused)."""
    from sdfleet.jobs import model_name_for

    assert model_name_for("large") != model_name_for("/models/sd3.5-large")
    assert model_name_for("medium") != model_name_for("/models/SD3.5-Medium")
    # tiny and null are test engines, and a directory named like them is a test model (``make-model tiny``
    # writes one): sharing their queue takes no customer's job, so that half of the docstring's ask is not kept.
    assert model_name_for("/models/tiny") == model_name_for("tiny") == "tiny"


# --- 15. a webhook signing secret too short to resist guessing ------------------------------------------------

def test_a_signing_secret_of_one_byte_is_refused(tmp_path) -> None:
    """SDFLEET_WEBHOOK_SECRET=whsec_YQ== (one byte) is accepted and the webhook worker starts; anyone can then
    find the key from one delivery in 256 tries and forge webhooks. Standard Webhooks asks for 24 to 64
    bytes. Should: exit 2 naming the setting and 'sdfleet webhooks new-secret'."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    e.update({"REDIS_URL": "redis://127.0.0.1:1/0", "SDFLEET_WEBHOOK_SECRET": "whsec_YQ=="})
    try:
        p = subprocess.run([sys.executable, "-m", "sdfleet.cli", "webhook-worker"], env=e, capture_output=True,
                           text=True, timeout=20, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise AssertionError("the webhook worker started with a one-byte signing secret") from None
    assert p.returncode == 2 and "SDFLEET_WEBHOOK_SECRET" in p.stderr, (p.returncode, p.stderr[-400:])
