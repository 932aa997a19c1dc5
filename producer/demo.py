"""``sdfleet demo``: the whole fleet on one machine with the tiny model on the CPU.

Starts Redis if none answers, one real worker process, submits the example prompts shipped with
sdfleet, waits with a progress bar and prints where the images are and how fast it went.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from sdfleet.errors import SdfleetError
from sdfleet.redisconn import ensure_redis
from sdfleet.settings import Settings


def run_demo(settings: Settings, *, out: str, size: int, steps: int) -> int:
    from producer.reader import read_file
    from producer.status import wait_for_batch
    from producer.submit import submit
    from sdfleet.queue import make_app
    from sdfleet.redisconn import connect
    from sdfleet.state import JobStore
    from sdfleet.storage import StorageFactory, normalize_out

    url, private = ensure_redis(settings.redis_url)
    if private is not None:
        print(f"no Redis at {settings.redis_url}; started a private redis-server at {url}", file=sys.stderr)
    settings = Settings.from_env(redis_url=url)
    prompts = resources.files("sdfleet") / "examples" / "prompts.txt"
    # The worker logs warnings only, so the progress bar stays readable.
    env = {**os.environ, "REDIS_URL": url, "SDFLEET_LOG_LEVEL": os.environ.get("SDFLEET_LOG_LEVEL", "warning")}
    worker = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "worker", "--model", "tiny", "--device", "cpu",
                               "--max-batch", "4", "--max-wait-ms", "100"], env=env)
    try:
        store = JobStore(connect(url))
        with resources.as_file(prompts) as path:
            result = read_file(path, {"width": size, "height": size, "steps": steps, "model": "tiny"})
        batch = "demo-" + time.strftime("%Y%m%d-%H%M%S")
        t0 = time.perf_counter()
        res = submit([s for _, s in result.jobs], store=store, app=make_app(settings), storage=StorageFactory(),
                     default_out=out, batch_name=batch)
        print(f"submitted {res.enqueued} jobs as batch {batch}; waiting for the worker (first start builds the "
              "tiny model, a few seconds)", file=sys.stderr)
        while True:
            st = wait_for_batch(store, batch, timeout=1.0)
            if st["complete"] or worker.poll() is not None:
                break
            if st["counts"]["running"] or st["counts"]["succeeded"]:
                st = wait_for_batch(store, batch, progress=True, timeout=600)
                break
        if worker.poll() is not None:
            raise SdfleetError(f"the demo worker exited with code {worker.returncode}; see its log above")
        elapsed = time.perf_counter() - t0
        c = st["counts"]
        recs = list(store.iter_batch_jobs(batch))
        starts = [float(r.fields["running_at"]) for r in recs if r.fields.get("running_at")]
        ends = [float(r.fields["succeeded_at"]) for r in recs if r.fields.get("succeeded_at")]
        steady = (max(ends) - min(starts)) if starts and ends else elapsed
        folder = Path(normalize_out(out)[len("file://"):]) / batch
        print(f"\nimages: {folder}  ({c['succeeded']} PNG + JSON sidecars; the tiny model's random weights "
              "draw noise)")
        print(f"throughput: {c['succeeded']} images of {size}x{size}, {steps} steps: {c['succeeded'] / steady:.2f} "
              f"images/s once the worker ran ({steady:.1f} s), {elapsed:.1f} s in all with worker boot; "
              f"{c['failed']} failed (tiny model, CPU)")
        return 0 if c["succeeded"] == st["total"] else 1
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        if private is not None:
            private.stop()
