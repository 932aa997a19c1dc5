"""The engine's own denoising loop against diffusers' SD3 pipeline, on the CPU with the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdfleet.jobs import BatchKey
from worker.engine.base import GenerationRequest
from worker.engine.diffusers_engine import DiffusersEngine, EngineOptions


@pytest.fixture(scope="module")
def engine(cache_dir, monkeypatch_module):
    monkeypatch_module.setenv("SDFLEET_CACHE_DIR", str(cache_dir))
    e = DiffusersEngine(EngineOptions(model="tiny", device="cpu", precision="fp32"))
    e.load()
    return e


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _pipeline_images(engine, key, requests):
    """The same batch through diffusers' own StableDiffusion3Pipeline.__call__ (its loop and scheduler)."""
    pipe = engine.pipe
    cfg = key.guidance_scale > 1.0
    with torch.inference_mode():
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=[r.prompt for r in requests], prompt_2=None, prompt_3=None,
            negative_prompt=[r.negative_prompt for r in requests] if cfg else None,
            do_classifier_free_guidance=cfg, device="cpu", num_images_per_prompt=1)
        latents = engine._initial_latents(key, requests)
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                   negative_pooled_prompt_embeds=nppe, height=key.height, width=key.width,
                   num_inference_steps=key.steps, guidance_scale=key.guidance_scale, latents=latents,
                   output_type="latent").images
        vae = pipe.vae
        px = vae.decode(out / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return ((px.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("guidance", [1.0, 4.5])
@pytest.mark.parametrize("steps", [1, 4])
def test_own_denoising_loop_equals_the_diffusers_pipeline(engine, guidance, steps):
    key = BatchKey(model=engine.model_name, width=256, height=256, steps=steps, guidance_scale=guidance)
    reqs = [GenerationRequest("a", "a red fox", "blurry", 7), GenerationRequest("b", "a blue car", "", 8)]
    ours = engine.generate(key, reqs).wait()
    theirs = _pipeline_images(engine, key, reqs)
    assert len(ours.images) == 2
    for mine, ref in zip(ours.images, theirs):
        assert mine.shape == ref.shape and mine.dtype == np.uint8
        assert np.array_equal(mine, ref)
    assert set(ours.timings) >= {"encode_s", "denoise_s", "decode_s", "engine_s"}
    assert all(v >= 0 for v in ours.timings.values())


def test_schedule_is_computed_once_per_shape_on_the_host(engine):
    a = engine._schedule(4, 32, 32)
    assert engine._schedule(4, 32, 32) is a
    timesteps, sigmas = a
    assert len(timesteps) == 4 and len(sigmas) == 5 and sigmas.device.type == "cpu"
    assert float(sigmas[-1]) == 0.0


def test_compile_counters_are_reported_with_the_engine(engine):
    counters = engine.compile_counters()
    # On the CPU: no Triton and no CUDA graphs (None: not applicable), and nothing compiled by torch.compile.
    assert counters == {"triton_compiles": None, "torch_compiles": 0, "graph_captures": None,
                        "graph_replays": None, "graph_eager_calls": None}
    described = engine.describe()
    assert {k: described[k] for k in counters} == counters  # heartbeats carry describe()


def test_gpu_seconds_span_denoising_to_decode_only():
    from worker.engine.diffusers_engine import _gpu_seconds, _phase_seconds

    marks = [0.0, 0.5, 0.75, 2.0, 2.25]  # encode 0-0.5, a 0.25 s wait for the main stream, denoise, decode
    assert _gpu_seconds(marks) == 1.5
    assert _phase_seconds(marks)["engine_s"] == 0.5 + 1.25 + 0.25


def test_triton_compile_counter_chains_an_earlier_hook(monkeypatch):
    """Triton cannot run here: a stand-in ``triton.knobs`` module plays its JIT calling the hook."""
    import sys
    import types

    from worker.engine import compiles

    calls = []
    runtime = types.SimpleNamespace(jit_post_compile_hook=lambda **kw: calls.append(kw) or False)
    fake = types.ModuleType("triton")
    fake.knobs = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "triton", fake)
    monkeypatch.setattr(compiles, "_installed", None)
    monkeypatch.setattr(compiles, "_triton_compiles", 0)
    assert compiles.triton_compiles() is None
    assert compiles.install_triton_counter() is True
    assert compiles.install_triton_counter() is True  # once per process: not wrapped twice
    for i in range(3):
        runtime.jit_post_compile_hook(key=i, repr="k", fn=None, compile={}, is_manual_warmup=False,
                                      already_compiled=False)
    assert compiles.triton_compiles() == 3
    assert [c["key"] for c in calls] == [0, 1, 2]


def test_triton_counter_without_triton(monkeypatch):
    import sys

    from worker.engine import compiles

    monkeypatch.setitem(sys.modules, "triton", None)  # import fails, as on a machine without Triton
    monkeypatch.setattr(compiles, "_installed", None)
    assert compiles.install_triton_counter() is False
    assert compiles.triton_compiles() is None


def test_pipeline_loads_without_the_transformer_it_will_replace(cache_dir, monkeypatch):
    """With --fp8-weights the BF16 transformer is never read (the FP8 one from the file takes its place)."""
    from worker.engine.models import load_pipeline, resolve_model

    monkeypatch.setenv("SDFLEET_CACHE_DIR", str(cache_dir))
    _, path = resolve_model("tiny")
    pipe = load_pipeline(path, torch.float32, "cpu", without=("transformer",))
    assert pipe.transformer is None
    assert pipe.text_encoder_3 is not None and pipe.vae is not None and pipe.vae_scale_factor == 8


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, event, **kw):
        self.lines.append(("info", event, kw))

    def warning(self, event, **kw):
        self.lines.append(("warning", event, kw))


def test_fp8_text_encoder_switch_needs_fp8_precision(cache_dir, monkeypatch):
    monkeypatch.setenv("SDFLEET_CACHE_DIR", str(cache_dir))
    log = _Log()
    e = DiffusersEngine(EngineOptions(model="tiny", device="cpu", precision="fp32", fp8_text_encoder=True), log=log)
    e.load()
    assert type(e.pipe.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q) is torch.nn.Linear
    off = [kw for level, event, kw in log.lines if event == "fp8 text encoder off"]
    assert off and "precision is fp32, not fp8" in off[0]["reason"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fp8_text_encoder_is_converted_before_the_pipeline_moves(cache_dir, monkeypatch):
    from tests.fp8_cpu import cpu_rowwise_scaled_mm
    from worker.engine import models, precision
    from worker.engine.fp8.linear import Fp8Linear

    if not cpu_rowwise_scaled_mm():
        pytest.skip("this torch's CPU _scaled_mm has no row-wise scales (runs in CI)")
    monkeypatch.setenv("SDFLEET_CACHE_DIR", str(cache_dir))
    # FP8 on the CPU (the tiny model), as an FP8 GPU would resolve it
    monkeypatch.setattr(precision, "resolve_precision", lambda requested, device: ("fp8", "test: fp8 on the CPU"))
    seen = {}
    real_load = models.load_pipeline

    def load(path, dtype, device, without=(), prepare=None):
        def spy(pipe):
            prepare(pipe)
            seen["converted_before_move"] = isinstance(
                pipe.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q, Fp8Linear)
        return real_load(path, dtype, device, without, prepare=spy if prepare else None)

    monkeypatch.setattr("worker.engine.diffusers_engine.load_pipeline", load)
    images = {}
    for switch in (False, True):
        e = DiffusersEngine(EngineOptions(model="tiny", device="cpu", precision="fp8", fp8_text_encoder=switch))
        e.load()
        key = BatchKey(model=e.model_name, width=128, height=128, steps=2, guidance_scale=4.5)
        images[switch] = e.generate(key, [GenerationRequest("a", "a red fox", "", 7)]).wait().images[0]
    assert seen == {"converted_before_move": True}
    t5 = e.pipe.text_encoder_3.encoder.block[0]
    assert isinstance(t5.layer[0].SelfAttention.o, Fp8Linear)
    ff = t5.layer[-1].DenseReluDense  # the tiny T5's d_ff is 37: its FF layers stay unquantized
    assert type(ff.wi) is torch.nn.Linear and type(ff.wo) is torch.nn.Linear
    assert images[True].shape == images[False].shape
    assert not np.array_equal(images[True], images[False])  # the encoder did change (FP8 rounding)


def test_inplace_vae_activations_give_the_same_pixels(engine):
    from worker.engine.diffusers_engine import inplace_activations

    decoder = engine.pipe.vae.decoder
    assert engine.options.inplace_vae_activations
    assert all(m.inplace for m in decoder.modules() if isinstance(m, torch.nn.SiLU))
    z = torch.randn(1, engine.pipe.vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        fast = engine.pipe.vae.decode(z, return_dict=False)[0]
        n = inplace_activations(decoder, on=False)
        try:
            plain = engine.pipe.vae.decode(z, return_dict=False)[0]
        finally:
            inplace_activations(decoder, on=True)
    assert n > 0 and torch.equal(fast, plain)


def test_channels_last_vae_gives_the_same_images(cache_dir, monkeypatch, engine):
    monkeypatch.setenv("SDFLEET_CACHE_DIR", str(cache_dir))
    e = DiffusersEngine(EngineOptions(model="tiny", device="cpu", precision="fp32", channels_last_vae=True))
    e.load()
    conv = e.pipe.vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    key = BatchKey(model=e.model_name, width=128, height=128, steps=2, guidance_scale=4.5)
    reqs = [GenerationRequest("a", "a red fox", "", 7)]
    got = e.generate(key, reqs).wait().images[0]
    want = engine.generate(key, reqs).wait().images[0]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # CPU conv kernels differ by layout


def test_worker_captures_buckets_up_to_its_max_batch():
    from worker.app import batch_buckets

    assert batch_buckets(1) == (1,)
    assert batch_buckets(4) == (1, 2, 4)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)


def test_fp8_text_encoder_without_t5_logs_and_boots():
    import types

    log = _Log()
    e = DiffusersEngine(EngineOptions(model="tiny", device="cpu", fp8_text_encoder=True), log=log)
    e._text_encoder_to_fp8(types.SimpleNamespace(text_encoder_3=None))  # SD3 loaded without its T5
    assert [kw["reason"] for _, event, kw in log.lines if event == "fp8 text encoder off"] == [
        "this model has no T5 text encoder (text_encoder_3)"]


def test_worker_flags_turn_each_speed_up_off(monkeypatch):
    # one switch per speed-up on the worker's command line, reaching the engine's options
    from sdfleet import cli
    from sdfleet.settings import Settings
    from worker import app

    seen = {}
    monkeypatch.setattr(app, "run_worker", lambda settings, options: seen.setdefault("o", options) and 0)
    parser = cli.build_parser()
    cli.cmd_worker(parser.parse_args(["worker"]), Settings())
    assert seen.pop("o").engine_extra.keys() == {"null_delay_s", "null_crash_prompt", "null_hang_prompt"}
    args = parser.parse_args(["worker", "--no-adaln-all-steps", "--no-text-encoder-graphs", "--no-fused-quant",
                              "--no-cuda-graphs"])
    cli.cmd_worker(args, Settings())
    extra = seen["o"].engine_extra
    assert extra["fp8_switches"] == {"adaln_all_steps": False, "fused_quant": False}
    assert extra["text_encoder_graphs"] is False and extra["cuda_graphs"] is False
    from worker.engine.diffusers_engine import EngineOptions
    from worker.engine.fp8 import Fp8Options

    assert not Fp8Options(**extra["fp8_switches"]).adaln_all_steps
    seen.clear()
    cli.cmd_worker(parser.parse_args(["worker", "--fp8-attention-kernel", "gluon"]), Settings())
    assert seen.pop("o").engine_extra["fp8_switches"] == {"attention_kernel": "gluon"}
    assert Fp8Options().attention_kernel == "triton"
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--fp8-attention-kernel", "cuda"])
    assert not EngineOptions(**{k: v for k, v in extra.items() if not k.startswith("null_")}).text_encoder_graphs
    assert EngineOptions().text_encoder_graphs  # on by default: measured exact and faster (docs/PERFORMANCE.md)
