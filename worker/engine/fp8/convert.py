"""Turn a diffusers ``SD3Transformer2DModel`` into the FP8 engine's transformer, in place."""

from __future__ import annotations

import logging

import torch

from sdfleet.errors import EngineError

from .blocks import AdaLNBank, Fp8JointBlock, make_linear
from .linear import Fp8Linear
from .options import Fp8Options
from .processor import Fp8JointAttnProcessor

log = logging.getLogger(__name__)

#: attribute set on a converted transformer: the options it was converted with
MARKER = "_sdfleet_fp8_options"


def _model_linears(transformer) -> dict[str, list[tuple[torch.nn.Module, str]]]:
    """(parent, attribute) of every linear outside the blocks, by layer type."""
    tte = transformer.time_text_embed
    return {
        "context_embedder": [(transformer, "context_embedder")],
        "time_text_embed": [(tte.timestep_embedder, "linear_1"), (tte.timestep_embedder, "linear_2"),
                            (tte.text_embedder, "linear_1"), (tte.text_embedder, "linear_2")],
        "norm_out": [(transformer.norm_out, "linear")],
        "proj_out": [(transformer, "proj_out")],
    }


def _check_shapes(transformer) -> None:
    # cuBLASLt FP8 needs K and N multiples of 16
    for name, m in transformer.transformer_blocks.named_modules():
        if isinstance(m, torch.nn.Linear) and (m.in_features % 16 or m.out_features % 16):
            raise EngineError(f"transformer_blocks.{name}: {m.in_features}x{m.out_features} is not a multiple "
                              "of 16, which FP8 GEMMs need; run this model with --precision bf16")


#: SD3's VAE halves the resolution three times (``pipe.vae_scale_factor``)
VAE_SCALE_FACTOR = 8


def crop_position_table(transformer, max_image_side: int, vae_scale_factor: int = VAE_SCALE_FACTOR) -> int | None:
    """Keep the centre of SD3's sin-cos position table that images up to ``max_image_side`` pixels use.

    diffusers crops the table around its centre for each latent size (``PatchEmbed.cropped_pos_embed``:
    ``top = (max_size - h) // 2``). Cutting it to ``keep`` positions a side, with ``max_size - keep`` even,
    gives every ``h <= keep`` the same rows: ``(max_size - h) // 2 == (max_size - keep) // 2 + (keep - h) // 2``.
    Returns the new side, or None when nothing was cut. Larger images then fail with diffusers' own error.
    """
    pe = getattr(transformer, "pos_embed", None)
    old = getattr(pe, "pos_embed_max_size", None)
    if not max_image_side or not old or getattr(pe, "pos_embed", None) is None:
        return None
    keep = -(-max_image_side // (vae_scale_factor * pe.patch_size))
    keep += (old - keep) % 2
    if keep >= old:
        return None
    off = (old - keep) // 2
    table = pe.pos_embed.reshape(1, old, old, -1)[:, off:off + keep, off:off + keep, :]
    pe.pos_embed = table.reshape(1, keep * keep, -1).contiguous()  # replaces the registered buffer
    pe.pos_embed_max_size = keep
    return keep


def apply_fp8(transformer, options: Fp8Options | None = None, *, quantize: bool = True):
    """Convert ``transformer`` in place as ``options`` say and return it.

    ``quantize=False`` builds the FP8 structure with empty buffers, for loading a quantized checkpoint.
    """
    options = options or Fp8Options()
    if getattr(transformer, MARKER, None) is not None:
        raise EngineError("this transformer is already converted to FP8; build a fresh one to convert again")
    if options.fp8_linears:
        _check_shapes(transformer)
        blocks = transformer.transformer_blocks
        for i in range(len(blocks)):
            blocks[i] = Fp8JointBlock(blocks[i], options, quantize=quantize)
            # each block's output goes straight to the next block, the last one's to norm_out
            blocks[i].defer_residual = i < len(blocks) - 1
        # all blocks' AdaLN modulations in one GEMM per call; the model holds its weights
        bank = AdaLNBank.merge([blk.adaln_bank for blk in blocks])
        transformer.adaln_bank = bank.linear
        for i, blk in enumerate(blocks):
            blk.adaln_bank, blk.adaln_index = bank, i
        for layer_type, places in _model_linears(transformer).items():
            if options.fp8(layer_type):
                for parent, attr in places:
                    lin = getattr(parent, attr)
                    if lin.in_features % 16 or lin.out_features % 16:
                        continue  # e.g. proj_out of a small patch: stays BF16
                    setattr(parent, attr, make_linear(lin, True, options, quantize=quantize))
    elif options.fp8_attention:
        transformer.set_attn_processor(Fp8JointAttnProcessor(fp8=True))
    crop_position_table(transformer, options.max_image_side)
    setattr(transformer, MARKER, options)
    if quantize and any(p.is_cuda for p in transformer.parameters()):
        torch.cuda.empty_cache()
    return transformer


def set_runtime_options(transformer, options: Fp8Options) -> None:
    """Change the switches that need no re-quantization (fused_quant, fp8_attention, fused_attention_io,
    fast_accum, text_stream, ff_chunk_rows, adaln_all_steps, attention_kernel: CUDA graphs captured before
    keep the setting they were captured with)."""
    old = getattr(transformer, MARKER, None)
    if old is None:
        raise EngineError("transformer is not converted; call apply_fp8 first")
    if (old.fp8_linears, old.bf16_layers, old.max_image_side) != (options.fp8_linears, options.bf16_layers,
                                                                   options.max_image_side):
        raise EngineError("fp8_linears, bf16_layers and max_image_side change the weights: convert or quantize again")
    for m in transformer.modules():
        if isinstance(m, Fp8Linear):
            m.use_triton, m.fast_accum = options.fused_quant, options.fast_accum
        if hasattr(m, "options") and isinstance(m.options, Fp8Options):
            m.options = options
    setattr(transformer, MARKER, options)


def layer_types(transformer) -> dict[str, str]:
    """Qualified name -> 'fp8' or dtype name, for every linear of a converted transformer (for the JSON)."""
    out = {}
    for name, m in transformer.named_modules():
        if isinstance(m, Fp8Linear):
            out[name] = "float8_e4m3fn"
        elif isinstance(m, torch.nn.Linear):
            out[name] = str(m.weight.dtype).removeprefix("torch.")
    return out


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers: what the transformer's weights occupy on the device.

    Tensors sharing storage count once; meta tensors (shapes only: they all report data_ptr 0) count each.
    """
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = id(t) if t.is_meta else t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
