"""How many workers a pool should have: pure functions of what the scheduler observes and the clock.

A pool is the set of workers of one model queue. Its backlog is measured in GPU-seconds: each queued job
priced at the seconds per image its bucket (width x height : steps) takes, as workers measured it, plus
the jobs workers already hold. The pool is sized to work that backlog off within a target drain time,
between a minimum and a maximum. It grows at once (a backlog already waits on boot time) and shrinks only
to the largest need seen over the cool-down window, so a dip between two submissions does not cost a cold
start. Nothing here touches Redis or a process: the scheduler (:mod:`scheduler.service`) and the
simulation (:mod:`scheduler.simulate`) feed it the same observations.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

# The shape that the engine's measured numbers are for (docs/PERFORMANCE.md): other buckets are priced
# in proportion to pixels x steps, which is how the transformer's cost grows to first order.
REFERENCE_BUCKET = (1024, 1024, 28)

# Seconds per image at the reference bucket until workers have measured any, by model name. The numbers
# are the FP8 engine's end-to-end times on an H100 (docs/PERFORMANCE.md); tiny and null are CPU models.
DEFAULT_S_PER_IMAGE = {"large": 2.4, "medium": 1.1, "tiny": 0.5, "null": 0.01}
FALLBACK_S_PER_IMAGE = 2.4  # an unknown model: priced like Large, the slower guess


def default_s_per_image(model: str) -> float:
    name = model.lower()
    for key, seconds in DEFAULT_S_PER_IMAGE.items():
        if name == key or name.endswith(f"-{key}") or key in name.split("-"):
            return seconds
    return FALLBACK_S_PER_IMAGE


def parse_bucket(bucket: str) -> tuple[int, int, int] | None:
    """``"1024x768:28"`` -> (1024, 768, 28); None if it is not a bucket."""
    try:
        size, steps = bucket.split(":")
        w, h = size.lower().split("x")
        return int(w), int(h), int(steps)
    except ValueError:
        return None


def _work(bucket: tuple[int, int, int]) -> float:
    w, h, steps = bucket
    return w * h * steps


def price(bucket: str, measured: Mapping[str, float], default_s: float) -> float:
    """Seconds per image for ``bucket``: measured if workers reported it; else scaled from the nearest
    measured bucket (by pixels x steps); else the model's default scaled from the reference shape."""
    if measured.get(bucket, 0) > 0:
        return float(measured[bucket])
    shape = parse_bucket(bucket)
    if shape is None:
        return default_s
    known = [(parse_bucket(b), s) for b, s in measured.items() if s > 0 and parse_bucket(b)]
    if known:
        ref, seconds = min(known, key=lambda kv: abs(math.log(_work(kv[0]) / _work(shape))))
        return seconds * _work(shape) / _work(ref)
    return default_s * _work(shape) / _work(REFERENCE_BUCKET)


@dataclass(frozen=True)
class Backlog:
    """What a pool has to do, as the scheduler observed it."""

    queued: int = 0  # jobs in the queue no worker has taken
    in_flight: int = 0  # jobs workers hold: batching, in the engine, uploading
    gpu_seconds: float = 0.0  # both, priced per bucket
    busy_workers: int = 0  # workers running a batch now: the demand being served

    @property
    def jobs(self) -> int:
        return self.queued + self.in_flight


def backlog(queued_by_bucket: Mapping[str, float], in_flight_by_bucket: Mapping[str, float],
            measured: Mapping[str, float], default_s: float, busy_workers: int = 0) -> Backlog:
    """Price the queued and the in-flight jobs of each bucket (counts may be estimates, hence floats)."""
    # A job whose bucket is not known (a heartbeat does not say what it buffers) is priced like the
    # queued work, else like the measured work, else by the default.
    queued_n = sum(queued_by_bucket.values())
    if queued_n > 0:
        typical = sum(n * price(b, measured, default_s) for b, n in queued_by_bucket.items()) / queued_n
    elif measured:
        typical = sum(measured.values()) / len(measured)
    else:
        typical = default_s
    seconds = 0.0
    for counts in (queued_by_bucket, in_flight_by_bucket):
        for bucket, n in counts.items():
            seconds += n * (price(bucket, measured, default_s) if parse_bucket(bucket) else typical)
    return Backlog(round(sum(queued_by_bucket.values())), round(sum(in_flight_by_bucket.values())), seconds,
                   busy_workers)


@dataclass(frozen=True)
class PoolConfig:
    min_workers: int = 0
    max_workers: int = 1
    target_drain_s: float = 300.0
    cooldown_s: float = 300.0
    #: busy workers are kept at this fraction of the pool, so a steady stream is served as it comes
    target_utilization: float = 0.9
    #: jobs a worker runs at once: more workers than batches of work cannot finish it sooner
    max_batch: int = 4

    def check(self) -> None:
        from sdfleet.errors import ConfigError

        if self.min_workers < 0:
            raise ConfigError("--min-workers must be >= 0")
        if self.max_workers < max(1, self.min_workers):
            raise ConfigError("--max-workers must be >= 1 and >= --min-workers")
        if self.target_drain_s <= 0:
            raise ConfigError("--target-drain-s must be > 0")
        if self.cooldown_s < 0:
            raise ConfigError("--cooldown-s must be >= 0")
        if self.max_batch < 1:
            raise ConfigError("--max-batch must be >= 1")
        if not 0 < self.target_utilization <= 1:
            raise ConfigError("--target-utilization must be in (0, 1]")


@dataclass(frozen=True)
class Decision:
    desired: int
    need: int  # what this observation alone asks for
    direction: str  # "up", "down" or "" (no change)
    reason: str


@dataclass
class Policy:
    """The desired worker count of one pool; call :meth:`decide` on every observation."""

    config: PoolConfig
    desired: int = -1  # -1: nothing decided yet
    _needs: deque[tuple[float, int]] = field(default_factory=deque)

    def need(self, b: Backlog) -> int:
        c = self.config
        if b.jobs <= 0:
            n = 0
        else:
            # Enough to work the backlog off within the target drain time, and enough that the workers
            # busy now (the stream being served) stay at the target utilization: sized on the backlog
            # alone, a pool serving a steady stream would only keep up once a target's worth had queued.
            # At least one worker for any work (activation on the first queued job); never more than the
            # busy workers plus one per queued batch.
            n = max(1, math.ceil(b.gpu_seconds / c.target_drain_s - 1e-9),
                    math.ceil(b.busy_workers / c.target_utilization - 1e-9))
            n = min(n, b.busy_workers + math.ceil(b.queued / c.max_batch) if b.busy_workers else
                    math.ceil(b.jobs / c.max_batch))
        return max(c.min_workers, min(c.max_workers, n))

    def resume(self, now: float, actual: int) -> None:
        """Start from the workers that already run (a restarted scheduler): they are kept for a cool-down."""
        self.desired = max(self.config.min_workers, min(self.config.max_workers, actual))
        self._needs.append((now, self.desired))

    def decide(self, now: float, b: Backlog) -> Decision:
        c = self.config
        need = self.need(b)
        self._needs.append((now, need))
        while self._needs and self._needs[0][0] < now - c.cooldown_s:
            self._needs.popleft()
        previous = self.desired
        if previous < 0:
            self.desired = need
            return Decision(need, need, "up" if need > 0 else "", "first decision")
        if need > previous:
            self.desired = need
            return Decision(need, need, "up", f"backlog {b.gpu_seconds:.0f} GPU-s over {c.target_drain_s:g} s")
        # Shrink only to the largest need of the whole cool-down window.
        floor = max(n for _, n in self._needs)
        if floor < previous:
            self.desired = floor
            return Decision(floor, need, "down", f"need at most {floor} for {c.cooldown_s:g} s")
        why = "steady" if need == previous else f"cooling down (need {need})"
        return Decision(previous, need, "", why)
