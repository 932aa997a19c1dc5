"""scheduler.policy on traces: the desired count follows the backlog up at once and down after a cool-down."""

from __future__ import annotations

import pytest

from scheduler.policy import Backlog, Policy, PoolConfig, backlog, default_s_per_image, price
from sdfleet.errors import ConfigError


def run(policy: Policy, trace: list[tuple[float, Backlog]]) -> list[int]:
    return [policy.decide(t, b).desired for t, b in trace]


def jobs(n: int, s_per_image: float = 2.0) -> Backlog:
    return Backlog(queued=n, in_flight=0, gpu_seconds=n * s_per_image)


def test_grows_at_once_and_shrinks_after_the_cooldown() -> None:
    p = Policy(PoolConfig(min_workers=0, max_workers=10, target_drain_s=100, cooldown_s=30, max_batch=4))
    trace = [(0, jobs(0)), (1, jobs(200)), (2, jobs(1000)), (3, jobs(1000))]  # 400 and 2000 GPU-s
    assert run(p, trace) == [0, 4, 10, 10], "up at once, capped at max_workers"
    # The backlog falls to 300 GPU-s (need 3) at t=10: nothing changes until t=10+30 has no higher need.
    down = run(p, [(10, jobs(150)), (20, jobs(150)), (33, jobs(150)), (41, jobs(150))])
    assert down == [10, 10, 10, 3], down
    assert p.decide(42, jobs(0)).desired == 3, "an empty queue waits out its own cool-down"
    assert p.decide(73, jobs(0)).desired == 0


def test_a_dip_between_submissions_costs_no_cold_start() -> None:
    p = Policy(PoolConfig(max_workers=8, target_drain_s=60, cooldown_s=120))
    trace = [(t, jobs(240 if t % 50 < 40 else 0)) for t in range(0, 600, 5)]
    desired = run(p, trace)
    assert desired[0] == 8 and min(desired) == 8, "gaps of 10 s inside a 120 s cool-down never shrink the pool"


def test_activation_on_the_first_job_and_min_max() -> None:
    p = Policy(PoolConfig(min_workers=0, max_workers=3, target_drain_s=3600, cooldown_s=0))
    assert p.decide(0, jobs(0)).desired == 0
    assert p.decide(1, jobs(1, 0.001)).desired == 1, "one queued job wakes a pool at zero"
    assert p.decide(2, jobs(0)).desired == 0
    q = Policy(PoolConfig(min_workers=2, max_workers=3, cooldown_s=0))
    assert q.decide(0, jobs(0)).desired == 2, "never below min_workers"


def test_never_more_workers_than_batches() -> None:
    p = Policy(PoolConfig(max_workers=100, target_drain_s=1, max_batch=4))
    assert p.decide(0, Backlog(queued=10, in_flight=2, gpu_seconds=10_000)).desired == 3


def test_in_flight_work_keeps_workers() -> None:
    p = Policy(PoolConfig(max_workers=10, target_drain_s=10, cooldown_s=0, max_batch=1))
    assert p.decide(0, Backlog(queued=0, in_flight=4, gpu_seconds=40)).desired == 4


def test_resume_keeps_running_workers_for_a_cooldown() -> None:
    p = Policy(PoolConfig(max_workers=10, cooldown_s=60))
    p.resume(0, 6)
    assert p.decide(1, jobs(0)).desired == 6
    assert p.decide(61, jobs(0)).desired == 0


def test_backlog_prices_each_bucket() -> None:
    measured = {"1024x1024:28": 2.4}
    b = backlog({"1024x1024:28": 10, "512x512:28": 8}, {"1024x1024:28": 4}, measured, default_s=9.9)
    # 512x512 is a quarter of the pixels: priced from the nearest measured bucket, not the default.
    assert b.gpu_seconds == pytest.approx(14 * 2.4 + 8 * 0.6)
    assert (b.queued, b.in_flight) == (18, 4)
    assert price("1024x1024:14", {}, 2.0) == pytest.approx(1.0), "no measurement: the default, scaled by steps"
    assert price("garbage", {}, 2.0) == 2.0


def test_default_service_times_by_model_name() -> None:
    assert default_s_per_image("sd3.5-large") == 2.4
    assert default_s_per_image("sd3.5-medium") == 1.1
    assert default_s_per_image("tiny") == 0.5
    assert default_s_per_image("my-model") == 2.4, "an unknown model is priced like the slowest"


def test_config_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="--max-workers"):
        PoolConfig(min_workers=3, max_workers=2).check()
    with pytest.raises(ConfigError, match="--cooldown-s"):
        PoolConfig(cooldown_s=-1).check()


def test_work_of_unknown_bucket_is_priced_like_the_queue() -> None:
    b = backlog({"512x512:28": 4}, {"unknown": 2}, {"512x512:28": 0.5}, default_s=9.9)
    assert b.gpu_seconds == pytest.approx(6 * 0.5)
    assert backlog({}, {"unknown": 2}, {"512x512:28": 0.5}, 9.9).gpu_seconds == pytest.approx(1.0)
    assert backlog({}, {"unknown": 2}, {}, 9.9).gpu_seconds == pytest.approx(19.8)


def test_a_steady_stream_is_served_without_a_standing_queue() -> None:
    # 20 workers busy with single jobs, 3 queued: the backlog alone (69 GPU-s over 300 s) would ask for 1.
    p = Policy(PoolConfig(max_workers=100, target_drain_s=300, cooldown_s=0, max_batch=4, target_utilization=0.8))
    d = p.decide(0, Backlog(queued=3, in_flight=20, gpu_seconds=23 * 3.0, busy_workers=20))
    assert d.desired == 21, "busy workers plus one per queued batch, never fewer than are working"
    q = Policy(PoolConfig(max_workers=100, target_drain_s=300, cooldown_s=0, max_batch=4, target_utilization=0.8))
    assert q.decide(0, Backlog(queued=40, in_flight=20, gpu_seconds=60 * 3.0, busy_workers=20)).desired == 25
