"""GPU timing shared by the benches: a function captured in a CUDA graph, median of its replays."""

from __future__ import annotations

import statistics


def graph_replay_ms(fn, *, warm: int = 3, warm_replays: int = 10, replays: int = 50) -> float:
    """Run ``fn`` eagerly ``warm`` times (compiles, autotunes), capture it, replay ``warm_replays`` times,
    then return the median of ``replays`` CUDA-event timings of one replay, in ms."""
    import torch

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warm_replays):
        graph.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def per_call_ms(fn, *, calls: int = 10, sets: int = 1) -> float:
    """ms a call of ``fn(i)`` for a short kernel: ``calls`` calls captured in one graph (so that the events'
    overhead is spread over them), i cycling over ``sets`` copies of the inputs (so that a call does not find
    its inputs in the L2 the call before it left); median of 10 replays after 5."""
    def many():
        for i in range(calls):
            fn(i % sets)

    return graph_replay_ms(many, warm=2, warm_replays=5, replays=10) / calls


def run_env(script: str, argv: list[str], **extra) -> dict:
    """The ``env`` record of a bench's JSON: date, GPU, versions and the command that ran it."""
    import datetime as dt
    import platform

    import torch

    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, **extra,
           "python": platform.python_version(), "command": f"python {script} " + " ".join(argv)}
    return env
