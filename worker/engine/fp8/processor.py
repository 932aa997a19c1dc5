"""Attention for SD3 joint attention, with a switch between BF16 SDPA and the FP8 flash-attention kernel.

The FP8 kernel lives in ``worker.engine.fp8.attention`` (``fp8_attention(q, k, v)``, (B, H, S, D) bf16
CUDA tensors). It is imported lazily; when it is absent, or raises for a shape or device, this module
logs once and uses ``torch.nn.functional.scaled_dot_product_attention`` from then on for that reason, so
a CUDA graph is never captured around a failing call (the first eager call decides). On a GPU where
:func:`worker.engine.precision.fp8_path` rules the kernel out (e.g. Ada, 8.9: tuned for Hopper, never run
there) SDPA is used from the start, whatever ``fp8_attention`` says, and the reason is logged once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # Triton's compile and resource errors are not RuntimeErrors
    from triton.errors import TritonError
except Exception:  # pragma: no cover - no Triton (CPU)
    class TritonError(Exception):
        pass

# what a kernel may raise on its first (eager) call, and the switch back to the bf16 path catches
_KERNEL_ERRORS = (NotImplementedError, RuntimeError, ValueError, AssertionError, TritonError)

_fp8_fn = None
_fp8_error: str | None = None
_io_error: str | None = None
# why the Gluon kernel is not used: per device index (no Gluon, not Hopper) or per (device index, B, H, S, D)
_gluon_error: dict[int | tuple, str] = {}
_gluon_served: set[tuple] = set()  # (device index, B, H, S, D) the Gluon kernel has served
_device_error: dict[int, str] = {}  # device index -> why its compute capability rules the FP8 kernel out


def _give_up(exc: Exception, message: str) -> str:
    """After a kernel path's first eager failure: log why and return the reason (never inside a capture,
    where falling back would record a different graph than the eager call ran)."""
    if torch.cuda.is_current_stream_capturing():
        raise exc
    log.warning(message)
    return message


def _load_fp8():
    global _fp8_fn, _fp8_error
    if _fp8_fn is None and _fp8_error is None:
        try:
            from .attention import fp8_attention
        except Exception as exc:  # ImportError, or a kernel module that fails to build
            _fp8_error = f"FP8 attention unavailable ({exc!r}); using SDPA"
            log.warning(_fp8_error)
        else:
            _fp8_fn = fp8_attention
    return _fp8_fn


def _index(device: torch.device) -> int:
    """A CUDA device's index (``cuda`` alone: the current device's)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def fp8_attention_allowed(device: torch.device) -> bool:
    """Whether this GPU's compute capability allows the FP8 attention kernel (:func:`fp8_path`); the first
    refusal per device is logged with its reason."""
    from worker.engine.precision import device_fp8_path

    name, path = device_fp8_path(device)
    if path.fp8_attention:
        return True
    index = _index(device)
    if index not in _device_error:
        _device_error[index] = f"FP8 attention kernel not used on {name}: {path.reason}"
        log.warning(_device_error[index])
    return False


def fp8_attention_status() -> str:
    """'available', 'not loaded yet' or the reason SDPA is used instead (for logs and the bench)."""
    if _device_error:
        return "; ".join(_device_error.values())
    if _fp8_error:
        return _fp8_error
    if _io_error:
        return _io_error
    parts = []
    if _gluon_served:
        parts.append(f"the Gluon kernel serves {len(_gluon_served)} shape(s)")
    parts += sorted(set(_gluon_error.values()))
    if parts:
        return "available; " + "; ".join(parts)
    return "available" if _fp8_fn is not None else "not loaded yet"


def _gluon_usable(device: torch.device, shape: tuple[int, int, int, int]) -> bool:
    """Whether the Gluon kernel (``Fp8Options.attention_kernel="gluon"``) serves this joint attention; where it
    does not, the Triton kernel does, and the reason is logged once: per device when the device or the install
    rules it out (no Gluon, not Hopper), per shape otherwise (head_dim, too short, the Q/K format, or it failed
    for that shape before)."""
    from .attention import DEFAULT_OPTIONS

    index = _index(device)
    key = (index, *shape)
    if index in _gluon_error or key in _gluon_error:
        return False
    try:
        from .attention_gluon import is_supported, joint_supported

        dev_ok, dev_why = is_supported(device)
        ok, why = joint_supported(shape, DEFAULT_OPTIONS["qk"], device) if dev_ok else (False, dev_why)
    except Exception as exc:  # pragma: no cover - a broken Triton install
        dev_ok, ok, why = False, False, f"Gluon is not importable ({exc!r})"
    if not ok:
        where, at = (f"on cuda:{index}", index) if not dev_ok else (f"for {shape}", key)
        _gluon_error[at] = f"Gluon attention not used {where}: {why}; using the Triton kernel"
        log.warning(_gluon_error[at])
    return ok


def attend_fp8_io(img: torch.Tensor, ctx: torch.Tensor | None, norm_w: torch.Tensor | None,
                  ctx_norm_w: torch.Tensor | None, *, batch: int, heads: int, eps: float,
                  rows: tuple[int, int], text=None,
                  kernel: str = "triton") -> tuple[torch.Tensor, torch.Tensor] | None:
    """Joint attention from the streams' q/k/v GEMM outputs to the output projections' FP8 input.

    ``worker.engine.fp8.attention.prep_joint`` (q/k RMSNorm, K quantized, V per batch element) then the
    FP8 kernel with an E4M3 epilogue: returns (o8, row scales), image rows then ``rows[1]`` text rows per
    batch element (see ``fp8_attention_quantized``). None when the kernels are missing or failed on an
    earlier eager call: the caller then takes the bf16 path (which may still use the FP8 kernel).

    ``text`` (a :class:`~worker.engine.fp8.blocks.TextStream`): the text rows are a second launch on the
    text stream, queued after the image rows' launch, so their programs fill the image launch's last wave
    and the image stream's next GEMM (which needs only image rows) starts beside them. The text rows are
    then ready on the text stream only.

    ``kernel``: ``"triton"`` (``attention.fp8_attention_quantized``) or ``"gluon"``
    (``attention_gluon.joint_attention``, where :func:`_gluon_usable`; the same scheme and output). A Gluon
    failure on an eager call falls back to the Triton kernel for that shape, logged once.
    """
    global _io_error
    if _io_error is not None or not img.is_cuda or not fp8_attention_allowed(img.device) or _load_fp8() is None:
        return None
    if kernel not in ("triton", "gluon"):
        raise ValueError(f"attend_fp8_io: kernel {kernel!r}; use 'triton' or 'gluon'")
    from .attention import fp8_attention_quantized, prep_joint

    length, ctx_rows = rows
    L = img.shape[0] // batch
    shape = (batch, heads, L + (ctx.shape[0] // batch if ctx is not None else 0), img.shape[1] // (3 * heads))
    use_gluon = kernel == "gluon" and _gluon_usable(img.device, shape)
    if use_gluon:
        from .attention_gluon import joint_attention as attention
    else:
        attention = fp8_attention_quantized
    try:
        with torch.cuda.device(img.device):  # Triton launches on the current device
            q, kv = prep_joint(img, ctx, norm_w, ctx_norm_w, batch=batch, heads=heads, eps=eps,
                               v_order="gluon" if use_gluon else "natural")
            if text is None or text.stream is None or not ctx_rows:
                o = attention(q, kv, fp8_rows=rows)
            else:
                prepared = text.mark()
                o = attention(q, kv, fp8_rows=rows, rows=(0, length))
                with text.side(q, kv["q_scale"], kv["kq"], kv["ks"], kv["vq"], kv["vs"], *o, wait=prepared):
                    attention(q, kv, fp8_rows=rows, rows=(length, length + ctx_rows), out=o)
            if use_gluon:
                _gluon_served.add((_index(img.device), *shape))
            return o
    except Exception as exc:
        # Triton's kernel errors are _KERNEL_ERRORS; Gluon's host API is experimental, so any error of it
        # (outside a capture: _give_up re-raises there) falls back to the Triton kernel
        if not use_gluon and not isinstance(exc, _KERNEL_ERRORS):
            raise
        if use_gluon:
            _gluon_error[(_index(img.device), *shape)] = _give_up(
                exc, f"Gluon attention failed for {shape} ({exc!r}); using the Triton kernel")
            return attend_fp8_io(img, ctx, norm_w, ctx_norm_w, batch=batch, heads=heads, eps=eps, rows=rows,
                                 text=text, kernel="triton")
        _io_error = _give_up(exc, f"FP8 attention with FP8 output failed for {tuple(img.shape)} ({exc!r}); "
                                  "using bf16 q/k/v")
        return None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, fp8: bool) -> torch.Tensor:
    """Non-causal attention over (B, H, S, D) tensors: FP8 kernel when ``fp8`` and usable, else SDPA."""
    global _fp8_error
    if fp8 and q.is_cuda and q.dtype == torch.bfloat16 and fp8_attention_allowed(q.device):
        fn = _load_fp8()
        if fn is not None:
            try:
                return fn(q, k, v)
            except _KERNEL_ERRORS as exc:
                _fp8_error = _give_up(exc, f"FP8 attention failed for q{tuple(q.shape)} ({exc!r}); using SDPA")
                globals()["_fp8_fn"] = None
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


class Fp8JointAttnProcessor:
    """Drop-in for diffusers' ``JointAttnProcessor2_0`` whose attention core is :func:`attend`.

    Used on blocks that keep the diffusers forward (``fp8_linears`` off); converted blocks call
    :func:`attend` directly from :class:`worker.engine.fp8.blocks.Fp8JointBlock`.
    """

    def __init__(self, fp8: bool = True):
        self.fp8 = fp8

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        b = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):
            return x.view(b, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            cq = heads(attn.add_q_proj(encoder_hidden_states))
            ck = heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query = torch.cat([query, cq], dim=2)
            key = torch.cat([key, ck], dim=2)
            value = torch.cat([value, cv], dim=2)
        out = attend(query, key, value, fp8=self.fp8)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, ctx = out[:, : residual.shape[1]], out[:, residual.shape[1]:]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, ctx) if encoder_hidden_states is not None else out
