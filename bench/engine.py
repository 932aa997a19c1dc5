"""Benchmark of the FP8 engine against diffusers BF16 (eager and torch.compile), in one invocation.

SD3.5 Medium / Large transformers built from the released configs with random weights (same FLOPs and
bytes as the checkpoints), 1024x1024, 333 text tokens. For each model: BF16 eager, BF16 torch.compile
and the FP8 variants, each speed-up switched on one at a time; ms/step (median of CUDA-event timings),
peak and weight memory, one-step error vs BF16 (cosine, relative), per-layer-type error, a profile of
one FP8 step split into GEMM / attention / quantization / elementwise.

    python bench/engine.py --quick                          # transformer step timings, Medium and Large
    python bench/engine.py --models medium --variants bf16,fp8-fused,fp8-fused-graph --out x.json
    python bench/engine.py --e2e --cold-start               # + whole pipeline s/image, load+capture s

Writes JSON (``--out``, default ``bench/results/engine.json``) and prints a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its modules (bench/queue.py) would shadow the
# standard library's: put the repository root there instead.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import copy
import datetime as dt
import gc
import json
import math
import platform
import re
import time
import traceback

import torch

from worker.engine.fp8 import Fp8Options, apply_fp8, set_runtime_options, weight_bytes  # noqa: E402
from worker.engine.fp8.options import DEFAULT_BF16_LAYERS  # noqa: E402
from worker.engine.sd35_configs import TEXT_TOKENS, TRANSFORMER, build_transformer  # noqa: E402

ALL_VARIANTS = ("bf16", "bf16-graph", "bf16-compile", "fp8-unfused", "fp8-fused", "fp8-fused-graph",
                "fp8-attn", "fp8-attn-bf16io-graph", "fp8-attn-1stream-graph", "fp8-attn-nochunk-graph",
                "fp8-attn-chunk4096-graph", "fp8-attn-plan-chunk1024-graph", "fp8-attn-plan-chunk2048-graph",
                "fp8-attn-plan-nochunk-graph",
                "fp8-attn-graph", "fp8-attn-plan-graph", "fp8-adaln-bf16-graph",
                "fp8-attn-gluon-graph", "fp8-attn-gluon-plan-graph", "fp8-attn-plan-tunable-graph")
QUICK_VARIANTS = ("bf16", "bf16-compile", "fp8-unfused", "fp8-fused", "fp8-fused-graph", "fp8-attn-graph")
GIB = 2**30
RESULTS: dict = {}


def _chunk_rows(variant: str) -> int:
    """ff_chunk_rows of a variant: 0 for -nochunk, N for -chunkN, else the default."""
    if "nochunk" in variant:
        return 0
    m = re.search(r"-chunk(\d+)", variant)
    return int(m.group(1)) if m else Fp8Options().ff_chunk_rows


def tunable_capture(runner, res: int) -> dict:
    """Capture with torch.cuda.tunable on for the eager warm-up (each GEMM timed over TunableOp's candidates;
    the graph keeps the winners), then put every TunableOp setting back as it was, so later variants run
    untouched. Returns what it tuned: per op signature, the chosen solution and its time, so a run shows
    which GEMMs TunableOp saw at all. Its results file goes to a temporary folder, not the working one."""
    import tempfile

    tun = torch.cuda.tunable
    saved = (tun.is_enabled(), tun.tuning_is_enabled(), tun.get_max_tuning_duration(),
             tun.get_max_tuning_iterations(), tun.get_filename())
    tun.set_filename(str(Path(tempfile.mkdtemp(prefix="tunableop-")) / "results%d.csv"))
    tun.enable(True)
    tun.tuning_enable(True)
    tun.set_max_tuning_duration(20)  # ms a candidate, so the warm-up stays in seconds
    tun.set_max_tuning_iterations(30)
    t = time.time()
    try:
        runner.capture(latent_hw=(res // 8, res // 8), text_len=TEXT_TOKENS)
    finally:
        results = tun.get_results()
        tun.tuning_enable(saved[1])
        tun.enable(saved[0])
        tun.set_max_tuning_duration(saved[2])
        tun.set_max_tuning_iterations(saved[3])
        tun.set_filename(saved[4])
    return {"tune_and_capture_s": round(time.time() - t, 1),
            "results": [[str(x) for x in r] for r in results][:80]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def inputs(cfg: dict, batch: int, res: int, seed: int = 1) -> dict:
    g = torch.Generator("cuda").manual_seed(seed)
    lat = res // 8
    bf = torch.bfloat16
    return dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], lat, lat, device="cuda", dtype=bf, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg["joint_attention_dim"], device="cuda", dtype=bf,
                                          generator=g),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], device="cuda", dtype=bf, generator=g),
        timestep=torch.full((batch,), 500.0, device="cuda"),
        return_dict=False,
    )


def time_ms(fn, iters: int = 10, warm: int = 3) -> dict:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return {"ms": round(ts[len(ts) // 2], 2), "min_ms": round(ts[0], 2), "max_ms": round(ts[-1], 2)}


def loop_ms(model, fn, x: dict, steps: int, iters: int, *, plan: bool) -> dict:
    """ms a step of whole ``steps``-step loops (timestep changing each step, as a denoising loop's), median of
    a few loops; with ``plan``, every step's AdaLN modulations before the loop (AdaLNPlan, its GEMMs and time
    embeddings included: they run once a loop) and that table's own time."""
    from worker.engine.fp8.adaln import adaln_plan

    timesteps = [float(t) for t in torch.linspace(1000, 1000 / steps, steps)]
    passes = []

    def loop():
        p = adaln_plan(model, timesteps, x["pooled_projections"]) if plan else None
        for i, t in enumerate(timesteps):
            if p is not None:
                p.feed(i)
            fn(**{**x, "timestep": torch.full_like(x["timestep"], t)})
        if p is not None:
            p.close()
            passes.append(p.passes)

    loops = time_ms(loop, iters=max(3, iters // 3), warm=1)
    rec = {"loop_ms_per_step": round(loops["ms"] / steps, 2), "loop_ms": loops["ms"], "loop_steps": steps}
    if plan:
        p = adaln_plan(model, timesteps, x["pooled_projections"])
        rec.update(plan_table_ms=time_ms(lambda: p._compute(0), iters=5, warm=1)["ms"],  # the first table
                   plan_passes_per_loop=passes[-1], plan_window_steps=p.window)
        p.close()
    return rec


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.double().flatten(), ref.double().flatten()
    return {"rel_err": float((out - ref).norm() / ref.norm()),
            "cos": float(torch.nn.functional.cosine_similarity(out, ref, dim=0)),
            "finite": bool(torch.isfinite(out).all())}


# --------------------------------------------------------------------------------------------------
# GPU kernel checks: Triton vs torch reference, FP8 linear vs float64
# --------------------------------------------------------------------------------------------------


def kernel_checks() -> dict:
    from worker.engine.fp8 import kernels, quant
    from worker.engine.fp8.linear import Fp8Linear

    res = {}
    torch.manual_seed(0)
    x = torch.randn(8858, 6144, device="cuda", dtype=torch.bfloat16)
    x[3] = 0
    x[5, 7] = 3e4
    q, s = kernels.quant_rows(x)
    rq, rs = quant._quant_rows_torch(x)
    res["quant_rows"] = {"scale_rel": float((s - rs).norm() / rs.norm()),
                         "deq_rel": float(((q.float() * s) - (rq.float() * rs)).norm() / (rq.float() * rs).norm()),
                         "code_mismatch": float((q.float() != rq.float()).float().mean()),
                         "finite": bool(torch.isfinite(q.float()).all())}
    q, s = kernels.quant_rows(x, gelu=True)
    rq, rs = quant._quant_rows_torch(torch.nn.functional.gelu(x.float(), approximate="tanh"))
    res["gelu_quant"] = {"deq_rel": float(((q.float() * s) - (rq.float() * rs)).norm() / (rq.float() * rs).norm())}
    b, length, d = 2, 4096, 1536
    xs = torch.randn(b, length, d, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(xs)
    emb = torch.randn(b, 6 * d, device="cuda", dtype=torch.bfloat16)
    ch = emb.chunk(6, 1)
    y2 = torch.randn_like(xs)
    for name, r, r2 in (("ln_mod_quant", None, None), ("res_ln_mod_quant", (y, ch[2]), None),
                        ("res2_ln_mod_quant", (y, ch[2]), (y2, ch[3]))):
        qt, h = kernels.ln_modulate_quant(xs, ch[0], ch[1], residual=r, residual2=r2)
        rqt, rh = quant.ln_modulate_quantize(xs, ch[0], ch[1], residual=r, residual2=r2, use_triton=False)
        res[name] = {"deq_rel": float((qt.dequantize() - rqt.dequantize()).norm() / rqt.dequantize().norm()),
                     "h_rel": float((h.float() - rh.float()).norm() / rh.float().norm())}
    heads, hd, lc = 24, 64, 333
    qkv = torch.randn(b * length, 3 * heads * hd, device="cuda", dtype=torch.bfloat16)
    cqkv = torch.randn(b * lc, 3 * heads * hd, device="cuda", dtype=torch.bfloat16)
    w, cw = torch.randn(2, hd, device="cuda", dtype=torch.bfloat16), torch.randn(2, hd, device="cuda",
                                                                               dtype=torch.bfloat16)
    buf = torch.full((3, b, heads, length + lc, hd), float("nan"), device="cuda", dtype=torch.bfloat16)
    kernels.qkv_prep(qkv, buf, w, batch=b, tok_off=0, heads=heads, head_dim=hd, eps=1e-6)
    kernels.qkv_prep(cqkv, buf, cw, batch=b, tok_off=length, heads=heads, head_dim=hd, eps=1e-6)

    def ref(t, wt, n):
        a, k, v = (z.reshape(b, n, heads, hd).transpose(1, 2) for z in t.chunk(3, -1))
        return quant.rms_norm_heads_torch(a, wt[0], 1e-6), quant.rms_norm_heads_torch(k, wt[1], 1e-6), v

    ri, rc = ref(qkv, w, length), ref(cqkv, cw, lc)
    res["qkv_prep"] = {"rel": [float((buf[i].float() - torch.cat([ri[i], rc[i]], 2).float()).norm()
                                     / torch.cat([ri[i], rc[i]], 2).float().norm()) for i in range(3)],
                       "all_written": bool(torch.isfinite(buf.float()).all())}
    o = torch.randn(b, length + lc, heads, hd, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    qi, qc = kernels.out_quant(o, length, lc)
    o2 = o.transpose(1, 2).reshape(b, length + lc, heads * hd)
    ri2 = quant.quantize_rows(o2[:, :length], use_triton=False)
    rc2 = quant.quantize_rows(o2[:, length:], use_triton=False)
    res["out_quant"] = {"img_rel": float((qi.dequantize() - ri2.dequantize()).norm() / ri2.dequantize().norm()),
                        "ctx_rel": float((qc.dequantize() - rc2.dequantize()).norm() / rc2.dequantize().norm())}
    # FP8 linear vs float64 on real shapes
    for k, n in ((1536, 4608), (6144, 1536), (2432, 9728)):
        lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        xx = torch.randn(8192, k, device="cuda", dtype=torch.bfloat16)
        f = Fp8Linear.from_linear(lin)
        out = f(xx).double()
        exact = xx.double() @ lin.weight.double().t() + lin.bias.double()
        res[f"fp8_linear_{k}x{n}"] = {"rel_vs_fp64": float((out - exact).norm() / exact.norm())}
    return res


# --------------------------------------------------------------------------------------------------
# per-layer-type error: every linear of the BF16 model, its FP8 twin on the same real input
# --------------------------------------------------------------------------------------------------


def _layer_type(name: str) -> str | None:
    rules = [(".attn.to_q", "attn_qkv"), (".attn.to_k", "attn_qkv"), (".attn.to_v", "attn_qkv"),
             (".attn.to_out.0", "attn_out"), (".attn.add_", "context_qkv"), (".attn.to_add_out", "context_out"),
             (".attn2.to_q", "attn2_qkv"), (".attn2.to_k", "attn2_qkv"), (".attn2.to_v", "attn2_qkv"),
             (".attn2.to_out.0", "attn2_out"), (".ff.net.0.proj", "ff_up"), (".ff.net.2", "ff_down"),
             (".ff_context.net.0.proj", "context_ff_up"), (".ff_context.net.2", "context_ff_down"),
             (".norm1.linear", "adaln"), (".norm1_context.linear", "adaln")]
    if name.startswith("transformer_blocks."):
        for pat, t in rules:
            if pat in name:
                return t
        return None
    for t in ("context_embedder", "time_text_embed", "norm_out", "proj_out"):
        if name.startswith(t):
            return t
    return None


def layer_errors(model, x) -> dict:
    from worker.engine.fp8.linear import Fp8Linear

    acc: dict[str, list[float]] = {}
    hooks = []

    def hook(name, t):
        def fn(mod, args, out):
            if mod.in_features % 16 or mod.out_features % 16:
                return
            f = Fp8Linear.from_linear(mod)
            y = f(args[0]).double()
            ref = out.double()
            acc.setdefault(t, []).append(float((y - ref).norm() / ref.norm().clamp(min=1e-30)))
        return fn

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (t := _layer_type(name)):
            hooks.append(m.register_forward_hook(hook(name, t)))
    with torch.no_grad():
        model(**x)
    for h in hooks:
        h.remove()
    return {t: {"mean_rel_err": round(sum(v) / len(v), 5), "max_rel_err": round(max(v), 5), "layers": len(v)}
            for t, v in sorted(acc.items())}


def profile_step(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cats = {"gemm": 0.0, "attention": 0.0, "quantization": 0.0, "qk_norm_layout": 0.0, "elementwise": 0.0}
    top: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0.0)
        if not us or ev.key.startswith(("ProfilerStep", "aten::", "cuda")):
            continue
        k = ev.key.lower()
        if any(s in k for s in ("flash", "fmha", "cudnn", "sdpa", "attention", "attn", "softmax", "quant_kv",
                                "kv_amax")):
            c = "attention"  # before GEMM: cuDNN's attention kernels are named ..._sm90_..._wgmma_...
        elif any(s in k for s in ("gemm", "cutlass", "xmma", "cublas", "f8f8bf16", "sm90_", "matmul", "gemv",
                                  "nvjet")):
            c = "gemm"
        elif "quant" in k:
            c = "quantization"
        elif "qkv_prep" in k or "prep_joint" in k:
            c = "qk_norm_layout"
        else:
            c = "elementwise"
        cats[c] += us / 1000
        top[ev.key[:90]] = round(us / 1000, 3)
    out = {k: round(v, 2) for k, v in cats.items()}
    out["total_ms"] = round(sum(cats.values()), 2)
    out["top_kernels_ms"] = dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])
    return out


# --------------------------------------------------------------------------------------------------


def run_model(name: str, variants: list[str], batch: int, res: int, iters: int, do_layer_errors: bool,
              do_profile: bool, e2e: bool = False, steps: int = 28, do_cold: bool = False) -> dict:
    cfg = TRANSFORMER[name]
    out: dict = {"model": name, "batch": batch, "res": res, "text_tokens": TEXT_TOKENS, "variants": {}}
    torch.cuda.empty_cache()
    t0 = time.time()
    bf = build_transformer(name, device="cuda")
    out["build_s"] = round(time.time() - t0, 1)
    x = inputs(cfg, batch, res)
    bf16_bytes = weight_bytes(bf)
    out["bf16_weight_gib"] = round(bf16_bytes / GIB, 3)
    with torch.no_grad():
        ref = bf(**x)[0].float()
    if do_layer_errors:
        try:
            out["layer_type_error"] = layer_errors(bf, x)
            log(f"{name} layer errors: {json.dumps(out['layer_type_error'])}")
        except Exception as exc:
            out["layer_type_error"] = {"error": repr(exc)[:300]}
    fp8_model = None
    fp8_adaln = None

    def fp8_default():
        nonlocal fp8_model
        if fp8_model is None:
            t = time.time()
            fp8_model = apply_fp8(copy.deepcopy(bf), Fp8Options())
            torch.cuda.synchronize()
            out["quantize_s"] = round(time.time() - t, 2)
        return fp8_model

    for v in variants:
        rec: dict = {}
        try:
            # the FP8 model is built (quantized from a copy of the BF16 one) before the peak is reset: the
            # step's peak over its start must not count the copy's BF16 weights (earlier runs did, which
            # read as 16.5 GiB on Large)
            if v == "fp8-adaln-bf16-graph":
                fp8_adaln = apply_fp8(copy.deepcopy(bf), Fp8Options(bf16_layers=DEFAULT_BF16_LAYERS | {"adaln"}))
            elif v not in ("bf16", "bf16-graph", "bf16-compile"):
                fp8_default()
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            reserved_before = torch.cuda.memory_reserved()
            runner = None
            if v in ("bf16", "bf16-graph", "bf16-compile"):
                model = bf
            elif v == "fp8-adaln-bf16-graph":
                model = fp8_adaln
            else:
                model = fp8_default()
                # fp8-attn-bf16io: the FP8 attention kernel on bf16 q/k/v with a bf16 output (separate
                # K/V and output quantization passes), i.e. the default minus fused_attention_io;
                # fp8-attn-1stream: the default with the text stream's kernels in line on one CUDA stream;
                # -nochunk / -chunkN: the default with the feed-forward in one piece (ff_chunk_rows=0) / in
                # N-row chunks (a chunk's 4x-wide hidden activation fits the L2 at 2048 rows); fp8-attn-plan: every step's AdaLN modulations
                # before a loop of --steps steps (AdaLNPlan; its "ms" is a graph replay fed by the runner,
                # its loop_ms_per_step the figure to compare with fp8-attn-graph's); the others compute them
                # per step inside the graph, as earlier rounds did; -gluon-: the joint attention on the
                # Gluon kernel (Fp8Options.attention_kernel); -tunable-: torch's TunableOp on during the
                # capture's eager warm-up (tunable_capture; on CUDA its only candidate is cuBLAS's default)
                set_runtime_options(model, Fp8Options(fused_quant=v != "fp8-unfused",
                                                      attention_kernel="gluon" if "-gluon-" in v else "triton",
                                                      adaln_all_steps="plan" in v,
                                                      fp8_attention=v.startswith("fp8-attn"),
                                                      fused_attention_io="bf16io" not in v,
                                                      text_stream="1stream" not in v,
                                                      ff_chunk_rows=_chunk_rows(v)))
            rec["weight_gib"] = round(weight_bytes(model) / GIB, 3)
            rec["weight_ratio_vs_bf16"] = round(weight_bytes(model) / bf16_bytes, 4)
            fn = model
            t = time.time()
            if v == "bf16-compile":
                fn = torch.compile(model)
            if v.endswith("-graph"):
                from worker.engine.graphs import CudaGraphRunner

                runner = CudaGraphRunner(model, batch_buckets=(batch,))
                if "-tunable-" in v:
                    rec["tunable"] = tunable_capture(runner, res)
                else:
                    runner.capture(latent_hw=(res // 8, res // 8), text_len=TEXT_TOKENS)
                fn = runner
            with torch.no_grad():
                y = fn(**x)[0].float()
                torch.cuda.synchronize()
                rec["first_call_s"] = round(time.time() - t, 1)
                rec.update(time_ms(lambda fn=fn: fn(**x), iters=iters))
                if v.replace("-gluon", "").replace("-tunable", "") in ("fp8-attn-graph", "fp8-attn-plan-graph"):
                    # loops against loops
                    rec.update(loop_ms(model, fn, x, steps, iters, plan="plan" in v))
                y = fn(**x)[0].float()
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)  # includes the BF16 reference
            rec["peak_over_start_gib"] = round((torch.cuda.max_memory_allocated() - before) / GIB, 2)
            # a graph's pool is memory its replays write but the allocator counts as free: reserved sees it
            rec["reserved_over_start_gib"] = round((torch.cuda.memory_reserved() - reserved_before) / GIB, 2)
            if runner is not None:
                rec["graph_memory_gib"] = {f"rows{k[0]}": {m: round(b / GIB, 3) for m, b in mem.items()}
                                           for k, mem in runner.memory.items()}
            if v != "bf16":
                rec.update(compare(y, ref))
            if v.startswith("fp8-attn"):
                from worker.engine.fp8.processor import fp8_attention_status

                rec["fp8_attention"] = fp8_attention_status()
            if runner is not None:
                rec["graph_replays"] = runner.replays
                runner.release()
            if v == "bf16-compile":
                del fn
                torch._dynamo.reset()
            if v == "fp8-adaln-bf16-graph":
                del model
                fp8_adaln = None
        except Exception as exc:
            rec["error"] = repr(exc)[:500]
            traceback.print_exc()
        out["variants"][v] = rec
        log(f"{name} {v}: {json.dumps(rec)}")
        gc.collect()
        torch.cuda.empty_cache()
        flush()
    if do_profile and fp8_model is not None:
        try:
            use_attn = any(v.startswith("fp8-attn") and "error" not in out["variants"].get(v, {}) for v in variants)
            set_runtime_options(fp8_model, Fp8Options(fp8_attention=use_attn))
            with torch.no_grad():
                out["profile_fp8_fused"] = profile_step(lambda: fp8_model(**x))
                out["profile_fp8_fused"]["fp8_attention"] = use_attn
            with torch.no_grad():
                out["profile_bf16"] = profile_step(lambda: bf(**x))
            log(f"{name} profile: {json.dumps(out['profile_fp8_fused'])}")
        except Exception as exc:
            out["profile_error"] = repr(exc)[:300]
    if do_cold and fp8_model is not None:
        try:
            out["cold_start"] = cold_start(fp8_model, res, batch)
            log(f"{name} cold start: {json.dumps(out['cold_start'])}")
        except Exception as exc:
            traceback.print_exc()
            out["cold_start"] = {"error": repr(exc)[:300]}
    if e2e:
        try:
            from worker.engine.graphs import CudaGraphRunner

            best = Fp8Options(fp8_attention="fp8-attn-graph" in variants)
            fp8m = fp8_default()
            set_runtime_options(fp8m, best)
            runner = CudaGraphRunner(fp8m, batch_buckets=(batch,))
            runner.capture((res // 8, res // 8), TEXT_TOKENS)
            out["e2e"] = e2e_pipeline({"bf16": (bf, None), "fp8": (fp8m, runner)}, max(batch // 2, 1), res, steps)
            out["e2e"]["fp8_options"] = best.to_dict()
            runner.release()
        except Exception as exc:
            traceback.print_exc()
            out["e2e"] = {"error": repr(exc)[:500]}
        flush()
    base = out["variants"].get("bf16", {}).get("ms")
    comp = out["variants"].get("bf16-compile", {}).get("ms")
    for rec in out["variants"].values():
        if "ms" in rec and base:
            rec["speedup_vs_bf16_eager"] = round(base / rec["ms"], 3)
        if "ms" in rec and comp:
            rec["speedup_vs_bf16_compile"] = round(comp / rec["ms"], 3)
    bf = fp8_model = x = ref = None  # noqa: F841 (frees the GPU memory before the next model)
    gc.collect()
    torch.cuda.empty_cache()
    return out


_SHARED: dict = {}


def _components(res: int) -> dict:
    """Text encoders (CLIP-L, CLIP-G, T5-XXL) and the VAE with released configs, random bf16 weights on the GPU."""
    if "vae" in _SHARED:
        return _SHARED
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from worker.engine.models import _byte_tokenizer
    from worker.engine.sd35_configs import CLIP_G, CLIP_L, T5_XXL, VAE

    t = time.time()
    clip_tok = _byte_tokenizer("<|startoftext|>", "<|endoftext|>", "<|pad|>", 77)
    t5_tok = _byte_tokenizer(None, "</s>", "<pad>", 256)
    ids = dict(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
               pad_token_id=clip_tok.pad_token_id)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            _SHARED.update(
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **ids)).eval(),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **ids)).eval(),
                text_encoder_3=T5EncoderModel(T5Config(**T5_XXL, pad_token_id=t5_tok.pad_token_id,
                                                       eos_token_id=t5_tok.eos_token_id)).eval(),
                vae=AutoencoderKL(**VAE).eval())
    finally:
        torch.set_default_dtype(torch.float32)
    _SHARED.update(tokenizer=clip_tok, tokenizer_2=clip_tok, tokenizer_3=t5_tok)
    _SHARED["build_s"] = round(time.time() - t, 1)
    return _SHARED


def e2e_pipeline(models: dict, images: int, res: int, steps: int) -> dict:
    """Whole StableDiffusion3Pipeline runs (3 text encoders, ``steps`` denoising steps with CFG, VAE decode,
    numpy images) per transformer variant; wall-clock s/image, and accuracy vs the BF16 run (same seed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from worker.engine.sd35_configs import SCHEDULER

    comp = _components(res)
    parts = {k: v for k, v in comp.items() if k != "build_s"}
    out: dict = {"images": images, "steps": steps, "components_build_s": comp["build_s"],
                 "note": "text encoders and VAE: released configs, random bf16 weights; byte-level tokenizers"}
    prompts = ["a photograph of an astronaut riding a horse"] * images
    lat_ref = img_ref = None
    for v, (transformer, runner) in models.items():
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                                        **parts)
        pipe.set_progress_bar_config(disable=True)
        if runner is not None:
            runner.install()

        def call(kind, pipe=pipe):
            return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=7.0, height=res, width=res,
                        generator=torch.Generator("cuda").manual_seed(0), output_type=kind).images

        rec: dict = {}
        try:
            with torch.no_grad():
                lat = call("latent").float()
                ts = []
                for _ in range(2):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    img = call("np")
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t)
            rec["s_per_batch"] = round(min(ts), 3)
            rec["s_per_image"] = round(min(ts) / images, 3)
            rec["images_per_s"] = round(images / min(ts), 3)
            if runner is not None:
                rec["graph_replays"] = runner.replays
            img = torch.from_numpy(img).double()
            if lat_ref is None:
                lat_ref, img_ref = lat, img
            else:
                rec["latent_cos_vs_bf16"] = float(torch.nn.functional.cosine_similarity(
                    lat.flatten().double(), lat_ref.flatten().double(), dim=0))
                mse = float(((img - img_ref) ** 2).mean())
                rec["image_psnr_db_vs_bf16"] = round(10 * math.log10(1.0 / max(mse, 1e-20)), 2)
        except Exception as exc:
            rec["error"] = repr(exc)[:500]
            traceback.print_exc()
        finally:
            if runner is not None:
                runner.uninstall()
        out[v] = rec
        log(f"e2e {v}: {json.dumps(rec)}")
    return out


def cold_start(model, res: int, batch: int) -> dict:
    """Seconds to load a quantized transformer from disk (no re-quantization) and capture its graph."""
    import tempfile

    from worker.engine.fp8 import serialize
    from worker.engine.graphs import CudaGraphRunner

    d = tempfile.mkdtemp(prefix="fp8q-")
    t = time.time()
    serialize.save_quantized(model, d)
    save_s = time.time() - t
    t = time.time()
    m = serialize.load_quantized(d, device="cuda")
    torch.cuda.synchronize()
    load_s = time.time() - t
    t = time.time()
    r = CudaGraphRunner(m, batch_buckets=(batch,))
    r.capture((res // 8, res // 8), TEXT_TOKENS)
    cap_s = time.time() - t
    r.release()
    del m
    import shutil

    shutil.rmtree(d, ignore_errors=True)
    return {"save_s": round(save_s, 1), "load_s": round(load_s, 1), "graph_capture_s": round(cap_s, 1),
            "cold_start_s": round(load_s + cap_s, 1)}


def probe_attention() -> int:
    """Exit status 0 when the FP8 attention kernel runs at SD3.5 shapes and is close to SDPA (run it in its
    own process before the bench: a kernel fault would otherwise take the whole bench down)."""
    from worker.engine.fp8.attention import fp8_attention

    worst = 0.0
    for heads in (24, 38):
        q, k, v = (torch.randn(2, heads, 4096 + TEXT_TOKENS, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
        out = fp8_attention(q, k, v).float()
        torch.cuda.synchronize()
        e = float((out - ref).norm() / ref.norm())
        ms = time_ms(lambda q=q, k=k, v=v: fp8_attention(q, k, v), iters=20)["ms"]
        sd = time_ms(lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v), iters=20)["ms"]
        log(f"probe fp8 attention heads={heads}: rel_err {e:.4f}, {ms} ms vs SDPA {sd} ms")
        worst = max(worst, e) if e == e else float("inf")
    return 0 if worst < 0.1 else 1


def flush() -> None:
    path = RESULTS.get("_path")
    if path:
        data = {k: v for k, v in RESULTS.items() if not k.startswith("_")}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="medium,large")
    ap.add_argument("--variants", default=None, help=f"comma list from {','.join(ALL_VARIANTS)}")
    ap.add_argument("--batch", default="2", help="transformer batch(es), comma list (2 = one image with CFG)")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="step timings only (no layer errors, profile, e2e)")
    ap.add_argument("--check", action="store_true", help="GPU kernel checks against torch references first")
    ap.add_argument("--e2e", action="store_true",
                    help="also whole-pipeline runs (text encoders, --steps steps, VAE decode): s/image, PSNR")
    ap.add_argument("--cold-start", action="store_true", help="also save + load + graph capture time of FP8")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="profile one FP8 step even with --quick")
    ap.add_argument("--ablation-batch", type=int, default=None,
                    help="run the one-speed-up-at-a-time FP8 variants only at this batch; other batches run "
                         "the baselines and the default engine (keeps a model's run to a few minutes)")
    ap.add_argument("--probe-attention", action="store_true",
                    help="only check the FP8 attention kernel at SD3.5 shapes; exit 0 if usable")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/engine.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if a.probe_attention:
        return probe_attention()
    variants = (a.variants.split(",") if a.variants else list(QUICK_VARIANTS if a.quick else ALL_VARIANTS))
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {','.join(ALL_VARIANTS)}", file=sys.stderr)
        return 2
    default_out = Path("bench/results/engine.json")
    RESULTS["_path"] = a.out or str(default_out)
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = None
    RESULTS["env"] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                      "torch": torch.__version__, "triton": tv, "python": platform.python_version(),
                      "command": "python bench/engine.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        import diffusers
        RESULTS["env"]["diffusers"] = diffusers.__version__
    except Exception:
        pass
    log(json.dumps(RESULTS["env"]))
    torch.backends.cuda.matmul.allow_tf32 = True
    if a.check:
        try:
            RESULTS["kernel_checks"] = kernel_checks()
        except Exception as exc:
            traceback.print_exc()
            RESULTS["kernel_checks"] = {"error": repr(exc)[:500]}
        log(f"kernel checks: {json.dumps(RESULTS['kernel_checks'])}")
        flush()
    RESULTS["models"] = []
    for name in a.models.split(","):
        for b in (int(x) for x in a.batch.split(",")):
            vs = variants if a.ablation_batch in (None, b) else [
                v for v in variants if v in ("bf16", "bf16-compile", "fp8-attn-graph")]
            r = run_model(name, vs, b, a.res, a.iters, do_layer_errors=not a.quick and b == 2,
                          do_profile=(a.profile or not a.quick) and b == 2, e2e=a.e2e, steps=a.steps,
                          do_cold=a.cold_start and b == 2)
            RESULTS["models"].append(r)
            flush()
    print("\nmodel   batch variant               ms/step  x eager  x compile  weightGiB  peakGiB  cos       rel_err")
    for r in RESULTS["models"]:
        for v, rec in r["variants"].items():
            print(f"{r['model']:7} {r['batch']:5} {v:21} {rec.get('ms', 'ERR')!s:>8} {rec.get('speedup_vs_bf16_eager', '')!s:>8} "
                  f"{rec.get('speedup_vs_bf16_compile', '')!s:>9} {rec.get('weight_gib', '')!s:>10} {rec.get('peak_gib', '')!s:>8} "
                  f"{rec.get('cos', '')!s:9.9} {rec.get('rel_err', '')!s:.7}")
    for r in RESULTS["models"]:
        e = r.get("e2e") or {}
        for v in ("bf16", "fp8"):
            if isinstance(e.get(v), dict):
                print(f"e2e {r['model']:7} {v:5} s/image {e[v].get('s_per_image')}  images/s {e[v].get('images_per_s')}  "
                      f"latent cos {e[v].get('latent_cos_vs_bf16', '')}  PSNR {e[v].get('image_psnr_db_vs_bf16', '')}")
    flush()
    log(f"wrote {RESULTS['_path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
