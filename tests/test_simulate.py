"""scheduler.simulate: the fleet simulation driven by the real policy, checked on traces small enough to reason about."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scheduler import simulate as sim
from scheduler.policy import PoolConfig
from tests.conftest import run_cli

SERVICE = sim.ServiceModel("test", fixed_s=1.0, per_image_s=2.0)  # a batch of n takes 1 + 2n s


def test_a_fixed_fleet_by_hand() -> None:
    arrivals = np.zeros(8)
    r = sim.simulate(arrivals, SERVICE, config=PoolConfig(max_batch=4), cold_start_s=0, tick_s=1, window_s=10,
                     fixed_workers=1)
    # Two batches of 4 back to back: jobs end at 9 s and 18 s.
    assert (r.p50_s, r.max_s) == (pytest.approx(13.5), 18)
    assert r.gpu_hours == pytest.approx(18 / 3600) and r.utilization == pytest.approx(1.0)
    assert r.scale_events == 0 and r.peak_workers == 1


def test_the_policy_scales_up_for_a_batch_and_back_to_zero() -> None:
    arrivals = np.zeros(400)
    cfg = PoolConfig(min_workers=0, max_workers=10, target_drain_s=60, cooldown_s=30, max_batch=4)
    r = sim.simulate(arrivals, SERVICE, config=cfg, cold_start_s=20, tick_s=5, window_s=3600)
    # 400 jobs x 2.25 s = 900 GPU-s over 60 s: the maximum, at the first tick.
    assert r.peak_workers == 10
    # 100 batches of 9 s on 10 workers after a 20 s boot: done at about 20 + 90 s.
    assert 105 <= r.max_s <= 125
    # Every worker's time: boot, 90 s of batches, then the cool-down before it is drained.
    assert r.gpu_hours * 3600 == pytest.approx(10 * (20 + 90) + 10 * 30, rel=0.15)
    assert r.scale_events >= 2, "up, then down to zero"
    assert 0 < r.utilization < 1


def test_autoscaling_beats_a_fixed_fleet_of_the_same_cost_on_bursts() -> None:
    cfg = PoolConfig(min_workers=0, max_workers=100, target_drain_s=300, cooldown_s=300, max_batch=4)
    auto, fixed = sim.compare("bursty-day", 20_000, cfg, model="large", cold_start_s=60, tick_s=15, seed=3)
    assert auto.jobs == fixed.jobs == 20_000
    assert fixed.gpu_hours == pytest.approx(auto.gpu_hours, rel=0.5), "the same cost, up to one GPU of rounding"
    assert auto.p95_s < fixed.p95_s / 3, (auto, fixed)
    for r in (auto, fixed):
        assert r.p50_s <= r.p95_s <= r.p99_s <= r.max_s
        assert r.p50_s >= sim.SERVICE["large"].batch_s(1) - 1e-6, "no job ends before its own engine time"
        assert 0 < r.utilization <= 1


def test_traces_have_the_jobs_they_say() -> None:
    rng = np.random.default_rng(0)
    for name, (make, window) in sim.TRACES.items():
        t = make(5000, rng)
        assert len(t) == 5000 and np.all(np.diff(t) >= 0) and t.min() >= 0, name
        assert t.max() <= window, name
    day = sim.trace_bursty_day(50_000, np.random.default_rng(1))
    per_minute = np.histogram(day, bins=1440, range=(0, sim.DAY_S))[0]
    assert per_minute.max() > 20 * np.median(per_minute), "bursts stand out of the diurnal curve"
    night, afternoon = per_minute[2 * 60:4 * 60], per_minute[14 * 60:16 * 60]
    assert np.median(afternoon) > 4 * np.median(night), "the diurnal curve peaks in the afternoon"


def test_service_model_matches_the_measured_engine() -> None:
    large = sim.SERVICE["large"]
    assert large.batch_s(1) == pytest.approx(2.497) and large.s_per_image(4) == pytest.approx(2.379)


def test_cli_prints_the_comparison(env) -> None:
    res = run_cli(["simulate", "--trace", "overnight", "--jobs", "4000", "--max-workers", "20", "--json"], env)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["fleet"] for r in rows] == ["autoscaled", "fixed"]
    assert rows[0]["peak_workers"] == 20 and rows[0]["makespan_h"] < rows[1]["makespan_h"]
    bad = run_cli(["simulate", "--jobs", "10", "--min-workers", "5", "--max-workers", "2"], env)
    assert bad.returncode == 2 and "--max-workers" in bad.stderr
