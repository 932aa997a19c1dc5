"""FP8 flash-attention forward for Hopper (Triton), non-causal, for SD3.5's joint attention.

Scheme (the same in the Triton kernels and in :func:`fp8_attention_reference`):

* Q: quantized inside the attention kernel, one scale per token (row amax / 127 for INT8,
  row amax / 448 for E4M3). The bf16 Q tile is read once per program; no separate pass.
* K: quantized by a small Triton kernel that reads bf16 K and V (strided views fine) and writes
  them padded to a multiple of ``KV_BLOCK`` (=128) tokens with zeros: K row-major (token, dim), the
  K-major layout wgmma wants for Q @ K^T, V *transposed* (dim, token) so that P @ V also gets its
  second operand K-major (Triton's FP8 wgmma needs it). Scale granularity (``scales``):
  "ktile" (default): K one scale per 128-token tile, V one scale per (batch, head);
  "head": both per (batch, head); "tile": both per tile; "vbatch": K per tile, V one scale per batch
  element. Per-head (per-batch) scales need an amax pass first
  (a tiny atomic-max kernel); the per-head V scale lets P @ V accumulate straight in the wgmma
  accumulator and is applied once in the epilogue.
* Softmax: online (flash) softmax in fp32 with exp2 and log2(e) folded into one per-row multiplier
  ``q_scale[row] * k_scale * softmax_scale * log2(e)`` (one FFMA per score). P = exp2(s - m + 8),
  i.e. scaled by 256 so it uses the E4M3 range (max 448) instead of sitting in [0, 1]; the factor
  cancels in the final division by the row sum. exp2 is ``ex2.approx.ftz.f32``.
* QK: ``qk="int8"`` (default) symmetric INT8 on the s8 tensor cores (same rate as FP8 on Hopper,
  ~4x smaller logit error than E4M3); the int32 result is turned into fp32 with a bit trick
  (add 0x4B400000, reinterpret, subtract 1.5 * 2^23 folded into the FFMA) instead of an I2F per
  score. ``qk="fp8"``: E4M3, ~4% faster, but 0.05 (random) to 0.17 (peaky logits) relative error.
* PV: ``pv="fp8"`` (default) P and V in E4M3, fp32 accumulation; ``pv="bf16"``: P in bf16 times
  the original bf16 V (accurate, but no faster than cuDNN BF16 SDPA).
* The ragged tail (sequence not a multiple of the block) is masked with -inf on the last KV tile;
  out-of-range query rows are loaded as zeros and not stored.
* The engine's path (:func:`prep_joint` + ``fp8_attention_quantized(..., fp8_rows=...)``): one kernel
  reads the q/k/v GEMM outputs of both streams, applies the q/k RMSNorm and writes INT8 Q (per token)
  and K (per tile); a second pass writes E4M3 V with one scale per batch element ("vbatch"), which makes
  the attention output a convex combination of E4M3 values with V's scale, so the kernel stores it as the
  output projections' E4M3 input with that scale. No bf16 q/k/v or output is written.

Measured on one H100 (torch 2.11, Triton 3.6): 1.08-1.16x cuDNN BF16 SDPA end to end at 4429 tokens
(1.17-1.21x for the attention kernel alone), relative error 0.038 (random normal q/k/v) and
0.046-0.048 (peaky logits) vs fp32; see bench/results/attention-notes.md.

Import works without CUDA and without Triton; calling :func:`fp8_attention` there raises
RuntimeError. :func:`fp8_attention_reference` is pure torch and runs on the CPU.

TMA descriptors are only made on a GPU that has TMA (compute capability >= 9.0,
:func:`worker.engine.precision.tma_supported`); elsewhere the same kernel loads K/V through pointers. The
engine uses this kernel only where :func:`worker.engine.precision.fp8_path` allows it (not on Ada, 8.9: see
docs/PERFORMANCE.md, "FP8 engine on Ada").
"""

from __future__ import annotations

import functools
import math
import os

import torch

from worker.engine.precision import tma_supported

try:  # Triton is optional at import time (CPU CI has none).
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = exc

__all__ = [
    "fp8_attention",
    "fp8_attention_reference",
    "quantize_kv",
    "fp8_attention_quantized",
    "prep_joint",
    "is_supported",
    "warmup",
    "KV_BLOCK",
    "SUPPORTED_HEAD_DIMS",
]

KV_BLOCK = 128  # tokens per K/V quantization tile and padding unit (kernel BLOCK_N is 64 or 128)
SUPPORTED_HEAD_DIMS = (64, 128)
FP8_MAX = 448.0
INT8_MAX = 127.0
P_SHIFT = 8.0  # P = exp2(s - m + P_SHIFT): P in [0, 256]
LOG2E = 1.4426950408889634
_TINY = 1e-30

# V scale granularity of each ``scales`` mode (K is per 128-token tile except in "head")
_V_SCALE = {"head": "head", "ktile": "head", "tile": "tile", "vbatch": "batch"}

DEFAULT_QK = os.environ.get("SDFLEET_FP8_ATTN_QK", "int8")
DEFAULT_PV = os.environ.get("SDFLEET_FP8_ATTN_PV", "fp8")


# --------------------------------------------------------------------------------------------
# Pure-torch reference of the scheme (CPU or GPU, fp32 math, same tiling as the kernel)
# --------------------------------------------------------------------------------------------


def sample_qkv(kind: str, B: int = 1, H: int = 2, S: int = 333, D: int = 64, *, seed: int = 0,
               device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded bf16 (B, H, S, D) q/k/v for accuracy checks. ``randn``: unit normals; ``peaky``: RMS-normed q/k
    with per-channel gains and a K offset shared by all tokens (logit std ~3.7), like the MMDiT's q/k after
    their RMSNorm, where a coarse Q/K format shows its error."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    if kind == "randn":
        q, k, v = rn(B, H, S, D), rn(B, H, S, D), rn(B, H, S, D)
    elif kind == "peaky":
        gain = torch.exp(0.5 * rn(D)) * 1.5
        x = rn(B, H, S, D)
        q = x / x.pow(2).mean(-1, keepdim=True).sqrt() * gain
        x = rn(B, H, S, D) + 0.5 * rn(1, H, 1, D)
        k = x / x.pow(2).mean(-1, keepdim=True).sqrt() * gain
        v = rn(B, H, S, D)
    else:
        raise ValueError(f"sample_qkv: kind {kind!r}; use 'randn' or 'peaky'")
    return q.bfloat16().contiguous(), k.bfloat16().contiguous(), v.bfloat16().contiguous()


def _quant_fp8_torch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    y = (x / scale).clamp(-FP8_MAX, FP8_MAX)
    return y.to(torch.float8_e4m3fn).to(torch.float32)


def _quant_int8_torch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    y = x / scale
    # round half away from zero, like the kernel
    y = torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5))
    return y.clamp(-INT8_MAX, INT8_MAX)


def fp8_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    qk: str | None = None,
    pv: str | None = None,
    scales: str | None = None,
    block_n: int = KV_BLOCK,
) -> torch.Tensor:
    """Emulates the kernel's quantization and online softmax with fp32 torch ops.

    q, k, v: (batch, heads, seq, head_dim), any float dtype, any device. Returns q.dtype.
    Quantized values are exact (torch's float8_e4m3fn conversion rounds to nearest even, as the
    kernel's cvt does; values are clamped to +-448 first, like the kernel's saturation); what
    remains different from the kernel is fp32 summation order, the exp2 approximation and, when the
    kernel's BLOCK_N differs from block_n, the running max at which P is rounded.
    """
    qk = qk or DEFAULT_OPTIONS["qk"]
    pv = pv or DEFAULT_OPTIONS["pv"]
    scales = scales or DEFAULT_OPTIONS["scales"]
    _check_modes(qk, pv, scales)
    if KV_BLOCK % block_n:
        raise ValueError(f"block_n must divide {KV_BLOCK}")
    B, H, S, D = q.shape
    Sk = k.shape[2]
    sm_scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    qf, kf, vf = q.float(), k.float(), v.float()
    qmax = INT8_MAX if qk == "int8" else FP8_MAX
    quant = _quant_int8_torch if qk == "int8" else _quant_fp8_torch

    q_s = qf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY) / qmax  # (B,H,S,1)
    q_q = quant(qf, q_s)
    row_mult = q_s * (sm_scale * LOG2E)  # (B,H,S,1)

    def scale_of(x: torch.Tensor, start: int, top: float, per: str) -> torch.Tensor:  # (B,H or 1,1,1)
        if per == "batch":
            return x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(_TINY) / top
        if per == "head":
            src = x
        else:
            t0 = (start // KV_BLOCK) * KV_BLOCK
            src = x[:, :, t0 : t0 + KV_BLOCK]
        return src.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(_TINY) / top

    m = torch.full((B, H, S, 1), float("-inf"), device=q.device)
    l_sum = torch.zeros((B, H, S, 1), device=q.device)
    acc = torch.zeros((B, H, S, D), device=q.device)
    for start in range(0, Sk, block_n):
        kt = kf[:, :, start : start + block_n]
        vt = vf[:, :, start : start + block_n]
        k_s = scale_of(kf, start, qmax, "head" if scales == "head" else "tile")
        k_q = quant(kt, k_s)
        raw = q_q @ k_q.transpose(-1, -2)  # exact for int8; fp32 sum of exact fp8 products
        t = raw * (row_mult * k_s)
        m_new = torch.maximum(m, t.amax(dim=-1, keepdim=True))
        p = torch.exp2(t - (m_new - P_SHIFT))
        alpha = torch.exp2(m - m_new)
        l_sum = l_sum * alpha + p.sum(dim=-1, keepdim=True)
        if pv == "fp8":
            v_s = scale_of(vf, start, FP8_MAX, _V_SCALE[scales])
            v_q = _quant_fp8_torch(vt, v_s)
            p_q = p.clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
            acc = acc * alpha + (p_q @ v_q) * v_s
        else:
            p_q = p.to(torch.bfloat16).float()
            acc = acc * alpha + p_q @ vt.to(torch.bfloat16).float()
        m = m_new
    return (acc / l_sum).to(q.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

TensorDescriptor = None  # host-side TMA descriptors, when Triton has them (below)


@functools.cache
def _device_has_tma(index: int) -> bool:
    return tma_supported(tuple(torch.cuda.get_device_capability(index)))


def _use_tma(opts: dict, device: torch.device) -> bool:
    """TMA descriptor loads: asked for (``tma``), in this Triton, and on a GPU that has TMA (compute capability
    >= 9.0; Ada's 8.9 has none, so there the kernel loads K/V tiles through plain pointers)."""
    return bool(opts["tma"]) and TensorDescriptor is not None and _device_has_tma(
        device.index if device.index is not None else torch.cuda.current_device())


if triton is not None:
    try:  # host-side TMA descriptors (Triton >= 3.3 on Hopper)
        from triton.tools.tensor_descriptor import TensorDescriptor
    except Exception:  # pragma: no cover
        TensorDescriptor = None

    @triton.jit
    def _kv_amax_kernel(
        K, V, Kamax, Vamax,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        H, S,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, DO_K: tl.constexpr, DO_V: tl.constexpr,
        V_BATCH: tl.constexpr,
    ):
        # per-(batch, head) amax of K (and V; per batch with V_BATCH) by atomic max over tiles
        # (Kamax/Vamax zeroed before)
        tile = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_s = tile * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = (offs_s < S)[:, None]
        if DO_K:
            k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
                        + offs_s[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=row_ok, other=0.0)
            tl.atomic_max(Kamax + bh, tl.max(tl.max(tl.abs(k.to(tl.float32)), axis=1), axis=0))
        if DO_V:
            v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                        + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=row_ok, other=0.0)
            tl.atomic_max(Vamax + (b if V_BATCH else bh), tl.max(tl.max(tl.abs(v.to(tl.float32)), axis=1), axis=0))

    @triton.jit
    def _scale_of(amax, INT8: tl.constexpr):
        # the scale that maps amax to the code range: INT8 127, E4M3 448
        if INT8:
            return tl.maximum(amax, 1e-30) / 127.0
        else:
            return tl.maximum(amax, 1e-30) / 448.0

    @triton.jit
    def _codes(y, INT8: tl.constexpr):
        # values already divided by their scale -> saturated INT8 (rounded half away from zero) or E4M3
        if INT8:
            y = tl.minimum(tl.maximum(y, -127.0), 127.0)
            return tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)
        else:
            return tl.minimum(tl.maximum(y, -448.0), 448.0).to(tl.float8e4nv)

    @triton.jit
    def _store_k_tile(k, k_amax, kq_ptrs, QK_INT8: tl.constexpr):
        # one scale for the tile
        k_scale = _scale_of(k_amax, QK_INT8)
        tl.store(kq_ptrs, _codes(k * (1.0 / k_scale), QK_INT8))
        return k_scale

    @triton.jit
    def _joint_tile(H, BLOCK: tl.constexpr, D: tl.constexpr):
        # (batch, head, token rows, dims) of a prep program; the heads of one token tile run side by side
        # (program axis 0), so their rows, adjacent in the GEMM outputs, are read together
        bh = tl.program_id(0)
        tile = tl.program_id(1)
        return bh, tile, (bh // H).to(tl.int64), bh % H, tile * BLOCK + tl.arange(0, BLOCK), tl.arange(0, D)

    @triton.jit
    def _quant_kv_kernel(
        K, V, Kq, Ks, Vq, Vs, Kamax, Vamax,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        H, S, S_PAD, N_TILES,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
        QK_INT8: tl.constexpr,
        QUANT_V: tl.constexpr,
        BH_SCALE: tl.constexpr,
        K_HEAD: tl.constexpr,
        V_BATCH: tl.constexpr,
    ):
        # BH_SCALE: one V scale per (batch, head) (per batch with V_BATCH, stored once per (batch, head)
        # all the same); K_HEAD: one K scale per (batch, head). Otherwise one scale per tile of BLOCK tokens.
        tile = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_s = tile * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = (offs_s < S)[:, None]
        k = tl.load(
            K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
            + offs_s[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            mask=row_ok, other=0.0,
        ).to(tl.float32)
        if K_HEAD:
            k_amax = tl.load(Kamax + bh)
        else:
            k_amax = tl.max(tl.max(tl.abs(k), axis=1), axis=0)
        kq_ptrs = Kq + bh.to(tl.int64) * S_PAD * HEAD_DIM + offs_s[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(Ks + bh * N_TILES + tile, _store_k_tile(k, k_amax, kq_ptrs, QK_INT8))

        if QUANT_V:
            v = tl.load(
                V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=row_ok, other=0.0,
            ).to(tl.float32)
            if BH_SCALE:
                v_amax = tl.load(Vamax + (b if V_BATCH else bh))
            else:
                v_amax = tl.max(tl.max(tl.abs(v), axis=1), axis=0)
            v_scale = _scale_of(v_amax, False)
            # transposed: (dim, token), token contiguous
            vq_ptrs = (Vq + bh.to(tl.int64) * S_PAD * HEAD_DIM
                       + offs_d[None, :] * S_PAD + offs_s[:, None])
            tl.store(vq_ptrs, _codes(v * (1.0 / v_scale), False))
            tl.store(Vs + bh * N_TILES + tile, v_scale)

    @triton.jit
    def _rms_norm_head(x, w, eps):
        # diffusers' RMSNorm over the last axis (one head's dims): fp32 maths, rounded to x's dtype
        # before the weight multiply and again after it
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=1) / x.shape[1]
        xn = (xf * tl.rsqrt(var + eps)[:, None]).to(x.dtype).to(tl.float32)
        return (xn * w).to(x.dtype)

    @triton.jit
    def _quant_q_rows(q, QK_INT8: tl.constexpr):
        # one scale per row (token)
        q_scale = _scale_of(tl.max(tl.abs(q), 1), QK_INT8)
        return _codes(q * (1.0 / q_scale)[:, None], QK_INT8), q_scale

    @triton.jit
    def _load_joint(Img, Ctx, b, h, t, d, L, Lc, S, stride_img, stride_ctx, which, H,
                    D: tl.constexpr, HAS_CTX: tl.constexpr):
        # rows t of the joint sequence (image tokens, then text tokens) of head h, part which (q, k, v),
        # from the two streams' fused q/k/v GEMM outputs (rows b * L + t, columns [q | k | v] x heads x D)
        in_img = (t < L)[:, None]
        col = which * H * D + h * D + d[None, :]
        x = tl.load(Img + (b * L + t)[:, None] * stride_img + col, mask=in_img, other=0.0)
        if HAS_CTX:
            in_ctx = ((t >= L) & (t < S))[:, None]
            x = tl.where(in_img, x, tl.load(Ctx + (b * Lc + (t - L))[:, None] * stride_ctx + col, mask=in_ctx,
                                            other=0.0))
        return x

    # the warp count can change the RMSNorm sum's order, so the pick is kept on disk (Triton's cache): a
    # machine's boots then agree
    @triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)],
                     key=["H", "S_PAD", "D", "HAS_NORM", "HAS_CTX", "QK_INT8"], cache_results=True)
    @triton.jit
    def _prep_joint_kernel(
        Img, Ctx, Wimg, Wctx, Q8, Qs, Kq, Ks, Vpart,
        H, L, Lc, S, S_PAD, N_TILES, stride_img, stride_ctx, eps,
        HAS_NORM: tl.constexpr, HAS_CTX: tl.constexpr, QK_INT8: tl.constexpr,
        D: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One (128-token tile, batch * head, part) of the joint sequence: Q -> RMSNorm -> INT8/E4M3 with one
        # scale per token (what the attention kernel would do with a bf16 Q); K -> RMSNorm -> INT8/E4M3 with
        # one scale per tile, padded with zeros to S_PAD; V -> only the amax of this tile, for _prep_v_kernel.
        # Nothing is written in bf16. One part per program (grid axis 2), not all three: a program then
        # holds a third of the registers, so about three times as many run per SM, and their loads are
        # in flight together (all three in one program was latency-bound at about half of HBM bandwidth).
        bh, tile, b, h, t, d = _joint_tile(H, BLOCK, D)
        which = tl.program_id(2)
        x = _load_joint(Img, Ctx, b, h, t, d, L, Lc, S, stride_img, stride_ctx, which, H, D, HAS_CTX)
        if which < 2:
            if HAS_NORM:
                w = tl.load(Wimg + which * D + d).to(tl.float32)[None, :]
                if HAS_CTX:
                    w = tl.where((t < L)[:, None], w, tl.load(Wctx + which * D + d).to(tl.float32)[None, :])
                x = _rms_norm_head(x, w, eps)
            if which == 0:
                q8, q_scale = _quant_q_rows(x.to(tl.float32), QK_INT8)
                tl.store(Q8 + (bh.to(tl.int64) * S + t)[:, None] * D + d[None, :], q8, mask=(t < S)[:, None])
                tl.store(Qs + bh.to(tl.int64) * S + t, q_scale, mask=t < S)
            else:
                kf = x.to(tl.float32)
                kq = Kq + (bh.to(tl.int64) * S_PAD + t)[:, None] * D + d[None, :]
                k_scale = _store_k_tile(kf, tl.max(tl.max(tl.abs(kf), axis=1), axis=0), kq, QK_INT8)
                tl.store(Ks + bh * N_TILES + tile, k_scale)
        else:
            tl.store(Vpart + bh * N_TILES + tile, tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=1), axis=0))

    @triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (2, 4, 8)],
                     key=["H", "S_PAD", "D", "HAS_CTX", "PARTS", "GLUON_ORDER"], cache_results=True)
    @triton.jit
    def _prep_v_kernel(
        Img, Ctx, Vq, Vs, Vpart, H, L, Lc, S, S_PAD, N_TILES, stride_img, stride_ctx,
        HAS_CTX: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr,
        GLUON_ORDER: tl.constexpr,
    ):
        # V of one (tile, batch * head), read again from the GEMM outputs once its batch amax is known, as
        # E4M3 transposed (dim, token) and padded, the layout _quant_kv_kernel writes. The batch amax is
        # the max of the batch's H * N_TILES tile maxima (a few KiB from L2): no atomics, no zeroed buffer.
        # GLUON_ORDER: tokens stored in the order the Gluon kernel's P operand holds them (within each 32,
        # position 16h + 4t + 2g + e holds token 16h + 8g + 2t + e: attention_gluon._v_token_order). The rows
        # are gathered in that order and stored contiguously: a permuted store address defeats the store's
        # vectorization (each token's row is 128 contiguous bytes to read either way).
        bh, tile, b, h, t, d = _joint_tile(H, BLOCK, D)
        if GLUON_ORDER:
            src = (t & ~15) | (((t >> 1) & 1) << 3) | (((t >> 2) & 3) << 1) | (t & 1)
        else:
            src = t
        v = _load_joint(Img, Ctx, b, h, src, d, L, Lc, S, stride_img, stride_ctx, 2, H, D, HAS_CTX).to(tl.float32)
        part = tl.arange(0, PARTS)
        v_amax = tl.max(tl.load(Vpart + b * H * N_TILES + part, mask=part < H * N_TILES, other=0.0), axis=0)
        v_scale = _scale_of(v_amax, False)
        tl.store(Vq + bh.to(tl.int64) * S_PAD * D + d[None, :] * S_PAD + t[:, None], _codes(v * (1.0 / v_scale), False))
        tl.store(Vs + bh * N_TILES + tile, v_scale)

    @triton.jit
    def _exp2(x, FTZ: tl.constexpr):
        if FTZ:
            # one MUFU.EX2, no denormal fix-up (arguments are <= 8, results >= 2^-126 or flushed)
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.math.exp2(x)

    @triton.jit
    def _attn_tile(
        acc, l_i, m_i, q8, a_row,
        kq_base, ks_base, vq_base, vs_base, vb_base, desc_k, desc_v,
        offs_n, offs_d, start_n, bh, S, S_PAD, stride_vs, stride_vd,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, KV_TILE: tl.constexpr,
        QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, MASK: tl.constexpr,
        EXP_FTZ: tl.constexpr, USE_TMA: tl.constexpr, BH_SCALE: tl.constexpr, I2F_MAGIC: tl.constexpr,
        K_HEAD: tl.constexpr,
    ):
        # K^T tile (HEAD_DIM, BLOCK_N) with dim contiguous: K-major second operand
        if USE_TMA:
            kT = desc_k.load([bh * S_PAD + start_n, 0]).T
        else:
            kT = tl.load(kq_base + (start_n + offs_n)[None, :] * HEAD_DIM + offs_d[:, None])
        qk = tl.dot(q8, kT)
        if K_HEAD:
            a = a_row
        else:
            a = a_row * tl.load(ks_base + start_n // KV_TILE)
        if QK_INT8:
            if I2F_MAGIC:
                # int32 -> fp32 without I2F: bits(2^23 + 2^22 + x) for |x| < 2^22 (64*127*127 < 2^20)
                qkm = (qk + 0x4B400000).to(tl.float32, bitcast=True)
                if MASK:
                    t = (qkm - 12582912.0) * a[:, None]
                    t = tl.where((start_n + offs_n)[None, :] < S, t, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(t, 1))
                    x = t - (m_new - 8.0)[:, None]
                else:
                    m_new = tl.maximum(m_i, (tl.max(qkm, 1) - 12582912.0) * a)
                    x = qkm * a[:, None] - (m_new - 8.0 + 12582912.0 * a)[:, None]
            else:
                qkf = qk.to(tl.float32)
                if MASK:
                    t = qkf * a[:, None]
                    t = tl.where((start_n + offs_n)[None, :] < S, t, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(t, 1))
                    x = t - (m_new - 8.0)[:, None]
                else:
                    m_new = tl.maximum(m_i, tl.max(qkf, 1) * a)
                    x = qkf * a[:, None] - (m_new - 8.0)[:, None]
        else:
            if MASK:
                t = qk * a[:, None]
                t = tl.where((start_n + offs_n)[None, :] < S, t, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(t, 1))
                x = t - (m_new - 8.0)[:, None]
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * a)
                x = qk * a[:, None] - (m_new - 8.0)[:, None]
        p = _exp2(x, EXP_FTZ)
        alpha = _exp2(m_i - m_new, EXP_FTZ)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if PV_FP8:
            if USE_TMA:
                v = desc_v.load([bh * HEAD_DIM, start_n]).T
            else:
                # V^T stored (dim, token): the (BLOCK_N, HEAD_DIM) tile is token-contiguous (K-major)
                v = tl.load(vq_base + offs_d[None, :] * S_PAD + (start_n + offs_n)[:, None])
            if BH_SCALE:
                acc = tl.dot(p.to(tl.float8e4nv), v, acc)
            else:
                pv = tl.dot(p.to(tl.float8e4nv), v)
                acc = acc + pv * tl.load(vs_base + start_n // KV_TILE)
        else:
            vptr = vb_base + (start_n + offs_n)[:, None] * stride_vs + offs_d[None, :] * stride_vd
            if MASK:
                v = tl.load(vptr, mask=((start_n + offs_n) < S)[:, None], other=0.0)
            else:
                v = tl.load(vptr)
            acc = tl.dot(p.to(tl.bfloat16), v, acc)
        return acc, l_i, m_new

    def _set_desc_blocks(nargs):
        if nargs.get("desc_k") is not None:
            nargs["desc_k"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]
        if nargs.get("desc_v") is not None:
            nargs["desc_v"].block_shape = [nargs["HEAD_DIM"], nargs["BLOCK_N"]]

    # One config, no autotune: 64 x 128 tiles, 4 warps, 3 stages, maxnreg 128 (four CTAs per SM; a few
    # spills outside the main loop in the offline SASS) was the fastest of the earlier autotune list for
    # both models on the H100, by 1-2% (bench/attention_configs.py), and an autotune that times each config
    # once at boot picked among them by noise. SDFLEET_FP8_ATTN_CONFIG="cfg;cfg;..." brings autotune back.
    DEFAULT_CONFIGS = "64,128,4,3,128"
    TUNED_CONFIGS = "64,128,4,3;64,128,4,3,168;64,128,4,4,168;64,128,4,2,168;64,128,4,3,128;64,64,4,3"

    def _attn_configs():
        # "BLOCK_M,BLOCK_N,num_warps,num_stages[,maxnreg];..." (one entry: no autotune)
        spec = os.environ.get("SDFLEET_FP8_ATTN_CONFIG") or DEFAULT_CONFIGS
        cfgs = []
        for item in spec.split(";"):
            vals = [int(x) for x in item.split(",")]
            bm, bn, warps, stages = vals[:4]
            maxnreg = vals[4] if len(vals) > 4 else None  # 168: 3 CTAs of 4 warps per SM, no loop spills
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages,
                                      maxnreg=maxnreg, pre_hook=_set_desc_blocks))
        return cfgs

    @triton.autotune(
        configs=_attn_configs(),
        key=["S_PAD", "HEAD_DIM", "QK_INT8", "PV_FP8", "EXP_FTZ", "USE_TMA", "BH_SCALE", "I2F_MAGIC", "K_HEAD",
             "OUT_FP8", "Q_PRE"],
    )
    # ROW0 and M_ROWS unspecialized: the engine's eager warm-up launches all rows at once, its CUDA graph
    # the image and text rows apart (other ROW0 / M_ROWS values); one binary serves both, so nothing
    # compiles during the capture. Neither enters an address whose alignment the compiler could use.
    @triton.jit(do_not_specialize=["ROW0", "M_ROWS"])
    def _attn_fwd_kernel(
        Q, Qs, Kq, Ks, Vq, Vs, Vb, O, Os, desc_k, desc_v,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_os, stride_od,
        H, S, S_PAD, N_TILES, qk_scale, B, ROW0, M_ROWS, L_IMG, L_CTX,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        KV_TILE: tl.constexpr,
        QK_INT8: tl.constexpr,
        PV_FP8: tl.constexpr,
        EXP_FTZ: tl.constexpr,
        USE_TMA: tl.constexpr,
        BH_SCALE: tl.constexpr,
        I2F_MAGIC: tl.constexpr,
        K_HEAD: tl.constexpr,
        OUT_FP8: tl.constexpr,
        Q_PRE: tl.constexpr,
    ):
        # OUT_FP8: O is written in E4M3 as the output projection's input, rows [0, M_ROWS) of the joint
        # sequence only: image rows (< L_IMG) to rows b * L_IMG + t of O (a (rows, H * HEAD_DIM) matrix),
        # text rows after all B * L_IMG image rows; Os gets each row's scale. With one V scale per batch
        # element, acc / l is a convex combination of E4M3 values of V (up to P's rounding), so it is
        # already in E4M3 range and its scale is V's: no row amax, no second pass over O. Programs start at
        # row ROW0 (a launch may compute the image rows, another the text rows).
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = ROW0 + start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < S

        q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                  + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd)
        if Q_PRE:  # quantized by _prep_joint_kernel: (B, H, S, D) INT8/E4M3 and (B*H, S) scales
            q8 = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            q_scale = tl.load(Qs + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=1.0)
        else:
            q8, q_scale = _quant_q_rows(tl.load(q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32), QK_INT8)

        bh64 = bh.to(tl.int64)
        kq_base = Kq + bh64 * S_PAD * HEAD_DIM
        vq_base = Vq + bh64 * S_PAD * HEAD_DIM
        ks_base = Ks + bh * N_TILES
        vs_base = Vs + bh * N_TILES
        vb_base = Vb + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        a_row = q_scale * qk_scale
        if K_HEAD:
            a_row = a_row * tl.load(ks_base)  # one K scale per (batch, head)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        n_full = (S // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _attn_tile(
                acc, l_i, m_i, q8, a_row, kq_base, ks_base, vq_base, vs_base, vb_base, desc_k, desc_v,
                offs_n, offs_d, start_n, bh, S, S_PAD, stride_vs, stride_vd,
                HEAD_DIM, BLOCK_N, KV_TILE, QK_INT8, PV_FP8, False,
                EXP_FTZ, USE_TMA, BH_SCALE, I2F_MAGIC, K_HEAD,
            )
        for start_n in range(n_full, S, BLOCK_N):  # 0 or 1 ragged tile
            acc, l_i, m_i = _attn_tile(
                acc, l_i, m_i, q8, a_row, kq_base, ks_base, vq_base, vs_base, vb_base, desc_k, desc_v,
                offs_n, offs_d, start_n, bh, S, S_PAD, stride_vs, stride_vd,
                HEAD_DIM, BLOCK_N, KV_TILE, QK_INT8, PV_FP8, True,
                EXP_FTZ, USE_TMA, BH_SCALE, I2F_MAGIC, K_HEAD,
            )

        out = acc / l_i[:, None]
        if OUT_FP8:
            out = tl.minimum(tl.maximum(out, -448.0), 448.0)
            b64 = b.to(tl.int64)
            rows = offs_m.to(tl.int64)
            dst = tl.where(rows < L_IMG, b64 * L_IMG + rows, B * L_IMG + b64 * L_CTX + (rows - L_IMG))
            keep = offs_m < M_ROWS
            tl.store(O + dst[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :],
                     out.to(O.dtype.element_ty), mask=keep[:, None])
            if h == 0:
                tl.store(Os + dst, tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(vs_base), mask=keep)
        else:
            if BH_SCALE:
                if PV_FP8:
                    out = out * tl.load(vs_base)
            tl.store(
                O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                out.to(O.dtype.element_ty),
                mask=row_ok[:, None],
            )


# --------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------


def _env_flag(name: str, default: bool) -> bool:
    val = os.environ.get(name)
    return default if val is None else val.strip().lower() in ("1", "true", "yes", "on")


# Defaults (measured on H100, see docs/PERFORMANCE.md); each can be overridden per call.
DEFAULT_OPTIONS = {
    "qk": DEFAULT_QK,  # "fp8" | "int8"
    "pv": DEFAULT_PV,  # "fp8" | "bf16"
    # "ktile": K scale per 128-token tile, V per (batch, head); "head": both per head; "tile": both per tile;
    # "vbatch": K per tile, V per batch element (what an E4M3 output for the next GEMM needs)
    "scales": os.environ.get("SDFLEET_FP8_ATTN_SCALES", "ktile"),
    "ftz": _env_flag("SDFLEET_FP8_ATTN_FTZ", True),  # ex2.approx.ftz (one MUFU op)
    "tma": _env_flag("SDFLEET_FP8_ATTN_TMA", True),  # K/V tiles through TMA descriptors (only where the GPU has TMA)
    "i2f_magic": _env_flag("SDFLEET_FP8_ATTN_I2F_MAGIC", True),  # int8 QK: int->float by bit trick
}


def _check_modes(qk: str, pv: str, scales: str = "head") -> None:
    if qk not in ("fp8", "int8"):
        raise ValueError(f"qk must be 'fp8' or 'int8', got {qk!r}")
    if pv not in ("fp8", "bf16"):
        raise ValueError(f"pv must be 'fp8' or 'bf16', got {pv!r}")
    if scales not in _V_SCALE:
        raise ValueError(f"scales must be one of {sorted(_V_SCALE)}, got {scales!r}")


def _options(**overrides) -> dict:
    opts = dict(DEFAULT_OPTIONS)
    for key, val in overrides.items():
        if key not in opts:
            raise TypeError(f"unknown fp8_attention option {key!r}")
        if val is not None:
            opts[key] = val
    _check_modes(opts["qk"], opts["pv"], opts["scales"])
    return opts


def is_supported(device: torch.device | int | None = None) -> tuple[bool, str]:
    """(ok, reason). Needs Triton, CUDA and compute capability >= 8.9."""
    if triton is None:
        return False, f"Triton is not importable ({_TRITON_IMPORT_ERROR!r})"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        return False, f"FP8 attention needs compute capability >= 8.9, device has {cc[0]}.{cc[1]}"
    return True, "ok"


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    ok, why = is_supported(q.device if q.is_cuda else None)
    if not ok:
        raise RuntimeError(f"fp8_attention unsupported: {why}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_cuda:
            raise RuntimeError(f"fp8_attention: {name} must be a CUDA tensor")
        if t.dtype != torch.bfloat16:
            raise RuntimeError(f"fp8_attention: {name} must be bfloat16, got {t.dtype}")
        if t.dim() != 4:
            raise RuntimeError(f"fp8_attention: {name} must be (batch, heads, seq, head_dim)")
    if q.shape != k.shape or k.shape != v.shape:
        raise RuntimeError(
            f"fp8_attention: q, k, v must have one shape (equal q/kv lengths), got "
            f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise RuntimeError(f"fp8_attention: head_dim {q.shape[3]} not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if q.shape[2] == 0:
        raise RuntimeError("fp8_attention: empty sequence")
    if q.shape[0] * q.shape[1] > 65535:
        raise RuntimeError("fp8_attention: batch * heads must be <= 65535")


def quantize_kv(k: torch.Tensor, v: torch.Tensor, **options) -> dict:
    """Quantize K (and V when pv='fp8') once; reusable by :func:`fp8_attention_quantized`."""
    opts = _options(**options)
    B, H, S, D = k.shape
    n_tiles = triton.cdiv(S, KV_BLOCK)
    s_pad = n_tiles * KV_BLOCK
    dev = k.device
    int8 = opts["qk"] == "int8"
    quant_v = opts["pv"] == "fp8"
    bh_scale = _V_SCALE[opts["scales"]] != "tile"  # one V scale per (batch, head) or per batch
    v_batch = opts["scales"] == "vbatch"
    k_head = opts["scales"] == "head"
    kq = torch.empty((B * H, s_pad, D), device=dev, dtype=torch.int8 if int8 else torch.float8_e4m3fn)
    ks = torch.empty((B * H, n_tiles), device=dev, dtype=torch.float32)
    if quant_v:
        vq = torch.empty((B * H, D, s_pad), device=dev, dtype=torch.float8_e4m3fn)
        vs = torch.empty((B * H, n_tiles), device=dev, dtype=torch.float32)
    else:
        vq, vs = kq, ks  # unused by the kernel
    if (bh_scale and quant_v) or k_head:
        amax = torch.zeros((2, B * H), device=dev, dtype=torch.float32)
        _kv_amax_kernel[(n_tiles, B * H)](
            k, v, amax[0], amax[1], *k.stride(), *v.stride(), H, S,
            HEAD_DIM=D, BLOCK=KV_BLOCK, DO_K=k_head, DO_V=bh_scale and quant_v, V_BATCH=v_batch, num_warps=4,
        )
    else:
        amax = torch.empty((2, 1), device=dev, dtype=torch.float32)
    _quant_kv_kernel[(n_tiles, B * H)](
        k, v, kq, ks, vq, vs, amax[0], amax[1],
        *k.stride(), *v.stride(),
        H, S, s_pad, n_tiles,
        HEAD_DIM=D, BLOCK=KV_BLOCK, QK_INT8=int8, QUANT_V=quant_v, BH_SCALE=bh_scale, K_HEAD=k_head,
        V_BATCH=v_batch, num_warps=4,
    )
    return {"kq": kq, "ks": ks, "vq": vq, "vs": vs, "v": v, "S": S, "s_pad": s_pad,
            "n_tiles": n_tiles, "opts": opts, "shape": (B, H, S, D)}


def fp8_rows_out(kv: dict, fp8_rows: tuple[int, int], rows: tuple[int, int] | None, out, device):
    """The E4M3 output rows of a joint attention (``fp8_attention_quantized``'s ``fp8_rows``, ``rows`` and
    ``out``), checked, for either kernel: (o8, scale, r0, r1, L, Lc)."""
    B, H, S, D = kv["shape"]
    opts = kv["opts"]
    L, Lc = fp8_rows
    if opts["scales"] != "vbatch" or opts["pv"] != "fp8" or L + Lc > S or min(L, Lc) < 0:
        raise ValueError(f"fp8_rows={fp8_rows} needs scales='vbatch', pv='fp8' and L + Lc <= {S}")
    row0, m_rows = rows if rows is not None else (0, L + Lc)
    if not 0 <= row0 <= m_rows <= L + Lc:
        raise ValueError(f"rows={rows}: need 0 <= r0 <= r1 <= L + Lc = {L + Lc}")
    shape = (B * (L + Lc), H * D)
    if out is None:
        o8 = torch.empty(shape, device=device, dtype=torch.float8_e4m3fn)
        o_scale = torch.empty((shape[0], 1), device=device, dtype=torch.float32)
    else:
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError("with fp8_rows, out is the (o8, scale) pair of an earlier call")
        o8, o_scale = out
        if o8.shape != shape or o8.dtype != torch.float8_e4m3fn or o_scale.shape != (shape[0], 1):
            raise ValueError(f"out for fp8_rows={fp8_rows}: ({shape} E4M3, ({shape[0]}, 1) float32)")
    return o8, o_scale, row0, m_rows, L, Lc


def fp8_attention_quantized(q: torch.Tensor, kv: dict, *, scale: float | None = None,
                            out=None, fp8_rows: tuple[int, int] | None = None,
                            rows: tuple[int, int] | None = None):
    """Attention of q against K/V already quantized by :func:`quantize_kv` or :func:`prep_joint`.

    q: bf16 (quantized per token in the kernel), or the INT8/E4M3 q of :func:`prep_joint` with its
    scales in ``kv["q_scale"]``.

    fp8_rows=(L, Lc): instead of bf16 (B, H, S, D), return ``(o8, scale)``: o8 (B*L + B*Lc, H*D)
    float8_e4m3fn, the attention output of the first L tokens of each batch element (rows b*L + t) and
    then of the next Lc tokens (rows B*L + b*Lc + t), with one float32 scale per row (B*L + B*Lc, 1):
    the input of the output projections, quantized in the epilogue. Needs scales="vbatch", pv="fp8".
    Text rows past L + Lc are not computed (the last block keeps no text output). With fp8_rows,
    ``rows=(r0, r1)`` computes only the joint sequence's rows [r0, r1) (default all L + Lc), into
    ``out=(o8, scale)`` when given (another launch's buffers), so the image and text rows can be two
    launches on two CUDA streams.
    """
    B, H, Sq, D = q.shape
    S = kv["S"]
    opts = kv["opts"]
    if Sq != S:
        raise RuntimeError(f"fp8_attention: q has {Sq} tokens, k/v have {S}; only equal lengths are supported")
    if kv.get("v_order", "natural") != "natural":
        raise ValueError("this K/V was prepared for the Gluon kernel (prep_joint v_order='gluon'): "
                         "use attention_gluon.joint_attention")
    sm_scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    out_scale = None
    row0 = 0
    if fp8_rows is not None:
        out, out_scale, row0, m_rows, L, Lc = fp8_rows_out(kv, fp8_rows, rows, out, q.device)
        if m_rows == row0:
            return out, out_scale
    else:
        if rows is not None:
            raise ValueError("rows needs fp8_rows")
        L, Lc, m_rows = S, 0, S
        if out is None:
            # keeps q's strides: a (B,S,H,D)-view in gives one out
            out = torch.empty_like(q, dtype=torch.bfloat16)
    q_pre = q.dtype != torch.bfloat16
    if q_pre and (kv.get("q_scale") is None or (q.dtype == torch.int8) != (opts["qk"] == "int8")):
        raise ValueError("a quantized q needs its scales in kv['q_scale'] (prep_joint) and the dtype of qk")
    v = kv["v"] if kv["v"] is not None else q  # bf16 V is read only with pv="bf16"
    s_pad = kv["s_pad"]
    use_tma = _use_tma(opts, q.device)
    desc_k = desc_v = None
    if use_tma:
        # block shapes are set per autotune config by the pre-hook
        desc_k = TensorDescriptor.from_tensor(kv["kq"].view(B * H * s_pad, D), [KV_BLOCK, D])
        if opts["pv"] == "fp8":
            desc_v = TensorDescriptor.from_tensor(kv["vq"].view(B * H * D, s_pad), [D, KV_BLOCK])

    def grid(meta):
        return (triton.cdiv(m_rows - row0, meta["BLOCK_M"]), B * H)

    o_strides = out.stride() if fp8_rows is None else (0, 0, 0, 0)
    _attn_fwd_kernel[grid](
        q, kv.get("q_scale") if q_pre else kv["ks"], kv["kq"], kv["ks"], kv["vq"], kv["vs"], v, out, out_scale if out_scale is not None else kv["vs"],
        desc_k, desc_v,
        *q.stride(), *v.stride(), *o_strides,
        H, S, s_pad, kv["n_tiles"], sm_scale * LOG2E, B, row0, m_rows, L, Lc,
        HEAD_DIM=D, KV_TILE=KV_BLOCK,
        QK_INT8=opts["qk"] == "int8", PV_FP8=opts["pv"] == "fp8",
        EXP_FTZ=bool(opts["ftz"]), USE_TMA=use_tma, BH_SCALE=_V_SCALE[opts["scales"]] != "tile",
        K_HEAD=opts["scales"] == "head",
        I2F_MAGIC=bool(opts["i2f_magic"]) and opts["qk"] == "int8",
        OUT_FP8=fp8_rows is not None, Q_PRE=q_pre,
    )
    return out if fp8_rows is None else (out, out_scale)


def prep_joint(img: torch.Tensor, ctx: torch.Tensor | None, norm_w: torch.Tensor | None,
               ctx_norm_w: torch.Tensor | None, *, batch: int, heads: int, eps: float = 1e-6,
               v_order: str = "natural", **options) -> tuple[torch.Tensor, dict]:
    """Joint q/k/v from the streams' fused q/k/v GEMM outputs, ready for :func:`fp8_attention_quantized`.

    img (B*L, 3*H*D), ctx (B*Lc, 3*H*D) or None: bf16, row stride free, columns [q | k | v] x heads x D.
    norm_w / ctx_norm_w: (2, D) q and k RMSNorm weights of each stream (both or neither).
    Returns q (B, H, L+Lc, D), normed and quantized per token (INT8, or E4M3 with qk="fp8"), and the dict
    for the attention kernel: q's scales, K normed and quantized per 128-token tile in the same pass, V
    quantized with one scale per batch element (scales="vbatch") by a second pass over V once its amax is
    known. No bf16 copy of q, k or v is written.

    ``v_order="gluon"``: V's tokens stored in the order the Gluon kernel's P operand holds them, for
    ``attention_gluon.joint_attention`` (which this K/V is then only good for).
    """
    if v_order not in ("natural", "gluon"):
        raise ValueError(f"prep_joint: v_order {v_order!r}; use 'natural' (the Triton kernel) or 'gluon'")
    opts = _options(**{**options, "scales": "vbatch"})
    if opts["pv"] != "fp8":
        raise ValueError("prep_joint quantizes V: needs pv='fp8'")
    if ctx is not None and (norm_w is None) != (ctx_norm_w is None):
        raise ValueError("prep_joint: give q/k norm weights for both streams or for neither")
    D = img.shape[1] // (3 * heads)
    if D not in SUPPORTED_HEAD_DIMS or img.shape[1] != 3 * heads * D or img.stride(1) != 1:
        raise RuntimeError(f"prep_joint: img must be (B*L, 3*heads*head_dim) with head_dim in {SUPPORTED_HEAD_DIMS}")
    L = img.shape[0] // batch
    Lc = ctx.shape[0] // batch if ctx is not None else 0
    if ctx is not None and (ctx.shape[1] != img.shape[1] or ctx.stride(1) != 1):
        raise RuntimeError("prep_joint: ctx must have img's columns")
    S = L + Lc
    n_tiles = triton.cdiv(S, KV_BLOCK)
    s_pad = n_tiles * KV_BLOCK
    dev = img.device
    int8 = opts["qk"] == "int8"
    qdt = torch.int8 if int8 else torch.float8_e4m3fn
    q8 = torch.empty((batch, heads, S, D), device=dev, dtype=qdt)
    q_scale = torch.empty((batch * heads, S), device=dev, dtype=torch.float32)
    kq = torch.empty((batch * heads, s_pad, D), device=dev, dtype=qdt)
    ks = torch.empty((batch * heads, n_tiles), device=dev, dtype=torch.float32)
    vq = torch.empty((batch * heads, D, s_pad), device=dev, dtype=torch.float8_e4m3fn)
    vs = torch.empty((batch * heads, n_tiles), device=dev, dtype=torch.float32)
    vpart = torch.empty((batch * heads, n_tiles), device=dev, dtype=torch.float32)
    has_norm = norm_w is not None
    ctx_arg = ctx if ctx is not None else img
    ctx_stride = ctx.stride(0) if ctx is not None else 0
    _prep_joint_kernel[(batch * heads, n_tiles, 3)](
        img, ctx_arg, norm_w if has_norm else img,
        (ctx_norm_w if ctx_norm_w is not None else norm_w) if has_norm else img,
        q8, q_scale, kq, ks, vpart, heads, L, Lc, S, s_pad, n_tiles, img.stride(0), ctx_stride, eps,
        HAS_NORM=has_norm, HAS_CTX=ctx is not None, QK_INT8=int8, D=D, BLOCK=KV_BLOCK,
    )
    _prep_v_kernel[(batch * heads, n_tiles)](
        img, ctx_arg, vq, vs, vpart, heads, L, Lc, S, s_pad, n_tiles, img.stride(0), ctx_stride,
        HAS_CTX=ctx is not None, D=D, BLOCK=KV_BLOCK, PARTS=triton.next_power_of_2(heads * n_tiles),
        GLUON_ORDER=v_order == "gluon",
    )
    return q8, {"kq": kq, "ks": ks, "vq": vq, "vs": vs, "v": None, "q_scale": q_scale, "S": S, "s_pad": s_pad,
               "n_tiles": n_tiles, "opts": opts, "shape": (batch, heads, S, D), "v_order": v_order}


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                  **options) -> torch.Tensor:
    """softmax(q k^T * scale) v with Q/K and P/V on FP8 (or INT8 for QK) tensor cores.

    q, k, v: (batch, heads, seq, head_dim) bf16 CUDA tensors of one shape (self/joint attention),
    head_dim 64 or 128; strided views (e.g. of a (batch, seq, heads, head_dim) tensor) are read in
    place. scale defaults to 1/sqrt(head_dim). Returns bf16 with q's shape and memory layout.
    Options (defaults in DEFAULT_OPTIONS, env SDFLEET_FP8_ATTN_*): qk="fp8"|"int8",
    pv="fp8"|"bf16", scales="ktile"|"head"|"tile"|"vbatch", ftz, tma, i2f_magic.
    Raises RuntimeError where unsupported (no Triton, no CUDA, compute capability < 8.9, other
    head_dim, wrong dtype/shape). The first call per (padded length, head_dim, variant) compiles the
    kernel (and autotunes it when SDFLEET_FP8_ATTN_CONFIG lists several configs): call once per shape
    at boot, before CUDA-graph capture.
    """
    _validate(q, k, v)
    with torch.cuda.device(q.device):
        kv = quantize_kv(k, v, **options)
        return fp8_attention_quantized(q, kv, scale=scale)


def warmup(shapes, *, device: torch.device | str | None = None, **options) -> None:
    """Compile (and, with several configs, autotune) once per (batch, heads, seq, head_dim) at boot.

    Later calls with the same padded length, head_dim and options reuse the kernel, so call this
    before capturing CUDA graphs. shapes: iterable of (batch, heads, seq, head_dim).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda")
    for B, H, S, D in shapes:
        x = torch.randn(3, B, H, S, D, device=dev, dtype=torch.bfloat16)
        fp8_attention(x[0], x[1], x[2], **options)
    torch.cuda.synchronize(dev)
