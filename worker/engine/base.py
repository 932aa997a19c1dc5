"""The engine interface the worker talks to.

An engine owns a model on one device. The worker hands it a batch of requests that share a
:class:`~sdfleet.jobs.BatchKey` and gets one uint8 image per request back, in order. Each request carries
its own seed: an image must depend only on its own request, never on its batch mates.
A new backend (TensorRT, say) implements this class and registers in :mod:`worker.engine.registry`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sdfleet.jobs import BatchKey


@dataclass(frozen=True)
class GenerationRequest:
    job_id: str
    prompt: str
    negative_prompt: str
    seed: int


@dataclass
class GenerationResult:
    """``images[i]`` is an HxWx3 uint8 array for ``requests[i]``; timings are seconds by phase.

    A GPU engine may return before its device-to-host copy has finished, so the next batch starts while
    the copy runs: then ``pending`` waits for the copy (and fills in the timings). Consumers call
    :meth:`wait` before reading ``images`` or ``timings``; it is cheap once done and safe from any thread.
    """

    images: list[np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)
    pending: Callable[[], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def wait(self) -> GenerationResult:
        with self._lock:
            if self.pending is not None:
                self.pending()
                self.pending = None
        return self


class Engine(ABC):
    """Load once at worker boot, warm up for configured shapes, then generate batch after batch."""

    #: short name of the model this engine serves (the queue it consumes is derived from it)
    model_name: str = "unknown"
    #: what actually runs, e.g. "fp8", "bf16", "fp32" (after resolving --precision auto)
    precision: str = "fp32"
    device: str = "cpu"

    @abstractmethod
    def load(self) -> None:
        """Load weights and move them to the device. Slow; called once at boot."""

    def warmup(self, keys: Sequence[BatchKey], batch_sizes: Sequence[int] = (1,)) -> None:  # noqa: B027
        """Run (and capture graphs for) the given shapes so the first real job is not slow."""

    @abstractmethod
    def generate(self, key: BatchKey, requests: Sequence[GenerationRequest]) -> GenerationResult:
        """Generate one image per request. Raise :class:`torch.OutOfMemoryError` on OOM (the worker splits)."""

    def describe(self) -> dict[str, object]:
        """What this engine is, for logs, heartbeats and sidecars."""
        return {"model": self.model_name, "precision": self.precision, "device": self.device}

    def close(self) -> None:  # noqa: B027
        """Release device memory."""
