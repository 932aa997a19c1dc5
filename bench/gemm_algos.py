"""Is ``torch._scaled_mm`` at what cuBLASLt can give for the engine's GEMMs? Every algorithm its heuristic offers.

    python bench/gemm_algos.py --out results.json [--models large] [--batch 2] [--count 64]

``torch._scaled_mm`` takes the first algorithm of cuBLASLt's heuristic. For each GEMM of a block at SD3.5's
shapes (``bench/gemm.py``'s list), this asks the heuristic for up to ``--count`` algorithms with the same
description (E4M3 operands, outer-vector scales, bf16 output and bias, fast accumulation: ``bench/cublaslt.py``,
ctypes over cuBLASLt's C API), checks each one's output against ``torch._scaled_mm``'s, and times it as
``bench/gemm.py`` does (10 calls in a CUDA graph, median of 10 replays). Baselines in the same process:
``torch._scaled_mm`` itself (into one output tensor, as the direct calls write, and with a new output each
call, as the engine's graphs call it), and the heuristic's first algorithm through this path (which should
equal the first).
JSON: per model, per GEMM, how many results the heuristic returned and every algorithm's ms, configuration
and whether its output has torch's bits; ``step_ms``: one step's GEMM time with ``torch._scaled_mm``, with the
heuristic's first algorithm called directly, and with the faster of torch and the fastest algorithm per shape.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/queue.py would shadow the standard library's queue module

import argparse
import functools
import json

ROOT = Path(__file__).resolve().parents[1]
CALLS = 10


def sweep(name: str, batch: int, count: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.cublaslt import ScaledMM
    from bench.gemm import block_shapes, mm, operands
    from bench.gputime import per_call_ms
    from worker.engine.sd35_configs import TRANSFORMER

    layers = TRANSFORMER[name]["num_layers"]
    g = torch.Generator(device="cuda").manual_seed(0)
    workspace = torch.empty(32 * 2**20, device="cuda", dtype=torch.uint8)  # torch's own size on Hopper
    out: dict = {"gemms": {}}
    step = {"torch": 0.0, "first": 0.0, "best": 0.0}  # best: the faster of torch and the fastest algorithm
    for key, (m, n, k, calls) in block_shapes(name, batch).items():
        a, w, sa, sw, bias = operands(m, n, k, g)
        ref = mm(a, w, sa, sw, bias)
        # torch writing into one output tensor, as the direct calls below do, so the two compare like with
        # like; and with a new output each call (the other timing), as the engine calls it. Where the output
        # lands can matter for a 20-40 MB output beside a 50 MB L2
        fixed = torch.empty_like(ref)
        call = functools.partial(mm, a, w, sa, sw, bias, fixed)
        t_torch = per_call_ms(lambda _, call=call: call(), calls=CALLS)
        new_out = functools.partial(mm, a, w, sa, sw, bias)
        t_new_out = per_call_ms(lambda _, call=new_out: call(), calls=CALLS)
        op = ScaledMM(a, w, sa.reshape(-1), sw.reshape(-1), bias, workspace)
        rec: dict = {"m": m, "n": n, "k": k, "calls_a_block": calls, "torch_ms": round(t_torch, 4),
                     "torch_new_output_ms": round(t_new_out, 4), "algos": []}
        try:
            results = op.heuristics(count)
            rec["returned"] = len(results)
            for i, h in enumerate(results):  # i: the heuristic's own rank (0 is what torch runs)
                entry = {"rank": i, "state": h.state}
                rec["algos"].append(entry)
                if h.state != 0:  # the heuristic's other fields are not valid for this one
                    continue
                entry.update({"workspace": h.workspaceSize, "waves": round(h.wavesCount, 3), **op.describe(h.algo)})
                op(h.algo)
                torch.cuda.synchronize()
                entry["same_bits"] = bool(torch.equal(op.out, ref))
                err = ((op.out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                entry["max_rel_diff"] = err
                if err > 0.02:  # not the same GEMM: do not time it
                    entry["wrong"] = True
                    continue
                # a failure inside a capture can leave the stream unusable: it ends the run, it is not skipped
                entry["ms"] = round(per_call_ms(lambda _, op=op, h=h: op(h.algo), calls=CALLS), 4)
        finally:
            op.close()
        timed = [e for e in rec["algos"] if "ms" in e]
        first = next((e["ms"] for e in timed if e["rank"] == 0), None)
        rec["first_ms"] = first
        step["first"] += (first if first is not None else t_torch) * calls * layers
        if timed:
            best = min(timed, key=lambda e: e["ms"])
            rec["best_ms"], rec["best_rank"] = best["ms"], best["rank"]
            rec["best_vs_torch"] = round(t_torch / best["ms"], 3)
        step["best"] += min(rec.get("best_ms", t_torch), t_torch) * calls * layers
        step["torch"] += t_torch * calls * layers
        out["gemms"][key] = rec
        print(name, key, json.dumps({x: v for x, v in rec.items() if x != "algos"}), f"{len(timed)} timed", flush=True)
    out["step_ms"] = {x: round(v, 2) for x, v in step.items()}
    print(name, "step_ms", out["step_ms"], flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="large")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--count", type=int, default=64, help="algorithms to ask cuBLASLt's heuristic for")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.cublaslt import versions
    from bench.gputime import run_env

    result = {"env": run_env("bench/gemm_algos.py", sys.argv[1:], **versions()), "models": {}}
    for name in args.models.split(","):
        result["models"][name] = sweep(name, args.batch, args.count)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
