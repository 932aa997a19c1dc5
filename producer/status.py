"""Batch status, waiting with a progress bar, live workers per queue, and the results manifest."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from sdfleet import keys
from sdfleet.errors import BatchNotFound
from sdfleet.state import QUEUED, RUNNING, TERMINAL, JobStore


def batch_status(store: JobStore, batch_id: str) -> dict[str, Any]:
    """The batch's counts and state. A batch whose first submission has not committed yet has
    ``submitting`` set (and no jobs); one that does not exist at all raises BatchNotFound."""
    try:
        meta = store.batch(batch_id)
    except BatchNotFound:
        if not store.submission_in_progress(batch_id):
            raise
        return {"batch_id": batch_id, "name": batch_id, "total": 0, "counts": store.counts(batch_id),
                "complete": False, "created_at": 0.0, "completed_at": None, "cancelled": False,
                "submitting": True}
    counts = store.counts(batch_id)
    total = int(meta.get("total", 0))
    ended = sum(counts[s] for s in TERMINAL)
    return {
        "batch_id": batch_id, "name": meta.get("name", batch_id), "total": total, "counts": counts,
        "complete": total > 0 and ended >= total, "created_at": float(meta.get("created_at", 0) or 0),
        "completed_at": float(meta["completed_at"]) if meta.get("completed_at") else None,
        "cancelled": bool(meta.get("cancelled_at")), "submitting": store.submission_in_progress(batch_id),
    }


def live_queues(store: JobStore) -> set[str]:
    """The queues that live workers serve: heartbeat hashes (``keys.worker``, field ``queue``) that still exist."""
    r = store.r
    ids = sorted(r.smembers(keys.WORKERS))
    if not ids:
        return set()
    pipe = r.pipeline(transaction=False)
    for wid in ids:
        pipe.hget(keys.worker(wid), "queue")
    return {q for q in pipe.execute() if q}


def batch_queues(store: JobStore, batch_id: str, sample: int = 1000) -> set[str]:
    """The queues of a batch's jobs (from the first ``sample`` records; a batch rarely mixes models)."""
    ids = store.r.lrange(keys.batch_jobs(batch_id), 0, sample - 1)
    return {keys.queue_for_model(rec.spec.get("model", "tiny")) for rec in store.jobs(ids) if rec is not None}


def unserved(store: JobStore, queues: Iterable[str]) -> list[str]:
    """Those of ``queues`` that no live worker serves."""
    live = live_queues(store)
    return sorted(q for q in queues if q not in live)


def describe(st: dict[str, Any], idle_queues: Iterable[str] = ()) -> str:
    """One line: what has ended, what is still queued and running, and which queues nobody serves."""
    c = st["counts"]
    if st.get("submitting") and not st["total"]:
        return f"batch {st['batch_id']}: submission in progress (nothing is recorded until it commits)"
    text = (f"batch {st['batch_id']}: {c['succeeded']} succeeded, {c['failed']} failed, {c['cancelled']} cancelled "
            f"of {st['total']}")
    if not st["complete"]:
        text += f"; {c[QUEUED]} still queued, {c[RUNNING] + c.get('storing', 0)} running"
    idle = sorted(idle_queues)
    if idle and c[QUEUED] and not st["complete"]:
        starts = " or ".join(f"sdfleet worker --model {q.removeprefix(keys.GEN_QUEUE_PREFIX)}" for q in idle)
        text += f"; no live worker serves {', '.join(idle)} (start one: {starts}, or the model's directory)"
    return text


def wait_for_batch(store: JobStore, batch_id: str, *, timeout: float | None = None, progress: bool = False,
                   poll_s: float = 0.25, worker_check_s: float = 2.0,
                   stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Poll until every job of the batch has ended (or ``timeout``, or ``stop()`` is true: checked at every
    poll); returns the final status, with ``idle_queues``: the batch's queues no live worker serves (checked
    every ``worker_check_s``).

    A batch still being submitted is waited for; one whose submission ended without a commit (its lease
    expired) raises BatchNotFound, so a wait never outlives a submission that will never exist.
    """
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
        task = bar.add_task(batch_id, total=st["total"] or None, detail="")
        bar.start()
    queues: set[str] = set()
    idle: list[str] = []
    checked = float("-inf")
    try:
        while True:
            st = batch_status(store, batch_id)
            c = st["counts"]
            if not queues and st["total"]:
                queues = batch_queues(store, batch_id)
            if queues and time.monotonic() - checked >= worker_check_s:
                idle = unserved(store, queues)
                checked = time.monotonic()
            st["idle_queues"] = idle
            if bar is not None:
                if st.get("submitting") and not st["total"]:
                    detail = "submission in progress"
                else:
                    detail = f"{c['running']} running, {c['failed']} failed"
                    if idle and c[QUEUED]:
                        detail += f"; no worker is listening on {', '.join(idle)}"
                bar.update(task, total=st["total"] or None, completed=sum(c[s] for s in TERMINAL), detail=detail)
            if st["complete"]:
                return st
            if deadline is not None and time.monotonic() > deadline:
                return st
            if stop is not None and stop():
                return st
            time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.stop()


def manifest_lines(store: JobStore, batch_id: str, *, public_url: Any = None) -> list[dict[str, Any]]:
    """One line per job (see :func:`sdfleet.events.manifest_line`); ``public_url`` renders each URL."""
    from sdfleet.events import manifest_line

    store.batch(batch_id)
    return [manifest_line(rec, public_url) for rec in store.iter_batch_jobs(batch_id)]
