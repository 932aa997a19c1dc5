"""``sdfleet make-model``: the directory it writes is the one diffusers' save_pretrained writes, and it loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, run_cli
from worker.engine.model_dir import model_index, random_model, write_model_dir


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _headers(path: Path) -> dict[str, tuple[str, list[int]]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The tiny pipeline as diffusers itself writes it."""
    from worker.engine.models import build_tiny_pipeline

    dst = tmp_path_factory.mktemp("saved") / "tiny"
    build_tiny_pipeline().save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("written") / "tiny"
    summary = write_model_dir("tiny", dst, dtype=torch.float32)
    assert summary["kept"] is False and set(summary["parts"]) == {
        "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"}
    return dst


def test_layout_equals_what_save_pretrained_writes(saved, written):
    assert _tree(written) == _tree(saved)
    for rel in _tree(saved):
        if rel.endswith(".json"):  # every config, tokenizer file and model_index.json, key for key and value
            assert json.loads((written / rel).read_text()) == json.loads((saved / rel).read_text()), rel
        elif rel.endswith(".safetensors"):  # the same tensors: names, dtypes, shapes
            assert _headers(written / rel) == _headers(saved / rel), rel


def test_bf16_weights_and_a_complete_directory_is_kept(tmp_path):
    dst = tmp_path / "m"
    write_model_dir("tiny", dst)
    for f in dst.rglob("*.safetensors"):
        dtypes = {d for d, _ in _headers(f).values()}
        assert dtypes <= {"BF16", "I64"}, (f, dtypes)  # I64: CLIP's position ids
    assert json.loads((dst / "text_encoder_3" / "config.json").read_text())["dtype"] == "bfloat16"
    assert write_model_dir("tiny", dst)["kept"] is True
    (dst / "model_index.json").unlink()  # interrupted before the end: written again
    assert write_model_dir("tiny", dst)["kept"] is False


def test_refuses_a_directory_it_did_not_write(tmp_path):
    from sdfleet.errors import ConfigError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a model directory written here"):
        write_model_dir("tiny", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_refuses_a_foreign_directory_as_a_usage_error(env, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_cli(["make-model", "tiny", str(tmp_path)], env, timeout=300)
    assert proc.returncode == 2 and f"DIR {tmp_path}: exists and is not a model directory" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_released_configs_and_index_of_medium_and_large():
    """Built on meta only (no weights): each component has its released config; the index names them."""
    from accelerate import init_empty_weights

    from worker.engine import model_dir, sd35_configs
    from worker.engine.models import clip_tokenizer, t5_tokenizer

    for name in ("medium", "large"):
        builders = model_dir._builders(model_dir._specs(name), clip_tokenizer(), t5_tokenizer())
        with init_empty_weights():
            parts = {k: b() for k, b in builders.items()}
        cfg = parts["transformer"].config
        for k, v in sd35_configs.TRANSFORMER[name].items():
            assert (list(cfg[k]) if isinstance(v, tuple) else cfg[k]) == (list(v) if isinstance(v, tuple) else v)
        assert parts["text_encoder_3"].config.d_model == 4096 and parts["text_encoder_3"].config.vocab_size == 32128
        assert parts["text_encoder_2"].config.hidden_size == 1280 and parts["text_encoder"].config.hidden_size == 768
        assert parts["vae"].config.latent_channels == 16
        tok = clip_tokenizer()
        index = model_index({**parts, "scheduler": model_dir._scheduler(model_dir._specs(name)), "tokenizer": tok,
                             "tokenizer_2": tok, "tokenizer_3": t5_tokenizer()})
        assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
        assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
        assert index["image_encoder"] == [None, None] and index["feature_extractor"] == [None, None]
        assert index["tokenizer_3"][0] == "transformers"


def test_random_init_keeps_buffers_and_ties():
    from worker.engine import model_dir
    from worker.engine.models import clip_tokenizer, t5_tokenizer

    builders = model_dir._builders(model_dir._specs("tiny"), clip_tokenizer(), t5_tokenizer())
    t5 = random_model(builders["text_encoder_3"], dtype=torch.bfloat16)
    assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()
    tr = random_model(builders["transformer"], dtype=torch.bfloat16)
    # SD3's sin-cos position table is computed by the constructor, not random
    ref = model_dir._specs("tiny")
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    fresh = SD3Transformer2DModel(**ref["transformer"])
    assert torch.equal(tr.pos_embed.pos_embed, fresh.pos_embed.pos_embed.to(torch.bfloat16))
    w = tr.transformer_blocks[0].attn.to_q.weight
    bound = 0.5 / w.shape[1] ** 0.5
    assert w.dtype == torch.bfloat16 and float(w.abs().max()) <= bound * 1.01 and float(w.std()) > bound / 4
    assert all(not p.is_meta for p in list(tr.parameters()) + list(tr.buffers()))


def test_written_directory_runs_in_the_engine_and_quantizes(written, env, tmp_path):
    from sdfleet.jobs import BatchKey
    from worker.engine.base import GenerationRequest
    from worker.engine.diffusers_engine import DiffusersEngine, EngineOptions

    e = DiffusersEngine(EngineOptions(model=str(written), device="cpu", precision="fp32"))
    e.load()  # the loading path of a real download: StableDiffusion3Pipeline.from_pretrained
    img = e.generate(BatchKey(e.model_name, 256, 256, 2, 4.5), [GenerationRequest("a", "a fox", "", 3)]).wait()
    assert img.images[0].shape == (256, 256, 3) and img.images[0].dtype == np.uint8
    out = tmp_path / "fp8"
    proc = run_cli(["quantize", str(written), str(out), "--device", "cpu"], env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["fp8_layers"] > 0 and (out / "fp8_transformer.safetensors").is_file()


def test_cli_make_model(env, tmp_path):
    dst = tmp_path / "cli-tiny"
    proc = run_cli(["make-model", "tiny", str(dst)], env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["kept"] is False and (dst / "model_index.json").is_file()
    assert "text_encoder_3: T5EncoderModel" in proc.stderr
    bad = run_cli(["make-model", "huge", str(tmp_path / "x")], env)
    assert bad.returncode == 2 and "invalid choice: 'huge'" in bad.stderr
    bad = run_cli(["make-model", "tiny", str(tmp_path / "y"), "--device", "tpu"], env)
    assert bad.returncode == 2 and "--device" in bad.stderr


_PEAK = """
import json, resource, sys, torch
from worker.engine import model_dir
from worker.engine.models import clip_tokenizer, t5_tokenizer
builders = model_dir._builders(model_dir._specs("medium"), clip_tokenizer(), t5_tokenizer())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = model_dir.random_model(builders["text_encoder_2"], dtype=torch.bfloat16)
m.save_pretrained(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"bytes": sum(p.numel() * p.element_size() for p in m.parameters()), "grown": (peak - base) * 1024}))
"""


@pytest.mark.slow
def test_a_component_is_written_in_about_its_own_size(tmp_path):
    """CLIP-G (1.4 GB in BF16): built on meta, allocated once, saved without a copy (not 2x its size)."""
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "clip_g")], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["bytes"] > 1.2e9
    assert r["grown"] < 1.3 * r["bytes"], r
