"""FP8 flash-attention forward for Hopper written in Gluon (prototype for issue 14), head_dim 64, non-causal.

Why Gluon: Triton 3.6 (``attention.py``) puts a wgmma wait right after every wgmma of the loop, so a warpgroup's
softmax never runs beside its own tensor-core work. Gluon (``triton.experimental.gluon``, Triton 3.6) exposes the
pieces of an FA3-style kernel directly: async ``warpgroup_mma`` + ``warpgroup_mma_wait(num_outstanding)``, TMA,
mbarriers and ``gl.warp_specialize`` (with per-partition register budgets, i.e. ``setmaxnreg``).

Variants (``VARIANTS``):

* ``ws`` (default): one CTA = ``NC`` consumer warpgroups (64 query rows each, NC=3: 192 rows) + one producer warp.
  The producer TMA-loads the consumers' Q tiles and streams K/V tiles through a ``STAGES``-deep shared-memory ring
  (``k_ready`` / ``v_ready`` mbarriers with TMA transaction counts; ``kv_empty`` released once per consumer).
  Each consumer runs the FA3 intra-warpgroup overlap::

      issue S_j = Q K_j^T                        (async wgmma)
      O *= alpha_{j-1}                           (overlaps S_j's wgmma)
      issue O += P_{j-1} V_{j-1}                 (async wgmma, P from registers)
      wait(1) -> S_j ready;  softmax(S_j) -> P_j (overlaps the PV wgmma)
      wait(0) -> O ready;    release stage j-1

  The consumer warpgroups are separate partitions (the default partition is consumer 0), so the hardware
  schedulers interleave their softmaxes and GEMMs freely. No explicit FA3 ping-pong (named barriers ordering WG0's
  softmax against WG1's GEMMs): Gluon 3.6 exposes no named-barrier builtin to user code.

  Three things the offline SASS showed were needed for the overlap to survive ptxas:
  (1) P -> E4M3 A operand without shuffles: P's columns are reinterpreted in the order the FP8 A-operand registers
  hold them (a register-only layout change, checked with ``assert_trivial``) and V's tokens are stored in that
  order (:func:`_v_token_order`); packing by inline ``cvt.rn.satfinite.e4m3x2.f32``.
  (2) P is converted in the same basic block as its wgmma (a loop-carried E4M3 tensor became 64 i8 phis: ~170
  PRMT/LOP3 per tile). (3) a never-taken branch between the softmax and ``wait_group 0`` (``_bb_fence``): without
  it ptxas hoists the wait to ~20 instructions after ``wait_group 1``, so the softmax overlapped nothing.
  Keeping S_{j+1} in flight across the loop back edge instead makes ptxas serialize every wgmma (C7514).
* ``pipe``: no warp specialization: one warpgroup of 4 warps per CTA (64 rows), the same overlapped loop, the
  consumer issues its own TMA prefetches (``STAGES - 1`` tiles ahead); several CTAs per SM. ``pipe4``: the same
  at 128 registers (4 CTAs a SM; ptxas spills 24 registers in the loop). ``_i8`` / ``_x3``: the Q/K formats below.

Numerics (the same scheme as ``attention.py``'s defaults, simpler scales):

* Q: one scale per token (row amax / 448 for E4M3, / 127 for INT8), folded with K's scale, the softmax scale and
  log2(e) into one per-row multiplier ``qk_mult`` (one FFMA per score).
* K: one scale per (batch, head); V one scale per (batch, head), applied in the epilogue. K is stored (token, dim)
  and V transposed (dim, token), both padded with zeros to a multiple of 128 tokens: both wgmma B operands are
  K-major, as FP8 wgmma needs.
* ``qk="fp8"`` (default): E4M3 Q/K; ``qk="int8"``: symmetric INT8 Q/K on the s8 tensor cores, int32 -> fp32 by the
  0x4B400000 bit trick (no I2F). ``qk="fp8x3"`` (``pipe`` kind only): Q and K split into a high and a low E4M3
  part at one scale (x/s = hi + lo, lo = E4M3(x/s - hi)); S = Q_hi K_hi + Q_lo K_hi + Q_hi K_lo, three chained
  wgmmas into one fp32 accumulator, so the softmax is the E4M3 one (no integer add per score) and the logits
  are ~16x more exact than E4M3's (Q_lo K_lo is below that rounding). Its cost is the S wgmma's latency, which
  the softmax does not overlap: measured slower than INT8 (``docs/PERFORMANCE.md``).
* P = exp2(s - m + 8) in E4M3 (range [0, 256]); exp2 is ``ex2.approx.ftz.f32``; row sums in fp32.
* The ragged tail tile (4429 = 34 * 128 + 77) is masked with -inf; query rows past S are computed on whatever the
  TMA box holds (zeros past the end of the tensor) and not stored.

Quantization (:func:`prepare`) is plain torch ops (not fused; outside the kernel-alone timing).

Import works without CUDA and without Triton/Gluon; calling :func:`gluon_attention` there raises RuntimeError.
``python -m worker.engine.fp8.attention_gluon --offline DIR`` compiles every variant for sm_90a on a machine
without a GPU (Triton's bundled ptxas) and writes ttgir/ptx/sass plus a summary (wgmma / wait / setmaxnreg counts,
registers, spills).
"""

from __future__ import annotations

import math

import torch

try:  # Triton / Gluon are optional at import time (CPU CI has none).
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _GLUON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the machine
    triton = gluon = gl = None
    TensorDescriptor = None
    _GLUON_IMPORT_ERROR = exc

__all__ = ["gluon_attention", "gluon_attention_quantized", "joint_attention", "joint_supported", "prepare", "emulate", "is_supported", "VARIANTS",
           "compile_offline"]

HEAD_DIM = 64
BLOCK_M = 64  # query rows per consumer warpgroup
BLOCK_N = 128  # keys per K/V tile (and padding unit)
FP8_MAX = 448.0
INT8_MAX = 127.0
LOG2E = 1.4426950408889634
_TINY = 1e-30

# name -> launch parameters. nc: consumer warpgroups per CTA (ws) ; regs: per-partition register budgets
# [consumer workers..., producer]; maxnreg: the kernel's launch register count (sets the CTA's register pool).
VARIANTS = {
    # 16 warps x 128 regs = the whole register file: 1 CTA (3 x 64 query rows) per SM; the default partition
    # (consumer 0) gets what is left: 512 - 2 * 160 - 24 = 168
    "ws3": dict(kind="ws", nc=3, stages=4, maxnreg=128, reg_c=160, reg_p=24, qk="fp8"),
    # 12 warps x 168: 1 CTA (2 x 64 rows) per SM
    "ws2": dict(kind="ws", nc=2, stages=4, maxnreg=168, reg_c=232, reg_p=24, qk="fp8"),
    # 4 warps x 168 (158 used): 3 CTAs (3 x 64 rows) per SM
    "pipe": dict(kind="pipe", nc=1, stages=3, maxnreg=168, reg_c=0, reg_p=0, qk="fp8"),
    "ws3_i8": dict(kind="ws", nc=3, stages=4, maxnreg=128, reg_c=160, reg_p=24, qk="int8"),
    "pipe_i8": dict(kind="pipe", nc=1, stages=3, maxnreg=168, reg_c=0, reg_p=0, qk="int8"),
    # split E4M3 Q/K (qk="fp8x3"): three chained QK wgmmas, the softmax of "pipe". 2 stages keep 3 CTAs a SM
    # (56 KB of shared memory each); 3 stages fit 2.
    "pipe_x3": dict(kind="pipe", nc=1, stages=2, maxnreg=168, reg_c=0, reg_p=0, qk="fp8x3"),
    # 4 warps x 128 registers: 4 CTAs (4 x 64 rows) a SM, if ptxas fits the loop in 128 registers
    "pipe4": dict(kind="pipe", nc=1, stages=3, maxnreg=128, reg_c=0, reg_p=0, qk="fp8"),
    "pipe4_i8": dict(kind="pipe", nc=1, stages=3, maxnreg=128, reg_c=0, reg_p=0, qk="int8"),
    # row max and sum as trees (``_row_tree``) instead of one dependent chain a row
    "pipe_t": dict(kind="pipe", nc=1, stages=3, maxnreg=168, reg_c=0, reg_p=0, qk="fp8", tree=True),
    "pipe_i8_t": dict(kind="pipe", nc=1, stages=3, maxnreg=168, reg_c=0, reg_p=0, qk="int8", tree=True),
    "pipe_x3_t": dict(kind="pipe", nc=1, stages=2, maxnreg=168, reg_c=0, reg_p=0, qk="fp8x3", tree=True),
    "ws3_t": dict(kind="ws", nc=3, stages=4, maxnreg=128, reg_c=160, reg_p=24, qk="fp8", tree=True),
    "pipe_x3s3": dict(kind="pipe", nc=1, stages=3, maxnreg=168, reg_c=0, reg_p=0, qk="fp8x3"),
    # two tiles a loop step, S_{j+1} in flight during softmax(S_j) (``_attn_pair``): two S tiles in registers, so
    # 232 registers (2 CTAs a SM) or the 168 of 3 CTAs a SM if ptxas fits it
    "pair_i8_t": dict(kind="pipe", nc=1, stages=3, maxnreg=232, reg_c=0, reg_p=0, qk="int8", tree=True, pair=True),
    "pair3_i8_t": dict(kind="pipe", nc=1, stages=3, maxnreg=168, reg_c=0, reg_p=0, qk="int8", tree=True, pair=True),
    "pair_t": dict(kind="pipe", nc=1, stages=3, maxnreg=232, reg_c=0, reg_p=0, qk="fp8", tree=True, pair=True),
    "pair4_i8_t": dict(kind="pipe", nc=1, stages=4, maxnreg=232, reg_c=0, reg_p=0, qk="int8", tree=True, pair=True),
    # the engine's path (:func:`joint_attention`): pipe_i8_t with prep_joint's inputs and an E4M3 output
    "joint": dict(kind="pipe", nc=1, stages=3, maxnreg=168, reg_c=0, reg_p=0, qk="int8", tree=True, joint=True),
    "joint_pair": dict(kind="pipe", nc=1, stages=3, maxnreg=232, reg_c=0, reg_p=0, qk="int8", tree=True, pair=True,
                       joint=True),
}
DEFAULT_VARIANT = "ws3"


if gluon is not None:

    # kernel-visible copies of the module constants
    _BM = gl.constexpr(BLOCK_M)
    _BN = gl.constexpr(BLOCK_N)
    _HD = gl.constexpr(HEAD_DIM)
    PACK_ASM = gl.constexpr(True)
    BB_FENCE = gl.constexpr(True)

    @gluon.jit
    def _exp2_ftz(x):
        # one MUFU.EX2, no denormal fix-up (arguments <= 8)
        return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _max2(a, b):
        return gl.maximum(a, b)

    @gluon.jit
    def _add2(a, b):
        return a + b

    @gluon.jit
    def _row_tree(x, row_layout: gl.constexpr, IS_MAX: gl.constexpr):
        # Row max / sum of a (_BM, N) wgmma accumulator as a tree inside each thread, then across its 4 lanes.
        # gl.max / gl.sum fold a thread's 32 values of a row one after another: a 32-long chain of dependent
        # FMNMX / FADD (offline SASS), whose latency is the kernel's largest stall ("Wait", Nsight Compute).
        # A thread holds columns 8g + 2t + e of its rows (g < N/8, t = lane % 4, e < 2): put t first, then halve
        # the thread-local axis five times, each level N/8 independent operations.
        BM: gl.constexpr = x.shape[0]
        G: gl.constexpr = x.shape[1] // 8
        y = gl.reshape(x, [BM, G, 4, 2])
        y = gl.permute(y, [0, 2, 1, 3])  # row, t, g, e
        n: gl.constexpr = G * 2
        y = gl.reshape(y, [BM, 4, n // 2, 2])
        a, b = gl.split(y)
        y = _max2(a, b) if IS_MAX else _add2(a, b)  # [BM, 4, n/2]
        y = gl.reshape(y, [BM, 4, n // 4, 2])
        a, b = gl.split(y)
        y = _max2(a, b) if IS_MAX else _add2(a, b)
        y = gl.reshape(y, [BM, 4, n // 8, 2])
        a, b = gl.split(y)
        y = _max2(a, b) if IS_MAX else _add2(a, b)
        y = gl.reshape(y, [BM, 4, n // 16, 2])
        a, b = gl.split(y)
        y = _max2(a, b) if IS_MAX else _add2(a, b)
        y = gl.reshape(y, [BM, 4, n // 32, 2])
        a, b = gl.split(y)
        y = _max2(a, b) if IS_MAX else _add2(a, b)  # [BM, 4, n/32]
        if IS_MAX:
            r = gl.max(gl.max(y, axis=2), axis=1)
        else:
            r = gl.sum(gl.sum(y, axis=2), axis=1)
        return gl.convert_layout(r, row_layout, assert_trivial=True)

    @gluon.jit
    def _softmax_tile(s, a_row, m_i, l_i, n0, S, s_layout: gl.constexpr, QK_INT8: gl.constexpr,
                      MASK: gl.constexpr, ROW_TREE: gl.constexpr):
        # s: raw scores of one (_BM, _BN) tile in the wgmma accumulator layout (fp32, or int32 with
        # QK_INT8). a_row: per-row multiplier (q scale * k scale * softmax scale * log2 e). Running max m_i is in
        # scaled log2 units. Returns P = exp2(s * a - m + 8) (fp32), the new max, row sum and rescale factor.
        if QK_INT8:
            # bits(2^23 + 2^22 + x) for |x| < 2^22 (64 * 127 * 127 < 2^20): fp32 value 12582912 + x, no I2F
            sf = (s + 0x4B400000).to(gl.float32, bitcast=True)
            off = 12582912.0
        else:
            sf = s
            off = 0.0
        if MASK:
            cols = n0 + gl.arange(0, _BN, layout=gl.SliceLayout(0, s_layout))
            sf = gl.where(gl.expand_dims(cols < S, 0), sf, float("-inf"))
        if ROW_TREE:
            row_max = _row_tree(sf, gl.SliceLayout(1, s_layout), True)
        else:
            row_max = gl.max(sf, axis=1)
        m_new = gl.maximum(m_i, (row_max - off) * a_row)
        c = 8.0 - m_new - off * a_row
        p = _exp2_ftz(sf * gl.expand_dims(a_row, 1) + gl.expand_dims(c, 1))
        alpha = _exp2_ftz(m_i - m_new)
        if ROW_TREE:
            l_i = l_i * alpha + _row_tree(p, gl.SliceLayout(1, s_layout), False)
        else:
            l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _bb_fence(j):
        # A never-taken branch in the PTX: ends the basic block, so ptxas cannot hoist the following
        # wgmma.wait_group 0 (and the stage release after it) into the softmax, which it otherwise does (it moves
        # the wait to ~20 instructions after wait_group 1, leaving the softmax no PV wgmma to overlap).
        gl.inline_asm_elementwise(
            "{ .reg .pred %pskip;\n"
            "setp.ne.s32 %pskip, $1, -2147483647;\n"
            "@%pskip bra.uni BBF_SKIP;\n"
            "membar.cta;\n"
            "BBF_SKIP:\n"
            "mov.b32 $0, $1; }",
            "=r,r", [j], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _p_operand(p, p_layout: gl.constexpr):
        # P (fp32, wgmma accumulator layout) -> E4M3 A operand of the PV wgmma with no data movement between
        # threads. In each 32-column chunk a thread of the accumulator holds columns 8g + 2t + e (g < 4 its column
        # group, t = lane % 4, e < 2); the FP8 A operand wants k = 4t + 2g' + e (+16 for g >= 2, g = 2h + g'). So
        # P's columns are reinterpreted in the order k -> col(k) (swap the g' and t axes), which costs nothing, and
        # V's tokens are stored in the same order (:func:`_v_token_order`), so P'V' = PV.
        # The E4M3 conversion packs the A operand's 4 consecutive k of a thread into one 32-bit register with two
        # cvt.rn.satfinite.e4m3x2.f32 and a mov (inline PTX: p.to(float8e4nv) costs byte extracts and re-packs).
        BM: gl.constexpr = p.shape[0]
        NCH: gl.constexpr = p.shape[1] // 32
        pr = gl.reshape(p, [BM, NCH, 2, 2, 4, 2])  # row, chunk, h, g', t, e
        pr = gl.permute(pr, [0, 1, 2, 4, 3, 5])  # row, chunk, h, t, g', e
        pr = gl.reshape(pr, [BM, p.shape[1]])
        pr = gl.convert_layout(pr, p_layout, assert_trivial=True)
        if PACK_ASM:
            return gl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi;\n"
                "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
                "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
                "mov.b32 $0, {lo, hi}; }",
                "=r,r,r,r,r", [pr], dtype=gl.float8e4nv, is_pure=True, pack=4)
        else:
            return pr.to(gl.float8e4nv)

    @gluon.jit
    def _kv_load(desc_k, desc_k2, desc_v, k_smem, k2_smem, v_smem, k_ready, v_ready, bh, S_PAD, j, st, pred,
                 QK_X3: gl.constexpr):
        if QK_X3:  # K's high and low E4M3 parts land on one barrier
            mbarrier.expect(k_ready.index(st), 2 * _BN * _HD, pred=pred)
            tma.async_copy_global_to_shared(desc_k2, [bh * S_PAD + j * _BN, 0], k_ready.index(st),
                                            k2_smem.index(st), pred=pred)
        else:
            mbarrier.expect(k_ready.index(st), _BN * _HD, pred=pred)
        tma.async_copy_global_to_shared(desc_k, [bh * S_PAD + j * _BN, 0], k_ready.index(st), k_smem.index(st),
                                        pred=pred)
        mbarrier.expect(v_ready.index(st), _BN * _HD, pred=pred)
        tma.async_copy_global_to_shared(desc_v, [bh * _HD, j * _BN], v_ready.index(st), v_smem.index(st),
                                        pred=pred)

    @gluon.jit
    def _attn_step(j, p_prev, acc, m_i, l_i, alpha, a_row, q, q2, k_smem, k2_smem, v_smem, k_ready, v_ready,
                   kv_empty, desc_k, desc_k2, desc_v, bh, S, S_PAD, n_tiles,
                   s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                   STAGES: gl.constexpr, QK_INT8: gl.constexpr, QK_X3: gl.constexpr, SELF_LOAD: gl.constexpr,
                   MASK: gl.constexpr, ROW_TREE: gl.constexpr, Ks_bh=None, ks_j=1.0, K_TILE: gl.constexpr = False):
        # In: p_prev = P_{j-1} (fp32, accumulator layout), acc = O_{j-2} in the scale of m_{j-2},
        # alpha = exp2(m_{j-2} - m_{j-1}). FA3's intra-warpgroup overlap:
        #   P_{j-1} -> E4M3 A operand (same basic block as its wgmma: a loop-carried E4M3 tensor costs byte
        #   unpack/repack in SASS); issue S_j = Q K_j^T into P_{j-1}'s registers; O *= alpha (overlaps S_j);
        #   issue O += P_{j-1} V_{j-1}; wait(1): S_j ready; softmax(S_j) (overlaps the PV wgmma); wait(0).
        # (Rotating the loop so S_j is in flight across the back edge makes ptxas serialize all wgmmas: C7514.)
        st = j % STAGES
        pst = (j - 1) % STAGES
        if K_TILE:  # the engine's K: one scale per 128-key tile (prep_joint); the next tile's is loaded a step ahead
            a_t = a_row * ks_j
            ks_n = gl.load(Ks_bh + gl.minimum(j + 1, n_tiles - 1))
        else:
            a_t = a_row
            ks_n = ks_j
        p_op = _p_operand(p_prev, p_layout)
        mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
        if QK_INT8:
            s_init = p_prev.to(gl.int32, bitcast=True)
        else:
            s_init = p_prev
        s_tok = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), s_init, use_acc=False, is_async=True)
        if QK_X3:  # + Q_lo K_hi + Q_hi K_lo into the same accumulator (Q_lo K_lo is below E4M3's rounding)
            s_tok = warpgroup_mma(q2, k_smem.index(st).permute((1, 0)), s_tok, is_async=True)
            s_tok = warpgroup_mma(q, k2_smem.index(st).permute((1, 0)), s_tok, is_async=True)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        mbarrier.wait(v_ready.index(pst), ((j - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p_op, v_smem.index(pst).permute((1, 0)), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        p, m_i, l_i, alpha = _softmax_tile(s, a_t, m_i, l_i, j * _BN, S, s_layout, QK_INT8, MASK, ROW_TREE)
        if BB_FENCE:
            _bb_fence(j)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        if SELF_LOAD:
            # stage pst is free (K_{j-1} and V_{j-1} read): prefetch tile j - 1 + STAGES into it
            nxt = j - 1 + STAGES
            _kv_load(desc_k, desc_k2, desc_v, k_smem, k2_smem, v_smem, k_ready, v_ready, bh, S_PAD, nxt, pst,
                     nxt < n_tiles, QK_X3)
        else:
            mbarrier.arrive(kv_empty.index(pst), count=1)
        return p, acc, m_i, l_i, alpha, ks_n

    @gluon.jit
    def _attn_pair(j, p_prev, acc, m_i, l_i, alpha, a_row, q, k_smem, v_smem, k_ready, v_ready, desc_k, desc_v,
                   bh, S, S_PAD, n_tiles, s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                   STAGES: gl.constexpr, QK_INT8: gl.constexpr, ROW_TREE: gl.constexpr, Ks_bh, ks_j,
                   K_TILE: gl.constexpr):
        # Tiles j and j+1 (neither the last), with S_{j+1} in flight during softmax(S_j): two S tiles in
        # registers (the ``pair`` variants). In and out as _attn_step's. wgmma groups complete in the order they
        # were issued: S_j, PV_{j-1}, S_{j+1}; then PV_j. Nothing is in flight across the loop's back edge (that
        # made ptxas serialize every wgmma, C7514).
        st0 = j % STAGES
        st1 = (j + 1) % STAGES
        pst = (j - 1) % STAGES
        if K_TILE:
            a0 = a_row * ks_j
            a1 = a_row * gl.load(Ks_bh + j + 1)
            ks_n = gl.load(Ks_bh + gl.minimum(j + 2, n_tiles - 1))
        else:
            a0 = a_row
            a1 = a_row
            ks_n = ks_j
        if QK_INT8:
            s_dtype: gl.constexpr = gl.int32
        else:
            s_dtype: gl.constexpr = gl.float32
        p_op = _p_operand(p_prev, p_layout)
        mbarrier.wait(k_ready.index(st0), (j // STAGES) & 1)
        if QK_INT8:
            s_init = p_prev.to(gl.int32, bitcast=True)
        else:
            s_init = p_prev
        s0_tok = warpgroup_mma(q, k_smem.index(st0).permute((1, 0)), s_init, use_acc=False, is_async=True)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        mbarrier.wait(v_ready.index(pst), ((j - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p_op, v_smem.index(pst).permute((1, 0)), acc, is_async=True)
        mbarrier.wait(k_ready.index(st1), ((j + 1) // STAGES) & 1)
        s1_tok = warpgroup_mma(q, k_smem.index(st1).permute((1, 0)), gl.zeros([_BM, _BN], s_dtype, layout=s_layout),
                               use_acc=False, is_async=True)
        s0 = warpgroup_mma_wait(2, deps=(s0_tok, ))
        p0, m_i, l_i, alpha0 = _softmax_tile(s0, a0, m_i, l_i, j * _BN, S, s_layout, QK_INT8, False, ROW_TREE)
        if BB_FENCE:
            _bb_fence(j)
        acc = warpgroup_mma_wait(1, deps=(acc_tok, ))
        # stage pst (tile j - 1) is read: prefetch tile j + 2 into it
        _kv_load(desc_k, desc_k, desc_v, k_smem, k_smem, v_smem, k_ready, v_ready, bh, S_PAD, j - 1 + STAGES, pst,
                 j - 1 + STAGES < n_tiles, False)
        p_op0 = _p_operand(p0, p_layout)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha0, gl.SliceLayout(1, o_layout)), 1)
        mbarrier.wait(v_ready.index(st0), (j // STAGES) & 1)
        acc_tok = warpgroup_mma(p_op0, v_smem.index(st0).permute((1, 0)), acc, is_async=True)
        s1 = warpgroup_mma_wait(1, deps=(s1_tok, ))
        p1, m_i, l_i, alpha1 = _softmax_tile(s1, a1, m_i, l_i, (j + 1) * _BN, S, s_layout, QK_INT8, False, ROW_TREE)
        if BB_FENCE:
            _bb_fence(j + 1)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        _kv_load(desc_k, desc_k, desc_v, k_smem, k_smem, v_smem, k_ready, v_ready, bh, S_PAD, j + STAGES, st0,
                 j + STAGES < n_tiles, False)
        return p1, acc, m_i, l_i, alpha1, ks_n

    @gluon.jit
    def _consumer(q_smem, q2_smem, k_smem, k2_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                  desc_q, desc_q2, desc_k, desc_k2, desc_v, Qm, Vs, O, bh, m0, S, S_PAD, n_tiles,
                  WG: gl.constexpr, STAGES: gl.constexpr, QK_INT8: gl.constexpr, QK_X3: gl.constexpr,
                  SELF_LOAD: gl.constexpr, ROW_TREE: gl.constexpr, Ks=None, Os=None, M_ROWS=0, L_IMG=0, L_CTX=0,
                  B=1, H=1, qk_scale=1.0, JOINT: gl.constexpr = False, PAIR: gl.constexpr = False):
        # JOINT: the engine's inputs and output (:func:`joint_attention`). Qm holds Q's per-token scales
        # (times qk_scale here), K has one scale per 128-key tile (Ks), and the output is written as the
        # output projections' E4M3 input: rows [.., M_ROWS) of the joint sequence, image rows (< L_IMG) to
        # rows b * L_IMG + t of O (B * (L_IMG + L_CTX), H * 64), text rows after all image rows, with V's
        # scale (one a batch element) as each row's scale in Os.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, _BN, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, _HD, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        if QK_INT8:
            s_dtype: gl.constexpr = gl.int32
        else:
            s_dtype: gl.constexpr = gl.float32

        row0 = m0 + WG * _BM
        bh64 = bh.to(gl.int64)
        if SELF_LOAD:
            if QK_X3:
                mbarrier.expect(q_bar.index(WG), 2 * _BM * _HD)
                tma.async_copy_global_to_shared(desc_q2, [bh * S + row0, 0], q_bar.index(WG), q2_smem.index(WG))
            else:
                mbarrier.expect(q_bar.index(WG), _BM * _HD)
            tma.async_copy_global_to_shared(desc_q, [bh * S + row0, 0], q_bar.index(WG), q_smem.index(WG))
            for i in gl.static_range(STAGES):  # fill every stage; step j refills stage (j-1) % STAGES
                _kv_load(desc_k, desc_k2, desc_v, k_smem, k2_smem, v_smem, k_ready, v_ready, bh, S_PAD, i, i,
                         i < n_tiles, QK_X3)
        rows = row0 + gl.arange(0, _BM, layout=row_s)
        a_row = gl.load(Qm + bh64 * S + rows, mask=rows < S, other=1.0)
        if JOINT:
            a_row = a_row * qk_scale
            Ks_bh = Ks + bh * n_tiles
            a_0 = a_row * gl.load(Ks_bh)
            ks = gl.load(Ks_bh + 1)  # S > _BN: there are >= 2 tiles
        else:
            Ks_bh = Qm
            ks = 1.0
            a_0 = a_row
        q = q_smem.index(WG)
        q2 = q2_smem.index(WG)
        mbarrier.wait(q_bar.index(WG), 0)

        # tile 0 (S > _BN is required, so tile 0 is full and there are >= 2 tiles)
        m_i = gl.full([_BM], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([_BM], gl.float32, layout=row_s)
        acc = gl.zeros([_BM, _HD], gl.float32, layout=o_layout)
        s = gl.zeros([_BM, _BN], s_dtype, layout=s_layout)
        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s, use_acc=False, is_async=True)
        if QK_X3:
            s_tok = warpgroup_mma(q2, k_smem.index(0).permute((1, 0)), s_tok, is_async=True)
            s_tok = warpgroup_mma(q, k2_smem.index(0).permute((1, 0)), s_tok, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        p, m_i, l_i, alpha = _softmax_tile(s, a_0, m_i, l_i, 0, S, s_layout, QK_INT8, False, ROW_TREE)

        if PAIR:  # the middle tiles two at a time (SELF_LOAD, not QK_X3), then the odd one out
            for jj in range(0, (n_tiles - 2) // 2):
                p, acc, m_i, l_i, alpha, ks = _attn_pair(
                    1 + 2 * jj, p, acc, m_i, l_i, alpha, a_row, q, k_smem, v_smem, k_ready, v_ready, desc_k, desc_v,
                    bh, S, S_PAD, n_tiles, s_layout, o_layout, p_layout, STAGES, QK_INT8, ROW_TREE, Ks_bh, ks,
                    JOINT)
            j_first = n_tiles - 1 - (n_tiles - 2) % 2
        else:
            j_first = 1
        for j in range(j_first, n_tiles - 1):
            p, acc, m_i, l_i, alpha, ks = _attn_step(
                j, p, acc, m_i, l_i, alpha, a_row, q, q2, k_smem, k2_smem, v_smem, k_ready, v_ready, kv_empty,
                desc_k, desc_k2, desc_v, bh, S, S_PAD, n_tiles, s_layout, o_layout, p_layout, STAGES, QK_INT8,
                QK_X3, SELF_LOAD, False, ROW_TREE, Ks_bh, ks, JOINT)
        # last tile: ragged (masked)
        p, acc, m_i, l_i, alpha, ks = _attn_step(
            n_tiles - 1, p, acc, m_i, l_i, alpha, a_row, q, q2, k_smem, k2_smem, v_smem, k_ready, v_ready,
            kv_empty, desc_k, desc_k2, desc_v, bh, S, S_PAD, n_tiles, s_layout, o_layout, p_layout, STAGES,
            QK_INT8, QK_X3, SELF_LOAD, True, ROW_TREE, Ks_bh, ks, JOINT)

        # P_{n-1} V_{n-1}
        jl = n_tiles - 1
        p_op = _p_operand(p, p_layout)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        mbarrier.wait(v_ready.index(jl % STAGES), (jl // STAGES) & 1)
        acc_tok = warpgroup_mma(p_op, v_smem.index(jl % STAGES).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        if not SELF_LOAD:
            mbarrier.arrive(kv_empty.index(jl % STAGES), count=1)

        orow = row0 + gl.arange(0, _BM, layout=row_o)
        ocol = gl.arange(0, _HD, layout=gl.SliceLayout(0, o_layout))
        if JOINT:
            # with one V scale per batch element, acc / l is a convex combination of E4M3 values of V (up to
            # P's rounding): already in E4M3 range, with V's scale as the row's scale (attention.py's OUT_FP8)
            out = acc * gl.expand_dims(gl.convert_layout(1.0 / l_i, row_o), 1)
            out = gl.minimum(gl.maximum(out, -448.0), 448.0)
            b64 = (bh // H).to(gl.int64)
            r64 = orow.to(gl.int64)
            dst = gl.where(orow < L_IMG, b64 * L_IMG + r64, B * L_IMG + b64 * L_CTX + (r64 - L_IMG))
            keep = orow < M_ROWS
            optr = O + gl.expand_dims(dst, 1) * (H * _HD) + (bh % H) * _HD + gl.expand_dims(ocol, 0)
            gl.store(optr, out.to(gl.float8e4nv), mask=gl.expand_dims(keep, 1))
            if bh % H == 0:
                gl.store(Os + dst, gl.zeros([_BM], gl.float32, layout=row_o) + gl.load(Vs + bh * n_tiles),
                         mask=keep)
        else:
            v_scale = gl.load(Vs + bh)
            out = acc * gl.expand_dims(gl.convert_layout(v_scale / l_i, row_o), 1)
            optr = O + (bh64 * S + gl.expand_dims(orow, 1)) * _HD + gl.expand_dims(ocol, 0)
            gl.store(optr, out.to(gl.bfloat16), mask=gl.expand_dims(orow < S, 1))

    @gluon.jit
    def _producer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, desc_q, desc_k, desc_v,
                  bh, m0, S, S_PAD, n_tiles, NC: gl.constexpr, STAGES: gl.constexpr):
        for c in gl.static_range(NC):
            mbarrier.expect(q_bar.index(c), _BM * _HD)
            tma.async_copy_global_to_shared(desc_q, [bh * S + m0 + c * _BM, 0], q_bar.index(c), q_smem.index(c))
        for j in range(n_tiles):
            st = j % STAGES
            mbarrier.wait(kv_empty.index(st), ((j // STAGES) & 1) ^ 1)
            _kv_load(desc_k, desc_k, desc_v, k_smem, k_smem, v_smem, k_ready, v_ready, bh, S_PAD, j, st, True,
                     False)

    # ROW0, M_ROWS, L_IMG, L_CTX unspecialized: the engine's eager warm-up launches all rows at once, its CUDA
    # graphs the image and text rows apart, and one binary must serve both (nothing compiles in a capture)
    @gluon.jit(do_not_specialize=["ROW0", "M_ROWS", "L_IMG", "L_CTX"])
    def _attn_fwd_gluon(desc_q, desc_k, desc_v, Qm, Vs, O, S, S_PAD, desc_q2, desc_k2,
                        Ks, Os, ROW0, M_ROWS, L_IMG, L_CTX, B, H, qk_scale,
                        NC: gl.constexpr, STAGES: gl.constexpr, QK_INT8: gl.constexpr, WS: gl.constexpr,
                        REG_C: gl.constexpr, REG_P: gl.constexpr, QK_X3: gl.constexpr, ROW_TREE: gl.constexpr,
                        JOINT: gl.constexpr, PAIR: gl.constexpr = False):
        # grid (cdiv(rows, NC * _BM), B * H), rows from ROW0. Qm: (B*H, S) fp32 row multipliers (JOINT: Q's
        # scales); Vs: (B*H,) V scales (JOINT: (B*H, n_tiles)); O: (B, H, S, 64) bf16 contiguous (JOINT: the
        # E4M3 rows of _consumer's JOINT, Os their scales). The JOINT arguments are unread otherwise.
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        m0 = ROW0 + pid_m * (NC * _BM)
        n_tiles = gl.cdiv(S, _BN)
        q_smem = gl.allocate_shared_memory(desc_q.dtype, [NC, _BM, _HD], desc_q.layout)
        k_smem = gl.allocate_shared_memory(desc_k.dtype, [STAGES, _BN, _HD], desc_k.layout)
        v_smem = gl.allocate_shared_memory(desc_v.dtype, [STAGES, _HD, _BN], desc_v.layout)
        if QK_X3:  # the low E4M3 parts of Q and K (desc_q2 / desc_k2 are desc_q / desc_k otherwise, unread)
            q2_smem = gl.allocate_shared_memory(desc_q2.dtype, [NC, _BM, _HD], desc_q2.layout)
            k2_smem = gl.allocate_shared_memory(desc_k2.dtype, [STAGES, _BN, _HD], desc_k2.layout)
        else:
            q2_smem = q_smem
            k2_smem = k_smem
        q_bar = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for c in gl.static_range(NC):
            mbarrier.init(q_bar.index(c), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=NC)
        fence_async_shared()
        if WS:
            if NC == 3:
                gl.warp_specialize([
                    (_consumer, (q_smem, q_smem, k_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                                 desc_q, desc_q, desc_k, desc_k, desc_v,
                                 Qm, Vs, O, bh, m0, S, S_PAD, n_tiles, 0, STAGES, QK_INT8, False, False, ROW_TREE)),
                    (_consumer, (q_smem, q_smem, k_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                                 desc_q, desc_q, desc_k, desc_k, desc_v,
                                 Qm, Vs, O, bh, m0, S, S_PAD, n_tiles, 1, STAGES, QK_INT8, False, False, ROW_TREE)),
                    (_consumer, (q_smem, q_smem, k_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                                 desc_q, desc_q, desc_k, desc_k, desc_v,
                                 Qm, Vs, O, bh, m0, S, S_PAD, n_tiles, 2, STAGES, QK_INT8, False, False, ROW_TREE)),
                    (_producer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, desc_q, desc_k, desc_v,
                                 bh, m0, S, S_PAD, n_tiles, NC, STAGES)),
                ], [4, 4, 1], [REG_C, REG_C, REG_P])
            else:
                gl.warp_specialize([
                    (_consumer, (q_smem, q_smem, k_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                                 desc_q, desc_q, desc_k, desc_k, desc_v,
                                 Qm, Vs, O, bh, m0, S, S_PAD, n_tiles, 0, STAGES, QK_INT8, False, False, ROW_TREE)),
                    (_consumer, (q_smem, q_smem, k_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                                 desc_q, desc_q, desc_k, desc_k, desc_v,
                                 Qm, Vs, O, bh, m0, S, S_PAD, n_tiles, 1, STAGES, QK_INT8, False, False, ROW_TREE)),
                    (_producer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, desc_q, desc_k, desc_v,
                                 bh, m0, S, S_PAD, n_tiles, NC, STAGES)),
                ], [4, 1], [REG_C, REG_P])
        else:
            _consumer(q_smem, q2_smem, k_smem, k2_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                      desc_q, desc_q2, desc_k, desc_k2, desc_v, Qm, Vs, O, bh, m0, S, S_PAD, n_tiles,
                      0, STAGES, QK_INT8, QK_X3, True, ROW_TREE, Ks, Os, M_ROWS, L_IMG, L_CTX, B, H, qk_scale,
                      JOINT, PAIR)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def is_supported(device=None) -> tuple[bool, str]:
    if gluon is None:
        return False, f"Triton Gluon is not importable ({_GLUON_IMPORT_ERROR!r})"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    cc = torch.cuda.get_device_capability(device)
    if cc[0] != 9:
        return False, f"the Gluon kernel uses Hopper wgmma (sm_90a); device has {cc[0]}.{cc[1]}"
    return True, "ok"


def _round_half_away(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5))


def _v_token_order(n: int, device=None) -> torch.Tensor:
    """Index k -> token of V's stored order: within each 32-token chunk, k = 16h + 4t + 2g + e holds token
    16h + 8g + 2t + e (the column of P that the PV wgmma's A-operand register k of a thread holds)."""
    k = torch.arange(n, device=device)
    r = k % 32
    h, t, g, e = r // 16, (r % 16) // 4, (r % 4) // 2, r % 2
    return (k - r) + 16 * h + 8 * g + 2 * t + e


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, qk: str = "fp8") -> dict:
    """Quantize bf16 (B, H, S, 64) q/k/v for the kernel (torch ops). Returns the kernel's inputs.

    Q: per-token scale; K, V: per-(batch, head) scale; K padded (B*H, S_pad, 64), V transposed (B*H, 64, S_pad).
    """
    if qk not in ("fp8", "int8", "fp8x3"):
        raise ValueError(f"qk must be 'fp8', 'int8' or 'fp8x3', got {qk!r}")
    B, H, S, D = q.shape
    if D != HEAD_DIM:
        raise RuntimeError(f"gluon_attention: head_dim must be {HEAD_DIM}, got {D}")
    if k.shape != q.shape or v.shape != q.shape:
        raise RuntimeError("gluon_attention: q, k, v must have one shape")
    if S <= BLOCK_N:
        raise RuntimeError(f"gluon_attention: needs more than {BLOCK_N} tokens, got {S}")
    sm_scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    BH = B * H
    s_pad = triton.cdiv(S, BLOCK_N) * BLOCK_N if triton is not None else -(-S // BLOCK_N) * BLOCK_N
    dev = q.device
    top = INT8_MAX if qk == "int8" else FP8_MAX
    qdt = torch.int8 if qk == "int8" else torch.float8_e4m3fn

    def codes(x, s):
        y = (x / s).clamp(-top, top)
        return _round_half_away(y).to(torch.int8) if qk == "int8" else y.to(torch.float8_e4m3fn)

    def low(x, s, hi):  # fp8x3: what E4M3 rounding left, in E4M3 at the same scale
        return (x / s - hi.float()).to(torch.float8_e4m3fn)

    extra = {}
    qf = q.reshape(BH, S, D).float()
    q_s = qf.abs().amax(-1, keepdim=True).clamp_min(_TINY) / top  # (BH, S, 1)
    q8 = codes(qf, q_s).contiguous()
    kf = k.reshape(BH, S, D).float()
    k_s = kf.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(_TINY) / top  # (BH, 1, 1)
    k8 = torch.zeros((BH, s_pad, D), device=dev, dtype=qdt)
    k8[:, :S] = codes(kf, k_s)
    if qk == "fp8x3":
        extra["q8lo"] = low(qf, q_s, q8).contiguous()
        k8lo = torch.zeros((BH, s_pad, D), device=dev, dtype=qdt)
        k8lo[:, :S] = low(kf, k_s, k8[:, :S])
        extra["k8lo"] = k8lo
    vf = v.reshape(BH, S, D).float()
    v_s = vf.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(_TINY) / FP8_MAX
    vt = torch.zeros((BH, D, s_pad), device=dev, dtype=torch.float32)
    vt[:, :, :S] = (vf / v_s).clamp(-FP8_MAX, FP8_MAX).transpose(1, 2)
    # tokens in the kernel's P column order (see _p_operand): stored token k of a tile is token _v_token_order[k]
    v8 = vt[:, :, _v_token_order(s_pad, dev)].to(torch.float8_e4m3fn).contiguous()
    qm = (q_s[..., 0] * k_s[..., 0] * (sm_scale * LOG2E)).float().contiguous()  # (BH, S)
    return {"q8": q8, "k8": k8, "v8": v8, "qm": qm, "vs": v_s.reshape(BH).float().contiguous(),
            "shape": (B, H, S, D), "s_pad": s_pad, "qk": qk, **extra}


def emulate(prep: dict, bh: slice | None = None) -> torch.Tensor:
    """Pure-torch emulation of the kernel's arithmetic on :func:`prepare`'s output (fp32, 128-key tiles, P
    rounded to E4M3 at the running max, row sums of the unrounded P). Returns bf16 (B*H or the bh slice, S, 64)."""
    B, H, S, D = prep["shape"]
    sl = bh if bh is not None else slice(None)
    q8 = prep["q8"][sl].float()
    k8 = prep["k8"][sl, :S].float()
    order = _v_token_order(prep["s_pad"], prep["v8"].device)
    vt = torch.empty_like(prep["v8"][sl], dtype=torch.float32)
    vt[:, :, order] = prep["v8"][sl].float()  # undo the kernel's token order
    v = vt[:, :, :S].transpose(1, 2)
    a = prep["qm"][sl][..., None]
    m = torch.full_like(a, float("-inf"))
    l_sum = torch.zeros_like(a)
    acc = torch.zeros(q8.shape, device=q8.device, dtype=torch.float32)
    for n0 in range(0, S, BLOCK_N):
        t = q8 @ k8[:, n0:n0 + BLOCK_N].transpose(1, 2)
        if "q8lo" in prep:  # the kernel's three products (no Q_lo K_lo)
            t = t + prep["q8lo"][sl].float() @ k8[:, n0:n0 + BLOCK_N].transpose(1, 2) \
                + q8 @ prep["k8lo"][sl, :S][:, n0:n0 + BLOCK_N].float().transpose(1, 2)
        t = t * a
        m_new = torch.maximum(m, t.amax(-1, keepdim=True))
        p = torch.exp2(t - m_new + 8.0)
        alpha = torch.exp2(m - m_new)
        l_sum = l_sum * alpha + p.sum(-1, keepdim=True)
        p8 = p.clamp(max=FP8_MAX).to(torch.float8_e4m3fn).float()
        acc = acc * alpha + p8 @ v[:, n0:n0 + BLOCK_N]
        m = m_new
    return (acc / l_sum * prep["vs"][sl][:, None, None]).to(torch.bfloat16)


def _descs(prep: dict, nc: int):
    B, H, S, D = prep["shape"]
    BH = B * H
    s_pad = prep["s_pad"]
    gdt = gl.int8 if prep["qk"] == "int8" else gl.float8e4nv
    key = ("descs", nc)
    if key not in prep:  # cached per prep (one set per CUDA graph capture)
        lq = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gdt)
        lk = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gdt)
        lv = gl.NVMMASharedLayout.get_default_for([D, BLOCK_N], gl.float8e4nv)
        dq = TensorDescriptor.from_tensor(prep["q8"].view(BH * S, D), [BLOCK_M, D], lq)
        dk = TensorDescriptor.from_tensor(prep["k8"].view(BH * s_pad, D), [BLOCK_N, D], lk)
        dv = TensorDescriptor.from_tensor(prep["v8"].view(BH * D, s_pad), [D, BLOCK_N], lv)
        if prep["qk"] == "fp8x3":
            dq2 = TensorDescriptor.from_tensor(prep["q8lo"].view(BH * S, D), [BLOCK_M, D], lq)
            dk2 = TensorDescriptor.from_tensor(prep["k8lo"].view(BH * s_pad, D), [BLOCK_N, D], lk)
        else:  # passed, never read
            dq2, dk2 = dq, dk
        prep[key] = (dq, dk, dv, dq2, dk2)
    return prep[key]


def gluon_attention_quantized(prep: dict, variant: str = DEFAULT_VARIANT, out: torch.Tensor | None = None):
    """The attention kernel alone on :func:`prepare`'s output; returns bf16 (B, H, S, 64) (contiguous)."""
    cfg = VARIANTS[variant]
    if cfg.get("joint"):
        raise ValueError(f"variant {variant} takes prep_joint's inputs: call joint_attention")
    if cfg["qk"] != prep["qk"]:
        raise ValueError(f"variant {variant} wants qk={cfg['qk']}, prep has {prep['qk']}")
    ws = cfg["kind"] == "ws"
    if ws and prep["qk"] == "fp8x3":
        raise ValueError(f"variant {variant}: qk='fp8x3' is written for the 'pipe' kind only")
    B, H, S, D = prep["shape"]
    if out is None:
        out = torch.empty((B, H, S, D), device=prep["q8"].device, dtype=torch.bfloat16)
    dq, dk, dv, dq2, dk2 = _descs(prep, cfg["nc"])
    grid = (triton.cdiv(S, cfg["nc"] * BLOCK_M), B * H)
    kernel = _attn_fwd_gluon[grid](
        dq, dk, dv, prep["qm"], prep["vs"], out, S, prep["s_pad"], dq2, dk2,
        prep["qm"], prep["vs"], 0, S, S, 0, B, H, 1.0,  # the JOINT arguments (unread)
        NC=cfg["nc"], STAGES=cfg["stages"], QK_INT8=prep["qk"] == "int8", WS=ws,
        REG_C=cfg["reg_c"], REG_P=cfg["reg_p"], QK_X3=prep["qk"] == "fp8x3", ROW_TREE=bool(cfg.get("tree")),
        JOINT=False, PAIR=bool(cfg.get("pair")), num_warps=4, maxnreg=cfg["maxnreg"],
    )
    prep["_kernel"] = kernel  # the CompiledKernel (n_regs, n_spills, metadata) for reports
    return out


def joint_supported(shape: tuple[int, int, int, int], qk: str, device=None) -> tuple[bool, str]:
    """(ok, reason): whether :func:`joint_attention` serves a joint attention of (B, H, S, D) with this Q/K
    format on this device. Else the engine runs the Triton kernel (``attention.fp8_attention_quantized``)."""
    B, H, S, D = shape
    if D != HEAD_DIM:
        return False, f"the Gluon kernel is written for head_dim {HEAD_DIM}, not {D}"
    if S <= BLOCK_N:
        return False, f"the Gluon kernel needs more than {BLOCK_N} tokens, got {S}"
    if qk != "int8":
        return False, f"the engine's Gluon kernel takes INT8 Q/K, not {qk!r}"
    return is_supported(device)


def joint_attention(q8: torch.Tensor, kv: dict, *, fp8_rows: tuple[int, int], rows: tuple[int, int] | None = None,
                    out=None, scale: float | None = None, variant: str = "joint"):
    """The engine's joint attention on the Gluon kernel: what ``attention.fp8_attention_quantized(q8, kv,
    fp8_rows=..., rows=..., out=...)`` returns, from ``attention.prep_joint(..., v_order="gluon")``'s output
    (V's tokens in the order the kernel's P operand holds them, :func:`_v_token_order`)."""
    from .attention import fp8_rows_out  # one owner of the output rows' contract

    cfg = VARIANTS[variant]
    if not cfg.get("joint"):
        raise ValueError(f"variant {variant!r} is not an engine-path variant (one of "
                         f"{sorted(k for k, c in VARIANTS.items() if c.get('joint'))})")
    if kv.get("v_order") != "gluon":
        raise ValueError("joint_attention needs prep_joint(..., v_order='gluon'): V's tokens in the kernel's order")
    B, H, S, D = kv["shape"]
    ok, why = joint_supported(kv["shape"], kv["opts"]["qk"], q8.device)
    if not ok:
        raise RuntimeError(f"joint_attention unsupported: {why}")
    if q8.dtype != torch.int8 or tuple(q8.shape) != (B, H, S, D) or not q8.is_contiguous():
        raise ValueError(f"joint_attention: q8 must be prep_joint's contiguous INT8 (B, H, S, D) = {(B, H, S, D)}")
    o8, o_scale, row0, m_rows, L, Lc = fp8_rows_out(kv, fp8_rows, rows, out, q8.device)
    if m_rows == row0:
        return o8, o_scale
    sm_scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
    BH, s_pad = B * H, kv["s_pad"]
    key = ("gluon_descs", q8.data_ptr(), kv["kq"].data_ptr(), kv["vq"].data_ptr())
    descs = kv.get(key)
    if descs is None:  # one set per prep_joint output (the image and the text launch share it)
        lq = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gl.int8)
        lk = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gl.int8)
        lv = gl.NVMMASharedLayout.get_default_for([D, BLOCK_N], gl.float8e4nv)
        descs = kv[key] = (TensorDescriptor.from_tensor(q8.view(BH * S, D), [BLOCK_M, D], lq),
                           TensorDescriptor.from_tensor(kv["kq"].view(BH * s_pad, D), [BLOCK_N, D], lk),
                           TensorDescriptor.from_tensor(kv["vq"].view(BH * D, s_pad), [D, BLOCK_N], lv))
    dq, dk, dv = descs
    grid = (triton.cdiv(m_rows - row0, cfg["nc"] * BLOCK_M), BH)
    _attn_fwd_gluon[grid](
        dq, dk, dv, kv["q_scale"], kv["vs"], o8, S, s_pad, dq, dk,
        kv["ks"], o_scale, row0, m_rows, L, Lc, B, H, sm_scale * LOG2E,
        NC=cfg["nc"], STAGES=cfg["stages"], QK_INT8=True, WS=False, REG_C=0, REG_P=0, QK_X3=False,
        ROW_TREE=bool(cfg.get("tree")), JOINT=True, PAIR=bool(cfg.get("pair")), num_warps=4, maxnreg=cfg["maxnreg"],
    )
    return o8, o_scale


def gluon_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                    variant: str = DEFAULT_VARIANT) -> torch.Tensor:
    """softmax(q k^T * scale) v with FP8 (or INT8) Q/K and FP8 P/V, Gluon kernel. q/k/v: bf16 CUDA (B, H, S, 64)."""
    ok, why = is_supported(q.device if q.is_cuda else None)
    if not ok:
        raise RuntimeError(f"gluon_attention unsupported: {why}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_cuda or t.dtype != torch.bfloat16 or t.dim() != 4:
            raise RuntimeError(f"gluon_attention: {name} must be a bf16 CUDA (B, H, S, 64) tensor")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (one of {sorted(VARIANTS)})")
    with torch.cuda.device(q.device):
        prep = prepare(q, k, v, scale, qk=VARIANTS[variant]["qk"])
        return gluon_attention_quantized(prep, variant)


# --------------------------------------------------------------------------------------------
# Offline compilation (no GPU needed): python -m worker.engine.fp8.attention_gluon --offline DIR
# --------------------------------------------------------------------------------------------


def _desc_sig(dtype_str: str, block, layout) -> str:
    return f"tensordesc<{dtype_str}[{block[0]}, {block[1]}],{layout!r}>"


def compile_offline(variant: str, S: int = 4429, arch: int = 90):
    """Compile one variant for sm_{arch}a without a GPU; returns triton's CompiledKernel (asm: ttgir, ptx, cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    cfg = VARIANTS[variant]
    i8 = cfg["qk"] == "int8"
    gdt, sdt = (gl.int8, "i8") if i8 else (gl.float8e4nv, "fp8e4nv")
    lq = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], gdt)
    lk = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], gdt)
    lv = gl.NVMMASharedLayout.get_default_for([HEAD_DIM, BLOCK_N], gl.float8e4nv)
    ws = cfg["kind"] == "ws"
    sig = {
        "desc_q": _desc_sig(sdt, [BLOCK_M, HEAD_DIM], lq),
        "desc_k": _desc_sig(sdt, [BLOCK_N, HEAD_DIM], lk),
        "desc_v": _desc_sig("fp8e4nv", [HEAD_DIM, BLOCK_N], lv),
        "Qm": "*fp32", "Vs": "*fp32", "O": "*bf16", "S": "i32", "S_PAD": "i32",
        "desc_q2": _desc_sig(sdt, [BLOCK_M, HEAD_DIM], lq),
        "desc_k2": _desc_sig(sdt, [BLOCK_N, HEAD_DIM], lk),
        "Ks": "*fp32", "Os": "*fp32", "ROW0": "i32", "M_ROWS": "i32", "L_IMG": "i32", "L_CTX": "i32",
        "B": "i32", "H": "i32", "qk_scale": "fp32",
        "NC": "constexpr", "STAGES": "constexpr", "QK_INT8": "constexpr", "WS": "constexpr",
        "REG_C": "constexpr", "REG_P": "constexpr", "QK_X3": "constexpr", "ROW_TREE": "constexpr",
        "JOINT": "constexpr", "PAIR": "constexpr",
    }
    constexprs = {"NC": cfg["nc"], "STAGES": cfg["stages"], "QK_INT8": i8, "WS": ws,
                  "REG_C": cfg["reg_c"], "REG_P": cfg["reg_p"], "QK_X3": cfg["qk"] == "fp8x3",
                  "ROW_TREE": bool(cfg.get("tree")), "JOINT": bool(cfg.get("joint")), "PAIR": bool(cfg.get("pair"))}
    if cfg.get("joint"):
        sig["O"] = "*fp8e4nv"
    # pointer alignment as the runtime specializes it (16-byte aligned tensors)
    attrs = {(3,): [["tt.divisibility", 16]], (4,): [["tt.divisibility", 16]], (5,): [["tt.divisibility", 16]],
             (7,): [["tt.divisibility", 16]], (10,): [["tt.divisibility", 16]], (11,): [["tt.divisibility", 16]]}
    src = GluonASTSource(fn=_attn_fwd_gluon, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": 4, "maxnreg": cfg["maxnreg"]})


def _offline_main(out_dir: str, variants) -> int:
    import json
    import os
    import re
    import subprocess
    import traceback
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in variants:
        rec = {}
        try:
            ck = compile_offline(name)
            for ext in ("ttgir", "ptx"):
                (out / f"{name}.{ext}").write_text(ck.asm[ext])
            (out / f"{name}.cubin").write_bytes(ck.asm["cubin"])
            ptx = ck.asm["ptx"]
            ttgir = ck.asm["ttgir"]
            rec["ptx_wgmma"] = len(re.findall(r"wgmma\.mma_async", ptx))
            rec["ptx_wgmma_wait"] = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)
            rec["ptx_setmaxnreg"] = re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)
            rec["ttgir_warp_specialize"] = ttgir.count("ttg.warp_specialize")
            rec["shared_bytes"] = ck.metadata.shared
            rec["num_warps"] = ck.metadata.num_warps
            try:  # ptxas -v of the PTX: registers, spills and any "wgmma serialized" warning
                arch = "sm_90a"
                r = subprocess.run([str(bindir / "ptxas"), "-v", f"-arch={arch}", "-o", os.devnull,
                                    str(out / f"{name}.ptx")], capture_output=True, text=True)
                rec["ptxas_v"] = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
            except Exception as exc:
                rec["ptxas_error"] = repr(exc)
            try:
                sass = subprocess.run([str(bindir / "cuobjdump"), "-sass", str(out / f"{name}.cubin")],
                                      capture_output=True, text=True, check=True).stdout
                (out / f"{name}.sass").write_text(sass)
                ins = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
                counts = {}
                for i in ins:
                    base = i.split(".")[0]
                    counts[base] = counts.get(base, 0) + 1
                rec["sass_total"] = len(ins)
                rec["sass_counts"] = {k: counts[k] for k in sorted(counts, key=lambda k: -counts[k])[:40]}
                rec["sass_local_mem"] = sum(counts.get(k, 0) for k in ("LDL", "STL"))
            except Exception as exc:  # cuobjdump missing
                rec["sass_error"] = repr(exc)
            rec["status"] = "compiled"
        except Exception as exc:
            rec["status"] = "failed"
            rec["error"] = f"{type(exc).__name__}: {exc}"[:4000]
            rec["traceback"] = traceback.format_exc()[-6000:]
        summary[name] = rec
        print(name, rec.get("status"), {k: v for k, v in rec.items() if k not in ("traceback", "sass_counts")},
              flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(r["status"] == "compiled" for r in summary.values()) else 1


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--offline", metavar="DIR", required=True, help="compile for sm_90a without a GPU into DIR")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    raise SystemExit(_offline_main(a.offline, [v for v in a.variants.split(",") if v]))
