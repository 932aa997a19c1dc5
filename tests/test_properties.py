"""Property-based tests of the job schema and the JSONL reader: hostile input never escapes as anything
but a clear InvalidJob, and whatever is accepted satisfies every documented bound."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from producer.reader import detect_format, parse_lines, read_lines
from sdfleet.errors import InvalidJob
from sdfleet.jobs import FIELDS, MAX_PROMPT_CHARS, JobSpec, parse_job

anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=6,
)
field_values = {
    "prompt": st.text(max_size=60) | st.just("x" * (MAX_PROMPT_CHARS + 1)) | anything,
    "negative_prompt": st.text(max_size=20) | anything,
    "width": st.integers(-10, 5000) | st.floats() | anything,
    "height": st.integers(-10, 5000) | anything,
    "steps": st.integers(-5, 300) | anything,
    "guidance_scale": st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 50) | anything,
    "seed": st.integers(-(2**40), 2**40) | anything,
    "model": st.text(max_size=20) | st.just("tiny"),
    "custom_id": st.text(max_size=40) | st.just("../x") | st.just("ok-1"),
    "out": st.text(max_size=30) | st.just("file:///tmp/x") | st.just("s3://bucket/p"),
    "webhook": st.text(max_size=30) | st.just("https://example.com/h"),
    "webhook_events": st.lists(st.sampled_from(["job.succeeded", "job.failed", "batch.completed", "x"]), max_size=3),
}
job_dicts = st.fixed_dictionaries({}, optional={**field_values, "extra_field": anything})


def check_accepted(spec: JobSpec) -> None:
    assert spec.prompt.strip() and len(spec.prompt) <= MAX_PROMPT_CHARS and "\x00" not in spec.prompt
    for side in (spec.width, spec.height):
        assert type(side) is int and 256 <= side <= 2048 and side % 16 == 0
    assert type(spec.steps) is int and 1 <= spec.steps <= 150
    assert math.isfinite(spec.guidance_scale) and 0 <= spec.guidance_scale <= 30
    assert spec.seed is None or (type(spec.seed) is int and 0 <= spec.seed < 2**32)
    if spec.custom_id is not None:
        assert "/" not in spec.custom_id and ".." not in spec.custom_id and not spec.custom_id.startswith(".")
    assert spec.webhook is None or spec.webhook.startswith(("http://", "https://"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job_dicts)
def test_parse_job_accepts_only_valid_jobs_and_names_the_field_otherwise(data):
    try:
        spec = parse_job(data, line=3)
    except InvalidJob as exc:
        assert exc.line == 3
        assert exc.field in FIELDS or exc.field in data or exc.field is None
        assert str(exc).startswith("line 3")
    else:
        check_accepted(spec)
        # What was accepted survives the queue: a round trip through JSON gives the same job.
        assert parse_job(json.loads(spec.model_dump_json())) == spec


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_reader_never_crashes_on_arbitrary_bytes(blob):
    lines, errors = read_lines(blob)
    for fmt in ("jsonl", "text"):
        res = parse_lines(lines, fmt, {}, errors)
        numbered = {n for n, text in enumerate(lines, 1) if text.strip()} | {e.line for e in errors}
        assert {n for n, _ in res.jobs} | {e.line for e in res.errors} <= numbered
        assert not ({n for n, _ in res.jobs} & {e.line for e in res.errors})
        for _, spec in res.jobs:
            check_accepted(spec)
    detect_format("x.bin", lines)


@settings(max_examples=200, deadline=None)
@given(st.lists(job_dicts, max_size=6), st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_jsonl_files_report_every_bad_line(rows, newline, bom):
    text = newline.join(json.dumps(r, allow_nan=True) for r in rows)
    blob = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")
    try:
        lines, errors = read_lines(blob)
    except UnicodeEncodeError:
        return
    res = parse_lines(lines, "jsonl", {}, errors)
    assert len(res.jobs) + len(res.errors) == len([ln for ln in lines if ln.strip()])
    ids = [s.custom_id for _, s in res.jobs if s.custom_id is not None]
    assert len(ids) == len(set(ids)), "custom ids are unique within a batch"


# --- the whole submit path over raw bytes -------------------------------------------------------------------

raw_lines = st.one_of(
    st.sampled_from([b'{"prompt": "a red fox", "width": 512, "height": 512}', b"a plain prompt", b""]),
    st.binary(max_size=80),
    job_dicts.map(lambda d: json.dumps(d, allow_nan=True).encode()),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b'{"prompt": "x\\ud800"}', b'{"prompt": "\\u200b"}', b'{"prompt": "a", "prompt": "b"}',
                     b"[" * 2000, b'{"prompt": "a", "model": "tiny\\n"}', b'{"prompt": "ok", "custom_id": "nl\\n"}',
                     b'{"prompt": "a", "webhook": "http://[2002:7f00:1::1]/"}', b"\xef\xbb\xbf{\"prompt\": \"bom\"}"]),
)
job_files = st.tuples(st.lists(raw_lines, max_size=6), st.sampled_from([b"\n", b"\r\n"]),
                      st.sampled_from([".jsonl", ".txt", ".dat"]))


def _submit_in_process(path: str) -> tuple[int, str]:
    import contextlib
    import io

    from sdfleet.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(["submit", path])
        except SystemExit as exc:  # argparse; not expected for a file argument
            rc = exc.code
    return rc, err.getvalue()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(job_files)
def test_submit_over_raw_bytes_exits_0_or_2_and_writes_nothing_on_2(tmp_path, env, r, monkeypatch, case):
    """Any bytes through the CLI's submit (in this process, so hundreds of files run in seconds): an exception
    escaping ``main`` is a traceback for the user, so none may; exit 0 or 2 only; exit 2 leaves Redis empty."""
    lines, newline, suffix = case
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    path = tmp_path / f"jobs{suffix}"
    path.write_bytes(newline.join(lines))
    r.flushdb()
    rc, err = _submit_in_process(str(path))
    event(f"exit {rc}")
    assert rc in (0, 2), err
    if rc == 2:
        assert r.dbsize() == 0, err
        assert err.startswith("sdfleet: "), err
    else:
        assert any(k.startswith("sdfleet.gen.") for k in r.keys("*")), err  # something was enqueued


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(job_files)
def test_submit_processes_over_raw_bytes_never_print_a_traceback(env, r, case):
    """The same through real ``sdfleet submit -`` processes reading standard input (fewer: a process each)."""
    from tests.conftest import run_cli

    lines, newline, _ = case
    r.flushdb()
    res = subprocess.run([sys.executable, "-m", "sdfleet.cli", "submit", "-"], env=env, input=newline.join(lines),
                         capture_output=True, timeout=120, cwd=run_cli.__globals__["ROOT"])
    err = res.stderr.decode("utf-8", "replace")
    assert res.returncode in (0, 2) and "Traceback" not in err, err
    if res.returncode == 2:
        assert r.dbsize() == 0, err
