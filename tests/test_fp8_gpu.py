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


@gpu
@pytest.mark.parametrize("length,res2", [(4096, False), (333, False), (64, True), (8, False)])
def test_layernorm_rows_a_program(length, res2):
    # 1, 2 or 4 rows a LayerNorm program (kernels.LN_ROWS): the same residual stream bit for bit, the same
    # E4M3 rows up to the rounding of a reduction's other order, and the torch reference's values
    from worker.engine.fp8 import kernels, quant

    g = torch.Generator(device="cuda").manual_seed(length)
    b, d = 2, 2432

    def rn(*shape):
        return torch.randn(*shape, device="cuda", generator=g).bfloat16()

    x, y, y2, mod = rn(b, length, d), rn(b, length, d), rn(b, length, d), rn(b, 9 * d)
    shift, scale, gate, gate2 = mod.chunk(9, 1)[:4]  # strided views, as the blocks pass them
    kw = dict(residual=(y, gate), residual2=(y2, gate2) if res2 else None)
    ref_q, ref_h = quant.ln_modulate_quantize(x.cpu(), shift.cpu(), scale.cpu(),
                                              residual=(y.cpu(), gate.cpu()),
                                              residual2=(y2.cpu(), gate2.cpu()) if res2 else None)
    outs = {per: kernels.ln_modulate_quant(x, shift, scale, rows=per, **kw) for per in (1, 2, 4)}
    assert kernels._ln_rows(length, 4) == (4 if length % 4 == 0 else 1)
    q1, h1 = outs[1]
    assert _rel(h1.cpu(), ref_h) < 1e-3  # torch's bf16 adds on the CPU: the same maths, maybe another rounding
    assert _rel(q1.dequantize().cpu(), ref_q.dequantize()) < 0.02
    for per in (2, 4):
        q, h = outs[per]
        assert torch.equal(h, h1)
        assert _rel(q.dequantize(), q1.dequantize()) < 1e-3
        assert torch.allclose(q.scale, q1.scale, rtol=1e-5)
    # no residual: x itself is the stream
    q0, h0 = kernels.ln_modulate_quant(x, shift, scale, rows=4)
    assert h0 is x and _rel(q0.dequantize(), kernels.ln_modulate_quant(x, shift, scale, rows=1)[0].dequantize()) < 1e-3


@gpu
@pytest.mark.parametrize("rows,k", [(64, 9728), (40, 6144), (3, 256)])
def test_gelu_tanh_forms(rows, k):
    # GELU's tanh as MUFU.TANH and as EX2 + RCP: both within E4M3 rounding of the exact GELU, and close
    from worker.engine.fp8 import kernels, quant

    g = torch.Generator(device="cuda").manual_seed(k)
    h = (torch.randn(rows, k, device="cuda", generator=g) * 3).bfloat16()
    exact = quant.gelu_tanh_torch(h.double())
    got = {t: quant.QTensor(*kernels.quant_rows(h, gelu=True, tanh=t), tuple(h.shape)).dequantize()
           for t in (False, True)}
    bound = _rel(quant.quantize_rows(exact.float(), use_triton=False).dequantize(), exact)
    for t, v in got.items():
        assert _rel(v, exact) <= bound * 1.05, t
    assert _rel(got[True], got[False]) < 0.01


def _twice(fn):
    """fn() eager, then captured in a CUDA graph and replayed."""
    eager = fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    torch.cuda.synchronize()
    return eager, captured


def _medium3(seed: int = 0):
    """SD3.5 Medium's block widths, three blocks (the first dual-attention), random bf16 weights on the GPU."""
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
def test_text_stream_gives_the_same_bits():
    # the text stream's kernels on their own CUDA stream in a captured graph: same output as in line
    from worker.engine.fp8 import Fp8Options, apply_fp8, set_runtime_options

    bf = _medium3()
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


def _tiny_encoders(seed: int = 0):
    """A pipeline-shaped namespace with a two-layer CLIP and a two-layer FP8 T5, on the GPU."""
    import types

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from worker.engine.fp8.text_encoder import fp8_text_encoder

    torch.manual_seed(seed)
    with torch.device("cuda"):
        clip = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=32, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)).to(torch.bfloat16).eval()
        t5 = T5EncoderModel(T5Config(vocab_size=300, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu_new",
                                     pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0)).to(torch.bfloat16).eval()
    fp8_text_encoder(t5, "cuda")
    tok = types.SimpleNamespace(pad_token_id=0)
    return types.SimpleNamespace(tokenizer_max_length=77, text_encoder=clip, text_encoder_2=None,
                                 text_encoder_3=t5, tokenizer=tok, tokenizer_2=tok, tokenizer_3=tok)


@gpu
def test_text_encoder_graphs_give_the_same_embeddings():
    # CLIP (hidden states asked for) and the FP8 T5 replayed from CUDA graphs: the same bits as eager at a
    # bucket's own prompt count, rows of a padded call as eager's, and each call's output its own copy
    from worker.engine.encoder_graphs import EncoderGraphs

    pipe = _tiny_encoders()
    clip, t5 = pipe.text_encoder, pipe.text_encoder_3
    g = torch.Generator(device="cuda").manual_seed(4)
    ids = {n: (torch.randint(3, 300, (n, 77), device="cuda", generator=g),
               torch.randint(3, 300, (n, 64), device="cuda", generator=g)) for n in (1, 3, 4, 5)}
    with torch.inference_mode():
        want = {n: (clip(c, output_hidden_states=True), t5(t)[0]) for n, (c, t) in ids.items()}
        graphs = EncoderGraphs(pipe, (1, 4))
        assert graphs.capture(t5_length=64) == 4 and not graphs.failed
        graphs.install()
        got = {n: (clip(c, output_hidden_states=True), t5(t)[0]) for n, (c, t) in ids.items()}
        again = clip(ids[4][0], output_hidden_states=True)  # another replay of the 4-prompt graph
        torch.cuda.synchronize()
        assert graphs.replays == 7 and graphs.eager_calls == 2  # 5 prompts: larger than every bucket
        for n in (1, 4, 5):
            (wc, wt), (gc_, gt) = want[n], got[n]
            assert torch.equal(gc_.text_embeds, wc.text_embeds) and torch.equal(gt, wt)
            assert torch.equal(gc_.hidden_states[-2], wc.hidden_states[-2])
        (wc, wt), (gc_, gt) = want[3], got[3]  # padded into the 4-prompt graph: another GEMM row count
        assert gc_.text_embeds.shape == wc.text_embeds.shape and gt.shape == wt.shape
        assert _rel(gc_.hidden_states[-2], wc.hidden_states[-2]) < 1e-2 and _rel(gt, wt) < 5e-2
        assert torch.equal(got[4][0].text_embeds, again.text_embeds)
        assert got[4][0].text_embeds.data_ptr() != again.text_embeds.data_ptr()
        graphs.release()
    assert "forward" not in clip.__dict__ and "forward" not in t5.__dict__


@gpu
def test_transformer_and_encoder_graphs_replay_side_by_side():
    # The engine replays the text encoders' graphs on its encoding stream while the transformer's replay on
    # the main stream (the next batch's prompts during this one's steps). Each graph set is captured on a
    # stream of its own, never torch's shared default capture stream: cuBLAS keys its workspace by stream,
    # and graphs captured on one stream share it (a Large worker hung that way). Overlapped replays must give
    # the bits of replays one after another.
    from worker.engine.encoder_graphs import EncoderGraphs
    from worker.engine.fp8 import Fp8Options, apply_fp8
    from worker.engine.graphs import CudaGraphRunner

    m = apply_fp8(_medium3(), Fp8Options())
    pipe = _tiny_encoders()
    g = torch.Generator(device="cuda").manual_seed(5)
    x = dict(hidden_states=torch.randn(2, 16, 64, 64, device="cuda", generator=g).bfloat16(),
             encoder_hidden_states=torch.randn(2, 154, 4096, device="cuda", generator=g).bfloat16(),
             pooled_projections=torch.randn(2, 2048, device="cuda", generator=g).bfloat16(),
             timestep=torch.full((2,), 700.0, device="cuda"))
    clip_ids = torch.randint(3, 300, (4, 77), device="cuda", generator=g)
    t5_ids = torch.randint(3, 300, (4, 64), device="cuda", generator=g)
    with torch.inference_mode():
        runner = CudaGraphRunner(m, batch_buckets=(2,))
        runner.capture((64, 64), 154)
        runner.install()
        graphs = EncoderGraphs(pipe, (4,))
        assert graphs.capture(t5_length=64) == 2
        graphs.install()
        default = torch.cuda.graph.default_capture_stream
        streams = {runner.capture_stream, graphs.stream}
        assert len(streams) == 2 and None not in streams and default not in streams

        def encode():
            return pipe.text_encoder(clip_ids, output_hidden_states=True).text_embeds, pipe.text_encoder_3(t5_ids)[0]

        step_want = m(**x, return_dict=False)[0]
        enc_want = encode()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        steps, encs = [], []
        for _ in range(8):
            with torch.cuda.stream(side):  # queued first, so it runs beside the step below
                encs.append(encode())
            steps.append(m(**x, return_dict=False)[0])
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        assert runner.replays == 9 and graphs.replays == 18 and graphs.eager_calls == 0
        for out in steps:
            assert torch.equal(out, step_want)
        for te, t5 in encs:
            assert torch.equal(te, enc_want[0]) and torch.equal(t5, enc_want[1])
        graphs.release()
        runner.release()


def _gluon_ok():
    from worker.engine.fp8 import attention_gluon

    return torch.cuda.is_available() and attention_gluon.is_supported()[0]


@gpu
@pytest.mark.skipif(not _gluon_ok(), reason="the Gluon attention kernel needs a Hopper GPU and Triton's Gluon")
def test_gluon_attention_kernel_in_the_engine():
    # Fp8Options.attention_kernel="gluon": the same scheme as the Triton kernel, so nearly the same output;
    # in a captured graph (text rows a second launch on the text stream) the same bits as eager; and where the
    # Gluon kernel cannot serve a shape (<= 128 tokens: the dual block's image-only attention of a 256 px
    # image, 64 tokens) the Triton kernel runs, and the reason is in the status
    from worker.engine.fp8 import Fp8Options, apply_fp8, processor, set_runtime_options

    bf = _medium3()
    m = apply_fp8(copy.deepcopy(bf), Fp8Options())
    g = torch.Generator(device="cuda").manual_seed(1)

    def inputs(side, text):
        return dict(hidden_states=torch.randn(2, 16, side, side, device="cuda", generator=g).bfloat16(),
                    encoder_hidden_states=torch.randn(2, text, 4096, device="cuda", generator=g).bfloat16(),
                    pooled_projections=torch.randn(2, 2048, device="cuda", generator=g).bfloat16(),
                    timestep=torch.full((2,), 500.0, device="cuda"), return_dict=False)

    x, small = inputs(64, 154), inputs(16, 154)  # joint attention 1024 + 154 tokens; 64 + 154, and 64 alone
    outs = {}
    with torch.no_grad():
        for kernel in ("triton", "gluon"):
            set_runtime_options(m, Fp8Options(attention_kernel=kernel))
            outs[kernel] = _twice(lambda: m(**x)[0].clone())
            outs[kernel, "small"] = m(**small)[0].clone()
        ref = bf(**x)[0]
    eager, captured = outs["gluon"]
    assert torch.equal(eager, captured)
    # the Gluon kernel did serve (a failure would have fallen back to the Triton kernel and passed the rest)
    assert not any(isinstance(k, tuple) and k[3] in (1178, 1024) for k in processor._gluon_error)
    assert "the Gluon kernel serves" in processor.fp8_attention_status()
    assert not torch.equal(eager, outs["triton"][0])
    assert _rel(eager, outs["triton"][0]) < 0.01
    assert _rel(eager, ref) < 0.05 and _rel(outs["triton"][0], ref) < 0.05
    assert _rel(outs["gluon", "small"], outs["triton", "small"]) < 0.01
    assert "Gluon attention not used for (2, 24, 64, 64)" in processor.fp8_attention_status()
