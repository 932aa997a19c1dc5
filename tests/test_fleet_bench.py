"""bench/fleet.py end to end on the CPU with the tiny model: the command the GPU run uses, at small scale.

It starts its own redis-server, a real worker per phase and real ``sdfleet submit`` calls, then the bare
engine in its own process; the report must hold every number the GPU run is read for.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

JOBS = 12  # enough for batches above 1 in every shape; each phase renders them all on the CPU


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
    data["_json"] = str(out)
    return data


def same_model(report: dict, work: Path) -> None:
    """The report's tiny model directory and its FP8 weights, copied into ``work``: the bench keeps them
    (``--work-dir`` holding a complete model), so a later call spends no time writing and quantizing them
    again. Writing them from nothing is the report's own call, and test_prepare_only checks both ways."""
    shutil.copytree(Path(report["_json"]).parent / "models", work / "models")


@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_every_job_through_the_fleet_and_the_same_images_as_the_bare_engine(report):
    fleet, bare = report["phases"]["fleet"], report["phases"]["bare"]
    assert fleet["succeeded"] == JOBS and fleet["failed"] == 0
    assert sum(size * n for size, n in ((int(s), n) for s, n in fleet["batch_sizes"].items())) == JOBS
    assert max(int(s) for s in fleet["batch_sizes"]) > 1  # one submit's jobs arrive together: batched
    assert bare["images"] == JOBS and bare["engine_runs"] == fleet["engine_runs"]
    assert bare["equality"]["compared"] == JOBS and bare["equality"]["max_pixel_diff"] <= 1
    # The check can fail: another job's image differs, and no image is flat.
    assert bare["equality"]["control_pairs"] > 0 and bare["equality"]["control_other_job_mean_abs_diff_min"] > 1
    assert bare["equality"]["image_std_min"] > 1
    assert fleet["images_per_s"] > 0 and bare["images_per_s"] > 0
    assert report["fleet_over_bare"] == round(fleet["images_per_s"] / bare["images_per_s"], 4)
    # The full-batch reference: the same jobs, each shape's in batches of max_batch (only the last short).
    full = bare["full_batches"]
    assert full["images"] == JOBS and max(int(k) for k in full["batch_sizes"]) <= report["max_batch"]
    assert sum(int(k) * v for k, v in full["batch_sizes"].items()) == JOBS
    assert report["fleet_over_bare_full_batches"] == round(fleet["images_per_s"] / full["images_per_s"], 4)


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


# --- several workers on one Redis (--gpus N): on the CPU, N CPU workers ----------------------------------------

GPU_JOBS = 8


def run_bench(work, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/fleet.py", "--model", "tiny", "--device", "cpu", "--work-dir",
                           str(work), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(2500)
def test_two_workers_share_the_stream_and_no_job_runs_twice(report, tmp_path):
    same_model(report, tmp_path)
    out = tmp_path / "two.json"
    proc = run_bench(tmp_path, "--gpus", "2", "--jobs", str(GPU_JOBS), "--phases", "fleet,bare",
                     "--baseline-json", report["_json"], "--out-json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    fleet, bare = data["phases"]["fleet"], data["phases"]["bare"]
    assert data["gpus"] == fleet["gpus"] == 2
    assert fleet["succeeded"] == fleet["jobs"] == 2 * GPU_JOBS and fleet["failed"] == 0
    workers = fleet["per_worker"]
    assert [w["worker_id"] for w in workers] == ["fleet-bench-fleet-w0", "fleet-bench-fleet-w1"]
    assert all(w["images"] > 0 and w["images_per_s"] > 0 for w in workers)
    assert sum(w["images"] for w in workers) == 2 * GPU_JOBS
    for w in workers:
        assert sum(int(s) * n for s, n in w["batch_sizes"].items()) == w["images"]
        assert w["gpu_busy"] is None or 0 < w["gpu_busy"] <= 1.05
    busy = fleet["gpu_busy"]
    assert len(busy["per_gpu"]) == 2
    if all(b is not None for b in busy["per_gpu"]):
        assert busy["fraction"] == min(busy["per_gpu"])
    checks = fleet["checks"]
    assert checks["ok"] is True and checks["objects"] == 2 * 2 * GPU_JOBS
    assert checks["batch_counts"]["succeeded"] == 2 * GPU_JOBS
    # The bare engine replays the first worker's runs, and the fleet/bare ratio is that worker's.
    assert bare["images"] == workers[0]["images"] == bare["equality"]["compared"]
    assert bare["equality"]["max_pixel_diff"] <= 1
    assert data["fleet_over_bare"] == round(workers[0]["images_per_s"] / bare["images_per_s"], 4)
    one = report["phases"]["fleet"]["images_per_s"]
    scaled = data["scaling"]["fleet"]
    assert scaled["one_gpu_images_per_s"] == one and scaled["one_gpu_from"] == report["_json"]
    assert scaled["efficiency"] == round(fleet["images_per_s"] / (2 * one), 4)
    md = out.with_suffix(".md").read_text()
    assert "| fleet-bench-fleet-w1 |" in md and "no job on two GPUs: **yes**" in md and "efficiency" in md


@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_gpus_compare_runs_one_and_two_workers_in_one_invocation(report, tmp_path):
    same_model(report, tmp_path)
    out = tmp_path / "compare.json"
    proc = run_bench(tmp_path, "--gpus-compare", "1,2", "--jobs", "6", "--phases", "fleet", "--out-json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    one, two = data["phases"]["fleet"], data["phases"]["fleet-x2"]
    assert (one["gpus"], one["succeeded"], two["gpus"], two["succeeded"]) == (1, 6, 2, 12)
    assert "per_worker" not in one and len(two["per_worker"]) == 2 and two["checks"]["ok"] is True
    s = data["scaling"]["fleet-x2"]
    assert s["efficiency"] == round(two["images_per_s"] / (2 * one["images_per_s"]), 4)
    assert s["one_gpu_from"].startswith("the fleet phase of this invocation")


@pytest.mark.parametrize("args, said", [
    (["--gpus", "0"], "--gpus 0"),
    (["--gpus-compare", "2,4"], "--gpus-compare"),
    (["--gpus", "2", "--gpus-compare", "1,2"], "leave --gpus at 1"),
    (["--gpus", "2", "--baseline-json", "no-such-file.json"], "--baseline-json no-such-file.json"),
])
def test_bad_gpu_flags_exit_2_naming_the_flag(tmp_path, args, said):
    proc = run_bench(tmp_path, *args, timeout=120)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "redis").exists()  # refused before anything started


def test_no_job_twice_names_each_kind_of_duplicate(tmp_path):
    from bench.fleet_gpus import no_job_twice
    from sdfleet.state import JobRecord

    def rec(cid: str, worker: str, run: str, attempts: int = 1, status: str = "succeeded") -> JobRecord:
        return JobRecord(f"id-{cid}", "b1", cid, status, {},
                         {"worker": worker, "run": run, "attempts": str(attempts), "status": status})

    records = {"b1": {"a": rec("a", "w0", "w0:1"), "b": rec("b", "w1", "w1:1", attempts=2),
                      "c": rec("c", "w1", "w1:1"), "d": rec("d", "w0", "w0:1", status="failed")}}
    folder = tmp_path / "b1"
    folder.mkdir()
    for cid in "abcd":
        (folder / f"{cid}.png").write_bytes(b"")
        if cid != "c":
            (folder / f"{cid}.json").write_text("{}")
    (folder / ".tmp-c.json").write_text("")
    workers = [{"worker_id": "w0", "runs": [{"run": "w0:1", "jobs": ["id-a", "id-b", "id-d"]}]},
               {"worker_id": "w1", "runs": [{"run": "w1:1", "jobs": ["id-b", "id-c"]}]}]
    jobs = [{"custom_id": c} for c in "abcde"]
    counts = {"b1": {"succeeded": 3, "failed": 1}}
    got = no_job_twice(jobs, records, counts, tmp_path, workers)
    assert got["ok"] is False
    assert got["missing_records"] == ["e"] and got["not_succeeded"] == ["d"]
    assert got["started_more_than_once"] == ["b"] and got["without_two_objects"] == ["c"]
    assert got["tmp_files"] == ["b1/.tmp-c.json"] and got["in_two_workers"] == ["b"]
    assert got["not_once_in_timelines"] == ["b"] and got["record_not_timeline_owner"] == ["b"]
    clean = {"b1": {c: r for c, r in records["b1"].items() if c == "a"}}
    ok = no_job_twice([{"custom_id": "a"}], clean, {"b1": {"succeeded": 1}}, tmp_path / "b1" / "..",
                      [{"worker_id": "w0", "runs": [{"run": "w0:1", "jobs": ["id-a"]}]}])
    assert ok["stray_objects"] == ["b1/b", "b1/c", "b1/d"] and ok["ok"] is False
