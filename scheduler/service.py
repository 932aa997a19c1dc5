"""``sdfleet scheduler``: every few seconds, observe each pool, decide its size, act, and publish it.

Per tick: read the queues and heartbeats (:mod:`scheduler.observe`), price the backlog and decide the
desired count (:mod:`scheduler.policy`), hand it to the driver (local processes, or nothing on Kubernetes
where KEDA reads it), export it as Prometheus metrics and as the JSON document KEDA's metrics-api trigger
reads (``GET /scale/<pool>`` -> ``{"desired": N, ...}``), and record it in Redis for ``sdfleet top``.
Each tick first runs the fleet's reclaim sweep (:mod:`sdfleet.reclaim`, under its lock), so a dead worker's
jobs come back even when the pool has scaled to zero. SIGTERM or SIGINT stops the loop; a local driver then
drains its workers before the scheduler exits.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from scheduler import observe as obs
from scheduler.policy import Backlog, Decision, Policy, PoolConfig, backlog, default_s_per_image
from sdfleet import keys
from sdfleet.metrics import SchedulerMetrics

# The recorded decisions expire when no scheduler refreshes them, so a view never shows a dead one's.
STATE_TTL_S = 60


@dataclass
class PoolStatus:
    pool: str
    desired: int
    need: int
    actual: int
    queued: int
    queued_raw: int
    in_flight: int
    backlog_gpu_seconds: float
    reason: str
    at: float

    def doc(self) -> dict[str, Any]:
        return {**self.__dict__, "backlog_gpu_seconds": round(self.backlog_gpu_seconds, 3)}


@dataclass
class Scheduler:
    r: redis.Redis
    config: PoolConfig
    log: Any
    pools: list[str] | None = None  # None: every pool with a queue or a live worker
    drivers: Mapping[str, Any] = field(default_factory=dict)  # pool -> driver (absent: external)
    metrics: SchedulerMetrics = field(default_factory=SchedulerMetrics)
    default_s: Callable[[str], float] = default_s_per_image
    policies: dict[str, Policy] = field(default_factory=dict)
    status: dict[str, PoolStatus] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    restarts_seen: dict[str, int] = field(default_factory=dict)
    #: pool -> its own limits (the other settings as ``config``); pools not named use ``config``
    pool_configs: Mapping[str, PoolConfig] = field(default_factory=dict)
    #: the reclaim sweep (``Sweeper.run_once``, under the fleet's lock), run before each observation: with
    #: ``--min-workers 0`` the pool may have no worker left to hand a dead worker's jobs back
    sweep: Callable[[], Any] | None = None

    def config_for(self, pool: str) -> PoolConfig:
        return self.pool_configs.get(pool, self.config)

    def tick(self, now: float | None = None) -> dict[str, Decision]:
        now = time.time() if now is None else now
        if self.sweep is not None:
            try:
                self.sweep()
            except Exception as exc:  # a failed sweep must not stop the scaling; the next tick sweeps again
                self.log.warning("sweep failed", error=repr(exc))
        workers = obs.live_workers(self.r)
        pools = self.pools if self.pools is not None else obs.discover_pools(self.r, workers)
        views = obs.observe(self.r, pools, workers)
        decisions: dict[str, Decision] = {}
        for pool, view in views.items():
            driver = self.drivers.get(pool)
            policy = self.policies.get(pool)
            if policy is None:
                if hasattr(driver, "adopt") and not driver.adopted:  # a previous scheduler's workers count
                    driver.adopt({w["worker_id"]: w for w in view.workers})
                policy = self.policies[pool] = Policy(self.config_for(pool))
                managed = len(driver.active()) if hasattr(driver, "active") else len(view.workers)
                if managed:
                    policy.resume(now, managed)
            b: Backlog = backlog(view.queued_by_bucket, view.in_flight_by_bucket, view.measured, self.default_s(pool),
                                 busy_workers=view.count("busy"))
            d = policy.decide(now, b)
            decisions[pool] = d
            if driver is not None:
                started, drained = driver.reconcile(d.desired, {w["worker_id"]: w for w in view.workers})
                if started or drained:
                    self.log.info("pool scaled", pool=pool, desired=d.desired, started=started, drained=drained,
                                  reason=d.reason)
                restarts = getattr(driver, "restarts", 0)
                if restarts > self.restarts_seen.get(pool, 0):
                    self.metrics.restarts.labels(pool).inc(restarts - self.restarts_seen.get(pool, 0))
                    self.restarts_seen[pool] = restarts
            if d.direction:
                self.metrics.scale_events.labels(pool, d.direction).inc()
                self.log.info("desired workers changed", pool=pool, desired=d.desired, need=d.need, reason=d.reason,
                              queued=b.queued, in_flight=b.in_flight, backlog_gpu_s=round(b.gpu_seconds, 1))
            actual = len(view.workers)
            self.metrics.observe(pool, queued=b.queued, in_flight=b.in_flight, backlog_s=b.gpu_seconds,
                                 desired=d.desired, actual=actual, busy=view.count("busy"),
                                 stalled=view.count("stalled"))
            with self.lock:
                self.status[pool] = PoolStatus(pool, d.desired, d.need, actual, b.queued, view.queued_raw, b.in_flight,
                                               b.gpu_seconds, d.reason, now)
        self._record()
        return decisions

    def _record(self) -> None:
        with self.lock:
            docs = {p: json.dumps(s.doc()) for p, s in self.status.items()}
        if docs:
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(keys.SCHEDULER_STATE, mapping=docs)
            pipe.expire(keys.SCHEDULER_STATE, STATE_TTL_S)
            pipe.execute()

    def scale_doc(self, pool: str) -> dict[str, Any] | None:
        """KEDA metrics-api document for ``pool`` (``valueLocation: desired``); all pools for ''."""
        with self.lock:
            if not pool:
                return {"pools": {p: s.doc() for p, s in self.status.items()}}
            s = self.status.get(pool)
            if s is None and self.pools is None:
                # Not seen yet (no queue, no worker): nothing to do, which KEDA reads as zero replicas.
                return {"pool": pool, "desired": self.config_for(pool).min_workers, "reason": "no queue or worker yet"}
            return s.doc() if s is not None else None


def parse_pool_limits(specs: list[str], base: PoolConfig) -> dict[str, PoolConfig]:
    """``["sd3.5-large=0:8", ...]`` -> pool -> ``base`` with those min and max workers."""
    import dataclasses

    from sdfleet.errors import ConfigError

    out = {}
    for spec in specs:
        try:
            pool, limits = spec.split("=", 1)
            lo, hi = (int(x) for x in limits.split(":"))
        except ValueError:
            raise ConfigError(f"--pool {spec!r}: expected POOL=MIN:MAX, e.g. sd3.5-large=0:8") from None
        cfg = dataclasses.replace(base, min_workers=lo, max_workers=hi)
        try:
            cfg.check()
        except ConfigError as exc:
            raise ConfigError(f"--pool {spec!r}: {exc}") from None
        out[pool.strip()] = cfg
    return out


def run_scheduler(settings: Any, *, config: PoolConfig, driver: str, models: list[str], interval: float,
                  metrics_port: int | None, worker_args: list[str], worker_metrics_port_base: int | None,
                  drain_timeout_s: float, once: bool, log: Any, pool_limits: list[str] = ()) -> int:
    from scheduler.driver import LocalDriver, pool_name
    from sdfleet.redisconn import connect

    config.check()
    pool_configs = parse_pool_limits(list(pool_limits), config)
    r = connect(settings.redis_url)
    drivers: dict[str, Any] = {}
    if driver == "local":
        for model in models:
            limit = pool_configs.get(pool_name(model), config).max_workers
            d = LocalDriver(model=model, max_workers=limit, log=log.bind(pool=pool_name(model)),
                            worker_args=worker_args, metrics_port_base=worker_metrics_port_base)
            drivers[d.pool] = d
    pools = [pool_name(m) for m in models] or None
    sweeper = _sweeper(settings, r, log)
    sched = Scheduler(r, config, log, pools=pools, drivers=drivers, pool_configs=pool_configs,
                      sweep=sweeper.run_once)
    server = None
    port = metrics_port if metrics_port is not None else settings.metrics_port
    if port is not None:
        from sdfleet.metrics import serve

        server = serve(sched.metrics.registry, port, json_routes={"/scale": sched.scale_doc})
        port = server.port
    log.info("scheduler started", driver=driver, pools=pools or "discovered", metrics_port=port,
             min_workers=config.min_workers, max_workers=config.max_workers, target_drain_s=config.target_drain_s,
             cooldown_s=config.cooldown_s, interval_s=interval)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        log.info("scheduler stopping", signal=signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        while not stop.is_set():
            try:
                sched.tick()
            except redis.RedisError as exc:  # Redis restarting: the next tick tries again
                log.warning("scheduler tick failed", error=repr(exc))
            if once:
                break
            stop.wait(interval)
    finally:
        ok = all(d.stop_all(drain_timeout_s) for d in drivers.values())
        sweeper.close()
        if server is not None:
            server.close()
        log.info("scheduler stopped", workers_drained=ok)
    return 0


def _sweeper(settings: Any, r: redis.Redis, log: Any) -> Any:
    """The reclaim sweep (and housekeeping) every worker runs, for this process: the same lock, so it runs
    in turn with the workers' and the janitor's."""
    import os
    import socket

    from scheduler.janitor import housekeeping_for
    from sdfleet.queue import make_app
    from sdfleet.reclaim import Sweeper

    # Long enough that a live worker has recorded what it received (one loop tick), with margin.
    return Sweeper(r, make_app(settings), settings, log, holder=f"scheduler@{socket.gethostname()}-{os.getpid()}",
                   grace_s=2 * settings.heartbeat_ttl + 1, housekeeping=housekeeping_for(settings, r, log))
