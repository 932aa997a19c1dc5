"""Batch status, waiting with a progress bar, and the results manifest."""

from __future__ import annotations

import time
from typing import Any

from sdfleet.state import TERMINAL, JobStore


def batch_status(store: JobStore, batch_id: str) -> dict[str, Any]:
    meta = store.batch(batch_id)
    counts = store.counts(batch_id)
    total = int(meta.get("total", 0))
    ended = sum(counts[s] for s in TERMINAL)
    return {
        "batch_id": batch_id, "name": meta.get("name", batch_id), "total": total, "counts": counts,
        "complete": total > 0 and ended >= total, "created_at": float(meta.get("created_at", 0) or 0),
        "completed_at": float(meta["completed_at"]) if meta.get("completed_at") else None,
        "cancelled": bool(meta.get("cancelled_at")),
    }


def wait_for_batch(store: JobStore, batch_id: str, *, timeout: float | None = None, progress: bool = False,
                   poll_s: float = 0.25) -> dict[str, Any]:
    """Poll until every job of the batch has ended (or ``timeout``); returns the final status."""
    st = batch_status(store, batch_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # On stderr: stdout stays machine-readable (the batch id, JSON).
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), transient=False,
                       console=Console(stderr=True))
        task = bar.add_task(batch_id, total=st["total"], detail="")
        bar.start()
    try:
        while True:
            st = batch_status(store, batch_id)
            c = st["counts"]
            if bar is not None:
                bar.update(task, total=st["total"], completed=sum(c[s] for s in TERMINAL),
                           detail=f"{c['running']} running, {c['failed']} failed")
            if st["complete"]:
                return st
            if deadline is not None and time.monotonic() > deadline:
                return st
            time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.stop()


MANIFEST_FIELDS = ("custom_id", "job_id", "status", "url", "seed", "width", "height", "error")


def manifest_lines(store: JobStore, batch_id: str) -> list[dict[str, Any]]:
    store.batch(batch_id)
    out = []
    for rec in store.iter_batch_jobs(batch_id):
        out.append({
            "custom_id": rec.custom_id, "job_id": rec.job_id, "status": rec.status, "url": rec.url,
            "seed": rec.spec.get("seed"), "width": rec.spec.get("width"), "height": rec.spec.get("height"),
            "error": rec.error,
        })
    return out

