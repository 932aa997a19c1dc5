"""Writing a complete SD3.5 model directory (diffusers layout) with random weights, without any download.

``sdfleet make-model medium DIR`` writes what a download of stabilityai/stable-diffusion-3.5-medium holds,
component by component: ``transformer/``, ``text_encoder/`` (CLIP-L), ``text_encoder_2/`` (CLIP-G),
``text_encoder_3/`` (T5-XXL), ``tokenizer*/`` (byte-level tokenizers made here), ``vae/``, ``scheduler/``
and ``model_index.json``, each written by the component's own ``save_pretrained``. The released configs
(:mod:`worker.engine.sd35_configs`) give the FLOPs and bytes of the real checkpoints, so a worker, the
quantizer and the benchmarks load the directory exactly as they would load a real download.

Memory: each model is built with its parameters on the meta device (accelerate's ``init_empty_weights``),
then allocated once in the target dtype and filled in place, written, and dropped before the next one,
so writing Large needs about its largest component (the 8B transformer: 16 GB in BF16), not twice the
model. Filling on a GPU (``device="cuda"``) is much faster than on the CPU; the shards are then copied to
the host one tensor at a time while they are written.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdfleet.errors import ConfigError

MODELS = ("tiny", "medium", "large")
#: written last, so a directory with it is complete (an interrupted write is redone)
INDEX = "model_index.json"
#: the pipeline's components in the order they are written (the largest first: a full disk fails early)
COMPONENTS = ("transformer", "text_encoder_3", "text_encoder_2", "text_encoder", "vae", "scheduler",
              "tokenizer", "tokenizer_2", "tokenizer_3")


def _specs(name: str) -> dict[str, Any]:
    """Component configs of one model: the released SD3.5 ones, or the built-in tiny pipeline's."""
    from worker.engine import models, sd35_configs

    if name == "tiny":
        return {"transformer": models.TINY_TRANSFORMER, "clip_l": models.TINY_CLIP, "clip_g": models.TINY_CLIP,
                "t5": models.TINY_T5, "vae": models.TINY_VAE, "scheduler": {}, "tokenizer_vocab": True}
    return {"transformer": sd35_configs.TRANSFORMER[name], "clip_l": sd35_configs.CLIP_L,
            "clip_g": sd35_configs.CLIP_G, "t5": sd35_configs.T5_XXL, "vae": sd35_configs.VAE,
            "scheduler": sd35_configs.SCHEDULER, "tokenizer_vocab": False}


def is_complete(dst: str | os.PathLike) -> bool:
    return (Path(dst) / INDEX).is_file()


def write_model_dir(name: str, dst: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                    device: str = "cpu", seed: int = 0, overwrite: bool = False,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write model ``name`` (tiny, medium, large) to ``dst``; returns a summary (bytes and seconds per part).

    A complete directory (it has ``model_index.json``) is kept unless ``overwrite``; an incomplete one is
    written again from scratch.
    """
    if name not in MODELS:
        raise ConfigError(f"model {name!r}: choose one of {', '.join(MODELS)}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"dtype {dtype}: use bfloat16, float16 or float32")
    dst = Path(dst)
    if is_complete(dst) and not overwrite:
        return {"model": name, "dst": str(dst), "kept": True, "parts": {}}
    if dst.exists():
        if dst.is_file() or (any(dst.iterdir()) and not _looks_like_ours(dst)):
            raise ConfigError(f"DIR {dst}: exists and is not a model directory written here; give an empty or new "
                              "directory (nothing in it was touched)")
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    _quiet()
    spec = _specs(name)
    say = log or (lambda _msg: None)
    objects: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    t_all = time.perf_counter()
    clip_tok, t5_tok = _tokenizers(dst)
    objects.update(tokenizer=clip_tok, tokenizer_2=clip_tok, tokenizer_3=t5_tok)
    builders = _builders(spec, clip_tok, t5_tok)
    for i, component in enumerate(c for c in COMPONENTS if c in builders):
        t0 = time.perf_counter()
        model = random_model(builders[component], dtype=dtype, device=device, seed=seed + i)
        objects[component] = model
        model.save_pretrained(dst / component)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        parts[component] = {"class": type(model).__name__, "bytes": nbytes,
                            "seconds": round(time.perf_counter() - t0, 2)}
        say(f"{component}: {type(model).__name__}, {nbytes / 2**30:.2f} GiB in {parts[component]['seconds']} s")
        objects[component] = _Stub(model)  # drop the weights before the next component is built
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    scheduler = _scheduler(spec)
    scheduler.save_pretrained(dst / "scheduler")
    objects["scheduler"] = scheduler
    (dst / INDEX).write_text(json.dumps(model_index(objects), indent=2, sort_keys=True) + "\n")
    return {"model": name, "dst": str(dst), "kept": False, "dtype": str(dtype).removeprefix("torch."),
            "device": device, "parts": parts, "bytes": sum(p["bytes"] for p in parts.values()),
            "seconds": round(time.perf_counter() - t_all, 2)}


def _looks_like_ours(dst: Path) -> bool:
    """An interrupted write: only component folders of ours inside, nothing else that could be lost."""
    return all(p.name in COMPONENTS for p in dst.iterdir())


class _Stub:
    """Stands in for a written component in ``model_index``: its class and library, not its weights."""

    def __init__(self, obj: Any):
        self.cls = type(obj)


def model_index(objects: dict[str, Any]) -> dict[str, Any]:
    """``model_index.json`` as ``StableDiffusion3Pipeline.save_pretrained`` writes it for these components.

    Every argument of the pipeline's constructor is a key: ``[library, class]`` for a component given,
    ``[null, null]`` for an optional one left out (image encoder, feature extractor).
    """
    import diffusers
    from diffusers import StableDiffusion3Pipeline

    index: dict[str, Any] = {"_class_name": StableDiffusion3Pipeline.__name__,
                             "_diffusers_version": diffusers.__version__}
    for param in list(inspect.signature(StableDiffusion3Pipeline.__init__).parameters)[1:]:
        obj = objects.get(param)
        if obj is None:
            index[param] = [None, None]
            continue
        cls = obj.cls if isinstance(obj, _Stub) else type(obj)
        index[param] = [cls.__module__.split(".")[0], cls.__name__]
    return index


def _tokenizers(dst: Path):
    from worker.engine.models import clip_tokenizer, t5_tokenizer

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    for sub, tok in (("tokenizer", clip_tok), ("tokenizer_2", clip_tok), ("tokenizer_3", t5_tok)):
        tok.save_pretrained(dst / sub)
    return clip_tok, t5_tok


def _builders(spec: dict[str, Any], clip_tok, t5_tok) -> dict[str, Callable[[], Any]]:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from worker.engine.models import clip_token_ids, t5_token_ids

    # The tiny model's vocabulary is its tokenizer's; the released models keep their released vocab sizes
    # (the byte-level ids fit inside them), so embedding tables have the real checkpoints' bytes.
    clip_vocab = {"vocab_size": len(clip_tok)} if spec["tokenizer_vocab"] else {}
    t5_vocab = {"vocab_size": len(t5_tok)} if spec["tokenizer_vocab"] else {}
    clip_ids, t5_ids = clip_token_ids(clip_tok), t5_token_ids(t5_tok)
    return {
        "transformer": lambda: SD3Transformer2DModel(**spec["transformer"]),
        "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**spec["clip_l"], **clip_vocab, **clip_ids)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**spec["clip_g"], **clip_vocab,
                                                                             **clip_ids)),
        "text_encoder_3": lambda: T5EncoderModel(T5Config(**spec["t5"], **t5_vocab, **t5_ids)),
        "vae": lambda: AutoencoderKL(**spec["vae"]),
    }


def _scheduler(spec: dict[str, Any]):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**spec["scheduler"])


def random_model(build: Callable[[], torch.nn.Module], *, dtype: torch.dtype, device: str = "cpu",
                 seed: int = 0) -> torch.nn.Module:
    """``build()`` with parameters on meta, then allocated once on ``device`` in ``dtype`` and filled.

    Buffers (SD3's sin-cos position table, CLIP's position ids) are computed by the constructor as usual
    and kept. Weights of rank >= 2 are uniform in +-0.5/sqrt(fan_in), half of PyTorch's default Linear and
    Conv init (the halving the engine benchmarks apply, so activations stay finite through 38 random
    blocks); rank-1 weights (norm scales) are ones and biases zeros. Tied parameters stay tied.
    """
    from accelerate import init_empty_weights

    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype if dtype.is_floating_point else old)
        with init_empty_weights(include_buffers=False):
            model = build()
    finally:
        torch.set_default_dtype(old)
    buffers = {n: b for n, b in model.named_buffers()}
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
        for n, p in model.named_parameters():
            if p.dtype != dtype and p.is_floating_point():
                p.data = torch.empty(p.shape, dtype=dtype, device=device)
            if p.dim() >= 2:
                bound = 0.5 / math.sqrt(max(1, p[0].numel()))
                p.uniform_(-bound, bound, generator=gen)
            elif n.endswith("bias") or p.dim() == 0:
                p.zero_()
            else:
                p.fill_(1.0)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for b in model.buffers():
        if b.is_floating_point() and b.dtype != dtype:
            b.data = b.data.to(dtype)
    return model.eval().requires_grad_(False)


def _quiet() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
