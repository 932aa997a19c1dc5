"""Building and loading SD3 pipelines: the built-in ``tiny`` model and local SD3.5 directories.

``tiny`` is the real diffusers ``StableDiffusion3Pipeline`` (MMDiT transformer, three text encoders,
VAE, flow-matching scheduler) built from a tiny config with random weights and byte-level tokenizers
made here, so every code path runs on a CPU in seconds with no model hub. Its images are noise.
It is built once and cached on disk (``SDFLEET_CACHE_DIR``, default ``~/.cache/sdfleet``).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import torch

from sdfleet.errors import EngineError

TINY = "tiny"
_TINY_VERSION = "v1"  # bump when the tiny config changes, so stale caches are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("SDFLEET_CACHE_DIR") or Path.home() / ".cache" / "sdfleet")


def _byte_tokenizer(bos: str | None, eos: str, pad: str, max_length: int):
    """A byte-level tokenizer with no merges: every UTF-8 byte is a token. Deterministic, no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = [pad, eos, "<unk>"] + ([bos] if bos else [])
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    single = (f"{bos} $A {eos}" if bos else f"$A {eos}")
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in specials if t != "<unk>" and t != pad])
    kwargs = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, unk_token="<unk>",
                                   model_max_length=max_length, **kwargs)


def clip_tokenizer(max_length: int = 77):
    """The CLIP-side tokenizer of every model built here (CLIP-L and CLIP-G share it, as in SD3.5)."""
    return _byte_tokenizer("<|startoftext|>", "<|endoftext|>", "<|pad|>", max_length)


def t5_tokenizer(max_length: int = 256):
    return _byte_tokenizer(None, "</s>", "<pad>", max_length)


#: the tiny pipeline's component configs (diffusers' SD3 test sizes, rms qk-norm, one dual-attention block)
TINY_CLIP: dict = dict(hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                       num_hidden_layers=3, hidden_act="gelu", projection_dim=32, max_position_embeddings=77)
TINY_T5: dict = dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, relative_attention_num_buckets=8)
TINY_TRANSFORMER: dict = dict(
    sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
    pos_embed_max_size=256, dual_attention_layers=(0,), qk_norm="rms_norm")
TINY_VAE: dict = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
    shift_factor=0.0609, scaling_factor=1.5035)


def clip_token_ids(tok) -> dict:
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def t5_token_ids(tok) -> dict:
    return dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)


def build_tiny_pipeline(seed: int = 0):
    """The tiny SD3 pipeline with random weights (seeded, so every machine builds the same model)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok = clip_tokenizer()
    t5_tok = t5_tokenizer()
    clip_cfg = dict(TINY_CLIP, vocab_size=len(clip_tok), **clip_token_ids(clip_tok))
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
    text_encoder_3 = T5EncoderModel(T5Config(**TINY_T5, vocab_size=len(t5_tok), **t5_token_ids(t5_tok)))
    transformer = SD3Transformer2DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKL(**TINY_VAE)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tok)


def tiny_model_dir() -> Path:
    """The cached tiny model directory, built on first use (safe when several workers start at once)."""
    root = cache_dir() / f"tiny-sd3-{_TINY_VERSION}"
    if (root / "model_index.json").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".tiny-{_TINY_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "model_index.json").exists():
            tmp = root.with_name(root.name + f".tmp{os.getpid()}")
            build_tiny_pipeline().save_pretrained(tmp)
            os.replace(tmp, root)
    return root


def resolve_model(model: str) -> tuple[str, Path]:
    """(name, directory) for ``tiny`` or a local diffusers SD3 directory."""
    if model == TINY:
        return TINY, tiny_model_dir()
    path = Path(model).expanduser()
    if not (path / "model_index.json").is_file():
        raise EngineError(
            f"--model {model}: not 'tiny' and not a diffusers model directory (no model_index.json there); "
            "pass --model tiny or the path of a local SD3.5 download"
        )
    return path.name, path


def load_pipeline(path: Path, dtype: torch.dtype, device: str, without: tuple[str, ...] = (), prepare=None):
    """The pipeline from a diffusers directory; components named in ``without`` are not read (left None).

    ``prepare(pipe)`` runs while the pipeline is still on the CPU, before it moves to ``device``.
    """
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, **{name: None for name in without})
    pipe.set_progress_bar_config(disable=True)
    if prepare is not None:
        prepare(pipe)
    return pipe.to(device)
