"""Counting what compiles in this process: Triton JIT compiles and torch.compile graphs.

A worker must compile and capture everything at boot; a compile during the stream is a stall of seconds
on the GPU's critical path. These counters are cheap to read (a few integers), so the engine reports them
in ``describe()`` (heartbeats) and benchmarks read them before and after a stream of jobs.

- Triton: a hook on ``triton.knobs.runtime.jit_post_compile_hook`` (Triton >= 3.4), called once per kernel
  binary that enters a JIT function's in-memory cache: a fresh compile, a load from Triton's disk cache,
  and each config an autotuner tries. Any of these during a stream means a shape or specialisation that
  boot did not cover. An earlier hook is kept and called first.
- torch.compile: dynamo's own ``counters["stats"]["unique_graphs"]``, the count its tests read (torch has
  no public counter of compiled graphs). Zero when dynamo was never imported.
"""

from __future__ import annotations

import sys
import threading

_lock = threading.Lock()
_triton_compiles = 0
_installed: bool | None = None  # None: not tried; False: Triton absent or without the hook


def install_triton_counter() -> bool:
    """Install the Triton compile hook once per process; False when Triton (or its hook) is absent."""
    global _installed
    with _lock:
        if _installed is not None:
            return _installed
        try:
            from triton import knobs
        except ImportError:  # no Triton (CPU machines), or one older than the knobs API
            _installed = False
            return False
        previous = knobs.runtime.jit_post_compile_hook

        def counted(*args, **kwargs):
            global _triton_compiles
            with _lock:
                _triton_compiles += 1
            if previous is not None:
                return previous(*args, **kwargs)
            return None

        knobs.runtime.jit_post_compile_hook = counted
        _installed = True
        return True


def triton_compiles() -> int | None:
    """Kernel binaries compiled (or loaded) since the hook was installed; None without Triton."""
    return _triton_compiles if _installed else None


def torch_compiles() -> int:
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return 0
    try:
        return int(dynamo.utils.counters["stats"]["unique_graphs"])
    except (AttributeError, KeyError, TypeError):  # moved in a newer torch: report nothing rather than fail
        return 0
