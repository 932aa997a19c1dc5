"""The worker process: one Celery worker (solo pool) owning one device and one engine.

Boot order: configure logs, pin the device, load the engine and warm it up, then start consuming.
Messages are claimed by :mod:`worker.consumer` and go through :mod:`worker.intake` (batching),
:mod:`worker.runner` (engine) and :mod:`worker.postprocess` (storage, outcome). SIGTERM drains: claiming
stops, the batch in progress finishes, its uploads complete and are acknowledged, unstarted messages go
back to the queue.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sdfleet import keys
from sdfleet import logs as logs_mod
from sdfleet.errors import MalformedMessage
from sdfleet.events import Notifier
from sdfleet.jobs import BatchKey, parse_job
from sdfleet.queue import make_app
from sdfleet.redisconn import connect
from sdfleet.settings import Settings
from sdfleet.state import TERMINAL, JobStore
from sdfleet.storage import StorageFactory
from sdfleet.unacked import BulkQueue
from worker.consumer import GenerationConsumer, GenerationStep
from worker.engine.base import Engine
from worker.intake import AckQueue, Batcher, Delivery, message_body
from worker.postprocess import PostProcessor
from worker.runner import BatchRunner

#: seconds the event loop waits for a Redis reply before treating the connection as lost
LOOP_REPLY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class WorkerOptions:
    model: str = "tiny"
    device: str = "cpu"
    precision: str = "auto"
    max_batch: int = 4
    max_wait_ms: float = 50.0
    worker_id: str = ""
    #: engine runs post-processed at once (each stored by the storing process, then recorded)
    post_threads: int = 2
    #: shapes to run once at boot (so the first real batch is not the slow one)
    warmup: tuple[BatchKey, ...] = ()
    engine_extra: dict[str, Any] = field(default_factory=dict)
    #: serve this model name's queue (default: the engine's model name)
    queue_model: str | None = None


class WorkerContext:
    """What the consumer, the runner and post-processing share: one per process."""

    def __init__(self, settings: Settings, options: WorkerOptions, engine: Engine, log: Any):
        self.settings = settings
        self.options = options
        self.engine = engine
        self.worker_id = options.worker_id
        self.log = log
        self.redis = connect(settings.redis_url)
        # The event loop's own connection (claims and job starts, several round trips per batch): the claim and start scripts must not be re-sent after a lost reply (they
        # would claim or count twice); a connection error restarts the consumer instead, which hands back
        # whatever this worker holds. The timeout turns a half-open connection into such an error.
        self.loop_redis = connect(settings.redis_url, single_connection=True, retries=False,
                                  socket_timeout=LOOP_REPLY_TIMEOUT_S)
        self.store = JobStore(self.redis)
        self.acks = AckQueue()
        self.batcher = Batcher(options.max_batch, options.max_wait_ms)
        self.storage = StorageFactory(settings.s3_endpoint_url, settings.s3_region, settings.upload_retries)
        self.notifier = Notifier(settings, self.redis, log)
        self.post = PostProcessor(store=self.store, storage=self.storage, acks=self.acks, worker_id=self.worker_id,
                                  engine_info=engine.describe(), on_finished=self.notifier, log=log,
                                  threads=options.post_threads)
        self.runner = BatchRunner(engine=engine, store=JobStore(self.loop_redis), post=self.post, acks=self.acks,
                                  worker_id=self.worker_id, max_attempts=settings.max_job_crashes, log=log,
                                  on_oom=_empty_cuda_cache)

    def reclaim_own(self) -> None:
        """Hand back what this worker id holds but is not working on (a previous life, a lost connection)."""
        from scheduler.janitor import reclaim_worker

        reclaim_worker(self.redis, self.store, make_app(self.settings), self.worker_id, self.log)

    def malformed(self, payload: Any, exc: MalformedMessage) -> None:
        """A claimed message that is not a valid job: fail the job it names, if any; never raise."""
        job_id = None
        try:
            kwargs = message_body(payload)[1]
            job_id = kwargs.get("job_id") if isinstance(kwargs, dict) else None
        except Exception:
            pass
        log = self.log.bind(job_id=job_id if isinstance(job_id, str) else None)
        rec = self.store.job(job_id) if isinstance(job_id, str) and len(job_id) <= 64 else None
        if rec is not None and rec.status not in TERMINAL:
            tr = self.store.fail(job_id, f"malformed message: {exc}")
            log.error("malformed message; job failed", error=str(exc))
            if tr.applied:
                # The stored spec was validated at submit time; the notifier reads its webhook fields.
                delivery = Delivery(job_id, rec.batch_id, parse_job(rec.spec), time.monotonic(),
                                    ack=lambda: None, reject=lambda requeue: None)
                self.notifier(delivery, "failed", tr)
        else:
            log.error("malformed message dropped", error=str(exc))


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


class Heartbeat(threading.Thread):
    def __init__(self, ctx: WorkerContext, interval: float, ttl: float):
        super().__init__(name="heartbeat", daemon=True)
        self.ctx, self.interval, self.ttl = ctx, interval, ttl
        self.stop_event = threading.Event()

    def beat(self) -> None:
        ctx = self.ctx
        info = {"worker_id": ctx.worker_id, "pid": os.getpid(), "host": socket.gethostname(),
                "last_beat": f"{time.time():.3f}", "batches": ctx.runner.batches_run,
                "buffered": len(ctx.batcher), **{k: str(v) for k, v in ctx.engine.describe().items()},
                **gpu_memory(ctx.options.device)}
        pipe = ctx.redis.pipeline(transaction=False)
        pipe.hset(keys.worker(ctx.worker_id), mapping=info)
        pipe.pexpire(keys.worker(ctx.worker_id), int(self.ttl * 1000))
        pipe.sadd(keys.WORKERS, ctx.worker_id)
        pipe.execute()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # Redis restarting: keep beating once it is back
                self.ctx.log.warning("heartbeat failed", error=repr(exc))


def gpu_memory(device: str) -> dict[str, str]:
    if not device.startswith("cuda"):
        return {}
    try:
        import pynvml

        pynvml.nvmlInit()
        index = int(device.split(":")[1]) if ":" in device else 0
        mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return {"gpu_mem_used_mib": str(mem.used // 2**20), "gpu_mem_total_mib": str(mem.total // 2**20)}
    except Exception:
        return {}


def run_worker(settings: Settings, options: WorkerOptions) -> int:
    """Boot and run a worker until it is told to stop; returns the process exit code."""
    import sys

    from worker.engine.registry import build_engine

    # The event-loop thread does many short socket calls; with the default 5 ms switch interval each one
    # can wait that long for the GIL behind a post-processing thread (a convoy). 0.5 ms keeps it moving.
    sys.setswitchinterval(0.0005)

    if options.device.startswith("cuda"):
        # One process, one GPU: pin it before any CUDA context exists.
        index = options.device.split(":")[1] if ":" in options.device else "0"
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", index)
        options = WorkerOptions(**{**options.__dict__, "device": "cuda:0"})
    worker_id = options.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    options = WorkerOptions(**{**options.__dict__, "worker_id": worker_id})
    log = logs_mod.get("worker", worker_id=worker_id, device=options.device)
    t0 = time.perf_counter()
    engine = build_engine(options.model, device=options.device, precision=options.precision, log=log,
                          **options.engine_extra)
    engine.load()
    if options.warmup:
        engine.warmup(options.warmup)
    queue = keys.queue_for_model(options.queue_model or engine.model_name)
    log.info("engine ready", boot_s=round(time.perf_counter() - t0, 3), queue=queue, **engine.describe())

    app = make_app(settings)
    ctx = WorkerContext(settings, options, engine, log)
    # Prefetch: a full batch being filled, one running, one being uploaded.
    consumer = GenerationConsumer(ctx, BulkQueue(ctx.loop_redis, queue, keys.worker_held(worker_id)),
                                  prefetch=max(2, options.max_batch * 3))
    app.steps["consumer"].add(GenerationStep)
    ctx.reclaim_own()  # a previous process with this worker id may have died holding work
    heartbeat = Heartbeat(ctx, settings.heartbeat_interval, settings.heartbeat_ttl)
    heartbeat.beat()
    heartbeat.start()
    worker = app.Worker(
        hostname=f"sdfleet@{worker_id}", pool="solo", concurrency=1,
        # Celery itself consumes no queue here (selected, then excluded): GenerationStep claims this one.
        queues=[queue], exclude_queues=[queue], generation_consumer=consumer,
        without_mingle=True, without_gossip=True, without_heartbeat=True,
        loglevel=settings.log_level.upper(), quiet=True,
    )
    try:
        worker.start()
    finally:
        # Drain first (normally Celery's shutdown has done it already): the heartbeat must go on until the
        # uploads are done, or the janitor would hand back jobs this worker is still finishing.
        consumer.stop()
        heartbeat.stop_event.set()
        ctx.post.shutdown()
        try:
            # Unstarted messages went back to the queue when the consumer stopped: nothing is held now.
            ctx.redis.delete(keys.worker(worker_id), keys.worker_held(worker_id))
            ctx.redis.srem(keys.WORKERS, worker_id)
        except Exception:
            pass
        log.info("worker stopped", batches=ctx.runner.batches_run)
    return worker.exitcode or 0
