"""FP8 attention: numerics of the quantization scheme on the CPU, the kernel on a GPU when present.

The scheme (per-token Q scales, per-head or per-128-token K/V scales, E4M3 or INT8 for QK, E4M3 or
BF16 for PV, online softmax with P scaled by 256 before rounding) is emulated by
``fp8_attention_reference``; these tests bound its error against float64 attention. Bounds are the
measured errors (seeded inputs, see docs/PERFORMANCE.md) with ~1.5x headroom.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "worker" / "engine" / "fp8" / "attention.py"


def _load():
    spec = importlib.util.spec_from_file_location("sdfleet_fp8_attention_under_test", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


att = _load()


def _ref64(q, k, v, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(kind, B=1, H=2, S=333, D=64, seed=0):
    return att.sample_qkv(kind, B, H, S, D, seed=seed)


# measured on these seeded inputs (S=333 and 1357): randn / peaky, with ~1.5x headroom
BOUNDS = {
    ("fp8", "fp8"): (0.08, 0.20),
    ("fp8", "bf16"): (0.06, 0.18),
    ("int8", "fp8"): (0.055, 0.07),
    ("int8", "bf16"): (0.02, 0.05),
}


def test_import_without_triton_or_cuda_is_fine():
    assert callable(att.fp8_attention)
    assert callable(att.fp8_attention_reference)
    if att.triton is None or not torch.cuda.is_available():
        ok, why = att.is_supported()
        assert not ok and why


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_fp8_attention_raises_clear_error_without_cuda():
    q = torch.randn(1, 2, 16, 64).bfloat16()
    with pytest.raises(RuntimeError, match="unsupported|CUDA"):
        att.fp8_attention(q, q, q)


@pytest.mark.parametrize("qk,pv", sorted(BOUNDS))
@pytest.mark.parametrize("scales", ["head", "ktile", "tile", "vbatch"])
@pytest.mark.parametrize("kind", ["randn", "peaky"])
def test_reference_scheme_vs_float64(qk, pv, scales, kind):
    q, k, v = _inputs(kind, S=333, seed=1)
    out = att.fp8_attention_reference(q, k, v, qk=qk, pv=pv, scales=scales)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    err = _rel(out, _ref64(q, k, v))
    bound = BOUNDS[(qk, pv)][0 if kind == "randn" else 1]
    assert err < bound, f"{qk}/{pv}/{scales}/{kind}: rel err {err:.4f} >= {bound}"
    # and the scheme is really quantizing: clearly worse than bf16 rounding alone
    assert err > 3e-3


def test_reference_per_batch_v_scale_uses_the_batch_amax():
    q, k, v = _inputs("randn", B=2, S=130, seed=6)
    v = v.clone()
    v[1] *= 50  # batch element 1 has much larger V: it must not change element 0's scale
    a = att.fp8_attention_reference(q, k, v, scales="vbatch")
    b = att.fp8_attention_reference(q[:1], k[:1], v[:1], scales="vbatch")
    assert torch.equal(a[:1], b)
    assert _rel(a, _ref64(q, k, v)) < BOUNDS[("int8", "fp8")][0]


def test_unknown_modes_are_named():
    q = torch.zeros(1, 1, 4, 64).bfloat16()
    with pytest.raises(ValueError, match="scales"):
        att.fp8_attention_reference(q, q, q, scales="row")


@pytest.mark.parametrize("S", [1, 2, 127, 128, 129, 255, 257, 1357])
def test_reference_ragged_lengths(S):
    q, k, v = _inputs("randn", B=1, H=1, S=S, seed=S)
    out = att.fp8_attention_reference(q, k, v, qk="int8", pv="fp8")
    assert torch.isfinite(out).all()
    assert _rel(out, _ref64(q, k, v)) < 0.06


@pytest.mark.parametrize("block_n", [64, 128])
def test_reference_online_softmax_matches_full_softmax_for_exact_pv(block_n):
    # with int8 QK and bf16 PV, the tiling (online softmax) must not change the result
    q, k, v = _inputs("randn", S=300, seed=3)
    a = att.fp8_attention_reference(q, k, v, qk="int8", pv="bf16", block_n=block_n)
    b = att.fp8_attention_reference(q, k, v, qk="int8", pv="bf16", block_n=32)
    assert _rel(a, b) < 5e-3


@pytest.mark.parametrize("qk", ["fp8", "int8"])
@pytest.mark.parametrize("scales", ["head", "ktile", "tile"])
def test_reference_zeros_and_outliers_no_nan(qk, scales):
    q, k, v = _inputs("randn", S=200, seed=5)
    q = q.clone()
    k = k.clone()
    v = v.clone()
    q[:, :, :7] = 0  # all-zero query rows -> uniform attention
    k[:, :, 128:] = 0  # an all-zero K tile
    v[:, :, 50:60] = 0
    q[0, 0, 10, 3] = 3.0e4  # outliers beyond the FP8 range before scaling
    k[0, 1, 20, 5] = -2.0e4
    v[0, 0, 30, 7] = 1.0e4
    out = att.fp8_attention_reference(q, k, v, qk=qk, pv="fp8", scales=scales)
    assert torch.isfinite(out).all()
    ref = _ref64(q, k, v)
    # zero query rows: the mean of V, exactly what softmax of equal logits gives
    assert _rel(out[:, :, :7], ref[:, :, :7]) < 0.05
    # an all-zero input is fine too
    z = torch.zeros(1, 1, 130, 64, dtype=torch.bfloat16)
    assert torch.equal(att.fp8_attention_reference(z, z, z, qk=qk, scales=scales), z)


def test_reference_custom_scale():
    q, k, v = _inputs("randn", S=150, seed=9)
    out = att.fp8_attention_reference(q, k, v, qk="int8", pv="bf16", scale=0.05)
    assert _rel(out, _ref64(q, k, v, scale=0.05)) < 0.02


# ------------------------------------------------------------------------------------------
# GPU (skipped without CUDA / Triton / FP8-capable device)
# ------------------------------------------------------------------------------------------

_gpu_ok = att.is_supported()[0] if torch.cuda.is_available() else False
gpu = pytest.mark.skipif(not _gpu_ok, reason="needs CUDA with compute capability >= 8.9 and Triton")


@gpu
@pytest.mark.parametrize("S", [1, 129, 1357])
@pytest.mark.parametrize("opts", [
    dict(qk="fp8", pv="fp8"),
    dict(qk="int8", pv="fp8"),
    dict(qk="int8", pv="bf16"),
    dict(qk="int8", pv="fp8", scales="tile"),
    dict(qk="int8", pv="fp8", scales="head"),
    dict(qk="int8", pv="fp8", scales="vbatch"),
])
def test_kernel_matches_reference_scheme(S, opts):
    g = torch.Generator(device="cuda").manual_seed(S)
    x = torch.randn(2, S, 3, 64, device="cuda", generator=g).bfloat16()
    q = x.transpose(1, 2)  # (B,S,H,D) storage viewed as (B,H,S,D)
    k = torch.randn(2, 3, S, 64, device="cuda", generator=g).bfloat16()
    v = torch.randn(2, 3, S, 64, device="cuda", generator=g).bfloat16()
    out = att.fp8_attention(q, k, v, **opts)
    assert out.shape == q.shape and out.stride() == q.stride()
    assert torch.isfinite(out).all()
    ref = att.fp8_attention_reference(q, k, v, qk=opts["qk"], pv=opts["pv"], scales=opts.get("scales", "ktile"))
    assert _rel(out, ref) < 0.02
    assert _rel(out, _ref64(q, k, v)) < BOUNDS[(opts["qk"], opts["pv"])][0]


@gpu
def test_kernel_rejects_unsupported_head_dim():
    q = torch.randn(1, 1, 16, 80, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match="head_dim"):
        att.fp8_attention(q, q, q)


def _joint_inputs(B, H, L, Lc, seed, D=64):
    g = torch.Generator(device="cuda").manual_seed(seed)
    img = (torch.randn(B * L, 3 * H * D, device="cuda", generator=g) * 2).bfloat16()
    ctx = torch.randn(B * Lc, 3 * H * D, device="cuda", generator=g).bfloat16() if Lc else None
    w = (torch.rand(2, 2, D, device="cuda", generator=g) + 0.5).bfloat16()
    return img, ctx, w[0], w[1]


def _split_joint(img, ctx, B, H, L, Lc, D=64):
    def heads(x, n):  # (B*n, 3*H*D) -> q, k, v of (B, H, n, D)
        return x.view(B, n, 3, H, D).permute(2, 0, 3, 1, 4)

    parts = [heads(img, L)] + ([heads(ctx, Lc)] if Lc else [])
    return [torch.cat([p[i] for p in parts], 2) for i in range(3)]


def _rms(x, w, eps=1e-6):  # diffusers' RMSNorm, as the engine's torch path
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (y.float() * w.float()).to(x.dtype)


@gpu
@pytest.mark.parametrize("L,Lc", [(256, 77), (200, 77), (130, 5), (256, 0)])
def test_prep_joint_matches_separate_norm_and_quantization(L, Lc):
    B, H = 2, 3
    img, ctx, w_img, w_ctx = _joint_inputs(B, H, L, Lc, seed=L + Lc)
    q, kv = att.prep_joint(img, ctx, w_img, w_ctx if Lc else None, batch=B, heads=H)
    qi, ki, vi = _split_joint(img, ctx, B, H, L, Lc)
    # bit for bit what the engine's separate path computes (the q/k-norm + layout kernel) ...
    from worker.engine.fp8 import kernels

    buf = torch.empty((3, B, H, L + Lc, 64), device="cuda", dtype=torch.bfloat16)
    kernels.qkv_prep(img, buf, w_img, batch=B, tok_off=0, heads=H, head_dim=64, eps=1e-6)
    if Lc:
        kernels.qkv_prep(ctx, buf, w_ctx, batch=B, tok_off=L, heads=H, head_dim=64, eps=1e-6)
    q_ref, k_ref, v_ref = buf.unbind(0)
    assert torch.equal(v_ref, vi)
    # q: INT8 with one scale per token, as the attention kernel quantizes a bf16 q; the two kernels sum a
    # head's squares in different orders, so a normed bf16 value may differ in its last bit now and then
    assert q.dtype == torch.int8 and q.shape == (B, H, L + Lc, 64) and kv["q_scale"].shape == (B * H, L + Lc)
    qs = kv["q_scale"].view(B, H, L + Lc, 1)
    torch.testing.assert_close(qs, q_ref.float().abs().amax(-1, keepdim=True) / 127, rtol=2**-7, atol=0)
    assert (q.float() * qs - q_ref.float()).abs().max() <= qs.max() * 0.51 + 2**-7 * q_ref.float().abs().max()
    # ... and diffusers' RMSNorm up to such roundings
    q_t = torch.cat([_rms(qi[:, :, :L], w_img[0]), _rms(qi[:, :, L:], w_ctx[0])], 2)
    torch.testing.assert_close(q_ref, q_t, rtol=1e-2, atol=1e-2)
    ref = att.quantize_kv(k_ref, vi, scales="vbatch")
    kd = (kv["kq"].float() - ref["kq"].float()).abs()
    assert kd.max() <= 1 and (kd > 0).float().mean() < 1e-3
    torch.testing.assert_close(kv["ks"], ref["ks"], rtol=2**-7, atol=0)
    assert torch.equal(kv["vq"].view(torch.uint8), ref["vq"].view(torch.uint8)) and torch.equal(kv["vs"], ref["vs"])
    vs = kv["vs"].view(B, H * kv["n_tiles"])  # one V scale per batch element, stored per (head, tile)
    torch.testing.assert_close(vs, (vi.float().abs().amax(dim=(1, 2, 3)) / 448)[:, None].expand_as(vs))


@gpu
@pytest.mark.parametrize("L,Lc,Lc_out", [(256, 77, 77), (200, 77, 0), (130, 5, 5)])
def test_fp8_output_rows_are_the_bf16_output_quantized(L, Lc, Lc_out):
    B, H = 2, 3
    img, ctx, w_img, w_ctx = _joint_inputs(B, H, L, Lc, seed=7 + L)
    q, kv = att.prep_joint(img, ctx, w_img, w_ctx, batch=B, heads=H)
    o8, scale = att.fp8_attention_quantized(q, kv, fp8_rows=(L, Lc_out))
    assert o8.dtype == torch.float8_e4m3fn and o8.shape == (B * (L + Lc_out), H * 64)
    assert scale.shape == (B * (L + Lc_out), 1) and torch.isfinite(o8.float()).all()
    o = att.fp8_attention_quantized(q, kv)  # bf16 (B, H, S, D), same kernel without the E4M3 epilogue
    o = o.transpose(1, 2).reshape(B, L + Lc, H * 64)
    want = torch.cat([o[:, :L].reshape(-1, H * 64), o[:, L:L + Lc_out].reshape(-1, H * 64)])
    got = o8.float() * scale
    assert _rel(got, want) < 0.04  # one E4M3 rounding (~2.4% rms) of the same values
    # each row's scale is its batch element's V scale
    vs = kv["vs"].view(B, -1)[:, 0]
    rows_b = torch.cat([torch.arange(B).repeat_interleave(L), torch.arange(B).repeat_interleave(Lc_out)]).cuda()
    assert torch.equal(scale.view(-1), vs[rows_b])
    # and the whole is attention within the scheme's bound
    qi, ki, vi = _split_joint(img, ctx, B, H, L, Lc)
    q_ref = torch.cat([_rms(qi[:, :, :L], w_img[0]), _rms(qi[:, :, L:], w_ctx[0])], 2)
    k_ref = torch.cat([_rms(ki[:, :, :L], w_img[1]), _rms(ki[:, :, L:], w_ctx[1])], 2)
    full = _ref64(q_ref, k_ref, vi).float().transpose(1, 2).reshape(B, L + Lc, H * 64)
    want64 = torch.cat([full[:, :L].reshape(-1, H * 64), full[:, L:L + Lc_out].reshape(-1, H * 64)])
    assert _rel(got, want64) < 0.07

