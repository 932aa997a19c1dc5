"""Triton kernels of the FP8 engine. Imported only on CUDA with Triton present (see quant.py for the
contracts and the torch references these must match).

All kernels are one program per row: a row (<= 9728 elements in SD3.5 Large) fits in registers, so each
input is read once and each output written once. Per element they do a multiply by the row's 1/scale (one
division per row, not an IEEE division per element) and, for GELU, two MUFU ops; rows are held as two
power-of-two tiles (`_split`) so padded lanes stay few. Measured on an H100 (docs/PERFORMANCE.md): GELU -> FP8
on SD3.5 Large 6.0 -> 3.7 ms per step, at HBM bandwidth. On the H200 (bench/elementwise.py): GELU -> FP8 at
80-84% and the LayerNorm with its residual at 72% of the bandwidth a copy kernel reaches.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .attention import _env_flag, _exp2, _rms_norm_head  # one MUFU.EX2 (FTZ), or tl.exp2; diffusers RMSNorm
from .quant import AMAX_MAX, AMAX_MIN, E4M3, E4M3_MAX, QTensor, split_streams

# Inline PTX cannot run in Triton's CPU interpreter (TRITON_INTERPRET=1, used to test these kernels
# without a GPU); there the same maths runs with tl.exp2 and IEEE division.
FAST_MATH = os.environ.get("TRITON_INTERPRET", "0") != "1"
# the compiled float -> E4M3 conversion saturates (the interpreter's may not): see _to_e4m3
SATFINITE = tl.constexpr(FAST_MATH)
# Defaults of three kernel choices (measured on the H200, docs/PERFORMANCE.md; bench/elementwise.py compares
# each pair; the environment overrides them, for benches of a whole step):
# GELU's tanh as MUFU.TANH (one MUFU op an element instead of two)
GELU_MUFU_TANH = _env_flag("SDFLEET_FP8_GELU_TANH", True)
# rows a LayerNorm program takes (when a batch element's row count divides by it, else 1): the gate, shift and
# scale vectors are loaded once for them all. With the early loads, 2 and 4 were 7-15% slower than 1 at
# SD3.5's shapes (more registers a program, fewer programs in flight); without them, 4 tied 1. So 1
LN_ROWS = int(os.environ.get("SDFLEET_FP8_LN_ROWS", "1"))
# a LayerNorm program with a residual loads its shift and scale with its rows (see _ln_mod_quant_kernel)
LN_EARLY_MOD = _env_flag("SDFLEET_FP8_LN_EARLY", True)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    if FAST:
        # one MUFU.RCP; an IEEE division (Triton's `/` on fp32) is a ~10-instruction sequence per element
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _row_scale(amax, QMAX: tl.constexpr, AMIN: tl.constexpr, AMAX: tl.constexpr):
    """(scale, 1 / scale) of a row from its amax: one division per row, a multiply per element."""
    amax = tl.minimum(tl.maximum(amax, AMIN), AMAX)
    return amax / QMAX, QMAX / amax


@triton.jit
def _to_e4m3(v, inv, QMAX: tl.constexpr):
    if SATFINITE:
        # the conversion to E4M3 that follows is cvt.rn.satfinite (Triton on sm_89+): it clamps to +-448
        # itself, so a clamp here would be two FMNMX an element for nothing (a NaN then stays NaN, as in
        # the torch path, instead of becoming -448)
        return v * inv
    else:
        return tl.minimum(tl.maximum(v * inv, -QMAX), QMAX)


@triton.jit
def _quantize_block(v, mask, QMAX: tl.constexpr, AMIN: tl.constexpr, AMAX: tl.constexpr):
    v = tl.where(mask, v, 0.0)
    s, inv = _row_scale(tl.max(tl.abs(v)), QMAX, AMIN, AMAX)
    return _to_e4m3(v, inv, QMAX), s


def _m_bucket(m: int) -> int:
    return 0 if m < 256 else (1 if m < 2048 else 2)


def _warp_configs(*warps):
    return [triton.Config({}, num_warps=w) for w in warps]


def _split(n: int) -> tuple[int, int]:
    """A length as two power-of-two register tiles (Triton tiles are powers of two): the largest power of
    two <= n, then the rest rounded up. 9728 -> 8192 + 2048 (5% padding, not 68% as one 16384 tile),
    6144 -> 4096 + 2048, 2432 -> 2048 + 512, 1536 -> 1024 + 512. The second is 0 when n is a power of two.
    Padded lanes still execute, and these kernels are instruction-bound where the padding is large."""
    first = 1 << (n.bit_length() - 1)
    rest = n - first
    return first, (triton.next_power_of_2(rest) if rest else 0)


@triton.jit
def _tanh(x):
    # one MUFU.TANH (sm_75+), absolute error ~2^-11. In GELU's 0.5 x (1 + tanh(u)) that is an error of about
    # |x| 2^-12 an element: relative to the row's amax (which sets the E4M3 step, 2^-4 of it), far below the
    # quantization; relative to a tiny GELU(x) at x < -2 it can be large, but such values round to 0 or near it
    # in E4M3 at the row's scale anyway
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gelu_tanh(x, FAST: tl.constexpr, TANH: tl.constexpr):
    # 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).
    # TANH (with FAST): one MUFU.TANH and four FMA-pipe ops an element. Otherwise the same as x * sigmoid(2u),
    # sigmoid as 1 / (1 + 2^z) with z = -2u log2(e): two MUFU ops (EX2, RCP) and four FMA-pipe ops. At
    # SD3.5 Large's 9728-wide rows the MUFU work of the two-op form is about half the pass's HBM time, so it
    # is issue- and MUFU-bound beside the loads (docs/PERFORMANCE.md).
    if FAST and TANH:
        hx = 0.5 * x
        return hx * _tanh(x * (x * x * (0.7978845608028654 * 0.044715) + 0.7978845608028654)) + hx
    else:
        z = x * (x * x * (-2.0 * 0.7978845608028654 * 1.4426950408889634 * 0.044715)
                 + (-2.0 * 0.7978845608028654 * 1.4426950408889634))
        return x * _rcp(1.0 + _exp2(z, FAST), FAST)


@triton.jit
def _load_row_part(x_ptr, row_off, start, K, BLOCK: tl.constexpr, GELU: tl.constexpr, FAST: tl.constexpr,
                   TANH: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row_off + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        x = _gelu_tanh(x, FAST, TANH)  # gelu(0) == 0: padded lanes stay out of the amax
    return x, offs, mask


# Tuned once per (width, row-count bucket) at the first call (worker boot / graph warm-up); the choice
# is cached on disk (Triton's cache), so a second boot does not tune again.
@triton.autotune(configs=_warp_configs(4, 8, 16, 32), key=["K", "m_bucket", "GELU", "TANH"], cache_results=True)
@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, m_bucket,
                       GELU: tl.constexpr, BLOCK: tl.constexpr, BLOCK2: tl.constexpr, FAST: tl.constexpr,
                       TANH: tl.constexpr, QMAX: tl.constexpr, AMIN: tl.constexpr, AMAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    # The row is held in registers as two tiles (see _split): read once, written once.
    x, offs, mask = _load_row_part(x_ptr, row * stride_x, 0, K, BLOCK, GELU, FAST, TANH)
    amax = tl.max(tl.abs(x))
    if BLOCK2 > 0:
        x2, offs2, mask2 = _load_row_part(x_ptr, row * stride_x, BLOCK, K, BLOCK2, GELU, FAST, TANH)
        amax = tl.maximum(amax, tl.max(tl.abs(x2)))
    s, inv = _row_scale(amax, QMAX, AMIN, AMAX)
    tl.store(q_ptr + row * stride_q + offs, _to_e4m3(x, inv, QMAX).to(q_ptr.dtype.element_ty), mask=mask)
    if BLOCK2 > 0:
        tl.store(q_ptr + row * stride_q + offs2, _to_e4m3(x2, inv, QMAX).to(q_ptr.dtype.element_ty), mask=mask2)
    tl.store(s_ptr + row, s)


def quant_rows(x: torch.Tensor, *, gelu: bool = False, tanh: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``tanh``: GELU's tanh as one MUFU op (None: ``GELU_MUFU_TANH``; False: the EX2 + RCP form)."""
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=E4M3)
    s = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m == 0:
        return q, s
    b1, b2 = _split(k)
    _quant_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), _m_bucket(m), GELU=gelu, BLOCK=b1, BLOCK2=b2,
                             FAST=FAST_MATH, TANH=GELU_MUFU_TANH if tanh is None else tanh,
                             QMAX=E4M3_MAX, AMIN=AMAX_MIN, AMAX=AMAX_MAX)
    return q, s


@triton.jit
def _ln_load(x_ptr, y_ptr, g_ptr, y2_ptr, g2_ptr, h_ptr, rows, rmask, b, start, D, stride_g, stride_g2,
             HAS_RES: tl.constexpr, HAS_RES2: tl.constexpr, BLOCK: tl.constexpr):
    # (ROWS, BLOCK) of the program's rows from column start. The rows share batch element b, so each gate
    # vector is loaded once for all of them.
    offs = start + tl.arange(0, BLOCK)
    cmask = offs < D
    mask = rmask[:, None] & cmask[None, :]
    at = rows[:, None] * D + offs[None, :]
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        y = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + b * stride_g + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
        hb = (x + g * y).to(h_ptr.dtype.element_ty)
        if HAS_RES2:  # a second gated add after the first, each rounded as the unfused adds are
            y2 = tl.load(y2_ptr + at, mask=mask, other=0.0).to(tl.float32)
            g2 = tl.load(g2_ptr + b * stride_g2 + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
            hb = (hb.to(tl.float32) + g2 * y2).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + at, hb, mask=mask)
        x = hb.to(tl.float32)  # normalize the stored residual, as the unfused path does
    return x, offs, cmask, mask


@triton.jit
def _ln_mod_vectors(b, sh_ptr, sc_ptr, stride_mod, start, D, BLOCK: tl.constexpr):
    # batch element b's shift and 1 + scale over one tile of columns, as (1, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    cmask = offs < D
    sh = tl.load(sh_ptr + b * stride_mod + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sc = tl.load(sc_ptr + b * stride_mod + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return sh, 1.0 + sc


@triton.jit
def _ln_modulate(x, mask, mean, rstd, sh, sc1):
    return tl.where(mask, (x - mean[:, None]) * rstd[:, None] * sc1 + sh, 0.0)


@triton.autotune(configs=_warp_configs(2, 4, 8, 16), key=["D", "HAS_RES", "HAS_RES2", "m_bucket", "ROWS", "EARLY"],
                 cache_results=True)
@triton.jit
def _ln_mod_quant_kernel(x_ptr, y_ptr, g_ptr, y2_ptr, g2_ptr, h_ptr, sh_ptr, sc_ptr, q_ptr, s_ptr,
                         M, L, D, stride_mod, stride_g, stride_g2, eps, m_bucket,
                         HAS_RES: tl.constexpr, HAS_RES2: tl.constexpr, BLOCK: tl.constexpr, BLOCK2: tl.constexpr,
                         ROWS: tl.constexpr, EARLY: tl.constexpr,
                         QMAX: tl.constexpr, AMIN: tl.constexpr, AMAX: tl.constexpr):
    # ROWS rows of one batch element (the caller makes ROWS divide the rows per element), each held in
    # registers as two tiles (see _split): read once, written once.
    # EARLY: shift and scale are loaded with the rows, before the residual's store. Loaded after it (as
    # the maths orders them), they are a second memory round trip on each program's path, as the compiler
    # may not move a load above a store it cannot prove disjoint.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    b = (tl.program_id(0).to(tl.int64) * ROWS) // L
    if EARLY:
        sh, sc1 = _ln_mod_vectors(b, sh_ptr, sc_ptr, stride_mod, 0, D, BLOCK)
        if BLOCK2 > 0:
            sh2, sc12 = _ln_mod_vectors(b, sh_ptr, sc_ptr, stride_mod, BLOCK, D, BLOCK2)
    x, offs, cm, mask = _ln_load(x_ptr, y_ptr, g_ptr, y2_ptr, g2_ptr, h_ptr, rows, rmask, b, 0, D, stride_g,
                                 stride_g2, HAS_RES, HAS_RES2, BLOCK)
    total = tl.sum(x, axis=1)
    if BLOCK2 > 0:
        x2, offs2, cm2, mask2 = _ln_load(x_ptr, y_ptr, g_ptr, y2_ptr, g2_ptr, h_ptr, rows, rmask, b, BLOCK, D,
                                         stride_g, stride_g2, HAS_RES, HAS_RES2, BLOCK2)
        total += tl.sum(x2, axis=1)
    mean = total / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1)
    if BLOCK2 > 0:
        xc2 = tl.where(mask2, x2 - mean[:, None], 0.0)
        var += tl.sum(xc2 * xc2, axis=1)
    rstd = tl.rsqrt(var / D + eps)
    if not EARLY:
        sh, sc1 = _ln_mod_vectors(b, sh_ptr, sc_ptr, stride_mod, 0, D, BLOCK)
    v = _ln_modulate(x, mask, mean, rstd, sh, sc1)
    amax = tl.max(tl.abs(v), axis=1)
    if BLOCK2 > 0:
        if not EARLY:
            sh2, sc12 = _ln_mod_vectors(b, sh_ptr, sc_ptr, stride_mod, BLOCK, D, BLOCK2)
        v2 = _ln_modulate(x2, mask2, mean, rstd, sh2, sc12)
        amax = tl.maximum(amax, tl.max(tl.abs(v2), axis=1))
    s, inv = _row_scale(amax, QMAX, AMIN, AMAX)
    tl.store(q_ptr + rows[:, None] * D + offs[None, :], _to_e4m3(v, inv[:, None], QMAX).to(q_ptr.dtype.element_ty),
             mask=mask)
    if BLOCK2 > 0:
        tl.store(q_ptr + rows[:, None] * D + offs2[None, :],
                 _to_e4m3(v2, inv[:, None], QMAX).to(q_ptr.dtype.element_ty), mask=mask2)
    tl.store(s_ptr + rows, s, mask=rmask)


def _ln_rows(length: int, rows: int | None) -> int:
    """Rows a LayerNorm program takes: ``rows`` (default LN_ROWS) where it divides a batch element's row
    count (its rows then share the element's gate, shift and scale vectors), else 1."""
    r = LN_ROWS if rows is None else rows
    # a power of two (it is a tl.arange extent) that divides the element's rows
    return r if r >= 1 and r & (r - 1) == 0 and length % r == 0 else 1


def ln_modulate_quant(x, shift, scale, *, residual=None, residual2=None, eps=1e-6, rows: int | None = None,
                      early: bool | None = None):
    """See quant.ln_modulate_quantize; ``residual2`` (needs ``residual``) is added after it. ``rows``: rows a
    program takes (None: LN_ROWS; 1 where it does not divide the batch element's rows); ``early``: shift and
    scale loaded with the rows (None: LN_EARLY_MOD)."""
    b, l, d = x.shape
    x = x.contiguous()
    assert shift.stride(-1) == 1 and scale.stride(-1) == 1 and shift.stride(0) == scale.stride(0)
    n_rows = b * l
    q = torch.empty((n_rows, d), device=x.device, dtype=E4M3)
    s = torch.empty((n_rows, 1), device=x.device, dtype=torch.float32)
    if residual is not None:
        y, gate = residual
        y = y.reshape(b, l, d).contiguous()
        assert gate.stride(-1) == 1
        h = torch.empty_like(x)
        has_res, g, stride_g = True, gate, gate.stride(0)
    else:
        y, g, h, has_res, stride_g = x, x, x, False, 0
    if residual2 is not None:
        assert residual is not None and residual2[1].stride(-1) == 1
        y2, g2 = residual2[0].reshape(b, l, d).contiguous(), residual2[1]
    else:
        y2, g2 = y, g
    b1, b2 = _split(d)
    per = _ln_rows(l, rows)
    if n_rows:
        _ln_mod_quant_kernel[(triton.cdiv(n_rows, per),)](
            x, y, g, y2, g2, h, shift, scale, q, s, n_rows, l, d, shift.stride(0), stride_g,
            g2.stride(0) if residual2 is not None else 0, eps, _m_bucket(n_rows),
            HAS_RES=has_res, HAS_RES2=residual2 is not None, BLOCK=b1, BLOCK2=b2, ROWS=per,
            # early only helps where there is a residual store to load before (measured 9% slower without one)
            EARLY=(LN_EARLY_MOD and has_res) if early is None else early,
            QMAX=E4M3_MAX, AMIN=AMAX_MIN, AMAX=AMAX_MAX)
    return QTensor(q, s, (b, l, d)), h


@triton.jit
def _qkv_prep_kernel(src_ptr, out_ptr, w_ptr, L, S, H, tok_off, stride_src, plane, eps,
                     HAS_NORM: tl.constexpr, HP: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # token of this stream: b * L + t
    which = tl.program_id(1)  # 0 q, 1 k, 2 v
    b = row // L
    t = row % L
    h = tl.arange(0, HP)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = (h < H) & (d < D)
    x = tl.load(src_ptr + row * stride_src + which * H * D + h * D + d, mask=mask, other=0.0)
    if HAS_NORM:
        w = tl.load(w_ptr + tl.minimum(which, 1) * D + d).to(tl.float32)
        x = tl.where(which < 2, _rms_norm_head(x, w, eps), x)
    dst = out_ptr + which.to(tl.int64) * plane + ((b * H + h) * S + tok_off + t) * D + d
    tl.store(dst, x, mask=mask)


def qkv_prep(src: torch.Tensor, out: torch.Tensor, weights: torch.Tensor | None, *, batch: int,
             tok_off: int, heads: int, head_dim: int, eps: float) -> None:
    """src (batch*L, 3*heads*head_dim) -> out[which, b, h, tok_off + t, :] (out: (3, B, H, S, D) contiguous)."""
    rows = src.shape[0]
    length = rows // batch
    seq = out.shape[3]
    assert src.stride(1) == 1 and out.is_contiguous() and head_dim == triton.next_power_of_2(head_dim)
    plane = out[0].numel()
    w = weights if weights is not None else src
    _qkv_prep_kernel[(rows, 3)](src, out, w, length, seq, heads, tok_off, src.stride(0), plane, eps,
                                HAS_NORM=weights is not None, HP=triton.next_power_of_2(heads), D=head_dim,
                                num_warps=4)


@triton.jit
def _out_quant_kernel(o_ptr, q_ptr, s_ptr, B, L, Lc, H, sob, soh, sos,
                      HP: tl.constexpr, D: tl.constexpr,
                      QMAX: tl.constexpr, AMIN: tl.constexpr, AMAX: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    h = tl.arange(0, HP)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = (h < H) & (d < D)
    x = tl.load(o_ptr + b * sob + h * soh + t * sos + d, mask=mask, other=0.0).to(tl.float32)
    q, s = _quantize_block(x, mask, QMAX, AMIN, AMAX)
    # image rows first (B*L of them), then the text rows: two row-major matrices in one buffer
    dst = tl.where(t < L, b * L + t, B * L + b * Lc + (t - L))
    tl.store(q_ptr + dst * H * D + h * D + d, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + dst, s)


def out_quant(o: torch.Tensor, length: int, ctx_length: int) -> tuple[QTensor, QTensor | None]:
    """o (B, H, S, D) any strides with stride(-1) == 1 -> per-row FP8 of o.transpose(1, 2) split at length."""
    b, h, s_all, d = o.shape
    assert o.stride(3) == 1
    rows = b * (length + ctx_length)
    q = torch.empty((rows, h * d), device=o.device, dtype=E4M3)
    s = torch.empty((rows, 1), device=o.device, dtype=torch.float32)
    _out_quant_kernel[(b, length + ctx_length)](o, q, s, b, length, ctx_length, h, o.stride(0), o.stride(1),
                                                o.stride(2), HP=triton.next_power_of_2(h), D=d, QMAX=E4M3_MAX,
                                                AMIN=AMAX_MIN, AMAX=AMAX_MAX, num_warps=4)
    return split_streams(q, s, b, length, ctx_length)


# A GEMV-shaped FP8 GEMM (a few rows, many output channels), as the AdaLN bank runs: memory-bound on the
# weights, so each program streams BLOCK_N weight rows once through the tensor cores (the activation rows,
# padded to BLOCK_M >= 16, are the MMA's narrow side).
@triton.autotune(configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=s)
                          for n in (64, 128) for k in (128, 256) for s in (3, 5)],
                 key=["N", "K", "BLOCK_M"], cache_results=True)
@triton.jit
def _gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    nmask, mmask = rn < N, rm < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        w = tl.load(w_ptr + rn[:, None] * stride_w + (k0 + rk)[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0)
        xt = tl.load(x_ptr + rm[None, :] * stride_x + (k0 + rk)[:, None], mask=mmask[None, :] & kmask[:, None],
                     other=0.0)
        acc = tl.dot(w, xt, acc)
    acc *= tl.load(ws_ptr + rn, mask=nmask, other=0.0)[:, None] * tl.load(xs_ptr + rm, mask=mmask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rm[None, :] * stride_o + rn[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=mmask[None, :] & nmask[:, None])


def gemv(x: QTensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
         out_dtype: torch.dtype) -> torch.Tensor:
    """``x @ W.T * scales + bias`` for x of a few rows (<= 64): (M, K) E4M3 with (M, 1) scales, W (N, K) E4M3."""
    data = x.data
    m, k = data.shape
    n = weight.shape[0]
    assert m <= 64 and data.stride(1) == 1 and weight.stride(1) == 1
    out = torch.empty((m, n), device=data.device, dtype=out_dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](data, x.scale, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, k,
                       data.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                       BLOCK_M=max(16, triton.next_power_of_2(m)))
    return out
