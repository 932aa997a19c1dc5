"""FP8 T5-XXL: the text encoder's linears on the engine's :class:`~worker.engine.fp8.linear.Fp8Linear`.

T5-XXL is the largest part of an SD3.5 worker's memory: 4.6 G linear weights, about 9 GiB in BF16 (more
when transformers keeps the feed-forward's ``wo`` in fp32, as it does when it loads one in fp16). In E4M3
with one scale per output channel they take half as many bytes as BF16. The embedding table, the RMS norms
and the relative position bias stay as they are, and so do the CLIP encoders (they are small, and their
pooled output feeds every AdaLN modulation).

Same numerics as the transformer's FP8 linears: activations quantized per row (Triton on CUDA), cuBLASLt
GEMM with fp32 accumulation, output in the dtype the replaced layer produced (so an fp32 ``wo`` keeps the
residual stream in fp32, as transformers runs it). Layers whose widths are not multiples of 16 stay as
they are.

The encoder runs once per batch, not per denoising step, so this buys memory, not speed. Offered as a switch
(``EngineOptions.fp8_text_encoder``, ``sdfleet worker --fp8-text-encoder``), off by default: the accuracy
figures in docs/PERFORMANCE.md come from random weights, which lack the outlier channels real T5
checkpoints have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdfleet.errors import EngineError

from .linear import Fp8Linear

#: the gated feed-forward's activations transformers names for T5 v1.1 / T5-XXL
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _fp8(lins: torch.nn.Linear | list[torch.nn.Linear], device, out_dtype: torch.dtype) -> torch.nn.Module:
    """The layer's weights quantized on ``device`` (BF16/fp32 weights copied there one layer at a time).

    A layer whose widths are not multiples of 16 (cuBLASLt's FP8 GEMM needs them) stays as it is.
    """
    lins = lins if isinstance(lins, list) else [lins]
    if any(m.bias is not None for m in lins):
        raise EngineError("FP8 text encoder: T5 linears have no bias; this checkpoint's do")
    if any(m.in_features % 16 or m.out_features % 16 for m in lins):
        return lins[0] if len(lins) == 1 else _Concat(lins)
    staged = []
    for m in lins:
        s = torch.nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        s.weight = torch.nn.Parameter(m.weight.detach().to(device), requires_grad=False)
        staged.append(s)
    return Fp8Linear.from_linear(staged, out_dtype=out_dtype)


class _Concat(torch.nn.Module):
    """Unquantized linears sharing their input, outputs concatenated (what ``_fp8`` leaves of an odd width)."""

    def __init__(self, lins: list[torch.nn.Linear]):
        super().__init__()
        self.parts = torch.nn.ModuleList(lins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], dim=-1)


def _wo(ff, device) -> tuple[torch.nn.Module, torch.dtype]:
    """The FF's output layer, and the dtype the original returned. An fp32 ``wo`` (transformers keeps it so
    when it loads in fp16) gets a bf16-out FP8 GEMM and a cast: row-wise scaled GEMMs with fp32 output exist
    only on some GPUs."""
    dtype = ff.wo.weight.dtype
    return _fp8(ff.wo, device, torch.bfloat16 if dtype == torch.float32 else dtype), dtype


class Fp8GatedFeedForward(torch.nn.Module):
    """T5's ``T5DenseGatedActDense``: ``wo(gelu_tanh(wi_0 x) * wi_1 x)``, with wi_0 and wi_1 as one GEMM."""

    def __init__(self, ff, device):
        super().__init__()
        self.d_ff = ff.wi_0.out_features
        dtype = ff.wi_0.weight.dtype
        self.wi = _fp8([ff.wi_0, ff.wi_1], device, dtype)
        self.wo, self.out_dtype = _wo(ff, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, linear = self.wi(x).split(self.d_ff, dim=-1)
        h = F.gelu(gate, approximate="tanh") * linear
        return self.wo(h.to(self.wo.weight.dtype) if type(self.wo) is torch.nn.Linear else h).to(self.out_dtype)


class Fp8FeedForward(torch.nn.Module):
    """T5's ungated ``T5DenseActDense`` (original T5): ``wo(act(wi x))``."""

    def __init__(self, ff, device):
        super().__init__()
        self.act = ff.act
        self.wi = _fp8(ff.wi, device, ff.wi.weight.dtype)
        self.wo, self.out_dtype = _wo(ff, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi(x))
        return self.wo(h.to(self.wo.weight.dtype) if type(self.wo) is torch.nn.Linear else h).to(self.out_dtype)


def _blocks(t5) -> list:
    try:
        return list(t5.encoder.block)
    except AttributeError:
        raise EngineError(f"FP8 text encoder: expected a transformers T5EncoderModel, got {type(t5).__name__}; "
                          "turn fp8_text_encoder off for this model") from None


def fp8_text_encoder(t5, device: str | torch.device | None = None):
    """Convert a transformers ``T5EncoderModel`` in place (returns it): every linear of every block FP8.

    ``device``: where the FP8 weights go (default: where the model is). A model still on the CPU is
    converted one layer at a time on ``device``, so the BF16 encoder never has to fit on the GPU whole.
    The rest of the model (embeddings, norms) stays where it is: move it with ``t5.to(device)``.
    """
    blocks = _blocks(t5)
    device = torch.device(device) if device is not None else next(t5.parameters()).device
    act = getattr(getattr(t5, "config", None), "dense_act_fn", "gelu_new")
    for blk in blocks:
        attn = blk.layer[0].SelfAttention
        for name in ("q", "k", "v", "o"):
            lin = getattr(attn, name)
            if not isinstance(lin, Fp8Linear):
                setattr(attn, name, _fp8(lin, device, lin.weight.dtype))
        ff_layer = blk.layer[-1]
        ff = ff_layer.DenseReluDense
        if isinstance(ff, (Fp8GatedFeedForward, Fp8FeedForward)):
            continue
        if hasattr(ff, "wi_0"):
            if act not in _GELU_TANH:
                raise EngineError(f"FP8 text encoder: gated feed-forward with activation {act!r}; only the "
                                  f"tanh GELU of T5 v1.1 ({', '.join(_GELU_TANH)}) is supported")
            ff_layer.DenseReluDense = Fp8GatedFeedForward(ff, device)
        else:
            ff_layer.DenseReluDense = Fp8FeedForward(ff, device)
    return t5


def linear_weight_bytes(t5) -> dict[str, int]:
    """Bytes of the encoder's block linears, FP8 (weights + scales) and not, and of everything else."""
    fp8 = sum(m.weight.nbytes + m.weight_scale.nbytes for m in t5.modules() if isinstance(m, Fp8Linear))
    other = sum(t.nbytes for t in t5.parameters()) + sum(
        b.nbytes for mod in t5.modules() if not isinstance(mod, Fp8Linear) for b in mod.buffers(recurse=False))
    return {"fp8_linears": fp8, "other": other}
