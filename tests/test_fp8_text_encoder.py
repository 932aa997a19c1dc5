"""The FP8 T5 text encoder (``worker.engine.fp8.text_encoder``): on the CPU in CI, and on the GPU.

Run on the GPU machine too (``pytest --noconftest tests/test_fp8_*.py``): the CPU checks need torch's
row-wise CPU ``_scaled_mm`` (skipped where it is missing), the CUDA check needs an FP8 GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sdfleet.errors import EngineError
from tests.fp8_cpu import cpu_fp8_linear
from worker.engine.fp8.linear import Fp8Linear
from worker.engine.fp8.text_encoder import (
    Fp8FeedForward,
    Fp8GatedFeedForward,
    fp8_text_encoder,
    linear_weight_bytes,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def t5(dtype=torch.bfloat16, device="cpu", gated=True, act="gelu_new", seed=0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=300, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                   relative_attention_num_buckets=8, feed_forward_proj=f"gated-{act}" if gated else "relu",
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).to(device=device, dtype=dtype).eval()


def encode(model, ids):
    with torch.no_grad():
        return model(ids)[0].float()


def cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


IDS = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(3))


@cpu_fp8_linear
def test_every_block_linear_becomes_fp8_and_output_stays_close():
    ref = t5()
    want = encode(ref, IDS)
    model = fp8_text_encoder(copy.deepcopy(ref))
    for blk in model.encoder.block:
        attn = blk.layer[0].SelfAttention
        assert all(isinstance(getattr(attn, n), Fp8Linear) for n in "qkvo")
        assert isinstance(blk.layer[-1].DenseReluDense, Fp8GatedFeedForward)
    assert not any(type(m) is torch.nn.Linear for m in model.encoder.modules())
    got = encode(model, IDS)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert cos(got, want) > 0.995  # E4M3 rounding of both operands, ~4% per linear (random weights)
    # a wrong gate order (gelu on the wrong half) is far off: the check can fail
    ff = model.encoder.block[0].layer[-1].DenseReluDense
    ff.wi.weight.data = torch.cat([ff.wi.weight.data[ff.d_ff:], ff.wi.weight.data[:ff.d_ff]])
    ff.wi.weight_scale.data = torch.cat([ff.wi.weight_scale.data[ff.d_ff:], ff.wi.weight_scale.data[:ff.d_ff]])
    assert cos(encode(model, IDS), want) < 0.99


@cpu_fp8_linear
def test_linear_weights_take_half_the_bytes():
    ref = t5()
    bf16 = sum(m.weight.nbytes for m in ref.encoder.modules() if isinstance(m, torch.nn.Linear))
    sizes = linear_weight_bytes(fp8_text_encoder(copy.deepcopy(ref)))
    scales = sum(m.out_features * 4 for m in ref.encoder.modules() if isinstance(m, torch.nn.Linear))
    assert sizes["fp8_linears"] == bf16 // 2 + scales


@cpu_fp8_linear
def test_fp32_wo_keeps_the_residual_stream_in_fp32():
    # transformers keeps T5's ``wo`` in fp32 when it loads one in fp16: the FP8 layer must still hand the
    # residual stream the fp32 values the original layer would
    ref = t5()
    for blk in ref.encoder.block:
        blk.layer[-1].DenseReluDense.wo.float()
    model = fp8_text_encoder(copy.deepcopy(ref))
    h = torch.randn(2, 5, 64).bfloat16()
    ff = model.encoder.block[0].layer[-1].DenseReluDense
    assert ff.wo.out_dtype == torch.bfloat16 and ff(h).dtype == torch.float32  # bf16-out GEMM, cast
    assert cos(encode(model, IDS), encode(ref, IDS)) > 0.995


@cpu_fp8_linear
def test_ungated_t5_and_converting_twice():
    ref = t5(gated=False)
    model = fp8_text_encoder(copy.deepcopy(ref))
    assert isinstance(model.encoder.block[0].layer[-1].DenseReluDense, Fp8FeedForward)
    once = encode(model, IDS)
    assert cos(once, encode(ref, IDS)) > 0.995
    assert torch.equal(encode(fp8_text_encoder(model), IDS), once)  # nothing converted again


@cpu_fp8_linear
def test_layers_of_odd_width_stay_unquantized():
    # cuBLASLt's FP8 GEMM needs widths in multiples of 16 (the tiny model's T5 has d_ff=37)
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    ref = T5EncoderModel(T5Config(vocab_size=300, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1,
                                  feed_forward_proj="gated-gelu", pad_token_id=0)).bfloat16().eval()
    model = fp8_text_encoder(copy.deepcopy(ref))
    ff = model.encoder.block[0].layer[-1].DenseReluDense
    assert not isinstance(ff.wi, Fp8Linear) and not isinstance(ff.wo, Fp8Linear)
    assert isinstance(model.encoder.block[0].layer[0].SelfAttention.q, Fp8Linear)
    assert cos(encode(model, IDS[:, :8] % 300), encode(ref, IDS[:, :8] % 300)) > 0.995


def test_unsupported_models_are_refused():
    with pytest.raises(EngineError, match="gated feed-forward with activation 'relu'"):
        fp8_text_encoder(t5(gated=True, act="relu"))
    with pytest.raises(EngineError, match="expected a transformers T5EncoderModel"):
        fp8_text_encoder(torch.nn.Linear(4, 4))


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs an FP8 GPU")
def test_fp8_text_encoder_on_the_gpu_converts_from_cpu_weights():
    ref = t5(device="cuda")
    want = encode(ref, IDS.cuda())
    cpu_model = t5()  # the same seed: same weights, still on the CPU, converted layer by layer on the GPU
    model = fp8_text_encoder(cpu_model, device="cuda").to("cuda")
    assert all(b.is_cuda for b in model.buffers()) and all(p.is_cuda for p in model.parameters())
    got = encode(model, IDS.cuda())
    assert cos(got, want) > 0.995  # E4M3 rounding of both operands, ~4% per linear (random weights)
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.08  # measured 0.059 on an H200: two layers of E4M3 rounding
