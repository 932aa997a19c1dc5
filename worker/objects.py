"""A job's two objects, its PNG and its JSON sidecar: encoded and written by a process of its own.

Once the engine is done, encoding and writing are most of what is left of a job's CPU, and inside the worker
process they would compete for the GIL with the event loop that claims and starts jobs (with the null engine
that held one worker to about half its rate: docs/PERFORMANCE.md). So one child process does them, an engine
run at a time. It is spawned, never forked: the worker holds threads, Redis connections and possibly a CUDA
context. It ignores SIGINT and SIGTERM, since stopping is the worker's business (it finishes what is in flight,
then shuts the child down), and exits by itself if the worker dies.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from PIL import Image

from sdfleet import logs
from sdfleet.errors import StorageError
from sdfleet.settings import Settings
from sdfleet.storage import StorageFactory, object_key, staged_key

# What the child reports per job: (STORED, fields to record), (STORAGE_FAILED, why, permanent) or
# (FAILED, why, trace).
STORED, STORAGE_FAILED, FAILED = "stored", "storage failed", "failed"


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # compress_level 1: several times faster than the default for a few percent more bytes. No text chunks:
    # the parameters live in the sidecar.
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ObjectWriter:
    """Writes engine runs' objects in the child process; :meth:`write` is safe to call from several threads."""

    def __init__(self, storage: StorageFactory, engine_info: dict[str, Any], worker_id: str):
        self._initargs = (storage.endpoint_url, storage.region, storage.retries, engine_info, worker_id, os.getpid())
        self._local = storage
        self._lock = threading.Lock()
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                                   initargs=self._initargs)
        pool.submit(int)  # start the child now, not on the first engine run
        return pool

    def write(self, jobs: list[dict[str, Any]], images: list[np.ndarray]) -> list[tuple]:
        """Encode and store each job's PNG and sidecar under its run's staged names; per job, what
        :func:`_write_run` reports.

        Raises BrokenProcessPool if the child died meanwhile (a fresh one is started for the next call).
        """
        return self._call(_write_run, jobs, images)

    def promote(self, moves: list[tuple[str, str, str]]) -> list[str | None]:
        """(location, staged key, final key) triples: promote each; per triple None or why it failed.

        On local disk a promotion is a rename, done here: the child is for encoding and uploads, and a round
        trip to it costs more than the renames."""
        if all(location.startswith("file://") for location, _, _ in moves):
            return _promote_with(self._local, moves, False)
        return self._call(_promote, moves, False)

    def discard(self, moves: list[tuple[str, str, str]]) -> list[str | None]:
        """Delete the staged objects of runs that did not get to record their outcome."""
        return self._call(_promote, moves, True)

    def _call(self, fn: Any, *args: Any) -> Any:
        pool = self._pool
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    pool.shutdown(wait=False)
                    self._pool = self._start()
            raise

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


# --- in the child ----------------------------------------------------------------------------------------

_FACTORY: StorageFactory | None = None
_ENGINE: dict[str, Any] = {}
_WORKER = ""


def _init(endpoint_url: str | None, region: str, retries: int, engine_info: dict[str, Any], worker_id: str,
          parent: int) -> None:
    global _FACTORY, _ENGINE, _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A spawned child starts with Python's default logging: without this, a warning from botocore or urllib3
    # here would come out as plain text among the worker's JSON lines (they share its stderr).
    settings = Settings.from_env()
    logs.configure(settings.log_format, settings.log_level)
    logs.bind_process(worker_id=worker_id, process="storer")
    _FACTORY = StorageFactory(endpoint_url, region, retries)
    _ENGINE, _WORKER = engine_info, worker_id
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    # A worker killed outright (SIGKILL, OOM) cannot stop its child; once reparented, the child stops itself.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _write_run(jobs: list[dict[str, Any]], images: list[np.ndarray]) -> list[tuple]:
    out: list[tuple] = []
    # location -> (why, permanent), once it failed (after its retries) for a job of this run
    down: dict[str, tuple[str, bool]] = {}
    for job, image in zip(jobs, images):
        if job["out"] in down:
            # Jobs are stored one after the other: without this, an outage would cost every job of the run
            # its whole retry budget before any of them went back to the queue. A permanent error counts a
            # try for each of them too, or the run's jobs would fail one at a time, each after its own tries.
            why, permanent = down[job["out"]]
            out.append((STORAGE_FAILED, f"not attempted: {why}", permanent))
            continue
        try:
            out.append((STORED, _write(job, image)))
        except StorageError as exc:
            down[job["out"]] = (str(exc), exc.permanent)
            out.append((STORAGE_FAILED, str(exc), exc.permanent))
        except Exception as exc:  # encoding bugs etc.: the worker records the failure, never ends silently
            out.append((FAILED, f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=5)))
    return out


def _write(job: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
    assert _FACTORY is not None
    t0 = time.perf_counter()
    storage = _FACTORY.get(job["out"])
    png = encode_png(image)
    t1 = time.perf_counter()
    encoded_at = time.time()
    png_key = object_key(job["batch_id"], job["custom_id"], ".png")
    json_key = object_key(job["batch_id"], job["custom_id"], ".json")
    # Written under the run's own names; the outcome recorded in Redis decides which run's objects become
    # the job's (see worker.postprocess).
    storage.put(staged_key(png_key, job["engine_run"]), png, "image/png")
    url = storage.url(png_key)
    timings = {**job["timings"], "encode_png_s": t1 - t0, "upload_s": time.perf_counter() - t1}
    timings = {k: round(v, 6) for k, v in timings.items()}
    height, width = int(image.shape[0]), int(image.shape[1])
    sidecar = {
        "job_id": job["job_id"], "batch_id": job["batch_id"], "custom_id": job["custom_id"],
        "parameters": job["parameters"], "seed": job["seed"], "model": job["model"], "engine": _ENGINE,
        "worker": _WORKER, "attempt": job["attempt"], "engine_run": job["engine_run"], "timings": timings,
        "image": url, "width": width, "height": height, "finished_at": time.time(),
    }
    # No indent: json's C encoder only runs without one (the indented form was a third of the CPU).
    storage.put(staged_key(json_key, job["engine_run"]), json.dumps(sidecar).encode(), "application/json")
    sidecar_url = storage.url(json_key)
    staged = [[job["out"], staged_key(png_key, job["engine_run"]), png_key],
              [job["out"], staged_key(json_key, job["engine_run"]), json_key]]
    return {"url": url, "sidecar_url": sidecar_url, "timings": json.dumps(timings), "width": width,
            "height": height, "staged": json.dumps(staged), "encoded_at": encoded_at}


def _promote(moves: list[tuple[str, str, str]], discard: bool) -> list[str | None]:
    assert _FACTORY is not None
    return _promote_with(_FACTORY, moves, discard)


def _promote_with(factory: StorageFactory, moves: list[tuple[str, str, str]], discard: bool) -> list[str | None]:
    out: list[str | None] = []
    for location, staged, final in moves:
        try:
            storage = factory.get(location)
            storage.discard(staged) if discard else storage.promote(staged, final)
            out.append(None)
        except StorageError as exc:
            out.append(str(exc))
    return out
