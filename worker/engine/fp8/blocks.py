"""An MMDiT block (diffusers' ``JointTransformerBlock``) rewritten around FP8 linears and fused quantization.

Same maths as diffusers, different order of work: every activation that feeds an FP8 linear is produced
already quantized by the op that computes it (LayerNorm + AdaLN modulate [+ gated residual] -> FP8,
GELU -> FP8, attention output -> FP8), q/k/v of the image and text streams go through one fused GEMM each
and one kernel that applies the q/k RMSNorm and writes the (B, H, S, D) layout attention wants.
"""

from __future__ import annotations

import contextlib

import torch

from sdfleet.errors import EngineError

from .adaln import AdaLNBank
from .linear import Fp8Linear
from .options import Fp8Options
from .processor import attend, attend_fp8_io
from .quant import (
    QTensor,
    gelu_tanh_torch,
    ln_modulate,
    ln_modulate_quantize,
    quantize_rows,
    rms_norm_heads_torch,
    split_streams,
    triton_available,
)


def make_linear(lins: torch.nn.Linear | list[torch.nn.Linear], fp8: bool, options: Fp8Options, *,
                quantize: bool = True) -> torch.nn.Module:
    """One layer from one linear or from several sharing their input (concatenated along outputs).

    ``quantize=False`` builds the FP8 layer's empty buffers only (to be filled by ``load_state_dict``).
    """
    lins = lins if isinstance(lins, list) else [lins]
    w0 = lins[0].weight
    n = sum(m.out_features for m in lins)
    has_bias = lins[0].bias is not None
    if fp8:
        kw = dict(out_dtype=w0.dtype, use_triton=options.fused_quant, fast_accum=options.fast_accum)
        if quantize:
            return Fp8Linear.from_linear(lins, **kw)
        return Fp8Linear(lins[0].in_features, n, bias=has_bias, device=w0.device, **kw)
    if len(lins) == 1:
        return lins[0]
    # on meta: no random initialisation of a weight that is replaced next (the AdaLN bank's is 2.7 G values)
    out = torch.nn.Linear(lins[0].in_features, n, bias=has_bias, device="meta", dtype=w0.dtype)
    with torch.no_grad():
        out.weight = torch.nn.Parameter(torch.cat([m.weight.detach() for m in lins], 0), requires_grad=False)
        if has_bias:
            out.bias = torch.nn.Parameter(torch.cat([m.bias.detach() for m in lins], 0), requires_grad=False)
    return out


def _norm_weights(a, b) -> torch.Tensor | None:
    if a is None and b is None:
        return None
    for m in (a, b):
        if m is None or type(m).__name__ != "RMSNorm" or getattr(m, "weight", None) is None:
            raise EngineError(f"FP8 blocks support qk_norm='rms_norm' with weights or no qk_norm, not {m!r}; "
                              "run this model with fp8_linears off")
    return torch.stack([a.weight.detach(), b.weight.detach()])


class JointAttention(torch.nn.Module):
    """q/k/v, RMSNorm, attention and output projections of one (joint or image-only) attention."""

    def __init__(self, attn, options: Fp8Options, *, joint: bool, prefix: str, quantize: bool = True):
        super().__init__()
        self.heads = attn.heads
        self.head_dim = attn.to_q.out_features // attn.heads
        self.options = options
        self.eps = attn.norm_q.eps if attn.norm_q is not None else 1e-6
        qkv_t, out_t = f"{prefix}_qkv", f"{prefix}_out"
        self.qkv = make_linear([attn.to_q, attn.to_k, attn.to_v], options.fp8(qkv_t), options, quantize=quantize)
        self.out = make_linear(attn.to_out[0], options.fp8(out_t), options, quantize=quantize)
        self.register_buffer("norm_w", _norm_weights(attn.norm_q, attn.norm_k))
        self.ctx_qkv = self.ctx_out = None
        self.register_buffer("ctx_norm_w", None)
        if joint:
            self.ctx_qkv = make_linear([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj],
                                       options.fp8("context_qkv"), options, quantize=quantize)
            self.ctx_norm_w = _norm_weights(attn.norm_added_q, attn.norm_added_k)
            if not attn.context_pre_only:
                self.ctx_out = make_linear(attn.to_add_out, options.fp8("context_out"), options, quantize=quantize)

    def _fused(self, x: torch.Tensor) -> bool:
        return self.options.fused_quant and x.is_cuda and triton_available()

    def _heads_torch(self, qkv: torch.Tensor, norm_w: torch.Tensor | None, b: int):
        q, k, v = (t.reshape(b, -1, self.heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        if norm_w is not None:
            q = rms_norm_heads_torch(q, norm_w[0], self.eps)
            k = rms_norm_heads_torch(k, norm_w[1], self.eps)
        return q, k, v

    def forward(self, x, cqkv, b: int, length: int, ctx_length: int, text: TextStream | None = None):
        """x: the image stream's activation (QTensor or bf16); cqkv: the text stream's ``ctx_qkv`` output
        (computed by the caller, on the text stream's CUDA stream), or None for an image-only attention.

        Returns (image output after ``out``, the text rows' attention output before ``ctx_out``, or None);
        the latter ready for ``text``'s stream (made there, or handed over to it).
        """
        text = text or TextStream(None)
        qkv = self.qkv(x)
        lc = ctx_length if cqkv is not None else 0
        out_lc = lc if self.ctx_out is not None else 0
        fp8_out = isinstance(self.out, Fp8Linear) and (out_lc == 0 or isinstance(self.ctx_out, Fp8Linear))
        if fp8_out and self.options.fp8_attention and self.options.fused_attention_io and self._fused(qkv):
            o = attend_fp8_io(qkv.reshape(b * length, -1), cqkv.reshape(b * lc, -1) if cqkv is not None else None,
                              self.norm_w, self.ctx_norm_w, batch=b, heads=self.heads, eps=self.eps,
                              rows=(length, out_lc), text=text, kernel=self.options.attention_kernel)
            if o is not None:
                oi, oc = split_streams(*o, b, length, out_lc)  # text rows made on the text stream
                return self.out(oi), oc
        if self._fused(qkv):
            from . import kernels

            buf = torch.empty((3, b, self.heads, length + lc, self.head_dim), device=qkv.device, dtype=qkv.dtype)
            kernels.qkv_prep(qkv.reshape(b * length, -1), buf, self.norm_w, batch=b, tok_off=0,
                             heads=self.heads, head_dim=self.head_dim, eps=self.eps)
            if cqkv is not None:
                kernels.qkv_prep(cqkv.reshape(b * lc, -1), buf, self.ctx_norm_w, batch=b, tok_off=length,
                                 heads=self.heads, head_dim=self.head_dim, eps=self.eps)
            q, k, v = buf.unbind(0)
        else:
            q, k, v = self._heads_torch(qkv, self.norm_w, b)
            if cqkv is not None:
                cq, ck, cv = self._heads_torch(cqkv, self.ctx_norm_w, b)
                q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        o = attend(q, k, v, fp8=self.options.fp8_attention)
        if fp8_out and self._fused(o):
            from . import kernels

            oi, oc = kernels.out_quant(o, length, out_lc)
        else:
            o2 = o.transpose(1, 2).reshape(b, length + lc, self.heads * self.head_dim)
            oi, oc = o2[:, :length], o2[:, length:]
        oc = oc if self.ctx_out is not None else None
        text.handoff(oc)
        return self.out(oi), oc


class FeedForward(torch.nn.Module):
    """diffusers' FeedForward(gelu-approximate): up, GELU(tanh), down; GELU fused with the FP8 quantization."""

    def __init__(self, ff, options: Fp8Options, *, prefix: str, quantize: bool = True):
        super().__init__()
        self.options = options
        self.up = make_linear(ff.net[0].proj, options.fp8(f"{prefix}_up"), options, quantize=quantize)
        self.down = make_linear(ff.net[2], options.fp8(f"{prefix}_down"), options, quantize=quantize)

    def forward(self, x):
        fused = isinstance(self.down, Fp8Linear) and self.options.fused_quant
        chunk = self.options.ff_chunk_rows
        rows = x.data.shape[0] if isinstance(x, QTensor) else x.numel() // x.shape[-1]
        if fused and chunk and rows > chunk:
            return self._chunked(x, rows, chunk)
        h = self.up(x)
        if fused:
            return self.down(quantize_rows(h, gelu=True, use_triton=True))
        return self.down(gelu_tanh_torch(h))

    def _chunked(self, x, rows: int, chunk: int) -> torch.Tensor:
        """The feed-forward a block of rows at a time, into one output: its 4x-wide hidden activation (bf16,
        then E4M3) is the largest tensor of a step, and a CUDA graph's pool keeps the largest working set."""
        shape = x.shape
        if not isinstance(x, QTensor):
            x = x.reshape(rows, shape[-1])
        y = torch.empty((rows, self.down.out_features), device=x.data.device if isinstance(x, QTensor) else x.device,
                        dtype=self.down.out_dtype)
        for i in range(0, rows, chunk):
            j = min(i + chunk, rows)
            part = QTensor(x.data[i:j], x.scale[i:j], (j - i, shape[-1])) if isinstance(x, QTensor) else x[i:j]
            self.down(quantize_rows(self.up(part), gelu=True, use_triton=True), out=y[i:j])
        return y.reshape(*shape[:-1], self.down.out_features)


class PendingResidual:
    """The image stream after a block, ``x + gate * y``, not added yet.

    A block hands this to the next block instead of a tensor, and the next block's LayerNorm kernel does
    the add (``ln_modulate_quantize(..., residual=(y, gate))``): one pass over the (B, L, D) stream less per
    block than an add here and a norm there. Anything else that receives it (a torch function, ``+``, the
    final norm if the last block were skipped) gets the sum, so it never leaks as a wrong value.
    """

    __slots__ = ("x", "y", "gate")

    def __init__(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor):
        self.x, self.y, self.gate = x, y, gate

    def materialize(self) -> torch.Tensor:
        return torch.addcmul(self.x, self.gate.unsqueeze(1), self.y)

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def real(a):
            if isinstance(a, PendingResidual):
                return a.materialize()
            if isinstance(a, (list, tuple)):
                return type(a)(real(b) for b in a)
            return a

        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})

    def __add__(self, other):
        return self.materialize() + other

    __radd__ = __add__


def _tensors(items):
    """The tensors in ``items`` (tensors, QTensors and other tuples, PendingResiduals, None)."""
    for t in items:
        if isinstance(t, torch.Tensor):
            yield t
        elif isinstance(t, PendingResidual):
            yield from _tensors((t.x, t.y, t.gate))
        elif isinstance(t, (tuple, list)):
            yield from _tensors(t)


class _SideStream:
    """The text stream of one device, and the tensors each stream reads that the other one made.

    The caching allocator reuses a freed tensor's memory for the next allocation on the stream that made
    it, ordered only by that stream. So a tensor read by the other stream is held here until the stream
    that made it has waited for the reader: then any reuse comes after the read. (``record_stream`` would
    do the same, but during a CUDA graph capture the allocator keeps such memory until the capture ends:
    every block's attention buffers at once, ~1.8 GB per transformer row on Large at 1024 px.)
    """

    def __init__(self, stream):
        self.stream = stream
        self.read_by_text: list[torch.Tensor] = []  # made on the main stream
        self.read_by_main: list[torch.Tensor] = []  # made on the text stream


class TextStream:
    """A block's text-stream kernels on a second CUDA stream, beside the image stream's.

    The text half of an SD3.5 block is small (333 tokens a prompt against 4096 image tokens at 1024 px):
    its norm, GEMMs and GELU are a few microseconds each, so in line their launch gaps and tails are
    mostly idle GPU. On a second stream they run beside the image stream's kernels. The streams meet
    where the maths does: the joint attention waits for the text q/k/v, and the text half after it waits
    for the attention's text rows, which are a launch of their own on the text stream
    (``processor.attend_fp8_io``). Used while a CUDA graph is captured (the engine's step). Otherwise (eager,
    not CUDA, or ``Fp8Options.text_stream`` off) it does nothing and every kernel runs in order on the
    current stream.
    """

    _sides: dict[torch.device, _SideStream] = {}

    def __init__(self, side: _SideStream | None, main=None):
        self.side_stream = side
        self.stream = side.stream if side is not None else None
        self.main = main if main is not None or side is None else torch.cuda.current_stream(side.stream.device)

    @classmethod
    def for_block(cls, x, on: bool) -> TextStream:
        t = x.x if isinstance(x, PendingResidual) else x
        # only inside a CUDA graph capture: run eagerly, the step is bound by the host's launches, which
        # the extra events and allocator bookkeeping per block only lengthen (measured, docs/PERFORMANCE.md)
        if not (on and t.is_cuda and torch.cuda.is_current_stream_capturing()):
            return cls(None)
        if t.device not in cls._sides:
            # the main stream's priority: the text rows' attention, queued after the image rows', must
            # not overtake it (it is meant to fill the image launch's last wave)
            cls._sides[t.device] = _SideStream(torch.cuda.Stream(device=t.device))
        return cls(cls._sides[t.device])

    def mark(self) -> torch.cuda.Event | None:
        """An event at this point of the main stream, for ``side(wait=event)``: take it after the main
        stream's last read of what the text stream made."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.main)
        return event

    def _text_waits(self, wait) -> None:
        if isinstance(wait, torch.cuda.Event):
            self.stream.wait_event(wait)
        elif wait:
            self.stream.wait_stream(self.main)
        else:
            return
        self.side_stream.read_by_main.clear()  # the main stream's reads come before what the text stream does next

    def handoff(self, *inputs) -> None:
        """The text stream waits for the main stream's work queued so far, which made ``inputs``."""
        if self.stream is not None:
            self._text_waits(True)
            self.side_stream.read_by_text.extend(_tensors(inputs))

    @contextlib.contextmanager
    def side(self, *inputs, wait: bool | torch.cuda.Event = True):
        """Run the body on the text stream; ``inputs``: tensors made on the main stream that it reads,
        ``wait``: whether it must first wait for the main stream's work queued so far, or an event of
        :meth:`mark` to wait for instead."""
        if self.stream is None:
            yield
            return
        self._text_waits(wait)
        self.side_stream.read_by_text.extend(_tensors(inputs))
        with torch.cuda.stream(self.stream):
            yield

    def join(self, *outputs, last: bool = False) -> None:
        """The main stream waits for the text stream; ``outputs``: its tensors the main stream reads.
        ``last``: the call's last join (the text stream does nothing more in it): hold nothing after it."""
        if self.stream is None:
            return
        self.main.wait_stream(self.stream)
        held = self.side_stream
        held.read_by_text.clear()  # the text stream's reads come before what the main stream does next
        if last:
            # the text stream's next work (the next call) starts with a wait for the main stream
            held.read_by_main.clear()
        else:
            held.read_by_main.extend(_tensors(outputs))


class Fp8JointBlock(torch.nn.Module):
    """Replaces one ``JointTransformerBlock``; same call signature and outputs.

    ``defer_residual`` (set by ``apply_fp8`` on every block but the last, with ``fused_quant``): return the
    image and text streams as :class:`PendingResidual` for the next block's fused norms.
    """

    def __init__(self, block, options: Fp8Options, *, quantize: bool = True):
        super().__init__()
        if getattr(block, "_chunk_size", None) is not None:
            raise EngineError("feed-forward chunking is not supported by FP8 blocks; disable it first")
        self.options = options
        self.context_pre_only = block.context_pre_only
        self.use_dual_attention = block.use_dual_attention
        self.n_mod = 9 if block.use_dual_attention else 6
        self.eps = block.norm2.eps
        # both streams' AdaLN modulations read silu(temb): one linear, image outputs first; apply_fp8 merges
        # all blocks' into one (a plain attribute, not a submodule: the model's bank holds the weights)
        adaln = make_linear([block.norm1.linear, block.norm1_context.linear], options.fp8("adaln"), options,
                            quantize=quantize)
        self.adaln_bank = AdaLNBank(adaln, [(block.norm1.linear.out_features,
                                             block.norm1_context.linear.out_features)])
        self.adaln_index = 0
        self.attn = JointAttention(block.attn, options, joint=True, prefix="attn", quantize=quantize)
        self.attn2 = (JointAttention(block.attn2, options, joint=False, prefix="attn2", quantize=quantize)
                      if block.use_dual_attention else None)
        self.ff = FeedForward(block.ff, options, prefix="ff", quantize=quantize)
        self.ff_context = (None if block.context_pre_only
                           else FeedForward(block.ff_context, options, prefix="context_ff", quantize=quantize))
        self.defer_residual = False

    def _norm_mod(self, x, shift, scale, consumer, residual=None, residual2=None):
        """The activation ``consumer`` wants (QTensor for a fused FP8 linear), and the residual stream."""
        if isinstance(consumer, Fp8Linear) and self.options.fused_quant:
            return ln_modulate_quantize(x, shift, scale, residual=residual, residual2=residual2, eps=self.eps)
        return ln_modulate(x, shift, scale, residual=residual, residual2=residual2, eps=self.eps)

    def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
        if joint_attention_kwargs:
            raise EngineError(f"FP8 blocks take no joint_attention_kwargs (got {sorted(joint_attention_kwargs)})")
        x, c = hidden_states, encoder_hidden_states
        b, length, _ = x.shape
        lc = c.shape[1]
        text = TextStream.for_block(x, self.options.text_stream)
        # the previous block's gated FF residuals, added by the norms below
        x, res_in = (x.x, (x.y, x.gate)) if isinstance(x, PendingResidual) else (x, None)
        c, cres_in = (c.x, (c.y, c.gate)) if isinstance(c, PendingResidual) else (c, None)
        mod, cmod = self.adaln_bank(temb, self.adaln_index)
        # the call's first block (it computed the bank's output): its text inputs come from the main stream
        # (embedder, AdaLN bank); later blocks' from the text stream itself
        first = self.adaln_bank.computed_by == self.adaln_index
        if not self.defer_residual:
            self.adaln_bank.clear()  # the last block: hold no tensor of this call (or of a graph's pool) after it
        mod = mod.chunk(self.n_mod, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        if self.context_pre_only:
            c_scale, c_shift = cmod.chunk(2, dim=1)  # AdaLayerNormContinuous order
        else:
            c_shift, c_scale, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmod.chunk(6, dim=1)

        with text.side(cmod, c, cres_in, wait=first):
            ac, c = self._norm_mod(c, c_shift, c_scale, self.attn.ctx_qkv, residual=cres_in)
            cqkv = self.attn.ctx_qkv(ac)
        ax, x = self._norm_mod(x, shift_msa, scale_msa, self.attn.qkv, residual=res_in)
        if self.attn2 is not None:  # second modulation of the same norm (SD35AdaLayerNormZeroX)
            ax2, _ = self._norm_mod(x, mod[6], mod[7], self.attn2.qkv)
        text.join(cqkv)
        attn_out, oc = self.attn(ax, cqkv, b, length, lc, text)
        if not self.context_pre_only:
            with text.side(oc, cmod, wait=False):  # oc: made on the text stream, or handed over to it
                # the text stream's half of the block: its own stream, beside the image stream's below
                ctx_out = self.attn.ctx_out(oc)
                acff, c = self._norm_mod(c, c_shift_mlp, c_scale_mlp, self.ff_context.up,
                                         residual=(ctx_out, c_gate_msa))
                # the text stream's next consumer is the next block's norm too (the last block takes text in)
                c = self._gated_residual(c, self.ff_context(acff), c_gate_mlp, self.defer_residual)
        res2 = None
        if self.attn2 is not None:  # both gated attention residuals are added by the norm kernel
            attn2_out, _ = self.attn2(ax2, None, b, length, 0)
            res2 = (attn2_out, mod[8])
        aff, x = self._norm_mod(x, shift_mlp, scale_mlp, self.ff.up, residual=(attn_out, gate_msa), residual2=res2)
        x = self._gated_residual(x, self.ff(aff), gate_mlp, self.defer_residual)
        if not self.defer_residual:
            text.join(c, last=True)  # the last block: both streams' work done for the caller (a graph joined)
        return (None if self.context_pre_only else c), x

    def _gated_residual(self, x, y, gate, defer: bool):
        pending = PendingResidual(x, y, gate)
        return pending if defer and self.options.fused_quant else pending.materialize()


__all__ = ["AdaLNBank", "Fp8JointBlock", "JointAttention", "TextStream", "FeedForward", "PendingResidual", "make_linear", "QTensor"]
