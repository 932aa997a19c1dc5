"""The switches of the FP8 engine: one per speed-up, so each can be measured alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sdfleet.errors import ConfigError
from sdfleet.jobs import MAX_SIDE

#: Linear layer types of an MMDiT block (what ``bf16_layers`` may name), image stream then text stream.
BLOCK_LAYER_TYPES = (
    "attn_qkv", "attn_out", "attn2_qkv", "attn2_out", "ff_up", "ff_down",
    "context_qkv", "context_out", "context_ff_up", "context_ff_down",
    "adaln",  # norm1 / norm1_context modulation linears (M = batch rows: a GEMV)
)
#: Layers outside the blocks. The patch embedder (a conv) and the norms never become FP8.
MODEL_LAYER_TYPES = ("context_embedder", "time_text_embed", "norm_out", "proj_out")
LAYER_TYPES = BLOCK_LAYER_TYPES + MODEL_LAYER_TYPES

#: Measured default (docs/PERFORMANCE.md, "FP8 engine"): embedders and the final projection stay BF16.
#: AdaLN modulation is FP8 by default: kept in BF16 it is a third of the weights, and the memory target
#: (<= 55% of BF16) cannot be met; its one-step error is reported separately by the bench.
DEFAULT_BF16_LAYERS = frozenset({"context_embedder", "time_text_embed", "norm_out", "proj_out"})


#: The FP8 attention kernels of the engine's path (``Fp8Options.attention_kernel``).
ATTENTION_KERNELS = ("triton", "gluon")

#: The options that shape the converted weights (what ``sdfleet quantize`` writes into its manifest); the others
#: are runtime switches, chosen by whoever loads the weights.
WEIGHT_OPTIONS = ("fp8_linears", "bf16_layers", "max_image_side")


@dataclass(frozen=True)
class Fp8Options:
    """What :func:`worker.engine.fp8.apply_fp8` does to a transformer.

    fp8_linears: swap the blocks' linears for :class:`Fp8Linear` (off: the blocks stay BF16, and only the
        attention switch below applies).
    fused_quant: Triton kernels quantize inside the op that produces the activation (LayerNorm + AdaLN
        modulate -> FP8, gated residual + LayerNorm + modulate -> FP8, GELU -> FP8, attention output
        -> FP8) and do the q/k RMSNorm + head layout in one pass. Off: the same maths in torch ops.
    fp8_attention: FP8 flash attention (``worker.engine.fp8.attention``); off, or if it is missing or
        fails: ``torch.nn.functional.scaled_dot_product_attention`` (cuDNN). On by default: measured
        one-step cosine vs BF16 0.99999 on Medium and Large, 28-step latent cosine 0.99998.
    fused_attention_io: with fp8_attention and fused_quant: K is quantized in the q/k-norm pass (no separate
        K pass) and V with one scale per batch element, so the attention kernel writes the output
        projections' FP8 input directly (no BF16 output, no row-amax pass over it). Off: the FP8 kernel
        takes bf16 q/k/v and returns bf16, and a separate kernel quantizes its output.
    cuda_graphs: the engine captures the denoising step per shape bucket (``worker.engine.graphs``);
        read by the engine, not by ``apply_fp8``.
    fast_accum: cuBLASLt fast FP8 accumulation (``use_fast_accum``).
    text_stream: in a CUDA graph, run each block's text-stream kernels (its norms, q/k/v, the text rows of
        the attention, output projection and feed-forward) on a second CUDA stream beside the image
        stream's (``blocks.TextStream``).
    adaln_all_steps: the engine computes every step's AdaLN modulations before a denoising loop's first
        step (``worker.engine.fp8.adaln.AdaLNPlan``): they depend only on the timestep and the pooled text,
        so a loop of up to 16 transformer rows a step streams the modulation weights (a third of Large's)
        once per 16 rows of all its steps instead of once per step, the same values bit for bit (larger
        calls, or fast_accum off: one pass a step, as without it). Read by the engine, and by a graph runner
        when it is made (its graphs read the step's modulations from a buffer the engine fills; changing
        the switch later with set_runtime_options does not change graphs already captured).
    attention_kernel: with fp8_attention, fused_quant and fused_attention_io (else it has no effect), which FP8
        attention kernel runs the joint attention:
        ``"triton"`` (``attention.py``) or ``"gluon"`` (``attention_gluon.joint_attention``: the same scheme and
        output on a software-pipelined Gluon kernel, Hopper and head_dim 64 only; elsewhere the Triton kernel
        runs, and the reason is logged). Triton by default: on the engine's inputs the Gluon kernel measured
        3-4% slower (docs/PERFORMANCE.md, "Attention, 2026-12-03 (second pass)").
    bf16_layers: layer types (``LAYER_TYPES``) that stay BF16.
    ff_chunk_rows: with fused_quant, the image stream's feed-forward runs this many rows (tokens) at a time
        when it has more: its hidden activation, 4x the model width in bf16 and again in E4M3, is the largest
        tensor of the step, and a CUDA graph keeps its step's largest working set for good. Measured
        (docs/PERFORMANCE.md, "Memory"); 0 turns it off.
    max_image_side: the largest image side (pixels) the converted model must serve; the sin-cos position
        table (SD3's ``pos_embed``, a BF16 buffer of up to 384 x 384 positions) is cut to its centre part
        that such images use, exactly what the uncut table would give them. 0 keeps the whole table.
        Default: the job contract's maximum (2048 px = 128 x 128 patches), so Medium's table goes from
        0.42 GiB to 0.05 GiB.
    """

    fp8_linears: bool = True
    fused_quant: bool = True
    fp8_attention: bool = True
    fused_attention_io: bool = True
    cuda_graphs: bool = True
    fast_accum: bool = True
    text_stream: bool = True
    ff_chunk_rows: int = 4096
    adaln_all_steps: bool = True
    attention_kernel: str = "triton"
    bf16_layers: frozenset[str] = field(default=DEFAULT_BF16_LAYERS)
    max_image_side: int = MAX_SIDE

    def __post_init__(self) -> None:
        object.__setattr__(self, "bf16_layers", frozenset(self.bf16_layers))
        if not isinstance(self.max_image_side, int) or self.max_image_side < 0:
            raise ConfigError(f"Fp8Options.max_image_side: {self.max_image_side!r}; use a pixel count such as "
                              f"{MAX_SIDE}, or 0 to keep the whole position table")
        if isinstance(self.ff_chunk_rows, bool) or not isinstance(self.ff_chunk_rows, int) or self.ff_chunk_rows < 0:
            raise ConfigError(f"Fp8Options.ff_chunk_rows: {self.ff_chunk_rows!r}; use a row count such as 4096, "
                              "or 0 to run the feed-forward whole")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError(f"Fp8Options.attention_kernel: {self.attention_kernel!r}; use one of "
                              f"{', '.join(ATTENTION_KERNELS)}")
        unknown = sorted(self.bf16_layers - set(LAYER_TYPES))
        if unknown:
            raise ConfigError(f"Fp8Options.bf16_layers: unknown layer type(s) {unknown}; "
                              f"choose from {', '.join(LAYER_TYPES)}")

    def fp8(self, layer_type: str) -> bool:
        """Whether a layer of this type becomes FP8."""
        return self.fp8_linears and layer_type not in self.bf16_layers

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["bf16_layers"] = sorted(self.bf16_layers)
        return d

    def weight_dict(self) -> dict[str, object]:
        """``to_dict`` of the ``WEIGHT_OPTIONS`` only: a manifest that names no runtime switch stays readable by
        an sdfleet that lacks a switch added later (``from_dict`` refuses names it does not know)."""
        d = self.to_dict()
        return {k: d[k] for k in WEIGHT_OPTIONS}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Fp8Options:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"Fp8Options: unknown option(s) {unknown}; known: {', '.join(sorted(names))}")
        return cls(**d)  # type: ignore[arg-type]
