"""Converting a tiny random SD3 transformer to FP8 on the CPU: accuracy, layer config, serialization."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sdfleet.errors import ConfigError, EngineError
from tests.fp8_cpu import cpu_fp8_linear
from worker.engine.fp8 import (
    DEFAULT_BF16_LAYERS,
    LAYER_TYPES,
    Fp8Linear,
    Fp8Options,
    apply_fp8,
    serialize,
    set_runtime_options,
    weight_bytes,
)
from worker.engine.fp8 import linear as linear_mod
from worker.engine.fp8 import quant as quant_mod
from worker.engine.fp8.blocks import AdaLNBank, Fp8JointBlock, PendingResidual
from worker.engine.sd35_configs import build_transformer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def rel(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm())


def cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@pytest.fixture(scope="module")
def tiny():
    return build_transformer("tiny", dtype=torch.bfloat16, seed=0, tame=False)


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 32, 32, generator=g).bfloat16(),
                encoder_hidden_states=torch.randn(2, 7, 32, generator=g).bfloat16(),
                pooled_projections=torch.randn(2, 64, generator=g).bfloat16(),
                timestep=torch.tensor([500.0, 300.0]), return_dict=False)


@pytest.fixture(scope="module")
def ref(tiny, x):
    with torch.no_grad():
        return tiny(**x)[0]


def run(model, x):
    with torch.no_grad():
        return model(**x)[0]


def block_inputs():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, 1024, 32, generator=g).bfloat16(), torch.randn(2, 7, 32, generator=g).bfloat16(),
            torch.randn(2, 32, generator=g).bfloat16())


@pytest.mark.parametrize("fused", [True, False])
def test_all_bf16_blocks_reproduce_diffusers(tiny, fused):
    """With every layer type kept BF16 the rewritten block is diffusers' block (bf16 rounding only)."""
    xs, c, temb = block_inputs()
    opts = Fp8Options(bf16_layers=frozenset(LAYER_TYPES), fused_quant=fused)
    for blk in tiny.transformer_blocks:  # block 0: dual attention; block 1: context_pre_only
        with torch.no_grad():
            rc, rx = blk(xs, c, temb)
            oc, ox = Fp8JointBlock(copy.deepcopy(blk), opts)(xs, c, temb)
        assert rel(ox - xs, rx - xs) < 0.02  # compare the block's update, not the residual it carries
        if rc is None:
            assert oc is None
        else:
            assert rel(oc - c, rc - c) < 0.02


@cpu_fp8_linear
@pytest.mark.parametrize("fused", [True, False])
def test_fp8_blocks_close_to_bf16(tiny, fused):
    xs, c, temb = block_inputs()
    for blk in tiny.transformer_blocks:
        with torch.no_grad():
            rc, rx = blk(xs, c, temb)
            oc, ox = Fp8JointBlock(copy.deepcopy(blk), Fp8Options(fused_quant=fused))(xs, c, temb)
        assert rel(ox - xs, rx - xs) < 0.1 and cos(ox - xs, rx - xs) > 0.99
        assert torch.isfinite(ox).all()


@cpu_fp8_linear
@pytest.mark.parametrize("opts", [Fp8Options(), Fp8Options(fused_quant=False), Fp8Options(bf16_layers=frozenset())])
def test_converted_model_matches_unquantized(tiny, x, ref, opts):
    m = apply_fp8(copy.deepcopy(tiny), opts)
    out = run(m, x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel(out, ref) < 0.05
    assert cos(out, ref) > 0.999
    assert weight_bytes(m) < weight_bytes(tiny)


@cpu_fp8_linear
def test_fused_and_unfused_agree(tiny, x):
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options())
    a = run(m, x)
    set_runtime_options(m, Fp8Options(fused_quant=False))
    b = run(m, x)
    assert rel(a, b) < 0.02


@cpu_fp8_linear
def test_deferred_residual_is_the_same_sum(tiny, x):
    # every block but the last hands its image stream on as x + gate * y for the next block's norm to add
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options())
    assert [blk.defer_residual for blk in m.transformer_blocks] == [True] * (len(m.transformer_blocks) - 1) + [False]
    a = run(m, x)
    bank = m.transformer_blocks[0].adaln_bank
    assert bank.temb is None and bank.out is None  # the last block let go of the call's modulations
    for blk in m.transformer_blocks:
        blk.defer_residual = False
    assert torch.equal(a, run(m, x))
    # a block's deferred output, fed to something other than a block, is the sum
    blk = copy.deepcopy(m.transformer_blocks[0])
    blk.defer_residual = True
    xs, c, temb = block_inputs()
    with torch.no_grad():
        c_pending, pending = blk(xs, c, temb)
    assert isinstance(pending, PendingResidual) and isinstance(c_pending, PendingResidual)
    full = pending.materialize()
    blk.defer_residual = False
    with torch.no_grad():
        assert torch.equal(blk(xs, c, temb)[1], full)
    d = full.shape[-1]
    assert torch.equal(torch.nn.functional.layer_norm(pending, (d,)), torch.nn.functional.layer_norm(full, (d,)))
    assert torch.equal(pending + 1, full + 1) and torch.equal(1 + pending, full + 1)


@cpu_fp8_linear
def test_one_adaln_gemm_for_all_blocks(tiny, x):
    """The model's AdaLN bank: every block's modulation from one linear, the blocks' own outputs unchanged."""
    for opts in (Fp8Options(), Fp8Options(bf16_layers=DEFAULT_BF16_LAYERS | {"adaln"})):
        m = apply_fp8(copy.deepcopy(tiny), opts)
        blocks = m.transformer_blocks
        bank = blocks[0].adaln_bank
        assert all(blk.adaln_bank is bank for blk in blocks) and bank.linear is m.adaln_bank
        assert [blk.adaln_index for blk in blocks] == list(range(len(blocks)))
        widths = [(b.norm1.linear.out_features, b.norm1_context.linear.out_features) for b in tiny.transformer_blocks]
        assert m.adaln_bank.out_features == sum(a + c for a, c in widths)
        assert not any(n.startswith("transformer_blocks.") and "adaln" in n for n, _ in m.named_parameters())
        # each block's slice of the bank is what its own linear gives (same weights, same quantization)
        temb = torch.randn(2, tiny.transformer_blocks[0].norm1.linear.in_features, dtype=torch.bfloat16)
        calls = []
        m.adaln_bank.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        for i, blk in enumerate(tiny.transformer_blocks):
            own = Fp8JointBlock(copy.deepcopy(blk), opts).adaln_bank
            with torch.no_grad():
                got = bank(temb, i)
                want = own(temb, 0)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert len(calls) == 1  # one GEMM for all blocks, cached for this temb
        bank(temb.clone(), 0)
        assert len(calls) == 2  # a new temb tensor is a new call
        bank.clear()
        assert bank.temb is None and bank.out is None
    with pytest.raises(EngineError, match="outputs for blocks"):
        AdaLNBank(torch.nn.Linear(4, 8), [(2, 2)])


def test_layer_types_follow_config(tiny):
    keep = frozenset({"adaln", "ff_down", "context_qkv", "proj_out"})
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options(bf16_layers=keep))
    b0 = m.transformer_blocks[0]
    assert isinstance(m.adaln_bank, torch.nn.Linear)  # every block's modulation in one BF16 linear
    assert b0.adaln_bank.cols[0] == (0, tiny.transformer_blocks[0].norm1.linear.out_features,
                                     tiny.transformer_blocks[0].norm1_context.linear.out_features)
    assert isinstance(b0.ff.down, torch.nn.Linear) and isinstance(b0.ff.up, Fp8Linear)
    assert isinstance(b0.attn.ctx_qkv, torch.nn.Linear) and isinstance(b0.attn.qkv, Fp8Linear)
    assert isinstance(b0.attn2.qkv, Fp8Linear) and isinstance(b0.ff_context.down, Fp8Linear)
    assert b0.attn.ctx_qkv.out_features == 3 * 32  # BF16 q/k/v still fused into one GEMM
    assert isinstance(m.proj_out, torch.nn.Linear) and not isinstance(m.proj_out, Fp8Linear)
    assert isinstance(m.context_embedder, Fp8Linear)  # not in bf16_layers this time
    # default: embedders and final projection stay BF16, everything in the blocks is FP8
    d = apply_fp8(copy.deepcopy(tiny), Fp8Options())
    assert not isinstance(d.context_embedder, Fp8Linear) and not isinstance(d.proj_out, Fp8Linear)
    assert not isinstance(d.norm_out.linear, Fp8Linear)
    assert all(isinstance(mod, Fp8Linear) for blk in d.transformer_blocks
               for name, mod in blk.named_modules() if isinstance(mod, (torch.nn.Linear, Fp8Linear)))
    # last block: no text-stream output projection or feed-forward
    last = d.transformer_blocks[-1]
    assert last.attn.ctx_out is None and last.ff_context is None


def test_fp8_linears_off_keeps_blocks(tiny, x, ref):
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options(fp8_linears=False, fp8_attention=True))
    assert not any(isinstance(mod, Fp8Linear) for mod in m.modules())
    # on the CPU the FP8 attention switch falls back to SDPA: same output as diffusers
    assert rel(run(m, x), ref) < 1e-3


@cpu_fp8_linear
def test_feed_forward_in_row_chunks_is_the_same_maths(tiny, x, monkeypatch):
    # 100-row chunks of the tiny model's image stream: the chunked path, with a ragged last chunk
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options(ff_chunk_rows=0))
    whole = run(m, x)
    calls = []
    real = Fp8Linear.forward

    def spy(self, inp, out=None):
        calls.append(out is not None)
        return real(self, inp, out=out)

    monkeypatch.setattr(Fp8Linear, "forward", spy)
    set_runtime_options(m, Fp8Options(ff_chunk_rows=100))
    chunked = run(m, x)
    # image FF down projections write into the shared output, a ragged last chunk included
    b, _, h, w = x["hidden_states"].shape
    rows = b * (h // m.config.patch_size) * (w // m.config.patch_size)
    assert rows % 100 and calls.count(True) == -(-rows // 100) * len(m.transformer_blocks)
    assert rel(chunked, whole) < 1e-3
    set_runtime_options(m, Fp8Options(ff_chunk_rows=100, fused_quant=False))  # chunks only with the fused path
    calls.clear()
    run(m, x)
    assert not any(calls)


def test_options_validation():
    with pytest.raises(ConfigError, match="ff_chunk_rows"):
        Fp8Options(ff_chunk_rows=-1)
    with pytest.raises(ConfigError, match="unknown layer type"):
        Fp8Options(bf16_layers={"attn_qkvv"})
    with pytest.raises(ConfigError, match="unknown option"):
        Fp8Options.from_dict({"fp8_linear": True})
    with pytest.raises(ConfigError, match=r"attention_kernel: 'cuda'; use one of triton, gluon"):
        Fp8Options(attention_kernel="cuda")
    o = Fp8Options(bf16_layers=["adaln"], attention_kernel="gluon")
    assert Fp8Options.from_dict(o.to_dict()) == o


def test_convert_twice_is_refused(tiny):
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options())
    with pytest.raises(EngineError, match="already converted"):
        apply_fp8(m, Fp8Options())


@cpu_fp8_linear
def test_serialize_round_trip_without_requantizing(tiny, x, tmp_path, monkeypatch):
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options(bf16_layers=frozenset({"adaln", "proj_out"})))
    want = run(m, x)
    manifest = serialize.save_quantized(m, tmp_path)
    assert (tmp_path / serialize.WEIGHTS).is_file()
    on_disk = json.loads((tmp_path / serialize.MANIFEST).read_text())
    assert on_disk["options"]["bf16_layers"] == ["adaln", "proj_out"]
    # only what shapes the weights: a runtime switch added later (attention_kernel, 2026-12) must not make the
    # manifest unreadable to a reader that predates it (Fp8Options.from_dict refuses unknown names)
    assert set(on_disk["options"]) == {"fp8_linears", "bf16_layers", "max_image_side"}
    assert on_disk["layers"]["transformer_blocks.0.attn.qkv"] == "float8_e4m3fn"
    assert on_disk["layers"]["adaln_bank"] == "bfloat16"
    assert manifest["weight_bytes"] == weight_bytes(m)

    def boom(*a, **k):
        raise AssertionError("loading must not quantize")

    monkeypatch.setattr(linear_mod, "quantize_weight", boom)
    monkeypatch.setattr(quant_mod, "quantize_weight", boom)
    loaded = serialize.load_quantized(tmp_path, options=Fp8Options(fused_quant=False))
    assert isinstance(loaded.transformer_blocks[0].attn.qkv, Fp8Linear)
    assert isinstance(loaded.adaln_bank, torch.nn.Linear)
    assert loaded.transformer_blocks[1].adaln_bank.linear is loaded.adaln_bank
    assert loaded.transformer_blocks[0].attn.qkv.weight.dtype == torch.float8_e4m3fn
    set_runtime_options(loaded, Fp8Options(bf16_layers=frozenset({"adaln", "proj_out"})))
    assert torch.equal(run(loaded, x), want)
    # a manifest written before (every option, runtime switches included) still loads
    old = json.loads((tmp_path / serialize.MANIFEST).read_text())
    old["options"] = {**Fp8Options(fused_quant=False).to_dict(), **old["options"]}
    (tmp_path / serialize.MANIFEST).write_text(json.dumps(old))
    assert serialize.load_quantized(tmp_path).adaln_bank.weight.dtype == torch.bfloat16


def test_load_rejects_missing_or_foreign(tmp_path):
    with pytest.raises(EngineError, match="sdfleet quantize"):
        serialize.load_quantized(tmp_path)
    (tmp_path / serialize.WEIGHTS).write_bytes(b"")
    (tmp_path / serialize.MANIFEST).write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(EngineError, match="quantize again"):
        serialize.load_quantized(tmp_path)


def test_quantize_cli_entry_point(tmp_path, monkeypatch):
    monkeypatch.setenv("SDFLEET_CACHE_DIR", str(tmp_path / "cache"))
    summary = serialize.quantize("tiny", str(tmp_path / "q"), options=Fp8Options())
    assert summary["fp8_layers"] > 0 and summary["weight_bytes"] < summary["weight_bytes_source"]
    loaded = serialize.load_quantized(tmp_path / "q")
    assert isinstance(loaded.transformer_blocks[0].ff.up, Fp8Linear)
    with pytest.raises(EngineError, match="transformer/"):
        serialize.quantize(str(tmp_path / "nowhere"), str(tmp_path / "q2"))


def test_cuda_graphs_need_cuda(tiny):
    from worker.engine.graphs import CudaGraphRunner

    runner = CudaGraphRunner(tiny, batch_buckets=(1, 2, 4))
    assert runner.bucket(3) == 4 and runner.bucket(5) is None
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="CUDA"):
            runner.capture((32, 32), 7)
    with pytest.raises(EngineError):
        CudaGraphRunner(tiny, batch_buckets=())


def test_graph_runner_eager_fallback_is_transparent(tiny, x, ref):
    """Installed on a CPU model with nothing captured, the runner is the plain forward."""
    from worker.engine.graphs import CudaGraphRunner

    m = copy.deepcopy(tiny)
    runner = CudaGraphRunner(m, batch_buckets=(2,))
    runner.install()
    try:
        assert torch.equal(run(m, x), ref)
        assert runner.eager_calls == 1 and runner.replays == 0
    finally:
        runner.uninstall()
    assert "forward" not in m.__dict__


@pytest.mark.parametrize("side", [16, 13, 8, 1])
def test_position_table_cut_gives_the_same_positions(tiny, side):
    # images up to 128 px = 16 latent patches a side (patch 1, VAE factor 8): the cut table must give
    # exactly the rows diffusers crops from the whole table, for even and odd sizes
    full = copy.deepcopy(tiny)
    cut = apply_fp8(copy.deepcopy(tiny), Fp8Options(fp8_linears=False, fp8_attention=False, max_image_side=128))
    old = full.pos_embed.pos_embed_max_size
    assert cut.pos_embed.pos_embed_max_size < old and (old - cut.pos_embed.pos_embed_max_size) % 2 == 0
    assert cut.pos_embed.pos_embed.shape[1] == cut.pos_embed.pos_embed_max_size ** 2
    assert torch.equal(cut.pos_embed.cropped_pos_embed(side, side), full.pos_embed.cropped_pos_embed(side, side))
    assert torch.equal(cut.pos_embed.cropped_pos_embed(side, 3), full.pos_embed.cropped_pos_embed(side, 3))
    assert weight_bytes(cut) < weight_bytes(full)


@cpu_fp8_linear
def test_position_table_cut_refuses_larger_images_and_survives_serialization(tiny, x, tmp_path):
    opts = Fp8Options(max_image_side=256)  # 32 latent patches: the fixture's 32 x 32 latents just fit
    m = apply_fp8(copy.deepcopy(tiny), opts)
    assert m.pos_embed.pos_embed_max_size == 32
    y = run(m, x)
    serialize.save_quantized(m, tmp_path / "q")
    back = serialize.load_quantized(tmp_path / "q")
    assert back.pos_embed.pos_embed_max_size == 32
    assert torch.equal(run(back, x), y)
    small = apply_fp8(copy.deepcopy(tiny), Fp8Options(max_image_side=128))
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        run(small, x)  # 32 x 32 latents are 256 px: beyond what it was cut for
    with pytest.raises(ConfigError, match="max_image_side"):
        Fp8Options(max_image_side=-1)


class _FakeStream:
    """Records the waits a TextStream asks for (no CUDA here)."""

    def __init__(self, name, log):
        self.name, self.log, self.device = name, log, torch.device("cpu")

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


def test_text_stream_holds_cross_stream_tensors_until_the_maker_waits():
    # what each stream reads of the other's tensors is held (not freed for the allocator to reuse) until
    # the stream that made it has waited for the reader; nothing is held after the call's last join
    from worker.engine.fp8.blocks import TextStream, _SideStream

    log = []
    main, text_stream = _FakeStream("main", log), _FakeStream("text", log)
    side = _SideStream(text_stream)
    ts = TextStream(side, main=main)
    cmod, q = torch.ones(2), torch.ones(3)
    ts.handoff(cmod, (q, None))  # made on main, read by text: held until main waits for text
    assert log == ["text waits main"] and side.read_by_text == [cmod, q]
    cqkv = torch.ones(4)
    ts.join(cqkv)  # main waits: text's reads are behind it; cqkv (made on text) is now read by main
    assert log[-1] == "main waits text" and side.read_by_text == [] and side.read_by_main == [cqkv]
    ts._text_waits(False)
    assert side.read_by_main == [cqkv]  # no wait, nothing released
    ts._text_waits(True)
    assert log[-1] == "text waits main" and side.read_by_main == []
    ts.handoff(q)
    ts.join(cqkv, last=True)
    assert side.read_by_text == [] and side.read_by_main == []
    # off (eager, CPU): no stream, nothing recorded or held
    off = TextStream(None)
    off.handoff(q)
    off.join(q, last=True)
    with off.side(q):
        pass
    assert off.stream is None
