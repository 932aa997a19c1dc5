"""The text encoders' phase alone: SD3.5's CLIP-L, CLIP-G and T5-XXL, eager against CUDA graphs.

    python bench/text_encoders.py [--prompts 1,4] [--fp8-t5] [--out FILE.json]

Released configs with random bf16 weights on the GPU (``bench.engine._components``), the pipeline's own
``encode_prompt`` with a negative prompt (classifier-free guidance: two encoder calls per encoder), timed
wall-clock from the host with the GPU synchronised (the phase a single image waits for), median of 10 after
warm-up. Then the same with ``worker.engine.encoder_graphs.EncoderGraphs`` installed, and whether the
embeddings are bit for bit the eager ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def main() -> int:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from bench.engine import _components
    from worker.engine.diffusers_engine import T5_TOKENS
    from worker.engine.encoder_graphs import EncoderGraphs
    from worker.engine.fp8.text_encoder import fp8_text_encoder
    from worker.engine.sd35_configs import SCHEDULER

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="1,4", help="prompt counts (each one a graph bucket)")
    ap.add_argument("--fp8-t5", action="store_true", help="T5's linears in FP8 (EngineOptions.fp8_text_encoder)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--stacks-every", type=float, default=0,
                    help="print every thread's stack to stderr every N seconds (0: never): shows where a slow "
                         "or stuck capture is")
    a = ap.parse_args()
    if a.stacks_every > 0:
        faulthandler.dump_traceback_later(a.stacks_every, repeat=True, file=sys.stderr)
    t0 = time.perf_counter()

    def phase(name):
        print(f"[{time.perf_counter() - t0:8.2f} s] {name}", file=sys.stderr, flush=True)
    counts = [int(n) for n in a.prompts.split(",")]
    parts = {k: v for k, v in _components(1024).items() if k != "build_s"}
    if a.fp8_t5:
        fp8_text_encoder(parts["text_encoder_3"], "cuda")
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), **parts)
    out = {"bench": "text_encoders", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "command": "python bench/text_encoders.py " + " ".join(sys.argv[1:]),
           "fp8_t5": a.fp8_t5, "t5_tokens": T5_TOKENS, "runs": {}}

    def encode(n):
        return pipe.encode_prompt(prompt=[f"a photograph number {i} of a lighthouse" for i in range(n)],
                                  prompt_2=None, prompt_3=None, negative_prompt=[""] * n,
                                  do_classifier_free_guidance=True, device="cuda", num_images_per_prompt=1,
                                  max_sequence_length=T5_TOKENS)

    def timed(n):
        for _ in range(3):
            encode(n)
        torch.cuda.synchronize()
        ts = []
        for _ in range(a.iters):
            t = time.perf_counter()
            r = encode(n)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts), r

    phase("encoders built")
    with torch.inference_mode():
        eager = {n: timed(n) for n in counts}
        phase("eager timed")
        graphs = EncoderGraphs(pipe, counts)
        t = time.perf_counter()
        captured = graphs.capture(t5_length=T5_TOKENS)
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - t
        phase(f"captured {captured} graphs in {capture_s:.2f} s")
        graphs.install()
        graphed = {n: timed(n) for n in counts}
        phase("graphs timed")
        out["capture_s"] = round(capture_s, 2)
        out["graphs"] = captured
        out["failed"] = graphs.failed
        out["replays"], out["eager_calls"] = graphs.replays, graphs.eager_calls
        graphs.release()
    for n in counts:
        (te, re_), (tg, rg) = eager[n], graphed[n]
        out["runs"][f"prompts{n}"] = {"eager_ms": round(te * 1000, 2), "graphs_ms": round(tg * 1000, 2),
                                      "speedup": round(te / tg, 2),
                                      "embeddings_equal": all(torch.equal(x, y) for x, y in zip(re_, rg))}
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
