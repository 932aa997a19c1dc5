"""The FP8 engine's memory-bound passes alone, at SD3.5's shapes, against a copy of the same bytes.

    python bench/elementwise.py --out results.json [--models medium,large] [--batch 2]

Times, at the shapes of one transformer step (1024 px, 333 text tokens a prompt), each pass the engine
runs between its GEMMs and attention (`worker/engine/fp8/kernels.py`, `attention.prep_joint`):

- ``ln``: LayerNorm + AdaLN modulate -> E4M3 rows, with the gated residual add in front (the blocks'
  usual case) and without it, at 1, 2 and 4 rows a program (``kernels.LN_ROWS``), with the shift and scale
  loaded after the rows' statistics or with the rows (``-early``, ``kernels.LN_EARLY_MOD``);
- ``gelu``: GELU(tanh) -> E4M3 rows of the feed-forward's hidden activation, at the engine's chunk of rows,
  with GELU's tanh as one MUFU op and as the EX2 + RCP form (``kernels.GELU_MUFU_TANH``);
- ``prep``: ``prep_joint`` (q/k RMSNorm and quantization, V's amax, then V's quantization pass).

Each is captured in a CUDA graph of 10 calls, on three copies of its inputs in turn (so that a call does not
find its inputs in the L2); the figure is the median replay over 10 (ms a call). ``gbps`` counts the bytes
the pass must move (each input read once, each output written once); ``of_copy``: against a bf16 copy kernel
of the same number of bytes, ``of_hbm_copy``: against a copy of 1 GiB (``hbm_copy_gbps``), both in the same
run. JSON: per model, per pass, per setting.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/queue.py would shadow the standard library's queue module

import argparse
import itertools
import json

ROOT = Path(__file__).resolve().parents[1]
CALLS = 10  # calls a replay: one pass is 20-100 us, so a replay of ten keeps the events' overhead out
SETS = 3  # copies of each input, used in turn: 3 x 60-240 MB is well over the L2 (50 MB on the H100/H200)


def timed(fn, sets: int = 1) -> float:
    """ms a call of ``fn(i)``, i cycling over ``sets`` copies of the inputs."""
    from bench.gputime import per_call_ms

    return per_call_ms(fn, calls=CALLS, sets=sets)


def copy_gbps(nbytes: int) -> float:
    """A bf16 copy kernel moving ``nbytes`` (read + write), on SETS copies like the passes."""
    import torch

    n = nbytes // 4  # read n bf16 and write n bf16: 4 bytes an element
    src = [torch.randn(n, device="cuda").bfloat16() for _ in range(SETS)]
    dst = [torch.empty_like(t) for t in src]
    # a kernel, not copy_: inside a CUDA graph a same-dtype copy_ is a memcpy node, which can run on the
    # copy engines (measured ~2.7 TB/s on the H200, where kernels move ~4.3)
    ms = timed(lambda i: torch.neg(src[i], out=dst[i]), SETS)
    return nbytes / ms / 1e6


def rec(ms: float, nbytes: int, ref_gbps: float, hbm_gbps: float) -> dict:
    gbps = nbytes / ms / 1e6
    return {"ms": round(ms, 4), "gbps": round(gbps, 1), "of_copy": round(gbps / ref_gbps, 3),
            "of_hbm_copy": round(gbps / hbm_gbps, 3)}


def run_model(name: str, batch: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from worker.engine.fp8 import attention as att
    from worker.engine.fp8 import kernels
    from worker.engine.sd35_configs import TEXT_TOKENS, TRANSFORMER

    cfg = TRANSFORMER[name]
    heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    d = heads * hd
    img_rows, txt_rows = batch * 4096, batch * TEXT_TOKENS
    g = torch.Generator(device="cuda").manual_seed(0)

    def rn(*shape):
        return torch.randn(*shape, device="cuda", generator=g).bfloat16()

    out: dict = {"heads": heads, "dim": d, "image_rows": img_rows, "text_rows": txt_rows}

    # LayerNorm + modulate (+ gated residual) -> E4M3: reads x (and y), writes E4M3 (and the new residual)
    ln: dict = {}
    mod = rn(batch, 6 * d)
    shift, scale, gate = mod.chunk(6, 1)[:3]
    hbm = copy_gbps(2**30)  # a copy far beyond the L2: the bandwidth of HBM itself
    out["hbm_copy_gbps"] = round(hbm, 1)
    print(name, "hbm copy GB/s", out["hbm_copy_gbps"], flush=True)
    for rows, label in ((img_rows, "image"), (txt_rows, "text")):
        length = rows // batch
        xs = [rn(batch, length, d) for _ in range(SETS)]
        ys = [rn(batch, length, d) for _ in range(SETS)]
        for res in (False, True):
            nbytes = rows * d * ((2 + 2 + 2 + 1) if res else (2 + 1))
            ref = copy_gbps(nbytes)
            for per, early in itertools.product((1, 2, 4), (False, True)):
                if per > 1 and length % per:
                    continue
                key = f"{label}{'-residual' if res else ''}-rows{per}{'-early' if early else ''}"
                ms = timed(lambda i, xs=xs, ys=ys, res=res, per=per, early=early: kernels.ln_modulate_quant(
                    xs[i], shift, scale, residual=(ys[i], gate) if res else None, rows=per, early=early), SETS)
                ln[key] = rec(ms, nbytes, ref, hbm)
                print(name, "ln", key, ln[key], flush=True)
    out["ln"] = ln

    # GELU -> E4M3 on the feed-forward's hidden activation: reads bf16, writes E4M3
    from worker.engine.fp8.options import Fp8Options

    hidden = 4 * d
    gelu: dict = {}
    chunk = Fp8Options().ff_chunk_rows or img_rows
    for rows in sorted({min(chunk, img_rows), img_rows, txt_rows}):
        hs = [rn(rows, hidden) for _ in range(SETS)]
        nbytes = rows * hidden * 3
        ref = copy_gbps(nbytes)
        for tanh in (False, True):
            key = f"rows{rows}-{'tanh' if tanh else 'ex2rcp'}"
            ms = timed(lambda i, hs=hs, tanh=tanh: kernels.quant_rows(hs[i], gelu=True, tanh=tanh), SETS)
            gelu[key] = rec(ms, nbytes, ref, hbm)
            print(name, "gelu", key, gelu[key], flush=True)
    out["gelu"] = gelu

    # prep_joint: reads q/k/v of both streams (V twice), writes INT8 q/k and E4M3 V
    imgs = [rn(img_rows, 3 * d) for _ in range(SETS)]
    ctxs = [rn(txt_rows, 3 * d) for _ in range(SETS)]
    w = torch.ones(2, hd, device="cuda", dtype=torch.bfloat16)
    rows = img_rows + txt_rows
    nbytes = rows * d * (3 * 2 + 2 + 3 * 1)
    ref = copy_gbps(nbytes)
    ms = timed(lambda i: att.prep_joint(imgs[i], ctxs[i], w, w, batch=batch, heads=heads), SETS)
    out["prep"] = {"prep_joint": rec(ms, nbytes, ref, hbm)}
    print(name, "prep", out["prep"], flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="medium,large")
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    import triton

    sys.path.insert(0, str(ROOT))
    from bench.gputime import run_env

    result = {"env": run_env("bench/elementwise.py", sys.argv[1:], triton=triton.__version__), "models": {}}
    for name in args.models.split(","):
        result["models"][name] = run_model(name, args.batch)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
