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
