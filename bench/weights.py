"""Transformer weight memory of SD3.5 Medium / Large: BF16 against the FP8 engine, counted exactly, no GPU.

    python bench/weights.py [--out bench/results/weights.json]

Builds each transformer at its released config on PyTorch's meta device (shapes and dtypes, no data) and
converts it with the engine's code (``apply_fp8`` with ``quantize=False``: the same parameter and buffer
shapes and dtypes a quantized model has), then sums the bytes of every parameter and buffer. These are the
bytes the weights occupy on the GPU; bench/engine.py measures the same figure on a real model.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from worker.engine.fp8 import Fp8Options, apply_fp8, weight_bytes  # noqa: E402
from worker.engine.sd35_configs import TRANSFORMER  # noqa: E402

GIB = 2**30


def model_bytes(name: str, options: Fp8Options | None) -> int:
    from diffusers import SD3Transformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = SD3Transformer2DModel(**TRANSFORMER[name])
    finally:
        torch.set_default_dtype(old)
    model = model.to(torch.bfloat16)  # buffers too (the position table is built in fp32), as loading does
    if options is not None:
        apply_fp8(model, options, quantize=False)
    return weight_bytes(model)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/weights.json")
    a = ap.parse_args()
    variants = {"bf16": None, "fp8_whole_position_table": Fp8Options(max_image_side=0), "fp8_default": Fp8Options()}
    out = {"bench": "weights", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "command": "python bench/weights.py " + " ".join(sys.argv[1:]), "models": {}}
    for name in ("medium", "large"):
        sizes = {k: model_bytes(name, v) for k, v in variants.items()}
        out["models"][name] = {k: {"bytes": b, "gib": round(b / GIB, 3), "vs_bf16": round(b / sizes["bf16"], 4)}
                               for k, b in sizes.items()}
        print(name, {k: f"{v['gib']} GiB ({v['vs_bf16']:.1%})" for k, v in out["models"][name].items()}, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
