"""The CLI against a real Redis, without workers: validation, nothing enqueued on bad input,
resubmission, cancel, status and results."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdfleet import keys
from sdfleet.events import MANIFEST_FIELDS
from sdfleet.redisconn import free_port
from tests.conftest import ROOT, run_cli

QUEUE = "sdfleet.gen.tiny"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


BAD_LINES = [
    ('{"prompt": ""}', "prompt"),
    ('{"prompt": "a", "width": 1000}', "width"),
    ('{"prompt": "a", "steps": 500}', "steps"),
    ('{"prompt": "a", "guidance_scale": NaN}', "NaN"),
    ('{"prompt": "a", "seed": -5}', "seed"),
    ('{"prompt": "a", "custom_id": "../../x"}', "custom_id"),
    ('{"prompt": "a", "widht": 512}', "did you mean 'width'"),
    ('{"prompt": "a", "webhook": "file:///etc/passwd"}', "webhook"),
    ("{broken", "not valid JSON"),
]


@pytest.mark.parametrize("line, words", BAD_LINES)
def test_bad_line_rejects_whole_file_and_enqueues_nothing(tmp_path, env, r, line, words):
    f = write(tmp_path, "jobs.jsonl", '{"prompt": "fine"}\n' + line + "\n")
    res = run_cli(["submit", str(f)], env)
    assert res.returncode == 2, res.stderr
    assert "line 2" in res.stderr and words in res.stderr and "nothing was enqueued" in res.stderr
    assert r.dbsize() == 0


def test_duplicate_custom_id_and_invalid_utf8(tmp_path, env, r):
    f = write(tmp_path, "jobs.jsonl", b'{"prompt": "a", "custom_id": "x"}\n{"prompt": "b", "custom_id": "x"}\n'
                                      b'{"prompt": "\xff"}\n')
    res = run_cli(["submit", str(f)], env)
    assert res.returncode == 2 and "line 2" in res.stderr and "line 3" in res.stderr and "UTF-8" in res.stderr
    assert r.dbsize() == 0


def test_bad_flags_are_usage_errors(tmp_path, env, r):
    f = write(tmp_path, "p.txt", "a cat\n")
    for args, words in ((["--width", "100"], "--width"), (["--guidance", "nan"], "--guidance"),
                        (["--out", "ftp://x"], "--out"), (["--batch", "../x"], "--batch"),
                        (["--webhook", "gopher://x"], "--webhook")):
        res = run_cli(["submit", str(f), *args], env)
        assert res.returncode == 2, (args, res.stderr)
        assert words in res.stderr, (args, res.stderr)
    assert r.dbsize() == 0
    assert run_cli(["submit"], env).returncode == 2
    assert run_cli(["status", "no-such-batch"], env).returncode == 2
    assert run_cli(["wait", "no-such-batch"], env).returncode == 2


def test_unwritable_out_is_an_error_before_anything_is_written(tmp_path, env, r):
    f = write(tmp_path, "p.txt", "a cat\n")
    blocker = write(tmp_path, "file", "x")
    res = run_cli(["submit", str(f), "--out", f"file://{blocker}/sub"], env)
    assert res.returncode == 2 and "cannot write there" in res.stderr and "--out" in res.stderr
    assert r.llen(QUEUE) == 0


def test_unreachable_s3_out(tmp_path, env, r):
    f = write(tmp_path, "p.txt", "a cat\n")
    e = {**env, "SDFLEET_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
         "AWS_SECRET_ACCESS_KEY": "x", "SDFLEET_UPLOAD_RETRIES": "0"}
    res = run_cli(["submit", str(f), "--out", "s3://nobucket/prefix"], e, timeout=180)
    assert res.returncode == 2 and "not reachable" in res.stderr and "SDFLEET_S3_ENDPOINT_URL" in res.stderr
    assert r.llen(QUEUE) == 0


def test_skip_invalid_submits_the_valid_lines(tmp_path, env, r):
    f = write(tmp_path, "jobs.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n{"prompt": "b"}\n')
    res = run_cli(["submit", str(f), "--skip-invalid", "--batch", "b1"], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "b1" and "skipped line 2" in res.stderr
    assert r.llen(QUEUE) == 2


def test_unknown_setting_is_an_error(tmp_path, env):
    f = write(tmp_path, "p.txt", "a\n")
    res = run_cli(["submit", str(f)], {**env, "SDFLEET_VISIBILTY_TIMEOUT": "10"})
    assert res.returncode == 2 and "did you mean SDFLEET_VISIBILITY_TIMEOUT" in res.stderr


def test_resubmission_enqueues_only_new_jobs_and_status_counts(tmp_path, env, r):
    f = write(tmp_path, "p.txt", "a cat\na dog\n")
    res = run_cli(["submit", str(f), "--batch", "again", "--width", "512", "--height", "512"], env)
    assert res.returncode == 0 and "2 enqueued" in res.stderr
    res = run_cli(["submit", str(f), "--batch", "again", "--width", "512", "--height", "512"], env)
    assert "0 enqueued" in res.stderr and "2 already pending" in res.stderr
    assert r.llen(QUEUE) == 2
    f.write_text("a cat\na dog\na bird\n")
    res = run_cli(["submit", str(f), "--batch", "again", "--width", "512", "--height", "512"], env)
    assert "1 enqueued" in res.stderr and r.llen(QUEUE) == 3
    st = json.loads(run_cli(["status", "again", "--json"], env).stdout)
    assert st["total"] == 3 and st["counts"]["queued"] == 3 and not st["complete"]


def test_cancel_marks_queued_jobs_and_results_manifest(tmp_path, env, r):
    f = write(tmp_path, "jobs.jsonl", "".join(json.dumps({"prompt": f"p{i}", "custom_id": f"c{i}", "seed": i}) + "\n"
                                              for i in range(3)))
    assert run_cli(["submit", str(f), "--batch", "cx"], env).returncode == 0
    res = run_cli(["cancel", "cx"], env)
    assert res.returncode == 0 and "3 queued job(s) cancelled" in res.stderr
    st = json.loads(run_cli(["status", "cx", "--json"], env).stdout)
    assert st["counts"]["cancelled"] == 3 and st["complete"]
    assert run_cli(["wait", "cx"], env).returncode == 1  # not all succeeded
    out = tmp_path / "manifest.jsonl"
    assert run_cli(["results", "cx", "-o", str(out)], env).returncode == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["custom_id"], x["status"], x["seed"]) for x in rows] == [("c0", "cancelled", 0), ("c1", "cancelled", 1),
                                                                        ("c2", "cancelled", 2)]
    assert tuple(rows[0]) == MANIFEST_FIELDS and rows[0]["prompt"] == "p0" and rows[0]["sidecar_url"] is None
    # Resubmitting a cancelled batch re-queues its jobs.
    res = run_cli(["submit", str(f), "--batch", "cx"], env)
    assert "3 enqueued" in res.stderr


def test_help_has_examples(env):
    res = run_cli(["--help"], env)
    assert res.returncode == 0 and "examples:" in res.stdout and "exit codes" in res.stdout


def test_out_problems_are_usage_errors_with_our_message(tmp_path, env, r):
    f = write(tmp_path, "p.txt", "a cat\n")
    for out, words in (("s3://Bad_Bucket!/x", "not a valid S3 bucket name"), ("file:///proc/x", "system directory"),
                       ("s3://ab/x", "not a valid S3 bucket name"), ("s3://bucket/../x", "'..'"),
                       ("ftp://x", "not a storage location")):
        res = run_cli(["submit", str(f), "--out", out], env)
        assert res.returncode == 2, (out, res.stderr)
        assert words in res.stderr and "--out" in res.stderr and "regex" not in res.stderr, (out, res.stderr)
    line = write(tmp_path, "j.jsonl", json.dumps({"prompt": "a", "out": "s3://Bad_Bucket!/x"}) + "\n")
    res = run_cli(["submit", str(line)], env)
    assert res.returncode == 2 and "line 1, field 'out'" in res.stderr
    assert r.dbsize() == 0


@pytest.mark.parametrize("url, words", [
    ("redis:///", "no valid host"), ("redis://127.0.0.1:6379/abc", "'abc' is not a number"), ("", "is empty"),
    ("unix:///tmp/redis.sock", "not redis or rediss"), ("redis://127.0.0.1/0", "no port"),
    ("redis://127.0.0.1:6379/0?db=3", "unknown option 'db'"), ("http://127.0.0.1:6379/0", "not redis or rediss"),
])
def test_redis_url_is_parsed_strictly(tmp_path, env, r, url, words):
    f = write(tmp_path, "p.txt", "a cat\n")
    res = run_cli(["submit", str(f)], {**env, "REDIS_URL": url})
    assert res.returncode == 2 and "REDIS_URL" in res.stderr and words in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and r.dbsize() == 0


def test_redis_down_is_one_line_naming_redis_url(tmp_path, env):
    f = write(tmp_path, "p.txt", "a cat\n")
    port = free_port()  # nothing listens there
    e = {**env, "REDIS_URL": f"redis://user:s3cret@127.0.0.1:{port}/0"}
    for args in (["submit", str(f)], ["status", "x"], ["wait", "x"], ["results", "x"], ["webhooks", "list-failed"]):
        res = run_cli(args, e, timeout=60)
        assert res.returncode == 1, (args, res.stderr)
        assert res.stderr.count("\n") == 1 and "REDIS_URL" in res.stderr and f"127.0.0.1:{port}" in res.stderr, res.stderr
        assert "s3cret" not in res.stderr


def test_closed_stdout_pipe_exits_quietly(tmp_path, env, r):
    f = write(tmp_path, "p.txt", "".join(f"prompt number {i}\n" for i in range(3000)))
    assert run_cli(["submit", str(f), "--batch", "pipe"], env).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "results", "pipe"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # like '| head -1': read one line, then close the pipe
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 0 and err == "", err
    assert json.loads(first)["custom_id"] == "line-000001"


def test_version_and_submit_from_stdin(tmp_path, env, r):
    res = run_cli(["--version"], env)
    assert res.returncode == 0 and res.stdout.startswith("sdfleet ") and res.stdout.split()[1][0].isdigit()
    res = run_cli(["submit", "-", "--batch", "stdin-text"], env, input="a cat\na dog\n")
    assert res.returncode == 0, res.stderr
    assert r.hget(keys.batch_custom_ids("stdin-text"), "line-000002")
    res = run_cli(["submit", "-", "--batch", "stdin-jsonl"], env, input='{"prompt": "a", "custom_id": "x1"}\n')
    assert res.returncode == 0 and r.hget(keys.batch_custom_ids("stdin-jsonl"), "x1"), res.stderr
    res = run_cli(["submit", "-"], env, input='{"prompt": ""}\n')
    assert res.returncode == 2 and "standard input: 1 invalid line" in res.stderr


def test_help_shows_every_default(env):
    from sdfleet.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = []
    for name, sub in subs.items():
        for action in sub._actions:
            if (action.option_strings and action.help is not argparse.SUPPRESS
                    and action.default not in (None, False, [], argparse.SUPPRESS)
                    and "default" not in sub._get_formatter()._expand_help(action)):
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []
    text = run_cli(["submit", "--help"], env).stdout
    for words in ("(default: 1024)", "(default: 28)", "(default: 4.5)", "(default: tiny)", "(default: s3)",
                  "'-' reads standard input", "/models/sd3.5-large"):
        assert words in text, words


def test_wait_timeout_reports_what_is_still_queued_and_that_no_worker_listens(tmp_path, env, r):
    f = write(tmp_path, "p.txt", "".join(f"p{i}\n" for i in range(5)))
    res = run_cli(["submit", str(f), "--batch", "nobody"], env)
    assert res.returncode == 0
    assert "warning: no live worker serves queue sdfleet.gen.tiny" in res.stderr
    res = run_cli(["wait", "nobody", "--timeout", "0.5"], env)
    assert res.returncode == 3  # not over yet (1 would say: over, some failed)
    assert "5 still queued, 0 running" in res.stderr and "no live worker serves sdfleet.gen.tiny" in res.stderr
    assert "start one: sdfleet worker --model tiny" in res.stderr, res.stderr


def test_no_warning_when_a_live_worker_serves_the_queue(tmp_path, env, r):
    # A live worker's heartbeat as workers write it (keys.worker with its queue, listed in keys.WORKERS); a real
    # worker process is not needed to tell whether the producer reads it.
    r.sadd(keys.WORKERS, "w1")
    r.hset(keys.worker("w1"), mapping={"queue": "sdfleet.gen.sd3.5-large", "worker_id": "w1"})
    r.pexpire(keys.worker("w1"), 60_000)
    r.sadd(keys.WORKERS, "gone")  # a dead worker: listed, heartbeat expired
    f = write(tmp_path, "p.txt", "a cat\n")
    res = run_cli(["submit", str(f), "--model", "/models/sd3.5-large", "--batch", "served"], env)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    assert r.llen("sdfleet.gen.sd3.5-large") == 1
    # Random-weight Large has a queue of its own, which no live worker serves here.
    res = run_cli(["submit", str(f), "--model", "large", "--batch", "served2"], env)
    assert "no live worker serves queue sdfleet.gen.sd3.5-large-random" in res.stderr
    assert r.llen("sdfleet.gen.sd3.5-large") == 1 and r.llen("sdfleet.gen.sd3.5-large-random") == 1
    res = run_cli(["submit", str(f), "--model", "/models/sd3.5-medium", "--batch", "unserved"], env)
    assert res.returncode == 0 and "no live worker serves queue sdfleet.gen.sd3.5-medium" in res.stderr


def test_trailing_newlines_do_not_pass_validators(tmp_path, env, r):
    f = write(tmp_path, "p.txt", "a cat\n")
    res = run_cli(["submit", str(f), "--batch", "foo\n"], env)
    assert res.returncode == 2 and "--batch" in res.stderr
    for line, field in (({"prompt": "a", "custom_id": "nl\n"}, "custom_id"), ({"prompt": "a", "model": "tiny\n"}, "model"),
                        ({"prompt": "a", "webhook": "https://example.com/\n"}, "webhook")):
        j = write(tmp_path, "j.jsonl", json.dumps(line) + "\n")
        res = run_cli(["submit", str(j)], env)
        assert res.returncode == 2 and f"field '{field}'" in res.stderr, res.stderr
    res = run_cli(["submit", str(f), "--model", "tiny\n"], env)
    assert res.returncode == 2 and "--model" in res.stderr
    assert r.dbsize() == 0
    assert not list((tmp_path / "out").glob("**/*\n*")) if (tmp_path / "out").exists() else True


def test_resubmission_with_changed_parameters_is_a_conflict_unless_replace(tmp_path, env, r):
    rows = [{"prompt": f"p{i}", "custom_id": f"c{i}", "seed": i, "steps": 4} for i in range(3)]
    f = write(tmp_path, "j.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
    assert run_cli(["submit", str(f), "--batch", "idem"], env).returncode == 0
    rows[1]["steps"], rows[2]["seed"] = 9, 99
    f.write_text("".join(json.dumps(x) + "\n" for x in rows))
    res = run_cli(["submit", str(f), "--batch", "idem"], env)
    assert res.returncode == 2, res.stderr
    assert "c1 (steps)" in res.stderr and "c2 (seed)" in res.stderr and "c0" not in res.stderr and "--replace" in res.stderr
    assert r.llen(QUEUE) == 3 and not r.exists(keys.submission("idem"))
    res = run_cli(["submit", str(f), "--batch", "idem", "--replace"], env)
    assert res.returncode == 0 and "2 enqueued, 2 replaced" in res.stderr and "1 already pending" in res.stderr
    assert r.llen(QUEUE) == 5 and r.hget(keys.batch("idem"), "total") == "3"
    specs = {x["custom_id"]: x for x in map(json.loads, run_cli(["results", "idem"], env).stdout.splitlines())}
    assert (specs["c1"]["steps"], specs["c2"]["seed"], specs["c0"]["steps"]) == (9, 99, 4)
    st = json.loads(run_cli(["status", "idem", "--json"], env).stdout)
    assert st["counts"]["queued"] == 3 and st["total"] == 3


def test_text_resubmission_finds_its_jobs_by_line_and_refuses_changed_flags(tmp_path, env, r):
    f = write(tmp_path, "p.txt", "".join(f"prompt {i}\n" for i in range(5)))
    assert run_cli(["submit", str(f), "--batch", "txt"], env).returncode == 0
    res = run_cli(["submit", str(f), "--batch", "txt"], env)
    assert "0 enqueued" in res.stderr and "5 already pending" in res.stderr
    res = run_cli(["submit", str(f), "--batch", "txt", "--steps", "10"], env)
    assert res.returncode == 2 and "5 job(s)" in res.stderr and "line-000003 (steps)" in res.stderr
    assert r.hget(keys.batch("txt"), "total") == "5" and r.llen(QUEUE) == 5  # not 10
    cids = [json.loads(x)["custom_id"] for x in run_cli(["results", "txt"], env).stdout.splitlines()]
    assert cids == [f"line-{n:06d}" for n in range(1, 6)]


def test_webhook_secret_flag_is_refused_and_no_secret_reaches_redis(tmp_path, env, r):
    from sdfleet.webhooks import new_secret

    secret = new_secret()
    f = write(tmp_path, "p.txt", "a cat\n")
    res = run_cli(["submit", str(f), "--webhook-secret", secret], env)
    assert res.returncode == 2 and "SDFLEET_WEBHOOK_SECRET" in res.stderr and "webhook worker" in res.stderr
    assert r.dbsize() == 0
    e = {**env, "SDFLEET_WEBHOOK_SECRET": secret}
    assert run_cli(["submit", str(f), "--batch", "sec", "--webhook", "https://8.8.8.8/h"], e).returncode == 0
    dump = json.dumps({k: (r.hgetall(k) if r.type(k) == "hash" else r.dump(k).hex()) for k in r.keys("*")})
    body = secret.removeprefix("whsec_")
    assert body not in dump and secret not in dump
    import hashlib

    assert r.hget(keys.batch("sec"), "webhook_key_id") == hashlib.sha256(secret.encode()).hexdigest()[:16]


def test_results_in_each_url_style_and_presigned_urls_fetch_the_object(tmp_path, s3, r):
    import urllib.request

    env, bucket, client = s3
    f = write(tmp_path, "p.txt", "a cat\na dog\n")
    res = run_cli(["submit", str(f), "--batch", "urls", "--out", f"s3://{bucket}/run", "--url-style", "presigned",
                   "--url-ttl", "600"], env)
    assert res.returncode == 0, res.stderr
    endpoint = env["SDFLEET_S3_ENDPOINT_URL"]
    for jid in r.lrange(keys.batch_jobs("urls"), 0, -1):
        cid = r.hget(keys.job(jid), "custom_id")
        client.put_object(Bucket=bucket, Key=f"run/urls/{cid}.png", Body=cid.encode())
        # The URL a worker records once the object is stored.
        r.hset(keys.job(jid), mapping={"url": f"s3://{bucket}/run/urls/{cid}.png"})
    rows = [json.loads(x) for x in run_cli(["results", "urls"], env).stdout.splitlines()]
    assert [x["custom_id"] for x in rows] == ["line-000001", "line-000002"]
    for row in rows:
        assert row["url"].startswith(f"{endpoint}/{bucket}/run/urls/{row['custom_id']}.png?")
        assert "X-Amz-Signature=" in row["url"] and "X-Amz-Expires=600" in row["url"]
        with urllib.request.urlopen(row["url"], timeout=10) as resp:  # no credentials needed
            assert resp.read() == row["custom_id"].encode()
    https = [json.loads(x)["url"] for x in run_cli(["results", "urls", "--url-style", "https"], env).stdout.splitlines()]
    assert https == [f"{endpoint}/{bucket}/run/urls/line-00000{n}.png" for n in (1, 2)]
    plain = [json.loads(x)["url"] for x in run_cli(["results", "urls", "--url-style", "s3"], env).stdout.splitlines()]
    assert plain == [f"s3://{bucket}/run/urls/line-00000{n}.png" for n in (1, 2)]


def test_rediss_without_ca_options_says_the_system_store_was_used(tmp_path, env):
    """A TLS endpoint whose certificate no system CA signed (self-signed, made here with openssl)."""
    import shutil
    import socket
    import ssl
    import threading

    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make the test certificate"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate, as it should

    threading.Thread(target=serve, daemon=True).start()
    try:
        res = run_cli(["status", "x"], {**env, "REDIS_URL": f"rediss://127.0.0.1:{port}/0"}, timeout=60)
    finally:
        stop.set()
        server.close()
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "TLS verification" in res.stderr and "system CA store" in res.stderr and "ssl_ca_certs" in res.stderr


def test_submit_wait_keeps_waiting_and_says_no_worker_is_listening(tmp_path, env, r):
    import signal
    import time

    f = write(tmp_path, "p.txt", "a cat\n")
    proc = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "submit", str(f), "--batch", "w", "--wait"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not r.exists(keys.batch("w")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(2.0)  # several polls of the progress line
    assert proc.poll() is None, "--wait keeps waiting while no worker serves the queue"
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=30)
    # Ctrl-C stops the wait at its next poll, with the bar's last line and where the batch stands; the
    # batch itself goes on
    assert time.monotonic() - t0 < 10 and proc.returncode == 130, (proc.returncode, err)
    assert out.strip() == "w"
    assert "no worker is listening on sdfleet.gen.tiny" in err and "Traceback" not in err, err
    assert "0 succeeded, 0 failed, 0 cancelled of 1; 1 still queued" in err and "sdfleet wait w" in err, err


def _wait_proc(env, batch, **kw):
    return subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "wait", batch], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("outage", ["killed", "hung"])
def test_ctrl_c_ends_a_wait_whose_redis_is_gone_or_hung(tmp_path, env, outage):
    """The first Ctrl-C only sets a flag that the wait reads between polls; a poll stuck in Redis (killed:
    the client retries for ~30 s; hung: no socket timeout) never gets there, so the flag's timer interrupts it."""
    import signal
    import time

    from sdfleet.redisconn import PrivateRedis

    server = PrivateRedis(port=free_port())
    e = {**env, "REDIS_URL": server.url}
    try:
        assert run_cli(["submit", str(write(tmp_path, "p.txt", "a cat\n")), "--batch", "g"], e).returncode == 0
        proc = _wait_proc(e, "g")
        time.sleep(2.0)
        assert proc.poll() is None
        if outage == "killed":
            server.proc.kill()
        else:
            server.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # a poll is now stuck
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=40)
        assert proc.returncode == 130 and time.monotonic() - t0 < 8, (proc.returncode, time.monotonic() - t0, err)
        assert "stopped waiting; the batch goes on" in err and "sdfleet wait g" in err, err
        assert "Traceback" not in err, err
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()


def test_an_ignored_sigint_stays_ignored_while_waiting(tmp_path, env, r):
    import signal
    import time

    assert run_cli(["submit", str(write(tmp_path, "p.txt", "a cat\n")), "--batch", "n"], env).returncode == 0
    # as under nohup, or a script's "cmd &": SIGINT ignored before the process starts
    proc = _wait_proc(env, "n", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(3.5)  # past the flag's timer too
        assert proc.poll() is None, proc.communicate()[1]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_a_batch_that_ends_in_the_poll_that_sees_ctrl_c_is_reported_as_ended(monkeypatch, capsys):
    import producer.status as status
    from sdfleet import cli

    def ends_as_ctrl_c_arrives(store, batch_id, *, stop, **kw):
        import signal

        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C only sets the flag (its handler runs here)
        assert stop()
        return {"complete": True, "total": 1, "idle_queues": (),
                "counts": {"succeeded": 1, "failed": 0, "cancelled": 0, "queued": 0, "running": 0}}

    monkeypatch.setattr(status, "wait_for_batch", ends_as_ctrl_c_arrives)
    monkeypatch.setattr(status, "describe", lambda st, idle: "1 succeeded of 1")
    assert cli._wait(None, "b", None) == 0
    assert "stopped waiting" not in capsys.readouterr().err


def test_the_ctrl_c_timer_never_interrupts_after_the_wait_has_ended(monkeypatch):
    """The timer fires as the wait ends (its signal slowed down to land while the context closes): the
    signal is dropped, and nothing is raised after the context has closed."""
    import signal
    import time

    from sdfleet import cli

    real_kill = signal.pthread_kill

    def slow_kill(tid, sig):
        time.sleep(0.3)  # a thread switch between the timer's check and its signal
        real_kill(tid, sig)

    monkeypatch.setattr(signal, "pthread_kill", slow_kill)
    before = signal.getsignal(signal.SIGINT)
    with cli._CtrlC(grace_s=0.1) as ctrl_c:
        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: the flag, and the timer
        assert ctrl_c.hit
        time.sleep(0.15)  # the timer is now inside its check, holding the lock
    time.sleep(0.4)  # a KeyboardInterrupt would surface here
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("when", ["before_the_commit", "after_the_commit", "resubmission"])
def test_ctrl_c_during_submit_says_what_became_of_the_batch(tmp_path, env, r, monkeypatch, capsys, when):
    import os

    import producer.submit as producer_submit
    from sdfleet import cli

    for k in [k for k in os.environ if k.startswith("SDFLEET_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    f = write(tmp_path, "p.txt", "a cat\na dog\n")
    batch = ["--batch", "again"] if when == "resubmission" else []
    if when == "resubmission":
        assert cli.main(["submit", str(f), *batch]) == 0
        capsys.readouterr()
    real = producer_submit.submit

    def interrupted(*a, **kw):  # Ctrl-C lands before submit() begins, or right after its commit
        if when == "after_the_commit":
            real(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(producer_submit, "submit", interrupted)
    assert cli.main(["submit", str(f), *batch]) == 130
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if when == "after_the_commit":
        batch_id = out.strip()
        assert r.exists(keys.batch(batch_id)) and r.hget(keys.batch(batch_id), "total") == "2"
        assert f"interrupted after batch {batch_id} was committed" in err and f"sdfleet cancel {batch_id}" in err
    elif when == "before_the_commit":
        assert out == "" and "interrupted before batch b" in err and "nothing was recorded" in err, err
        assert not r.keys("sdfleet:batch:*")
    else:
        assert out == "" and "batch again existed before this submission" in err, err


def test_an_interrupted_submission_is_not_misread_from_a_stale_reply(redis_url, r, capsys):
    """A Ctrl-C between a command's send and its reply leaves that reply unread on a pooled connection; the
    check of what became of the batch must not read it as its own answer."""
    import redis as redis_lib

    from sdfleet import cli
    from sdfleet.state import JobStore

    client = redis_lib.Redis.from_url(redis_url)
    conn = client.connection_pool.get_connection()
    conn.send_command("RPUSH", "stale-list", "x")  # its reply, 1, is never read
    client.connection_pool.release(conn)
    assert cli._interrupted_submission(JobStore(client), "never-committed", existed=False) == 130
    out, err = capsys.readouterr()
    assert out == "" and "interrupted before batch never-committed was committed: nothing was recorded" in err, err


def test_ctrl_c_while_reading_the_file_says_nothing_was_submitted(tmp_path, env, r, monkeypatch, capsys):
    import producer.reader as reader
    from sdfleet import cli

    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(reader, "read_file", interrupted)
    assert cli.main(["submit", str(write(tmp_path, "p.txt", "a cat\n"))]) == 130
    out, err = capsys.readouterr()
    assert out == "" and "interrupted while reading" in err and "nothing was submitted" in err, err
    assert r.dbsize() == 0


def test_cancel_prints_its_own_line_and_no_library_log_unless_asked(tmp_path, env, r):
    assert run_cli(["submit", str(write(tmp_path, "p.txt", "a\nb\n")), "--batch", "cq"], env).returncode == 0
    res = run_cli(["cancel", "cq"], env)
    assert res.returncode == 0 and res.stderr.strip().splitlines() == [
        "2 queued job(s) cancelled and revoked; running jobs finish"], res.stderr
    assert run_cli(["submit", str(write(tmp_path, "q.txt", "c\n")), "--batch", "cq2"], env).returncode == 0
    res = run_cli(["cancel", "cq2"], {**env, "SDFLEET_LOG_LEVEL": "info"})
    assert res.returncode == 0 and '"jobs cancelled"' in res.stderr, res.stderr


def test_rediss_urls_verify_in_both_clients():
    import ssl

    from kombu.utils.url import parse_url

    from sdfleet.settings import Settings

    url = Settings(redis_url="rediss://user:pw@redis.example.test:6380/0").redis_url
    assert parse_url(url)["ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED  # kombu alone would not verify
    kept = Settings(redis_url="rediss://h:6380/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none").redis_url
    assert kept == "rediss://h:6380/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none"
    assert Settings(redis_url="redis://h:6379/0").redis_url == "redis://h:6379/0"
