"""sdfleet.metrics: every role's /metrics served over HTTP and parsed with prometheus-client's parser."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sdfleet.metrics import SchedulerMetrics, WebhookMetrics, WorkerMetrics, resolve_gpu_uuid, serve


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, for every sample of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    hits = [v for (n, ls), v in parsed.items() if n == name and all((k, labels[k]) in ls for k in labels)]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples"
    return hits[0]


class FakeNvml:
    """Stands in for pynvml: this machine has no GPU (the device-machine run covers the real library)."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        self.asked: list[str] = []

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:  # noqa: N802 (pynvml's names)
        self.asked.append(uuid)
        return uuid

    def nvmlDeviceGetUtilizationRates(self, h: str) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h: str) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=30 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetTemperature(self, h: str, sensor: int) -> int:  # noqa: N802
        return 61

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:  # noqa: N802
        return 512_000


def test_worker_metrics_over_http() -> None:
    now = [1000.0]
    nvml = FakeNvml()
    m = WorkerMetrics("w1", "tiny", "GPU-abc", nvml=nvml, clock=lambda: now[0])
    port = m.serve(0)
    m.set_state("busy")
    m.set_queue_depth(7)
    m.batch_ran(4, 2.0, 8, 4)
    m.batch_ran(2, 1.0, 8, 2)
    for outcome in ("succeeded", "succeeded", "failed"):
        m.job_finished(outcome)
    p = samples(scrape(port))
    assert value(p, "sdfleet_jobs_total", outcome="succeeded", worker="w1", pool="tiny") == 2
    assert value(p, "sdfleet_jobs_total", outcome="failed") == 1
    assert value(p, "sdfleet_jobs_total", outcome="requeued") == 0
    assert value(p, "sdfleet_batch_size_count") == 2 and value(p, "sdfleet_batch_size_sum") == 6
    assert value(p, "sdfleet_batch_size_bucket", le="2.0") == 1 and value(p, "sdfleet_batch_size_bucket", le="4.0") == 2
    assert value(p, "sdfleet_step_seconds_sum") == pytest.approx(2.0 / 8 + 1.0 / 8)
    assert value(p, "sdfleet_image_seconds_sum") == pytest.approx(0.5 + 0.5)
    assert value(p, "sdfleet_images_total") == 6
    assert value(p, "sdfleet_images_per_second") == pytest.approx(6 / 60)
    assert value(p, "sdfleet_worker_queue_depth") == 7
    assert value(p, "sdfleet_worker_state", sdfleet_worker_state="busy") == 1
    assert value(p, "sdfleet_worker_state", sdfleet_worker_state="idle") == 0
    assert value(p, "sdfleet_gpu_utilization_ratio", gpu="GPU-abc") == pytest.approx(0.87)
    assert value(p, "sdfleet_gpu_memory_used_bytes") == 30 * 2**30
    assert value(p, "sdfleet_gpu_memory_total_bytes") == 80 * 2**30
    assert value(p, "sdfleet_gpu_temperature_celsius") == 61
    assert value(p, "sdfleet_gpu_power_watts") == 512
    assert nvml.asked == ["GPU-abc"], "NVML must be asked about this worker's GPU, by UUID"
    now[0] += 61  # the rate covers the last minute only
    assert value(samples(scrape(port)), "sdfleet_images_per_second") == 0
    with pytest.raises(ValueError, match="expected one of"):
        m.set_state("sleeping")
    m.server.close()


def test_cpu_worker_has_no_gpu_samples() -> None:
    m = WorkerMetrics("w2", "tiny", "")
    names = {n for n, _ in samples(m.render())}
    assert "sdfleet_jobs_total" in names and not any(n.startswith("sdfleet_gpu_") for n in names)


def test_a_lost_gpu_drops_its_samples_not_the_scrape() -> None:
    class Lost(FakeNvml):
        def nvmlDeviceGetUtilizationRates(self, h: str) -> SimpleNamespace:  # noqa: N802
            raise RuntimeError("GPU is lost")

    m = WorkerMetrics("w3", "tiny", "GPU-x", nvml=Lost())
    names = {n for n, _ in samples(m.render())}
    assert "sdfleet_jobs_total" in names and "sdfleet_gpu_power_watts" not in names
    assert m.gpu.errors == 1


def test_resolve_gpu_uuid_follows_cuda_visible_devices() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb"}
    assert resolve_gpu_uuid("cuda:1", env) == "GPU-bbb"
    assert resolve_gpu_uuid("cuda:0", env) == "GPU-aaa"
    assert resolve_gpu_uuid("cpu", env) == ""
    assert resolve_gpu_uuid("cuda:5", env) == "", "past the visible list there is no such device"


def test_webhook_metrics() -> None:
    dead = [3]
    m = WebhookMetrics(dead_letters=lambda: dead[0])
    port = m.serve(0)
    m.delivery("delivered")
    m.delivery("delivered")
    m.delivery("dead")
    p = samples(scrape(port))
    assert value(p, "sdfleet_webhook_deliveries_total", outcome="delivered") == 2
    assert value(p, "sdfleet_webhook_deliveries_total", outcome="dead") == 1
    assert value(p, "sdfleet_webhook_deliveries_total", outcome="retry") == 0
    assert value(p, "sdfleet_webhook_dead_letters") == 3
    m.server.close()


def test_scheduler_metrics_and_json_routes() -> None:
    m = SchedulerMetrics()
    m.observe("tiny", queued=12, in_flight=4, backlog_s=30.5, desired=2, actual=1, busy=1, stalled=0)
    m.scale_events.labels("tiny", "up").inc()
    server = serve(m.registry, 0, json_routes={"/scale": lambda rest: {"pool": rest, "desired": 2} if rest else None})
    p = samples(scrape(server.port))
    assert value(p, "sdfleet_pool_queue_depth", pool="tiny") == 12
    assert value(p, "sdfleet_pool_backlog_gpu_seconds", pool="tiny") == 30.5
    assert value(p, "sdfleet_pool_desired_workers", pool="tiny") == 2
    assert value(p, "sdfleet_pool_actual_workers", pool="tiny") == 1
    assert value(p, "sdfleet_pool_scale_events_total", pool="tiny", direction="up") == 1
    assert json.loads(scrape(server.port, "/scale/tiny")) == {"pool": "tiny", "desired": 2}
    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(server.port, "/scale")
    assert err.value.code == 404
    server.close()


# --- the real processes -------------------------------------------------------------------------------

def _wait_scrape(port: int, ok, timeout: float = 60.0) -> dict:
    import time

    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            last = samples(scrape(port))
            if ok(last):
                return last
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/metrics on {port} never satisfied the check; last: {sorted(last)[:40]}")


def test_a_worker_process_serves_its_metrics(tmp_path, env, start_worker) -> None:
    from sdfleet.redisconn import free_port
    from tests.conftest import run_cli

    port = free_port()
    w = start_worker("--metrics-port", str(port), "--max-batch", "4", model="null")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": f"p{i}", "model": "null", "width": 256, "height": 256,
                                        "steps": 3}) + "\n" for i in range(12)))
    assert run_cli(["submit", str(jobs), "--batch", "m", "--wait"], env, timeout=120).returncode == 0, w.log()[-3000:]
    p = _wait_scrape(port, lambda s: any(n == "sdfleet_jobs_total" and ("outcome", "succeeded") in ls and v == 12
                                         for (n, ls), v in s.items()))
    assert value(p, "sdfleet_jobs_total", outcome="succeeded", worker=w.worker_id, pool="null") == 12
    assert value(p, "sdfleet_images_total", worker=w.worker_id) == 12
    assert value(p, "sdfleet_batch_size_sum", worker=w.worker_id) == 12
    assert value(p, "sdfleet_batch_size_count", worker=w.worker_id) >= 3, "at most 4 jobs per engine run"
    assert value(p, "sdfleet_step_seconds_count", worker=w.worker_id) >= 3
    assert value(p, "sdfleet_worker_state", sdfleet_worker_state="booting") == 0, "booted"
    assert not any(n.startswith("sdfleet_gpu_") for n, _ in p), "a CPU worker has no GPU samples"


def test_the_webhook_worker_serves_its_metrics(env, r) -> None:
    import subprocess
    import sys

    from sdfleet import keys
    from sdfleet.redisconn import free_port
    from tests.conftest import ROOT

    port = free_port()
    r.rpush(keys.WEBHOOK_DEAD, json.dumps({"id": "msg_1"}), json.dumps({"id": "msg_2"}))
    proc = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", "webhook-worker", "--metrics-port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        p = _wait_scrape(port, lambda s: ("sdfleet_webhook_dead_letters", ()) in s)
        assert p[("sdfleet_webhook_dead_letters", ())] == 2
        assert value(p, "sdfleet_webhook_deliveries_total", outcome="delivered") == 0
    finally:
        proc.terminate()
        proc.wait(60)
