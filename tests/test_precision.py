"""--precision resolution: auto picks by device, explicit fp8 without FP8 hardware is a clear error."""

from __future__ import annotations

import pytest
import torch

from sdfleet.errors import ConfigError, PrecisionUnsupported
from worker.engine import precision
from worker.engine.precision import resolve_precision


def test_auto_on_cpu_is_fp32():
    p, reason = resolve_precision("auto", "cpu")
    assert p == "fp32" and "cpu" in reason


@pytest.mark.parametrize("req", ["bf16", "fp32"])
def test_explicit_bf16_fp32_honoured_on_cpu(req):
    assert resolve_precision(req, "cpu")[0] == req


def test_explicit_fp8_on_cpu_raises():
    with pytest.raises(PrecisionUnsupported, match="fp8.*cpu.*--precision"):
        resolve_precision("fp8", "cpu")
    assert PrecisionUnsupported.exit_code == 2


def test_unknown_precision_is_config_error():
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", "cpu")


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this test is about machines without CUDA")
    with pytest.raises(PrecisionUnsupported, match="CUDA is not available"):
        resolve_precision("auto", "cuda")


@pytest.mark.parametrize("cap,req,want", [
    ((9, 0), "auto", "fp8"), ((8, 9), "auto", "fp8"), ((8, 0), "auto", "bf16"), ((7, 5), "auto", "bf16"),
    ((9, 0), "fp8", "fp8"), ((9, 0), "bf16", "bf16"),
])
def test_gpu_capabilities(monkeypatch, cap, req, want):
    monkeypatch.setattr(precision, "_describe", lambda device: (f"GPU (compute capability {cap[0]}.{cap[1]})", cap))
    monkeypatch.setattr(precision, "_triton_present", lambda: True)
    p, reason = resolve_precision(req, "cuda:0")
    assert p == want and reason


def test_explicit_fp8_on_old_gpu_raises(monkeypatch):
    monkeypatch.setattr(precision, "_describe", lambda device: ("A100 (compute capability 8.0)", (8, 0)))
    with pytest.raises(PrecisionUnsupported, match="8.9"):
        resolve_precision("fp8", "cuda")


def test_auto_without_triton_prefers_bf16(monkeypatch):
    monkeypatch.setattr(precision, "_describe", lambda device: ("H100 (compute capability 9.0)", (9, 0)))
    monkeypatch.setattr(precision, "_triton_present", lambda: False)
    p, reason = resolve_precision("auto", "cuda")
    assert p == "bf16" and "Triton" in reason
    p, reason = resolve_precision("fp8", "cuda")  # explicit: honoured, with the reason it will be slow
    assert p == "fp8" and "Triton is missing" in reason


# --- the FP8 path per compute capability (issue 14: Ada) ----------------------------------------------------

from worker.engine.fp8 import attention as fp8_attention  # noqa: E402
from worker.engine.fp8 import processor  # noqa: E402
from worker.engine.precision import fp8_path  # noqa: E402

NAMES = {(8, 0): "NVIDIA A100", (8, 6): "NVIDIA RTX A6000", (8, 9): "NVIDIA L4", (9, 0): "NVIDIA H100",
         (10, 0): "NVIDIA B200", (12, 0): "NVIDIA RTX 5090"}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend cuda:0 is a GPU of the given compute capability (the capability caches are cleared around it)."""

    def use(cap):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: NAMES[cap])
        monkeypatch.setattr(precision, "_triton_present", lambda: True)
        monkeypatch.setattr(processor, "_device_error", {})
        precision._cuda_path.cache_clear()
        fp8_attention._device_has_tma.cache_clear()

    yield use
    precision._cuda_path.cache_clear()
    fp8_attention._device_has_tma.cache_clear()


# (linears, gemv, attention kernel, tma, words the reason must hold)
PATHS = {
    (8, 0): (False, False, False, False, ["8.0 has no FP8 tensor cores"]),
    (8, 6): (False, False, False, False, ["8.6 has no FP8 tensor cores"]),
    (8, 9): (True, True, False, False, ["CUTLASS SM89 rowwise", "GEMV on", "attention kernel off on 8.9", "SDPA"]),
    (9, 0): (True, True, True, True, ["cuBLASLt outer-vector", "GEMV on", "attention kernel allowed", "TMA on"]),
    (10, 0): (True, True, True, True, ["CUTLASS rowwise", "attention kernel allowed", "TMA on"]),
    (12, 0): (True, True, False, False, ["CUTLASS rowwise", "attention kernel off on 12.0", "SDPA"]),
}


@pytest.mark.parametrize("cap", list(PATHS))
def test_fp8_path_per_capability(cap):
    linears, gemv, attn, tma, words = PATHS[cap]
    p = fp8_path(cap, torch_version="2.11.0+cu130", triton=True)
    assert (p.fp8_linears, p.triton_gemv, p.fp8_attention, p.tma) == (linears, gemv, attn, tma)
    for w in words:
        assert w in p.reason, (w, p.reason)


def test_fp8_path_on_ada_with_a_torch_before_the_sm89_kernel():
    p = fp8_path((8, 9), torch_version="2.6.0", triton=True)
    assert not p.fp8_linears and not p.fp8_attention and not p.tma
    assert "torch 2.6.0 has no rowwise-scaled _scaled_mm for 8.9" in p.reason
    assert fp8_path((8, 9), torch_version="2.7.1", triton=True).fp8_linears


def test_fp8_path_without_triton_keeps_the_linears_only():
    p = fp8_path((9, 0), torch_version="2.11.0", triton=False)
    assert p.fp8_linears and not p.triton_gemv and not p.fp8_attention and not p.tma
    assert "no Triton" in p.reason
    assert fp8_path(None).reason == "not a CUDA GPU: no FP8 tensor cores"


@pytest.mark.parametrize("cap,want", [((8, 0), "bf16"), ((8, 6), "bf16"), ((8, 9), "fp8"), ((9, 0), "fp8"),
                                      ((10, 0), "fp8")])
def test_auto_precision_logs_the_fp8_path(fake_gpu, cap, want):
    fake_gpu(cap)
    p, reason = resolve_precision("auto", "cuda:0")
    assert p == want and NAMES[cap] in reason and f"compute capability {cap[0]}.{cap[1]}" in reason
    if want == "fp8":  # the boot line ("precision chosen") says which kernels run and why
        assert "FP8 path: E4M3 linears on torch._scaled_mm" in reason
        for w in PATHS[cap][4]:
            assert w in reason
    else:
        assert "no FP8 tensor cores (< 8.9), using bf16" in reason


def test_ada_with_old_torch_auto_picks_bf16_and_says_why(fake_gpu, monkeypatch):
    fake_gpu((8, 9))
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    p, reason = resolve_precision("auto", "cuda:0")
    assert p == "bf16" and "NVIDIA L4" in reason and "torch 2.6.0+cu124 has no rowwise-scaled _scaled_mm" in reason
    with pytest.raises(PrecisionUnsupported, match="no rowwise-scaled _scaled_mm"):
        resolve_precision("fp8", "cuda:0")


@pytest.mark.parametrize("cap,want", [((8, 0), False), ((8, 6), False), ((8, 9), False), ((9, 0), True),
                                      ((10, 0), True)])
def test_attention_asks_for_tma_only_from_9_0(fake_gpu, monkeypatch, cap, want):
    fake_gpu(cap)
    monkeypatch.setattr(fp8_attention, "TensorDescriptor", object())  # as if Triton had host descriptors
    dev = torch.device("cuda", 0)
    assert fp8_attention._use_tma({"tma": True}, dev) is want
    assert fp8_attention._use_tma({"tma": False}, dev) is False  # the switch still turns it off


class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0, to reach the processor's capability gate on the CPU."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.parametrize("cap,kernel", [((8, 9), False), ((12, 0), False), ((9, 0), True), ((10, 0), True)])
def test_processor_uses_the_fp8_kernel_only_where_the_path_allows(fake_gpu, monkeypatch, caplog, cap, kernel):
    fake_gpu(cap)
    called = []
    monkeypatch.setattr(processor, "_load_fp8", lambda: (lambda q, k, v: called.append(1) or q))
    q = torch.randn(1, 2, 8, 16).bfloat16().as_subclass(_FakeCuda)
    with caplog.at_level("WARNING", logger=processor.__name__):
        processor.attend(q, q, q, fp8=True)
        processor.attend(q, q, q, fp8=True)
    assert bool(called) is kernel
    if kernel:
        assert processor.fp8_attention_allowed(torch.device("cuda", 0))
        assert not [r for r in caplog.records if "not used on" in r.getMessage()]
    else:
        msgs = [r.getMessage() for r in caplog.records if "FP8 attention kernel not used on" in r.getMessage()]
        assert len(msgs) == 1 and NAMES[cap] in msgs[0] and "SDPA" in msgs[0]  # logged once, with the reason
        assert "not used on" in processor.fp8_attention_status()
        # the fused path (FP8 q/k/v in, E4M3 out) is refused before any kernel is loaded
        monkeypatch.setattr(processor, "_load_fp8", lambda: pytest.fail("kernel loaded on a GPU that rules it out"))
        x = torch.randn(16, 3 * 2 * 16).bfloat16().as_subclass(_FakeCuda)
        assert processor.attend_fp8_io(x, None, None, None, batch=1, heads=2, eps=1e-6, rows=(16, 0)) is None
