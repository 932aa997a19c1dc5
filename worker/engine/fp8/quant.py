"""Per-row E4M3 quantization, fused into the op that produces the activation.

Every function here has two implementations with one contract: a Triton kernel (one read of the input,
one write of the FP8 tensor and its per-row scales) used on CUDA when Triton is importable and
``use_triton`` is true, and a torch reference used on the CPU, in tests and as the "unfused" baseline.

Scales are float32 of shape ``(rows, 1)``: ``x ~= q.float() * scale``. ``scale = amax / 448`` with
amax clamped to ``[AMAX_MIN, AMAX_MAX]`` and the quotient clamped to +-448, so a row of zeros, an outlier
or even an inf input saturates instead of producing NaN.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_MIN = 1e-12
AMAX_MAX = 3.0e38  # finite: an inf amax would turn every element of the row into NaN
LN_EPS = 1e-6


class QTensor(NamedTuple):
    """A 2-D E4M3 activation with one float32 scale per row; ``shape`` is the logical (unflattened) shape."""

    data: torch.Tensor  # (rows, cols) float8_e4m3fn, row-major
    scale: torch.Tensor  # (rows, 1) float32
    shape: tuple[int, ...]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.to(torch.float32) * self.scale).to(dtype).reshape(self.shape)


def split_streams(data: torch.Tensor, scale: torch.Tensor, batch: int, length: int,
                  ctx_length: int) -> tuple[QTensor, QTensor | None]:
    """(B*L + B*Lc, D) rows, image rows first, as the image and text streams' QTensors (text None if Lc=0)."""
    n, width = batch * length, data.shape[1]
    img = QTensor(data[:n], scale[:n], (batch, length, width))
    ctx = QTensor(data[n:], scale[n:], (batch, ctx_length, width)) if ctx_length else None
    return img, ctx


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install: the torch path still works
        return False
    return True


def _use_triton(x: torch.Tensor, use_triton: bool) -> bool:
    return use_triton and x.is_cuda and triton_available()


# ---------------------------------------------------------------------------------------------------------
# torch reference implementations
# ---------------------------------------------------------------------------------------------------------


def _quant_rows_torch(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y: (rows, cols) any float dtype -> (fp8, scale (rows, 1) fp32)."""
    y = y.float()
    amax = y.abs().amax(dim=1, keepdim=True).clamp(AMAX_MIN, AMAX_MAX)
    scale = amax / E4M3_MAX
    q = (y / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def gelu_tanh_torch(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _ln_modulate_torch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 result of LayerNorm(x) * (1 + scale[b]) + shift[b]; x (B, L, D), shift/scale (B, D)."""
    xf = x.float()
    n = torch.nn.functional.layer_norm(xf, (x.shape[-1],), eps=eps)
    return n * (1 + scale.float()[:, None, :]) + shift.float()[:, None, :]


# ---------------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------------


def quantize_rows(x: torch.Tensor, *, use_triton: bool = True, gelu: bool = False) -> QTensor:
    """Quantize the last dimension of ``x`` per row to E4M3; with ``gelu`` apply GELU(tanh) first, fused."""
    shape = tuple(x.shape)
    x2 = x.reshape(-1, shape[-1])
    if _use_triton(x2, use_triton):
        from . import kernels

        q, s = kernels.quant_rows(x2.contiguous(), gelu=gelu)
    else:
        q, s = _quant_rows_torch(gelu_tanh_torch(x2.float()) if gelu else x2)
    return QTensor(q, s, shape)


def _check_residuals(residual, residual2) -> None:
    if residual2 is not None and residual is None:
        raise ValueError("residual2 needs residual")


def _add_residuals(x, residual, residual2):
    for res in (residual, residual2):
        if res is not None:
            x = torch.addcmul(x, res[1].unsqueeze(1), res[0])
    return x


def ln_modulate_quantize(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    *,
    residual: tuple[torch.Tensor, torch.Tensor] | None = None,
    residual2: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = LN_EPS,
    use_triton: bool = True,
) -> tuple[QTensor, torch.Tensor]:
    """``LayerNorm(h) * (1 + scale) + shift`` quantized per row, with ``h = x`` or ``h = x + gate * y``.

    ``x``: (B, L, D); ``shift``, ``scale``: (B, D); ``residual``: optional ``(y, gate)`` with y like x and
    gate (B, D), the gated residual add of the block fused in front of the norm; ``residual2``: a second
    one, added after the first (each add rounded to x's dtype, as two separate adds). Returns the quantized
    activation and ``h`` (x itself when there is no residual; otherwise the new residual stream, bf16).
    """
    _check_residuals(residual, residual2)
    if _use_triton(x, use_triton):
        from . import kernels

        return kernels.ln_modulate_quant(x, shift, scale, residual=residual, residual2=residual2, eps=eps)
    h = _add_residuals(x, residual, residual2)
    y = _ln_modulate_torch(h, shift, scale, eps)
    q, s = _quant_rows_torch(y.reshape(-1, y.shape[-1]))
    return QTensor(q, s, tuple(x.shape)), h


def ln_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    *,
    residual: tuple[torch.Tensor, torch.Tensor] | None = None,
    residual2: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = LN_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The BF16 (unquantized) twin of :func:`ln_modulate_quantize`, for consumers that stay BF16."""
    _check_residuals(residual, residual2)
    h = _add_residuals(x, residual, residual2)
    return _ln_modulate_torch(h, shift, scale, eps).to(x.dtype), h


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel E4M3: w (N, K) -> (w8 (N, K) fp8, scale (N,) fp32), ``w ~= w8 * scale[:, None]``."""
    q, s = _quant_rows_torch(w.detach())
    return q, s.reshape(-1)


def rms_norm_heads_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """diffusers' RMSNorm over the last dim (head_dim), same rounding as diffusers."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(var + eps)
    if weight is None:
        return y.to(x.dtype)
    return y.to(weight.dtype) * weight
