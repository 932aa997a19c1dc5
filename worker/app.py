"""The worker process: one Celery worker (solo pool) owning one device and one engine.

Boot order: configure logs, claim the GPU (its lock, its NVML identity), load the engine and warm it up, then
start consuming. Messages arrive through the task Strategy of :mod:`worker.consumer` and go through
:mod:`worker.intake` (batching), the engine thread (:mod:`worker.engine_thread`, :mod:`worker.runner`) and
:mod:`worker.postprocess` (storage, outcome). Beside them: the heartbeat (with the worker's state, for
``sdfleet workers`` and the scheduler), the reclaim sweep (one worker at a time), metrics, the stall watchdog.
SIGTERM drains (see :mod:`worker.consumer`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from sdfleet import keys
from sdfleet import logs as logs_mod
from sdfleet.errors import MalformedMessage
from sdfleet.events import Notifier
from sdfleet.jobs import BatchKey, model_name_for, parse_job
from sdfleet.queue import GENERATE_TASK, make_app
from sdfleet.redisconn import connect
from sdfleet.settings import Settings
from sdfleet.state import TERMINAL, JobStore
from sdfleet.storage import StorageFactory
from worker.consumer import GenerationConsumer, GenerationStep
from worker.engine.base import Engine
from worker.engine_thread import EngineThread, ServiceTimes
from worker.intake import Batcher, Delivery, LoopCalls
from worker.postprocess import PostProcessor
from worker.runner import BatchRunner

#: exit code of a worker whose engine call hung (its supervisor restarts it)
EXIT_STALLED = 3


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
    #: serve this model name's queue (default: derived from --model)
    queue_model: str | None = None
    metrics_port: int | None = None
    #: append one JSON line per engine run (its timeline) to this file
    timeline: str | None = None
    #: overlap the next batch with this one's device-to-host copy and storing (off: one thing at a time, to
    #: measure what the overlap is worth)
    overlap: bool = True


class Settler:
    """What the engine and post-processing threads tell the loop: carried out on the loop thread."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self._published: dict[str, float] = {}  # bucket -> seconds per image last written for the scheduler

    def _put(self, fn: Any, *args: Any) -> None:
        self.ctx.loop.put(fn, *args)

    def wake(self) -> None:
        self._put(lambda: None)

    def started(self, deliveries: list[Delivery]) -> None:
        self._put(self.ctx.consumer.on_started, deliveries)

    def finished(self, d: Delivery, status: str, **info: Any) -> None:
        if self.ctx.metrics is not None and status in ("succeeded", "failed", "cancelled"):
            self.ctx.metrics.job_finished(status)
        self._put(self.ctx.consumer.on_finished, d, status, info)

    def handback(self, deliveries: list[Delivery]) -> None:
        if self.ctx.metrics is not None:
            for _ in deliveries:
                self.ctx.metrics.job_finished("requeued")
        self._put(self.ctx.consumer.on_handback, deliveries)

    def retry_later(self, deliveries: list[Delivery], exc: BaseException) -> None:
        self._put(self.ctx.consumer.on_retry_later, deliveries, exc)

    def defer(self, d: Delivery) -> None:
        self._put(self.ctx.consumer.on_defer, d)

    def engine_time(self, key: BatchKey, images: int, seconds: float) -> None:
        per = self.ctx.service.observe(key, images, seconds)
        bucket = keys.bucket_of(key.width, key.height, key.steps)
        last = self._published.get(bucket)
        if last is None or abs(per - last) > 0.05 * last:  # the scheduler needs the trend, not every run
            try:
                self.ctx.redis.hset(keys.service_times(self.ctx.served_model), bucket, f"{per:.4f}")
                self._published[bucket] = per
            except redis.RedisError:
                pass
        if self.ctx.metrics is not None:
            self.ctx.metrics.batch_ran(images, seconds, key.steps, images)

    def timeline(self, run: dict[str, Any]) -> None:
        path = self.ctx.options.timeline
        if path:
            with self.ctx.timeline_lock, open(path, "a") as f:
                f.write(json.dumps(run) + "\n")


class WorkerContext:
    """What the consumer, the engine thread and post-processing share: one per process."""

    def __init__(self, settings: Settings, options: WorkerOptions, engine: Engine, log: Any, *,
                 served_model: str, queue: str, gpu: Any = None, metrics: Any = None):
        self.settings = settings
        self.options = options
        self.engine = engine
        self.worker_id = options.worker_id
        self.log = log
        self.served_model = served_model
        self.queue = queue
        self.gpu = gpu
        self.metrics = metrics
        self.state = "booting"
        self.redis = connect(settings.redis_url)
        self.store = JobStore(self.redis)
        self.loop = LoopCalls()
        self.batcher = Batcher(options.max_batch, options.max_wait_ms)
        self.service = ServiceTimes()
        self.timeline_lock = threading.Lock()
        self.settler = Settler(self)
        self.notifier = Notifier(settings, self.redis, log)
        storage = StorageFactory(settings.s3_endpoint_url, settings.s3_region, settings.upload_retries)
        self.post = PostProcessor(store=self.store, storage=storage, settle=self.settler, worker_id=self.worker_id,
                                  engine_info=engine.describe(), notifier=self.notifier, log=log,
                                  threads=options.post_threads, permanent_tries=settings.storage_permanent_tries,
                                  retry_cap_s=settings.storage_retry_cap_s)
        self.runner = BatchRunner(engine=engine, store=self.store, post=self.post, settle=self.settler,
                                  worker_id=self.worker_id, max_attempts=settings.max_job_crashes, log=log,
                                  on_oom=_empty_cuda_cache)
        self.engine_thread = EngineThread(self.runner.run, self.settler.wake, self.service, log)
        self.consumer = GenerationConsumer(self)

    def malformed(self, job_id: str | None, batch_id: str | None, exc: MalformedMessage) -> None:
        """A message that is not a valid job: fail the job it names, only if the record says that job belongs
        to the batch the message names (a forged message may fail only a job of its own batch)."""
        log = self.log.bind(job_id=job_id, batch_id=batch_id)
        rec = self.store.job(job_id) if job_id else None
        if rec is not None and rec.status not in TERMINAL and batch_id and rec.batch_id == batch_id:
            tr = self.store.fail(job_id, f"malformed message: {exc}")
            log.error("malformed message; job failed", error=str(exc))
            if tr.applied:
                # The stored spec was validated at submit time; the notifier reads its webhook fields.
                self.notifier(Delivery(job_id, rec.batch_id, parse_job(rec.spec), time.monotonic()), "failed", tr)
        else:
            log.error("malformed message dropped", error=str(exc))

    def check_engine(self) -> None:
        """The watchdog (on the loop's tick): a batch far past its expected time means a hung engine call."""
        overdue = self.engine_thread.overdue(self.settings.stall_multiple, self.settings.stall_floor_s)
        if overdue is None:
            return
        self.state = "stalled"
        self.heartbeat.beat()
        waited = time.monotonic() - overdue.started
        self.log.error("engine call hung; handing its batch back and exiting", waited_s=round(waited, 1),
                       expected_s=overdue.expected_s, jobs=[d.job_id for d in overdue.deliveries])
        for d in overdue.deliveries:
            try:
                # The attempt stays counted: a job that hangs the engine every time ends as poison.
                self.store.requeue(d.job_id, run=d.extra.get("run", ""))
            except redis.RedisError:
                pass
        # Its messages stay unacknowledged and in its held hash: once its heartbeat (marked stalled above)
        # expires, the sweep restores them from another process. Restored from here, the first one would go
        # straight to this process's own blocked BRPOP (its prefetch has room) and be lost when it exits.
        try:
            self.consumer.flush_intake()  # its held notes, and the task events of jobs that did finish
            self.consumer.publish_events()
        except Exception:
            pass
        logs_mod.get().info("worker exiting", exit_code=EXIT_STALLED)
        os._exit(EXIT_STALLED)

    def reclaimed_meanwhile(self) -> None:
        """A sweep took this worker for dead (it stalled, or Redis was away longer than the heartbeat TTL) and
        handed its jobs back. It goes on: what it still finishes for those jobs is refused by the run checks
        (its staged objects are dropped, the other run's are kept), so nothing it writes can overwrite a
        finished job; at worst some work is done twice."""
        self.log.warning("this worker was taken for dead meanwhile and its jobs handed back; its late results "
                         "for them will be refused")
        self.redis.delete(keys.worker_reclaimed(self.worker_id))


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


class Heartbeat(threading.Thread):
    """The worker's heartbeat hash (with a TTL) and liveness file."""

    def __init__(self, ctx: WorkerContext, interval: float, ttl: float):
        super().__init__(name="heartbeat", daemon=True)
        self.ctx, self.interval, self.ttl = ctx, interval, ttl
        self.stop_event = threading.Event()
        self.beats = 0
        self.r = connect(ctx.settings.redis_url)
        # Redis away or refusing writes: one line per interval with a count, not one per beat.
        self._errors = logs_mod.Throttled(ctx.log, 10.0)

    def info(self) -> dict[str, str]:
        ctx = self.ctx
        running = ctx.engine_thread.running
        gpu = {k: str(v) for k, v in ctx.gpu.sample().items()} if ctx.gpu is not None else {}
        return {
            "worker_id": ctx.worker_id, "pid": str(os.getpid()), "host": socket.gethostname(),
            "hostname": f"sdfleet@{ctx.worker_id}", "model": ctx.served_model, "queue": ctx.queue,
            "device": ctx.options.device, "state": ctx.state,
            "current_run": running.deliveries[0].extra.get("run", "") if running and running.deliveries else "",
            "current_batch_size": str(len(running.deliveries)) if running else "0",
            "images_per_s": f"{ctx.engine_thread.images_per_s():.4f}", "last_beat": f"{time.time():.3f}",
            "max_batch": str(ctx.options.max_batch), "buffered": str(len(ctx.batcher)),
            "batches": str(ctx.runner.batches_run),
            **{k: str(v) for k, v in ctx.engine.describe().items() if k not in ("device", "model")},
            "engine_model": str(ctx.engine.describe().get("model", "")),
            **getattr(ctx, "gpu_identity", {}), **gpu,
        }

    def beat(self) -> None:
        ctx = self.ctx
        if ctx.state not in ("stalled", "draining", "booting"):
            ctx.state = "busy" if ctx.engine_thread.running else "idle"
        if ctx.settings.health_file:
            # Written first, whatever Redis does: a supervisor should restart a stalled worker, not every
            # worker while Redis restarts.
            tmp = ctx.settings.health_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"state": ctx.state, "last_beat": time.time(), "worker_id": ctx.worker_id}, f)
            os.replace(tmp, ctx.settings.health_file)
        info = self.info()
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(keys.worker_reclaimed(ctx.worker_id))
        pipe.hset(keys.worker(ctx.worker_id), mapping=info)
        pipe.pexpire(keys.worker(ctx.worker_id), int(self.ttl * 1000))
        pipe.sadd(keys.WORKERS, ctx.worker_id)
        if pipe.execute()[0]:  # a sweep took this worker for dead and handed its jobs back
            ctx.reclaimed_meanwhile()
        self.beats += 1
        if ctx.metrics is not None:
            ctx.metrics.set_state(ctx.state)
            ctx.metrics.set_queue_depth(len(ctx.batcher))

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # Redis restarting: keep beating once it is back
                self._errors.warning("heartbeat failed", error=repr(exc))


class SweepThread(threading.Thread):
    """This worker's turn at the fleet's reclaim sweep (under a Redis lock, so one worker sweeps at a time)."""

    def __init__(self, ctx: WorkerContext, app: Any):
        super().__init__(name="sweep", daemon=True)
        from scheduler.janitor import housekeeping_for
        from sdfleet.reclaim import Sweeper

        s = ctx.settings
        r = connect(s.redis_url)
        self.ctx = ctx
        self.stop_event = threading.Event()
        self._errors = logs_mod.Throttled(ctx.log, 10.0)
        self.sweeper = Sweeper(r, app, s, ctx.log, holder=ctx.worker_id, grace_s=2 * s.heartbeat_ttl + 1,
                               lock_ttl_s=max(30.0, 3 * s.sweep_interval_s),
                               housekeeping=housekeeping_for(s, r, ctx.log))

    def run(self) -> None:
        while not self.stop_event.wait(self.ctx.settings.sweep_interval_s):
            try:
                self.sweeper.run_once()
            except Exception as exc:  # Redis away: the next round tries again
                self._errors.warning("reclaim sweep failed", error=repr(exc))


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The engine's image batch buckets for a worker running at most ``max_batch`` images: powers of two
    below it, and itself (a batch is padded up to the next bucket)."""
    return tuple(sorted({b for b in (1, 2, 4, 8, 16, 32) if b < max_batch} | {max_batch}))


def run_worker(settings: Settings, options: WorkerOptions) -> int:
    """Boot and run a worker until it is told to stop; returns the process exit code."""
    from celery import signals

    from worker.devices import GpuProbe, lock_gpu, resolve_device
    from worker.engine.registry import build_engine

    # Before any CUDA context exists: this process sees exactly the GPU it owns (N indexes an inherited
    # CUDA_VISIBLE_DEVICES list), and a lock per GPU keeps a second worker off it.
    assignment = resolve_device(options.device, os.environ)
    gpu_lock = lock_gpu(assignment.uuid, settings.gpu_lock_dir, device=options.device) if assignment.is_gpu else None
    os.environ["CUDA_VISIBLE_DEVICES"] = assignment.cuda_visible_devices
    options = replace(options, device=assignment.torch_device)
    worker_id = options.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    options = replace(options, worker_id=worker_id)
    logs_mod.bind_process(worker_id=worker_id, device=assignment.spec)
    log = logs_mod.get("worker")
    # Celery must not configure logging: ours (structlog, JSON off a terminal) already covers its loggers.
    signals.setup_logging.connect(lambda **kw: None, weak=False)

    served = options.queue_model or model_name_for(options.model)
    queue = keys.queue_for_model(served)
    t0 = time.perf_counter()
    # CUDA-graph buckets up to the batch this worker can run, no larger: a graph pool is as large as its
    # largest bucket's step (SD3.5 Large: 1.9 GiB for 4 images, 3.8 for 8)
    extra = {"batch_buckets": batch_buckets(options.max_batch), **options.engine_extra}
    engine = build_engine(options.model, device=options.device, precision=options.precision, log=log, **extra)
    engine.load()
    if options.warmup:
        # On a GPU also at the full batch size, so the first full batch allocates nothing new mid-stream.
        sizes = sorted({1, options.max_batch}) if options.device.startswith("cuda") else [1]
        engine.warmup(options.warmup, batch_sizes=sizes)
    log.info("engine ready", boot_s=round(time.perf_counter() - t0, 3), queue=queue, **engine.describe())

    metrics = None
    if options.metrics_port is not None:
        from sdfleet.metrics import WorkerMetrics

        metrics = WorkerMetrics(worker_id, served, gpu_uuid=assignment.uuid or "")
        port = metrics.serve(options.metrics_port)
        log.info("metrics served", port=port)
    # Prefetch: a full batch of each of a few interleaved shapes being filled, one batch in the engine, one
    # waiting for it, one being stored (celery-batches' issue 17: batches capped by prefetch; on the H200 a
    # prefetch of 4 batches left a 3-shape mix mostly in batches of 3, each costing a padded 4).
    prefetch = max(2, options.max_batch * 6)
    app = make_app(settings, prefetch=prefetch)
    ctx = WorkerContext(settings, options, engine, log, served_model=served, queue=queue,
                        gpu=GpuProbe(assignment.uuid, log=log) if assignment.is_gpu else None, metrics=metrics)
    ctx.gpu_identity = {k: v for k, v in assignment.describe().items() if k != "device"}
    app.tasks[GENERATE_TASK].Strategy = ctx.consumer.strategy
    app.steps["consumer"].add(GenerationStep)
    ctx.heartbeat = Heartbeat(ctx, settings.heartbeat_interval, settings.heartbeat_ttl)
    sweep = SweepThread(ctx, app)
    # A previous process under this worker id may have died holding work: hand it back now, not after the
    # heartbeat TTL. Its reclaim mark belongs to that life, not to this one.
    if ctx.redis.exists(keys.worker_held(worker_id)):
        sweep.sweeper.reclaim_worker(worker_id)
    ctx.redis.delete(keys.worker_reclaimed(worker_id))
    ctx.state = "idle"
    ctx.heartbeat.beat()
    ctx.heartbeat.start()
    ctx.engine_thread.start()
    sweep.start()

    worker = app.Worker(
        hostname=f"sdfleet@{worker_id}", pool="solo", concurrency=1, queues=[queue],
        generation_consumer=ctx.consumer, without_mingle=True, without_gossip=True, without_heartbeat=False,
        loglevel=settings.log_level.upper(), quiet=True, send_events=True,
    )

    @signals.worker_shutting_down.connect(weak=False)
    def _draining(**_: Any) -> None:
        ctx.state = "draining"

    @signals.worker_ready.connect(weak=False)
    def _json_sigterm(**_: Any) -> None:
        # Celery's own SIGTERM handler writes a bare "worker: Warm shutdown" line to stdout; this one does what
        # it does (a warm shutdown through Celery's public state flag) and logs it as JSON like every other line.
        from celery import platforms
        from celery.worker import state as celery_state

        def on_sigterm(*_args: Any) -> None:
            log.info("warm shutdown requested", signal="SIGTERM")
            try:
                signals.worker_shutting_down.send(sender=f"sdfleet@{worker_id}", sig="SIGTERM", how="Warm",
                                                  exitcode=0)
            finally:
                celery_state.should_stop = 0

        platforms.signals["SIGTERM"] = on_sigterm

    try:
        worker.start()
    finally:
        ctx.state = "draining"
        ctx.consumer.stop()
        sweep.stop_event.set()
        ctx.heartbeat.stop_event.set()
        ctx.engine_thread.stop()
        ctx.post.shutdown()
        try:
            ctx.redis.delete(keys.worker(worker_id))
            ctx.redis.srem(keys.WORKERS, worker_id)
            # kombu restored this channel's unacknowledged messages when Celery closed it; a message it could
            # not restore (Redis away) is held by no live worker, so the sweep restores it as an orphan.
            ctx.redis.delete(keys.worker_held(worker_id))
        except Exception:
            pass
        if gpu_lock is not None:
            gpu_lock.release()
        log.info("worker stopped", batches=ctx.runner.batches_run)
        sys.stdout.flush()
    return worker.exitcode or 0
