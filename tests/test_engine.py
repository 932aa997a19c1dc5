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
