"""What the FP8 step's CUDA graphs keep on the GPU, per captured bucket, against BF16 eager at the same batch.

    python bench/graph_memory.py [--models medium,large] [--rows 2,4,8,16] [--out FILE.json]

SD3.5 transformers from the released configs with random weights, 1024x1024, 333 text tokens. Per model,
in one process:

- BF16 eager: the step's peak allocated memory over its start, and the reserved memory it grows from an
  empty cache, per transformer batch (``rows``);
- FP8 eager: the same, the default engine without graphs (the BF16 model converted in place), and with
  the feed-forward in one piece (``ff_chunk_rows=0``);
- FP8 graphs, one pool shared by every bucket (the engine's default; captured largest first), the same
  with the feed-forward in one piece, one pool per bucket, and the shared pool with the text stream off: after each bucket's capture, the bytes its graph pool holds
  (``torch.cuda.memory_snapshot``, the segments of that pool), the growth of reserved memory, and the
  replay's own peak over its start.

A graph's pool is memory its replays write but the allocator counts as free, so ``max_memory_allocated``
does not see it: the pool's bytes are the graph's cost. Writes JSON and prints a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.engine import inputs  # noqa: E402
from worker.engine.fp8 import Fp8Options, apply_fp8, set_runtime_options  # noqa: E402
from worker.engine.graphs import CudaGraphRunner, pool_bytes  # noqa: E402
from worker.engine.sd35_configs import TEXT_TOKENS, TRANSFORMER, build_transformer  # noqa: E402

GIB = 2**30


def gib(b: float) -> float:
    return round(b / GIB, 3)


def eager_peak(model, x) -> dict:
    """One eager step, GiB: its peak allocated memory over its start (the output included), and the reserved
    memory it grows from an empty cache (the allocator's segments at the peak: what a graph pool compares to)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before, reserved0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    with torch.inference_mode():
        y = model(**x)[0]
    torch.cuda.synchronize()
    out = {"allocated": gib(torch.cuda.max_memory_allocated() - before),
           "reserved_from_empty": gib(torch.cuda.max_memory_reserved() - reserved0)}
    del y
    return out


def graphs(model, cfg: dict, rows: list[int], res: int, *, shared: bool) -> dict:
    torch.cuda.empty_cache()
    runner = CudaGraphRunner(model, batch_buckets=rows, shared_pool=shared)
    out: dict = {}
    reserved0 = torch.cuda.memory_reserved()
    for r in sorted(rows, reverse=True):  # the order the engine captures in (CudaGraphRunner.capture)
        runner.capture((res // 8, res // 8), TEXT_TOKENS, buckets=[r])
        key = (r, res // 8, res // 8, TEXT_TOKENS)
        mem = runner.memory[key]
        x = inputs(cfg, r, res)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.inference_mode():
            y = runner(**x)[0]
        torch.cuda.synchronize()
        out[f"rows{r}"] = {"pool_gib": gib(mem["pool"]), "reserved_growth_gib": gib(mem["reserved_growth"]),
                           "replay_peak_over_start_gib": gib(torch.cuda.max_memory_allocated() - before)}
        del y, x
    # with one pool, its size now is every graph's; with a pool per bucket, the pools' sum
    out["all_pools_gib"] = (gib(pool_bytes(runner._pool)) if shared
                            else round(sum(v["pool_gib"] for v in out.values()), 3))
    out["reserved_growth_all_gib"] = gib(torch.cuda.memory_reserved() - reserved0)
    runner.release()
    gc.collect()
    torch.cuda.empty_cache()
    return out


def peak_profile(fn, top: int = 12) -> dict:
    """What is alive at the peak of ``fn()``: the allocator's trace (torch.cuda.memory._record_memory_history,
    a private API used only by this bench) replayed to its highest point, the live blocks summed by the
    engine's source line that allocated them."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    try:
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    total = best = 0
    best_live: dict[int, tuple[int, str]] = {}
    for ev in snap["device_traces"][torch.cuda.current_device()]:
        if ev["action"] == "alloc":
            frames = [f for f in ev.get("frames", []) if "/worker/engine/" in f["filename"]
                      or "/diffusers/" in f["filename"]]
            where = (f"{frames[0]['filename'].split('/')[-1]}:{frames[0]['line']} {frames[0]['name']}"
                     if frames else "other")
            live[ev["addr"]] = (ev["size"], where)
            total += ev["size"]
            if total > best:
                best, best_live = total, dict(live)
        elif ev["action"] in ("free_requested", "free_completed") and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    by_site: dict[str, int] = {}
    for size, where in best_live.values():
        by_site[where] = by_site.get(where, 0) + size
    largest = sorted(best_live.values(), key=lambda b: -b[0])[:top]
    return {"peak_live_gib": gib(best), "live_blocks": len(best_live),
            "by_site_gib": {k: gib(v) for k, v in sorted(by_site.items(), key=lambda kv: -kv[1])[:top]},
            "largest_blocks_mib": [[round(size / 2**20, 1), where] for size, where in largest]}


def run_model(name: str, rows: list[int], res: int) -> dict:
    cfg = TRANSFORMER[name]
    torch.cuda.empty_cache()
    bf = build_transformer(name, device="cuda")
    rec: dict = {"model": name, "res": res, "text_tokens": TEXT_TOKENS, "rows": rows}
    rec["bf16_eager_peak_over_start_gib"] = {f"rows{r}": eager_peak(bf, inputs(cfg, r, res)) for r in rows}
    x2 = inputs(cfg, 2, res)
    rec["bf16_eager_peak_profile_rows2"] = peak_profile(lambda m=bf: m(**x2))
    model = apply_fp8(bf, Fp8Options())
    del bf
    gc.collect()
    torch.cuda.empty_cache()
    eager_peak(model, inputs(cfg, rows[0], res))  # the kernels' first calls (JIT, autotune) outside the figures
    rec["fp8_eager_peak_over_start_gib"] = {f"rows{r}": eager_peak(model, inputs(cfg, r, res)) for r in rows}
    for r in (2, 8):
        x = inputs(cfg, r, res)
        try:
            rec[f"fp8_eager_peak_profile_rows{r}"] = peak_profile(lambda m=model, x=x: m(**x))
        except Exception as exc:
            rec[f"fp8_eager_peak_profile_rows{r}"] = {"error": repr(exc)[:300]}
    set_runtime_options(model, Fp8Options(ff_chunk_rows=0))
    rec["fp8_eager_no_ff_chunks_peak_over_start_gib"] = {f"rows{r}": eager_peak(model, inputs(cfg, r, res))
                                                         for r in rows}
    for label, shared, opts in (("fp8_graphs_shared_pool", True, Fp8Options()),
                                ("fp8_graphs_shared_pool_no_ff_chunks", True, Fp8Options(ff_chunk_rows=0)),
                                ("fp8_graphs_pool_per_bucket", False, Fp8Options()),
                                ("fp8_graphs_pool_per_bucket_ff_chunks_4096", False, Fp8Options(ff_chunk_rows=4096)),
                                ("fp8_graphs_pool_per_bucket_no_ff_chunks", False, Fp8Options(ff_chunk_rows=0)),
                                ("fp8_graphs_shared_pool_one_stream", True, Fp8Options(text_stream=False))):
        set_runtime_options(model, opts)
        try:
            rec[label] = graphs(model, cfg, rows, res, shared=shared)
        except Exception as exc:  # one failing configuration must not lose the others
            rec[label] = {"error": repr(exc)[:400]}
        print(json.dumps({name: {label: rec[label]}}), flush=True)
    set_runtime_options(model, Fp8Options())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="medium,large")
    ap.add_argument("--rows", default="2,4,8,16", help="transformer batches (2 per image with guidance)")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--out", default="bench/results/graph-memory.json")
    a = ap.parse_args()
    rows = sorted(int(r) for r in a.rows.split(","))
    import triton

    out = {"bench": "graph_memory", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python bench/graph_memory.py " + " ".join(sys.argv[1:]), "models": []}
    for name in a.models.split(","):
        out["models"].append(run_model(name, rows, a.res))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    cols = ("fp8_graphs_shared_pool", "fp8_graphs_shared_pool_no_ff_chunks", "fp8_graphs_pool_per_bucket",
            "fp8_graphs_pool_per_bucket_ff_chunks_4096", "fp8_graphs_pool_per_bucket_no_ff_chunks",
            "fp8_graphs_shared_pool_one_stream")
    print("\nGiB. eager: reserved growth from an empty cache (allocated peak). graph columns: pool bytes after the "
          "bucket's capture, largest bucket first (a shared pool: every graph so far)")
    print("model   rows  bf16 eager     fp8 eager      (no chunks)    shared  (no chunks)  per bucket  (4096)  "
          "(none)  one stream")
    for m in out["models"]:
        for r in rows:
            k = f"rows{r}"
            g = [m.get(c, {}).get(k, {}).get("pool_gib", "-") for c in cols]
            e = [m[c][k] for c in ("bf16_eager_peak_over_start_gib", "fp8_eager_peak_over_start_gib",
                                   "fp8_eager_no_ff_chunks_peak_over_start_gib")]
            print(f"{m['model']:7} {r:4}  " + "  ".join(f"{x['reserved_from_empty']:5} ({x['allocated']:5})" for x in e)
                  + "  " + "  ".join(f"{v!s:>8}" for v in g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
