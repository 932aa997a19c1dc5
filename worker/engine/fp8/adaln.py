"""AdaLN modulation of the MMDiT blocks: every block's in one GEMM per call, or every step's ahead of the loop.

A block's AdaLN modulation (shift, scale and gate vectors for its norms) depends only on ``temb``, which
depends only on the timestep and the pooled text embedding: nothing the step computes. So the engine can
compute the modulations of a whole denoising loop before its first step (:class:`AdaLNPlan`) and hand each
step its rows, instead of streaming the bank's weights (2.7 GB of E4M3 on SD3.5 Large) once per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdfleet.errors import EngineError

from .linear import GEMV_MAX_ROWS, Fp8Linear
from .options import Fp8Options

#: A plan's modulation table is computed this many bytes at a time at most (Large: 2.2 MB a transformer
#: row a step, so one image's 28 steps, 56 rows, are 124 MB); larger batches take several passes.
PLAN_BYTES = 256 * 2**20


class AdaLNBank:
    """Every block's AdaLN modulation linear as one layer, computed once per transformer call.

    All blocks' modulations read the same ``silu(temb)``, so one GEMM computes them all. On SD3.5 Large the
    modulations are a third of the weights (2.7 GB of E4M3 over 38 blocks): 38 GEMVs of a few rows, each too
    small to fill the GPU's last wave of tiles, streamed them at 2 TB/s; one few-row GEMM over all of them
    (``kernels.gemv``) at 3 TB/s (``bench/adaln_gemv.py``). silu and the activation's quantization run once too.

    A block owns a bank of one (itself) until :func:`~worker.engine.fp8.convert.apply_fp8` merges the
    blocks' banks into the model's (``transformer.adaln_bank``, which holds the weights). The output is
    kept per ``temb`` tensor, which it holds until the last block clears it, so a new ``temb`` is never
    mistaken for the last.

    Fed calls (:meth:`enable_feed`, :meth:`feed`): the caller has computed this call's modulations already
    (an :class:`AdaLNPlan`); the blocks read them from one persistent buffer, so a CUDA graph captured fed
    reads whatever the buffer holds at each replay and contains no modulation GEMM.
    """

    def __init__(self, linear: torch.nn.Module, widths: list[tuple[int, int]]):
        self.linear = linear  # outputs: block 0 image, block 0 text, block 1 image, ...
        starts = [0]
        for a, c in widths:
            starts.append(starts[-1] + a + c)
        if starts[-1] != linear.out_features:
            raise EngineError(f"AdaLN bank: {linear.out_features} outputs for blocks needing {starts[-1]}")
        self.cols = [(s, a, c) for s, (a, c) in zip(starts, widths)]
        self.temb: torch.Tensor | None = None
        self.out: torch.Tensor | None = None
        self.computed_by: int | None = None  # the block (index) whose call computed ``out``: the call's first
        #: (rows, out_features) buffer of fed modulations, or None (every call computes its own)
        self.fed: torch.Tensor | None = None
        #: rows of ``fed`` that hold the next call's modulations; 0: the next call computes them
        self.armed = 0
        self.holders = 0  # graph runners whose graphs read ``fed`` (while any do, it is never replaced)

    @classmethod
    def merge(cls, banks: list[AdaLNBank]) -> AdaLNBank:
        """One bank from the blocks' own (in block order); their weights are concatenated, not re-quantized."""
        from .blocks import make_linear

        lins = [b.linear for b in banks]
        if all(isinstance(m, Fp8Linear) for m in lins):
            linear = Fp8Linear.concat(lins)
        elif not any(isinstance(m, Fp8Linear) for m in lins):
            linear = make_linear(lins, False, Fp8Options())
        else:
            raise EngineError("AdaLN bank: all blocks' modulations must be FP8 or all BF16")
        return cls(linear, [(a, c) for b in banks for _, a, c in b.cols])

    # --- computing modulations ---------------------------------------------------------------------

    def chunk_rows(self, rows: int) -> int:
        """How many rows :meth:`modulations` may compute in one GEMM and still give each row exactly what a
        call of ``rows`` rows gives it: ``GEMV_MAX_ROWS`` where calls of that many rows run the FP8 GEMV
        (:meth:`Fp8Linear.uses_gemv`: rows never affect each other); otherwise ``rows``, one call's worth."""
        w = self.linear.weight
        if isinstance(self.linear, Fp8Linear) and self.linear.uses_gemv(rows, w) and self.linear.uses_gemv(
                GEMV_MAX_ROWS, w):
            return GEMV_MAX_ROWS
        return rows

    def modulations(self, temb: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """(M, out_features) modulations of M ``temb`` rows: what calls of ``rows`` rows each would compute,
        bit for bit, in as few weight passes as :meth:`chunk_rows` allows."""
        chunk = self.chunk_rows(rows or temb.shape[0])
        act = F.silu(temb)
        if temb.shape[0] <= chunk:
            return self.linear(act)
        out = torch.empty((temb.shape[0], self.linear.out_features), device=temb.device,
                          dtype=getattr(self.linear, "out_dtype", None) or self.linear.weight.dtype)
        for i in range(0, temb.shape[0], chunk):
            out[i:i + chunk] = self.linear(act[i:i + chunk])
        return out

    # --- fed calls ---------------------------------------------------------------------------------

    @property
    def fixed(self) -> bool:
        """``fed`` is read by captured CUDA graphs at its address: it is never replaced."""
        return self.holders > 0

    def enable_feed(self, rows: int, *, fixed: bool = False) -> bool:
        """A persistent buffer for calls of up to ``rows`` rows; whether there is one that large now.

        ``fixed``: the caller's CUDA graphs will read the buffer (it holds it, :meth:`release_feed` lets go),
        so it keeps its address from then on, and a later call asking for more rows gets False instead of a
        new buffer."""
        if self.fed is None or self.fed.shape[0] < rows:
            if self.fixed:
                return False
            w = self.linear.weight
            dtype = getattr(self.linear, "out_dtype", None) or w.dtype
            with torch.inference_mode(False):  # a normal tensor: fed under inference mode or no_grad alike
                self.fed = torch.zeros((rows, self.linear.out_features), device=w.device, dtype=dtype)
            self.armed = 0
        if fixed:
            self.hold_feed()
        return True

    def hold_feed(self) -> None:
        """A graph runner's graphs read the buffer: keep it until every such runner lets go."""
        self.holders += 1

    def release_feed(self) -> None:
        """A runner's graphs are gone; the last one to go drops the buffer."""
        self.holders = max(0, self.holders - 1)
        self.armed = 0
        if not self.holders:
            self.disable_feed()

    def disable_feed(self) -> None:
        """Drop the buffer (the graphs that read it are released)."""
        self.fed, self.armed, self.holders = None, 0, 0

    def feed(self, mods: torch.Tensor) -> None:
        """The next call's modulations, (rows, out_features); that call reads them instead of computing."""
        if self.fed is None:
            raise EngineError("AdaLN bank: feed() before enable_feed()")
        rows = mods.shape[0]
        if rows > self.fed.shape[0] or mods.shape[1] != self.fed.shape[1]:
            raise EngineError(f"AdaLN bank: {tuple(mods.shape)} modulations for a {tuple(self.fed.shape)} buffer")
        self.fed[:rows].copy_(mods)
        self.armed = rows

    def clear(self) -> None:
        """Forget the last call's output (e.g. one in a released CUDA graph's memory pool) and any feed."""
        self.temb, self.out, self.computed_by, self.armed = None, None, None, 0

    def __call__(self, temb: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index``'s (image, text) modulation vectors, (B, 6 or 9 x D) and (B, 2 or 6 x D)."""
        if temb is not self.temb:
            if self.armed:
                b = temb.shape[0]
                if b != self.armed:  # a feed is for one call of its own row count, never another call's
                    armed, self.armed = self.armed, 0
                    raise EngineError(f"AdaLN bank: {armed} rows fed for a call of {b}")
                # consumed by this call's first block: a call that stops early (skip_layers, an exception)
                # leaves nothing armed for the next one
                out, self.armed = self.fed[:b], 0
            else:
                out = self.linear(F.silu(temb))
            self.temb, self.out, self.computed_by = temb, out, index
        s, a, c = self.cols[index]
        return self.out[:, s:s + a], self.out[:, s + a:s + a + c]


def bank_of(transformer) -> AdaLNBank | None:
    """The model's AdaLN bank (``apply_fp8`` with fp8_linears), or None."""
    blocks = getattr(transformer, "transformer_blocks", None)
    bank = getattr(blocks[0], "adaln_bank", None) if blocks else None
    return bank if isinstance(bank, AdaLNBank) else None


def step_temb(transformer, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The ``temb`` the transformer's forward computes for this call (diffusers' SD3Transformer2DModel)."""
    return transformer.time_text_embed(timestep, pooled)


def loop_tembs(transformer, timesteps: list[float], pooled: torch.Tensor) -> torch.Tensor:
    """(len(timesteps) * rows, D): each step's ``temb`` as its own call computes it, in fewer launches.

    diffusers' ``CombinedTimestepTextProjEmbeddings`` adds a timestep embedding (sinusoids, then a two-layer
    MLP) to a projection of the pooled text. The sinusoids are elementwise, so all steps' are computed at
    once; the text projection is the same every step, so it is computed once; the MLP runs per step, at the
    call's own row count (a GEMM may round a row differently at another). Another embedder: one call a step.
    """
    tte = transformer.time_text_embed
    rows, device = pooled.shape[0], pooled.device
    parts = [getattr(tte, n, None) for n in ("time_proj", "timestep_embedder", "text_embedder")]
    if type(tte).__name__ != "CombinedTimestepTextProjEmbeddings" or any(p is None for p in parts):
        return torch.cat([step_temb(transformer, torch.full((rows,), t, device=device, dtype=torch.float32),
                                    pooled) for t in timesteps])
    time_proj, timestep_embedder, text_embedder = parts
    # each step's (rows,) timestep tensor, as the engine passes it; filled on the device (no host copy)
    t_all = torch.cat([torch.full((rows,), t, device=device, dtype=torch.float32) for t in timesteps])
    proj = time_proj(t_all).to(dtype=pooled.dtype)
    text = text_embedder(pooled)
    return torch.cat([timestep_embedder(proj[i:i + rows]) + text for i in range(0, proj.shape[0], rows)])


def feed_call(transformer, bank: AdaLNBank, timestep: torch.Tensor, pooled: torch.Tensor) -> None:
    """Compute and feed one call's modulations (what an unfed call's first block would compute)."""
    bank.feed(bank.modulations(step_temb(transformer, timestep, pooled)))


class AdaLNPlan:
    """The modulations of every step of one denoising loop, computed before its first step.

    ``timesteps``: the loop's timesteps (host floats, in order); ``pooled``: the (rows, P) pooled text
    embeddings every step passes. Each step's ``temb`` is computed as its own call would (same rows, same
    kernels), and the bank's GEMM runs over the steps' rows together in chunks that keep every row exact
    (:meth:`AdaLNBank.chunk_rows`): one image with guidance (2 rows) is 4 passes over the bank's weights
    for 28 steps instead of 28. :meth:`feed` before step ``i``'s transformer call.
    """

    def __init__(self, transformer, bank: AdaLNBank, timesteps: list[float], pooled: torch.Tensor,
                 *, max_bytes: int = PLAN_BYTES):
        self.transformer, self.bank = transformer, bank
        self.timesteps = list(timesteps)
        self.pooled = pooled
        self.rows = pooled.shape[0]
        chunk = bank.chunk_rows(self.rows)
        row_bytes = bank.linear.out_features * 2
        # steps per table: whole GEMM chunks of rows, within max_bytes (one step at least)
        per_chunk = max(1, chunk // self.rows)
        fit = max(1, max_bytes // (row_bytes * self.rows))
        self.window = max(per_chunk, fit // per_chunk * per_chunk)
        self._start, self._table = -1, None
        self.passes = 0  # GEMM launches so far (for tests and the bench)

    def _compute(self, start: int) -> None:
        stop = min(start + self.window, len(self.timesteps))
        tembs = loop_tembs(self.transformer, self.timesteps[start:stop], self.pooled)
        self._table = None  # free the last window first
        self._table = self.bank.modulations(tembs, rows=self.rows).view(stop - start, self.rows, -1)
        chunk = self.bank.chunk_rows(self.rows)
        self.passes += -(-(stop - start) * self.rows // chunk)
        self._start = start

    def feed(self, i: int) -> None:
        """Hand step ``i``'s modulations to the bank: the next transformer call reads them."""
        if not 0 <= i < len(self.timesteps):
            raise EngineError(f"AdaLN plan: step {i} of a {len(self.timesteps)}-step loop")
        if self._table is None or not self._start <= i < self._start + self._table.shape[0]:
            self._compute(i)
        self.bank.feed(self._table[i - self._start])

    def close(self) -> None:
        """Free the table and the bank's feed (the loop is done)."""
        self._table = None
        self.bank.armed = 0


def adaln_plan(transformer, timesteps: list[float], pooled: torch.Tensor) -> AdaLNPlan | None:
    """A plan for this loop when the transformer's options ask for one (``Fp8Options.adaln_all_steps``) and
    its bank can take ``pooled``'s rows; else None (each call computes its own modulations)."""
    from .convert import MARKER

    options = getattr(transformer, MARKER, None)
    bank = bank_of(transformer)
    if options is None or not options.adaln_all_steps or bank is None:
        return None
    if not bank.enable_feed(pooled.shape[0]):  # more rows than the graphs' buffer: those calls run unfed
        return None
    return AdaLNPlan(transformer, bank, timesteps, pooled)


__all__ = ["AdaLNBank", "AdaLNPlan", "PLAN_BYTES", "adaln_plan", "bank_of", "feed_call", "loop_tembs", "step_temb"]
