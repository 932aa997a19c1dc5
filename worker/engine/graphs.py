"""CUDA graphs of the transformer's denoising step, one per (batch bucket, latent size, text length).

Captured at worker boot for the configured buckets, never per job. A call whose batch is smaller than
a bucket is padded up to it (rows of a step are independent, so padding never changes real rows); a
shape that was not captured runs eagerly. Buckets count *transformer* rows: with classifier-free
guidance a batch of n images is 2n rows.

Usage (the engine)::

    runner = CudaGraphRunner(pipe.transformer, batch_buckets=(2, 4, 8, 16))
    runner.capture(latent_hw=(128, 128), text_len=333)   # 1024x1024 with SD3's 8x VAE
    runner.install()   # pipe.transformer(...) now replays; runner.uninstall() restores the eager forward
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdfleet.errors import EngineError, GraphCaptureError

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


def pool_bytes(pool) -> int:
    """Bytes the allocator holds (cudaMalloc'd segments) for one graph memory pool: what its graphs keep."""
    pool = tuple(pool)
    return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
               if tuple(seg.get("segment_pool_id", ())) == pool)


def capture_graph(fn, *, pool, stream: torch.cuda.Stream, warmup_iters: int, before=None):
    """Run ``fn()`` ``warmup_iters`` times, then capture one call of it into a new graph: ``(graph, output)``.

    ``before()`` runs ahead of each call, outside the capture. Warm-up and capture both run on ``stream``,
    which belongs to the caller's graph set: never torch's shared default capture stream. cuBLAS keys its
    workspace by stream, and a graph keeps the workspace pointer of the stream it was captured on, so two
    graph sets captured on one stream share one workspace; replayed at once on two streams (the transformer's
    on the main stream, the text encoders' on the encoding stream) their GEMMs race on it. Measured: a Large
    worker hung in its second back-to-back batch. Warming up on that same stream (not a fresh side stream
    each time) also keeps the number of per-stream workspaces, 32 MiB each on Hopper, at one per graph set.
    A failed capture raises GraphCaptureError (the caller runs that shape eagerly); an error in the warm-up
    is the eager call's own and propagates as it is. Either way the caller's current stream is restored:
    ``torch.cuda.graph.__exit__`` ends the capture before it leaves its stream context, so a capture that
    fails there would otherwise leave ``stream`` current, and later eager work would share this graph set's
    stream and cuBLAS workspace with its replays.
    """
    prev = torch.cuda.current_stream(stream.device)
    stream.wait_stream(prev)
    try:
        with torch.inference_mode():
            with torch.cuda.stream(stream):
                for _ in range(warmup_iters):  # compiles Triton kernels, picks cuBLAS algorithms
                    if before is not None:
                        before()
                    fn()
                if before is not None:
                    before()
            prev.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    out = fn()
            except RuntimeError as exc:
                raise GraphCaptureError(f"CUDA graph capture failed: {exc}") from exc
    finally:
        torch.cuda.set_stream(prev)
    return graph, out


class CudaGraphRunner:
    """Stands in for ``transformer.forward``: same arguments, replays a graph when one fits."""

    def __init__(self, transformer, batch_buckets: Sequence[int] = (1, 2, 4, 8), *, warmup_iters: int = 2,
                 shared_pool: bool = True):
        """``shared_pool``: every bucket's graph allocates from one memory pool (the default). Safe because the
        graphs replay one at a time on one stream and each output is copied out before the next replay; a
        graph's output stays allocated, so a later capture never takes its memory. Off: a pool per graph
        (for measuring what sharing saves: ``memory``)."""
        if not batch_buckets or any(int(b) < 1 for b in batch_buckets):
            raise EngineError(f"batch buckets must be positive integers, got {batch_buckets!r}")
        self.transformer = transformer
        self.buckets = tuple(sorted({int(b) for b in batch_buckets}))
        self.warmup_iters = warmup_iters
        self.graphs: dict[tuple[int, int, int, int], _Graph] = {}
        #: keys whose capture failed (they run eagerly), with the reason
        self.failed: dict[tuple[int, int, int, int], str] = {}
        self._eager = type(transformer).forward.__get__(transformer)
        self.shared_pool = shared_pool
        self._pool = None
        #: this runner's own stream for warm-ups and captures (``capture_graph`` says why not torch's default)
        self.capture_stream: torch.cuda.Stream | None = None
        #: per captured key, after its capture: the allocator's reserved and allocated bytes, the growth of
        #: reserved memory the capture caused (its eager warm-up's cached blocks included) and the bytes its
        #: graph pool holds (with a shared pool: every graph's so far)
        self.memory: dict[tuple[int, int, int, int], dict[str, int]] = {}
        self.replays = 0
        self.eager_calls = 0
        #: graphs captured over this runner's life (a capture after boot is a stall on the critical path)
        self.captures = 0
        # An FP8 transformer's AdaLN bank: with Fp8Options.adaln_all_steps the graphs are captured "fed"
        # (they read each call's modulations from the bank's buffer, filled before each replay by the
        # engine's AdaLNPlan, or here for a call nobody fed), so a step holds no modulation GEMM.
        from worker.engine.fp8.adaln import bank_of
        from worker.engine.fp8.convert import MARKER

        self._bank = bank_of(transformer)
        options = getattr(transformer, MARKER, None)
        # decided here, for this runner's graphs: set_runtime_options later changes the engine's plan, not them
        self.fed = bool(self._bank is not None and options is not None and options.adaln_all_steps)
        self._holds_feed = False

    def bucket(self, rows: int) -> int | None:
        """The smallest bucket holding ``rows``, or None when the batch is larger than every bucket."""
        return next((b for b in self.buckets if b >= rows), None)

    def capture(self, latent_hw: tuple[int, int], text_len: int, buckets: Sequence[int] | None = None) -> list:
        """Capture one graph per bucket for latents of ``latent_hw`` and ``text_len`` text tokens."""
        tr = self.transformer
        device = next(tr.parameters()).device
        if device.type != "cuda":
            raise EngineError("CUDA graphs need the transformer on a CUDA device; turn cuda_graphs off on CPU")
        cfg = tr.config
        dtype = tr.dtype
        done = []
        # Largest first: with one pool, the smaller graphs then fit in the segments the largest one made,
        # instead of the largest needing segments of its own beside theirs (measured: Large's 2..16-row
        # buckets, smallest first, 6.9 GiB; the 16-row graph alone, 5.9).
        for b in sorted(buckets or self.buckets, reverse=True):
            key = (b, latent_hw[0], latent_hw[1], text_len)
            if key in self.graphs:
                continue
            if self._pool is None or not self.shared_pool:
                self._pool = torch.cuda.graph_pool_handle()
            reserved0 = torch.cuda.memory_reserved(device)
            g = torch.Generator(device).manual_seed(0)
            inputs = {
                "hidden_states": torch.randn(b, cfg.in_channels, *latent_hw, device=device, dtype=dtype, generator=g),
                "encoder_hidden_states": torch.randn(b, text_len, cfg.joint_attention_dim, device=device,
                                                     dtype=dtype, generator=g),
                "pooled_projections": torch.randn(b, cfg.pooled_projection_dim, device=device, dtype=dtype,
                                                  generator=g),
                "timestep": torch.full((b,), 500.0, device=device, dtype=torch.float32),
            }
            if self.fed and not self._holds_feed:
                if self._bank.enable_feed(max((*self.buckets, *(buckets or ()))), fixed=True):  # holds it
                    self._holds_feed = True
                else:  # another runner's graphs fixed a smaller buffer: these compute their modulations
                    log.warning("AdaLN feed buffer too small for this runner; its graphs compute modulations")
                    self.fed = False
            if self.capture_stream is None:
                self.capture_stream = torch.cuda.Stream(device)
            try:  # the feed runs before each call, outside the capture: the graph reads the buffer
                graph, out = capture_graph(lambda i=inputs: self._eager(**i, return_dict=False)[0],
                                           pool=self._pool, stream=self.capture_stream,
                                           warmup_iters=self.warmup_iters, before=lambda i=inputs: self._feed(i))
            except GraphCaptureError as exc:  # this shape runs eagerly; the worker still boots
                if self._bank is not None:
                    self._bank.armed = 0  # the capture's feed, perhaps never read
                log.warning("CUDA graph capture failed; shape runs eagerly",
                            extra={"key": key, "error": repr(exc)[:300]})
                self.failed[key] = repr(exc)[:300]
                torch.cuda.synchronize(device)
                continue
            torch.cuda.synchronize(device)
            self.graphs[key] = _Graph(graph, inputs, out)
            reserved = torch.cuda.memory_reserved(device)
            self.memory[key] = {"reserved": reserved, "allocated": torch.cuda.memory_allocated(device),
                                "reserved_growth": reserved - reserved0, "pool": pool_bytes(self._pool)}
            self.captures += 1
            done.append(key)
            log.info("captured CUDA graph", extra={"bucket": b, "latent_hw": latent_hw, "text_len": text_len})
        return done

    def __call__(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                 block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True,
                 skip_layers=None):
        rows = hidden_states.shape[0]
        b = self.bucket(rows)
        key = (b, hidden_states.shape[-2], hidden_states.shape[-1],
               encoder_hidden_states.shape[1] if encoder_hidden_states is not None else -1)
        entry = self.graphs.get(key) if b is not None else None
        if (entry is None or joint_attention_kwargs or block_controlnet_hidden_states is not None
                or skip_layers or pooled_projections is None or timestep is None):
            self.eager_calls += 1
            return self._eager(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                               block_controlnet_hidden_states, joint_attention_kwargs, return_dict, skip_layers)
        ins = entry.inputs
        ins["hidden_states"][:rows].copy_(hidden_states)
        ins["encoder_hidden_states"][:rows].copy_(encoder_hidden_states)
        ins["pooled_projections"][:rows].copy_(pooled_projections)
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        ins["timestep"][:rows].copy_(t.expand(rows) if t.dim() == 0 else t)
        if self.fed and self._bank.armed != rows:  # nobody fed this call (no AdaLNPlan): compute it here
            self._feed(ins, rows)
        entry.graph.replay()
        if self._bank is not None:
            self._bank.armed = 0  # consumed (a replay runs no Python: the last block cannot clear it)
        self.replays += 1
        out = entry.output[:rows].clone()
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    def _feed(self, inputs: dict[str, torch.Tensor], rows: int | None = None) -> None:
        if self.fed:
            from worker.engine.fp8.adaln import feed_call

            feed_call(self.transformer, self._bank, inputs["timestep"][:rows], inputs["pooled_projections"][:rows])

    def install(self) -> None:
        """Route ``transformer(...)`` (as the diffusers pipeline calls it) through this runner."""
        self.transformer.forward = self

    def uninstall(self) -> None:
        if self.transformer.__dict__.get("forward") is self:
            del self.transformer.forward

    def release(self) -> None:
        """Drop every graph and its memory."""
        self.uninstall()
        self.graphs.clear()
        self.memory.clear()
        self._pool = None
        if self._bank is not None:
            if self._holds_feed:
                self._bank.release_feed()  # the buffer goes with the last runner whose graphs read it
                self._holds_feed = False
            self._bank.clear()
        torch.cuda.empty_cache()
