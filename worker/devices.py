"""Which GPU a worker owns: ``--device`` resolved against ``CUDA_VISIBLE_DEVICES``, NVML, and a per-GPU lock.

A host runs one worker per GPU. ``--device cuda:N`` means GPU N *of what this process was given*: the N-th
entry of an inherited ``CUDA_VISIBLE_DEVICES`` list (integers, ``GPU-<uuid>`` or ``MIG-<uuid>``), or of all
GPUs when the variable is unset. The worker then runs with ``CUDA_VISIBLE_DEVICES`` set to that one GPU's
UUID, so inside it the GPU is always ``cuda:0``, and NVML is asked about that physical GPU by UUID, never by
an index (NVML's indices and CUDA's are different enumerations).

Every NVML call goes through a module-like object passed as ``nvml`` (default: ``pynvml``, initialised once),
so the mapping logic is tested with a fake on machines without GPUs.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdfleet.errors import ConfigError

CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"

_SPEC = re.compile(r"^cuda(?::(\d+))?$")
# CUDA accepts a unique prefix of a GPU UUID; MIG instances are named by their full UUID only.
_GPU_UUID = re.compile(r"^GPU-[0-9a-fA-F][0-9a-fA-F-]*$")
_MIG_UUID = re.compile(r"^MIG-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# The usual ways of hiding every GPU from a process.
_NO_GPUS = frozenset({"", "-1"})


@dataclass(frozen=True)
class DeviceAssignment:
    """The device a worker owns, and how its process must be set up to own exactly that one."""

    spec: str
    #: the device the engine uses inside the worker process
    torch_device: str
    #: the value of CUDA_VISIBLE_DEVICES for the worker process; "" on the CPU, so no CUDA context is made
    cuda_visible_devices: str
    uuid: str | None = None
    pci_bus_id: str | None = None
    name: str | None = None

    @property
    def is_gpu(self) -> bool:
        return self.uuid is not None

    def describe(self) -> dict[str, str]:
        """Fields for logs and the heartbeat."""
        out = {"device": self.spec}
        if self.is_gpu:
            out.update(gpu_uuid=self.uuid or "", gpu_pci_bus_id=self.pci_bus_id or "", gpu_name=self.name or "")
        return out


# --- NVML ---------------------------------------------------------------------------------------------------

_nvml_lock = threading.Lock()
_nvml_loaded: list[Any] = []  # [] not tried yet; [None] absent; [module] initialised


def load_nvml() -> Any | None:
    """``pynvml``, initialised once per process; None when the library or the driver is absent."""
    with _nvml_lock:
        if not _nvml_loaded:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_loaded.append(pynvml)
            except Exception:  # no package, no libnvidia-ml, no driver: all mean "no NVML here"
                _nvml_loaded.append(None)
        return _nvml_loaded[0]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_mig(nvml: Any, handle: Any) -> bool:
    try:
        flag = nvml.nvmlDeviceIsMigDeviceHandle(handle)
    except nvml.NVMLError:  # drivers before MIG existed
        return False
    return bool(getattr(flag, "value", flag))


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:  # GPUs without MIG answer "not supported"
        return False
    return current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)


def _identity(nvml: Any, handle: Any) -> tuple[str, str, str]:
    """(UUID, PCI bus id, name) of a device handle; a MIG instance reports its parent GPU's bus id."""
    uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle) if _is_mig(nvml, handle) else handle
    bus_id = _text(nvml.nvmlDeviceGetPciInfo(parent).busId)
    return uuid, bus_id, _text(nvml.nvmlDeviceGetName(handle))


# --- CUDA_VISIBLE_DEVICES -----------------------------------------------------------------------------------


def _parse_visible(raw: str) -> list[str]:
    """The entries of a CUDA_VISIBLE_DEVICES value, checked for form.

    CUDA silently ignores everything from the first entry it cannot use, so a typo would shift which GPU
    a worker gets: anything that is not a non-negative integer or a GPU/MIG UUID is an error here.
    """
    if raw.strip() in _NO_GPUS:
        return []
    entries = [e.strip() for e in raw.split(",")]
    for pos, entry in enumerate(entries):
        if not (entry.isdigit() or _GPU_UUID.match(entry) or _MIG_UUID.match(entry)):
            raise ConfigError(
                f"{CUDA_VISIBLE}={raw!r}: entry {pos} ({entry!r}) is not a GPU index, GPU-<uuid> or MIG-<uuid>; "
                f"fix the list (the UUIDs are those of 'nvidia-smi -L') or unset it to use every GPU")
    if len(set(entries)) != len(entries):
        raise ConfigError(f"{CUDA_VISIBLE}={raw!r} names a GPU twice; list each GPU once")
    return entries


def _all_handles(nvml: Any) -> list[Any]:
    return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]


def _handle_for(nvml: Any, entry: str, raw: str, environ: Mapping[str, str]) -> Any:
    """The NVML handle of one CUDA_VISIBLE_DEVICES entry."""
    where = f"{CUDA_VISIBLE}={raw!r}"
    if entry.isdigit():
        handles = _all_handles(nvml)
        index = int(entry)
        if index >= len(handles):
            raise ConfigError(f"{where}: NVML finds no GPU {index} (this host has {len(handles)}); "
                              f"fix the list, e.g. with the UUIDs of 'nvidia-smi -L'")
        # An integer is CUDA's index. CUDA orders fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, NVML
        # orders by PCI bus: the two agree on a host of identical GPUs (ties go by bus), not on a mixed one.
        names = {_text(nvml.nvmlDeviceGetName(h)) for h in handles}
        if len(names) > 1 and environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
            raise ConfigError(f"{where}: on a host with different GPU models ({', '.join(sorted(names))}) an "
                              f"index is ambiguous; set CUDA_DEVICE_ORDER=PCI_BUS_ID or list GPU UUIDs")
        return handles[index]
    if entry.startswith("MIG-"):
        try:
            return nvml.nvmlDeviceGetHandleByUUID(entry)
        except nvml.NVMLError as exc:
            raise ConfigError(f"{where}: NVML finds no MIG instance {entry} ({exc}); "
                              f"use a UUID that 'nvidia-smi -L' lists") from None
    matches = [h for h in _all_handles(nvml) if _text(nvml.nvmlDeviceGetUUID(h)).lower().startswith(entry.lower())]
    if len(matches) != 1:
        found = "no GPU" if not matches else f"{len(matches)} GPUs"
        raise ConfigError(f"{where}: NVML finds {found} whose UUID starts with {entry}; "
                          f"use a full UUID that 'nvidia-smi -L' lists")
    return matches[0]


def _visible_handles(environ: Mapping[str, str], nvml: Any) -> list[Any]:
    """NVML handles of the GPUs this process may use, in CUDA's order, each physical GPU once."""
    raw = environ.get(CUDA_VISIBLE)
    if raw is None:
        return _all_handles(nvml)
    handles = [_handle_for(nvml, e, raw, environ) for e in _parse_visible(raw)]
    uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
    if len(set(uuids)) != len(uuids):
        raise ConfigError(f"{CUDA_VISIBLE}={raw!r} names one GPU twice (by index and by UUID); list each once")
    return handles


def _no_nvml(what: str) -> ConfigError:
    return ConfigError(f"{what} needs NVML (libnvidia-ml from the NVIDIA driver, and nvidia-ml-py), which "
                       f"cannot be loaded here; install the driver, or run on the CPU with --device cpu")


def resolve_device(spec: str, environ: Mapping[str, str], nvml: Any | None = None) -> DeviceAssignment:
    """Resolve ``--device`` (``cpu``, ``cuda`` or ``cuda:N``) for a worker process started with ``environ``.

    N indexes the GPUs this process was given (``environ``'s ``CUDA_VISIBLE_DEVICES``, else every GPU).
    Raises :class:`ConfigError` naming ``--device`` and the fix when N is out of range, and naming
    ``CUDA_VISIBLE_DEVICES`` when that list is malformed or names a GPU NVML cannot find.
    """
    spec = spec.strip()
    if spec == "cpu":
        return DeviceAssignment(spec="cpu", torch_device="cpu", cuda_visible_devices="")
    m = _SPEC.match(spec)
    if not m:
        raise ConfigError(f"--device {spec!r}: expected cpu or cuda:N (N counts the GPUs this process may "
                          f"use, from 0), e.g. --device cuda:0")
    n = int(m.group(1) or 0)
    if nvml is None:
        nvml = load_nvml()
        if nvml is None:
            raise _no_nvml(f"--device {spec}")
    handles = _visible_handles(environ, nvml)
    if n >= len(handles):
        raw = environ.get(CUDA_VISIBLE)
        given = f"{CUDA_VISIBLE}={raw!r}" if raw is not None else "every GPU of the host"
        if not handles:
            fix = "this process may use no GPU: unset CUDA_VISIBLE_DEVICES, or run with --device cpu"
        else:
            choices = "cuda:0" if len(handles) == 1 else f"cuda:0 .. cuda:{len(handles) - 1}"
            fix = f"use --device {choices}, or widen {CUDA_VISIBLE}"
        raise ConfigError(f"--device {spec}: this process was given {len(handles)} GPU(s) ({given}); {fix}")
    if not _is_mig(nvml, handles[n]) and _mig_enabled(nvml, handles[n]):
        # CUDA cannot use a MIG-mode GPU as a whole: pinning its GPU UUID would leave the worker no device.
        gpu = _text(nvml.nvmlDeviceGetUUID(handles[n]))
        raise ConfigError(f"--device {spec}: GPU {gpu} is in MIG mode; list the MIG instances to use in "
                          f"{CUDA_VISIBLE} by their MIG-<uuid> ('nvidia-smi -L'), one worker per instance")
    uuid, bus_id, name = _identity(nvml, handles[n])
    return DeviceAssignment(spec=spec, torch_device="cuda:0", cuda_visible_devices=uuid, uuid=uuid,
                            pci_bus_id=bus_id, name=name)


def visible_gpus(environ: Mapping[str, str], nvml: Any | None = None) -> list[str]:
    """The ``--device`` specs (``cuda:0`` .. ``cuda:K-1``) of the GPUs a process started with ``environ`` may
    use, for starting one worker per GPU; [] on a host without NVIDIA GPUs.
    """
    if nvml is None:
        nvml = load_nvml()
        if nvml is None:
            raw = environ.get(CUDA_VISIBLE)
            if raw is None or raw.strip() in _NO_GPUS:
                return []
            raise _no_nvml(f"{CUDA_VISIBLE}={raw!r}")
    return [f"cuda:{i}" for i in range(len(_visible_handles(environ, nvml)))]


# --- per-GPU lock -------------------------------------------------------------------------------------------


@dataclass
class GpuLock:
    """An exclusive flock on ``<lock_dir>/<uuid>.lock``; the kernel drops it when the process dies."""

    uuid: str
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor of the open file releases the flock
            self.fd = -1
            _held.pop(self.uuid, None)


# Held here so the descriptor lives as long as the process: if a lock object were garbage-collected, the
# file would close and the GPU would silently become claimable by a second worker.
_held: dict[str, GpuLock] = {}


def lock_gpu(uuid: str, lock_dir: str | os.PathLike[str], *, device: str = "") -> GpuLock:
    """Claim the GPU ``uuid`` for this process, or raise :class:`ConfigError` naming the other holder.

    Non-blocking: a second worker for the same GPU fails at boot instead of waiting. The descriptor is
    close-on-exec, and the worker's helper processes are spawned (fork + exec), so none of them keeps the
    lock after the worker dies.
    """
    if not (_GPU_UUID.match(uuid) or _MIG_UUID.match(uuid)):
        raise ValueError(f"not a GPU or MIG UUID: {uuid!r}")
    path = Path(lock_dir) / f"{uuid}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise ConfigError(f"cannot create the GPU lock {path} ({exc.strerror}); set SDFLEET_GPU_LOCK_DIR to a "
                          f"local directory every worker of this host can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        # The holder writes its pid just after taking the lock: give it a moment, so the message can name it.
        for _ in range(20):
            if holder.isdigit():
                break
            time.sleep(0.025)
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "a process that is still starting"
        of = f" ({device} of this process)" if device else ""
        raise ConfigError(f"GPU {uuid}{of} is already claimed by another worker on this host ({who}, lock "
                          f"{path}); give each worker its own --device, or stop that worker first") from None
    # Only the holder writes, so a reader of a held lock sees this pid (or nothing yet); a stale pid left
    # by a dead holder is overwritten by the next one.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    lock = GpuLock(uuid=uuid, path=path, fd=fd)
    _held[uuid] = lock
    return lock


# --- NVML metrics -------------------------------------------------------------------------------------------


class GpuProbe:
    """NVML readings of one GPU, found by UUID (``GPU-``/``MIG-``) or PCI bus id, never by index.

    ``sample()`` returns what the device reports: ``gpu_util_pct``, ``gpu_mem_used_bytes``,
    ``gpu_mem_total_bytes``, ``gpu_temp_c``, ``gpu_power_w``. A reading the device does not support (a MIG
    instance has no temperature or power of its own) is left out; without NVML the dict is empty, and
    that is logged once.
    """

    def __init__(self, gpu_id: str, nvml: Any | None = None, log: Any | None = None):
        self.gpu_id = gpu_id
        self._nvml = nvml
        self._log = log
        self._handle: Any = None
        self._unavailable = False
        self._missing_logged: set[str] = set()

    def _open(self) -> Any | None:
        if self._handle is not None or self._unavailable:
            return self._handle
        nvml = self._nvml if self._nvml is not None else load_nvml()
        reason = "NVML cannot be loaded"
        if nvml is not None:
            self._nvml = nvml
            try:
                if self.gpu_id.startswith(("GPU-", "MIG-")):
                    self._handle = nvml.nvmlDeviceGetHandleByUUID(self.gpu_id)
                else:
                    self._handle = nvml.nvmlDeviceGetHandleByPciBusId(self.gpu_id)
                return self._handle
            except nvml.NVMLError as exc:
                reason = f"NVML finds no such GPU ({exc})"
        self._unavailable = True
        if self._log is not None:
            self._log.warning("no GPU metrics", gpu=self.gpu_id, reason=reason)
        return None

    def sample(self) -> dict[str, float]:
        handle = self._open()
        if handle is None:
            return {}
        nvml = self._nvml
        out: dict[str, float] = {}
        readings = {
            "gpu_util_pct": lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "gpu_mem": lambda: nvml.nvmlDeviceGetMemoryInfo(handle),
            "gpu_temp_c": lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            "gpu_power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # NVML reports milliwatts
        }
        for name, read in readings.items():
            try:
                value = read()
            except nvml.NVMLError as exc:
                if name not in self._missing_logged and self._log is not None:
                    self._log.info("GPU metric not available", gpu=self.gpu_id, metric=name, reason=str(exc))
                self._missing_logged.add(name)
                continue
            if name == "gpu_mem":
                out["gpu_mem_used_bytes"] = float(value.used)
                out["gpu_mem_total_bytes"] = float(value.total)
            else:
                out[name] = value
        return out
