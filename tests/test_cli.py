"""The CLI against a real Redis, without workers: validation, nothing enqueued on bad input,
resubmission, cancel, status and results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

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
    assert res.returncode == 1 and "cannot write there" in res.stderr
    assert r.llen(QUEUE) == 0


def test_unreachable_s3_out(tmp_path, env, r):
    f = write(tmp_path, "p.txt", "a cat\n")
    e = {**env, "SDFLEET_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
         "AWS_SECRET_ACCESS_KEY": "x", "SDFLEET_UPLOAD_RETRIES": "0"}
    res = run_cli(["submit", str(f), "--out", "s3://nobucket/prefix"], e, timeout=180)
    assert res.returncode == 1 and "not reachable" in res.stderr
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
    assert set(rows[0]) == {"custom_id", "job_id", "status", "url", "seed", "width", "height", "error"}
    # Resubmitting a cancelled batch re-queues its jobs.
    res = run_cli(["submit", str(f), "--batch", "cx"], env)
    assert "3 enqueued" in res.stderr


def test_help_has_examples(env):
    res = run_cli(["--help"], env)
    assert res.returncode == 0 and "examples:" in res.stdout and "exit codes" in res.stdout
