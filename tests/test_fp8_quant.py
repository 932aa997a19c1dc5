"""FP8 numerics on the CPU: per-row quantization, the FP8 linear vs float64, fused producers vs unfused."""

from __future__ import annotations

import pytest
import torch

from tests.fp8_cpu import cpu_fp8_linear
from worker.engine.fp8.linear import Fp8Linear
from worker.engine.fp8.quant import (
    E4M3_MAX,
    gelu_tanh_torch,
    ln_modulate,
    ln_modulate_quantize,
    quantize_rows,
    quantize_weight,
)

# E4M3 keeps 3 mantissa bits: round-to-nearest relative error <= 2^-4 per element (normal range)
E4M3_EPS = 2.0**-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def test_quantize_rows_error_bound_and_scales(gen):
    x = torch.randn(64, 256, generator=gen, dtype=torch.float32) * torch.logspace(-3, 3, 64)[:, None]
    q = quantize_rows(x.bfloat16())
    assert q.data.dtype == torch.float8_e4m3fn and q.scale.shape == (64, 1)
    xb = x.bfloat16().double()
    amax = xb.abs().amax(1, keepdim=True)
    torch.testing.assert_close(q.scale.double(), amax / E4M3_MAX, rtol=1e-6, atol=0)
    err = (q.dequantize(torch.float64) - xb).abs()
    # normals: relative bound; tiny values (E4M3 subnormals, below 2^-6 of the scale unit): absolute bound
    bound = torch.maximum(xb.abs() * E4M3_EPS, q.scale.double() * 2.0**-9)
    assert bool((err <= bound * 1.0001).all())
    assert q.data.float().abs().max() <= E4M3_MAX


def test_zero_rows_outliers_and_inf_saturate(gen):
    x = torch.randn(6, 128, generator=gen).bfloat16()
    x[1] = 0
    x[2, 5] = 3.0e38  # outlier at the top of the float range
    x[3, 7] = float("inf")
    x[4] = 1e-30
    q = quantize_rows(x)
    deq = q.dequantize()
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.isfinite(q.data.float()).all(), "no NaN/inf codes, even for an inf input"
    assert torch.equal(deq[1], torch.zeros(128))
    assert deq[2, 5] == pytest.approx(float(x[2, 5]), rel=E4M3_EPS)
    assert deq[3, 7] > 0 and torch.isfinite(deq[3]).all()
    torch.testing.assert_close(deq[0].double(), x[0].double(), rtol=E4M3_EPS, atol=1e-2)


def test_weight_scales_per_output_channel(gen):
    w = torch.randn(48, 32, generator=gen) * torch.linspace(0.01, 100, 48)[:, None]
    w8, s = quantize_weight(w)
    assert s.shape == (48,) and w8.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(s, w.abs().amax(1) / E4M3_MAX)
    assert rel(w8.float() * s[:, None], w) < E4M3_EPS


@cpu_fp8_linear
@pytest.mark.parametrize("m,k,n", [(5, 32, 48), (333, 256, 96), (2, 1536, 64)])
def test_fp8_linear_vs_float64(gen, m, k, n):
    lin = torch.nn.Linear(k, n).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen).bfloat16()
    f = Fp8Linear.from_linear(lin)
    assert f.weight.dtype == torch.float8_e4m3fn and f.bias.dtype == torch.bfloat16
    y = f(x)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    exact = x.double() @ lin.weight.detach().double().t() + lin.bias.detach().double()
    # each product carries two E4M3 roundings (|d| <= 2^-4 each, ~uniform: rms 2^-4/sqrt(3)), independent
    # across the K terms: the relative rms error of the sum is about sqrt(2) * 2^-4 / sqrt(3) ~ 0.051 at worst
    assert rel(y, exact) < 0.06
    # and it is exactly the GEMM of the quantized operands (up to bf16 output rounding)
    q = quantize_rows(x)
    deq = q.dequantize(torch.float64) @ (f.weight.double() * f.weight_scale.double()[:, None]).t() + f.bias.double()
    assert rel(y, deq) < 5e-3
    assert torch.isfinite(y).all()


@cpu_fp8_linear
def test_fp8_linear_fused_qkv_equals_separate(gen):
    lins = [torch.nn.Linear(64, 32).to(torch.bfloat16) for _ in range(3)]
    x = torch.randn(10, 64, generator=gen).bfloat16()
    fused = Fp8Linear.from_linear(lins)(x)
    parts = torch.cat([Fp8Linear.from_linear(m)(x) for m in lins], -1)
    assert torch.equal(fused, parts)


@cpu_fp8_linear
def test_fp8_linear_accepts_prequantized_input(gen):
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(3, 7, 64, generator=gen).bfloat16()
    f = Fp8Linear.from_linear(lin)
    assert torch.equal(f(x), f(quantize_rows(x)))
    assert f(x).shape == (3, 7, 32)


def test_fused_norm_modulate_quant_matches_unfused(gen):
    b, length, d = 2, 17, 64
    x = torch.randn(b, length, d, generator=gen).bfloat16()
    emb = torch.randn(b, 6 * d, generator=gen).bfloat16()
    shift, scale, gate = emb.chunk(6, 1)[:3]  # strided views, as the blocks pass them
    # unfused reference: diffusers' ops in bf16
    ln = torch.nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    ref = ln(x) * (1 + scale[:, None]) + shift[:, None]
    q, h = ln_modulate_quantize(x, shift, scale)
    assert h is x
    assert rel(q.dequantize(), ref) < 0.05
    y16, _ = ln_modulate(x, shift, scale)
    assert rel(y16, ref) < 1e-2
    # with the gated residual fused in front
    y = torch.randn(b, length, d, generator=gen).bfloat16()
    q2, h2 = ln_modulate_quantize(x, shift, scale, residual=(y, gate))
    h_ref = x + gate[:, None] * y
    assert rel(h2, h_ref) < 1e-2
    assert rel(q2.dequantize(), ln(h_ref) * (1 + scale[:, None]) + shift[:, None]) < 0.05


def test_fused_gelu_quant_matches_unfused(gen):
    h = torch.randn(40, 256, generator=gen).bfloat16() * 3
    ref = gelu_tanh_torch(h)
    q = quantize_rows(h, gelu=True)
    assert rel(q.dequantize(), ref) < 0.05
    # the fused path quantizes the fp32 GELU: no worse than quantizing the bf16 GELU
    assert rel(q.dequantize(), ref) <= rel(quantize_rows(ref).dequantize(), ref) * 1.05


def test_second_residual_needs_the_first():
    x = torch.randn(1, 4, 16)
    mod = torch.randn(1, 16)
    with pytest.raises(ValueError, match="residual2"):
        ln_modulate_quantize(x, mod, mod, residual2=(x, mod))
