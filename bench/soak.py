"""Soak: 10,000 jobs through 4 null-engine workers while a random worker is SIGKILLed every few seconds.

    python bench/soak.py [--jobs 10000] [--workers 4] [--kill-every 3] [--out bench/results/soak.json]

Everything is real and local: a private redis-server, `sdfleet worker --model null` processes, the janitor,
the webhook worker and an HTTP receiver on 127.0.0.1 that verifies every webhook with the `standardwebhooks`
package. A killed worker is restarted at once under a new id. The run ends with: submitted, succeeded,
failed, lost (must be 0), duplicated objects (must be 0), webhooks delivered / verified / duplicated.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds queue.py, named like the standard library's queue module: keep this folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import random
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from standardwebhooks import Webhook  # noqa: E402

from producer.submit import submit  # noqa: E402
from sdfleet import broker  # noqa: E402
from sdfleet.jobs import parse_job  # noqa: E402
from sdfleet.queue import make_app  # noqa: E402
from sdfleet.redisconn import PrivateRedis  # noqa: E402
from sdfleet.settings import Settings  # noqa: E402
from sdfleet.state import JobStore  # noqa: E402
from sdfleet.storage import StorageFactory  # noqa: E402
from sdfleet.webhooks.signing import new_secret  # noqa: E402
from tests.webhook_receiver import start_receiver  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--kill-every", type=float, default=3.0, help="seconds between SIGKILLs")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--delay-ms", type=float, default=20.0, help="null engine time per batch")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    ap.add_argument("--janitor", action="store_true",
                    help="also run 'sdfleet janitor' (by default the workers' own sweep reclaims dead workers' jobs)")
    args = ap.parse_args()

    rs = PrivateRedis()
    out_dir = tempfile.mkdtemp(prefix="sdfleet-soak-")
    secret = new_secret()
    receiver = start_receiver()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    env.update({"REDIS_URL": rs.url, "SDFLEET_OUT": f"file://{out_dir}", "SDFLEET_LOG_LEVEL": "warning",
                "SDFLEET_HEARTBEAT_INTERVAL": "0.5", "SDFLEET_HEARTBEAT_TTL": "2", "SDFLEET_SWEEP_INTERVAL_S": "1",
                "SDFLEET_WEBHOOK_SECRET": secret, "SDFLEET_WEBHOOK_ALLOW_PRIVATE": "1",
                "SDFLEET_WEBHOOK_SCHEDULE": "0.5,1,2,4"})
    logs = open(Path(out_dir) / "processes.log", "w")

    def spawn(*cmd: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "sdfleet.cli", *cmd], env=env, cwd=ROOT, stdout=logs,
                                stderr=subprocess.STDOUT)

    def worker() -> subprocess.Popen:
        return spawn("worker", "--model", "null", "--max-batch", str(args.max_batch), "--max-wait-ms", "20",
                     "--null-delay-ms", str(args.delay_ms), "--worker-id", f"soak-{uuid.uuid4().hex[:6]}")

    helpers = [spawn("webhook-worker", "--threads", "8")] + ([spawn("janitor", "--interval", "0.5")] if args.janitor else [])
    workers = [worker() for _ in range(args.workers)]
    r = redis.Redis.from_url(rs.url, decode_responses=True)
    store = JobStore(r)
    settings = Settings.from_env(env)
    specs = [parse_job({"prompt": f"soak {i}", "model": "null", "width": 256, "height": 256, "custom_id": f"s{i}",
                        "webhook": receiver.url("/hook")}) for i in range(args.jobs)]
    t0 = time.monotonic()
    res = submit(specs, store=store, app=make_app(settings), storage=StorageFactory(), default_out=env["SDFLEET_OUT"],
                 batch_name="soak", webhook_secret=None)
    kills = 0
    next_kill = time.monotonic() + args.kill_every
    rng = random.Random(7)
    while time.monotonic() - t0 < args.timeout:
        c = store.counts("soak")
        if c["succeeded"] + c["failed"] >= res.total:
            break
        if time.monotonic() >= next_kill:
            i = rng.randrange(len(workers))
            workers[i].send_signal(signal.SIGKILL)
            workers[i].wait()
            workers[i] = worker()
            kills += 1
            next_kill = time.monotonic() + args.kill_every
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    # Give the last webhooks a moment to arrive.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len({q.headers.get("webhook-id") for q in receiver.got("/hook")}) < res.total + 1:
        time.sleep(0.2)

    counts = store.counts("soak")
    stuck = [rec for rec in store.iter_batch_jobs("soak") if rec.status not in ("succeeded", "failed", "cancelled")]
    for rec in stuck[:5]:  # what a lost job looked like, for the report
        print(json.dumps({"stuck": rec.job_id, "status": rec.status, "attempts": rec.fields.get("attempts"),
                          "worker": rec.fields.get("worker"), "unacknowledged": broker.unacked_count(r),
                          "queued_msgs": r.llen("sdfleet.gen.null"),
                          "held_by": [w for w in r.smembers("sdfleet:workers")
                                      if r.hexists(f"sdfleet:worker:{w}:held", rec.job_id)]}), flush=True)
    entries = list((Path(out_dir) / "soak").iterdir())
    # A worker killed mid-write leaves its hidden temp file (never renamed into place): not an object.
    temp_left = [p for p in entries if p.name.startswith(".tmp-")]
    # Staged objects of runs that lost their job or were killed before promoting (hidden; swept later).
    staged_left = [p for p in entries if p.name.startswith(".run-")]
    temp_left += staged_left
    files = Counter(p.stem for p in entries if p.suffix in (".png", ".json") and p not in temp_left)
    duplicated = sum(1 for n in files.values() if n > 2)  # a stem is png + json; anything else is wrong
    stray = [p.name for p in entries if p.suffix not in (".png", ".json", ".jsonl") and p not in temp_left]
    wh = Webhook(secret)
    verified, bad, ids = 0, 0, Counter()
    per_job: dict[str, set[str]] = {}
    batch_events = 0
    for q in receiver.got("/hook"):
        try:
            payload = wh.verify(q.body, q.headers)
            verified += 1
        except Exception:
            bad += 1
            continue
        ids[q.headers["webhook-id"]] += 1
        if payload["type"].startswith("job."):
            per_job.setdefault(payload["data"]["job_id"], set()).add(q.headers["webhook-id"])
        elif payload["type"] == "batch.completed":
            batch_events += 1
    result = {
        "bench": "soak", "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", "bench/soak.py", *sys.argv[1:]]),
        "jobs_submitted": res.total, "succeeded": counts["succeeded"], "failed": counts["failed"],
        "lost": res.total - counts["succeeded"] - counts["failed"] - counts["cancelled"],
        "duplicated_objects": duplicated + len(stray), "objects": sum(files.values()),
        "jobs_without_both_objects": sum(1 for i in range(res.total) if files.get(f"s{i}", 0) != 2),
        "temp_files_left_by_killed_writes": len(temp_left) - len(staged_left),
        "staged_files_left_by_killed_runs": len(staged_left),
        "janitor_process": args.janitor,
        "workers": args.workers, "kills": kills, "elapsed_s": round(elapsed, 1),
        "jobs_per_s": round(res.total / elapsed, 1),
        "webhooks_received": len(receiver.got("/hook")), "webhooks_verified": verified, "webhooks_bad_signature": bad,
        "jobs_with_terminal_webhook": len(per_job),
        "jobs_with_more_than_one_terminal_webhook_id": sum(1 for v in per_job.values() if len(v) > 1),
        "webhooks_dead_lettered": r.llen("sdfleet:webhooks:dead"),
        "redelivered_same_webhook_id": sum(n - 1 for n in ids.values() if n > 1),
        "batch_completed_events": batch_events,
    }
    for p in workers + helpers:
        p.send_signal(signal.SIGTERM)
    for p in workers + helpers:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    receiver.stop()
    rs.stop()
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
