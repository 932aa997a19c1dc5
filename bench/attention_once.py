"""Launch one attention kernel a few times, for a profiler to attach to (Nsight Compute's stall reasons).

    ncu --kernel-name regex:_attn --launch-skip 2 --launch-count 1 --section WarpStateStats \\
        --section SchedulerStats --section InstructionStats python bench/attention_once.py --kernel pipe

--kernel: a Gluon variant (worker/engine/fp8/attention_gluon.py VARIANTS) or "engine" (the engine's Triton kernel,
K/V quantized once, then ``fp8_attention_quantized``). Shape (B, H, S, 64), random normal q/k/v.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--shape", default="2,38,4429")
    ap.add_argument("--launches", type=int, default=4)
    a = ap.parse_args()
    import torch

    from worker.engine.fp8 import attention as att
    from worker.engine.fp8 import attention_gluon as ag

    B, H, S = (int(x) for x in a.shape.split(","))
    q, k, v = att.sample_qkv("randn", B, H, S, 64, seed=1, device="cuda")
    if a.kernel == "engine":
        kv = att.quantize_kv(k, v)
        out = torch.empty_like(q)
        launch = lambda: att.fp8_attention_quantized(q, kv, out=out)  # noqa: E731
    else:
        if a.kernel not in ag.VARIANTS:
            print(f"--kernel: {a.kernel!r} is not 'engine' or one of {sorted(ag.VARIANTS)}", file=sys.stderr)
            return 2
        prep = ag.prepare(q, k, v, qk=ag.VARIANTS[a.kernel]["qk"])
        out = torch.empty_like(q)
        launch = lambda: ag.gluon_attention_quantized(prep, a.kernel, out=out)  # noqa: E731
    for _ in range(a.launches):
        launch()
    torch.cuda.synchronize()
    print(a.kernel, "launched", a.launches, "times", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
