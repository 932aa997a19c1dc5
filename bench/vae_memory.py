"""The VAE decode's memory peak at 1024x1024, one image: where it comes from and what lowers it.

    python bench/vae_memory.py [--out FILE.json]

SD3.5's VAE (released config, random bf16 weights) decodes one 128x128 latent, with each variant's peak
allocated memory over its start, its time, and its largest pixel difference from the default:

- default (as the engine runs it: SiLUs in place);
- the decoder in channels_last;
- cuDNN's convolution workspace capped (``CUDNN_CONV_WSCAP_DBG``, MiB; read by cuDNN when the process
  starts, so each cap runs in a child process).
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def decode(channels_last: bool = False) -> tuple[dict, torch.Tensor]:
    from diffusers import AutoencoderKL

    from worker.engine.diffusers_engine import inplace_activations
    from worker.engine.sd35_configs import VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).to("cuda", torch.bfloat16).eval()
    inplace_activations(vae.decoder)
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    z = torch.randn(1, VAE["latent_channels"], 128, 128, generator=torch.Generator().manual_seed(1)).to(
        "cuda", torch.bfloat16)
    with torch.inference_mode():
        vae.decode(z, return_dict=False)  # warm-up: cuDNN's algorithm choice
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            px = vae.decode(z, return_dict=False)[0]
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
    rec = {"peak_over_start_gib": round((torch.cuda.max_memory_allocated() - before) / 2**30, 3),
           "decode_ms": round(sorted(ts)[1] * 1000, 1)}
    return rec, ((px.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/vae-memory.json")
    ap.add_argument("--caps", default="0,256,1024", help="CUDNN_CONV_WSCAP_DBG values (MiB) to try")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:  # one capped run: write its record and pixels
        rec, px = decode()
        torch.save({"rec": rec, "px": px}, a.child)
        return 0
    out = {"bench": "vae_memory", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "date": time.strftime("%Y-%m-%d"),
           "command": "python bench/vae_memory.py " + " ".join(sys.argv[1:]), "variants": {}}
    rec, ref = decode()
    out["variants"]["default"] = rec
    rec, px = decode(channels_last=True)
    out["variants"]["channels_last"] = dict(rec, max_pixel_diff=int((px.int() - ref.int()).abs().max()))
    for cap in a.caps.split(","):
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "r.pt")
            env = dict(os.environ, CUDNN_CONV_WSCAP_DBG=cap)
            p = subprocess.run([sys.executable, __file__, "--child", f], env=env, capture_output=True, text=True)
            if p.returncode:
                out["variants"][f"wscap_{cap}"] = {"error": p.stderr[-400:]}
                continue
            r = torch.load(f)
            out["variants"][f"wscap_{cap}"] = dict(r["rec"], max_pixel_diff=int((r["px"].int() - ref.int()).abs().max()))
    print(json.dumps(out, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
