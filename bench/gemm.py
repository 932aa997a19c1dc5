"""The FP8 engine's GEMMs alone, at SD3.5's shapes: what cuBLASLt gives for each, and for its variants.

    python bench/gemm.py --out results.json [--models medium,large] [--batch 2]
        [--envs "CUBLASLT_WORKSPACE_SIZE=1024;CUBLASLT_WORKSPACE_SIZE=65536"]

For each linear of a transformer block (q/k/v, output projection, feed-forward up and down) at the image
stream's rows (the feed-forward at its chunk of ``Fp8Options.ff_chunk_rows``) and the text stream's, times
``torch._scaled_mm`` on E4M3 operands with a bf16 output and fast accumulation, as the engine calls it (``Fp8Linear``: one scale
a row of the activation, one a column of the weight, the bias in the epilogue), and beside it:

- ``nobias``: the same without the bias (which a consumer pass could add instead);
- ``tensor``: one scale for each operand (cuBLASLt's most tuned FP8 path), no bias;
- with ``--text-rows``: the text stream's GEMMs as the engine calls them at other row counts (``rows``).

Each is captured in a CUDA graph of 10 calls; median replay of 10, ms a call and TFLOP/s (2 M N K). With
``--envs``, each setting runs in its own process (cuBLASLt reads its environment once). JSON: per setting,
per model, per GEMM; ``step_ms``: one step's GEMM time at the engine's call (one block's GEMMs times the
block count; the text stream's beside the image stream's on the GPU, so summed here as an upper bound).
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/queue.py would shadow the standard library's queue module

import argparse
import functools
import json
import os
import subprocess

ROOT = Path(__file__).resolve().parents[1]
CALLS = 10


def block_shapes(name: str, batch: int) -> dict[str, tuple[int, int, int, int]]:
    """A block's GEMMs as the engine calls them: name -> (rows, N, K, calls a block); the feed-forward's image
    rows in chunks of ``Fp8Options.ff_chunk_rows``."""
    from worker.engine.fp8.options import Fp8Options
    from worker.engine.sd35_configs import TEXT_TOKENS, TRANSFORMER

    cfg = TRANSFORMER[name]
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    img, txt = batch * 4096, batch * TEXT_TOKENS
    ff_rows = min(Fp8Options().ff_chunk_rows or img, img)
    return {
        "qkv": (img, 3 * d, d, 1), "out": (img, d, d, 1),
        "up": (ff_rows, 4 * d, d, img // ff_rows), "down": (ff_rows, d, 4 * d, img // ff_rows),
        "text_qkv": (txt, 3 * d, d, 1), "text_out": (txt, d, d, 1),
        "text_up": (txt, 4 * d, d, 1), "text_down": (txt, d, 4 * d, 1),
    }


def operands(m: int, n: int, k: int, g):
    """Random E4M3 activation (m, k) and weight (n, k), their row and column scales, a bf16 bias."""
    import torch

    e4m3 = torch.float8_e4m3fn
    a = torch.randn(m, k, device="cuda", generator=g).to(e4m3)
    w = torch.randn(n, k, device="cuda", generator=g).to(e4m3)
    sa = torch.rand(m, 1, device="cuda", generator=g) + 0.5
    sw = torch.rand(1, n, device="cuda", generator=g) + 0.5
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    return a, w, sa, sw, bias


def mm(a, w, sa, sw, bias, out=None):
    """The engine's call (``Fp8Linear``); ``out``: write there instead of a new tensor."""
    import torch

    kw = {"out": out} if out is not None else {}
    return torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw, bias=bias, out_dtype=torch.bfloat16,
                            use_fast_accum=True, **kw)


def run_model(name: str, batch: int, text_rows: list[int]) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.gputime import per_call_ms
    from worker.engine.sd35_configs import TRANSFORMER

    cfg = TRANSFORMER[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    e4m3 = torch.float8_e4m3fn
    out: dict = {"gemms": {}}
    step = {"engine": 0.0, "nobias": 0.0, "tensor": 0.0}
    for key, (m, n, k, calls) in block_shapes(name, batch).items():
        a, w, sa, sw, bias = operands(m, n, k, g)
        one = torch.ones((), device="cuda")
        fns = {
            "engine": functools.partial(mm, a, w, sa, sw, bias),
            "nobias": functools.partial(mm, a, w, sa, sw, None),
            "tensor": functools.partial(mm, a, w, one, one, None),
        }
        rec = {"m": m, "n": n, "k": k, "calls_a_block": calls}
        for label, fn in fns.items():
            ms = per_call_ms(lambda _, fn=fn: fn(), calls=CALLS)
            rec[label] = {"ms": round(ms, 4), "tflops": round(2 * m * n * k / ms / 1e9, 1)}
            step[label] += ms * calls * cfg["num_layers"]
        if key.startswith("text_"):  # the same GEMM at other row counts: is 666 a poor shape for cuBLASLt?
            rec["rows"] = {}
            for mm_rows in text_rows:
                a2 = torch.randn(mm_rows, k, device="cuda", generator=g).to(e4m3)
                sa2 = torch.rand(mm_rows, 1, device="cuda", generator=g) + 0.5
                fn = functools.partial(mm, a2, w, sa2, sw, bias)
                ms = per_call_ms(lambda _, fn=fn: fn(), calls=CALLS)
                rec["rows"][mm_rows] = {"ms": round(ms, 4), "tflops": round(2 * mm_rows * n * k / ms / 1e9, 1)}
        out["gemms"][key] = rec
        print(name, key, json.dumps(rec), flush=True)
    out["step_ms"] = {k: round(v, 2) for k, v in step.items()}
    print(name, "step_ms", out["step_ms"], flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="medium,large")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-rows", default="", help="the text stream's GEMMs also at these row counts (engine call)")
    ap.add_argument("--envs", default="", help='";"-separated settings, each "NAME=VALUE[,NAME=VALUE]"')
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: this environment only
    args = ap.parse_args()
    if args.envs and not args.one:
        result: dict = {"env": {"command": "python bench/gemm.py " + " ".join(sys.argv[1:])}, "settings": {}}
        for setting in args.envs.split(";"):
            env = dict(os.environ, **dict(kv.split("=", 1) for kv in setting.split(",") if kv))
            child = Path(args.out).with_suffix(".part.json")
            subprocess.run([sys.executable, __file__, "--out", str(child), "--models", args.models,
                            "--batch", str(args.batch), "--text-rows", args.text_rows, "--one"], env=env, check=True)
            part = json.loads(child.read_text())
            child.unlink()
            result["env"].update({k: v for k, v in part["env"].items() if k != "command"})
            result["settings"][setting] = part["models"]
            Path(args.out).write_text(json.dumps(result, indent=1))
        return 0
    sys.path.insert(0, str(ROOT))
    from bench.gputime import run_env

    result = {"env": run_env("bench/gemm.py", sys.argv[1:]), "models": {}}
    for name in args.models.split(","):
        result["models"][name] = run_model(name, args.batch, [int(r) for r in args.text_rows.split(",") if r])
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
