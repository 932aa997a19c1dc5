"""The AdaLN modulations of one transformer call: per block, or all blocks in one GEMM (cuBLASLt or Triton).

    python bench/adaln_gemv.py --out results.json [--models medium,large] [--rows 2,8]

Every block's AdaLN linear reads the same silu(temb) (rows = transformer batch), so the FP8 engine can run
all of them as one GEMM over the concatenated weights (``AdaLNBank``). This times, on the released
configs' shapes with random E4M3 weights, captured in a CUDA graph, median of 50 replays after 10:

- ``per_block``: one quantization, then one ``torch._scaled_mm`` per block (what the engine did before),
- ``bank_cublas``: one quantization and one ``torch._scaled_mm`` over all blocks,
- ``bank_triton``: one quantization and ``kernels.gemv`` over all blocks.

JSON: per model and row count, ms and GB/s of weight streamed for each, and the Triton result's relative
difference to cuBLASLt's.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/queue.py would shadow the standard library's queue module

import argparse
import json

ROOT = Path(__file__).resolve().parents[1]


def widths(name: str) -> tuple[int, list[int]]:
    """(hidden size, AdaLN outputs per block) of a released config."""
    from worker.engine.sd35_configs import TRANSFORMER

    cfg = TRANSFORMER[name]
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n, dual = cfg["num_layers"], set(cfg.get("dual_attention_layers") or ())
    out = []
    for i in range(n):
        img = 9 if i in dual else 6
        ctx = 2 if i == n - 1 else 6  # the last block is context_pre_only
        out.append((img + ctx) * d)
    return d, out


def run(name: str, rows: int) -> dict:
    import torch

    from bench.gputime import graph_replay_ms
    from worker.engine.fp8 import kernels
    from worker.engine.fp8.quant import E4M3, quantize_rows

    d, outs = widths(name)
    n = sum(outs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.empty((n, d), device="cuda", dtype=E4M3)
    for i in range(0, n, 65536):  # chunked: a bf16 copy of all of Large's would be 5 GiB
        w[i:i + 65536] = (torch.randn((min(65536, n - i), d), device="cuda", generator=gen) * 100).clamp(-448, 448).to(E4M3)
    ws = torch.rand(n, device="cuda", generator=gen) * 1e-3 + 1e-4
    bias = torch.randn(n, device="cuda", generator=gen).bfloat16()
    temb = torch.randn(rows, d, device="cuda", generator=gen).bfloat16()
    starts = [sum(outs[:i]) for i in range(len(outs))]

    def quant():
        return quantize_rows(torch.nn.functional.silu(temb))

    def mm(x, lo, hi):
        return torch._scaled_mm(x.data, w[lo:hi].t(), scale_a=x.scale, scale_b=ws[lo:hi].reshape(1, -1),
                                bias=bias[lo:hi], out_dtype=torch.bfloat16, use_fast_accum=True)

    def per_block():
        x = quant()
        return [mm(x, s, s + o) for s, o in zip(starts, outs)]

    def bank_cublas():
        return mm(quant(), 0, n)

    def bank_triton():
        return kernels.gemv(quant(), w, ws, bias, torch.bfloat16)

    a, b = bank_cublas().float(), bank_triton().float()
    res = {"hidden": d, "blocks": len(outs), "outputs": n, "weight_gb": round(n * d / 1e9, 3),
           "triton_rel_diff_vs_cublas": float((a - b).norm() / a.norm())}
    for label, fn in (("per_block", per_block), ("bank_cublas", bank_cublas), ("bank_triton", bank_triton)):
        ms = graph_replay_ms(fn)
        res[label] = {"ms": round(ms, 4), "weight_gb_per_s": round(n * d / ms / 1e6, 1)}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="medium,large")
    ap.add_argument("--rows", default="2,8")
    args = ap.parse_args()
    import torch

    sys.path.insert(0, str(ROOT))
    out = {"env": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "command": "python bench/adaln_gemv.py " + " ".join(sys.argv[1:])}, "results": {}}
    import triton

    out["env"]["triton"] = triton.__version__
    for name in args.models.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            out["results"][f"{name}/rows{rows}"] = r = run(name, rows)
            print(name, rows, json.dumps(r), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
