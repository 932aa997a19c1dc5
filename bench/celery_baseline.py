"""A plain Celery task on the same Redis, for bench/throughput.py's baseline: record start time, nothing else."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

URL = os.environ["REDIS_URL"]
app = Celery("baseline", broker=URL)
app.conf.update(task_acks_late=True, task_ignore_result=True, worker_prefetch_multiplier=int(os.environ.get("PREFETCH", "4")),
                worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
_r = redis.Redis.from_url(URL)


@app.task(name="baseline.noop")
def noop(enqueued_at: float) -> None:
    _r.rpush("baseline:lat", time.time() - enqueued_at)
