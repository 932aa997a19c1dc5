"""Queue throughput and latency with the null engine (no model), next to plain Celery tasks.

    python bench/throughput.py [--jobs 4000] [--out bench/results/queue-cpu.json]

Runs on a private redis-server (never touches your Redis). For batch 1 and 8 with one worker, and batch 8 with two worker processes, it measures:
  - submit: seconds to validate + record + enqueue N jobs (the `sdfleet submit` path),
  - drain: N jobs pre-queued, one `sdfleet worker --model null` started; jobs/s from its first start to
    its last stored result (the worker side alone),
  - live: N jobs submitted while the worker runs; jobs/s from the first enqueue to the last done, and
    p50/p99 of enqueue-to-start latency (queued_at -> running_at, from the job records);
  - idle: one job at a time to an idle worker (every 100 ms): p50/p99 of enqueue-to-start.
Baseline: a plain Celery no-op task (acks_late, solo pool) on the same Redis in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producer.submit import submit  # noqa: E402
from sdfleet.jobs import parse_job  # noqa: E402
from sdfleet.queue import make_app  # noqa: E402
from sdfleet.redisconn import PrivateRedis  # noqa: E402
from sdfleet.settings import Settings  # noqa: E402
from sdfleet.state import JobStore  # noqa: E402
from sdfleet.storage import StorageFactory  # noqa: E402


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def start_worker(url: str, batch: int, out: str, name: str = "") -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": url, "SDFLEET_LOG_LEVEL": "warning", "SDFLEET_OUT": out}
    env = {k: v for k, v in env.items() if not k.startswith("SDFLEET_") or k in (
        "SDFLEET_LOG_LEVEL", "SDFLEET_OUT")}
    worker_id = f"bench-{batch}{name}"
    proc = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "worker", "--model", "null", "--max-batch",
                             str(batch), "--max-wait-ms", "5", "--worker-id", worker_id], env=env, cwd=ROOT)
    r = redis.Redis.from_url(url)
    while not r.exists(f"sdfleet:worker:{worker_id}"):
        time.sleep(0.05)
    time.sleep(0.5)
    return proc


def wait_done(store: JobStore, batch: str, total: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = store.counts(batch)
        if c["succeeded"] + c["failed"] >= total:
            # A rate of failed jobs would be no rate at all.
            if c["failed"]:
                raise RuntimeError(f"batch {batch}: {c['failed']} of {total} jobs failed; the rate would mean nothing")
            return
        time.sleep(0.05)
    raise TimeoutError(f"batch {batch} did not finish: {store.counts(batch)}")


def job_times(store: JobStore, batch: str) -> tuple[list[float], list[float], list[float]]:
    q, s, e = [], [], []
    for rec in store.iter_batch_jobs(batch):
        q.append(float(rec.fields["queued_at"]))
        s.append(float(rec.fields["running_at"]))
        e.append(float(rec.fields.get("succeeded_at") or rec.fields.get("failed_at")))
    return q, s, e


def run_sdfleet(url: str, n: int, batch: int, out: str, workers: int = 1) -> dict:
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    settings = Settings(redis_url=url)
    store, app = JobStore(r), make_app(settings)
    specs = [parse_job({"prompt": f"prompt {i}", "model": "null", "width": 512, "height": 512, "steps": 4})
             for i in range(n)]
    # Drain: queue first, then the worker.
    t0 = time.perf_counter()
    submit(specs, store=store, app=app, storage=StorageFactory(), default_out=out, batch_name=f"drain{batch}")
    submit_s = time.perf_counter() - t0
    procs = [start_worker(url, batch, out, f"-{i}") for i in range(workers)]
    try:
        wait_done(store, f"drain{batch}", n)
        _, s, e = job_times(store, f"drain{batch}")
        drain = n / (max(e) - min(s))
        # Live: the worker is running while jobs arrive.
        t1 = time.time()
        submit(specs, store=store, app=app, storage=StorageFactory(), default_out=out, batch_name=f"live{batch}")
        wait_done(store, f"live{batch}", n)
        q, s, e = job_times(store, f"live{batch}")
        lat = [b - a for a, b in zip(q, s)]
        # Idle: one job at a time, the worker waiting for it.
        idle = []
        for i in range(40):
            one = [parse_job({"prompt": f"idle {i}", "model": "null", "width": 512, "height": 512, "steps": 4})]
            submit(one, store=store, app=app, storage=StorageFactory(), default_out=out, batch_name=f"idle{batch}-{i}")
            wait_done(store, f"idle{batch}-{i}", 1)
            iq, is_, _ = job_times(store, f"idle{batch}-{i}")
            idle.append(is_[0] - iq[0])
            time.sleep(0.1)
        return {"batch": batch, "workers": workers, "jobs": n, "submit_s": round(submit_s, 3), "submit_jobs_per_s": round(n / submit_s),
                "drain_jobs_per_s": round(drain, 1), "live_jobs_per_s": round(n / (max(e) - t1), 1),
                "enqueue_to_start_p50_ms": round(pct(lat, 0.5) * 1000, 2),
                "enqueue_to_start_p99_ms": round(pct(lat, 0.99) * 1000, 2),
                "idle_enqueue_to_start_p50_ms": round(pct(idle, 0.5) * 1000, 2),
                "idle_enqueue_to_start_p99_ms": round(pct(idle, 0.99) * 1000, 2)}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def run_celery(url: str, n: int, prefetch: int) -> dict:
    r = redis.Redis.from_url(url)
    r.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    env.update({"REDIS_URL": url, "PREFETCH": str(prefetch), "PYTHONPATH": str(ROOT)})
    os.environ["REDIS_URL"] = url
    import importlib

    base = importlib.import_module("bench.celery_baseline")
    base.app.conf.broker_url = url
    base.app.conf.worker_prefetch_multiplier = prefetch
    t0 = time.perf_counter()
    with base.app.producer_or_acquire() as producer, producer.batch(max_size=2000):
        for _ in range(n):
            base.noop.apply_async((time.time(),), producer=producer)
    submit_s = time.perf_counter() - t0
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.celery_baseline", "worker", "-P", "solo",
                             "--loglevel", "WARNING", "--without-mingle", "--without-gossip", "--without-heartbeat"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t1 = None
        while r.llen("baseline:lat") < n:
            if t1 is None and r.llen("baseline:lat") > 0:
                t1 = time.perf_counter()
            time.sleep(0.01)
        drain = n / (time.perf_counter() - (t1 or t0))
        r.delete("baseline:lat")
        t2 = time.time()
        with base.app.producer_or_acquire() as producer, producer.batch(max_size=2000):
            for _ in range(n):
                base.noop.apply_async((time.time(),), producer=producer)
        while r.llen("baseline:lat") < n:
            time.sleep(0.01)
        live = n / (time.time() - t2)
        lat = [float(x) for x in r.lrange("baseline:lat", 0, -1)]
        return {"prefetch": prefetch, "jobs": n, "submit_s": round(submit_s, 3), "drain_jobs_per_s": round(drain, 1),
                "live_jobs_per_s": round(live, 1), "enqueue_to_start_p50_ms": round(pct(lat, 0.5) * 1000, 2),
                "enqueue_to_start_p99_ms": round(pct(lat, 0.99) * 1000, 2)}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput-cpu.json"))
    args = ap.parse_args()
    redis_server = PrivateRedis()
    out_dir = tempfile.mkdtemp(prefix="sdfleet-bench-")
    results = {"bench": "throughput", "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
               f"{os.cpu_count()} cores", "python": platform.python_version(),
               "command": f"python bench/throughput.py --jobs {args.jobs}", "sdfleet": [], "celery_plain": []}
    try:
        for b, workers in ((1, 1), (8, 1), (8, 2)):
            res = run_sdfleet(redis_server.url, args.jobs, b, f"file://{out_dir}", workers)
            print(json.dumps({"sdfleet": res}), flush=True)
            results["sdfleet"].append(res)
        for pf in (1, 8):
            res = run_celery(redis_server.url, args.jobs, pf)
            print(json.dumps({"celery_plain": res}), flush=True)
            results["celery_plain"].append(res)
    finally:
        redis_server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
