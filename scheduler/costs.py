"""``sdfleet simulate --measure N``: what one job costs the shared services, measured with real processes.

A private redis-server (so no other client's commands are counted) serves one run of N jobs through the
real path: ``sdfleet submit`` (with a webhook), one null-engine ``sdfleet worker`` (the queue, not the GPU),
one ``sdfleet webhook-worker`` delivering to a local receiver, then a housekeeping pass and a janitor
sweep. Per phase: Redis commands (``INFO commandstats``), their server time, keys and memory left per job,
and the wall time of the sweeps. docs/SCALING.md extrapolates these to a million jobs a day.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

# Heartbeats, the sweep and idle polling cost Redis commands per second, not per job: a phase's count
# includes them for the seconds it ran, which a fast null engine keeps short.


def _commandstats(r: redis.Redis) -> dict[str, tuple[int, float]]:
    out = {}
    for name, v in r.info("commandstats").items():
        out[name.removeprefix("cmdstat_")] = (int(v["calls"]), float(v["usec"]))
    return out


class _Receiver:
    def __init__(self) -> None:
        self.count = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    outer.count += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"


def measure(jobs: int, *, max_batch: int = 8, log: Any = print) -> dict[str, Any]:
    from sdfleet.redisconn import PrivateRedis
    from sdfleet.webhooks import new_secret

    server = PrivateRedis()
    r = redis.Redis.from_url(server.url, decode_responses=True)
    recv = _Receiver()
    work = Path(tempfile.mkdtemp(prefix="sdfleet-costs-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_") and k != "REDIS_URL"}
    env.update({"REDIS_URL": server.url, "SDFLEET_OUT": f"file://{work / 'out'}", "SDFLEET_LOG_FORMAT": "json",
                "SDFLEET_LOG_LEVEL": "warning", "SDFLEET_WEBHOOK_SECRET": new_secret(),
                "SDFLEET_WEBHOOK_ALLOW_PRIVATE": "1"})
    cli = [sys.executable, "-m", "sdfleet.cli"]
    f = work / "jobs.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}", "custom_id": f"c{i}", "model": "null", "width": 256,
                                     "height": 256, "steps": 1}) + "\n" for i in range(jobs)))
    phases: dict[str, dict[str, Any]] = {}

    def phase(name: str, fn: Any) -> None:
        r.config_resetstat()
        mem0, keys0 = r.info("memory")["used_memory"], r.dbsize()
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        stats = _commandstats(r)
        calls = sum(c for c, _ in stats.values())
        usec = sum(u for _, u in stats.values())
        top = sorted(stats.items(), key=lambda kv: -kv[1][0])[:8]
        phases[name] = {"wall_s": round(wall, 3), "commands": calls, "commands_per_job": round(calls / jobs, 2),
                        "server_us_per_job": round(usec / jobs, 1),
                        "keys_added_per_job": round((r.dbsize() - keys0) / jobs, 2),
                        "bytes_added_per_job": round((r.info("memory")["used_memory"] - mem0) / jobs),
                        "top": {k: c for k, (c, _) in top}}
        log(f"{name}: {phases[name]}")

    def submit() -> None:
        subprocess.run([*cli, "submit", str(f), "--batch", "cost", "--webhook", recv.url], env=env, check=True,
                       capture_output=True)

    def work_off() -> None:
        w = subprocess.Popen([*cli, "worker", "--model", "null", "--max-batch", str(max_batch), "--worker-id", "cost-w"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while r.hget("sdfleet:batch:cost", "completed_at") is None:
                if w.poll() is not None:
                    raise RuntimeError(f"the worker exited with {w.returncode}")
                time.sleep(0.05)
        finally:
            w.send_signal(signal.SIGTERM)
            w.wait(120)

    def deliver() -> None:
        ww = subprocess.Popen([*cli, "webhook-worker", "--threads", "8"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            while recv.count < jobs + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            ww.send_signal(signal.SIGTERM)
            ww.wait(120)

    def housekeeping() -> None:
        from scheduler.housekeeping import housekeep
        from sdfleet.logs import get as get_log
        from sdfleet.settings import Settings
        from sdfleet.state import JobStore
        from sdfleet.storage import StorageFactory

        settings = Settings.from_env(env)
        housekeep(r, JobStore(r), StorageFactory(None, "us-east-1", 0), settings, get_log("costs"), force=True)

    def janitor() -> None:
        subprocess.run([*cli, "janitor", "--once"], env=env, check=True, capture_output=True)

    try:
        for name, fn in (("submit", submit), ("worker", work_off), ("webhooks", deliver),
                         ("housekeeping", housekeeping), ("janitor_sweep", janitor)):
            phase(name, fn)
        phases["total"] = {"commands_per_job": round(sum(p["commands_per_job"] for p in phases.values()), 2),
                           "server_us_per_job": round(sum(p["server_us_per_job"] for p in phases.values()), 1),
                           "keys_per_job_at_rest": round(r.dbsize() / jobs, 2),
                           "bytes_per_job_at_rest": round(r.info("memory")["used_memory"] / jobs),
                           "webhooks_delivered": recv.count}
        return {"jobs": jobs, "max_batch": max_batch, "phases": phases}
    finally:
        recv.httpd.shutdown()
        server.stop()
