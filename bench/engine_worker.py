"""The worker's engine on a GPU: SD3.5 through ``DiffusersEngine.generate`` exactly as a worker calls it.

    python bench/engine_worker.py [--model medium] [--batches 1,4] [--steps 28] [--out FILE.json]

Random-weight SD3.5 (released configs: transformer, CLIP-L, CLIP-G, T5-XXL, VAE) built on the GPU, then
run through the engine in two configurations in ONE invocation: BF16 eager (diffusers as shipped) and
sdfleet FP8 (FP8 linears, fused quantization, FP8 attention, CUDA graphs captured at warm-up). Per
batch size: s/image end to end (text encoders, denoising, VAE decode, uint8 on the GPU, pinned copy),
images/s, the engine's phase timings, peak GiB, and whether a job's image is the same alone and in a batch.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_engine(model: str, precision: str, res: int, buckets: tuple[int, ...]):
    """``precision``: bf16 or fp8, with options after dashes: ``t5`` (the FP8 T5 text encoder), ``cl`` (the
    VAE in channels_last), ``encg`` (text encoders in CUDA graphs); e.g. fp8-t5-cl."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from bench.engine import _components
    from worker.engine.diffusers_engine import DiffusersEngine, EngineOptions, inplace_activations
    from worker.engine.sd35_configs import SCHEDULER, build_transformer

    base, *flags = precision.split("-")
    unknown = set(flags) - {"t5", "cl", "encg"}
    if base not in ("bf16", "fp8") or unknown or (base == "bf16" and "t5" in flags):
        raise SystemExit(f"--precisions: {precision!r}; use bf16 or fp8, then -t5, -cl, -encg")
    parts = {k: v for k, v in _components(res).items() if k != "build_s"}
    transformer = build_transformer(model, device="cuda", dtype=torch.bfloat16, seed=0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                                    **parts)
    pipe.set_progress_bar_config(disable=True)
    fp8 = base == "fp8"
    engine = DiffusersEngine(EngineOptions(model=model, device="cuda", precision=base, cuda_graphs=fp8,
                                           batch_buckets=buckets, fp8_text_encoder="t5" in flags,
                                           channels_last_vae="cl" in flags,
                                           text_encoder_graphs="encg" in flags))
    # What load() does, minus reading weights from disk (there are none: random weights).
    engine.pipe, engine.precision, engine.model_name = pipe, base, f"sd3.5-{model}"
    engine.make_streams()
    if fp8:
        engine._to_fp8()
    inplace_activations(pipe.vae.decoder, engine.options.inplace_vae_activations)
    if engine.options.channels_last_vae:
        pipe.vae.to(memory_format=torch.channels_last)
    # the BF16 transformer this built on the GPU (a worker loading `sdfleet quantize` output never has it)
    # is gone: give its cached blocks back so reserved and used memory show only what the engine holds
    torch.cuda.empty_cache()
    return engine


def memory_now() -> dict:
    free, total = torch.cuda.mem_get_info()
    return {"allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
            "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
            "device_used_gib": round((total - free) / 2**30, 2)}  # the process's CUDA context included


def component_gib(pipe) -> dict:
    out = {}
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        m = getattr(pipe, name, None)
        if m is not None:
            n = sum(t.nbytes for t in m.parameters()) + sum(t.nbytes for t in m.buffers())
            out[name] = round(n / 2**30, 3)
    return out


EMBED_PROMPTS = ["a photograph of a lighthouse at dusk", "an astronaut riding a horse, oil painting",
                 "close-up of a red fox in the snow", "a bowl of ramen, studio lighting"]


def prompt_embeddings(engine) -> torch.Tensor:
    with torch.inference_mode():
        pe, _, _, _ = engine.pipe.encode_prompt(prompt=EMBED_PROMPTS, prompt_2=None, prompt_3=None,
                                                do_classifier_free_guidance=False, device="cuda",
                                                num_images_per_prompt=1)
    return pe.float().cpu()


def phase_peaks(engine, key) -> dict:
    """Peak allocated memory over its start of the pipeline's phases run one at a time, one image, GiB:
    which phase sets the whole pipeline's peak."""
    from worker.engine.diffusers_engine import inplace_activations

    pipe, out = engine.pipe, {}

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        r = fn()
        torch.cuda.synchronize()
        return r, round((torch.cuda.max_memory_allocated() - before) / 2**30, 3)

    with torch.inference_mode():
        (pe, npe, ppe, nppe), out["encode"] = peak(lambda: pipe.encode_prompt(
            prompt=["a lighthouse"], prompt_2=None, prompt_3=None, negative_prompt=[""],
            do_classifier_free_guidance=True, device="cuda", num_images_per_prompt=1))
        lat = torch.randn(1, pipe.transformer.config.in_channels, key.height // 8, key.width // 8, device="cuda",
                          dtype=torch.bfloat16)
        _, out["denoise_step"] = peak(lambda: pipe.transformer(
            hidden_states=torch.cat([lat, lat]), timestep=torch.full((2,), 500.0, device="cuda"),
            encoder_hidden_states=torch.cat([npe, pe]), pooled_projections=torch.cat([nppe, ppe]),
            return_dict=False)[0])
        _, out["vae_decode"] = peak(lambda: pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0])
        on = engine.options.inplace_vae_activations
        inplace_activations(pipe.vae.decoder, not on)
        try:
            _, out[f"vae_decode_inplace_activations_{'off' if on else 'on'}"] = peak(
                lambda: pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0])
        finally:
            inplace_activations(pipe.vae.decoder, on)
        from bench.graph_memory import peak_profile

        out["vae_decode_profile"] = peak_profile(lambda: pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False))
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0)), 6)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return round(10 * np.log10(255.0**2 / mse), 2) if mse > 0 else float("inf")


def host_trace(engine, key, reqs) -> dict:
    """CUDA runtime calls made by the host while two batches are queued back to back, by total host time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        pending = [engine.generate(key, reqs) for _ in range(2)]
        queued = time.perf_counter() - t
        for p in pending:
            p.wait()
    calls = {}
    for ev in prof.key_averages():
        if ev.key.startswith("cuda") or "synchron" in ev.key.lower() or ev.key in ("aten::item", "aten::_local_scalar_dense"):
            calls[ev.key] = {"count": ev.count, "host_ms": round(ev.cpu_time_total / 1000, 2)}
    return {"queued_s": round(queued, 3),
            "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1]["host_ms"])[:15])}


def main() -> int:
    from sdfleet.jobs import BatchKey
    from worker.engine.base import GenerationRequest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="medium")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--out", default=None)
    ap.add_argument("--precisions", default="bf16,fp8",
                    help="bf16, fp8, fp8-t5 (fp8 with the FP8 T5 text encoder; runs with t5 go last: they convert "
                         "the shared T5 in place), ...-cl (the VAE in channels_last), ...-encg (text "
                         "encoders in CUDA graphs)")
    ap.add_argument("--buckets", default="1,2,4,8", help="the engine's image batch buckets (CUDA graphs)")
    ap.add_argument("--trace", action="store_true",
                    help="also list the CUDA runtime calls the host makes during two back-to-back batches "
                         "(where it blocks: synchronisations, pinned allocations, copies)")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    key = BatchKey(a.model, a.res, a.res, a.steps, 4.5)
    out = {"bench": "engine_worker", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "command": "python bench/engine_worker.py " + " ".join(sys.argv[1:]),
           "model": a.model, "res": a.res, "steps": a.steps, "guidance": 4.5, "runs": {}}
    images: dict[str, np.ndarray] = {}
    embeds: dict[str, torch.Tensor] = {}
    buckets = tuple(int(b) for b in a.buckets.split(","))
    out["buckets"] = list(buckets)
    for precision in a.precisions.split(","):
        t0 = time.perf_counter()
        engine = build_engine(a.model, precision, a.res, buckets)
        torch.cuda.synchronize()
        build_s = time.perf_counter() - t0
        rec = {"build_s": round(build_s, 1), "weights_gib": component_gib(engine.pipe),
               "memory_after_build": memory_now()}
        t0 = time.perf_counter()
        engine.warmup([key], batch_sizes=batches)  # graph capture (fp8) + one run per batch size
        torch.cuda.synchronize()
        rec["warmup_s"] = round(time.perf_counter() - t0, 1)
        rec["memory_after_warmup"] = memory_now()
        if engine._graphs is not None:
            rec["graph_memory_gib"] = {f"rows{k[0]}": {m: round(b / 2**30, 3) for m, b in mem.items()}
                                       for k, mem in engine._graphs.memory.items()}
        embeds[precision] = prompt_embeddings(engine)
        for n in batches:
            reqs = [GenerationRequest(f"j{i}", f"a photograph number {i} of a lighthouse", "", 1000 + i)
                    for i in range(n)]
            torch.cuda.reset_peak_memory_stats()
            times, phases = [], []
            for _ in range(2):
                t = time.perf_counter()
                res = engine.generate(key, reqs).wait()  # wait(): the pinned copy has landed
                times.append(time.perf_counter() - t)
                phases.append(res.timings)
            # Overlap: the next batch is queued while the previous one's copy runs (as the worker does).
            # queued_s: how long the host needs to hand all three to the GPU; near the total means the host
            # waited for the device somewhere (a synchronising copy or read-back) instead of queueing ahead.
            torch.cuda.synchronize()
            t = time.perf_counter()
            pending = [engine.generate(key, reqs) for _ in range(3)]
            queued = time.perf_counter() - t
            for p in pending:
                p.wait()
            back_to_back = (time.perf_counter() - t) / 3
            best = int(np.argmin(times))
            rec[f"batch{n}"] = {"s_per_batch": round(times[best], 3), "s_per_image": round(times[best] / n, 3),
                                "images_per_s": round(n / times[best], 3),
                                "phases_s": {k: round(v, 3) for k, v in phases[best].items()},
                                "s_per_batch_back_to_back": round(back_to_back, 3),
                                "back_to_back_host_queued_s": round(queued, 3),
                                "back_to_back_total_s": round(back_to_back * 3, 3),
                                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                # graph pools are free to the allocator but not to the card: reserved counts them
                                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                                "device_used_gib": memory_now()["device_used_gib"]}
            images[f"{precision}-{n}"] = res.images[0]
            print(json.dumps({precision: {f"batch{n}": rec[f"batch{n}"]}}), flush=True)
        rec["phase_peak_over_start_gib"] = phase_peaks(engine, key)
        print(json.dumps({precision: {"phase_peak_over_start_gib": rec["phase_peak_over_start_gib"]}}), flush=True)
        if a.trace:
            rec["host_trace"] = host_trace(engine, key, reqs)
            print(json.dumps({precision: {"host_trace": rec["host_trace"]}}), flush=True)
        if engine._graphs is not None:
            rec["graph_replays"] = engine._graphs.replays
            rec["graph_eager_calls"] = engine._graphs.eager_calls
        if engine._encoder_graphs is not None:
            rec["text_encoder_graphs"] = {"replays": engine._encoder_graphs.replays,
                                          "eager_calls": engine._encoder_graphs.eager_calls,
                                          "failed": engine._encoder_graphs.failed}
        out["runs"][precision] = rec
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    # The same job (seed 1000, same prompt) alone and as the first of a batch: the worker's independence claim.
    precisions = a.precisions.split(",")
    for p in precisions:
        if f"{p}-1" in images and f"{p}-{batches[-1]}" in images:
            d = np.abs(images[f"{p}-1"].astype(int) - images[f"{p}-{batches[-1]}"].astype(int))
            out[f"{p}_alone_vs_batch_max_pixel_diff"] = int(d.max())
            out[f"{p}_alone_vs_batch_mean_pixel_diff"] = round(float(d.mean()), 4)
    # channels_last VAE against the default layout (same transformer, same T5): the same pixels?
    for n in batches:
        if f"fp8-t5-cl-{n}" in images and f"fp8-t5-{n}" in images:
            d = np.abs(images[f"fp8-t5-cl-{n}"].astype(int) - images[f"fp8-t5-{n}"].astype(int))
            out[f"channels_last_vs_default_vae_batch{n}"] = {"max_pixel_diff": int(d.max()),
                                                             "mean_pixel_diff": round(float(d.mean()), 4)}
    # Text encoders in CUDA graphs against eager (same everything else): the same embeddings and images?
    for p in precisions:
        q = p.replace("-encg", "")
        if p.endswith("-encg") and q in embeds:
            out[f"text_encoder_graphs_vs_eager_{q}"] = {
                "prompt_embeds_equal": bool(torch.equal(embeds[p], embeds[q])),
                **{f"max_pixel_diff_batch{n}": int(np.abs(images[f"{p}-{n}"].astype(int)
                                                          - images[f"{q}-{n}"].astype(int)).max())
                   for n in batches if f"{p}-{n}" in images and f"{q}-{n}" in images}}
    # The FP8 T5 against the BF16 one: prompt embeddings (CLIP part included, and the T5 tokens alone: the
    # rows after CLIP's 77) and the 28-step image with the same seed and the same FP8 transformer.
    clip_tokens = 77
    for other in ("fp8", "bf16"):
        if "fp8-t5" in embeds and other in embeds:
            a8, ab = embeds["fp8-t5"], embeds[other]
            out[f"fp8_t5_vs_{other}"] = {
                "prompt_embeds_cos": _cos(a8, ab), "t5_tokens_cos": _cos(a8[:, clip_tokens:], ab[:, clip_tokens:]),
                "t5_tokens_rel_err": round(float((a8[:, clip_tokens:] - ab[:, clip_tokens:]).norm()
                                                 / ab[:, clip_tokens:].norm()), 5),
                **{f"image_psnr_db_batch{n}": _psnr(images[f"fp8-t5-{n}"], images[f"{other}-{n}"])
                   for n in batches if f"fp8-t5-{n}" in images and f"{other}-{n}" in images}}
    for n in batches:
        if "bf16" in out["runs"] and "fp8" in out["runs"]:
            b, f = out["runs"]["bf16"][f"batch{n}"], out["runs"]["fp8"][f"batch{n}"]
            out[f"speedup_batch{n}"] = round(b["s_per_image"] / f["s_per_image"], 2)
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
