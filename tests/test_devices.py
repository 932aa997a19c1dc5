"""GPU selection: --device against CUDA_VISIBLE_DEVICES, NVML by UUID, and the per-GPU lock.

NVML cannot run here (no NVIDIA driver on these machines), so a fake NVML module stands in for pynvml: the
same function names, return shapes (``.busId``, ``.gpu``, ``.used``/``.total``, milliwatts) and pynvml's own
error classes. The lock tests use real processes and real flocks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

from sdfleet.errors import ConfigError
from sdfleet.settings import Settings
from worker import devices
from worker.devices import GpuProbe, lock_gpu, resolve_device, visible_gpus

ROOT = Path(__file__).resolve().parent.parent

UUIDS = [f"GPU-{i}a{i}b{i}c{i}d-0000-1111-2222-33334444555{i}" for i in range(4)]
BUS_IDS = [f"00000000:{0x17 + 0x20 * i:02X}:00.0" for i in range(4)]
MIG_UUID = "MIG-0f0e0d0c-0b0a-0908-0706-050403020100"


class FakeGpu:
    def __init__(self, uuid: str, bus_id: str, name: str = "NVIDIA H200", parent: FakeGpu | None = None):
        self.uuid, self.bus_id, self.name, self.parent = uuid, bus_id, name, parent
        self.util, self.used, self.total, self.temp, self.power_mw = 87, 30 * 2**30, 141 * 2**30, 61, 512_000
        self.mig_capable, self.mig_mode = parent is None, False


class FakeNvml:
    """pynvml's surface as this module uses it, over a list of GPUs (plus MIG instances by UUID)."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, gpus: list[FakeGpu], migs: list[FakeGpu] = ()):
        self.gpus, self.migs = gpus, list(migs)
        self.by_index_calls = 0

    @staticmethod
    def _err(code: int) -> pynvml.NVMLError:
        return pynvml.NVMLError(code)

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        self.by_index_calls += 1
        if not 0 <= i < len(self.gpus):
            raise self._err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for g in self.gpus + self.migs:
            if g.uuid == uuid:  # real NVML wants the full UUID
                return g
        raise self._err(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        for g in self.gpus:
            if g.bus_id.lower() == bus_id.lower():
                return g
        raise self._err(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, h):
        return h.uuid

    def nvmlDeviceGetName(self, h):
        return h.name

    def nvmlDeviceGetPciInfo(self, h):
        if h.parent is not None:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(busId=h.bus_id.encode())  # older pynvml returns bytes here

    def nvmlDeviceIsMigDeviceHandle(self, h):
        return int(h.parent is not None)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h):
        return h.parent

    def nvmlDeviceGetMigMode(self, h):
        if not h.mig_capable:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [int(h.mig_mode), int(h.mig_mode)]

    def nvmlDeviceGetUtilizationRates(self, h):
        if h.parent is not None:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=h.util, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=h.used, total=h.total, free=h.total - h.used)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        if h.parent is not None:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return h.temp

    def nvmlDeviceGetPowerUsage(self, h):
        if h.parent is not None:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return h.power_mw


def four_gpus() -> FakeNvml:
    gpus = [FakeGpu(u, b) for u, b in zip(UUIDS, BUS_IDS)]
    gpus[3].util = 42
    return FakeNvml(gpus, migs=[FakeGpu(MIG_UUID, "", name="NVIDIA H200 MIG 1g.18gb", parent=gpus[1])])


class Log:
    def __init__(self):
        self.lines: list[tuple[str, str, dict]] = []

    def warning(self, event, **kw):
        self.lines.append(("warning", event, kw))

    def info(self, event, **kw):
        self.lines.append(("info", event, kw))


# --- resolve_device ----------------------------------------------------------------------------------------


def test_inherited_index_list_maps_to_the_physical_gpu():
    nvml = four_gpus()
    a = resolve_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "2,3"}, nvml)
    assert (a.uuid, a.pci_bus_id, a.name) == (UUIDS[3], BUS_IDS[3], "NVIDIA H200")
    # The worker process sees exactly that GPU, named unambiguously, as its cuda:0.
    assert a.cuda_visible_devices == UUIDS[3]
    assert a.torch_device == "cuda:0"
    assert a.describe()["gpu_uuid"] == UUIDS[3]


def test_without_a_list_n_is_the_host_gpu_n():
    a = resolve_device("cuda:2", {}, four_gpus())
    assert (a.uuid, a.cuda_visible_devices) == (UUIDS[2], UUIDS[2])
    assert resolve_device("cuda", {}, four_gpus()).uuid == UUIDS[0]


def test_uuid_entries_full_and_prefix():
    env = {"CUDA_VISIBLE_DEVICES": f"{UUIDS[3]},{UUIDS[0][:12]}"}
    assert resolve_device("cuda:0", env, four_gpus()).uuid == UUIDS[3]
    assert resolve_device("cuda:1", env, four_gpus()).uuid == UUIDS[0]
    # Mixed indices and UUIDs, and spaces after commas as shells often write them.
    assert resolve_device("cuda:1", {"CUDA_VISIBLE_DEVICES": f"1, {UUIDS[2]}"}, four_gpus()).uuid == UUIDS[2]


def test_mig_entry_reports_the_parent_bus_id():
    a = resolve_device("cuda:1", {"CUDA_VISIBLE_DEVICES": f"0,{MIG_UUID}"}, four_gpus())
    assert (a.uuid, a.pci_bus_id, a.cuda_visible_devices) == (MIG_UUID, BUS_IDS[1], MIG_UUID)


def test_a_gpu_in_mig_mode_is_used_through_its_instances():
    nvml = four_gpus()
    nvml.gpus[1].mig_mode = True
    with pytest.raises(ConfigError, match=f"GPU {UUIDS[1]} is in MIG mode.*MIG-<uuid>"):
        resolve_device("cuda:1", {}, nvml)
    assert resolve_device("cuda:0", {"CUDA_VISIBLE_DEVICES": MIG_UUID}, nvml).uuid == MIG_UUID
    assert resolve_device("cuda:0", {}, nvml).uuid == UUIDS[0]


def test_cpu_hides_the_gpus_and_needs_no_nvml():
    a = resolve_device("cpu", {"CUDA_VISIBLE_DEVICES": "0,1"}, nvml=None)
    assert (a.torch_device, a.cuda_visible_devices, a.is_gpu) == ("cpu", "", False)
    assert a.describe() == {"device": "cpu"}


@pytest.mark.parametrize("env, spec, words", [
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, "cuda:2", ["--device cuda:2", "2 GPU(s)", "cuda:0 .. cuda:1"]),
    ({}, "cuda:4", ["--device cuda:4", "every GPU of the host", "cuda:0 .. cuda:3"]),
    ({"CUDA_VISIBLE_DEVICES": ""}, "cuda:0", ["--device cuda:0", "no GPU", "--device cpu"]),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, "cuda:0", ["--device cuda:0", "no GPU"]),
    ({"CUDA_VISIBLE_DEVICES": "3"}, "cuda:1", ["--device cuda:1", "1 GPU(s)", "use --device cuda:0, or"]),
])
def test_out_of_range(env, spec, words):
    with pytest.raises(ConfigError) as exc:
        resolve_device(spec, env, four_gpus())
    for w in words:
        assert w in str(exc.value)
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("spec", ["gpu:1", "cuda:-1", "cuda:x", "cuda:0:1", "CUDA:0", ""])
def test_bad_spec_names_the_flag(spec):
    with pytest.raises(ConfigError, match=r"--device .*expected cpu or cuda:N"):
        resolve_device(spec, {}, four_gpus())


@pytest.mark.parametrize("raw, words", [
    ("0,,1", ["entry 1", "''"]),
    ("0,gpu1", ["entry 1", "'gpu1'"]),
    ("0,-1", ["entry 1"]),          # CUDA would silently drop everything from here on
    ("MIG-GPU-abc/1/0", ["entry 0"]),  # the older MIG-GPU-<uuid>/<gi>/<ci> form
    ("GPU-", ["entry 0"]),
    ("1,1", ["twice"]),
    (f"0,{UUIDS[0]}", ["twice"]),   # one physical GPU by index and by UUID
])
def test_malformed_list(raw, words):
    with pytest.raises(ConfigError) as exc:
        resolve_device("cuda:0", {"CUDA_VISIBLE_DEVICES": raw}, four_gpus())
    assert "CUDA_VISIBLE_DEVICES" in str(exc.value)
    for w in words:
        assert w in str(exc.value)


@pytest.mark.parametrize("raw, words", [
    ("7", ["no GPU 7", "has 4"]),
    ("GPU-ffffffff-0000-0000-0000-000000000000", ["no GPU whose UUID starts with"]),
    ("MIG-ffffffff-0000-0000-0000-000000000000", ["no MIG instance"]),
])
def test_nvml_cannot_find_the_gpu(raw, words):
    with pytest.raises(ConfigError) as exc:
        resolve_device("cuda:0", {"CUDA_VISIBLE_DEVICES": raw}, four_gpus())
    for w in words:
        assert w in str(exc.value)


def test_ambiguous_uuid_prefix():
    nvml = four_gpus()
    nvml.gpus[1].uuid = UUIDS[0][:-1] + "9"
    with pytest.raises(ConfigError, match="2 GPUs whose UUID starts with"):
        resolve_device("cuda:0", {"CUDA_VISIBLE_DEVICES": UUIDS[0][:10]}, nvml)


def test_indices_on_a_mixed_host_need_pci_bus_order():
    nvml = four_gpus()
    nvml.gpus[0].name = "NVIDIA H100 PCIe"
    with pytest.raises(ConfigError, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        resolve_device("cuda:0", {"CUDA_VISIBLE_DEVICES": "1,0"}, nvml)
    env = {"CUDA_VISIBLE_DEVICES": "1,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert resolve_device("cuda:1", env, nvml).uuid == UUIDS[0]
    # UUIDs are unambiguous whatever the order.
    assert resolve_device("cuda:0", {"CUDA_VISIBLE_DEVICES": UUIDS[0]}, nvml).uuid == UUIDS[0]


def test_cuda_without_nvml_is_a_config_error(monkeypatch):
    monkeypatch.setattr(devices, "_nvml_loaded", [None])
    with pytest.raises(ConfigError, match="--device cuda:0 needs NVML"):
        resolve_device("cuda:0", {}, nvml=None)


# --- visible_gpus ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, expected", [
    ({}, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, ["cuda:0", "cuda:1"]),
    ({"CUDA_VISIBLE_DEVICES": UUIDS[1]}, ["cuda:0"]),
    ({"CUDA_VISIBLE_DEVICES": ""}, []),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, []),
])
def test_visible_gpus(env, expected):
    nvml = four_gpus()
    specs = visible_gpus(env, nvml)
    assert specs == expected
    # Each spec resolves, in the same environment, to a different physical GPU.
    assert len({resolve_device(s, env, nvml).uuid for s in specs}) == len(specs)


def test_visible_gpus_rejects_a_bad_list():
    with pytest.raises(ConfigError, match="no GPU 9"):
        visible_gpus({"CUDA_VISIBLE_DEVICES": "0,9"}, four_gpus())


def test_visible_gpus_without_nvml(monkeypatch):
    monkeypatch.setattr(devices, "_nvml_loaded", [None])
    assert visible_gpus({}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    with pytest.raises(ConfigError, match="needs NVML"):
        visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"})


# --- GpuProbe ----------------------------------------------------------------------------------------------


def test_probe_reads_its_gpu_by_uuid():
    nvml = four_gpus()
    a = resolve_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "2,3"}, nvml)
    nvml.by_index_calls = 0
    probe = GpuProbe(a.uuid, nvml)
    assert probe.sample() == {"gpu_util_pct": 42.0, "gpu_mem_used_bytes": float(30 * 2**30),
                              "gpu_mem_total_bytes": float(141 * 2**30), "gpu_temp_c": 61.0, "gpu_power_w": 512.0}
    nvml.gpus[3].util = 99
    assert probe.sample()["gpu_util_pct"] == 99.0
    assert nvml.by_index_calls == 0


def test_probe_by_pci_bus_id():
    nvml = four_gpus()
    nvml.gpus[2].temp = 70
    assert GpuProbe(BUS_IDS[2].lower(), nvml).sample()["gpu_temp_c"] == 70.0


def test_probe_leaves_out_what_a_mig_instance_does_not_report():
    log = Log()
    probe = GpuProbe(MIG_UUID, four_gpus(), log=log)
    for _ in range(3):
        assert probe.sample() == {"gpu_mem_used_bytes": float(30 * 2**30), "gpu_mem_total_bytes": float(141 * 2**30)}
    assert sorted(kw["metric"] for _, _, kw in log.lines) == ["gpu_power_w", "gpu_temp_c", "gpu_util_pct"]


def test_probe_without_nvml_is_empty_and_logs_once(monkeypatch):
    monkeypatch.setattr(devices, "_nvml_loaded", [None])
    log = Log()
    probe = GpuProbe(UUIDS[0], log=log)
    assert probe.sample() == {} and probe.sample() == {}
    assert [(lvl, ev) for lvl, ev, _ in log.lines] == [("warning", "no GPU metrics")]


def test_probe_of_an_unknown_gpu_is_empty_and_logs_once():
    log = Log()
    probe = GpuProbe("GPU-ffffffff-0000-0000-0000-000000000000", four_gpus(), log=log)
    assert probe.sample() == {} and probe.sample() == {}
    assert len(log.lines) == 1 and "no such GPU" in log.lines[0][2]["reason"]


# --- the per-GPU lock (real processes, real flocks) --------------------------------------------------------

CLAIM = """
import sys
from sdfleet.errors import ConfigError
from worker.devices import lock_gpu
try:
    lock_gpu(sys.argv[1], sys.argv[2], device="cuda:0")
except ConfigError as exc:
    print("refused", exc, flush=True)
    sys.exit(exc.exit_code)
print("claimed", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin (or kills this process)
"""


def claimer(lock_dir: Path, uuid: str = UUIDS[0]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLAIM, uuid, str(lock_dir)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_settings_name_the_lock_dir():
    assert Settings.from_env({}).gpu_lock_dir == "/tmp/sdfleet-gpu-locks"
    assert Settings.from_env({"SDFLEET_GPU_LOCK_DIR": "/run/locks"}).gpu_lock_dir == "/run/locks"


def test_two_processes_race_for_one_gpu(tmp_path: Path):
    procs = [claimer(tmp_path), claimer(tmp_path)]
    firsts = [p.stdout.readline().strip() for p in procs]
    assert sorted(line.split()[0] for line in firsts) == ["claimed", "refused"], firsts
    winner = procs[[line.startswith("claimed") for line in firsts].index(True)]
    loser = procs[1 - procs.index(winner)]
    loser_out = firsts[procs.index(loser)]
    assert loser.wait(30) == 2
    assert UUIDS[0] in loser_out and f"pid {winner.pid}" in loser_out and "own --device" in loser_out
    # Another GPU is not affected.
    other = claimer(tmp_path, UUIDS[1])
    assert other.stdout.readline().startswith("claimed")
    for p in (winner, other):
        p.stdin.close()
        assert p.wait(30) == 0


def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path: Path):
    holder = claimer(tmp_path)
    assert holder.stdout.readline().startswith("claimed")
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        lock_gpu(UUIDS[0], tmp_path)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(30) == -signal.SIGKILL
    lock = lock_gpu(UUIDS[0], tmp_path)  # the kernel dropped the dead process's flock
    try:
        assert (tmp_path / f"{UUIDS[0]}.lock").read_text().strip() == str(os.getpid())
        # While this process holds it, a new worker is refused.
        late = claimer(tmp_path)
        assert late.stdout.readline().startswith("refused") and late.wait(30) == 2
    finally:
        lock.release()
    assert UUIDS[0] not in devices._held
    again = claimer(tmp_path)
    assert again.stdout.readline().startswith("claimed")
    again.stdin.close()
    assert again.wait(30) == 0


def test_lock_dir_that_cannot_be_created(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="SDFLEET_GPU_LOCK_DIR"):
        lock_gpu(UUIDS[0], blocker / "locks")
