"""Gluon FP8 attention prototype (worker/engine/fp8/attention_gluon.py) vs cuDNN BF16 SDPA and the Triton kernel.

    python bench/attention_gluon.py --out FILE.json [--variants pipe,pipe_t,pipe_i8,pipe_i8_t,ws3_t,pipe_x3]
        [--budget 240]

Shapes (B, H, S, 64): (2,38,4429), (2,24,4429), (8,38,4429), non-causal. For each shape:

* errors ||o - ref|| / ||ref|| against fp32 SDPA (math backend) on batch element 0, random normal q/k/v;
  for (2,24,4429) also "peaky" q/k (RMS-normed with per-channel gains and a shared K offset);
* times (CUDA-graph replays, median of per-replay CUDA events after warm-up; eager events if capture fails):
  cuDNN BF16 SDPA; the Triton kernel end to end (``fp8_attention``) and alone (``quantize_kv`` once, then
  ``fp8_attention_quantized``); each Gluon variant alone (``prepare`` once, torch ops, then the kernel).
  TFLOP/s = 4*B*H*S*S*D / t.

Every Gluon variant runs in its own child process with a timeout (a hung mbarrier wait cannot stall the run), after a
small scheme check (kernel vs the pure-torch emulation of its arithmetic, poisoned output, S=1357). Baselines run in
the parent. Everything is in try/except; results and errors go to --out (rewritten after each step).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, bench/ comes first on sys.path: put the repository root there instead (attention.py imports
# worker.engine.precision).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
import traceback

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(2, 38, 4429, 64), (2, 24, 4429, 64), (8, 38, 4429, 64)]
PEAKY_SHAPE = (2, 24, 4429, 64)
CHECK_SHAPE = (1, 3, 1357, 64)


def _load(name: str, rel: str):
    # by path: worker/engine/fp8/__init__.py imports the whole engine (pydantic, diffusers ...)
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel(a, b) -> float:
    a = a.double()
    b = b.double()
    return ((a - b).norm() / b.norm()).item()


def flops(shape) -> float:
    B, H, S, D = shape
    return 4.0 * B * H * S * S * D


def time_events(torch, fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev)


def time_fn(torch, fn, warmup: int = 5, iters: int = 30) -> tuple[float, str]:
    """(median ms, how): CUDA-graph replays, or eager CUDA events if the capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        ms = time_events(torch, g.replay, warmup, iters)
        del g
        return ms, "graph"
    except Exception as exc:  # pragma: no cover
        print("graph capture failed, eager timing:", type(exc).__name__, str(exc)[:200], flush=True)
        return time_events(torch, fn, warmup, iters), "eager"


def make_inputs(torch, kind: str, shape, seed: int):
    from worker.engine.fp8.attention import sample_qkv

    return list(sample_qkv(kind, *shape, seed=seed, device="cuda"))


def ref32(torch, q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float())


def seed_of(kind, shape) -> int:
    B, H, S, _ = shape
    return (1 if kind == "randn" else 2) * 100000 + B * 1000 + H + S


def cases():
    out = [("randn", s) for s in SHAPES]
    out.append(("peaky", PEAKY_SHAPE))
    return out


def key(kind, shape) -> str:
    return f"{kind}@{shape[0]},{shape[1]},{shape[2]},{shape[3]}"


# ------------------------------------------------------------------------------------------------
# child: one Gluon variant
# ------------------------------------------------------------------------------------------------


def child(variant: str, out_file: str) -> int:
    res = {"variant": variant, "rows": {}, "status": "started"}

    def dump():
        Path(out_file).write_text(json.dumps(res, indent=2))

    dump()
    try:
        import torch

        ag = _load("sdfleet_attention_gluon", "worker/engine/fp8/attention_gluon.py")
        cfg = ag.VARIANTS[variant]
        res["config"] = cfg
        # 1) scheme check (also the first launch: JIT compile; a hang here is caught by the parent's timeout)
        q, k, v = make_inputs(torch, "randn", CHECK_SHAPE, seed=1)
        prep = ag.prepare(q, k, v, qk=cfg["qk"])
        o = torch.full(CHECK_SHAPE, float("nan"), device="cuda", dtype=torch.bfloat16)
        t0 = time.time()
        ag.gluon_attention_quantized(prep, variant, out=o)
        torch.cuda.synchronize()
        res["first_launch_s"] = time.time() - t0
        kern = prep.get("_kernel")
        if kern is not None:
            for attr in ("n_regs", "n_spills"):
                try:
                    res[attr] = int(getattr(kern, attr))
                except Exception as exc:
                    res[attr] = repr(exc)
            try:
                res["shared_bytes"] = int(kern.metadata.shared)
                res["num_warps"] = int(kern.metadata.num_warps)
            except Exception:
                pass
        emu = ag.emulate(prep).reshape(CHECK_SHAPE)
        res["scheme_check"] = {
            "all_written_finite": bool(torch.isfinite(o).all().item()),
            "rel_vs_emulation": rel(o, emu),
            "rel_vs_fp32": rel(o, torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())),
        }
        res["status"] = "scheme_checked"
        print(variant, "scheme check", res["scheme_check"], flush=True)
        dump()
        del prep, o, emu
        # 2) shapes
        for kind, shape in cases():
            row = {}
            try:
                q, k, v = make_inputs(torch, kind, shape, seed_of(kind, shape))
                r = ref32(torch, q, k, v)
                t0 = time.time()
                prep = ag.prepare(q, k, v, qk=cfg["qk"])
                torch.cuda.synchronize()
                row["prepare_s"] = time.time() - t0
                out = torch.empty_like(q)
                ag.gluon_attention_quantized(prep, variant, out=out)
                torch.cuda.synchronize()
                row["rel_vs_fp32"] = rel(out[:1], r)
                row["finite"] = bool(torch.isfinite(out).all().item())
                if kind == "randn":
                    ms, how = time_fn(torch, functools.partial(ag.gluon_attention_quantized, prep, variant, out=out))
                    row["kernel_ms"] = ms
                    row["kernel_tflops"] = flops(shape) / ms / 1e9
                    row["timing"] = how
                del q, k, v, r, prep, out
                torch.cuda.empty_cache()
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:3000]
                row["traceback"] = traceback.format_exc()[-4000:]
            res["rows"][key(kind, shape)] = row
            print(variant, key(kind, shape), {k_: v_ for k_, v_ in row.items() if k_ != "traceback"}, flush=True)
            dump()
        res["status"] = "done"
    except Exception as exc:
        res["status"] = "failed"
        res["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        res["traceback"] = traceback.format_exc()[-6000:]
        print(variant, "FAILED", res["error"][:500], flush=True)
    dump()
    return 0


# ------------------------------------------------------------------------------------------------
# parent: baselines + children
# ------------------------------------------------------------------------------------------------


def baselines(res, dump, t_start, budget):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    att = _load("sdfleet_fp8_attention", "worker/engine/fp8/attention.py")

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    for kind, shape in cases():
        if time.time() - t_start > budget:
            res["skipped_baselines"].append(key(kind, shape))
            continue
        row = {}
        try:
            q, k, v = make_inputs(torch, kind, shape, seed_of(kind, shape))
            r = ref32(torch, q, k, v)
            for name, fn in (("sdpa_cudnn_bf16", functools.partial(cudnn, q, k, v)),
                             ("triton_fp8_e2e", functools.partial(att.fp8_attention, q, k, v))):
                try:
                    o = fn()
                    torch.cuda.synchronize()
                    row[f"{name}:rel_vs_fp32"] = rel(o[:1], r)
                    if kind == "randn":
                        ms, how = time_fn(torch, fn)
                        row[f"{name}:ms"] = ms
                        row[f"{name}:tflops"] = flops(shape) / ms / 1e9
                        row[f"{name}:timing"] = how
                    del o
                except Exception as exc:
                    row[f"{name}:error"] = f"{type(exc).__name__}: {exc}"[:2000]
            if kind == "randn":
                try:
                    kv = att.quantize_kv(k, v)
                    outb = torch.empty_like(q)
                    ms, how = time_fn(torch, functools.partial(att.fp8_attention_quantized, q, kv, out=outb))
                    row["triton_fp8_kernel:ms"] = ms
                    row["triton_fp8_kernel:tflops"] = flops(shape) / ms / 1e9
                    row["triton_fp8_kernel:timing"] = how
                    del kv, outb
                except Exception as exc:
                    row["triton_fp8_kernel:error"] = f"{type(exc).__name__}: {exc}"[:2000]
            del q, k, v, r
            torch.cuda.empty_cache()
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            row["traceback"] = traceback.format_exc()[-3000:]
        res["baselines"][key(kind, shape)] = row
        print("baseline", key(kind, shape), {k_: (round(v_, 4) if isinstance(v_, float) else v_)
                                             for k_, v_ in row.items() if k_ != "traceback"}, flush=True)
        dump()


def table(res) -> str:
    variants = list(res["gluon"])
    lines = [f"{res.get('device')} torch {res.get('torch')} triton {res.get('triton')}",
             "kernel-alone ms (TFLOP/s) and rel. error vs fp32 SDPA (batch element 0)"]
    hdr = f"{'case':<22}{'cuDNN bf16':>20}{'Triton e2e':>20}{'Triton kernel':>20}" + "".join(
        f"{v:>20}" for v in variants)
    lines.append(hdr)
    for kind, shape in cases():
        k_ = key(kind, shape)
        b = res["baselines"].get(k_, {})

        def cell(ms, tf, err):
            if ms is None and err is None:
                return f"{'-':>20}"
            s = ""
            if ms is not None:
                s += f"{ms:.3f}({tf:.0f})"
            if err is not None:
                s += f" e{err:.3f}" if isinstance(err, float) else " err"
            return f"{s:>20}"

        line = f"{k_:<22}"
        line += cell(b.get("sdpa_cudnn_bf16:ms"), b.get("sdpa_cudnn_bf16:tflops"), b.get("sdpa_cudnn_bf16:rel_vs_fp32"))
        line += cell(b.get("triton_fp8_e2e:ms"), b.get("triton_fp8_e2e:tflops"), b.get("triton_fp8_e2e:rel_vs_fp32"))
        line += cell(b.get("triton_fp8_kernel:ms"), b.get("triton_fp8_kernel:tflops"), None)
        for v in variants:
            row = res["gluon"][v].get("rows", {}).get(k_, {})
            if "error" in row:
                line += f"{'ERROR':>20}"
            else:
                line += cell(row.get("kernel_ms"), row.get("kernel_tflops"), row.get("rel_vs_fp32"))
        lines.append(line)
    for v in variants:
        g = res["gluon"][v]
        lines.append(f"{v}: status={g.get('status')} scheme_check={g.get('scheme_check')} "
                     f"regs={g.get('n_regs')} spills={g.get('n_spills')} {g.get('error', '')[:200]}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="pipe,pipe_t,pipe_i8,pipe_i8_t,ws3_t,pipe_x3")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run (soft)")
    ap.add_argument("--child-timeout", type=float, default=60.0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.child_out)

    t_start = time.time()
    out_path = Path(args.out)
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "command": " ".join(["python"] + sys.argv), "python": platform.python_version(),
           "flops_formula": "4*B*H*S^2*D", "baselines": {}, "gluon": {}, "skipped_baselines": [],
           "skipped_variants": []}

    def dump():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=2))

    try:
        import torch
        import triton

        res.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    except Exception as exc:
        res["env_error"] = f"{type(exc).__name__}: {exc}"
    dump()

    try:
        baselines(res, dump, t_start, 0.35 * args.budget)  # ~40 s on an H200
    except Exception as exc:
        res["baselines_error"] = f"{type(exc).__name__}: {exc}"
        res["baselines_traceback"] = traceback.format_exc()[-4000:]

    # then each Gluon variant in a child process with a timeout (a hang costs only its timeout)
    for v in [x for x in args.variants.split(",") if x]:
        left = args.budget - (time.time() - t_start)
        if left < 25:
            res["skipped_variants"].append(v)
            continue
        tmp = out_path.with_name(out_path.name + f".{v}.child.json")
        timeout = min(args.child_timeout, left - 10)
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--out", args.out, "--child", v,
                                "--child-out", str(tmp)], capture_output=True, text=True, timeout=timeout,
                               cwd=str(ROOT), env=dict(os.environ))
            rc, so, se = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as exc:
            rc = "timeout"
            so = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            se = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        try:
            g = json.loads(tmp.read_text())
            tmp.unlink()
        except Exception as exc:
            g = {"status": "no child result", "error": repr(exc)}
        g["child_rc"] = rc
        g["child_wall_s"] = time.time() - t0
        g["child_stdout_tail"] = so[-3000:]
        g["child_stderr_tail"] = se[-6000:]
        if rc == "timeout":
            g["status"] = f"TIMEOUT after {timeout:.0f}s (last stage: {g.get('status')}) - hang or slow compile"
        res["gluon"][v] = g
        print(f"[{time.time() - t_start:.0f}s] {v}: {g.get('status')} rc={rc}", flush=True)
        if so:
            print(so[-1500:], flush=True)
        if rc not in (0,) and se:
            print(se[-1500:], flush=True)
        dump()

    res["wall_s"] = time.time() - t_start
    res["table"] = table(res)
    dump()
    print("\n" + res["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
