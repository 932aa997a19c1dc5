"""Released SD3.5 configs (Medium, Large) and the tiny test config, to build random-weight models offline.

Random weights with the released configs have the FLOPs and bytes of the real checkpoints: what the
benchmarks need where no hub can be reached. Values copied from the released ``config.json`` files of
stabilityai/stable-diffusion-3.5-medium and -large (transformer, vae, text encoders, scheduler).
"""

from __future__ import annotations

from typing import Any

import torch

TRANSFORMER: dict[str, dict[str, Any]] = {
    "medium": dict(attention_head_dim=64, caption_projection_dim=1536, in_channels=16, joint_attention_dim=4096,
                   num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128,
                   dual_attention_layers=tuple(range(13))),
    "large": dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096,
                  num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2,
                  pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128),
    # diffusers' own SD3 test config, plus rms qk-norm and one dual-attention block (every code path)
    "tiny": dict(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                 pooled_projection_dim=64, out_channels=4, qk_norm="rms_norm", dual_attention_layers=(0,)),
}

#: shared by Medium and Large
VAE: dict[str, Any] = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    force_upcast=True, in_channels=3, latent_channels=16, layers_per_block=2, mid_block_add_attention=True,
    norm_num_groups=32, out_channels=3, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    up_block_types=("UpDecoderBlock2D",) * 4, use_post_quant_conv=False, use_quant_conv=False,
)

CLIP_L: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              projection_dim=768, vocab_size=49408, max_position_embeddings=77,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_G: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                              projection_dim=1280, vocab_size=49408, max_position_embeddings=77,
                              hidden_act="gelu", layer_norm_eps=1e-5)
T5_XXL: dict[str, Any] = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                              relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                              dense_act_fn="gelu_new", is_gated_act=True)
SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)

#: tokens the pipeline feeds the transformer: 77 (CLIP) + 256 (T5, max_sequence_length default)
TEXT_TOKENS = 333


def build_transformer(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0, tame: bool = True):
    """A random-weight ``SD3Transformer2DModel`` with a released (or the tiny) config, built on ``device``.

    ``tame`` halves every matrix so activations stay finite through 38 random blocks (as the anchors do).
    """
    from diffusers import SD3Transformer2DModel

    if name not in TRANSFORMER:
        raise KeyError(f"unknown transformer config {name!r}; choose from {sorted(TRANSFORMER)}")
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            m = SD3Transformer2DModel(**TRANSFORMER[name]).eval()
    finally:
        torch.set_default_dtype(old)
    m.to(dtype)  # buffers too (pos_embed), as from_pretrained(dtype=...) leaves them
    m.requires_grad_(False)
    if tame:
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.mul_(0.5)
    return m
