"""The Gluon attention prototype (worker/engine/fp8/attention_gluon.py): its quantization and the emulation of its
arithmetic on the CPU; the kernels against that emulation on a Hopper GPU (skipped elsewhere).

The emulation is what the CPU can check: it is the kernel's scheme (scales, 128-key tiles, P in E4M3 at the running
max), so the error bounds below are the scheme's, and the GPU test ties each kernel to it.
"""

from __future__ import annotations

import pytest
import torch

from worker.engine.fp8 import attention_gluon as ag
from worker.engine.fp8.attention import sample_qkv


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _ref(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())


def _scheme_error(kind: str, qk: str, seed: int = 0) -> float:
    q, k, v = sample_qkv(kind, B=1, H=2, S=700, seed=seed)
    out = ag.emulate(ag.prepare(q, k, v, qk=qk))
    return _rel(out.reshape(q.shape), _ref(q, k, v))


def test_fp8x3_parts_rebuild_q_and_k_at_one_scale():
    q, k, v = sample_qkv("peaky", B=1, H=2, S=300, seed=3)
    prep = ag.prepare(q, k, v, qk="fp8x3")
    S = q.shape[2]
    qf = q.reshape(2, S, 64).double()
    kf = k.reshape(2, S, 64).double()
    q_s = qf.abs().amax(-1, keepdim=True) / ag.FP8_MAX
    k_s = kf.abs().amax(dim=(-2, -1), keepdim=True) / ag.FP8_MAX
    q_hi_lo = prep["q8"].double() + prep["q8lo"].double()
    k_hi_lo = prep["k8"][:, :S].double() + prep["k8lo"][:, :S].double()
    # hi alone is E4M3 (3 mantissa bits); hi + lo is ~16x closer
    err_hi = (prep["q8"].double() - qf / q_s).abs().max().item()
    err_x3 = (q_hi_lo - qf / q_s).abs().max().item()
    assert err_x3 < err_hi / 10
    assert (k_hi_lo - kf / k_s).abs().max().item() < (prep["k8"][:, :S].double() - kf / k_s).abs().max().item() / 10
    # the padding keys are zero in both parts (they are masked, but must not be NaN)
    assert prep["k8lo"][:, S:].float().abs().sum().item() == 0.0
    assert prep["k8"][:, S:].float().abs().sum().item() == 0.0


@pytest.mark.parametrize("kind", ["randn", "peaky"])
def test_the_q_k_formats_rank_as_measured(kind):
    # fp8x3 < int8 < fp8 on both inputs; on peaky logits E4M3 is far off (why the engine uses INT8 Q/K)
    e = {qk: _scheme_error(kind, qk) for qk in ("fp8", "int8", "fp8x3")}
    assert e["fp8x3"] < e["int8"] < e["fp8"], e
    bounds = {"randn": {"fp8x3": 0.045, "int8": 0.045, "fp8": 0.07},
              "peaky": {"fp8x3": 0.04, "int8": 0.08, "fp8": 0.3}}[kind]
    for qk, bound in bounds.items():
        assert e[qk] < bound, (qk, e)
    if kind == "peaky":
        assert e["fp8"] > 2 * e["int8"]


def test_prepare_names_what_is_wrong():
    q, k, v = sample_qkv("randn", B=1, H=1, S=200)
    with pytest.raises(ValueError, match="qk must be"):
        ag.prepare(q, k, v, qk="fp16")
    with pytest.raises(RuntimeError, match="more than 128 tokens"):
        ag.prepare(*sample_qkv("randn", B=1, H=1, S=100))
    with pytest.raises(RuntimeError, match="head_dim must be 64"):
        ag.prepare(q[..., :32], k[..., :32], v[..., :32])


def test_every_variant_is_well_formed_and_fp8x3_only_on_pipe():
    for name, cfg in ag.VARIANTS.items():
        assert cfg["qk"] in ("fp8", "int8", "fp8x3"), name
        assert cfg["kind"] in ("ws", "pipe"), name
        if cfg["qk"] == "fp8x3":
            assert cfg["kind"] == "pipe", name
    q, k, v = sample_qkv("randn", B=1, H=1, S=200)
    prep = ag.prepare(q, k, v, qk="fp8x3")
    bad = dict(ag.VARIANTS["ws3"], qk="fp8x3")
    ag.VARIANTS["_test_ws_x3"] = bad
    try:
        with pytest.raises(ValueError, match="'pipe' kind only"):
            ag.gluon_attention_quantized(prep, "_test_ws_x3")
    finally:
        del ag.VARIANTS["_test_ws_x3"]
    with pytest.raises(ValueError, match="wants qk=int8"):
        ag.gluon_attention_quantized(prep, "pipe_i8")


_gpu_ok, _gpu_why = ag.is_supported() if torch.cuda.is_available() else (False, "CUDA is not available")


@pytest.mark.skipif(not _gpu_ok, reason=f"Gluon kernels need a Hopper GPU: {_gpu_why}")
@pytest.mark.parametrize("variant,emu_bound", [("pipe", 0.01), ("pipe_i8", 0.01), ("pipe_x3", 0.02),
                                               ("ws3", 0.01), ("pipe_t", 0.01), ("pipe_i8_t", 0.01),
                                               ("ws3_t", 0.01), ("pair_i8_t", 0.01), ("pair_t", 0.01)])
@pytest.mark.parametrize("kind", ["randn", "peaky"])
def test_gluon_kernel_matches_its_emulation(variant, emu_bound, kind):
    q, k, v = sample_qkv(kind, B=1, H=3, S=1357, seed=5, device="cuda")
    prep = ag.prepare(q, k, v, qk=ag.VARIANTS[variant]["qk"])
    out = torch.full(q.shape, float("nan"), device="cuda", dtype=torch.bfloat16)
    ag.gluon_attention_quantized(prep, variant, out=out)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    emu = ag.emulate(prep).reshape(q.shape)
    # measured on an H200: 0.004 (pipe, ws3), 0.002 (pipe_i8), 0.010 (pipe_x3: three chained FP8 products,
    # accumulated by the tensor cores at their reduced precision, against fp32 sums in the emulation)
    assert _rel(out, emu) < emu_bound
    assert _rel(out, _ref(q, k, v)) < _rel(emu, _ref(q, k, v)) + 0.01


# ---- the engine's path: prep_joint's inputs, the E4M3 output rows (joint_attention) ----

def test_joint_support_names_what_rules_the_kernel_out():
    assert ag.joint_supported((2, 3, 4429, 128), "int8") == (False, "the Gluon kernel is written for head_dim 64, not 128")
    assert ag.joint_supported((2, 3, 128, 64), "int8") == (False, "the Gluon kernel needs more than 128 tokens, got 128")
    assert ag.joint_supported((2, 3, 4429, 64), "fp8") == (False, "the engine's Gluon kernel takes INT8 Q/K, not 'fp8'")
    ok, why = ag.joint_supported((2, 3, 4429, 64), "int8")
    assert (ok, why) == ag.is_supported()  # the shape is one the kernel serves: the device decides


def test_each_kernel_refuses_the_others_v_order():
    # V's token order differs between the two kernels' inputs: a K/V prepared for one is refused by the other
    from worker.engine.fp8 import attention as att

    opts = att._options(scales="vbatch")
    kv = {"S": 300, "s_pad": 384, "n_tiles": 3, "opts": opts, "shape": (1, 1, 300, 64), "v_order": "gluon"}
    q = torch.zeros(1, 1, 300, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="prepared for the Gluon kernel"):
        att.fp8_attention_quantized(q, kv, fp8_rows=(250, 50))
    with pytest.raises(ValueError, match="v_order='gluon'"):
        ag.joint_attention(q, dict(kv, v_order="natural"), fp8_rows=(250, 50))
    with pytest.raises(ValueError, match="not an engine-path variant"):
        ag.joint_attention(q, kv, fp8_rows=(250, 50), variant="pipe_i8_t")
    with pytest.raises(ValueError, match="call joint_attention"):
        ag.gluon_attention_quantized({"qk": "int8"}, "joint")


@pytest.mark.skipif(not _gpu_ok, reason=f"Gluon kernels need a Hopper GPU: {_gpu_why}")
@pytest.mark.parametrize("variant", ["joint", "joint_pair"])
@pytest.mark.parametrize("L,Lc,Lc_out", [(256, 77, 77), (200, 77, 0), (130, 5, 5), (1024, 154, 154), (1024, 300, 300)])
def test_joint_attention_is_the_triton_kernels_output(L, Lc, Lc_out, variant):
    # 2 to 11 key tiles: none, one and several in the loop, in pairs with and without one left over
    from worker.engine.fp8 import attention as att

    B, H, D = 2, 3, 64
    g = torch.Generator(device="cuda").manual_seed(L + Lc)
    img = (torch.randn(B * L, 3 * H * D, device="cuda", generator=g) * 2).bfloat16()
    ctx = torch.randn(B * Lc, 3 * H * D, device="cuda", generator=g).bfloat16()
    w = (torch.rand(2, 2, D, device="cuda", generator=g) + 0.5).bfloat16()
    q_t, kv_t = att.prep_joint(img, ctx, w[0], w[1], batch=B, heads=H)
    q_g, kv_g = att.prep_joint(img, ctx, w[0], w[1], batch=B, heads=H, v_order="gluon")
    # the same quantized inputs, V's tokens permuted within each 32 as the kernel's P operand holds them
    assert torch.equal(q_t, q_g) and torch.equal(kv_t["q_scale"], kv_g["q_scale"])
    assert torch.equal(kv_t["kq"], kv_g["kq"]) and torch.equal(kv_t["ks"], kv_g["ks"])
    assert torch.equal(kv_t["vs"], kv_g["vs"])
    order = ag._v_token_order(kv_t["s_pad"], "cuda")
    assert torch.equal(kv_g["vq"].view(torch.uint8), kv_t["vq"].view(torch.uint8)[:, :, order])
    o_t, s_t = att.fp8_attention_quantized(q_t, kv_t, fp8_rows=(L, Lc_out))
    o_g, s_g = ag.joint_attention(q_g, kv_g, fp8_rows=(L, Lc_out), variant=variant)
    torch.cuda.synchronize()
    assert o_g.shape == o_t.shape and o_g.dtype == torch.float8_e4m3fn and torch.equal(s_g, s_t)
    # the same scheme; the tensor cores sum P V in another order, so an output may round to the next E4M3 value
    got, want = o_g.float() * s_g, o_t.float() * s_t
    assert _rel(got, want) < 0.01
    assert (o_g.view(torch.uint8) != o_t.view(torch.uint8)).float().mean() < 0.05
    # image rows and text rows as two launches into one output: the same bits as one launch
    two = ag.joint_attention(q_g, kv_g, fp8_rows=(L, Lc_out), rows=(0, L), variant=variant)
    ag.joint_attention(q_g, kv_g, fp8_rows=(L, Lc_out), rows=(L, L + Lc_out), out=two, variant=variant)
    torch.cuda.synchronize()
    assert torch.equal(two[0].view(torch.uint8), o_g.view(torch.uint8)) and torch.equal(two[1], s_g)


def test_a_device_without_gluon_is_ruled_out_once_not_per_shape(monkeypatch):
    # where the device or the install rules the Gluon kernel out, one reason for the device, not one a shape
    from worker.engine.fp8 import processor

    monkeypatch.setattr(processor, "_gluon_error", {})
    monkeypatch.setattr(ag, "is_supported", lambda device=None: (False, "the Gluon kernel uses Hopper wgmma"))
    dev = torch.device("cuda", 0)
    assert not processor._gluon_usable(dev, (2, 24, 4429, 64))
    assert not processor._gluon_usable(dev, (2, 24, 1357, 64))
    assert processor._gluon_error == {
        0: "Gluon attention not used on cuda:0: the Gluon kernel uses Hopper wgmma; using the Triton kernel"}
    monkeypatch.setattr(ag, "is_supported", lambda device=None: (True, "ok"))
    assert not processor._gluon_usable(torch.device("cuda", 1), (2, 24, 100, 64))  # a shape reason: per shape
    assert processor._gluon_error[(1, 2, 24, 100, 64)].startswith("Gluon attention not used for (2, 24, 100, 64)")
    assert processor._gluon_usable(torch.device("cuda", 1), (2, 24, 4429, 64))
