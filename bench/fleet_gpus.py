"""bench/fleet.py with several workers on one Redis (``--gpus N``): per-GPU sampling, the checks that no job
ran on two GPUs, the per-worker table and the scaling efficiency.

Each GPU is sampled through NVML by the UUID its worker reports in its heartbeat (``worker.devices.GpuProbe``):
the bench process is not pinned to one GPU, and NVML's indices are not CUDA's, so an index could read a
neighbour's card.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

#: the objects a succeeded job leaves in its batch's folder: the image and its sidecar
OBJECT_SUFFIXES = (".png", ".json")


class ProbeSampler(threading.Thread):
    """One GPU's NVML utilization and memory at 20 Hz, once ``gpu_id`` (its UUID) is known; nothing on a CPU."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float, int, int]] = []  # (t, util %, device MiB used, 0: no per-pid)
        self.gpu_id: str | None = None
        self.pid: int | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        from worker.devices import GpuProbe

        probe = None
        while not self.stop_event.wait(0.05):
            if self.gpu_id is None:
                continue  # the worker has not reported its GPU yet (booting), or it runs on the CPU
            probe = probe or GpuProbe(self.gpu_id)
            s = probe.sample()
            if not s:
                return  # no NVML here, or no such GPU: an empty probe stays empty
            if "gpu_util_pct" in s:
                self.samples.append((time.time(), s["gpu_util_pct"], int(s.get("gpu_mem_used_bytes", 0)) // 2**20, 0))

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not self.samples:
            return {"nvml": None}
        return {"nvml_util_mean": round(sum(s[1] for s in inside) / len(inside) / 100, 4) if inside else None,
                "nvml_samples": len(inside), "peak_device_mem_mib": max(s[2] for s in self.samples),
                "peak_worker_mem_mib": None}


def no_job_twice(jobs: list[dict], records: dict, counts: dict[str, dict[str, int]], out_dir: Path,
                 workers: list[dict]) -> dict[str, Any]:
    """Evidence that every job ran on exactly one GPU, once: outcomes, attempts, objects, timelines.

    ``records``: batch -> custom_id -> JobRecord; ``counts``: batch -> the batch's counters; ``workers``: each
    with ``worker_id`` and its timeline's ``runs``. Lists name at most 20 jobs each.
    """
    recs = {cid: rec for per_batch in records.values() for cid, rec in per_batch.items()}
    expected = {j["custom_id"] for j in jobs}
    objects: Counter = Counter()
    tmp_files, stray = [], []
    for f in sorted(out_dir.rglob("*")) if out_dir.is_dir() else []:
        if not f.is_file():
            continue
        if f.name.startswith(".tmp-"):
            tmp_files.append(str(f.relative_to(out_dir)))
        elif f.suffix in OBJECT_SUFFIXES:
            objects[(f.parent.name, f.stem)] += 1
    known = {(rec.batch_id, cid) for cid, rec in recs.items()}
    stray = sorted(f"{b}/{c}" for b, c in objects if (b, c) not in known)
    # Which worker's timeline holds each job id, and in which run.
    seen: Counter = Counter()
    owner: dict[str, set[str]] = {}
    run_of: dict[str, str] = {}
    for wk in workers:
        for x in wk["runs"]:
            for jid in x.get("jobs", []):
                seen[jid] += 1
                owner.setdefault(jid, set()).add(wk["worker_id"])
                run_of[jid] = str(x.get("run"))
    ids = {rec.job_id: cid for cid, rec in recs.items()}
    lists = {
        "missing_records": sorted(expected - set(recs)),
        "not_succeeded": sorted(c for c, rec in recs.items() if rec.status != "succeeded"),
        # A job claimed by a second worker is started again: a second attempt.
        "started_more_than_once": sorted(c for c, rec in recs.items() if int(rec.fields.get("attempts") or 0) != 1),
        "without_two_objects": sorted(c for c, rec in recs.items() if objects[(rec.batch_id, c)] != len(OBJECT_SUFFIXES)),
        "tmp_files": tmp_files,
        "stray_objects": stray,
        "in_two_workers": sorted(ids.get(j, j) for j, ws in owner.items() if len(ws) > 1),
        "not_once_in_timelines": sorted(ids[j] for j in ids if seen[j] != 1) + sorted(j for j in seen if j not in ids),
        # The record's worker and run are what the outcome was recorded under: they must be the timeline's.
        "record_not_timeline_owner": sorted(
            c for c, rec in recs.items() if rec.job_id in owner and (
                {rec.fields.get("worker")} != owner[rec.job_id] or rec.fields.get("run") != run_of[rec.job_id])),
    }
    totals = Counter()
    for per in counts.values():
        totals.update({k: int(v) for k, v in per.items()})
    counted_ok = totals.get("succeeded", 0) == len(expected) and sum(
        totals.get(k, 0) for k in ("failed", "cancelled")) == 0
    return {"ok": counted_ok and not any(lists.values()), "jobs": len(expected), "batch_counts": dict(totals),
            "objects": sum(objects.values()), **{k: v[:20] for k, v in lists.items()},
            **{f"n_{k}": len(v) for k, v in lists.items()}}


def worker_row(p: dict[str, Any], wk: dict[str, Any]) -> dict[str, Any]:
    """One worker's line of the ``per_worker`` table, from its own summary."""
    busy = p.get("gpu_busy") or {}
    # Counters a device lacks (Triton, graphs on a CPU) are None, not zero: summed over those it has.
    comp = [v["during_stream"] for v in p["compiles"].values() if v["during_stream"] is not None]
    return {"worker_id": wk["worker_id"], "device": wk["device"], "gpu_uuid": wk["before"].get("gpu_uuid") or None,
            "images": p["succeeded"], "images_per_s": p["images_per_s"], "wall_s": p["wall_s"],
            "engine_runs": p["engine_runs"], "batch_sizes": p["batch_sizes"],
            "gpu_busy": busy.get("fraction"), "gpu_busy_source": busy.get("source"),
            "nvml_util_mean": busy.get("nvml_util_mean"), "host_gap_p50_s": _round(p["host_gap_s"]["p50"]),
            "queue_wait_p50_s": p["queue_wait_s"]["p50"], "boot_s": round(wk["boot_s"], 2),
            "compiles_during_stream": sum(comp) if comp else None,
            "peak_mem_mib": (p.get("memory") or {}).get("peak_device_mem_mib") or p["heartbeat_peak_device_mem_mib"],
            "worker_exit": wk["proc"].returncode}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def fleet_totals(total: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The phase's figures over several GPUs: the worst GPU's busy fraction and host gaps, compiles summed."""
    def worst(vals: list, pick=min):
        vals = [v for v in vals if v is not None]
        return pick(vals) if vals else None

    busy = [(p.get("gpu_busy") or {}) for p in parts]
    total["gpu_busy"] = {"source": worst([b.get("source") for b in busy], pick=lambda v: v[0]),
                         "fraction": worst([b.get("fraction") for b in busy]),
                         "nvml_util_mean": worst([b.get("nvml_util_mean") for b in busy]),
                         "per_gpu": [b.get("fraction") for b in busy],
                         "nvml_per_gpu": [b.get("nvml_util_mean") for b in busy],
                         "of": "the least busy GPU (per_gpu: each worker's own window)"}
    total["host_gap_s"] = {q: worst([p["host_gap_s"][q] for p in parts], pick=max) for q in ("p50", "p95", "max")}
    total["host_gap_s"]["n"] = sum(p["host_gap_s"]["n"] for p in parts)
    compiles = {}
    for k in parts[0]["compiles"]:
        vals = [p["compiles"][k] for p in parts]
        compiles[k] = {f: None if any(v[f] is None for v in vals) else sum(v[f] for v in vals)
                       for f in ("boot", "after_stream", "during_stream")}
    total["compiles"] = compiles
    on_path = [p["post_on_critical_path"] for p in parts]
    total["post_on_critical_path"] = None if any(v is None for v in on_path) else sum(on_path)
    peaks = [(p.get("memory") or {}).get("peak_device_mem_mib") for p in parts]
    total["memory"] = {"peak_device_mem_mib": worst(peaks, pick=max), "peak_worker_mem_mib": None}
    total["heartbeat_peak_device_mem_mib"] = worst([p["heartbeat_peak_device_mem_mib"] for p in parts], pick=max)
    return total


def scaling(phases: dict[str, dict], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Efficiency of each several-GPU fleet phase: images/s over N x the one-GPU fleet's images/s.

    The one-GPU figure comes from this invocation's one-worker ``fleet`` phase (``--gpus-compare``), else from
    ``baseline`` (``--baseline-json``: ``{"images_per_s": ..., "source": ...}``).
    """
    one = phases.get("fleet")
    if one is not None and one.get("gpus", 1) == 1:
        ref = {"images_per_s": one["images_per_s"], "source": "the fleet phase of this invocation (1 GPU)"}
    else:
        ref = baseline
    out = {}
    for name, p in phases.items():
        n = p.get("gpus", 1)
        if n > 1 and name.startswith("fleet") and ref:
            out[name] = {"gpus": n, "images_per_s": p["images_per_s"], "one_gpu_images_per_s": ref["images_per_s"],
                         "efficiency": round(p["images_per_s"] / max(1e-9, n * ref["images_per_s"]), 4),
                         "one_gpu_from": ref["source"]}
    return out


def markdown_lines(out: dict[str, Any]) -> list[str]:
    """The scaling lines, the checks and a per-worker table for each phase that ran several workers."""
    lines = []
    for name, s in (out.get("scaling") or {}).items():
        lines += ["", f"Scaling, {name}: {s['images_per_s']} images/s on {s['gpus']} GPUs vs {s['one_gpu_images_per_s']} "
                  f"on one ({s['one_gpu_from']}): efficiency **{s['efficiency']}**"]
    for name, p in out["phases"].items():
        if not p.get("per_worker"):
            continue
        c = p["checks"]
        lines += ["", f"Workers of phase {name} ({p['gpus']} on one Redis; GPU busy of the least busy: "
                  f"{p['gpu_busy']['fraction']}); no job on two GPUs: **{'yes' if c['ok'] else 'NO'}** "
                  f"({c['jobs']} jobs, {c['objects']} objects, {c['n_tmp_files']} .tmp files, "
                  f"{c['n_in_two_workers']} in two workers, {c['n_started_more_than_once']} started twice)", "",
                  "| worker | device | GPU | images | images/s | GPU busy (events) | NVML util | batch sizes | "
                  "host gap p50 s | compiles during stream |", "|---|---|---|---|---|---|---|---|---|---|"]
        for w in p["per_worker"]:
            lines.append(f"| {w['worker_id']} | {w['device']} | {w['gpu_uuid'] or '-'} | {w['images']} | "
                         f"{w['images_per_s']} | {w['gpu_busy']} | {w['nvml_util_mean']} | {w['batch_sizes']} | "
                         f"{w['host_gap_p50_s']} | {w['compiles_during_stream']} |")
    return lines


def check_gpus(ap: argparse.ArgumentParser, a: argparse.Namespace) -> tuple[list[int], dict | None]:
    """--gpus, --gpus-compare and --baseline-json, checked before anything starts (exit 2 with the fix)."""
    if a.gpus < 1:
        ap.error(f"--gpus {a.gpus}: give at least 1 (one worker per GPU)")
    counts = [a.gpus]
    if a.gpus_compare:
        if a.gpus != 1:
            ap.error("--gpus-compare sets the GPU counts of the fleet phase; leave --gpus at 1 (its default)")
        try:
            counts = sorted({int(x) for x in a.gpus_compare.split(",") if x.strip()})
        except ValueError:
            ap.error(f"--gpus-compare {a.gpus_compare!r}: expected GPU counts such as 1,2 or 1,4")
        if not counts or counts[0] != 1 or len(counts) < 2:
            ap.error(f"--gpus-compare {a.gpus_compare!r}: give 1 and at least one larger count, e.g. 1,2")
    cuda = a.device.startswith("cuda")
    if max(counts) > 1 and cuda:
        if a.device not in ("cuda", "cuda:0"):
            ap.error(f"--device {a.device}: with several GPUs the workers take cuda:0 .. cuda:N-1; pass --device cuda")
        from worker.devices import visible_gpus

        try:
            have = len(visible_gpus(os.environ))
        except Exception as exc:  # a malformed CUDA_VISIBLE_DEVICES or no NVML: its message says which
            ap.error(f"--gpus {max(counts)}: cannot list this process's GPUs ({exc})")
        if have < max(counts):
            ap.error(f"--gpus {max(counts)}: this process may use {have} GPU(s) (CUDA_VISIBLE_DEVICES="
                     f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); ask for at most {have}")
    baseline = None
    if a.baseline_json:
        if a.gpus_compare:
            ap.error("--baseline-json and --gpus-compare both give the one-GPU images/s; give one")
        try:
            doc = json.loads(Path(a.baseline_json).read_text())
            fleet = doc["phases"]["fleet"]
            baseline = {"images_per_s": float(fleet["images_per_s"]), "source": a.baseline_json}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ap.error(f"--baseline-json {a.baseline_json}: not a JSON of this bench with a fleet phase ({exc!r})")
        if (doc.get("gpus") or 1) != 1 or doc.get("model") != a.model:
            ap.error(f"--baseline-json {a.baseline_json}: a one-GPU run of --model {a.model} is needed (it is "
                     f"{doc.get('gpus') or 1} GPU(s) of {doc.get('model')})")
    return counts, baseline
