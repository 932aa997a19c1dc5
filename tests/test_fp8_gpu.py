"""GPU-only checks of the FP8 engine's few-row GEMV and of the text stream's second CUDA stream.
Skipped without an FP8-capable GPU and Triton.

The second stream (used while a CUDA graph is captured) changes when kernels run, never the maths: that
check is exact (same bits) against the one-stream graph and the eager call.
"""

from __future__ import annotations

import copy

import pytest
import torch

from worker.engine.fp8 import attention as att

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and att.is_supported()[0]),
                         reason="needs CUDA with compute capability >= 8.9 and Triton")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@gpu
@pytest.mark.parametrize("rows", [1, 2, 8, 16])
def test_gemv_matches_cublas(rows):
    # the AdaLN bank's few-row FP8 GEMM (Triton) against cuBLASLt on the same E4M3 operands
    from worker.engine.fp8 import kernels, quant
    from worker.engine.fp8.linear import GEMV_MAX_ROWS, Fp8Linear

    g = torch.Generator(device="cuda").manual_seed(rows)
    lin = torch.nn.Linear(2432, 3 * 2432 + 16, device="cuda", dtype=torch.bfloat16)
    f = Fp8Linear.from_linear(lin)
    x = quant.quantize_rows(torch.randn(rows, 2432, device="cuda", generator=g).bfloat16())
    got = kernels.gemv(x, f.weight, f.weight_scale, f.bias, torch.bfloat16).float()
    want = torch._scaled_mm(x.data, f.weight.t(), scale_a=x.scale, scale_b=f.weight_scale.reshape(1, -1),
                            out_dtype=torch.float32) + f.bias.float()
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert _rel(got, want) < 4e-3  # bf16 rounding of the output; same products, other summation order
    assert rows <= GEMV_MAX_ROWS and torch.equal(f(x), got.bfloat16())


def _twice(fn):
    """fn() eager, then captured in a CUDA graph and replayed."""
    eager = fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    torch.cuda.synchronize()
    return eager, captured


@gpu
def test_text_stream_gives_the_same_bits():
    # the text stream's kernels on their own CUDA stream in a captured graph: same output as in line
    from diffusers import SD3Transformer2DModel

    from worker.engine.fp8 import Fp8Options, apply_fp8, set_runtime_options
    from worker.engine.sd35_configs import TRANSFORMER

    torch.manual_seed(0)
    cfg = dict(TRANSFORMER["medium"], num_layers=3, dual_attention_layers=(0,))
    with torch.device("cuda"):
        bf = SD3Transformer2DModel(**cfg).to(torch.bfloat16).eval().requires_grad_(False)
    for p in bf.parameters():
        if p.dim() >= 2:
            p.data.mul_(0.5)
    m = apply_fp8(copy.deepcopy(bf), Fp8Options())
    g = torch.Generator(device="cuda").manual_seed(1)
    x = dict(hidden_states=torch.randn(2, 16, 64, 64, device="cuda", generator=g).bfloat16(),
             encoder_hidden_states=torch.randn(2, 154, 4096, device="cuda", generator=g).bfloat16(),
             pooled_projections=torch.randn(2, 2048, device="cuda", generator=g).bfloat16(),
             timestep=torch.full((2,), 500.0, device="cuda"), return_dict=False)
    outs = {}
    with torch.no_grad():
        for on in (False, True):
            set_runtime_options(m, Fp8Options(text_stream=on))
            outs[on] = _twice(lambda: m(**x)[0].clone())
        ref = bf(**x)[0]
    assert torch.equal(outs[False][0], outs[True][0]) and torch.equal(outs[False][1], outs[True][1])
    assert torch.equal(outs[True][0], outs[True][1])
    assert _rel(outs[True][0], ref) < 0.05


def _medium3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    from worker.engine.sd35_configs import TRANSFORMER

    torch.manual_seed(seed)
    cfg = dict(TRANSFORMER["medium"], num_layers=3, dual_attention_layers=(0,))
    with torch.device("cuda"):
        bf = SD3Transformer2DModel(**cfg).to(torch.bfloat16).eval().requires_grad_(False)
    for p in bf.parameters():
        if p.dim() >= 2:
            p.data.mul_(0.5)
    return bf


@gpu
def test_adaln_plan_chunks_are_exact_on_the_gemv():
    # every step's modulations in 16-row GEMMs: the same bits as each step's own 2-row call
    from worker.engine.fp8 import Fp8Options, apply_fp8
    from worker.engine.fp8.adaln import bank_of, step_temb

    m = apply_fp8(_medium3(), Fp8Options())
    bank = bank_of(m)
    g = torch.Generator(device="cuda").manual_seed(3)
    pooled = torch.randn(2, 2048, device="cuda", generator=g).bfloat16()
    with torch.no_grad():
        tembs = [step_temb(m, torch.full((2,), t, device="cuda"), pooled) for t in (1000.0, 750.0, 500.0, 20.0)]
        one_by_one = torch.cat([bank.linear(torch.nn.functional.silu(t)) for t in tembs])
        together = bank.modulations(torch.cat(tembs), rows=2)
    assert bank.chunk_rows(2) == 16
    assert torch.equal(together, one_by_one)


@gpu
def test_fed_cuda_graphs_give_the_same_bits():
    # graphs captured fed (no AdaLN GEMM inside; the engine's plan fills the bank's buffer before each
    # replay, or the runner does for a call nobody fed) against graphs with the GEMM inside and eager calls
    from worker.engine.fp8 import Fp8Options, apply_fp8, set_runtime_options
    from worker.engine.fp8.adaln import adaln_plan, bank_of
    from worker.engine.graphs import CudaGraphRunner

    m = apply_fp8(_medium3(), Fp8Options())
    g = torch.Generator(device="cuda").manual_seed(1)
    x = dict(hidden_states=torch.randn(2, 16, 64, 64, device="cuda", generator=g).bfloat16(),
             encoder_hidden_states=torch.randn(2, 154, 4096, device="cuda", generator=g).bfloat16(),
             pooled_projections=torch.randn(2, 2048, device="cuda", generator=g).bfloat16())
    steps = [1000.0, 600.0, 30.0]

    def call(t):
        return m(**x, timestep=torch.full((2,), t, device="cuda"), return_dict=False)[0].clone()

    with torch.no_grad():
        eager = [call(t) for t in steps]
        runner = CudaGraphRunner(m, batch_buckets=(2, 4))
        assert runner.fed
        runner.capture((64, 64), 154)
        runner.install()
        plan = adaln_plan(m, steps, x["pooled_projections"])
        planned = []
        for i, t in enumerate(steps):
            plan.feed(i)
            planned.append(call(t))
        plan.close()
        unfed = [call(t) for t in steps]  # the runner feeds these itself
        assert runner.replays == 6 and bank_of(m).armed == 0
        runner.release()
        assert bank_of(m).fed is None
        set_runtime_options(m, Fp8Options(adaln_all_steps=False))
        inside = CudaGraphRunner(m, batch_buckets=(2,))
        assert not inside.fed
        inside.capture((64, 64), 154)
        inside.install()
        with_gemm = [call(t) for t in steps]
        inside.release()
    torch.cuda.synchronize()
    for outs in (planned, unfed, with_gemm):
        for a, b in zip(outs, eager):
            assert torch.equal(a, b)
