"""Text encoders in CUDA graphs (``worker.engine.encoder_graphs``): what can be checked without a GPU.

The captures and replays themselves (same embeddings as eager, padding, no aliasing between calls) are
checked on the GPU in tests/test_fp8_gpu.py.
"""

from __future__ import annotations

import types

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection
from transformers.modeling_outputs import BaseModelOutputWithPooling

from sdfleet.errors import EngineError
from worker.engine.encoder_graphs import EncoderGraphs, ModuleGraphs, _copy_rows


def clip():
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return CLIPTextModelWithProjection(cfg).eval()


def test_outputs_are_copied_out_and_cut_to_the_call_rows():
    last = torch.randn(4, 5, 8)
    hidden = (torch.randn(4, 5, 8), torch.randn(4, 5, 8))
    out = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=torch.randn(4, 8), hidden_states=hidden)
    got = _copy_rows(out, 3, 4)
    assert type(got) is BaseModelOutputWithPooling
    assert torch.equal(got.last_hidden_state, last[:3]) and got.last_hidden_state.data_ptr() != last.data_ptr()
    assert got[0].shape == (3, 5, 8) and got.pooler_output.shape == (3, 8)
    assert isinstance(got.hidden_states, tuple) and all(torch.equal(a, b[:3]) for a, b in zip(got.hidden_states, hidden))
    # a tensor whose first dimension is not the bucket's (a shared table) is copied whole
    assert _copy_rows((torch.ones(7, 2), None, 5), 3, 4)[0].shape == (7, 2)
    assert _copy_rows((torch.ones(7, 2), None, 5), 3, 4)[1:] == (None, 5)


def test_without_a_graph_the_call_is_the_plain_forward():
    m = clip()
    ids = torch.randint(3, 300, (2, 77))
    with torch.no_grad():
        want = m(ids, output_hidden_states=True)
    graphs = ModuleGraphs(m, (1, 2, 4), None)
    graphs.install()
    try:
        with torch.no_grad():
            got = m(ids, output_hidden_states=True)  # CPU tensor, nothing captured: eager
            m(input_ids=ids)
        assert graphs.eager_calls == 2 and graphs.replays == 0
        assert torch.equal(got.text_embeds, want.text_embeds)
        assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, want.hidden_states))
    finally:
        graphs.uninstall()
    assert "forward" not in m.__dict__
    with pytest.raises(EngineError, match="CUDA"):
        graphs.capture(77)


def test_pipeline_encoders_and_buckets():
    pipe = types.SimpleNamespace(tokenizer_max_length=77, text_encoder=clip(), text_encoder_2=clip(),
                                 text_encoder_3=None, tokenizer=types.SimpleNamespace(pad_token_id=0),
                                 tokenizer_2=types.SimpleNamespace(pad_token_id=0), tokenizer_3=None)
    g = EncoderGraphs(pipe, (4, 1, 2))
    assert sorted(g.parts) == ["text_encoder", "text_encoder_2"]  # SD3 loaded without T5: two encoders
    graphs, length, pad, flags = g.parts["text_encoder"]
    assert graphs.buckets == (1, 2, 4) and length == 77 and flags == {"output_hidden_states": True}
    g.install()
    assert pipe.text_encoder.__dict__["forward"] is graphs
    g.release()
    assert "forward" not in pipe.text_encoder.__dict__ and not g.parts
    with pytest.raises(EngineError, match="positive integers"):
        EncoderGraphs(pipe, ())


def test_engine_switch_and_cpu_warmup(cache_dir, monkeypatch):
    from sdfleet.jobs import BatchKey
    from worker.engine.diffusers_engine import DiffusersEngine, EngineOptions

    monkeypatch.setenv("SDFLEET_CACHE_DIR", str(cache_dir))
    e = DiffusersEngine(EngineOptions(model="tiny", device="cpu", precision="fp32", text_encoder_graphs=True))
    e.load()
    e.warmup([BatchKey(model=e.model_name, width=128, height=128, steps=2, guidance_scale=4.5)])
    assert e._encoder_graphs is None  # on the CPU: no graphs of any kind
    e.close()
