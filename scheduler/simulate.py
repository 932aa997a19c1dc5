"""``sdfleet simulate``: a discrete-event simulation of one pool under an arrival trace, sized by the real
policy (:class:`scheduler.policy.Policy`, the code ``sdfleet scheduler`` runs), against a fixed fleet of
the same cost.

The model: jobs of one bucket (1024x1024, 28 steps) arrive per the trace into one FIFO queue. An idle,
booted worker takes up to ``max_batch`` jobs at once and runs them in ``a + c * n`` seconds, fitted to the
FP8 engine's end-to-end numbers on an H100 (docs/PERFORMANCE.md). Every ``tick_s`` the scheduler observes
the queue and the jobs in flight, prices them at the measured seconds per image, and the policy decides;
new workers boot for ``cold_start_s`` (pod start, model load, warm-up) before their first batch; a worker
asked to go drains: an idle or booting one stops at once, a busy one after its batch (the local driver's
idle-first order). A worker costs GPU time from its start to its stop, boot and idle included.

The fixed fleet runs ``round(autoscaled GPU-hours / window)`` warm workers for the whole window (a day, or
the overnight window for the batch trace) and as long after as its backlog takes.
"""

from __future__ import annotations

import heapq
import json
import math
import time as _time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from scheduler.policy import Backlog, Policy, PoolConfig

DAY_S = 86_400.0
OVERNIGHT_WINDOW_S = 12 * 3600.0  # 22:00 to 10:00: when the batch must be done by


@dataclass(frozen=True)
class ServiceModel:
    """Seconds for one engine run of n images: ``fixed_s + per_image_s * n`` (1024x1024, 28 steps)."""

    name: str
    fixed_s: float
    per_image_s: float

    def batch_s(self, n: int) -> float:
        return self.fixed_s + self.per_image_s * n

    def s_per_image(self, max_batch: int) -> float:
        return self.batch_s(max_batch) / max_batch


# docs/PERFORMANCE.md, FP8 engine end to end: Large 2.497 s at 1 image per call, 2.379 s/image at 4;
# Medium 1.140 s at 1 (transformer batch 2), 1.054 s/image at 4 (transformer batch 8).
SERVICE = {
    "large": ServiceModel("large", fixed_s=2.497 - (4 * 2.379 - 2.497) / 3, per_image_s=(4 * 2.379 - 2.497) / 3),
    "medium": ServiceModel("medium", fixed_s=1.140 - (4 * 1.054 - 1.140) / 3, per_image_s=(4 * 1.054 - 1.140) / 3),
}


# --- traces -----------------------------------------------------------------------------------------

def trace_steady(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Poisson stream of ``n`` jobs over a day."""
    return np.sort(rng.uniform(0, DAY_S, n))


def trace_bursty_day(n: int, rng: np.random.Generator) -> np.ndarray:
    """A working day: 60% of the jobs follow a diurnal curve (peak mid-afternoon, a trough at night),
    40% come as 24 batch submissions of random size at random times, each enqueued within a minute."""
    diurnal = int(n * 0.6)
    # Rejection-sample the rate 1 + 0.9 sin(...) (peak at 15:00, trough at 03:00).
    out = []
    while sum(len(x) for x in out) < diurnal:
        t = rng.uniform(0, DAY_S, diurnal)
        keep = rng.uniform(0, 1.9, diurnal) < 1 + 0.9 * np.sin(2 * np.pi * (t / DAY_S - 0.375))
        out.append(t[keep])
    steady = np.concatenate(out)[:diurnal]
    sizes = rng.dirichlet(np.ones(24)) * (n - diurnal)
    counts = np.floor(sizes).astype(int)
    counts[0] += n - diurnal - counts.sum()
    starts = rng.uniform(6 * 3600, 22 * 3600, 24)
    bursts = [s + rng.uniform(0, 60, c) for s, c in zip(starts, counts)]
    return np.sort(np.concatenate([steady, *bursts]))


def trace_overnight(n: int, rng: np.random.Generator) -> np.ndarray:
    """One submission of ``n`` jobs at once (``sdfleet submit`` of a 1M-line file at 22:00)."""
    return np.sort(rng.uniform(0, 60, n))


TRACES: dict[str, tuple[Callable[[int, np.random.Generator], np.ndarray], float]] = {
    "bursty-day": (trace_bursty_day, DAY_S),
    "steady": (trace_steady, DAY_S),
    "overnight": (trace_overnight, OVERNIGHT_WINDOW_S),
}


# --- the simulation ---------------------------------------------------------------------------------

@dataclass
class Result:
    fleet: str
    trace: str
    jobs: int
    p50_s: float
    p95_s: float
    p99_s: float
    max_s: float
    gpu_hours: float
    utilization: float
    scale_events: int
    peak_workers: int
    mean_workers: float
    makespan_h: float  # first arrival to last job done
    sim_wall_s: float = 0.0


def simulate(arrivals: np.ndarray, service: ServiceModel, *, config: PoolConfig, cold_start_s: float,
             tick_s: float, window_s: float, fixed_workers: int | None = None, trace: str = "",
             ) -> Result:
    """Run the trace; ``fixed_workers`` None: the policy sizes the pool, else that many warm workers."""
    wall0 = _time.perf_counter()
    n = len(arrivals)
    finish = np.zeros(n)
    max_batch = config.max_batch
    s_img = service.s_per_image(max_batch)
    policy = Policy(config)
    # Worker state. Events on the heap: (time, seq, kind, worker, first job, jobs).
    events: list[tuple[float, int, str, int, int, int]] = []
    seq = 0
    idle: list[int] = []  # booted, no batch
    booting: dict[int, float] = {}  # worker -> ready time
    busy: dict[int, int] = {}  # worker -> jobs in its batch
    draining: set[int] = set()  # busy workers told to stop after their batch
    started_at: dict[int, float] = {}
    gpu_s = busy_s = 0.0
    next_id = 0
    head = arrived = 0  # queue = jobs [head, arrived)
    scale_events = 0
    peak = 0
    worker_s_integral = 0.0
    last_t = 0.0

    def start_worker(t: float, warm: bool) -> None:
        nonlocal next_id, seq
        w = next_id
        next_id += 1
        started_at[w] = t
        if warm:
            idle.append(w)
        else:
            booting[w] = t + cold_start_s
            seq += 1
            heapq.heappush(events, (t + cold_start_s, seq, "ready", w, 0, 0))

    def stop_worker(w: int, t: float) -> None:
        nonlocal gpu_s
        gpu_s += t - started_at.pop(w)

    def dispatch(t: float) -> None:
        nonlocal head, seq, busy_s
        while idle and head < arrived:
            w = idle.pop()
            k = min(max_batch, arrived - head)
            dur = service.batch_s(k)
            busy[w] = k
            busy_s += dur
            seq += 1
            heapq.heappush(events, (t + dur, seq, "done", w, head, k))
            head += k

    def active() -> int:
        return len(idle) + len(booting) + len(busy) - len(draining)

    def reconcile(t: float, desired: int) -> None:
        diff = desired - active()
        for _ in range(max(0, diff)):
            start_worker(t, warm=False)
        excess = -diff
        while excess > 0 and idle:
            stop_worker(idle.pop(0), t)  # the longest idle first
            excess -= 1
        for w in sorted(booting, key=booting.get, reverse=True):  # the latest to be ready first
            if excess <= 0:
                break
            del booting[w]
            stop_worker(w, t)
            excess -= 1
        for w in sorted(busy, key=busy.get):
            if excess <= 0:
                break
            if w not in draining:
                draining.add(w)
                excess -= 1

    if fixed_workers is not None:
        for _ in range(fixed_workers):
            start_worker(0.0, warm=True)
    next_tick = 0.0 if fixed_workers is None else math.inf
    t = 0.0
    while True:
        t_arrival = arrivals[arrived] if arrived < n else math.inf
        t_event = events[0][0] if events else math.inf
        t = min(t_arrival, t_event, next_tick)
        if t == math.inf:
            break
        alive = len(started_at)
        worker_s_integral += alive * (t - last_t)
        last_t = t
        if t == t_arrival:
            arrived = int(np.searchsorted(arrivals, t, side="right"))
        elif t == t_event:
            _, _, kind, w, first, k = heapq.heappop(events)
            if kind == "ready":
                if w in booting:
                    del booting[w]
                    idle.append(w)
            else:
                finish[first:first + k] = t
                del busy[w]
                if w in draining:
                    draining.discard(w)
                    stop_worker(w, t)
                else:
                    idle.append(w)
        else:
            in_flight = sum(busy.values())
            queued = arrived - head
            b = Backlog(queued=queued, in_flight=in_flight, gpu_seconds=(queued + in_flight) * s_img,
                        busy_workers=len(busy))
            d = policy.decide(t, b)
            if d.direction:
                scale_events += 1
            reconcile(t, d.desired)
            done = head >= n and not busy
            next_tick = math.inf if done and active() == 0 and not booting else t + tick_s
        dispatch(t)
        peak = max(peak, len(started_at))
    end = max(t if t != math.inf else last_t, last_t)
    for w in list(started_at):  # a fixed fleet runs until the end of its window at least
        stop_worker(w, max(end, window_s) if fixed_workers is not None else end)
    lat = finish - arrivals
    horizon = max(end, window_s)
    return Result(
        fleet="fixed" if fixed_workers is not None else "autoscaled", trace=trace, jobs=n,
        p50_s=float(np.percentile(lat, 50)), p95_s=float(np.percentile(lat, 95)),
        p99_s=float(np.percentile(lat, 99)), max_s=float(lat.max()),
        gpu_hours=gpu_s / 3600, utilization=busy_s / gpu_s if gpu_s else 0.0, scale_events=scale_events,
        peak_workers=peak, mean_workers=gpu_s / horizon, makespan_h=(finish.max() - arrivals.min()) / 3600,
        sim_wall_s=_time.perf_counter() - wall0,
    )


def compare(trace: str, jobs: int, config: PoolConfig, *, model: str = "large", cold_start_s: float = 60.0,
            tick_s: float = 15.0, seed: int = 1) -> tuple[Result, Result]:
    """(autoscaled, fixed fleet of the same GPU-hours over the trace's window) on one trace."""
    make, window = TRACES[trace]
    arrivals = make(jobs, np.random.default_rng(seed))
    service = SERVICE[model]
    auto = simulate(arrivals, service, config=config, cold_start_s=cold_start_s, tick_s=tick_s, window_s=window,
                    trace=trace)
    fixed_n = max(1, round(auto.gpu_hours * 3600 / window))
    fixed = simulate(arrivals, service, config=config, cold_start_s=cold_start_s, tick_s=tick_s, window_s=window,
                     fixed_workers=fixed_n, trace=trace)
    return auto, fixed


def table(results: list[Result]) -> str:
    head = ("| trace | fleet | p50 | p95 | p99 | GPU-hours | utilization | scale events | peak GPUs | "
            "mean GPUs | makespan |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = "".join(
        f"| {r.trace} | {r.fleet} | {_dur(r.p50_s)} | {_dur(r.p95_s)} | {_dur(r.p99_s)} | {r.gpu_hours:,.0f} | "
        f"{r.utilization:.1%} | {r.scale_events} | {r.peak_workers} | {r.mean_workers:.1f} | {r.makespan_h:.2f} h |\n"
        for r in results)
    return head + rows


def _dur(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def run_simulations(config: PoolConfig, *, trace: str, jobs: int, model: str, cold_start_s: float, tick_s: float,
                    seed: int, as_json: bool) -> int:
    names = list(TRACES) if trace == "all" else [trace]
    results: list[Result] = []
    for name in names:
        results += compare(name, jobs, config, model=model, cold_start_s=cold_start_s, tick_s=tick_s, seed=seed)
    if as_json:
        for r in results:
            print(json.dumps(asdict(r)))
    else:
        print(f"{jobs:,} jobs per trace, SD3.5 {model} FP8 1024x1024:28 ({SERVICE[model].s_per_image(config.max_batch):.3f} "
              f"s/image at batch {config.max_batch}), workers {config.min_workers}..{config.max_workers}, target drain "
              f"{config.target_drain_s:g} s, cool-down {config.cooldown_s:g} s, cold start {cold_start_s:g} s, "
              f"tick {tick_s:g} s\n")
        print(table(results))
    return 0
