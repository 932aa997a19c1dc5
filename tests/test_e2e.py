"""The whole fleet with real processes: CLI, Redis, `sdfleet worker` processes, file and S3 storage."""

from __future__ import annotations

import io
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdfleet.queue import GENERATE_TASK, make_app
from sdfleet.settings import Settings
from tests.conftest import run_cli


def jsonl(tmp_path: Path, rows: list[dict], name: str = "jobs.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return p


def manifest(env, batch: str) -> list[dict]:
    res = run_cli(["results", batch], env)
    assert res.returncode == 0, res.stderr
    return [json.loads(x) for x in res.stdout.splitlines()]


def test_full_cli_flow_with_batching_by_key(tmp_path, env, r, start_worker):
    w = start_worker("--max-batch", "3", "--max-wait-ms", "300")
    rows = [{"prompt": f"p{i}", "custom_id": f"c{i}", "seed": i, "steps": 2, "width": 256,
             "height": 256 if i % 2 else 320} for i in range(8)]
    f = jsonl(tmp_path, rows)
    res = run_cli(["submit", str(f), "--batch", "flow", "--wait"], env, timeout=300)
    assert res.returncode == 0, res.stderr + w.log()[-3000:]
    assert res.stdout.strip() == "flow"
    st = json.loads(run_cli(["status", "flow", "--json"], env).stdout)
    assert st["complete"] and st["counts"]["succeeded"] == 8 and st["completed_at"]
    assert run_cli(["wait", "flow"], env).returncode == 0
    rows_out = manifest(env, "flow")
    assert sorted(x["custom_id"] for x in rows_out) == [f"c{i}" for i in range(8)]
    runs: dict[str, set] = defaultdict(set)
    sizes: dict[str, int] = defaultdict(int)
    for x in rows_out:
        assert x["status"] == "succeeded" and x["error"] is None
        png = Path(x["url"][len("file://"):])
        assert png.is_file() and png.name == f"{x['custom_id']}.png"
        img = Image.open(png)
        assert img.size == (x["width"], x["height"])
        side = json.loads(png.with_suffix(".json").read_text())
        assert side["seed"] == x["seed"] and side["parameters"]["prompt"] == f"p{x['seed']}"
        assert side["worker"] == w.worker_id and side["engine"]["precision"] == "fp32"
        assert {"encode_s", "denoise_s", "decode_s", "upload_s"} <= set(side["timings"])
        runs[side["engine_run"]].add((x["width"], x["height"]))
        sizes[side["engine_run"]] += 1
    assert all(len(keys) == 1 for keys in runs.values()), f"a run mixed keys: {runs}"
    assert max(sizes.values()) > 1 and max(sizes.values()) <= 3, sizes


def test_s3_storage_over_http(tmp_path, s3, r, start_worker):
    env, bucket, client = s3
    start_worker("--max-batch", "4", env_extra=env)
    f = jsonl(tmp_path, [{"prompt": f"p{i}", "custom_id": f"s{i}", "steps": 2, "width": 256, "height": 256}
                         for i in range(3)])
    res = run_cli(["submit", str(f), "--batch", "s3b", "--out", f"s3://{bucket}/run1", "--wait"], env, timeout=300)
    assert res.returncode == 0, res.stderr
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [f"run1/s3b/s{i}{ext}" for i in range(3) for ext in (".json", ".png")]
    body = client.get_object(Bucket=bucket, Key="run1/s3b/s0.png")["Body"].read()
    assert Image.open(io.BytesIO(body)).size == (256, 256)
    assert all(x["url"].startswith(f"s3://{bucket}/run1/s3b/") for x in manifest(env, "s3b"))


def _pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(row["url"][len("file://"):]), dtype=np.int16)


def test_image_depends_only_on_its_own_job(tmp_path, env, r, start_worker):
    start_worker("--max-batch", "4", "--max-wait-ms", "1500")
    base = {"prompt": "a lighthouse", "seed": 1234, "steps": 3, "width": 256, "height": 256}
    alone = jsonl(tmp_path, [{**base, "custom_id": "alone"}], "alone.jsonl")
    assert run_cli(["submit", str(alone), "--batch", "solo", "--wait"], env, timeout=300).returncode == 0
    crowd = jsonl(tmp_path, [{**base, "prompt": "a much longer and different prompt about cats", "seed": 1,
                              "custom_id": "x1"},
                             {**base, "custom_id": "same"},
                             {**base, "prompt": "b", "seed": 99, "negative_prompt": "blur", "custom_id": "x2"}],
                  "crowd.jsonl")
    assert run_cli(["submit", str(crowd), "--batch", "crowd", "--wait"], env, timeout=300).returncode == 0
    a = [x for x in manifest(env, "solo")][0]
    rows = {x["custom_id"]: x for x in manifest(env, "crowd")}
    side = json.loads(Path(rows["same"]["url"][len("file://"):]).with_suffix(".json").read_text())
    assert side["timings"]["batch_size"] == 3, "the three jobs must have shared one engine run"
    diff = np.abs(_pixels(a) - _pixels(rows["same"]))
    assert diff.max() <= 2, f"same job, different batch: max pixel difference {diff.max()}"
    assert np.abs(_pixels(a) - _pixels(rows["x1"])).mean() > 5, "different seeds must give different images"


def test_malformed_messages_fail_only_their_job(tmp_path, env, r, start_worker):
    f = jsonl(tmp_path, [{"prompt": "victim", "custom_id": "v", "model": "null", "width": 256, "height": 256}])
    assert run_cli(["submit", str(f), "--batch", "mal"], env).returncode == 0
    victim = r.hget("sdfleet:batch:mal:custom", "v")
    # The real message is taken off the queue first, so only the forged ones reach the worker for that id.
    real = r.lpop("sdfleet.gen.null")
    assert real
    app = make_app(Settings(redis_url=env["REDIS_URL"]))
    app.send_task(GENERATE_TASK, kwargs={"job_id": victim, "batch_id": "mal", "spec": {"prompt": "x", "width": 7}},
                  queue="sdfleet.gen.null")
    app.send_task(GENERATE_TASK, kwargs={"job_id": "nope", "batch_id": "mal", "spec": {"prompt": "x", "model": "null"}},
                  queue="sdfleet.gen.null")
    # A forged message for a model this worker does not serve is refused, never run.
    app.send_task(GENERATE_TASK, kwargs={"job_id": victim, "batch_id": "mal", "spec": {"prompt": "x", "model": "tiny"}},
                  queue="sdfleet.gen.null")
    app.send_task(GENERATE_TASK, args=("garbage",), queue="sdfleet.gen.null")
    app.send_task("some.other.task", kwargs={}, queue="sdfleet.gen.null")
    r.lpush("sdfleet.gen.null", json.dumps({"body": "!!!", "headers": {"task": GENERATE_TASK, "id": "zz"},
                                            "content-type": "application/json", "content-encoding": "utf-8",
                                            "properties": {"delivery_tag": "t1", "body_encoding": "base64",
                                                           "delivery_info": {"exchange": "", "routing_key": "x"}}}))
    w = start_worker("--max-batch", "4", "--max-wait-ms", "50", model="null")
    deadline = time.time() + 30
    while r.hget(f"sdfleet:job:{victim}", "status") != "failed" and time.time() < deadline:
        time.sleep(0.1)
    rec = r.hgetall(f"sdfleet:job:{victim}")
    assert rec["status"] == "failed" and "malformed message" in rec["error"] and "width" in rec["error"]
    # The worker keeps running: a normal job afterwards succeeds.
    g = jsonl(tmp_path, [{"prompt": "after", "model": "null", "width": 256, "height": 256}], "after.jsonl")
    res = run_cli(["submit", str(g), "--batch", "after", "--wait"], env, timeout=60)
    assert res.returncode == 0, w.log()[-3000:]
    assert w.proc.poll() is None
    log = w.log()
    assert "malformed message" in log and "message names no known job" in log
    assert "message for another model refused" in log


def test_a_non_json_item_on_the_queue_costs_one_restart_and_nothing_else(tmp_path, env, r, start_worker):
    """kombu's Redis transport decodes what it pops before any public hook sees it, so an item that is not JSON
    (pushed by hand) ends the worker: it drains, exits non-zero for its supervisor to restart it, and the item
    is gone. Nothing else is lost: a job queued behind it runs on the next worker."""
    f = jsonl(tmp_path, [{"prompt": "behind", "custom_id": "b", "model": "null", "width": 256, "height": 256}])
    assert run_cli(["submit", str(f), "--batch", "junk"], env).returncode == 0
    r.rpush("sdfleet.gen.null", "not even json")  # next in line
    w = start_worker(model="null", wait=False)
    assert w.proc.wait(60) != 0
    assert "Unrecoverable error" in w.log()
    assert b"not even json" not in (r.lrange("sdfleet.gen.null", 0, -1) or [])
    start_worker(model="null")
    res = run_cli(["wait", "junk", "--timeout", "60"], env, timeout=90)
    assert res.returncode == 0, res.stderr


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc; fields 14 and 15 of its stat line)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_worker_neither_spins_nor_polls_and_starts_new_work_at_once(tmp_path, env, r, start_worker):
    if not Path("/proc/self/stat").exists():
        pytest.skip("reads CPU times from /proc (Linux)")
    w = start_worker("--max-batch", "1", model="null")
    time.sleep(1.0)
    cpu0, t0 = _cpu_seconds(w.proc.pid), time.monotonic()
    time.sleep(3.0)
    idle = (_cpu_seconds(w.proc.pid) - cpu0) / (time.monotonic() - t0)
    assert idle < 0.05, f"an idle worker used {idle:.0%} of a core"
    for i in range(3):  # each arrives at an idle worker, whose queue watch must wake it
        f = jsonl(tmp_path, [{"prompt": f"wake {i}", "model": "null", "width": 256, "height": 256}], f"w{i}.jsonl")
        assert run_cli(["submit", str(f), "--batch", f"wake{i}", "--wait"], env, timeout=60).returncode == 0
        rec = r.hgetall(f"sdfleet:job:{r.lindex(f'sdfleet:batch:wake{i}:jobs', 0)}")
        waited = float(rec["running_at"]) - float(rec["queued_at"])
        assert waited < 0.1, f"a job waited {waited * 1000:.0f} ms for an idle worker"
        time.sleep(1.5)  # longer than the watch's timeout: the next job finds it waiting again


def test_cancelled_jobs_never_run(tmp_path, env, r, start_worker):
    f = jsonl(tmp_path, [{"prompt": f"p{i}", "model": "null", "width": 256, "height": 256} for i in range(5)])
    assert run_cli(["submit", str(f), "--batch", "cancelme"], env).returncode == 0
    assert run_cli(["cancel", "cancelme"], env).returncode == 0
    start_worker(model="null")
    g = jsonl(tmp_path, [{"prompt": "later", "model": "null", "width": 256, "height": 256}], "later.jsonl")
    assert run_cli(["submit", str(g), "--batch", "later", "--wait"], env, timeout=60).returncode == 0
    rows = manifest(env, "cancelme")
    assert [x["status"] for x in rows] == ["cancelled"] * 5 and all(x["url"] is None for x in rows)
    assert not (Path(env["SDFLEET_OUT"][len("file://"):]) / "cancelme").exists()
    assert r.llen("sdfleet.gen.null") == 0


def test_resubmitting_a_finished_batch_skips_done_jobs(tmp_path, env, r, start_worker):
    start_worker(model="null")
    f = jsonl(tmp_path, [{"prompt": f"p{i}", "model": "null", "width": 256, "height": 256} for i in range(4)])
    assert run_cli(["submit", str(f), "--batch", "rs", "--wait"], env, timeout=60).returncode == 0
    res = run_cli(["submit", str(f), "--batch", "rs", "--wait"], env, timeout=60)
    assert res.returncode == 0 and "0 enqueued, 4 already done" in res.stderr


def test_a_local_model_directory_loads_through_the_same_path(tmp_path, env, r, start_worker, cache_dir):
    """--model PATH (a diffusers SD3 directory, here the cached tiny one): its queue is named after the folder."""
    import os
    import shutil

    from worker.engine.models import tiny_model_dir

    os.environ["SDFLEET_CACHE_DIR"] = str(cache_dir)
    local = tmp_path / "my-sd3"
    shutil.copytree(tiny_model_dir(), local)
    start_worker("--max-batch", "2", model=str(local))
    f = jsonl(tmp_path, [{"prompt": "local", "model": "my-sd3", "steps": 2, "width": 256, "height": 256,
                          "custom_id": "l0"}])
    res = run_cli(["submit", str(f), "--batch", "local", "--wait"], env, timeout=300)
    assert res.returncode == 0, res.stderr
    row = manifest(env, "local")[0]
    side = json.loads(Path(row["url"][len("file://"):]).with_suffix(".json").read_text())
    assert side["engine"]["model"] == "my-sd3"
    res = run_cli(["worker", "--model", str(tmp_path / "nope")], env)
    assert res.returncode == 1 and "not 'tiny' and not a diffusers model directory" in res.stderr
