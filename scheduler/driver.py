"""Drivers turn a pool's desired worker count into workers.

:class:`LocalDriver` runs ``sdfleet worker`` processes on this host: one per visible GPU (each pinned to
its own device through ``CUDA_VISIBLE_DEVICES``, honouring a list this process inherited), or CPU workers
for the ``tiny`` and ``null`` models. It removes a worker only with SIGTERM, which drains it (stop taking
work, finish the batch, hand back what it buffers, exit 0), choosing idle workers first, and never sends
anything harder. A worker that exits without being asked to is started again in the same slot.

Workers run in their own sessions, so they outlive a scheduler that is killed. A driver's first reconcile
adopts the live workers of its pool on this host (from their heartbeats: host, pid, worker id) into the
slots they occupy: they count as its workers, are drained like its own, and no second worker is started
beside them.

:class:`ExternalDriver` starts nothing: on Kubernetes, KEDA reads the desired count the scheduler serves.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from sdfleet.errors import ConfigError

CPU_MODELS = ("tiny", "null")
# A worker that dies this soon after its start, this many times in a row, is started again only after
# RESTART_BACKOFF_S (a broken model directory must not become a fork loop).
QUICK_CRASH_S = 30.0
QUICK_CRASHES = 3
RESTART_BACKOFF_S = 30.0
# A drained worker that has not reported booted within this long is signalled anyway.
BOOT_LIMIT_S = 900.0
# Order in which workers are picked to drain: idle ones lose nothing, booting ones lose only boot time.
DRAIN_ORDER = {"idle": 0, "": 1, "booting": 2, "stalled": 3, "busy": 4, "draining": 5}


def pool_name(model: str) -> str:
    """The pool (queue) name of ``--model``: a directory's name, as the worker names its queue."""
    return model if model in CPU_MODELS else PurePosixPath(model.rstrip("/")).name


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs)."""
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        return [v.strip() for v in env["CUDA_VISIBLE_DEVICES"].split(",") if v.strip() and v.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        return []


@dataclass
class Slot:
    name: str  # "cpu3" or "gpu:<entry>"
    device: str  # the worker's --device
    env: dict[str, str]


class AdoptedProcess:
    """A worker process this driver did not start (a previous scheduler's): signalled and polled by pid.

    Its exit code is not ours to read (it is not our child); ``poll`` says -1 once it has gone. A pid whose
    command line no longer names the worker id (the pid was reused) counts as gone.
    """

    def __init__(self, pid: int, worker_id: str):
        self.pid = pid
        self.worker_id = worker_id
        self.returncode: int | None = None

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: not one we started
            return False
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                return self.worker_id.encode() in f.read()
        except FileNotFoundError:
            return False
        except OSError:  # no /proc here: the pid answered, take it
            return True

    def poll(self) -> int | None:
        if self.returncode is None and not self.alive():
            self.returncode = -1
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


@dataclass
class LocalWorker:
    worker_id: str
    slot: Slot
    proc: subprocess.Popen | AdoptedProcess
    started: float
    draining: bool = False
    signalled: bool = False  # SIGTERM sent (deferred while the worker boots)


@dataclass
class SlotHistory:
    quick_crashes: int = 0
    not_before: float = 0.0


@dataclass
class LocalDriver:
    """Starts, drains and restarts ``sdfleet worker`` processes of one model on this host."""

    model: str
    max_workers: int
    log: Any
    worker_args: Sequence[str] = ()
    environ: Mapping[str, str] | None = None
    #: worker i of slot order gets --metrics-port base + i (None: no flag)
    metrics_port_base: int | None = None
    python: str = sys.executable
    clock: Any = time.monotonic
    workers: dict[str, LocalWorker] = field(default_factory=dict)
    restarts: int = 0
    adopted: bool = False  # the first reconcile has looked for a previous scheduler's workers

    def __post_init__(self) -> None:
        env = dict(os.environ if self.environ is None else self.environ)
        self.pool = pool_name(self.model)
        if self.model in CPU_MODELS:
            self.slots = [Slot(f"cpu{i}", "cpu", env) for i in range(self.max_workers)]
        else:
            gpus = visible_gpus(env)
            if not gpus:
                raise ConfigError(f"--driver local --model {self.model}: no GPU is visible (CUDA_VISIBLE_DEVICES "
                                  "is empty or NVML finds none); use --model tiny for CPU workers")
            # One process, one GPU: the worker sees only its own, as cuda:0.
            self.slots = [Slot(f"gpu:{g}", "cuda:0", {**env, "CUDA_VISIBLE_DEVICES": g}) for g in gpus]
            if len(gpus) < self.max_workers:
                self.log.warning("fewer GPUs than --max-workers; one worker per GPU", gpus=len(gpus),
                                 max_workers=self.max_workers)
        self.history = {s.name: SlotHistory() for s in self.slots}

    # --- state ---------------------------------------------------------------------------------------

    def active(self) -> list[LocalWorker]:
        return [w for w in self.workers.values() if not w.draining]

    def draining(self) -> list[LocalWorker]:
        return [w for w in self.workers.values() if w.draining]

    def poll(self) -> list[tuple[str, int, bool]]:
        """Forget exited workers; returns (worker id, exit code, was draining) for each."""
        gone = []
        for wid, w in list(self.workers.items()):
            rc = w.proc.poll()
            if rc is None:
                continue
            del self.workers[wid]
            gone.append((wid, rc, w.draining))
            hist = self.history[w.slot.name]
            if w.draining:
                self.log.info("worker drained and exited", worker_id=wid, exit_code=rc, slot=w.slot.name)
                hist.quick_crashes = 0
                continue
            self.restarts += 1
            quick = self.clock() - w.started < QUICK_CRASH_S
            hist.quick_crashes = hist.quick_crashes + 1 if quick else 0
            if hist.quick_crashes >= QUICK_CRASHES:
                hist.not_before = self.clock() + RESTART_BACKOFF_S
                self.log.error("worker keeps crashing at start; slot paused", worker_id=wid, exit_code=rc,
                               slot=w.slot.name, pause_s=RESTART_BACKOFF_S)
            else:
                self.log.warning("worker exited unasked; starting another", worker_id=wid, exit_code=rc,
                                 slot=w.slot.name)
        return gone

    # --- actions -------------------------------------------------------------------------------------

    def reconcile(self, desired: int, heartbeats: Mapping[str, Mapping[str, str]]) -> tuple[int, int]:
        """Start or drain workers towards ``desired``; returns (started, drained) now."""
        if not self.adopted:
            self.adopt(heartbeats)
        self.poll()
        self._signal_booted(heartbeats)
        desired = min(desired, len(self.slots))
        active = self.active()
        started = drained = 0
        if len(active) < desired:
            # A worker told to go while it booted, and not signalled yet, simply stays.
            for w in [w for w in self.draining() if not w.signalled][: desired - len(active)]:
                w.draining = False
                active.append(w)
                self.log.info("worker kept (drain cancelled before it started)", worker_id=w.worker_id)
        if len(active) < desired:
            busy_slots = {w.slot.name for w in self.workers.values()}
            now = self.clock()
            free = [s for s in self.slots if s.name not in busy_slots and self.history[s.name].not_before <= now]
            for slot in free[: desired - len(active)]:
                self.start(slot)
                started += 1
        elif len(active) > desired:
            def order(w: LocalWorker) -> tuple[int, int, float]:
                beat = heartbeats.get(w.worker_id, {})
                state = beat.get("state", "") if beat else "booting"
                size = int(float(beat.get("current_batch_size") or 0)) if beat else 0
                return DRAIN_ORDER.get(state, 1), size, -w.started

            for w in sorted(active, key=order)[: len(active) - desired]:
                self.drain(w, booted=w.worker_id in heartbeats and heartbeats[w.worker_id].get("state") != "booting")
                drained += 1
        return started, drained

    def adopt(self, heartbeats: Mapping[str, Mapping[str, str]]) -> list[LocalWorker]:
        """Take over the live workers of this pool on this host that no driver here runs (a killed scheduler's
        orphans), each into the slot it occupies; returns them. ``heartbeats``: the pool's live workers."""
        self.adopted = True
        host = socket.gethostname()
        taken: list[LocalWorker] = []
        for wid, beat in sorted(heartbeats.items()):
            if wid in self.workers or beat.get("host") != host:
                continue
            try:
                pid = int(beat.get("pid") or "")
            except ValueError:
                continue
            proc = AdoptedProcess(pid, wid)
            if pid == os.getpid() or not proc.alive():
                continue
            slot = self._slot_of(wid, beat)
            if slot is None:
                self.log.warning("live worker of this pool left alone: no free slot for it", worker_id=wid, pid=pid)
                continue
            w = LocalWorker(wid, slot, proc, self.clock())
            if beat.get("state") == "draining":  # told to go already: let it finish, count it as going
                w.draining = w.signalled = True
            self.workers[wid] = w
            taken.append(w)
            self.log.info("worker adopted", worker_id=wid, slot=slot.name, pid=pid, state=beat.get("state", ""))
        return taken

    def _slot_of(self, worker_id: str, beat: Mapping[str, str]) -> Slot | None:
        """The slot a worker occupies: named in its id (as :meth:`start` names it), or the GPU of its heartbeat,
        else the first free one."""
        used = {w.slot.name for w in self.workers.values()}
        free = [s for s in self.slots if s.name not in used]
        for s in free:
            if f"-{s.name.replace(':', '')}-" in worker_id:
                return s
        uuid_ = beat.get("gpu_uuid", "")
        for s in free:
            if uuid_ and s.env.get("CUDA_VISIBLE_DEVICES") == uuid_:
                return s
        return free[0] if free else None

    def _signal_booted(self, heartbeats: Mapping[str, Mapping[str, str]]) -> None:
        now = self.clock()
        for w in self.draining():
            beat = heartbeats.get(w.worker_id)
            if not w.signalled and ((beat and beat.get("state") != "booting") or now - w.started > BOOT_LIMIT_S):
                self._terminate(w)

    def start(self, slot: Slot) -> LocalWorker:
        worker_id = f"{os.uname().nodename}-{self.pool}-{slot.name.replace(':', '')}-{uuid.uuid4().hex[:6]}"
        argv = [self.python, "-m", "sdfleet.cli", "worker", "--model", self.model, "--device", slot.device,
                "--worker-id", worker_id, *self.worker_args]
        if self.metrics_port_base is not None:
            argv += ["--metrics-port", str(self.metrics_port_base + self.slots.index(slot))]
        # Its own session: a Ctrl-C at the scheduler's terminal must not reach the workers directly; the
        # scheduler drains them itself, with SIGTERM.
        proc = subprocess.Popen(argv, env=slot.env, start_new_session=True)
        w = LocalWorker(worker_id, slot, proc, self.clock())
        self.workers[worker_id] = w
        self.log.info("worker started", worker_id=worker_id, slot=slot.name, device=slot.device, pid=proc.pid)
        return w

    def drain(self, w: LocalWorker, booted: bool = True) -> None:
        """SIGTERM: the worker stops consuming, finishes its batch, hands back the rest and exits 0.

        A worker still booting (no heartbeat, or state booting) gets the signal once it is up: before its
        handlers are installed SIGTERM would end it with -15 instead of a drain; it holds no job meanwhile.
        """
        if w.draining:
            return
        w.draining = True
        self.log.info("worker draining", worker_id=w.worker_id, slot=w.slot.name, deferred=not booted)
        if booted:
            self._terminate(w)

    def _terminate(self, w: LocalWorker) -> None:
        w.signalled = True
        try:
            w.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop_all(self, timeout_s: float) -> bool:
        """Drain every worker and wait up to ``timeout_s`` for them to exit; True if all did."""
        for w in list(self.workers.values()):
            w.draining = True
            if not w.signalled:
                self._terminate(w)
        deadline = self.clock() + timeout_s
        while self.workers and self.clock() < deadline:
            self.poll()
            time.sleep(0.1)
        for w in self.workers.values():  # left running, still draining: never killed
            self.log.warning("worker still draining at scheduler exit", worker_id=w.worker_id, pid=w.proc.pid)
        return not self.workers


@dataclass
class ExternalDriver:
    """Starts nothing: something else (KEDA, an operator) acts on the desired count the scheduler serves."""

    pool: str = ""

    def reconcile(self, desired: int, heartbeats: Mapping[str, Mapping[str, str]]) -> tuple[int, int]:
        return 0, 0

    def stop_all(self, timeout_s: float) -> bool:
        return True
