"""Prometheus metrics of every long-running role, and the small HTTP server that exposes them.

Each role owns one registry (never the library's global one, so a test or a process hosting two roles
never mixes them): :class:`WorkerMetrics` for a GPU worker, :class:`WebhookMetrics` for the webhook worker,
:class:`SchedulerMetrics` for the scheduler. :func:`serve` answers ``GET /metrics`` in Prometheus' text
format and any extra JSON documents a role adds (the scheduler's KEDA document), on a thread of its own.

GPU gauges are read from NVML at scrape time, for the GPU this worker owns, found by its UUID: NVML numbers
devices physically and ignores ``CUDA_VISIBLE_DEVICES``, so "index 0" is the wrong GPU for every worker
but the first (:func:`resolve_gpu_uuid` maps ``cuda:N`` through the visible-devices list).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

WORKER_STATES = ("booting", "idle", "busy", "draining", "stalled")
JOB_OUTCOMES = ("succeeded", "failed", "requeued", "cancelled")
WEBHOOK_OUTCOMES = ("delivered", "retry", "dead", "malformed")

# Buckets sized to what the engine measures (docs/PERFORMANCE.md): a Large step is ~80 ms, an image ~2.4 s.
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
STEP_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
IMAGE_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 2.5, 3, 4, 6, 10, 20, 60)
BATCH_SECONDS_BUCKETS = (0.05, 0.1, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
# images/s is the rate over this window: long enough to span a few Large batches (~10 s each).
RATE_WINDOW_S = 60.0


class MetricsServer:
    """A running ``/metrics`` endpoint; ``port`` is the bound port (useful when 0 was asked for)."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "0.0.0.0",
                 json_routes: Mapping[str, Callable[[str], Any]] | None = None):
        routes = dict(json_routes or {})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                try:
                    if path in ("/metrics", "/"):
                        body, ctype, status = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                    else:
                        route = next((p for p in routes if path == p or path.startswith(p.rstrip("/") + "/")), None)
                        if route is None:
                            body, ctype, status = b"not found\n", "text/plain", 404
                        else:
                            doc = routes[route](path[len(route.rstrip("/")):].strip("/"))
                            status = 404 if doc is None else 200
                            body, ctype = json.dumps(doc).encode() + b"\n", "application/json"
                except Exception as exc:  # a broken collector must not kill the server thread
                    body, ctype, status = f"error: {exc!r}\n".encode(), "text/plain", 500
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes every few seconds are not log lines
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(registry: CollectorRegistry, port: int, *, host: str = "0.0.0.0",
          json_routes: Mapping[str, Callable[[str], Any]] | None = None) -> MetricsServer:
    """Serve ``registry`` on ``port`` (0: a free one) in a daemon thread. ``json_routes``: path prefix ->
    function of the rest of the path returning a JSON-able document (None: 404)."""
    return MetricsServer(registry, port, host, json_routes)


# --- GPU --------------------------------------------------------------------------------------------

def resolve_gpu_uuid(device: str, environ: Mapping[str, str] | None = None) -> str:
    """The NVML UUID of the GPU that ``device`` (``cuda:N``) names in this process; '' for the CPU or no NVML.

    ``CUDA_VISIBLE_DEVICES`` may list indices or UUIDs; ``cuda:N`` is its N-th entry. Without it, N is the
    physical index.
    """
    if not device.startswith("cuda"):
        return ""
    env = os.environ if environ is None else environ
    n = int(device.split(":", 1)[1]) if ":" in device else 0
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    entry = visible[n] if n < len(visible) else ("" if visible else str(n))
    if entry.startswith(("GPU-", "MIG-")):
        return entry
    if not entry.isdigit():
        return ""
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(int(entry)))
        return uuid.decode() if isinstance(uuid, bytes) else uuid
    except Exception:
        return ""


class GpuCollector(Collector):
    """Utilization, memory, temperature and power of one GPU (by UUID), read from NVML on each scrape."""

    def __init__(self, gpu_uuid: str, labels: Mapping[str, str], nvml: Any = None):
        self.gpu_uuid = gpu_uuid
        self.labels = {**labels, "gpu": gpu_uuid}
        self._nvml = nvml
        self._handle: Any = None
        self.errors = 0

    def _device(self) -> tuple[Any, Any]:
        if self._nvml is None:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        if self._handle is None:
            self._handle = self._nvml.nvmlDeviceGetHandleByUUID(self.gpu_uuid)
        return self._nvml, self._handle

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # no NVML call when the registry registers this collector, only on scrapes

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if not self.gpu_uuid:
            return []
        names = list(self.labels)
        values = [self.labels[k] for k in names]
        try:
            nvml, h = self._device()
            util = nvml.nvmlDeviceGetUtilizationRates(h)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            temp = nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
            power_mw = nvml.nvmlDeviceGetPowerUsage(h)
        except Exception:  # a lost GPU or driver: no GPU samples this scrape, the rest still answers
            self.errors += 1
            self._handle = None
            return []
        out = []
        for name, doc, value in (
            ("sdfleet_gpu_utilization_ratio", "GPU busy fraction over NVML's last sample period", util.gpu / 100.0),
            ("sdfleet_gpu_memory_used_bytes", "GPU memory in use", float(mem.used)),
            ("sdfleet_gpu_memory_total_bytes", "GPU memory in all", float(mem.total)),
            ("sdfleet_gpu_temperature_celsius", "GPU core temperature", float(temp)),
            ("sdfleet_gpu_power_watts", "GPU board power draw", power_mw / 1000.0),
        ):
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            out.append(g)
        return out


# --- roles ------------------------------------------------------------------------------------------

class _RoleMetrics:
    registry: CollectorRegistry

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the ``/metrics`` server; returns the bound port (``port`` 0 picks a free one)."""
        self.server = serve(self.registry, port, host=host)
        return self.server.port

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class WorkerMetrics(_RoleMetrics):
    """A GPU worker's metrics. Every sample carries the worker id and its pool (model queue)."""

    def __init__(self, worker_id: str, pool: str, gpu_uuid: str = "", *, nvml: Any = None,
                 clock: Callable[[], float] = time.monotonic):
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        labels = {"worker": worker_id, "pool": pool}
        names = list(labels)
        self._clock = clock
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

        def metric(cls: Any, name: str, doc: str, extra: tuple[str, ...] = (), **kw: Any) -> Any:
            return cls(name, doc, [*names, *extra], registry=self.registry, **kw)

        self._jobs = metric(Counter, "sdfleet_jobs", "jobs this worker ended, by outcome", ("outcome",))
        for outcome in JOB_OUTCOMES:
            self._jobs.labels(*labels.values(), outcome)  # every outcome exported from the start, at 0
        self._batch_size = metric(Histogram, "sdfleet_batch_size", "jobs per engine run",
                                  buckets=BATCH_SIZE_BUCKETS).labels(**labels)
        self._batch_s = metric(Histogram, "sdfleet_batch_seconds", "engine run time",
                               buckets=BATCH_SECONDS_BUCKETS).labels(**labels)
        self._step_s = metric(Histogram, "sdfleet_step_seconds", "engine time per denoising step of a run",
                              buckets=STEP_SECONDS_BUCKETS).labels(**labels)
        self._image_s = metric(Histogram, "sdfleet_image_seconds", "engine time per image of a run",
                               buckets=IMAGE_SECONDS_BUCKETS).labels(**labels)
        self._images = metric(Counter, "sdfleet_images", "images generated").labels(**labels)
        rate = metric(Gauge, "sdfleet_images_per_second", f"images generated per second over the last "
                      f"{RATE_WINDOW_S:g} s").labels(**labels)
        rate.set_function(self.images_per_s)
        self._depth = metric(Gauge, "sdfleet_worker_queue_depth",
                             "jobs this worker holds and has not ended (prefetched, batching, in the engine, "
                             "uploading)").labels(**labels)
        self._state = Enum("sdfleet_worker_state", "the worker's state", names, states=list(WORKER_STATES),
                           registry=self.registry).labels(**labels)
        self._state.state("booting")
        self.gpu = GpuCollector(gpu_uuid, labels, nvml=nvml)
        if gpu_uuid:
            self.registry.register(self.gpu)
        self._labels = labels

    def job_finished(self, outcome: str) -> None:
        """One job ended here: succeeded, failed, requeued (handed back) or cancelled."""
        self._jobs.labels(*self._labels.values(), outcome).inc()

    def batch_ran(self, size: int, seconds: float, steps: int, images: int) -> None:
        """One engine run of ``size`` jobs took ``seconds`` for ``steps`` steps and ``images`` images."""
        self._batch_size.observe(size)
        self._batch_s.observe(seconds)
        if steps > 0:
            self._step_s.observe(seconds / steps)
        if images > 0:
            self._image_s.observe(seconds / images)
            self._images.inc(images)
            with self._lock:
                self._recent.append((self._clock(), images))

    def images_per_s(self) -> float:
        now = self._clock()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            n = sum(i for _, i in self._recent)
        return n / RATE_WINDOW_S

    def set_queue_depth(self, n: int) -> None:
        self._depth.set(n)

    def set_state(self, state: str) -> None:
        if state not in WORKER_STATES:
            raise ValueError(f"worker state {state!r}: expected one of {', '.join(WORKER_STATES)}")
        self._state.state(state)


class WebhookMetrics(_RoleMetrics):
    """The webhook worker's metrics: deliveries by outcome and the dead-letter list's length."""

    def __init__(self, dead_letters: Callable[[], float] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self._deliveries = Counter("sdfleet_webhook_deliveries", "webhook delivery attempts, by outcome",
                                   ["outcome"], registry=self.registry)
        for outcome in WEBHOOK_OUTCOMES:
            self._deliveries.labels(outcome)
        self._dead = Gauge("sdfleet_webhook_dead_letters", "deliveries in the dead-letter list "
                           "('sdfleet webhooks list-failed')", registry=self.registry)
        if dead_letters is not None:
            self._dead.set_function(lambda: _or_nan(dead_letters))

    def delivery(self, outcome: str) -> None:
        self._deliveries.labels(outcome).inc()

    def set_dead_letters(self, n: int) -> None:
        self._dead.set(n)


class SchedulerMetrics(_RoleMetrics):
    """The scheduler's view of each pool: backlog, desired and actual workers, scale events."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.queue_depth = Gauge("sdfleet_pool_queue_depth", "queued jobs not yet taken by a worker",
                                 ["pool"], registry=r)
        self.in_flight = Gauge("sdfleet_pool_jobs_in_flight", "jobs workers hold (batching, running, uploading)",
                               ["pool"], registry=r)
        self.backlog = Gauge("sdfleet_pool_backlog_gpu_seconds", "GPU-seconds of queued and in-flight work",
                             ["pool"], registry=r)
        self.desired = Gauge("sdfleet_pool_desired_workers", "workers the policy wants", ["pool"], registry=r)
        self.actual = Gauge("sdfleet_pool_actual_workers", "workers with a live heartbeat", ["pool"], registry=r)
        self.busy = Gauge("sdfleet_pool_busy_workers", "live workers running a batch", ["pool"], registry=r)
        self.stalled = Gauge("sdfleet_pool_stalled_workers", "live workers reporting state stalled", ["pool"],
                             registry=r)
        self.scale_events = Counter("sdfleet_pool_scale_events", "changes of the desired count",
                                    ["pool", "direction"], registry=r)
        self.restarts = Counter("sdfleet_pool_worker_restarts", "crashed local workers started again", ["pool"],
                                registry=r)
        self.last_tick = Gauge("sdfleet_scheduler_last_tick_timestamp_seconds", "when the scheduler last decided",
                               registry=r)

    def observe(self, pool: str, *, queued: int, in_flight: int, backlog_s: float, desired: int, actual: int,
                busy: int, stalled: int) -> None:
        self.queue_depth.labels(pool).set(queued)
        self.in_flight.labels(pool).set(in_flight)
        self.backlog.labels(pool).set(backlog_s)
        self.desired.labels(pool).set(desired)
        self.actual.labels(pool).set(actual)
        self.busy.labels(pool).set(busy)
        self.stalled.labels(pool).set(stalled)
        self.last_tick.set(time.time())


def _or_nan(fn: Callable[[], float]) -> float:
    try:
        return float(fn())
    except Exception:  # Redis unreachable during a scrape: a gap in the graph, not a crash
        return float("nan")
