"""The local driver for real: `sdfleet scheduler --driver local` starts, drains and restarts `sdfleet worker`
processes against a real Redis while jobs flow, and no job is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.driver import LocalDriver
from sdfleet import keys
from sdfleet.logs import get as get_log
from sdfleet.redisconn import free_port
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


def wait_for(what: str, check: Callable[[], object], timeout: float, log: Callable[[], str] = lambda: "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}\n{log()[-6000:]}")


def live(env: dict[str, str]) -> list[dict]:
    res = run_cli(["workers", "--json"], env)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def scale_doc(port: int, pool: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/scale/{pool}", timeout=10) as resp:
        return json.loads(resp.read())


def test_backlog_starts_workers_and_they_drain_to_the_minimum(tmp_path: Path, env: dict[str, str], r) -> None:
    port = free_port()
    log_path = tmp_path / "scheduler.log"
    # Seconds per image as workers would have measured them: 60 jobs = 30 GPU-s, over a 5 s target = 6
    # workers wanted, capped at --max-workers 2.
    r.hset(keys.service_times("tiny"), keys.bucket_of(256, 256, 4), 0.5)
    sched = subprocess.Popen(
        [sys.executable, "-m", "sdfleet.cli", "scheduler", "--driver", "local", "--model", "tiny",
         "--min-workers", "0", "--max-workers", "2", "--cooldown-s", "5", "--metrics-port", str(port),
         "--interval", "0.5", "--target-drain-s", "5", "--worker-args", "--max-batch 2"],
        env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    log = lambda: log_path.read_text(errors="replace")  # noqa: E731
    try:
        wait_for("the scheduler's first decision", lambda: _get(lambda: scale_doc(port, "tiny")), 60, log)
        assert scale_doc(port, "tiny")["desired"] == 0 and live(env) == [], "no backlog: no worker"

        jobs = tmp_path / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({"prompt": f"p{i}", "custom_id": f"c{i}", "width": 256, "height": 256,
                                            "steps": 4, "seed": i}) + "\n" for i in range(60)))
        assert run_cli(["submit", str(jobs), "--batch", "scale"], env).returncode == 0
        wait_for("desired 2", lambda: scale_doc(port, "tiny")["desired"] == 2, 30, log)
        # Both workers' heartbeats show up while the backlog lasts (on two shared cores the first may finish
        # its share before the second has booted, so they are collected over time).
        seen: dict[str, dict] = {}

        def both_seen() -> bool:
            seen.update({w["id"]: w for w in live(env)})
            return len(seen) >= 2

        wait_for("two workers", both_seen, 180, log)
        assert {(w["model"], w["device"]) for w in seen.values()} == {("tiny", "cpu")}
        assert {"id", "model", "device", "state", "current_batch"} <= set(next(iter(seen.values())))

        res = run_cli(["wait", "scale", "--timeout", "240"], env, timeout=300)
        assert res.returncode == 0, res.stderr + log()[-4000:]
        # The gauge is the scheduler's count at its last look (every --interval), so it follows `workers` by up to
        # one interval: waited for with the rest rather than read at the instant the last heartbeat went.
        wait_for("the pool back at the minimum",
                 lambda: live(env) == [] and scale_doc(port, "tiny")["desired"] == 0
                 and metric(port, "sdfleet_pool_actual_workers", pool="tiny") == 0, 120, log)
        assert metric(port, "sdfleet_pool_scale_events_total", pool="tiny", direction="up") >= 1
        assert metric(port, "sdfleet_pool_scale_events_total", pool="tiny", direction="down") >= 1
    finally:
        sched.send_signal(signal.SIGTERM)
        rc = sched.wait(120)
    assert rc == 0, log()[-4000:]

    lines = [json.loads(x) for x in run_cli(["results", "scale"], env).stdout.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"c{i}" for i in range(60))
    assert all(x["status"] == "succeeded" and Path(x["url"][len("file://"):]).is_file() for x in lines), "a job was lost"
    events = [json.loads(x) for x in log().splitlines() if x.startswith("{")]
    drained = [e for e in events if e.get("event") == "worker drained and exited"]
    assert drained and all(e["exit_code"] == 0 for e in drained), "scale-in must be a drain that exits 0"


def _get(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except OSError:
        return None


FAKE_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    out = os.environ["FAKE_OUT"]
    args = sys.argv[1:]
    wid = args[args.index("--worker-id") + 1]
    with open(os.path.join(out, wid), "w") as f:
        json.dump({"argv": args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        time.sleep(0.05)
""")


def test_one_worker_per_visible_gpu_in_an_inherited_list(tmp_path: Path) -> None:
    # No GPU here: a stand-in for `python -m sdfleet.cli worker` records what the driver gave it.
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.argv = sys.argv[2:]\n"
                    f"exec({FAKE_WORKER!r})\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    environ = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,GPU-5f2e,7", "FAKE_OUT": str(out)}
    d = LocalDriver(model="/models/sd3.5-large", max_workers=8, log=get_log("test"), environ=environ,
                    python=str(fake), metrics_port_base=9300)
    assert d.pool == "sd3.5-large"
    assert d.reconcile(8, {}) == (3, 0), "one worker per visible GPU, never more"
    wait_for("three workers", lambda: len(list(out.iterdir())) == 3, 30)
    seen = [json.loads(p.read_text()) for p in sorted(out.iterdir())]
    assert sorted(s["cuda"] for s in seen) == ["3", "7", "GPU-5f2e"]
    for s in seen:
        argv = s["argv"]
        assert argv[argv.index("--device") + 1] == "cuda:0", "a pinned worker sees its GPU as cuda:0"
        assert argv[argv.index("--model") + 1] == "/models/sd3.5-large"
    assert sorted(int(s["argv"][s["argv"].index("--metrics-port") + 1]) for s in seen) == [9300, 9301, 9302]
    # Scale in: idle workers first, with SIGTERM; the exit is a drain (code 0), not a crash.
    ids = list(d.workers)
    beats = {ids[0]: {"state": "busy", "current_batch_size": "4"}, ids[1]: {"state": "idle"},
             ids[2]: {"state": "busy", "current_batch_size": "1"}}
    assert d.reconcile(1, beats) == (0, 2)
    assert {w.worker_id for w in d.draining()} == {ids[1], ids[2]}
    wait_for("two drained", lambda: (d.poll() or True) and len(d.workers) == 1, 30)
    assert d.restarts == 0
    # A worker that dies unasked is started again in its slot (reclaiming its jobs is the workers' duty).
    (survivor,) = d.workers.values()
    survivor.proc.kill()
    survivor.proc.wait(10)
    assert d.reconcile(1, {}) == (1, 0) and d.restarts == 1
    (replacement,) = d.workers.values()
    assert replacement.worker_id != survivor.worker_id and replacement.slot.name == survivor.slot.name
    assert d.stop_all(30) and not d.workers


def test_a_booting_worker_is_signalled_only_once_it_is_up(tmp_path: Path) -> None:
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.argv = sys.argv[2:]\nexec({FAKE_WORKER!r})\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    d = LocalDriver(model="tiny", max_workers=2, log=get_log("test"), environ={**os.environ, "FAKE_OUT": str(out)},
                    python=str(fake))
    assert d.reconcile(2, {}) == (2, 0)
    a, b = d.workers
    assert d.reconcile(0, {}) == (0, 2), "both told to go"
    assert all(w.draining and not w.signalled for w in d.workers.values()), "no heartbeat yet: SIGTERM deferred"
    # Wanted again before it was up: the drain is cancelled, no new process.
    assert d.reconcile(1, {}) == (0, 0) and len(d.active()) == 1
    (kept,) = d.active()
    gone = a if kept.worker_id == b else b
    d.reconcile(1, {gone: {"state": "idle"}})
    assert d.workers[gone].signalled, "signalled once its heartbeat says it is up"
    wait_for("the drained one exits 0", lambda: d.poll() and gone not in d.workers, 30)
    assert d.restarts == 0
    assert d.stop_all(30)


def test_a_new_driver_adopts_a_live_worker_of_its_pool_and_drains_it(tmp_path: Path) -> None:
    """A previous scheduler's worker (its own session, alive after that scheduler died) counts as this driver's:
    no second worker beside it, and scaling in drains it with SIGTERM. A heartbeat of another host is left alone."""
    import socket

    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.argv = sys.argv[2:]\nexec({FAKE_WORKER!r})\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    environ = {**os.environ, "FAKE_OUT": str(out)}
    first = LocalDriver(model="tiny", max_workers=2, log=get_log("test"), environ=environ, python=str(fake))
    assert first.reconcile(1, {}) == (1, 0)
    (orphan,) = first.workers.values()
    wait_for("the worker is up", lambda: (out / orphan.worker_id).exists(), 30)
    beats = {orphan.worker_id: {"host": socket.gethostname(), "pid": str(orphan.proc.pid), "state": "idle"},
             "elsewhere-tiny-cpu1-abcdef": {"host": "elsewhere", "pid": str(os.getpid()), "state": "idle"}}
    second = LocalDriver(model="tiny", max_workers=2, log=get_log("test"), environ=environ, python=str(fake))
    assert second.reconcile(1, beats) == (0, 0), "the live worker is adopted, none started beside it"
    assert [w.worker_id for w in second.active()] == [orphan.worker_id]
    assert second.workers[orphan.worker_id].slot.name == orphan.slot.name
    assert second.reconcile(0, beats) == (0, 1)
    assert orphan.proc.wait(30) == 0, "drained with SIGTERM, as its own"
    wait_for("the adopted worker is gone", lambda: (second.poll() or True) and not second.workers, 30)
    assert second.restarts == 0
    assert first.stop_all(10)
