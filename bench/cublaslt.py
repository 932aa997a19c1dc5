"""The few cuBLASLt calls that ``bench/gemm_algos.py`` needs, through ctypes: the engine's FP8 GEMM (E4M3
operands, one scale a row of the activation and one a column of the weight, bf16 output, the bias in the
epilogue, fast accumulation) as ``torch._scaled_mm`` describes it to cuBLASLt, with every algorithm the
heuristic offers instead of its first.

The enum values are read from the ``cublasLt.h`` / ``library_types.h`` / ``cublas_api.h`` of the machine (the
CUDA toolkit's or the nvidia wheels'), not written here: they moved between cuBLAS releases. Only the
public C API is used.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import re
import sys
from pathlib import Path


def _header_dirs() -> list[Path]:
    """Include folders, in the order their headers are read: the nvidia wheels' first (they come with the
    cuBLAS that torch loads; a CUDA toolkit may be older), then ``$CUDA_HOME``, then the toolkits."""
    dirs: list[Path] = []
    for site in sys.path:
        dirs += [Path(p) for p in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))]
        dirs += [Path(p) for p in sorted(glob.glob(os.path.join(site, "nvidia", "*", "*", "include")))]
    dirs += [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    dirs += [Path(p) for p in sorted(glob.glob("/usr/local/cuda*/include"), reverse=True)]
    return [d for d in dirs if d.is_dir()]


HEADERS = ("cublasLt.h", "library_types.h", "cublas_api.h")


def enums() -> tuple[dict[str, int], str]:
    """NAME -> value for every ``NAME = <int>`` in the headers (and each ``#define CUBLAS_VER_* <int>``), and
    the include folder cublasLt.h came from. Each header is read from the first folder that has it: the
    wheels split them (cublasLt.h with cuBLAS, library_types.h with the CUDA runtime)."""
    dirs = _header_dirs()
    found = {name: next((d / name for d in dirs if (d / name).exists()), None) for name in HEADERS}
    if found["cublasLt.h"] is None:
        raise RuntimeError("cublasLt.h not found (nvidia wheels, CUDA_HOME, /usr/local/cuda*/include)")
    out: dict[str, int] = {}
    for f in found.values():
        if f is None:
            continue
        text = f.read_text(errors="replace")
        for k, v in re.findall(r"\b((?:CUBLASLT|CUBLAS|CUDA)_[A-Z0-9_x]+)\s*=\s*(-?\d+)\b", text):
            out.setdefault(k, int(v))
        for k, v in re.findall(r"#define\s+(CUBLAS_VER_[A-Z]+)\s+(\d+)", text):
            out.setdefault(k, int(v))
    return out, str(found["cublasLt.h"].parent)


# ScaledMM's: one read of the headers a process, not one a GEMM shape (enums() itself stays uncached: it
# answers for whatever headers the folders hold now)
_enums_once = functools.cache(enums)


USED = ("CUBLAS_COMPUTE_32F", "CUDA_R_32F", "CUDA_R_16BF", "CUDA_R_8F_E4M3", "CUBLAS_OP_N", "CUBLAS_OP_T",
        "CUBLASLT_MATMUL_DESC_TRANSA", "CUBLASLT_MATMUL_DESC_TRANSB", "CUBLASLT_MATMUL_DESC_FAST_ACCUM",
        "CUBLASLT_MATMUL_DESC_A_SCALE_POINTER", "CUBLASLT_MATMUL_DESC_B_SCALE_POINTER",
        "CUBLASLT_MATMUL_DESC_A_SCALE_MODE", "CUBLASLT_MATMUL_DESC_B_SCALE_MODE",
        "CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F", "CUBLASLT_MATMUL_DESC_EPILOGUE", "CUBLASLT_EPILOGUE_BIAS",
        "CUBLASLT_MATMUL_DESC_BIAS_POINTER", "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE",
        "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES")


def versions() -> dict:
    """cuBLAS version of the headers the enums come from, and of the library loaded (they should agree)."""
    e, _ = enums()
    missing = [n for n in USED if n not in e]
    if missing:
        raise RuntimeError(f"these headers lack {missing}: cuBLAS older than 12.9?")
    return {"cublas_headers": ".".join(str(e.get(f"CUBLAS_VER_{p}", "?")) for p in ("MAJOR", "MINOR", "PATCH")),
            "cublaslt_library": int(_lib().cublasLtGetVersion()), "enums": {n: e[n] for n in USED}}


_P, _I, _Z = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_SIGNATURES = {  # every argument typed: a size_t or 64-bit count must not travel as a 32-bit int
    "cublasLtCreate": [_P], "cublasLtDestroy": [_P],
    "cublasLtMatmulDescCreate": [_P, _I, _I], "cublasLtMatmulDescDestroy": [_P],
    "cublasLtMatmulDescSetAttribute": [_P, _I, _P, _Z],
    "cublasLtMatrixLayoutCreate": [_P, _I, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
    "cublasLtMatrixLayoutDestroy": [_P],
    "cublasLtMatmulPreferenceCreate": [_P], "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulPreferenceSetAttribute": [_P, _I, _P, _Z],
    "cublasLtMatmulAlgoGetHeuristic": [_P, _P, _P, _P, _P, _P, _P, _I, _P, _P],
    "cublasLtMatmulAlgoConfigGetAttribute": [_P, _I, _P, _Z, _P],
    "cublasLtMatmul": [_P] * 14 + [_Z, _P],
}


def _loaded_path() -> str | None:
    """The libcublasLt this process has already mapped (torch's), from /proc/self/maps."""
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if "/libcublasLt.so" in path:
                return path
    except OSError:
        pass
    return None


@functools.cache
def _lib():
    import torch

    torch.zeros(1, device="cuda") @ torch.zeros(1, 1, device="cuda")  # torch maps its cuBLAS(Lt) on first use
    path = _loaded_path()
    if path is None:
        raise RuntimeError("torch has not loaded libcublasLt: no CUDA build of torch?")
    lib = ctypes.CDLL(path)  # the same mapping as torch's: one cuBLASLt in the process
    for fn, args in _SIGNATURES.items():
        getattr(lib, fn).argtypes = args
        getattr(lib, fn).restype = _I
    lib.cublasLtGetVersion.argtypes, lib.cublasLtGetVersion.restype = [], _Z
    return lib


def _addr(obj) -> int:
    return ctypes.addressof(obj)


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heuristic(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class ScaledMM:
    """D (m, n) bf16 = (a (m, k) E4M3 * sa (m,)) @ (w (n, k) E4M3 * sw (n,))^T + bias (n,), for fixed tensors.

    cuBLASLt is column-major: the weight is its A (k x n, transposed), the activation its B (k x m), D is
    n x m; so its A scale is the weight's column scale and its B scale the activation's row scale."""

    def __init__(self, a, w, sa, sw, bias, workspace):
        import torch

        self.E, _ = _enums_once()
        self.lib = _lib()
        E, lib = self.E, self.lib
        # kept: the descriptor holds their addresses (scales, bias) and every call passes them
        self.a, self.w, self.sa, self.sw, self.bias, self.ws = a, w, sa, sw, bias, workspace
        m, k = a.shape
        n = w.shape[0]
        if a.stride(1) != 1 or w.stride(1) != 1 or w.shape[1] != k:
            raise ValueError("ScaledMM: a (m, k) and w (n, k) must be row-major with the same k")
        self.out = torch.empty((m, n), device=a.device, dtype=torch.bfloat16)
        self.handle = ctypes.c_void_p()
        self._ok(lib.cublasLtCreate(_addr(self.handle)), "cublasLtCreate")
        self.desc = ctypes.c_void_p()
        self._ok(lib.cublasLtMatmulDescCreate(_addr(self.desc), E["CUBLAS_COMPUTE_32F"], E["CUDA_R_32F"]),
                 "cublasLtMatmulDescCreate")
        i32, i8, ptr = ctypes.c_int32, ctypes.c_int8, ctypes.c_void_p
        self._set("CUBLASLT_MATMUL_DESC_TRANSA", i32(E["CUBLAS_OP_T"]))
        self._set("CUBLASLT_MATMUL_DESC_TRANSB", i32(E["CUBLAS_OP_N"]))
        self._set("CUBLASLT_MATMUL_DESC_FAST_ACCUM", i8(1))
        self._set("CUBLASLT_MATMUL_DESC_A_SCALE_POINTER", ptr(sw.data_ptr()))
        self._set("CUBLASLT_MATMUL_DESC_B_SCALE_POINTER", ptr(sa.data_ptr()))
        outer = E["CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F"]
        self._set("CUBLASLT_MATMUL_DESC_A_SCALE_MODE", i32(outer))
        self._set("CUBLASLT_MATMUL_DESC_B_SCALE_MODE", i32(outer))
        if bias is not None:
            self._set("CUBLASLT_MATMUL_DESC_EPILOGUE", i32(E["CUBLASLT_EPILOGUE_BIAS"]))
            self._set("CUBLASLT_MATMUL_DESC_BIAS_POINTER", ptr(bias.data_ptr()))
            self._set("CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE", i32(E["CUDA_R_16BF"]))
        self.la = self._layout(E["CUDA_R_8F_E4M3"], k, n, w.stride(0))
        self.lb = self._layout(E["CUDA_R_8F_E4M3"], k, m, a.stride(0))
        self.ld = self._layout(E["CUDA_R_16BF"], n, m, n)
        self.pref = ctypes.c_void_p()
        self._ok(lib.cublasLtMatmulPreferenceCreate(_addr(self.pref)), "cublasLtMatmulPreferenceCreate")
        size = ctypes.c_size_t(workspace.numel())
        self._ok(lib.cublasLtMatmulPreferenceSetAttribute(self.pref, E["CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES"],
                                                          _addr(size), ctypes.sizeof(size)),
                 "cublasLtMatmulPreferenceSetAttribute")

    @staticmethod
    def _ok(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what}: cuBLAS status {status}")

    def _set(self, name: str, value) -> None:
        self._ok(self.lib.cublasLtMatmulDescSetAttribute(self.desc, self.E[name], _addr(value),
                                                         ctypes.sizeof(value)), f"set {name}")

    def _layout(self, dtype: int, rows: int, cols: int, ld: int):
        lay = ctypes.c_void_p()
        self._ok(self.lib.cublasLtMatrixLayoutCreate(_addr(lay), dtype, ctypes.c_uint64(rows),
                                                     ctypes.c_uint64(cols), ctypes.c_int64(ld)),
                 "cublasLtMatrixLayoutCreate")
        return lay

    def heuristics(self, count: int) -> list[Heuristic]:
        """Every result the heuristic returns (up to ``count``), in its order; ``state`` non-zero marks one
        whose other fields are not valid."""
        res = (Heuristic * count)()
        got = ctypes.c_int()
        self._ok(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.la, self.lb, self.ld, self.ld,
                                                         self.pref, count, res, _addr(got)),
                 "cublasLtMatmulAlgoGetHeuristic")
        return [res[i] for i in range(got.value)]

    def describe(self, algo: Algo) -> dict:
        """The algorithm's configuration attributes that the header names (tile, stages, split-k, ...)."""
        out = {}
        for name, val in self.E.items():
            if not name.startswith("CUBLASLT_ALGO_CONFIG_"):
                continue
            size = ctypes.c_size_t(0)  # the size must match the attribute's: ask for it first
            if self.lib.cublasLtMatmulAlgoConfigGetAttribute(_addr(algo), val, None, 0, _addr(size)):
                continue
            if not 0 < size.value <= 8:
                continue
            buf, written = ctypes.c_uint64(0), ctypes.c_size_t(0)
            st = self.lib.cublasLtMatmulAlgoConfigGetAttribute(_addr(algo), val, _addr(buf),
                                                               size.value, _addr(written))
            if st == 0:
                out[name.removeprefix("CUBLASLT_ALGO_CONFIG_").lower()] = buf.value
        return out

    def __call__(self, algo: Algo) -> None:
        import torch

        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._ok(self.lib.cublasLtMatmul(
            self.handle, self.desc, _addr(one), ctypes.c_void_p(self.w.data_ptr()), self.la,
            ctypes.c_void_p(self.a.data_ptr()), self.lb, _addr(zero), ctypes.c_void_p(self.out.data_ptr()),
            self.ld, ctypes.c_void_p(self.out.data_ptr()), self.ld, _addr(algo),
            ctypes.c_void_p(self.ws.data_ptr()), ctypes.c_size_t(self.ws.numel()),
            ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)), "cublasLtMatmul")

    def close(self) -> None:
        lib = self.lib
        for lay in (self.la, self.lb, self.ld):
            lib.cublasLtMatrixLayoutDestroy(lay)
        lib.cublasLtMatmulPreferenceDestroy(self.pref)
        lib.cublasLtMatmulDescDestroy(self.desc)
        lib.cublasLtDestroy(self.handle)
