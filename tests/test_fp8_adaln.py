"""Every step's AdaLN modulations computed before the denoising loop (``worker.engine.fp8.adaln``), on the CPU.

The plan must give each step exactly what the step would compute itself, in fewer passes over the bank's
weights, and the bank must never read a feed meant for another call. The CUDA-graph side (graphs captured
"fed") is checked on the GPU in tests/test_fp8_gpu.py.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from sdfleet.errors import EngineError
from tests.fp8_cpu import cpu_fp8_linear
from worker.engine.fp8 import DEFAULT_BF16_LAYERS, Fp8Options, apply_fp8
from worker.engine.fp8.adaln import AdaLNPlan, adaln_plan, bank_of
from worker.engine.sd35_configs import build_transformer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TIMESTEPS = [1000.0, 870.5, 640.0, 333.3, 12.0]


@pytest.fixture(scope="module")
def tiny():
    return build_transformer("tiny", dtype=torch.bfloat16, seed=0, tame=False)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    # conftest's cache_dir, repeated here: the GPU machine runs these files with --noconftest
    return os.environ.get("SDFLEET_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))


def inputs(rows: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(rows, 4, 32, 32, generator=g).bfloat16(),
                encoder_hidden_states=torch.randn(rows, 7, 32, generator=g).bfloat16(),
                pooled_projections=torch.randn(rows, 64, generator=g).bfloat16())


def step(model, x, t: float):
    rows = x["hidden_states"].shape[0]
    with torch.no_grad():
        return model(**x, timestep=torch.full((rows,), t), return_dict=False)[0]


def count_gemms(model) -> list:
    calls: list = []
    model.adaln_bank.register_forward_hook(lambda *a: calls.append(1))
    return calls


@cpu_fp8_linear
@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("chunk", ["own", 16])
def test_plan_gives_each_step_its_own_modulations(tiny, rows, chunk, monkeypatch):
    """``own``: the bank's own chunking (on the CPU one call's rows a GEMM: exact); 16: the GPU's (the FP8
    GEMV's 16-row tile, exact there: tests/test_fp8_gpu.py), forced here, where the CPU kernel may round a
    row differently at another row count."""
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options())
    bank = bank_of(m)
    if chunk == 16:
        monkeypatch.setattr(type(bank), "chunk_rows", lambda self, rows: 16)
    x = inputs(rows)
    want = [step(m, x, t) for t in TIMESTEPS]  # unfed: each call computes its modulations
    calls = count_gemms(m)
    with torch.no_grad():
        plan = adaln_plan(m, TIMESTEPS, x["pooled_projections"])
        assert isinstance(plan, AdaLNPlan)
        got = []
        for i, t in enumerate(TIMESTEPS):
            plan.feed(i)
            got.append(step(m, x, t))
            assert bank.armed == 0  # the call consumed the feed
        plan.close()
    for a, b in zip(got, want):
        if chunk == 16:
            assert (a.float() - b.float()).abs().max() < 0.05 * b.float().abs().max()
        else:
            assert torch.equal(a, b)
    # 16-row chunks: 5 steps of up to 3 rows in one pass over the bank's weights where the loop made five
    assert plan.passes == len(calls) == (1 if chunk == 16 else len(TIMESTEPS))


@cpu_fp8_linear
def test_plan_in_windows_when_the_table_would_be_large(tiny, monkeypatch):
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options())
    x = inputs(2)
    bank = bank_of(m)
    row_bytes = bank.linear.out_features * 2
    want = [step(m, x, t) for t in TIMESTEPS]
    monkeypatch.setattr(type(bank), "chunk_rows", lambda self, rows: 16 if rows <= 16 else rows)  # the GPU's
    with torch.no_grad():
        # room for one step of 2 rows only: still whole 16-row chunks (8 steps) a table, so no extra pass
        plan = AdaLNPlan(m, bank, TIMESTEPS, x["pooled_projections"], max_bytes=row_bytes * 2)
        assert plan.window == 8
        bank.enable_feed(2)
        for i, t in enumerate(TIMESTEPS):
            plan.feed(i)
            got = step(m, x, t)
            assert (got.float() - want[i].float()).abs().max() < 0.05 * want[i].float().abs().max()
        assert plan.passes == 1
        # 17 rows a call: the GEMM takes them per call (chunk = rows), one step a table
        big = AdaLNPlan(m, bank, TIMESTEPS, torch.zeros(17, 64, dtype=torch.bfloat16), max_bytes=1)
        assert bank.chunk_rows(17) == 17 and big.window == 1
    with pytest.raises(EngineError, match="step 5 of a 5-step loop"):
        plan.feed(5)


@cpu_fp8_linear
def test_a_feed_is_never_read_by_the_wrong_call(tiny):
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options())
    bank = bank_of(m)
    x = inputs(2)
    with pytest.raises(EngineError, match="before enable_feed"):
        bank.feed(torch.zeros(2, bank.linear.out_features, dtype=torch.bfloat16))
    bank.enable_feed(4)
    bank.feed(torch.zeros(1, bank.linear.out_features, dtype=torch.bfloat16))
    with pytest.raises(EngineError, match="1 rows fed for a call of 2"):
        step(m, x, 500.0)
    bank.clear()
    with pytest.raises(EngineError, match="modulations for a"):
        bank.feed(torch.zeros(5, bank.linear.out_features, dtype=torch.bfloat16))
    # a fixed buffer (graphs read it) is never replaced: a larger plan is refused, so its calls run unfed
    assert bank.enable_feed(2, fixed=True) and bank.fixed
    fed = bank.fed
    assert not bank.enable_feed(8)
    assert adaln_plan(m, TIMESTEPS, torch.zeros(8, 64, dtype=torch.bfloat16)) is None
    assert bank.fed is fed
    bank.disable_feed()
    assert bank.fed is None and not bank.fixed and bank.enable_feed(8)


@cpu_fp8_linear
def test_switch_off_and_models_without_a_bank(tiny):
    pooled = torch.zeros(2, 64, dtype=torch.bfloat16)
    off = apply_fp8(copy.deepcopy(tiny), Fp8Options(adaln_all_steps=False))
    assert bank_of(off) is not None and adaln_plan(off, TIMESTEPS, pooled) is None
    assert adaln_plan(apply_fp8(copy.deepcopy(tiny), Fp8Options(fp8_linears=False)), TIMESTEPS, pooled) is None
    assert adaln_plan(copy.deepcopy(tiny), TIMESTEPS, pooled) is None  # not converted at all
    # a BF16 bank: cuBLAS may round a row differently at another row count, so it is computed per call
    bf = apply_fp8(copy.deepcopy(tiny), Fp8Options(bf16_layers=DEFAULT_BF16_LAYERS | {"adaln"}))
    assert bank_of(bf).chunk_rows(2) == 2
    x = inputs(2)
    want = [step(bf, x, t) for t in TIMESTEPS]
    with torch.no_grad():
        plan = adaln_plan(bf, TIMESTEPS, x["pooled_projections"])
        for i, t in enumerate(TIMESTEPS):
            plan.feed(i)
            assert torch.equal(step(bf, x, t), want[i])
    assert plan.passes == len(TIMESTEPS)


@cpu_fp8_linear
def test_engine_images_are_the_same_with_and_without_the_plan(model_cache, monkeypatch):
    from sdfleet.jobs import BatchKey
    from worker.engine import precision
    from worker.engine.base import GenerationRequest
    from worker.engine.diffusers_engine import DiffusersEngine, EngineOptions

    monkeypatch.setenv("SDFLEET_CACHE_DIR", model_cache)
    monkeypatch.setattr(precision, "resolve_precision", lambda requested, device: ("fp8", "test: fp8 on the CPU"))
    from worker.engine.fp8 import adaln

    feeds: list = []
    real_feed = adaln.AdaLNPlan.feed
    monkeypatch.setattr(adaln.AdaLNPlan, "feed", lambda self, i: (feeds.append(i), real_feed(self, i)))
    images, gemms, fed = {}, {}, {}
    for on in (True, False):
        feeds.clear()
        e = DiffusersEngine(EngineOptions(model="tiny", device="cpu", precision="fp8",
                                          fp8_switches={"adaln_all_steps": on}))
        e.load()
        calls = count_gemms(e.pipe.transformer)
        key = BatchKey(model=e.model_name, width=128, height=128, steps=6, guidance_scale=4.5)
        reqs = [GenerationRequest("a", "a red fox", "", 7), GenerationRequest("b", "a blue jay", "", 8)]
        images[on] = e.generate(key, reqs).wait().images
        gemms[on], fed[on] = len(calls), list(feeds)
        assert bank_of(e.pipe.transformer).armed == 0
    for a, b in zip(images[True], images[False]):
        assert np.array_equal(a, b)
    # one GEMM a step both ways on the CPU (its kernel is not row-independent: tests/test_fp8_gpu.py has the
    # GPU's 16-row chunks); the plan's ran before the loop
    assert gemms[True] == gemms[False] == 6
    assert fed == {True: list(range(6)), False: []}


def test_loop_time_embeddings_are_each_steps_own(tiny):
    from worker.engine.fp8.adaln import loop_tembs, step_temb

    m = copy.deepcopy(tiny)
    pooled = inputs(3)["pooled_projections"]
    with torch.no_grad():
        want = torch.cat([step_temb(m, torch.full((3,), t), pooled) for t in TIMESTEPS])
        assert torch.equal(loop_tembs(m, TIMESTEPS, pooled), want)
        # an embedder of another kind: called once a step, as the transformer would
        real = m.time_text_embed
        calls = []

        class Other(torch.nn.Module):
            def forward(self, t, p):
                calls.append(t.shape)
                return real(t, p)

        m.time_text_embed = Other()
        assert torch.equal(loop_tembs(m, TIMESTEPS, pooled), want) and calls == [(3,)] * len(TIMESTEPS)


@cpu_fp8_linear
def test_a_call_that_stops_early_leaves_no_feed_behind(tiny):
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options())
    bank = bank_of(m)
    x = inputs(2)
    want = step(m, x, 250.0)
    with torch.no_grad():
        plan = adaln_plan(m, TIMESTEPS, x["pooled_projections"])
        plan.feed(0)
        blk = m.transformer_blocks[1]
        real = blk.forward
        blk.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a block fails"))
        try:
            with pytest.raises(RuntimeError, match="a block fails"):
                step(m, x, TIMESTEPS[0])
        finally:
            blk.forward = real
        assert bank.armed == 0  # the first block consumed the feed
        assert torch.equal(step(m, x, 250.0), want)  # the next, unfed call computes its own
        plan.feed(1)
        with pytest.raises(EngineError, match="2 rows fed for a call of 1"):
            step(m, inputs(1), 250.0)
        assert bank.armed == 0  # refused, and not left for the call after


@cpu_fp8_linear
def test_a_feed_buffer_made_in_inference_mode_takes_feeds_outside_it(tiny):
    m = apply_fp8(copy.deepcopy(tiny), Fp8Options())
    bank = bank_of(m)
    x = inputs(2)
    with torch.inference_mode():
        assert bank.enable_feed(2)
    with torch.no_grad():
        plan = adaln_plan(m, TIMESTEPS, x["pooled_projections"])
        plan.feed(0)
        step(m, x, TIMESTEPS[0])
    bank.hold_feed()
    bank.hold_feed()  # two runners' graphs read it
    bank.release_feed()
    assert bank.fed is not None
    bank.release_feed()
    assert bank.fed is None and bank.holders == 0
