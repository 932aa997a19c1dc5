"""Save and load the FP8 transformer (safetensors + JSON) so a worker cold-starts without re-quantizing.

Layout of DST::

    DST/fp8_transformer.safetensors   every tensor of the converted transformer (E4M3 weights, float32
                                      per-output-channel scales ``*.weight_scale``, BF16 rest)
    DST/fp8_transformer.json          format, version, transformer config, Fp8Options, per-layer dtypes
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from sdfleet.errors import EngineError

from .convert import MARKER, apply_fp8, layer_types, weight_bytes
from .options import Fp8Options

log = logging.getLogger(__name__)

FORMAT = "sdfleet-fp8-transformer"
VERSION = 4  # 2: position table cut to Fp8Options.max_image_side; 3: one AdaLN linear per block; 4: one for all blocks
WEIGHTS = "fp8_transformer.safetensors"
MANIFEST = "fp8_transformer.json"


def save_quantized(transformer, dst: str | os.PathLike) -> dict[str, Any]:
    """Write a transformer converted by :func:`apply_fp8` to ``dst``; returns the manifest."""
    from safetensors.torch import save_file

    options: Fp8Options | None = getattr(transformer, MARKER, None)
    if options is None:
        raise EngineError("save_quantized needs a transformer converted by apply_fp8")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in transformer.state_dict().items()}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(transformer.config).items()
                   if not k.startswith("_")},
        "dtype": str(next(transformer.parameters()).dtype).removeprefix("torch."),
        "options": options.weight_dict(),  # the runtime switches are the loader's: see Fp8Options.weight_dict
        "scales": "per-output-channel float32 '<layer>.weight_scale' (N,); weight ~= weight.float() * scale[:, None]",
        "layers": layer_types(transformer),
        "weight_bytes": weight_bytes(transformer),
    }
    tmp = dst / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    os.replace(tmp, dst / WEIGHTS)
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(dst: str | os.PathLike) -> dict[str, Any]:
    path = Path(dst) / MANIFEST
    if not path.is_file() or not (Path(dst) / WEIGHTS).is_file():
        raise EngineError(f"{dst}: no quantized transformer ({MANIFEST} + {WEIGHTS}); "
                          "write one with 'sdfleet quantize SRC DST'")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise EngineError(f"{path}: format {manifest.get('format')!r} v{manifest.get('version')} is not "
                          f"{FORMAT} v{VERSION}; quantize again with this sdfleet")
    return manifest


def load_quantized(dst: str | os.PathLike, *, device: str | torch.device = "cpu",
                   options: Fp8Options | None = None):
    """Build the FP8 transformer from ``dst`` without quantizing anything.

    ``options`` may change the runtime switches (fused_quant, fp8_attention, cuda_graphs, fast_accum);
    ``fp8_linears`` and ``bf16_layers`` always come from the file, since the weights depend on them.
    """
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    manifest = read_manifest(dst)
    saved = Fp8Options.from_dict({**manifest["options"], "bf16_layers": frozenset(manifest["options"]["bf16_layers"])})
    if options is not None:
        opts = Fp8Options(**{**options.to_dict(), "fp8_linears": saved.fp8_linears,
                             "bf16_layers": saved.bf16_layers, "max_image_side": saved.max_image_side})
    else:
        opts = saved
    dtype = getattr(torch, manifest["dtype"])
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            model = SD3Transformer2DModel(**manifest["config"]).eval()
    finally:
        torch.set_default_dtype(old)
    apply_fp8(model, opts, quantize=False)
    state = load_file(str(Path(dst) / WEIGHTS), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise EngineError(f"{dst}: checkpoint does not match its manifest (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}); quantize again")
    # non-persistent buffers (none today) would still be on meta: fail loudly rather than at first use
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise EngineError(f"{dst}: tensors not in the checkpoint: {left[:5]}")
    model.requires_grad_(False)
    return model


def _load_source(src: str, device: str | torch.device, dtype: torch.dtype):
    if src in ("medium", "large"):
        from worker.engine.sd35_configs import build_transformer

        return build_transformer(src, device=device, dtype=dtype)
    if src == "tiny":
        from worker.engine.models import tiny_model_dir

        path = tiny_model_dir()
    else:
        path = Path(src)
    sub = path / "transformer"
    if not sub.is_dir():
        raise EngineError(f"SRC {src!r}: expected a diffusers SD3 model directory with a transformer/ "
                          "subfolder, or one of the built-in names tiny, medium, large (random weights)")
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(str(path), subfolder="transformer", dtype=dtype).to(device)


def quantize(src: str, dst: str, *, options: Fp8Options | None = None, device: str | None = None,
             dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """``sdfleet quantize SRC DST``: load SRC's transformer, convert it to FP8 and write DST.

    SRC is a diffusers SD3 directory (with ``transformer/``), ``tiny`` (the built-in tiny pipeline of
    :mod:`worker.engine.models`) or ``medium`` / ``large`` (released configs, random weights). Quantizes on CUDA when present. Returns a summary for the CLI to print.
    """
    options = options or Fp8Options()
    if not options.fp8_linears:
        raise EngineError("quantize with fp8_linears off would write a BF16 model; nothing to do")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model = _load_source(src, device, dtype)
    bf16_bytes = weight_bytes(model)
    apply_fp8(model, options)
    manifest = save_quantized(model, dst)
    return {
        "src": src,
        "dst": str(Path(dst)),
        "files": [WEIGHTS, MANIFEST],
        "fp8_layers": sum(1 for v in manifest["layers"].values() if v == "float8_e4m3fn"),
        "bf16_layers": sum(1 for v in manifest["layers"].values() if v != "float8_e4m3fn"),
        "weight_bytes": manifest["weight_bytes"],
        "weight_bytes_source": bf16_bytes,
        "weight_ratio": round(manifest["weight_bytes"] / bf16_bytes, 4),
        "seconds": round(time.perf_counter() - t0, 2),
        "device": str(device),
    }
