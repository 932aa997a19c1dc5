"""Each FP8 attention kernel config alone, on the engine's path, one process per config.

    python bench/attention_configs.py --out results.json [--heads 24,38] [--seq-img 4096 --seq-ctx 333]
        [--configs "64,128,4,3,128"] [--envs "SDFLEET_FP8_ATTN_ROW_TREE=0;SDFLEET_FP8_ATTN_ROW_TREE=1"] [--rounds 2]
        [--kernels triton,gluon]

The configs are ``attention.TUNED_CONFIGS`` (the autotune list; the default is the fastest of them, run
alone). An autotune picks at the first call per shape from one short timing each, so its pick can differ
between boots. This times every config by itself
(``SDFLEET_FP8_ATTN_CONFIG`` set to it, so no autotune): q/k-norm + K/V quantization (``prep_joint``) and
the attention kernel with its E4M3 output, captured in a CUDA graph, median of 50 replays after 10, at
batch 2 (one image with guidance). JSON: per heads, per config, ms.

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
import json
import os
import statistics
import subprocess

ROOT = Path(__file__).resolve().parents[1]


def time_one(heads: int, length: int, ctx_length: int, batch: int = 2, kernel: str = "triton") -> float:
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.gputime import graph_replay_ms
    from worker.engine.fp8 import attention as att

    d = 64
    g = torch.Generator(device="cuda").manual_seed(0)
    img = torch.randn(batch * length, 3 * heads * d, device="cuda", generator=g).bfloat16()
    ctx = torch.randn(batch * ctx_length, 3 * heads * d, device="cuda", generator=g).bfloat16()
    w = torch.ones(2, d, device="cuda", dtype=torch.bfloat16)

    if kernel == "gluon":
        from worker.engine.fp8.attention_gluon import joint_attention as attention
    else:
        attention = att.fp8_attention_quantized

    def step():  # as the engine calls it with the text stream off: all rows in one launch
        q, kv = att.prep_joint(img, ctx, w, w, batch=batch, heads=heads,
                               v_order="gluon" if kernel == "gluon" else "natural")
        return attention(q, kv, fp8_rows=(length, ctx_length))

    return graph_replay_ms(step)


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
                         'its config is its own, so it is timed once per setting, under the label "gluon")')
    ap.add_argument("--kernel", default="triton", help=argparse.SUPPRESS)  # child
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: time SDFLEET_FP8_ATTN_CONFIG
    a = ap.parse_args()
    if a.one:
        print(json.dumps({"ms": time_one(int(a.one), a.seq_img, a.seq_ctx, kernel=a.kernel)}))
        return 0
    settings = [x for x in a.envs.split(";") if x] or [""]
    for x in settings:
        if x and "=" not in x:
            print(f"--envs: {x!r} is not NAME=VALUE", file=sys.stderr)
            return 2
    sys.path.insert(0, str(ROOT))
    import torch

    from worker.engine.fp8 import attention as att

    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "python bench/attention_configs.py " + " ".join(sys.argv[1:]), "results": {}}

    kernels = [k for k in a.kernels.split(",") if k]
    if not kernels or set(kernels) - {"triton", "gluon"}:
        print(f"--kernels: {a.kernels!r}; use triton, gluon or both", file=sys.stderr)
        return 2

    def child(heads: int, cfg: str, setting: str):
        env = dict(os.environ, SDFLEET_FP8_ATTN_CONFIG=cfg)
        kernel = "triton"
        if cfg == "gluon":
            env.pop("SDFLEET_FP8_ATTN_CONFIG")
            kernel = "gluon"
        if setting:
            name, _, val = setting.partition("=")
            env[name] = val
        p = subprocess.run([sys.executable, __file__, "--out", a.out, "--one", str(heads), "--kernel", kernel,
                            "--seq-img", str(a.seq_img), "--seq-ctx", str(a.seq_ctx)],
                           env=env, capture_output=True, text=True, timeout=300)
        try:
            return round(json.loads(p.stdout.strip().splitlines()[-1])["ms"], 4)
        except Exception:
            return {"error": (p.stderr or p.stdout)[-300:]}

    for heads in (int(h) for h in a.heads.split(",")):
        res = out["results"][str(heads)] = {}
        cfgs = (a.configs or att.TUNED_CONFIGS).split(";") if "triton" in kernels else []
        for cfg in cfgs + (["gluon"] if "gluon" in kernels else []):
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
                res[cfg][x or "default"] = {"ms_median": round(statistics.median(ok), 4) if ok else None, "runs": v}
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
