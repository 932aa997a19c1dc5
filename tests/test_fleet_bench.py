"""bench/fleet.py end to end on the CPU with the tiny model: the command the GPU run uses, at small scale.

It starts its own redis-server, a real worker per phase and real ``sdfleet submit`` calls, then the bare
engine in its own process; the report must hold every number the GPU run is read for.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

JOBS = 24


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("fleet")
    out = work / "fleet.json"
    proc = subprocess.run([sys.executable, "bench/fleet.py", "--model", "tiny", "--device", "cpu", "--jobs", str(JOBS),
                           "--work-dir", str(work), "--out-json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    data["_markdown"] = out.with_suffix(".md").read_text()
    return data


@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_every_job_through_the_fleet_and_the_same_images_as_the_bare_engine(report):
    fleet, bare = report["phases"]["fleet"], report["phases"]["bare"]
    assert fleet["succeeded"] == JOBS and fleet["failed"] == 0
    assert sum(size * n for size, n in ((int(s), n) for s, n in fleet["batch_sizes"].items())) == JOBS
    assert max(int(s) for s in fleet["batch_sizes"]) > 1  # one submit's jobs arrive together: batched
    assert bare["images"] == JOBS and bare["engine_runs"] == fleet["engine_runs"]
    assert bare["equality"]["compared"] == JOBS and bare["equality"]["max_pixel_diff"] <= 1
    assert fleet["images_per_s"] > 0 and bare["images_per_s"] > 0
    assert report["fleet_over_bare"] == round(fleet["images_per_s"] / bare["images_per_s"], 4)


@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_timeline_waits_busy_fraction_and_counters(report):
    fleet = report["phases"]["fleet"]
    assert len(fleet["timeline"]) == fleet["engine_runs"]
    for row in fleet["timeline"]:
        ts = [row[k] for k in ("t_dispatch", "t_engine_start", "t_engine_end", "t_d2h_done", "t_encoded", "t_stored",
                               "t_acked") if k in row]
        assert len(ts) == 7 and ts == sorted(ts), row
    assert fleet["timeline_source"] == "worker --timeline"
    waits = fleet["queue_wait_s"]
    assert waits["n"] == JOBS and 0 <= waits["p50"] <= waits["p95"]
    busy = fleet["gpu_busy"]
    if busy is not None:  # None only when the queue never held a backlog at a dispatch
        assert 0 < busy["fraction"] <= 1.05 and busy["source"].startswith("engine call host time")
    compiles = fleet["compiles"]
    assert compiles["torch_compiles"]["during_stream"] == 0
    assert compiles["triton_compiles"]["boot"] is None  # no Triton on a CPU: said so, not a zero
    assert report["phases"]["batch1"]["batch_sizes"] == {"1": JOBS}
    assert "no-overlap" in report["phases"] or "no-overlap" in report["skipped"]
    assert "fleet/bare" in report["_markdown"] and "| fleet |" in report["_markdown"]


def test_prepare_only_writes_the_model_once_and_quantizes_once(tmp_path):
    cmd = [sys.executable, "bench/fleet.py", "--model", "tiny", "--device", "cpu", "--work-dir", str(tmp_path),
           "--prepare-only"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    steps = json.loads(first.stdout.strip().splitlines()[-1])
    assert steps["make_model"]["kept"] is False and "quantize_s" in steps
    models = tmp_path / "models"
    assert (models / "tiny-random" / "model_index.json").is_file()
    assert (models / "tiny-random-fp8" / "fp8_transformer.json").is_file()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = json.loads(again.stdout.strip().splitlines()[-1])
    assert steps["make_model"]["kept"] is True and steps["quantize"].startswith("kept")
