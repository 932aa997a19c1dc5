"""The null engine: no model, a tiny constant image per job. Measures the queue, not the GPU."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from sdfleet.jobs import BatchKey
from worker.engine.base import Engine, GenerationRequest, GenerationResult


class NullEngine(Engine):
    model_name = "null"
    precision = "none"

    def __init__(self, delay_s: float = 0.0, side: int = 8, crash_prompt: str | None = None,
                 hang_prompt: str | None = None):
        self.delay_s = delay_s
        self.side = side
        # For crash-safety tests: a job with this prompt kills the process, as a segfaulting kernel would,
        # and one with ``hang_prompt`` never returns, as a hung CUDA call would.
        self.crash_prompt = crash_prompt
        self.hang_prompt = hang_prompt

    def load(self) -> None:
        pass

    def generate(self, key: BatchKey, requests: Sequence[GenerationRequest]) -> GenerationResult:
        t0 = time.perf_counter()
        if self.crash_prompt is not None and any(r.prompt == self.crash_prompt for r in requests):
            os._exit(137)
        if self.hang_prompt is not None and any(r.prompt == self.hang_prompt for r in requests):
            while True:
                time.sleep(3600)
        if self.delay_s:
            time.sleep(self.delay_s)
        # The seed decides the pixel value, so tests can still tell jobs apart.
        images = [np.full((self.side, self.side, 3), r.seed % 251, dtype=np.uint8) for r in requests]
        return GenerationResult(images, {"engine_s": time.perf_counter() - t0})
