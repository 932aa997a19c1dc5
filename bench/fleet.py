"""The whole fleet on one device: a real worker process fed through Redis, against the bare engine.

    python bench/fleet.py --model medium --device cuda:0 --jobs 300       # on the GPU machine
    python bench/fleet.py --model tiny --device cpu --jobs 24              # anywhere, a few minutes
    python bench/fleet.py --model medium --device cuda --gpus-compare 1,2 --jobs 60 --phases fleet  # 2 GPUs

``--gpus N``: every phase runs N workers (``--device cuda:0`` .. ``cuda:N-1``; with ``--device cpu``, N CPU
workers) on the one redis-server, fed N x ``--jobs`` jobs; ``--gpus-compare 1,N`` runs the fleet phase with
each count (``fleet``, ``fleet-xN``). The report then adds per-worker figures, each GPU's busy fraction, the
checks that no job ran on two GPUs and the scaling efficiency (``bench/fleet_gpus.py``).

In order, in one invocation: a private redis-server (from PATH, or Debian's package extracted from ``.deb/``
by ``.deb/redis-on-device.sh`` where the machine has none); file:// storage on local disk; the model
directory written by ``sdfleet make-model`` (random weights, kept between calls in --work-dir);
``sdfleet quantize`` once; then per phase a real ``sdfleet worker`` (FP8 and CUDA graphs captured at boot
for the mix's shapes on a GPU) fed by ``sdfleet submit`` with a stream of jobs that arrives faster than the
worker drains it; finally the same batches, with the same compositions, through the bare engine in this
process, and each fleet image compared with the bare engine's.

Phases: ``fleet`` (the worker as deployed), ``batch1`` (--max-batch 1: what batching is worth) and
``no-overlap`` (the device-to-host copy and post-processing not overlapped with the next batch: the
worker's --no-overlap), then ``bare``. --phases picks some (one model per 10-minute device call).

GPU busy fraction: the engine's CUDA events. Each run's ``gpu_s`` is the main stream's span from the start
of denoising to the end of the VAE decode; their sum over the runs dispatched while jobs were waiting,
divided by the wall time between the first and the last such dispatch. Gaps between runs (a late host, text
encoding not hidden behind the previous run, storage back-pressure stalling the engine thread) fall
outside every span, so they count as idle; the spans of one stream cannot overlap, so nothing counts
twice. NVML's utilization, sampled at 20 Hz over the same window, is reported beside it as a cross-check.

Writes JSON (--out-json, default bench/results/fleet-<model>-<device>-<date>.json) and a markdown summary
beside it (.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from typing import Any

from bench import fleet_gpus

ROOT = Path(__file__).resolve().parents[1]
#: the issue's mix for SD3.5 (WxH:STEPS:WEIGHT); the tiny model gets the same three keys' shapes scaled down
MIXES = {"sd35": "1024x1024:28:4,768x1344:28:3,512x512:20:3", "tiny": "384x384:4:4,256x448:4:3,256x256:3:3"}
PHASES = ("fleet", "batch1", "no-overlap", "bare")
PROMPTS = ("a lighthouse on a cliff at dusk", "a red fox in fresh snow", "an astronaut riding a horse",
           "a bowl of ramen, studio light", "a watercolor of a harbor town", "a macro photo of a beetle")
TIMELINE_KEYS = ("t_dispatch", "t_engine_start", "t_engine_end", "t_d2h_done", "t_encoded", "t_stored", "t_acked")


# --- setup ------------------------------------------------------------------------------------------

def start_redis(work: Path):
    """A private redis-server: from PATH, else Debian's package carried in ``.deb/`` (extracted to /tmp)."""
    from sdfleet.redisconn import PrivateRedis

    if shutil.which("redis-server") is None and (ROOT / ".deb" / "redis-on-device.sh").is_file():
        out = subprocess.run(["bash", "-c", 'source .deb/redis-on-device.sh .deb >/dev/null && '
                              'printf "%s\\n%s\\n" "$PATH" "$LD_LIBRARY_PATH"'], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        os.environ["PATH"], os.environ["LD_LIBRARY_PATH"] = out[0], out[1] if len(out) > 1 else ""
    (work / "redis").mkdir(parents=True, exist_ok=True)
    return PrivateRedis(data_dir=str(work / "redis"))


def sdfleet(args: list[str], env: dict[str, str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdfleet.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


def checked(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def parse_mix(text: str) -> list[tuple[int, int, int, int]]:
    mix = []
    for part in text.split(","):
        size, steps, weight = part.split(":")
        w, h = (int(x) for x in size.lower().split("x"))
        mix.append((w, h, int(steps), int(weight)))
    return mix


def make_jobs(n: int, mix: list[tuple[int, int, int, int]], model: str) -> list[dict[str, Any]]:
    """``n`` jobs interleaving the mix's keys by weight (so every batch window sees all three), varied seeds."""
    order = [i for i, (_, _, _, wt) in enumerate(mix) for _ in range(wt)]
    jobs = []
    for j in range(n):
        w, h, steps, _ = mix[order[(j * 7) % len(order)]]
        jobs.append({"prompt": f"{PROMPTS[j % len(PROMPTS)]}, variation {j}", "width": w, "height": h,
                     "steps": steps, "guidance_scale": 4.5, "seed": 1000 + 7919 * j % 100003, "model": model,
                     "custom_id": f"j{j:05d}"})
    return jobs


def worker_flags() -> str:
    return sdfleet(["worker", "--help"], {**os.environ}, timeout=120).stdout


# --- sampling the device ----------------------------------------------------------------------------

class NvmlSampler(threading.Thread):
    """GPU utilization and the worker's GPU memory at 20 Hz (nothing on a CPU or without NVML)."""

    def __init__(self, device: str):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int, int, int]] = []  # (t, util %, device MiB used, pid -> MiB)
        self.pid: int | None = None
        self.stop_event = threading.Event()
        self.handle = None
        if device.startswith("cuda"):
            try:
                import pynvml

                pynvml.nvmlInit()
                index = int(device.split(":")[1]) if ":" in device else 0
                self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(index), pynvml
            except Exception:
                self.handle = None

    def run(self) -> None:
        while self.handle is not None and not self.stop_event.wait(0.05):
            try:
                util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
                used = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used // 2**20
                mine = sum((p.usedGpuMemory or 0) for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                           if p.pid == self.pid) // 2**20
                self.samples.append((time.time(), util, used, mine))
            except Exception:
                pass

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not self.samples:
            return {"nvml": None}
        return {"nvml_util_mean": round(sum(s[1] for s in inside) / len(inside) / 100, 4) if inside else None,
                "nvml_samples": len(inside),
                "peak_device_mem_mib": max(s[2] for s in self.samples),
                "peak_worker_mem_mib": max(s[3] for s in self.samples) or None}


# --- one fleet phase --------------------------------------------------------------------------------

def run_phase(name: str, a: argparse.Namespace, ctx: dict[str, Any], max_batch: int,
              extra: list[str], gpus: int = 1) -> dict[str, Any]:
    """One phase: ``gpus`` workers (``--device cuda:0`` .. ``cuda:N-1``, or N CPU workers) on one Redis, fed
    ``gpus`` x the phase's jobs, so each worker runs about as long as one worker does alone."""
    import redis

    from sdfleet import keys

    env, url = ctx["env"], ctx["redis_url"]
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    out_dir = ctx["work"] / f"out-{name}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cuda = a.device.startswith("cuda")
    workers = []
    for i in range(gpus):
        # One worker keeps the one-GPU run's names; several get an index each.
        tag = name if gpus == 1 else f"{name}-w{i}"
        device = a.device if gpus == 1 or not cuda else f"cuda:{i}"
        timeline = ctx["work"] / f"timeline-{tag}.jsonl"
        timeline.unlink(missing_ok=True)
        worker_id = f"fleet-bench-{tag}"
        args = ["worker", "--model", str(ctx["model_dir"]), "--device", device, "--worker-id", worker_id,
                "--max-batch", str(max_batch), *extra]
        for w, h, steps, _ in ctx["mix"]:
            args += ["--warmup", f"{w}x{h}:{steps}"]
        if cuda:
            args += ["--precision", "fp8", "--fp8-weights", str(ctx["fp8_dir"])]
        else:
            args += ["--precision", "fp32"]
        if ctx["has_timeline"]:
            args += ["--timeline", str(timeline)]
        workers.append({"tag": tag, "device": device, "worker_id": worker_id, "args": args, "timeline": timeline,
                        "log": ctx["work"] / f"worker-{tag}.log", "hb_key": keys.worker(worker_id),
                        # One worker: the sampler of the one-GPU runs (the worker's own memory too). Several:
                        # each GPU by the UUID its worker reports, since NVML's indices are not CUDA's.
                        "sampler": NvmlSampler(device) if gpus == 1 else fleet_gpus.ProbeSampler()})
    t_boot = time.time()
    for wk in workers:
        wk["proc"] = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", *wk["args"]], env=env, cwd=ROOT,
                                      stdout=open(wk["log"], "w"), stderr=subprocess.STDOUT)
        wk["sampler"].pid = wk["proc"].pid
        wk["sampler"].start()
    try:
        booting = list(workers)
        while booting:
            for wk in list(booting):
                if r.exists(wk["hb_key"]):
                    wk["boot_s"], wk["before"] = time.time() - t_boot, r.hgetall(wk["hb_key"])
                    if isinstance(wk["sampler"], fleet_gpus.ProbeSampler):
                        wk["sampler"].gpu_id = wk["before"].get("gpu_uuid") or None
                    booting.remove(wk)
                elif wk["proc"].poll() is not None or time.time() - t_boot > a.boot_timeout:
                    raise SystemExit(f"worker ({wk['tag']}) did not boot (rc={wk['proc'].poll()}):\n"
                                     f"{wk['log'].read_text()[-4000:]}")
            time.sleep(0.1)
        per = a.jobs if name == "fleet" else a.ablation_jobs or a.jobs
        jobs = make_jobs(per * gpus, ctx["mix"], ctx["model_name"])
        batches = submit_stream(jobs, a.chunks, out_dir, env, name, ctx["work"])
        t_wait = time.time()
        from producer.status import batch_status
        from sdfleet.redisconn import connect
        from sdfleet.state import JobStore

        store = JobStore(connect(url))
        done, t_progress = -1, time.time()
        while True:
            states = [batch_status(store, b) for b in batches.values()]
            if all(st["complete"] for st in states):
                break
            now_done = sum(st["counts"]["succeeded"] + st["counts"]["failed"] for st in states)
            if now_done != done:
                done, t_progress = now_done, time.time()
            for wk in workers:
                if wk["proc"].poll() is not None:
                    raise SystemExit(f"worker ({wk['tag']}) exited (rc={wk['proc'].returncode}):\n"
                                     f"{wk['log'].read_text()[-4000:]}")
            if time.time() - t_wait > a.stream_timeout or time.time() - t_progress > a.stall_timeout:
                raise SystemExit(f"phase {name}: {done} of {len(jobs)} jobs done after {time.time() - t_wait:.0f} s "
                                 f"(none for {time.time() - t_progress:.0f} s); worker logs: "
                                 f"{', '.join(str(wk['log']) for wk in workers)}")
            time.sleep(0.05)
        t_done = time.time()
        for wk in workers:
            wk["after"] = wk["before"]
        pending = list(workers)
        while pending and time.time() - t_done < 15:  # each worker's first heartbeat after the last job
            for wk in list(pending):
                hb = r.hgetall(wk["hb_key"])
                if float(hb.get("last_beat", 0)) > t_done:
                    wk["after"] = hb
                    pending.remove(wk)
            time.sleep(0.1)
        records = {b: {rec.custom_id: rec for rec in store.iter_batch_jobs(b)} for b in batches.values()}
        counts = {b: store.counts(b) for b in batches.values()}
    finally:
        for wk in workers:
            if wk["proc"].poll() is None:
                wk["proc"].send_signal(signal.SIGTERM)
        for wk in workers:
            try:
                wk["proc"].wait(120)
            except subprocess.TimeoutExpired:
                wk["proc"].kill()
                wk["proc"].wait(10)
            wk["sampler"].stop_event.set()
    for wk in workers:
        wk["runs"] = read_timeline(wk["timeline"]) if wk["timeline"].is_file() else []
        for x in wk["runs"]:
            x["worker"] = wk["worker_id"]
    if gpus == 1:
        wk = workers[0]
        res = summarize(name, jobs, batches, records, out_dir, wk["runs"], wk["sampler"], wk["before"], wk["after"])
        res.update(boot_s=round(wk["boot_s"], 2), worker_args=wk["args"][1:], worker_exit=wk["proc"].returncode,
                   timeline_source="worker --timeline" if wk["runs"] else "job records (the worker wrote no timeline)")
        return res
    return summarize_workers(name, jobs, batches, records, counts, out_dir, workers)


def summarize_workers(name: str, jobs: list[dict], batches: dict[str, str], records: dict,
                      counts: dict[str, dict[str, int]], out_dir: Path, workers: list[dict]) -> dict[str, Any]:
    """A phase of several workers: each worker summarized on its own jobs and timeline (its GPU's busy fraction
    and batch sizes), the totals over all of them, and the checks that no job ran on two GPUs."""
    all_runs = sorted((x for wk in workers for x in wk["runs"]),
                      key=lambda x: x.get("t_dispatch") or x.get("t_engine_start") or 0)
    recs = {cid: rec for per_batch in records.values() for cid, rec in per_batch.items()}
    parts, rows = [], []
    for wk in workers:
        mine = {jid for x in wk["runs"] for jid in x.get("jobs", [])}
        own = {b: {c: rec for c, rec in per.items() if rec.job_id in mine} for b, per in records.items()}
        own = {b: per for b, per in own.items() if per}
        if not own:
            raise SystemExit(f"phase {name}: worker {wk['worker_id']} ran no job (its log: {wk['log']}); with "
                             f"{len(workers)} workers give each enough jobs (--jobs) to share the stream")
        p = summarize(name, jobs, batches, own, out_dir, wk["runs"], wk["sampler"], wk["before"], wk["after"],
                      fleet_wide=(all_runs, recs))
        parts.append(p)
        rows.append(fleet_gpus.worker_row(p, wk))
    total = summarize(name, jobs, batches, records, out_dir, all_runs, fleet_gpus.ProbeSampler(), {}, {},
                      fleet_wide=(all_runs, recs))
    fleet_gpus.fleet_totals(total, parts)
    checks = fleet_gpus.no_job_twice(jobs, records, counts, out_dir, workers)
    total.update(gpus=len(workers), per_worker=rows, checks=checks,
                 boot_s=max(r["boot_s"] for r in rows), worker_args=[wk["args"][1:] for wk in workers],
                 worker_exit=[wk["proc"].returncode for wk in workers],
                 timeline_source="worker --timeline" if all(wk["runs"] for wk in workers) else "job records",
                 # The bare engine replays one GPU's share: the first worker's runs, on its GPU.
                 bare_replays=workers[0]["worker_id"], _runs=parts[0]["_runs"])
    return total


def submit_stream(jobs: list[dict], chunks: int, out_dir: Path, env: dict, name: str, work: Path) -> dict[str, str]:
    """Submit ``jobs`` in ``chunks`` back-to-back ``sdfleet submit`` calls; returns the batch ids."""
    per = -(-len(jobs) // max(1, chunks))
    batch_of: dict[str, str] = {}
    for k in range(0, len(jobs), per):
        part = jobs[k:k + per]
        f = work / f"jobs-{name}-{k}.jsonl"
        f.write_text("".join(json.dumps(j) + "\n" for j in part))
        proc = checked(sdfleet(["submit", str(f), "--batch", f"{name}-{k}", "--out", f"file://{out_dir}"], env),
                       "sdfleet submit")
        batch_id = proc.stdout.strip().splitlines()[0]
        batch_of.update({j["custom_id"]: batch_id for j in part})
    return {b: b for b in dict.fromkeys(batch_of.values())}


def read_timeline(path: Path) -> list[dict[str, Any]]:
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(runs, key=lambda x: x.get("t_dispatch") or x.get("t_engine_start") or 0)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summarize(name: str, jobs: list[dict], batches: dict[str, str], records: dict, out_dir: Path,
              runs: list[dict], sampler: NvmlSampler, before: dict, after: dict,
              fleet_wide: tuple[list[dict], dict] | None = None) -> dict[str, Any]:
    """One worker's phase. ``fleet_wide`` (every worker's runs and records, when several share the queue): the
    backlog at each of this worker's dispatches counts jobs waiting for any worker, not only its own."""
    by_id = {j["custom_id"]: j for j in jobs}
    recs = {cid: rec for per_batch in records.values() for cid, rec in per_batch.items()}
    side: dict[str, dict] = {}
    for cid, rec in recs.items():
        p = out_dir / rec.batch_id / f"{cid}.json"
        if p.is_file():
            side[cid] = json.loads(p.read_text())
    ok = [cid for cid, rec in recs.items() if rec.status == "succeeded"]
    job_of = {rec.job_id: cid for cid, rec in recs.items()}
    if not runs:  # no timeline: engine runs from the sidecars, dispatch times from the job records
        grouped: dict[str, list[str]] = {}
        for cid, sc in side.items():
            grouped.setdefault(sc.get("engine_run") or cid, []).append(cid)
        for run, cids in grouped.items():
            f = [recs[c].fields for c in cids]
            gpu = [side[c]["timings"].get("gpu_s") for c in cids]
            runs.append({"run": run, "size": len(cids), "jobs": [recs[c].job_id for c in cids],
                         "key": _key(by_id[cids[0]]),
                         "t_dispatch": min(float(x.get("running_at") or 0) for x in f),
                         "t_acked": max(float(x.get("succeeded_at") or 0) for x in f),
                         "gpu_s": sum(gpu) if all(g is not None for g in gpu) else None})
        runs.sort(key=lambda x: x["t_dispatch"])
    t_sub = min(float(rec.fields.get("queued_at") or 0) for rec in recs.values())
    t_first = runs[0].get("t_dispatch") or runs[0].get("t_engine_start")
    t_last_dispatch = runs[-1].get("t_dispatch") or runs[-1].get("t_engine_start")
    t_end = max(max(float(rec.fields.get("succeeded_at") or 0) for rec in recs.values()),
                max((x.get("t_acked") or 0) for x in runs))
    # Jobs waiting at each dispatch (submitted, not yet in the engine): the window holds only dispatches
    # made while more work waited, so the GPU had no reason to idle in it.
    all_runs, all_recs = fleet_wide or (runs, recs)
    dispatch_of = {}
    for x in all_runs:
        for jid in x.get("jobs", []):
            dispatch_of[jid] = x.get("t_dispatch") or x.get("t_engine_start")
    queued = {rec.job_id: float(rec.fields.get("queued_at") or 0) for rec in all_recs.values()}
    backlog = [sum(1 for jid, tq in queued.items() if tq <= (x.get("t_dispatch") or 0) < dispatch_of.get(jid, 0))
               for x in runs]
    window = [i for i in range(len(runs) - 1) if backlog[i] > 0]
    busy = None
    if window:
        # From the first dispatch made while work waited to the copy back of the last such run: every span
        # counted lies inside the window (a window ending at the next dispatch cut the last span short and
        # read over 100%). The run before the window, if any, may still hold the GPU at t0 and is not
        # counted, so the fraction can only err low.
        t0 = runs[window[0]].get("t_dispatch")
        t1 = runs[window[-1]].get("t_d2h_done") or runs[window[-1] + 1].get("t_dispatch")
        if all(runs[i].get("gpu_s") is not None for i in window):
            source, spans = "CUDA events (main stream, denoise start to decode end)", [runs[i]["gpu_s"] for i in window]
        elif all(runs[i].get("t_engine_start") and runs[i].get("t_engine_end") for i in window):
            # No CUDA events (CPU): the engine call's host time, which on a CPU is its compute time.
            source = "engine call host time (no CUDA events)"
            spans = [runs[i]["t_engine_end"] - runs[i]["t_engine_start"] for i in window]
        else:
            source, spans = None, None
        if spans is not None:
            busy = {"source": source, "busy_s": round(sum(spans), 3), "wall_s": round(t1 - t0, 3),
                    "fraction": round(sum(spans) / max(1e-9, t1 - t0), 4), "runs_in_window": len(window),
                    **sampler.window(t0, t1)}
    # Host time between one engine call's return and the next one's start, while jobs waited: the engine
    # thread's share of a gap (the GPU idles only once this outlasts the work already queued on it).
    gaps = [runs[i + 1]["t_engine_start"] - runs[i]["t_engine_end"] for i in window
            if runs[i + 1].get("t_engine_start") and runs[i].get("t_engine_end")]
    waits = [side[c]["timings"]["queue_wait_s"] for c in side if "queue_wait_s" in side[c].get("timings", {})]
    sizes = Counter(x.get("size") or len(x.get("jobs", [])) for x in runs)
    t_ref = t_sub
    table = []
    for i, x in enumerate(runs):
        row = {**({"worker": x["worker"]} if fleet_wide else {}),
               "run": x.get("run"), "key": x.get("key"), "size": x.get("size"), "backlog": backlog[i],
               "gpu_s": None if x.get("gpu_s") is None else round(x["gpu_s"], 4)}
        row.update({k: round(x[k] - t_ref, 4) for k in TIMELINE_KEYS if x.get(k)})
        table.append(row)
    # Off the critical path: the engine had started the next run before this one's PNGs were encoded.
    on_path = [i for i in range(len(runs) - 1) if backlog[i + 1] > 0 and runs[i].get("t_encoded")
               and (runs[i + 1].get("t_engine_start") or 0) > runs[i]["t_encoded"]]
    hb_mem = [int(after.get("gpu_mem_used_mib", 0) or 0), int(before.get("gpu_mem_used_mib", 0) or 0)]
    return {
        "phase": name, "jobs": len(jobs), "succeeded": len(ok), "failed": len(recs) - len(ok),
        "engine_runs": len(runs), "images_per_s": round(len(ok) / max(1e-9, t_end - t_first), 4),
        "images_per_s_from_submit": round(len(ok) / max(1e-9, t_end - t_sub), 4),
        "wall_s": round(t_end - t_first, 3), "submit_to_first_dispatch_s": round(t_first - t_sub, 3),
        "gpu_busy": busy, "host_gap_s": {"p50": _pct(gaps, 0.5), "p95": _pct(gaps, 0.95),
                                          "max": max(gaps) if gaps else None, "n": len(gaps)},
        "queue_wait_s": {"p50": _pct(waits, 0.5), "p95": _pct(waits, 0.95), "n": len(waits)},
        "batch_sizes": dict(sorted(sizes.items())), "last_dispatch_s": round(t_last_dispatch - t_sub, 3),
        "post_on_critical_path": None if not runs or not runs[0].get("t_encoded") else len(on_path),
        "compiles": counters(before, after), "heartbeat_peak_device_mem_mib": max(hb_mem) or None,
        "memory": sampler.window(0, float("inf")), "timeline": table,
        "_runs": [{"key": x.get("key"), "jobs": [job_of.get(j, j) for j in x.get("jobs", [])]} for x in runs],
        "_images": {cid: str(out_dir / recs[cid].batch_id / f"{cid}.png") for cid in ok},
    }


def _key(job: dict) -> str:
    return f"{job['width']}x{job['height']}:{job['steps']}"


COUNTERS = ("triton_compiles", "torch_compiles", "graph_captures", "graph_replays", "graph_eager_calls")


def counters(before: dict, after: dict) -> dict[str, Any]:
    """Compile counters from the worker's heartbeats (its engine's describe()): after boot, after the stream."""
    def val(d: dict, k: str):
        v = d.get(k)
        return None if v in (None, "None", "") else int(v)

    out = {k: {"boot": val(before, k), "after_stream": val(after, k)} for k in COUNTERS}
    for v in out.values():
        v["during_stream"] = (None if v["boot"] is None or v["after_stream"] is None
                              else v["after_stream"] - v["boot"])
    return out


# --- the bare engine --------------------------------------------------------------------------------

def run_bare(a: argparse.Namespace, ctx: dict[str, Any], fleet: dict[str, Any], jobs: list[dict]) -> dict[str, Any]:
    """The fleet phase's engine runs, same compositions and order, through DiffusersEngine back to back."""
    import numpy as np
    from PIL import Image

    from sdfleet.jobs import BatchKey
    from worker.engine.base import GenerationRequest
    from worker.engine.diffusers_engine import DiffusersEngine, EngineOptions

    cuda = a.device.startswith("cuda")
    t0 = time.time()
    # The worker's engine options, as its CLI builds them for this device (FP8 weights from the same file).
    engine = DiffusersEngine(EngineOptions(model=str(ctx["model_dir"]), device=a.device,
                                           precision="fp8" if cuda else "fp32",
                                           fp8_weights=str(ctx["fp8_dir"]) if cuda else None))
    engine.load()
    keys = {(w, h, s): BatchKey(engine.model_name, w, h, s, 4.5) for w, h, s, _ in ctx["mix"]}
    # As the worker warms up (worker/app.py): batch 1 and the full batch on a GPU.
    engine.warmup(list(keys.values()), batch_sizes=sorted({1, a.max_batch}) if cuda else [1])
    boot_s = time.time() - t0
    by_id = {j["custom_id"]: j for j in jobs}
    plan = []
    for x in fleet["_runs"]:
        specs = [by_id[c] for c in x["jobs"] if c in by_id]
        if specs:
            s0 = specs[0]
            plan.append((keys[(s0["width"], s0["height"], s0["steps"])],
                         [GenerationRequest(s["custom_id"], s["prompt"], "", s["seed"]) for s in specs]))
    # The best a user of the bare engine could do with the same jobs: each shape's jobs, in submission
    # order, in full batches of --max-batch (only each shape's last batch can be short).
    per_key: dict[BatchKey, list] = {}
    for s in jobs:
        per_key.setdefault(keys[(s["width"], s["height"], s["steps"])], []).append(
            GenerationRequest(s["custom_id"], s["prompt"], "", s["seed"]))
    full_plan = [(k, reqs[i:i + a.max_batch]) for k, reqs in per_key.items()
                 for i in range(0, len(reqs), a.max_batch)]
    before = engine.compile_counters()
    if cuda:
        import torch

        torch.cuda.synchronize(a.device)
        torch.cuda.reset_peak_memory_stats(a.device)

    def replay(runs: list) -> tuple[dict[str, np.ndarray], float, float]:
        images: dict[str, np.ndarray] = {}
        gpu_s = 0.0
        pending = None

        def collect(item):
            nonlocal gpu_s
            reqs, res = item
            res.wait()
            gpu_s += res.timings.get("gpu_s", 0.0)
            images.update({r.job_id: img for r, img in zip(reqs, res.images)})

        t_start = time.time()
        # As the worker runs them: the next batch is queued before the previous one's copy is waited for.
        for key, reqs in runs:
            res = engine.generate(key, reqs)
            if pending is not None:
                collect(pending)
            pending = (reqs, res)
        if pending is not None:
            collect(pending)
        return images, gpu_s, time.time() - t_start

    images, gpu_s, wall = replay(plan)
    full_images, full_gpu_s, full_wall = replay(full_plan)
    after = engine.compile_counters()
    diffs, control = {}, []
    mine_of = {}
    for cid, png in fleet["_images"].items():
        if cid in images:
            mine = mine_of[cid] = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
            diffs[cid] = int(np.abs(mine - images[cid].astype(np.int16)).max())
    # Negative control: each fleet image against the bare image of the next job of the same shape (another
    # seed and prompt). An equality check that also passed these would prove nothing.
    shape = {c: (by_id[c]["width"], by_id[c]["height"], by_id[c]["steps"]) for c in mine_of}
    ordered = sorted(mine_of)
    for i, cid in enumerate(ordered):
        other = next((o for o in ordered[i + 1:] if shape[o] == shape[cid]), None)
        if other is not None:
            control.append(float(np.abs(mine_of[cid] - images[other].astype(np.int16)).mean()))
    spread = [float(m.std()) for m in mine_of.values()]
    peak = None
    if cuda:
        import torch

        peak = round(torch.cuda.max_memory_allocated(a.device) / 2**30, 2)
    engine.close()
    return {"phase": "bare", "images": len(images), "engine_runs": len(plan), "wall_s": round(wall, 3),
            "images_per_s": round(len(images) / max(1e-9, wall), 4), "boot_s": round(boot_s, 2),
            "gpu_busy": round(gpu_s / wall, 4) if cuda else None, "peak_allocated_gib": peak,
            "full_batches": {"engine_runs": len(full_plan), "images": len(full_images),
                             "batch_sizes": dict(sorted(Counter(len(r) for _, r in full_plan).items())),
                             "wall_s": round(full_wall, 3),
                             "images_per_s": round(len(full_images) / max(1e-9, full_wall), 4),
                             "gpu_busy": round(full_gpu_s / full_wall, 4) if cuda else None},
            "compiles": {k: {"before": before.get(k), "after": after.get(k)} for k in before},
            "equality": {"compared": len(diffs), "max_pixel_diff": max(diffs.values()) if diffs else None,
                         "over_1": sorted(c for c, d in diffs.items() if d > 1)[:20],
                         "control_other_job_mean_abs_diff_min": round(min(control), 2) if control else None,
                         "control_pairs": len(control),
                         "image_std_min": round(min(spread), 2) if spread else None}}


# --- report -----------------------------------------------------------------------------------------

def markdown(out: dict[str, Any]) -> str:
    lines = [f"# Fleet bench: {out['model']} on {out['device_name']} ({out['date']})", "",
             f"`{out['command']}`", "", "| phase | images/s | GPU busy (events) | NVML util | wait p50 / p95 s | "
             "batch sizes | peak worker MiB | compiles during stream |", "|---|---|---|---|---|---|---|---|"]
    for name, p in out["phases"].items():
        if name == "bare":
            continue
        b = p.get("gpu_busy") or {}
        comp = {k: v["during_stream"] for k, v in p["compiles"].items() if v["during_stream"]}
        lines.append(f"| {name} | {p['images_per_s']} | {b.get('fraction')} | {b.get('nvml_util_mean')} | "
                     f"{p['queue_wait_s']['p50']} / {p['queue_wait_s']['p95']} | {p['batch_sizes']} | "
                     f"{(p.get('memory') or {}).get('peak_worker_mem_mib')} | {comp or 'none'} |")
    if (out.get("gpus") or 1) > 1:
        lines.append(f"| (every phase: {out['gpus']} workers, one per GPU, on one Redis) | | | | | | | |")
    for name, why in out.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | | | |")
    bare = out["phases"].get("bare")
    if bare:
        lines += ["", f"Bare engine, same runs: {bare['images_per_s']} images/s (GPU busy {bare['gpu_busy']}); "
                  f"fleet/bare = {out.get('fleet_over_bare')}; image equality: {bare['equality']}",
                  "", f"Bare engine, the same jobs in full batches of {out['max_batch']}: "
                  f"{bare['full_batches']['images_per_s']} images/s ({bare['full_batches']['batch_sizes']}); "
                  f"fleet/bare = {out.get('fleet_over_bare_full_batches')}"]
        if out["phases"]["fleet"].get("bare_replays"):
            lines[-1] += f" (the runs of {out['phases']['fleet']['bare_replays']}, vs that worker's images/s)"
    lines += fleet_gpus.markdown_lines(out)
    fleet = out["phases"].get("fleet")
    if fleet:
        lines += ["", f"Timeline of the fleet phase (seconds from the first submission; {fleet['timeline_source']}):",
                  "", "| run | key | size | backlog | gpu_s | " + " | ".join(TIMELINE_KEYS) + " |",
                  "|" + "---|" * (5 + len(TIMELINE_KEYS))]
        for row in fleet["timeline"][:40]:
            lines.append(f"| {row['run']} | {row['key']} | {row['size']} | {row['backlog']} | {row['gpu_s']} | "
                         + " | ".join(str(row.get(k, "")) for k in TIMELINE_KEYS) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="medium", choices=["tiny", "medium", "large"])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--ablation-jobs", type=int, default=None, help="jobs per ablation phase (default --jobs)")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--mix", default=None, help="WxH:STEPS:WEIGHT,... (default: the issue's mix; scaled for tiny)")
    ap.add_argument("--chunks", type=int, default=4, help="sdfleet submit calls the stream is split into")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--work-dir", default="/tmp/sdfleet-fleet-bench",
                    help="local disk: model directory (kept between calls), FP8 weights, outputs, logs")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the model directory and its FP8 weights into --work-dir, then stop (a later call "
                         "on the same machine keeps both)")
    ap.add_argument("--requantize", action="store_true", help="quantize again even if --work-dir holds FP8 weights")
    ap.add_argument("--boot-timeout", type=float, default=400)
    ap.add_argument("--stream-timeout", type=float, default=540)
    ap.add_argument("--stall-timeout", type=float, default=180, help="give up when no job ends for this long")
    ap.add_argument("--gpus", type=int, default=1,
                    help="workers per phase, one per GPU (--device cuda:0 .. cuda:N-1; with --device cpu, N CPU "
                         "workers), on one Redis; the stream is N x --jobs")
    ap.add_argument("--gpus-compare", default=None, metavar="1,N",
                    help="run the fleet phase once per count (1 and N GPUs) and report the scaling efficiency")
    ap.add_argument("--baseline-json", default=None,
                    help="a one-GPU run's JSON from this bench: the one-GPU images/s for --gpus N's efficiency")
    a = ap.parse_args()
    counts, baseline = fleet_gpus.check_gpus(ap, a)
    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        ap.error(f"--phases: unknown {unknown}; choose from {','.join(PHASES)}")
    if "bare" in phases and "fleet" not in phases:
        ap.error("--phases: bare replays the fleet phase's runs; include fleet")
    cuda = a.device.startswith("cuda")
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    out_json = Path(a.out_json or ROOT / "bench" / "results" / f"fleet-{a.model}-{a.device.split(':')[0]}-{date}.json")
    t_all = time.time()
    redis_srv = start_redis(work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    env.update(REDIS_URL=redis_srv.url, SDFLEET_LOG_FORMAT="json", SDFLEET_CACHE_DIR=str(work / "cache"),
               PYTHONUNBUFFERED="1")
    model_name = f"sd3.5-{a.model}-random" if a.model != "tiny" else "tiny-random"
    model_dir, fp8_dir = work / "models" / model_name, work / "models" / f"{model_name}-fp8"
    steps: dict[str, Any] = {}
    if cuda:
        import torch

        if not torch.cuda.is_available():
            ap.error(f"--device {a.device}: no CUDA device here; use --device cpu")
    for other in (work / "models").glob("*"):
        if other.is_dir() and other.name not in (model_dir.name, fp8_dir.name):
            shutil.rmtree(other)  # one model's directory at a time: Large alone is 27 GB of the device's disk
    t = time.time()
    made = checked(sdfleet(["make-model", a.model, str(model_dir), "--device", "cuda" if cuda else "cpu"], env,
                           timeout=900), "sdfleet make-model")
    steps["make_model"] = {"s": round(time.time() - t, 2), "kept": json.loads(made.stdout).get("kept")}
    t = time.time()
    if steps["make_model"]["kept"] and (fp8_dir / "fp8_transformer.json").is_file() and not a.requantize:
        steps["quantize"] = "kept from an earlier call on these weights"
    else:
        checked(sdfleet(["quantize", str(model_dir), str(fp8_dir), "--device", "cuda" if cuda else "cpu"], env,
                        timeout=900), "sdfleet quantize")
        steps["quantize_s"] = round(time.time() - t, 2)
    if a.prepare_only:
        redis_srv.stop()
        print(json.dumps(steps))
        return 0
    helptext = worker_flags()
    mix = parse_mix(a.mix or MIXES["tiny" if a.model == "tiny" else "sd35"])
    ctx = {"env": env, "redis_url": redis_srv.url, "work": work, "model_dir": model_dir, "fp8_dir": fp8_dir,
           "mix": mix, "model_name": model_name, "has_timeline": "--timeline" in helptext}
    device_name = "cpu"
    if cuda:
        import torch

        device_name = torch.cuda.get_device_name(int(a.device.split(":")[1]) if ":" in a.device else 0)
    out: dict[str, Any] = {
        "bench": "fleet", "model": a.model, "device": a.device, "device_name": device_name, "date": date,
        "command": "python bench/fleet.py " + " ".join(sys.argv[1:]), "jobs": a.jobs, "max_batch": a.max_batch,
        "mix": [{"width": w, "height": h, "steps": s, "weight": wt} for w, h, s, wt in mix], "chunks": a.chunks,
        "setup": steps, "gpus": a.gpus, "gpus_compare": counts if a.gpus_compare else None,
        "baseline": baseline, "phases": {}, "skipped": {}}

    def write(complete: bool) -> None:
        # After every phase too: a call cut short by its time limit still leaves the phases it finished.
        fleet, bare = out["phases"].get("fleet"), out["phases"].get("bare")
        if fleet and bare:
            # Several GPUs: the bare engine replayed the first worker's runs, so that worker is the comparison.
            mine = fleet["per_worker"][0] if fleet.get("per_worker") else fleet
            out["fleet_over_bare"] = round(mine["images_per_s"] / max(1e-9, bare["images_per_s"]), 4)
            # Against full batches of the same jobs: partial batches (a padded graph bucket) count against us.
            out["fleet_over_bare_full_batches"] = round(
                mine["images_per_s"] / max(1e-9, bare["full_batches"]["images_per_s"]), 4)
        out["scaling"] = fleet_gpus.scaling(out["phases"], baseline)
        doc = {**out, "complete": complete, "total_s": round(time.time() - t_all, 1),
               "phases": {k: {f: v for f, v in p.items() if not f.startswith("_")} for k, p in out["phases"].items()}}
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(doc, indent=1) + "\n")
        out_json.with_suffix(".md").write_text(markdown(doc))

    try:
        for name in phases:
            if name == "bare":
                continue
            if name == "no-overlap" and "--no-overlap" not in helptext:
                out["skipped"][name] = "this worker has no --no-overlap switch"
                continue
            # --gpus-compare runs the fleet phase once per count: "fleet" is one GPU, "fleet-xN" N of them.
            for gpus in (counts if name == "fleet" else [a.gpus]):
                key = name if gpus == a.gpus or (name == "fleet" and gpus == 1) else f"{name}-x{gpus}"
                print(f"phase {key} ({gpus} worker{'s' if gpus > 1 else ''}) ...", file=sys.stderr, flush=True)
                out["phases"][key] = run_phase(key, a, ctx, 1 if name == "batch1" else a.max_batch,
                                               ["--no-overlap"] if name == "no-overlap" else [], gpus=gpus)
                out["phases"][key]["gpus"] = gpus
                write(False)
        if "bare" in phases:
            print("phase bare ...", file=sys.stderr, flush=True)
            fleet = out["phases"]["fleet"]
            # The fleet phase's whole stream (N x --jobs with N workers): the runs to replay name its jobs.
            fleet_jobs = make_jobs(a.jobs * fleet.get("gpus", 1), mix, model_name)
            out["phases"]["bare"] = run_bare(a, ctx, fleet, fleet_jobs)
    finally:
        redis_srv.stop()
    write(True)
    print(out_json.with_suffix(".md").read_text())
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
