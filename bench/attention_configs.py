"""Each FP8 attention kernel config alone, on the engine's path, one process per config.

    python bench/attention_configs.py --out results.json [--heads 24,38] [--seq-img 4096 --seq-ctx 333]
        [--configs "64,128,4,3,128"] [--envs "SDFLEET_FP8_ATTN_ROW_TREE=0;SDFLEET_FP8_ATTN_ROW_TREE=1"] [--rounds 2]
        [--kernels triton,gluon]

The configs are ``attention.TUNED_CONFIGS`` (the autotune list; the default is the fastest of them, run
alone). An autotune picks at the first call per shape from one short timing each, so its pick can differ
between boots. This times every config by itself
(``SDFLEET_FP8_ATTN_CONFIG`` set to it, so no autotune): q/k-norm + K/V quantization (``prep_joint``) and
the attention kernel with its E4M3 output, captured in a CUDA graph, median of 50 replays after 10, at
batch 2 (one image with guidance). JSON: per heads, per config, ms (with --rounds or --envs: per setting, the
median and each run's ms, and each run's prep_joint and kernel alone, `parts`).

``--kernels triton,gluon``: the engine-path Gluon kernel (``attention_gluon.joint_attention``, on
``prep_joint(..., v_order="gluon")``) is timed beside the configs, under the label ``gluon``.

``--envs``: kernel switches (environment settings, ";"-separated) each config is timed under, in ``--rounds``
interleaved rounds (A B A B: drift hits both); the result is then per config, per setting, the median ms.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/queue.py would shadow the standard library's queue module

import argparse
import collections
import json
import os
import statistics
import subprocess

ROOT = Path(__file__).resolve().parents[1]


def time_one(heads: int, length: int, ctx_length: int, batch: int = 2, kernel: str = "triton") -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.gputime import graph_replay_ms
    from worker.engine.fp8 import attention as att

    d = 64
    g = torch.Generator(device="cuda").manual_seed(0)
    img = torch.randn(batch * length, 3 * heads * d, device="cuda", generator=g).bfloat16()
    ctx = torch.randn(batch * ctx_length, 3 * heads * d, device="cuda", generator=g).bfloat16()
    w = torch.ones(2, d, device="cuda", dtype=torch.bfloat16)

    if kernel != "triton":  # "gluon" (the engine's Gluon variant) or an engine-path variant's name
        from worker.engine.fp8.attention_gluon import joint_attention

        variant = "joint" if kernel == "gluon" else kernel

        def attention(q, kv, **kw):
            return joint_attention(q, kv, variant=variant, **kw)
    else:
        attention = att.fp8_attention_quantized

    def prep():
        return att.prep_joint(img, ctx, w, w, batch=batch, heads=heads,
                              v_order="natural" if kernel == "triton" else "gluon")

    def step():  # as the engine calls it with the text stream off: all rows in one launch
        q, kv = prep()
        return attention(q, kv, fp8_rows=(length, ctx_length))

    q, kv = prep()  # the parts alone: prep_joint, and the kernel on its output
    return {"ms": graph_replay_ms(step), "prep_ms": graph_replay_ms(prep),
            "kernel_ms": graph_replay_ms(lambda: attention(q, kv, fp8_rows=(length, ctx_length)))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--heads", default="24,38")
    ap.add_argument("--seq-img", type=int, default=4096)
    ap.add_argument("--seq-ctx", type=int, default=333)
    ap.add_argument("--configs", default=None, help='";"-separated configs (default: the autotune list)')
    ap.add_argument("--envs", default="", help='";"-separated NAME=VALUE settings to compare')
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--kernels", default="triton",
                    help='comma list: triton (attention.py, timed per config), gluon (attention_gluon.joint_attention; '
                         'its config is its own, so it is timed once per setting, under the label "gluon") or an '
                         'engine-path Gluon variant by name (joint_pair)')
    ap.add_argument("--kernel", default="triton", help=argparse.SUPPRESS)  # child
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: time SDFLEET_FP8_ATTN_CONFIG
    a = ap.parse_args()
    if a.one:
        print(json.dumps(time_one(int(a.one), a.seq_img, a.seq_ctx, kernel=a.kernel)))
        return 0
    settings = [x for x in a.envs.split(";") if x] or [""]
    for x in settings:
        if x and "=" not in x:
            print(f"--envs: {x!r} is not NAME=VALUE", file=sys.stderr)
            return 2
    sys.path.insert(0, str(ROOT))
    from worker.engine.fp8.attention_gluon import VARIANTS as GLUON_VARIANTS

    # "gluon" is the engine's Gluon variant ("joint"); the other engine-path variants go by their names
    others = sorted(k for k, c in GLUON_VARIANTS.items() if c.get("joint") and k != "joint")
    kernels = list(dict.fromkeys("gluon" if k == "joint" else k for k in a.kernels.split(",") if k))
    if not kernels or set(kernels) - {"triton", "gluon", *others}:
        print(f"--kernels: {a.kernels!r}; use triton, gluon or an engine-path Gluon variant ({', '.join(others)})",
              file=sys.stderr)
        return 2
    if a.configs and "triton" not in kernels:
        print("--configs are the Triton kernel's: add triton to --kernels", file=sys.stderr)
        return 2
    import torch

    from worker.engine.fp8 import attention as att

    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "python bench/attention_configs.py " + " ".join(sys.argv[1:]), "results": {}}


    def child(heads: int, cfg: str, setting: str):
        env = dict(os.environ, SDFLEET_FP8_ATTN_CONFIG=cfg)
        kernel = "triton"
        if cfg in kernels and cfg != "triton":  # a Gluon kernel: its config is its own
            env.pop("SDFLEET_FP8_ATTN_CONFIG")
            kernel = cfg
        if setting:
            name, _, val = setting.partition("=")
            env[name] = val
        p = subprocess.run([sys.executable, __file__, "--out", a.out, "--one", str(heads), "--kernel", kernel,
                            "--seq-img", str(a.seq_img), "--seq-ctx", str(a.seq_ctx)],
                           env=env, capture_output=True, text=True, timeout=300)
        try:
            r = json.loads(p.stdout.strip().splitlines()[-1])
        except Exception:
            return {"error": (p.stderr or p.stdout)[-300:]}
        parts[(heads, cfg, setting)].append({k: round(v, 4) for k, v in r.items() if k != "ms"})
        return round(r["ms"], 4)

    parts = collections.defaultdict(list)  # (heads, config, setting) -> the parts' ms of each run

    for heads in (int(h) for h in a.heads.split(",")):
        res = out["results"][str(heads)] = {}
        cfgs = (a.configs or att.TUNED_CONFIGS).split(";") if "triton" in kernels else []
        for cfg in cfgs + [k for k in kernels if k != "triton"]:
            if settings == [""] and a.rounds == 1:  # the original form: one number a config
                res[cfg] = child(heads, cfg, "")
                print(heads, cfg, res[cfg], flush=True)
                continue
            runs: dict[str, list] = {x: [] for x in settings}
            for _ in range(a.rounds):
                for x in settings:
                    runs[x].append(child(heads, cfg, x))
                    print(heads, cfg, x, runs[x][-1], flush=True)
            res[cfg] = {}
            for x, v in runs.items():
                ok = [t for t in v if isinstance(t, float)]
                res[cfg][x or "default"] = {"ms_median": round(statistics.median(ok), 4) if ok else None, "runs": v,
                                            "parts": parts[(heads, cfg, x)]}
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
