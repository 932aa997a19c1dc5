"""Whether this torch's CPU backend can run the FP8 linear (row-wise scales in _scaled_mm).

The GPU machine's torch (2.11) cannot: its CPU _scaled_mm takes per-tensor scales only, so the CPU-path checks
of the FP8 engine run in CI (torch 2.13) and are skipped there. Imported by the test modules directly, so it
works under ``pytest --noconftest``.
"""

from __future__ import annotations

import pytest
import torch


def cpu_rowwise_scaled_mm() -> bool:
    try:
        a = torch.ones(2, 16).to(torch.float8_e4m3fn)
        b = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, b.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except RuntimeError:
        return False


cpu_fp8_linear = pytest.mark.skipif(not cpu_rowwise_scaled_mm(),
                                    reason="this torch's CPU _scaled_mm has no row-wise scales (runs in CI)")
