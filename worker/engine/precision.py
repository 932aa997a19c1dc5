"""Resolve ``--precision auto|fp8|bf16|fp32`` against the device the worker owns, and decide which parts of the
FP8 engine a GPU can run (:func:`fp8_path`: the one place that knows what each compute capability has)."""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass

import torch

from sdfleet.errors import ConfigError, PrecisionUnsupported

PRECISIONS = ("auto", "fp8", "bf16", "fp32")
#: E4M3 tensor-core MMAs exist from Ada (8.9) and Hopper (9.0) on
FP8_MIN_CAPABILITY = (8, 9)
#: TMA (the bulk tensor copy engine behind Triton's TensorDescriptor loads) and wgmma: Hopper (9.0) and later
TMA_MIN_CAPABILITY = (9, 0)
#: rowwise-scaled ``torch._scaled_mm`` on 8.9 runs CUTLASS's SM89 kernel (pytorch#144348, built for sm_89
#: since pytorch#145676), first released in torch 2.7; before that it raised "Rowwise scaling is not
#: currently supported on your device"
SM89_ROWWISE_TORCH = (2, 7)
#: where the FP8 attention kernel runs: its one config (64 x 128 tiles, 4 warps, 3 stages, maxnreg 128) was
#: tuned on an H100 for wgmma and TMA (9.x; 10.x has both and 227 KB of shared memory per block). 8.9 and
#: 12.x have neither wgmma nor (8.9) TMA: compiled for sm_89 the kernel turns into mma.sync and spills
#: registers under maxnreg 128, and it was never run or timed there, so they take SDPA.
FP8_ATTENTION_MAJORS = (9, 10)


@dataclass(frozen=True)
class Fp8Path:
    """Which parts of the FP8 engine run on one GPU, and why. The user's switches (``Fp8Options``) still turn
    parts off; this only rules out what the GPU cannot run (or what was never measured there)."""

    capability: tuple[int, int] | None
    #: E4M3 linears on ``torch._scaled_mm`` with per-row / per-output-channel scales and the bias fused
    fp8_linears: bool
    #: the library behind them
    gemm: str
    #: the few-row Triton FP8 GEMV (``kernels.gemv``, the AdaLN bank); needs Triton
    triton_gemv: bool
    #: the FP8 flash-attention kernel (``fp8/attention.py``); off: ``scaled_dot_product_attention``
    fp8_attention: bool
    #: TMA descriptors in that kernel (off: plain pointer loads, the same maths)
    tma: bool
    #: one line per decision, for the boot log
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _version(v: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def fp8_path(cap: tuple[int, int] | None, *, torch_version: str | None = None, triton: bool = True) -> Fp8Path:
    """What the FP8 engine uses on a GPU of compute capability ``cap`` (None: not a CUDA GPU).

    Sources (docs/PERFORMANCE.md, "FP8 engine on Ada"): torch's ScaledBlas.cpp sends rowwise scaling to cuBLASLt
    only on 9.0+ with cuBLAS >= 12.9 and otherwise to CUTLASS (RowwiseScaledMM.cu, whose SM89 kernel takes a
    bias and fast accumulation); Triton lowers E4M3 and INT8 ``tl.dot`` to mma.sync on 8.9 (triton#3479) and
    uses TMA and wgmma only from 9.0.
    """
    torch_version = torch.__version__ if torch_version is None else torch_version
    if cap is None:
        return Fp8Path(None, False, "", False, False, False, ("not a CUDA GPU: no FP8 tensor cores",))
    cap = (int(cap[0]), int(cap[1]))
    cc = f"{cap[0]}.{cap[1]}"
    if cap < FP8_MIN_CAPABILITY:
        return Fp8Path(cap, False, "", False, False, False,
                       (f"compute capability {cc} has no FP8 tensor cores (they need >= 8.9)",))
    reasons = []
    if cap >= TMA_MIN_CAPABILITY:
        # major >= 10: torch takes CUTLASS (its SM100 / SM120 kernels) for 2-D rowwise scales as well
        gemm = "cuBLASLt outer-vector scaling (CUTLASS with cuBLAS < 12.9)" if cap[0] == 9 else "CUTLASS rowwise"
        linears = True
    elif _version(torch_version) >= SM89_ROWWISE_TORCH:
        gemm, linears = "CUTLASS SM89 rowwise kernel (cuBLASLt scales per row only from 9.0)", True
    else:
        gemm, linears = "", False
        reasons.append(f"torch {torch_version} has no rowwise-scaled _scaled_mm for {cc} (CUTLASS's SM89 kernel "
                       f"arrived in torch {SM89_ROWWISE_TORCH[0]}.{SM89_ROWWISE_TORCH[1]}): no FP8 linears")
    if linears:
        reasons.append(f"E4M3 linears on torch._scaled_mm ({gemm})")
    gemv = linears and triton
    if linears:
        reasons.append("few-row Triton FP8 GEMV " + ("on" if gemv else "off (no Triton)"))
    attention = linears and triton and cap[0] in FP8_ATTENTION_MAJORS
    if attention:
        reasons.append("FP8 attention kernel allowed")
    elif linears and not triton:
        reasons.append("FP8 attention kernel off (no Triton): SDPA")
    elif linears:
        reasons.append(f"FP8 attention kernel off on {cc}: its one config (64x128 tiles, 3 stages, maxnreg 128) "
                       "was tuned for Hopper's wgmma and TMA, spills registers as mma.sync code (compiled for "
                       f"sm_89) and was never run or timed on {cc}: SDPA")
    tma = attention and tma_supported(cap)  # the rule attention._use_tma applies at launch
    if attention:
        reasons.append("TMA on" if tma else f"TMA off (needs compute capability >= 9.0, device has {cc})")
    return Fp8Path(cap, linears, gemm, gemv, attention, tma, tuple(reasons))


def tma_supported(cap: tuple[int, int] | None) -> bool:
    """Whether a GPU of compute capability ``cap`` has TMA (what attention.py's descriptor loads need)."""
    return cap is not None and tuple(cap) >= TMA_MIN_CAPABILITY


def _device_index(device: str | int | torch.device | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_path(index: int) -> tuple[str, Fp8Path]:
    cap = tuple(torch.cuda.get_device_capability(index))
    return torch.cuda.get_device_name(index), fp8_path(cap, triton=_triton_present())


def device_fp8_path(device: str | int | torch.device | None = None) -> tuple[str, Fp8Path]:
    """(device name, :func:`fp8_path`) of a CUDA device, read once per device. Call ``.cache_clear()`` on
    :func:`_cuda_path` to read again (tests)."""
    return _cuda_path(_device_index(device))


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

    auto: fp8 where :func:`fp8_path` says the FP8 linears run (compute capability >= 8.9; on 8.9 with torch
    >= 2.7), bf16 on other GPUs, fp32 on the CPU. An explicit fp8 on a device without them raises
    :class:`PrecisionUnsupported`; an explicit bf16 or fp32 is honoured anywhere (bf16 on a CPU is slow but
    correct). Without Triton the FP8 engine quantizes with plain torch ops, measured slower than BF16 (0.67x
    on an H100), so auto then picks bf16. With fp8 the reason ends with the FP8 path (which kernels run).
    """
    requested = (requested or "auto").lower()
    if requested not in PRECISIONS:
        raise ConfigError(f"--precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    name, cap = _describe(device)
    triton = _triton_present()
    path = fp8_path(cap, triton=triton)
    fp8_ok = path.fp8_linears
    where = f"FP8 path: {path.reason}"
    if requested == "fp8":
        if not fp8_ok:
            if cap is None:
                why = "it is not a CUDA GPU"
            elif cap < FP8_MIN_CAPABILITY:
                why = "FP8 needs compute capability >= 8.9"
            else:
                why = path.reason
            raise PrecisionUnsupported(f"--precision fp8 cannot run on {name}: {why}; "
                                       "use --precision auto (picks bf16 on GPUs, fp32 on CPU) or bf16")
        if not triton:
            return "fp8", (f"requested fp8; {name} has FP8 tensor cores, but Triton is missing: activation "
                           f"quantization runs unfused, slower than bf16; {where}")
        return "fp8", f"requested fp8; {name} has FP8 tensor cores; {where}"
    if requested in ("bf16", "fp32"):
        return requested, f"requested {requested} on {name}"
    if fp8_ok and not triton:
        return "bf16", f"auto: {name} has FP8 tensor cores but Triton is missing (unfused FP8 is slower), using bf16"
    if fp8_ok:
        return "fp8", f"auto: {name} has FP8 tensor cores (>= 8.9); {where}"
    if cap is not None and cap >= FP8_MIN_CAPABILITY:
        return "bf16", f"auto: {name} has FP8 tensor cores but {path.reason}; using bf16"
    if cap is not None:
        return "bf16", f"auto: {name} has no FP8 tensor cores (< 8.9), using bf16"
    return "fp32", f"auto: {name} has no GPU, using fp32"
