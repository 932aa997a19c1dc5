"""Boot of the FP8 transformer from a quantized directory: a first boot and a second one, in fresh processes.

    python bench/boot.py [--model large] [--res 1024] [--out FILE.json]

This process builds the SD3.5 transformer at its released config (random weights), converts it to FP8 and
writes it with the code behind `sdfleet quantize` (``serialize.save_quantized``). Then two fresh Python
processes boot from that directory exactly as a worker's engine does: load the FP8 weights and scales (no
re-quantizing), then capture the CUDA graph of one denoising step (transformer batch 2), which compiles and
autotunes every Triton kernel on first use. Both use one new, empty Triton cache directory: the first boot
compiles into it, the second must find everything there. Nothing is torch.compiled. Writes JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def child(directory: str, res: int, batch: int) -> dict:
    t0 = time.perf_counter()
    import torch

    from worker.engine.fp8 import serialize
    from worker.engine.graphs import CudaGraphRunner
    from worker.engine.sd35_configs import TEXT_TOKENS

    torch.cuda.init()
    t1 = time.perf_counter()
    model = serialize.load_quantized(directory, device="cuda")
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    runner = CudaGraphRunner(model, batch_buckets=(batch,))
    runner.capture((res // 8, res // 8), TEXT_TOKENS)
    t3 = time.perf_counter()
    return {"import_and_cuda_init_s": round(t1 - t0, 2), "load_s": round(t2 - t1, 2),
            "compile_and_capture_s": round(t3 - t2, 2), "boot_s": round(t3 - t0, 2),
            "graphs": len(runner.graphs), "failed": runner.failed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="large")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2, help="transformer rows (2 = one image with guidance)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("BOOT " + json.dumps(child(a.child, a.res, a.batch)), flush=True)
        return 0

    import torch

    from worker.engine.fp8 import Fp8Options, apply_fp8, serialize
    from worker.engine.sd35_configs import build_transformer

    work = Path(tempfile.mkdtemp(prefix="sdfleet-boot-"))
    out = {"bench": "boot", "model": a.model, "res": a.res, "batch": a.batch, "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python bench/boot.py " + " ".join(sys.argv[1:])}
    try:
        t = time.perf_counter()
        model = apply_fp8(build_transformer(a.model, device="cuda"), Fp8Options())
        torch.cuda.synchronize()
        out["build_and_quantize_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        serialize.save_quantized(model, work / "fp8")
        out["save_s"] = round(time.perf_counter() - t, 1)
        out["quantized_gib"] = round(sum(f.stat().st_size for f in (work / "fp8").iterdir()) / 2**30, 2)
        del model
        torch.cuda.empty_cache()
        env = {**os.environ, "TRITON_CACHE_DIR": str(work / "triton-cache"), "PYTHONUNBUFFERED": "1"}
        for name in ("first_boot", "second_boot"):
            p = subprocess.run([sys.executable, __file__, "--child", str(work / "fp8"), "--res", str(a.res),
                                "--batch", str(a.batch)], env=env, capture_output=True, text=True, timeout=600)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("BOOT ")), None)
            out[name] = json.loads(line[5:]) if line else {"error": (p.stderr or p.stdout)[-2000:]}
            print(name, json.dumps(out[name]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
