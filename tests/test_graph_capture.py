"""worker/engine/graphs.py ``capture_graph`` on the CPU, with torch.cuda's stream and graph calls faked (there is no
GPU in CI): which stream each call runs on, and that the caller's stream is current again afterwards, including
after a capture that fails the way torch's does (``torch.cuda.graph.__exit__`` ends the capture, and raises,
before it leaves its stream context). The real capture is tested on the GPU (tests/test_fp8_gpu.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sdfleet.errors import GraphCaptureError
from worker.engine import graphs


class _Stream:
    device = "cuda:0"

    def __init__(self, name: str):
        self.name = name

    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    state = {"current": _Stream("main"), "capture_fails": False}

    @contextlib.contextmanager
    def stream(s):
        old = state["current"]
        state["current"] = s
        try:
            yield
        finally:
            state["current"] = old

    class graph:  # like torch.cuda.graph: its stream is current inside; __exit__ ends the capture first
        def __init__(self, g, pool=None, stream=None):
            self.stream = stream

        def __enter__(self):
            self.old = state["current"]
            state["current"] = self.stream

        def __exit__(self, *exc):
            if state["capture_fails"]:
                raise RuntimeError("operation not permitted when stream is capturing")
            state["current"] = self.old

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: state.__setitem__("current", s))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return state


def test_warmup_before_and_capture_all_run_on_the_sets_own_stream(fake_cuda):
    main, own = fake_cuda["current"], _Stream("own")
    calls = []
    _, out = graphs.capture_graph(lambda: calls.append(fake_cuda["current"].name) or "out", pool=None, stream=own,
                                  warmup_iters=2, before=lambda: calls.append("before@" + fake_cuda["current"].name))
    assert out == "out"
    assert calls == ["before@own", "own", "before@own", "own", "before@own", "own"]
    assert fake_cuda["current"] is main


def test_a_failed_capture_raises_graph_capture_error_and_restores_the_callers_stream(fake_cuda):
    main, own = fake_cuda["current"], _Stream("own")
    fake_cuda["capture_fails"] = True
    with pytest.raises(GraphCaptureError, match="capture failed"):
        graphs.capture_graph(lambda: None, pool=None, stream=own, warmup_iters=1)
    assert fake_cuda["current"] is main  # not the capture stream: later eager work stays off its workspace


def test_a_warmup_error_is_the_eager_calls_own_and_not_a_capture_failure(fake_cuda):
    main, own = fake_cuda["current"], _Stream("own")

    def fn():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # the worker fails to boot loudly, not "runs eagerly"
        graphs.capture_graph(fn, pool=None, stream=own, warmup_iters=1)
    assert fake_cuda["current"] is main
