"""Choosing the engine for ``sdfleet worker --model``: ``null`` (queue benchmarks), ``tiny`` or a path."""

from __future__ import annotations

from typing import Any

from worker.engine.base import Engine


def build_engine(model: str, *, device: str, precision: str, log: Any = None, **extra: Any) -> Engine:
    if model == "null":
        from worker.engine.null import NullEngine

        return NullEngine(delay_s=float(extra.get("null_delay_s", 0.0)), crash_prompt=extra.get("null_crash_prompt"),
                          hang_prompt=extra.get("null_hang_prompt"))
    from worker.engine.diffusers_engine import DiffusersEngine, EngineOptions

    allowed = {k: v for k, v in extra.items() if k in EngineOptions.__dataclass_fields__}
    return DiffusersEngine(EngineOptions(model=model, device=device, precision=precision, **allowed), log=log)
