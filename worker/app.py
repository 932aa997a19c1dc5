"""The worker process: one Celery worker (solo pool) owning one device and one engine.

Boot order: configure logs, pin the device, load the engine and warm it up, then start consuming.
Messages go through :mod:`worker.intake` (batching), :mod:`worker.runner` (engine) and
:mod:`worker.postprocess` (storage, outcome). SIGTERM drains: Celery stops consuming, the batch in
progress finishes, its uploads complete and are acknowledged, unstarted messages go back to the queue.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery import bootsteps

from sdfleet import keys
from sdfleet import logs as logs_mod
from sdfleet.errors import MalformedMessage
from sdfleet.events import Notifier
from sdfleet.jobs import BatchKey, parse_job
from sdfleet.queue import GENERATE_TASK, make_app
from sdfleet.redisconn import connect
from sdfleet.settings import Settings
from sdfleet.state import TERMINAL, JobStore
from sdfleet.storage import StorageFactory
from worker.engine.base import Engine
from worker.intake import AckQueue, Batcher, Delivery, decode
from worker.postprocess import PostProcessor
from worker.runner import BatchRunner

TICK_S = 0.005


@dataclass(frozen=True)
class WorkerOptions:
    model: str = "tiny"
    device: str = "cpu"
    precision: str = "auto"
    max_batch: int = 4
    max_wait_ms: float = 50.0
    worker_id: str = ""
    post_threads: int = 4
    #: shapes to run once at boot (so the first real batch is not the slow one)
    warmup: tuple[BatchKey, ...] = ()
    engine_extra: dict[str, Any] = field(default_factory=dict)
    #: serve this model name's queue (default: the engine's model name)
    queue_model: str | None = None


class WorkerContext:
    """What the Celery strategy and bootstep need: one per process."""

    def __init__(self, settings: Settings, options: WorkerOptions, engine: Engine, log: Any):
        self.settings = settings
        self.options = options
        self.engine = engine
        self.worker_id = options.worker_id
        self.log = log
        self.redis = connect(settings.redis_url)
        self.store = JobStore(self.redis)
        self.acks = AckQueue()
        self.batcher = Batcher(options.max_batch, options.max_wait_ms)
        self.storage = StorageFactory(settings.s3_endpoint_url, settings.s3_region, settings.upload_retries)
        self.notifier = Notifier(settings, self.redis, log)
        self.post = PostProcessor(store=self.store, storage=self.storage, acks=self.acks, worker_id=self.worker_id,
                                  engine_info=engine.describe(), on_finished=self.notifier, log=log,
                                  threads=options.post_threads)
        self.runner = BatchRunner(engine=engine, store=self.store, post=self.post, acks=self.acks,
                                  worker_id=self.worker_id, max_attempts=settings.max_job_crashes, log=log,
                                  on_oom=_empty_cuda_cache)
        self._received: list[str] = []
        self._channels: set[Any] = set()
        self.hub: Any = None  # the consumer's event loop, set by the strategy
        self._tick_soon = False
        self.stopping = False

    # --- called on the event-loop thread ---------------------------------------------------------

    def on_message(self, message: Any, connection_errors: tuple) -> None:
        def ack() -> None:
            message.ack_log_error(_celery_logger(), connection_errors)

        def reject(requeue: bool) -> None:
            message.reject_log_error(_celery_logger(), connection_errors, requeue=requeue)

        try:
            job_id, batch_id, spec = decode(message)
        except MalformedMessage as exc:
            self._malformed(message, exc)
            ack()
            return
        self._received.append(job_id)
        self._channels.add(message.channel)
        # Batches never run from inside a delivery: the transport records a burst of deliveries as
        # unacknowledged only once the whole burst is handed over. A full group runs right after that
        # (call_soon); others when the loop's timer finds them expired.
        self.batcher.add(Delivery(job_id, batch_id, spec, time.monotonic(), ack=ack, reject=reject))
        if (self.hub is not None and not self._tick_soon
                and len(self.batcher.groups.get(spec.key, ())) >= self.options.max_batch):
            self._tick_soon = True
            self.hub.call_soon(self.tick)

    def tick(self, *, force: bool = False) -> None:
        self._tick_soon = False
        if self._received:
            # Track what this worker holds, so the janitor can hand it back if the process dies.
            self.redis.sadd(keys.worker_held(self.worker_id), *self._received)
            self._received.clear()
        for key, group in self.batcher.ready(force=force):
            try:
                self.runner.run(key, group)
            except Exception:
                # Bookkeeping failed (Redis down mid-claim, say): hand the messages back untouched.
                self.log.exception("batch could not run; messages returned to the queue", key=str(key))
                for d in group:
                    self.acks.put(d.reject, True)
            self.acks.drain()
        self.flush_acks()

    def flush_acks(self) -> None:
        from sdfleet.transport import flush_acks

        self.acks.drain()
        for channel in list(self._channels):
            try:
                flush_acks(channel)
            except Exception as exc:  # a dead connection: those messages come back, harmlessly
                self.log.warning("could not flush acknowledgements", error=repr(exc))
                self._channels.discard(channel)

    def drain(self) -> None:
        """Finish what was started: wait for uploads, acknowledge. Unstarted deliveries stay unacked."""
        self.stopping = True
        self.post.wait(timeout=600)
        self.flush_acks()

    def reclaim_own(self) -> None:
        """Hand back what this worker id holds but is not working on (a previous life, a lost connection)."""
        from scheduler.janitor import reclaim_worker

        reclaim_worker(self.redis, self.store, make_app(self.settings), self.worker_id, self.log)

    def _malformed(self, message: Any, exc: MalformedMessage) -> None:
        job_id = None
        try:
            kwargs = message.decode()[1]
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


def _celery_logger():
    from celery.utils.log import get_logger

    return get_logger("sdfleet.worker")


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


_CTX: WorkerContext | None = None


def strategy(task: Any, app: Any, consumer: Any, **_: Any):
    """Celery task strategy: buffer deliveries in the batcher instead of executing them one by one."""
    ctx = _CTX
    assert ctx is not None, "worker context not set"
    errors = consumer.connection_errors
    ctx.hub = getattr(consumer, "hub", None)
    consumer.timer.call_repeatedly(TICK_S, ctx.tick)

    def handler(message, body, ack, reject, callbacks, **kw):
        if ctx.stopping:
            return  # left unacked: goes back to the queue when the channel closes
        ctx.on_message(message, errors)

    return handler


class DrainStep(bootsteps.StartStopStep):
    """On shutdown (SIGTERM) or connection loss: finish uploads and acknowledge before the channel goes.

    After a lost connection (Redis restarted) the consumer starts again: the messages this worker had
    received on the old connection can no longer be acknowledged, so it hands them back itself rather
    than leaving them to the visibility timeout.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.starts = 0

    def start(self, c):
        self.starts += 1
        ctx = _CTX
        if ctx is not None and self.starts > 1:
            ctx.stopping = False
            try:
                ctx.reclaim_own()
            except Exception as exc:
                ctx.log.warning("could not hand back held jobs after reconnecting", error=repr(exc))

    def stop(self, c):
        if _CTX is not None:
            _CTX.drain()
            _CTX.batcher.groups.clear()
            _CTX._received.clear()

    def shutdown(self, c):
        self.stop(c)


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
    global _CTX
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
    queue_model = options.queue_model or engine.model_name
    log.info("engine ready", boot_s=round(time.perf_counter() - t0, 3), queue=keys.queue_for_model(queue_model),
             **engine.describe())

    from sdfleet import transport

    transport.install(batch_acks=True)  # flushed by WorkerContext.flush_acks every loop tick
    # Prefetch: a full batch being filled, one running, one being uploaded.
    app = make_app(settings, prefetch=max(2, options.max_batch * 3))
    _CTX = WorkerContext(settings, options, engine, log)

    @app.task(name=GENERATE_TASK, Strategy=staticmethod(strategy), acks_late=True, reject_on_worker_lost=True)
    def generate(**kwargs):  # pragma: no cover - never executed: the strategy takes every message
        raise RuntimeError("sdfleet.generate is executed by the batching strategy")

    app.steps["consumer"].add(DrainStep)
    _CTX.reclaim_own()  # a previous process with this worker id may have died holding work
    heartbeat = Heartbeat(_CTX, settings.heartbeat_interval, settings.heartbeat_ttl)
    heartbeat.beat()
    heartbeat.start()
    worker = app.Worker(
        hostname=f"sdfleet@{worker_id}", pool="solo", concurrency=1,
        queues=[keys.queue_for_model(queue_model)], without_mingle=True, without_gossip=True,
        without_heartbeat=True, loglevel=settings.log_level.upper(), quiet=True,
    )
    try:
        worker.start()
    finally:
        heartbeat.stop_event.set()
        _CTX.drain()
        _CTX.post.shutdown()
        try:
            # Unstarted messages went back to the queue when the channel closed: nothing is held now.
            _CTX.redis.delete(keys.worker(worker_id), keys.worker_held(worker_id))
            _CTX.redis.srem(keys.WORKERS, worker_id)
        except Exception:
            pass
        log.info("worker stopped", batches=_CTX.runner.batches_run)
    return worker.exitcode or 0
