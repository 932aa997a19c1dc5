"""FP8 engine for the SD3.5 MMDiT transformer on Hopper (issue 3).

E4M3 weights with per-output-channel scales (quantized once), E4M3 activations with per-row scales
computed by the op that produces them (Triton on CUDA; torch on the CPU), ``torch._scaled_mm`` with the
bias fused and BF16 out; attention through SDPA or the FP8 flash-attention kernel.

Public API (what the engine and the CLI call)::

    from worker.engine.fp8 import Fp8Options, apply_fp8
    from worker.engine.precision import resolve_precision        # --precision auto|fp8|bf16|fp32
    from worker.engine.fp8.serialize import quantize, load_quantized, save_quantized
    from worker.engine.graphs import CudaGraphRunner              # capture per (batch bucket, resolution)

    precision, reason = resolve_precision("auto", device)         # ("fp8", "compute capability 9.0 ...")
    options = Fp8Options()                                         # one switch per speed-up, see Fp8Options
    apply_fp8(pipe.transformer, options)                           # in place, returns the transformer
    # or, cold start without re-quantizing (the output of `sdfleet quantize SRC DST`):
    pipe.transformer = load_quantized(DST, device="cuda", options=options)
    if options.cuda_graphs:                                        # buckets count transformer rows:
        runner = CudaGraphRunner(pipe.transformer, batch_buckets=(2, 4, 8, 16))  # 2 per image with CFG
        runner.capture(latent_hw=(128, 128), text_len=333)         # at boot, per configured resolution
        runner.install()                                           # pipe.transformer(...) now replays

- :class:`Fp8Options` – switches: ``fp8_linears``, ``fused_quant``, ``fp8_attention``, ``cuda_graphs``,
  ``fast_accum`` and ``bf16_layers`` (layer types that stay BF16, see ``LAYER_TYPES``); all on by default,
  embedders and final projection BF16 (measured: docs/PERFORMANCE.md, "FP8 engine (issue 3)").
- :func:`apply_fp8` – convert a diffusers ``SD3Transformer2DModel`` in place.
- :func:`set_runtime_options` – flip the switches that need no re-quantization.
- ``serialize.quantize(src, dst, *, options=None, device=None) -> dict`` – ``sdfleet quantize SRC DST``
  (SRC: a diffusers SD3 directory with ``transformer/``, ``tiny``, or ``medium``/``large`` random weights;
  DST gets ``fp8_transformer.safetensors`` + ``fp8_transformer.json``; the dict is a summary to print).
- ``serialize.load_quantized(dst, *, device, options=None)`` – the FP8 ``SD3Transformer2DModel``, no
  re-quantization; ``options`` may change only the runtime switches.
- :func:`worker.engine.precision.resolve_precision` – ``(precision, reason)`` for ``--precision``.
- :class:`worker.engine.graphs.CudaGraphRunner` – per-bucket CUDA graphs of the transformer step.
"""

from __future__ import annotations

from . import serialize
from .convert import apply_fp8, layer_types, set_runtime_options, weight_bytes
from .linear import Fp8Linear
from .options import DEFAULT_BF16_LAYERS, LAYER_TYPES, Fp8Options

__all__ = [
    "DEFAULT_BF16_LAYERS",
    "LAYER_TYPES",
    "Fp8Linear",
    "Fp8Options",
    "apply_fp8",
    "serialize",
    "layer_types",
    "set_runtime_options",
    "weight_bytes",
]
