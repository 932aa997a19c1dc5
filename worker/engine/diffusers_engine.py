"""The diffusers-backed engine: SD3 pipelines (``tiny`` or a local SD3.5 directory) at fp32, bf16 or fp8.

Each request's initial latents come from its own CPU generator seeded with the job's seed, so an image
depends only on its own parameters and seed, never on its batch mates or on the device's RNG.
Phases are run separately (encode, denoise, decode) so each is timed and so the FP8 path can swap the
transformer alone.

Nothing in a batch waits for the host, so batches queue up on the GPU back to back:
- the denoising loop is our own (the same maths as diffusers' SD3 pipeline with its flow-matching Euler
  scheduler, checked equal by the tests): the schedule is computed once on the host and every per-step
  quantity is a Python float or a CPU scalar, so no step reads anything back from the device;
- text encoding and the initial latents run on their own stream: the text encoders' input copies wait
  only for that stream, not for the previous batch's denoising and VAE decode on the main stream;
- images are converted to uint8 on the device and copied to pinned host memory on a third stream, waited
  for by the post-processing threads (``GenerationResult.wait``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from sdfleet.errors import EngineError
from sdfleet.jobs import BatchKey
from worker.engine import compiles
from worker.engine.base import Engine, GenerationRequest, GenerationResult
from worker.engine.models import load_pipeline, resolve_model

#: T5's padded prompt length (the pipeline's max_sequence_length): the transformer's and the text encoder
#: graphs' token count
T5_TOKENS = 256

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


@dataclass(frozen=True)
class EngineOptions:
    model: str = "tiny"
    device: str = "cpu"
    precision: str = "auto"
    #: a directory written by ``sdfleet quantize`` (FP8 transformer weights + scales); skips re-quantizing
    fp8_weights: str | None = None
    #: per-speed-up switches for the FP8 path (see worker.engine.fp8.Fp8Options); empty: the defaults
    fp8_switches: dict[str, bool | str] = field(default_factory=dict)
    #: image batch-size buckets for CUDA graphs (batches are padded up to a bucket); CUDA only
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8)
    cuda_graphs: bool = True
    #: T5-XXL's linears in FP8 as well (``worker.engine.fp8.text_encoder``): half its ~9 GiB, so Large fits a
    #: 24 GB card; CLIP stays BF16. Only with precision fp8 (elsewhere: logged and left BF16)
    fp8_text_encoder: bool = False
    #: the VAE decoder's SiLUs write over their input (the norm output before them, read by nothing else):
    #: the same pixels, one full-resolution activation less at the decode's peak, which sets the whole
    #: pipeline's (docs/PERFORMANCE.md, "Memory")
    inplace_vae_activations: bool = True
    #: the VAE in channels_last: the decode's peak 0.63 GiB lower at 1024 px (cuDNN picks convolutions without
    #: its 1.25 GiB workspace) and the same pixels, but 44 ms slower per image on an H200; for cards where
    #: memory is what is short (docs/PERFORMANCE.md, "A 16 GiB Large worker")
    channels_last_vae: bool = False
    #: with cuda_graphs: the text encoders (CLIP-L, CLIP-G, T5) replay CUDA graphs captured at warm-up, one per
    #: prompt-count bucket (``worker.engine.encoder_graphs``): their thousand small kernels are launched at
    #: once instead of one by one from Python. Same embeddings bit for bit; on an H200 a Large image's
    #: encoding takes 0.026 s instead of 0.167 (docs/PERFORMANCE.md, "Text encoders in CUDA graphs")
    text_encoder_graphs: bool = True
    #: return before the device-to-host copy has landed, so the next batch is queued while it runs; off
    #: (measuring what the overlap is worth) generate() waits for the copy before it returns
    async_copy: bool = True


class DiffusersEngine(Engine):
    def __init__(self, options: EngineOptions, log: Any = None):
        self.options = options
        self.device = options.device
        self.log = log
        self.pipe = None
        self.precision_reason = ""
        self._copy_stream = None
        self._encode_stream = None
        self._graphs = None
        self._encoder_graphs = None
        self._schedules: dict[tuple[int, int, int], tuple[list[float], torch.Tensor]] = {}

    # --- boot ------------------------------------------------------------------------------------

    def load(self) -> None:
        from worker.engine.precision import resolve_precision

        self.precision, self.precision_reason = resolve_precision(self.options.precision, self.device)
        if self.log:
            self.log.info("precision chosen", precision=self.precision, reason=self.precision_reason)
        if self.device.startswith("cuda"):
            compiles.install_triton_counter()  # before anything can compile, so boot's compiles count too
        self.model_name, path = resolve_model(self.options.model)
        _quiet_libraries()
        # With quantized weights the BF16 transformer is never read: on Large that is 16 GB less to load, and
        # 16 GB the allocator would otherwise keep cached (and NVML count) after the FP8 one replaced it.
        prequantized = self.precision == "fp8" and bool(self.options.fp8_weights)
        if self.options.fp8_text_encoder and self.precision != "fp8" and self.log:
            self.log.warning("fp8 text encoder off", reason=f"precision is {self.precision}, not fp8: "
                             f"{self.precision_reason}")
        # The T5 encoder is converted layer by layer on the device before the pipeline moves there, so its
        # BF16 weights never have to fit on the GPU (the point of the switch: a 24 GB card).
        self.pipe = load_pipeline(path, _DTYPES[self.precision], self.device,
                                  without=("transformer",) if prequantized else (),
                                  prepare=self._text_encoder_to_fp8 if self._fp8_text_encoder() else None)
        if self.precision == "fp8":
            self._to_fp8()
        if self.options.inplace_vae_activations:
            inplace_activations(self.pipe.vae.decoder)
        if self.options.channels_last_vae:
            self.pipe.vae.to(memory_format=torch.channels_last)
        sched = self.pipe.scheduler
        if type(sched).__name__ != "FlowMatchEulerDiscreteScheduler" or sched.config.get("stochastic_sampling"):
            raise EngineError(f"the denoising loop implements SD3's deterministic FlowMatchEulerDiscreteScheduler; "
                              f"this model's scheduler is {type(sched).__name__} ({dict(sched.config)})")
        self.make_streams()

    def make_streams(self) -> None:
        """The side streams of a CUDA engine: text encoding + initial latents, and device-to-host copies."""
        if self.device.startswith("cuda"):
            self._copy_stream = torch.cuda.Stream(device=self.device)
            self._encode_stream = torch.cuda.Stream(device=self.device)

    def _fp8_text_encoder(self) -> bool:
        return self.options.fp8_text_encoder and self.precision == "fp8"

    def _text_encoder_to_fp8(self, pipe) -> None:
        from worker.engine.fp8.text_encoder import fp8_text_encoder

        if pipe.text_encoder_3 is None:  # nothing to save: the model runs as it would without the switch
            if self.log:
                self.log.warning("fp8 text encoder off", reason="this model has no T5 text encoder (text_encoder_3)")
            return
        fp8_text_encoder(pipe.text_encoder_3, self.device)

    def _to_fp8(self) -> None:
        from worker.engine import fp8

        if self._fp8_text_encoder():  # before the transformer arrives: the card holds one of them in BF16 at most
            self._text_encoder_to_fp8(self.pipe)
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        opts = fp8.Fp8Options(**self.options.fp8_switches) if self.options.fp8_switches else fp8.Fp8Options()
        if self.options.fp8_weights:
            self.pipe.transformer = fp8.serialize.load_quantized(self.options.fp8_weights, device=self.device,
                                                                 options=opts)
        else:
            self.pipe.transformer = fp8.apply_fp8(self.pipe.transformer, opts)

    def _graphs_wanted(self) -> bool:
        return self.device.startswith("cuda") and self.options.cuda_graphs

    def warmup(self, keys: Sequence[BatchKey], batch_sizes: Sequence[int] = (1,)) -> None:
        """Capture the denoising step's CUDA graphs for each shape (at boot, never per job), then run each."""
        if keys and self._graphs_wanted():
            from worker.engine.graphs import CudaGraphRunner

            # Buckets count transformer rows: two per image with classifier-free guidance, one without.
            rows = sorted({n * m for n in self.options.batch_buckets for m in (1, 2)})
            self._graphs = self._graphs or CudaGraphRunner(self.pipe.transformer, batch_buckets=rows)
            text_len = self.pipe.tokenizer_max_length + T5_TOKENS  # CLIP tokens + T5 tokens
            vsf = self.pipe.vae_scale_factor
            # largest shapes first, as within one capture: the shared pool's first segments are the largest
            for key in sorted(keys, key=lambda k: k.height * k.width, reverse=True):
                self._graphs.capture((key.height // vsf, key.width // vsf), text_len)
            self._graphs.install()
            if self.options.text_encoder_graphs and self._encoder_graphs is None:
                from worker.engine.encoder_graphs import EncoderGraphs

                # prompts, not transformer rows: guidance encodes the negative prompts in a call of their own
                self._encoder_graphs = EncoderGraphs(self.pipe, self.options.batch_buckets)
                self._encoder_graphs.capture(t5_length=T5_TOKENS)
                self._encoder_graphs.install()
        for key in keys:
            for n in batch_sizes:
                reqs = [GenerationRequest(f"warmup-{i}", "warm up", "", i) for i in range(n)]
                self.generate(key, reqs)

    # --- one batch -------------------------------------------------------------------------------

    def generate(self, key: BatchKey, requests: Sequence[GenerationRequest]) -> GenerationResult:
        if self.pipe is None:
            raise EngineError("engine used before load(); call load() at worker boot")
        pipe = self.pipe
        cuda = self.device.startswith("cuda")
        # Phase boundaries: CUDA events on a GPU (no host synchronisation, so the next batch can be queued
        # while this one finishes), wall-clock on the CPU.
        marks: list[Any] = []
        mark = self._event_mark(marks) if cuda else (lambda: marks.append(time.perf_counter()))
        t_start = time.perf_counter()
        cfg = key.guidance_scale > 1.0
        main = torch.cuda.current_stream(self.device) if cuda else None
        with torch.inference_mode():
            with torch.cuda.stream(self._encode_stream) if cuda else nullcontext():
                mark()
                pe, npe, ppe, nppe = pipe.encode_prompt(
                    prompt=[r.prompt for r in requests], prompt_2=None, prompt_3=None,
                    negative_prompt=[r.negative_prompt for r in requests] if cfg else None,
                    do_classifier_free_guidance=cfg, device=self.device, num_images_per_prompt=1,
                    max_sequence_length=T5_TOKENS,
                )
                if cfg:  # the pipeline's order: unconditional rows first
                    pe, ppe = torch.cat([npe, pe]), torch.cat([nppe, ppe])
                latents = self._initial_latents(key, requests)
                mark()
            if cuda:
                main.wait_stream(self._encode_stream)
                for t in (pe, ppe, latents):  # made on the encode stream, used (and freed) on the main one
                    t.record_stream(main)
            mark()
            latents = self._denoise(key, pe, ppe, latents)
            mark()
            vae = pipe.vae
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
            pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
            # uint8 conversion on the device: 4x fewer bytes cross to the host
            images_u8 = ((pixels.float() / 2 + 0.5).clamp_(0, 1) * 255).round_().to(torch.uint8)
            images_u8 = images_u8.permute(0, 2, 3, 1).contiguous()
            mark()
            if not cuda:
                host = images_u8.numpy()
                return GenerationResult([host[i] for i in range(len(requests))], _phase_seconds(marks))
            host_t, copied = self._copy_to_pinned(images_u8)
        result = GenerationResult([host_t[i].numpy() for i in range(len(requests))], {})
        submitted_s = time.perf_counter() - t_start

        def finish() -> None:
            copied.synchronize()
            ms = [0.0] + [marks[0].elapsed_time(m) / 1000 for m in marks[1:]]
            result.timings.update(_phase_seconds(ms), host_submit_s=submitted_s, gpu_s=_gpu_seconds(ms))

        result.pending = finish
        if not self.options.async_copy:
            result.wait()
        return result

    def _schedule(self, steps: int, latent_h: int, latent_w: int) -> tuple[list[float], torch.Tensor]:
        """(timesteps, sigmas) of the flow-matching schedule, computed once per shape on the host.

        The same call the pipeline makes (including SD3.5's resolution-dependent shift when the scheduler
        asks for it), on a private copy of the scheduler, with the device left out: nothing here is ever
        read back from the GPU. ``sigmas`` stays a CPU tensor so each step's ``dt`` is the same float32
        value the scheduler would use.
        """
        k = (steps, latent_h, latent_w)
        if k not in self._schedules:
            sched = copy.deepcopy(self.pipe.scheduler)
            kwargs = {}
            if sched.config.get("use_dynamic_shifting", None):
                from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

                patch = self.pipe.transformer.config.patch_size
                kwargs["mu"] = calculate_shift(
                    (latent_h // patch) * (latent_w // patch), sched.config.get("base_image_seq_len", 256),
                    sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                    sched.config.get("max_shift", 1.16))
            sched.set_timesteps(num_inference_steps=steps, device="cpu", **kwargs)
            self._schedules[k] = ([float(t) for t in sched.timesteps], sched.sigmas.float().cpu())
        return self._schedules[k]

    def _denoise(self, key: BatchKey, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                 latents: torch.Tensor) -> torch.Tensor:
        """SD3's denoising loop (flow-matching Euler, classifier-free guidance) with no host synchronisation."""
        cfg = key.guidance_scale > 1.0
        timesteps, sigmas = self._schedule(key.steps, latents.shape[-2], latents.shape[-1])
        rows = latents.shape[0] * (2 if cfg else 1)
        transformer = self.pipe.transformer
        plan = None
        if self.precision == "fp8":  # every step's AdaLN modulations before the first (Fp8Options.adaln_all_steps)
            from worker.engine.fp8.adaln import adaln_plan

            plan = adaln_plan(transformer, timesteps, pooled)
        try:
            for i, t in enumerate(timesteps):
                model_in = torch.cat([latents, latents]) if cfg else latents
                if plan is not None:
                    plan.feed(i)
                noise = transformer(hidden_states=model_in,
                                    timestep=torch.full((rows,), t, device=latents.device, dtype=torch.float32),
                                    encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                                    return_dict=False)[0]
                if cfg:
                    uncond, text = noise.chunk(2)
                    noise = uncond + key.guidance_scale * (text - uncond)
                # FlowMatchEulerDiscreteScheduler.step: fp32 update, result in the model's dtype
                dt = sigmas[i + 1] - sigmas[i]
                latents = (latents.to(torch.float32) + dt * noise).to(noise.dtype)
        finally:
            if plan is not None:
                plan.close()  # its table is freed before the decode, which sets the pipeline's peak
        return latents

    @staticmethod
    def _event_mark(marks: list[Any]) -> Callable[[], None]:
        def mark() -> None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)

        return mark

    def _copy_to_pinned(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start the copy into pinned host memory on a side stream; returns (host tensor, done event)."""
        host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            host.copy_(images, non_blocking=True)
            images.record_stream(self._copy_stream)  # the allocator must not reuse it before the copy
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return host, done

    def _initial_latents(self, key: BatchKey, requests: Sequence[GenerationRequest]) -> torch.Tensor:
        pipe = self.pipe
        c = pipe.transformer.config.in_channels
        h, w = key.height // pipe.vae_scale_factor, key.width // pipe.vae_scale_factor
        per_job = [torch.randn((1, c, h, w), generator=torch.Generator("cpu").manual_seed(r.seed),
                               dtype=torch.float32) for r in requests]
        noise = torch.cat(per_job).to(pipe.transformer.dtype)
        if self.device.startswith("cuda"):
            # Pinned and asynchronous: a pageable copy would block the host until the stream is idle.
            return noise.pin_memory().to(self.device, non_blocking=True)
        return noise.to(self.device)

    def compile_counters(self) -> dict[str, int | None]:
        """What has compiled or been captured in this process so far (None: not applicable here).

        Read before and after a stream of jobs: any increase means work that boot did not cover ran on
        the critical path. ``graph_eager_calls`` counts transformer steps of shapes without a graph.
        """
        graphs = self._graphs
        return {"triton_compiles": compiles.triton_compiles(), "torch_compiles": compiles.torch_compiles(),
                "graph_captures": graphs.captures if graphs else (0 if self._graphs_wanted() else None),
                "graph_replays": graphs.replays if graphs else None,
                "graph_eager_calls": graphs.eager_calls if graphs else None}

    def describe(self) -> dict[str, object]:
        # The counters ride along (heartbeats carry describe()), so a running worker's compiles can be watched.
        return {"model": self.model_name, "precision": self.precision, "device": self.device,
                "precision_reason": self.precision_reason, **self.compile_counters()}

    def close(self) -> None:
        if self._encoder_graphs is not None:
            self._encoder_graphs.release()
            self._encoder_graphs = None
        if self._graphs is not None:  # the runner and the transformer refer to each other: free both now
            self._graphs.release()
            self._graphs = None
        self.pipe = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def inplace_activations(module: torch.nn.Module, on: bool = True) -> int:
    """Set every ``torch.nn.SiLU`` under ``module`` to work in place (or not); returns how many there are.

    Only for modules where each SiLU's input is a fresh tensor no one else reads, as in diffusers' VAE
    decoder (every one follows a GroupNorm)."""
    acts = [m for m in module.modules() if isinstance(m, torch.nn.SiLU)]
    for m in acts:
        m.inplace = on
    return len(acts)


def _phase_seconds(t: Sequence[float]) -> dict[str, float]:
    """Phases from the five marks: encode start/end (encode stream), denoise start, denoise end, decode end.

    The gap between the end of encoding and the start of denoising is time spent waiting for the previous
    batch on the main stream: it belongs to no phase.
    """
    encode, denoise, decode = t[1] - t[0], t[3] - t[2], t[4] - t[3]
    return {"encode_s": encode, "denoise_s": denoise, "decode_s": decode, "engine_s": encode + denoise + decode}



def _gpu_seconds(t: Sequence[float]) -> float:
    """The main stream's span of a run: from the start of denoising to the end of the VAE decode.

    Summed over runs and divided by wall time, it sees every gap between runs honestly: the span starts
    only once the stream has both this run's text embeddings and the end of the previous run, so time the
    main stream waits for the host (a late launch) or for the encode stream (text encoding not hidden
    behind the previous run) falls between spans and counts as idle. Encoding overlapped with the previous
    run is not counted twice, and the device-to-host copy (on its own stream) not at all.
    """
    return t[4] - t[2]


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
