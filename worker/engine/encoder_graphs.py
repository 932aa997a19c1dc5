"""CUDA graphs of the text encoders (CLIP-L, CLIP-G, T5-XXL), one per (encoder, prompt-count bucket).

A prompt's encoding is about a thousand small kernels (T5-XXL's 24 blocks, CLIP-G's 32, each a dozen
launches; more with the FP8 T5, whose linears quantize their inputs), so it is bound by the host's launches,
not by the GPU: a captured graph launches them all at once. The encoders' inputs have fixed shapes (token
ids padded to 77 and 256), so one graph per prompt count serves every prompt. The diffusers pipeline still
tokenizes and calls ``text_encoder(input_ids, ...)`` as it always does; the call replays a graph when one
fits (fewer prompts than a bucket are padded up to it: an encoder's rows never see each other) and runs
eagerly otherwise.

The graphs replay on the engine's encoding stream, beside the transformer's graphs on the main stream, so
they have a memory pool of their own; within it they replay one after another on one stream and each output
is copied out right after its replay, so they share it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdfleet.errors import EngineError, GraphCaptureError
from worker.engine.graphs import capture_graph

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    output: Any


def _copy_rows(out: Any, rows: int, bucket: int) -> Any:
    """The first ``rows`` rows of every tensor in a model output (tensors, tuples, ModelOutputs), copied out of
    the graph's memory: the next replay overwrites it."""
    if isinstance(out, torch.Tensor):
        return (out[:rows] if out.dim() and out.shape[0] == bucket else out).clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_copy_rows(t, rows, bucket) for t in out)
    if isinstance(out, dict):  # transformers' ModelOutput (a dataclass and an OrderedDict)
        return type(out)(**{k: _copy_rows(v, rows, bucket) for k, v in out.items()})
    return out


class ModuleGraphs:
    """Stands in for ``module.forward(input_ids, **flags)``: replays a graph captured for the bucket holding
    the call's prompt count, with the same non-tensor flags (``output_hidden_states=True`` for CLIP)."""

    def __init__(self, module: torch.nn.Module, buckets: Sequence[int], pool, *, warmup_iters: int = 2,
                 stream=None):
        self.module = module
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        self.pool = pool
        #: the stream its graphs are captured on (``graphs.capture_graph``: never the transformer's)
        self.stream = stream
        self.warmup_iters = warmup_iters
        self._eager = type(module).forward.__get__(module)
        self.graphs: dict[tuple, _Graph] = {}
        self.failed: dict[tuple, str] = {}
        self.replays = 0
        self.eager_calls = 0

    @staticmethod
    def _key(bucket: int, length: int, flags: dict) -> tuple:
        return (bucket, length, tuple(sorted(flags.items())))

    def capture(self, length: int, pad_id: int = 0, **flags) -> list[tuple]:
        """One graph per bucket for token ids of ``length`` (largest first: the smaller ones reuse its memory)."""
        device = next(self.module.parameters()).device
        if device.type != "cuda":
            raise EngineError("text encoder graphs need the encoder on a CUDA device")
        done = []
        for b in sorted(self.buckets, reverse=True):
            key = self._key(b, length, flags)
            if key in self.graphs:
                continue
            ids = torch.full((b, length), pad_id, dtype=torch.long, device=device)
            ids[:, 0] = pad_id + 1  # not all padding: some encoders look for their EOS token's position
            if self.stream is None:
                self.stream = torch.cuda.Stream(device)
            try:
                graph, out = capture_graph(lambda i=ids: self._eager(i, **flags), pool=self.pool, stream=self.stream,
                                           warmup_iters=self.warmup_iters)
            except GraphCaptureError as exc:  # e.g. a host synchronisation inside the encoder: it runs eagerly
                log.warning("text encoder graph capture failed; it runs eagerly",
                            extra={"encoder": type(self.module).__name__, "bucket": b, "error": repr(exc)[:300]})
                self.failed[key] = repr(exc)[:300]
                torch.cuda.synchronize(device)
                continue
            torch.cuda.synchronize(device)
            self.graphs[key] = _Graph(graph, ids, out)
            done.append(key)
        return done

    def __call__(self, input_ids=None, *args, **kwargs):
        flags_only = not args and all(not isinstance(v, torch.Tensor) for v in kwargs.values())
        entry = None
        if flags_only and isinstance(input_ids, torch.Tensor) and input_ids.is_cuda and input_ids.dim() == 2:
            rows = input_ids.shape[0]
            b = next((x for x in self.buckets if x >= rows), None)
            if b is not None:
                entry = self.graphs.get(self._key(b, input_ids.shape[1], kwargs))
        if entry is None:
            self.eager_calls += 1
            return self._eager(input_ids, *args, **kwargs)
        entry.input_ids[:rows].copy_(input_ids)
        entry.graph.replay()
        self.replays += 1
        return _copy_rows(entry.output, rows, entry.input_ids.shape[0])

    def install(self) -> None:
        self.module.forward = self

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward


class EncoderGraphs:
    """The graphs of a StableDiffusion3Pipeline's text encoders, for prompt counts up to the largest bucket."""

    def __init__(self, pipe, buckets: Sequence[int]):
        if not buckets or any(int(b) < 1 for b in buckets):
            raise EngineError(f"text encoder buckets must be positive integers, got {buckets!r}")
        self.pool = None  # made at the first capture (it needs CUDA), with the capture stream
        self.stream = None
        self.parts: dict[str, tuple[ModuleGraphs, int, int, dict]] = {}
        clip_len = pipe.tokenizer_max_length
        for name, flags, tok in (("text_encoder", {"output_hidden_states": True}, "tokenizer"),
                                 ("text_encoder_2", {"output_hidden_states": True}, "tokenizer_2"),
                                 ("text_encoder_3", {}, "tokenizer_3")):
            module = getattr(pipe, name, None)
            if module is None:
                continue
            tokenizer = getattr(pipe, tok, None)
            pad = getattr(tokenizer, "pad_token_id", None) or 0
            length = clip_len if name != "text_encoder_3" else None
            self.parts[name] = (ModuleGraphs(module, buckets, None), length, pad, flags)

    def capture(self, t5_length: int) -> int:
        """Capture every encoder at every bucket; ``t5_length``: T5's padded length (max_sequence_length)."""
        n = 0
        for graphs, length, pad, flags in self.parts.values():
            if self.pool is None and next(graphs.module.parameters()).is_cuda:  # else capture() says why not
                self.pool = torch.cuda.graph_pool_handle()
                # one capture stream for the three encoders: they replay one after another, so their graphs
                # may share its cuBLAS workspace, but not with the transformer's, which replay beside them
                self.stream = torch.cuda.Stream(next(graphs.module.parameters()).device)
            graphs.pool, graphs.stream = self.pool, self.stream
            n += len(graphs.capture(length or t5_length, pad, **flags))
        return n

    def install(self) -> None:
        for graphs, *_ in self.parts.values():
            graphs.install()

    def release(self) -> None:
        for graphs, *_ in self.parts.values():
            graphs.uninstall()
            graphs.graphs.clear()
        self.parts.clear()
        self.pool = self.stream = None

    @property
    def replays(self) -> int:
        return sum(g.replays for g, *_ in self.parts.values())

    @property
    def eager_calls(self) -> int:
        return sum(g.eager_calls for g, *_ in self.parts.values())

    @property
    def failed(self) -> dict[str, str]:
        return {f"{name}{key}": err for name, (g, *_) in self.parts.items() for key, err in g.failed.items()}
