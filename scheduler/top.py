"""``sdfleet top``: a live terminal view of the fleet (workers, pools, recent batches), from Redis alone."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from scheduler import observe as obs
from sdfleet import keys

# A worker whose last beat is older than this many heartbeat intervals is shown as late.
LATE_BEAT_S = 6.0


def snapshot(r: redis.Redis, batches: int = 8) -> dict[str, Any]:
    """Everything one frame shows, as plain data (also what the tests read)."""
    now = time.time()
    workers = obs.live_workers(r)
    pools = obs.discover_pools(r, workers)
    views = obs.observe(r, pools, workers)
    decided = {}
    for pool, raw in (r.hgetall(keys.SCHEDULER_STATE) or {}).items():
        try:
            decided[obs._text(pool)] = json.loads(raw)
        except ValueError:
            continue
    recent = []
    for bid in r.zrevrange(keys.BATCHES, 0, batches - 1):
        bid = obs._text(bid)
        meta = r.hmget(keys.batch(bid), "total", "completed_at", "created_at")
        counts = {obs._text(k): int(v) for k, v in r.hgetall(keys.batch_counts(bid)).items()}
        recent.append({"batch_id": bid, "total": int(meta[0] or 0), "complete": bool(meta[1]),
                       "created_at": float(meta[2] or 0), "counts": counts})
    return {
        "at": now,
        "workers": [obs.worker_row(w, now) for w in workers],
        "pools": [{"pool": p, "queued": round(v.queued), "queued_raw": v.queued_raw, "in_flight": v.in_flight,
                   "workers": len(v.workers), "busy": v.count("busy"), "stalled": v.count("stalled"),
                   "desired": decided.get(p, {}).get("desired"),
                   "backlog_gpu_seconds": decided.get(p, {}).get("backlog_gpu_seconds")} for p, v in views.items()],
        "batches": recent,
    }


def render(snap: dict[str, Any]) -> Group:
    wt = Table(title=f"workers ({len(snap['workers'])} live)", expand=True)
    for col in ("worker", "pool", "device", "state", "batch", "img/s", "GPU util", "beat"):
        wt.add_column(col)
    for w in snap["workers"]:
        state = w["state"] or "?"
        late = (w["beat_age_s"] or 0) > LATE_BEAT_S
        style = "red" if state == "stalled" or late else ("green" if state == "busy" else "")
        util = f"{w['gpu_util']:.0f}%" if w["gpu_util"] is not None else "-"
        wt.add_row(w["id"], w["pool"], w["device"], state + (" (late)" if late else ""),
                   f"{w['current_batch']}/{w['max_batch'] or '?'}", f"{w['images_per_s'] or 0:.2f}", util,
                   f"{w['beat_age_s']:.1f}s" if w["beat_age_s"] is not None else "-", style=style)
    pt = Table(title="pools", expand=True)
    for col in ("pool", "queued", "in flight", "workers", "busy", "stalled", "desired", "backlog GPU-s"):
        pt.add_column(col)
    for p in snap["pools"]:
        style = "red" if p["queued"] and not p["workers"] else ""
        pt.add_row(p["pool"], f"{p['queued']} ({p['queued_raw']} msgs)", str(p["in_flight"]), str(p["workers"]),
                   str(p["busy"]), str(p["stalled"]), "-" if p["desired"] is None else str(p["desired"]),
                   "-" if p["backlog_gpu_seconds"] is None else f"{p['backlog_gpu_seconds']:.0f}", style=style)
    bt = Table(title="recent batches", expand=True)
    for col in ("batch", "total", "queued", "running", "succeeded", "failed", "cancelled", "state"):
        bt.add_column(col)
    for b in snap["batches"]:
        c = b["counts"]
        bt.add_row(b["batch_id"], str(b["total"]), *(str(c.get(s, 0)) for s in
                                                      ("queued", "running", "succeeded", "failed", "cancelled")),
                   "complete" if b["complete"] else "open")
    return Group(wt, pt, bt)


def run_top(r: redis.Redis, *, interval: float = 1.0, once: bool = False, batches: int = 8) -> int:
    console = Console()
    if once:
        console.print(render(snapshot(r, batches)))
        return 0
    with Live(render(snapshot(r, batches)), console=console, refresh_per_second=4, screen=False) as live:
        while True:
            time.sleep(interval)
            live.update(render(snapshot(r, batches)))
