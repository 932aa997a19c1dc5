"""FP8 linear layer on ``torch._scaled_mm`` (cuBLASLt on Hopper; also runs on the CPU for tests)."""

from __future__ import annotations

import torch

from .quant import E4M3, QTensor, _use_triton, quantize_rows, quantize_weight

#: Up to this many rows (the AdaLN bank's: the transformer batch) a Triton GEMV streams the weights at
#: ~3 TB/s where cuBLASLt's GEMM reached 2.4-2.8 (H100, ``bench/adaln_gemv.py``, docs/PERFORMANCE.md).
GEMV_MAX_ROWS = 16


class Fp8Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with E4M3 weights (one scale per output channel, quantized once) and E4M3
    activations (one scale per row, quantized on the fly unless the producer already did: pass a
    :class:`QTensor`). Output BF16, bias fused into the GEMM.

    Buffers: ``weight`` (N, K) float8_e4m3fn, ``weight_scale`` (N,) float32, ``bias`` (N,) bf16 or absent.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, device=None,
                 out_dtype: torch.dtype = torch.bfloat16, use_triton: bool = True, fast_accum: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = out_dtype
        self.use_triton = use_triton
        self.fast_accum = fast_accum
        self.register_buffer("weight", torch.empty((out_features, in_features), dtype=E4M3, device=device))
        self.register_buffer("weight_scale", torch.ones((out_features,), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros((out_features,), dtype=out_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, lin: torch.nn.Linear | list[torch.nn.Linear], **kw) -> Fp8Linear:
        """Quantize one linear, or several with the same input concatenated along N (fused q/k/v)."""
        lins = lin if isinstance(lin, list) else [lin]
        w = torch.cat([m.weight.detach() for m in lins], 0)
        has_bias = lins[0].bias is not None
        m = cls(w.shape[1], w.shape[0], bias=has_bias, device=w.device, **kw)
        m.weight, m.weight_scale = quantize_weight(w)
        if has_bias:
            m.bias = torch.cat([x.bias.detach() for x in lins], 0).to(m.out_dtype)
        return m

    @classmethod
    def concat(cls, mods: list[Fp8Linear]) -> Fp8Linear:
        """One layer with the outputs of ``mods`` (same input width) one after another; nothing re-quantized."""
        m0 = mods[0]
        if any(m.in_features != m0.in_features or (m.bias is None) != (m0.bias is None) for m in mods):
            raise ValueError("Fp8Linear.concat: layers differ in input width or bias")
        m = cls(m0.in_features, sum(x.out_features for x in mods), bias=m0.bias is not None, device="meta",
                out_dtype=m0.out_dtype, use_triton=m0.use_triton, fast_accum=m0.fast_accum)
        m.weight = torch.cat([x.weight for x in mods])
        m.weight_scale = torch.cat([x.weight_scale for x in mods])
        if m0.bias is not None:
            m.bias = torch.cat([x.bias for x in mods])
        return m

    def uses_gemv(self, rows: int, like: torch.Tensor) -> bool:
        """Whether a call of ``rows`` rows (on ``like``'s device) runs the Triton GEMV: one 16-row tile and one
        tuned configuration for every such call, so a row's result never depends on how many rows came
        with it (cuBLASLt may pick another algorithm for another row count)."""
        return rows <= GEMV_MAX_ROWS and self.fast_accum and _use_triton(like, self.use_triton)

    def forward(self, x: torch.Tensor | QTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: a contiguous (rows, out_features) tensor of ``out_dtype`` to write into (returned as is)."""
        if not isinstance(x, QTensor):
            x = quantize_rows(x, use_triton=self.use_triton)
        # (fast accumulation only, as the Triton FP8 dot does on Hopper; fast_accum off stays on cuBLASLt)
        if self.uses_gemv(x.data.shape[0], x.data):
            from . import kernels

            y = kernels.gemv(x, self.weight, self.weight_scale, self.bias, self.out_dtype)
            if out is not None:
                return out.copy_(y.reshape(out.shape))
            return y.reshape(*x.shape[:-1], self.out_features)
        w_scale = self.weight_scale.reshape(1, -1)
        kw = {"out": out} if out is not None else {}
        y = torch._scaled_mm(x.data, self.weight.t(), scale_a=x.scale, scale_b=w_scale, bias=self.bias,
                             out_dtype=self.out_dtype, use_fast_accum=self.fast_accum, **kw)
        return y if out is not None else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
