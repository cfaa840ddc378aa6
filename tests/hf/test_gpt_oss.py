"""GPT-OSS: attention sinks, alternating sliding-window / full layers (sequences longer than the window, with the
KV cache and with padding), YaRN, router and expert biases, the clamped SwiGLU; logits, greedy generation and
export against transformers on the same weights."""

import json

import pytest
import torch

import moekit.hf as mhf
from moekit.hf.checkpoint import HFCheckpointError

from hf_harness import assert_same_greedy, assert_same_logits, inputs, randomize, roundtrip

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig, GptOssForCausalLM  # noqa: E402

WINDOW = 4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def tiny_gpt_oss(tmp_path, **overrides):
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_local_experts=6, num_experts_per_tok=2,
                  max_position_embeddings=64, sliding_window=WINDOW, swiglu_limit=0.3)  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    hf = GptOssForCausalLM(GptOssConfig(**kwargs)).eval()
    randomize(hf)
    with torch.no_grad():
        for layer in hf.model.layers:  # sinks of the order of the attention logits, so that they matter
            layer.self_attn.sinks.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


VARIANTS = [
    {},  # transformers' defaults: YaRN (factor 32), layers sliding / full / sliding
    {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
     "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
    {"attention_bias": False, "swiglu_limit": 7.0, "layer_types": ["full_attention"] * 3},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
def test_logits_generation_and_export_match_transformers(tmp_path, overrides):
    hf, folder = tiny_gpt_oss(tmp_path, **overrides)
    model = mhf.load_pretrained(folder, dtype=torch.float32)
    ids = inputs(97, seq=14)  # longer than the window
    assert_same_logits(hf, model, ids)
    assert_same_greedy(hf, model, ids[:1, :6], new_tokens=10)  # the cache grows well past the window
    roundtrip(model, tmp_path / "out", GptOssForCausalLM, ids)


def test_layer_types_and_rope_follow_the_config(tmp_path):
    _, folder = tiny_gpt_oss(tmp_path)
    model = mhf.load_pretrained(folder)
    assert [block.window for block in model.blocks] == [WINDOW, None, WINDOW]
    assert model.config.rope_scaling["rope_type"] == "yarn" and model.config.moe.activation == "swiglu_oai"


@torch.no_grad()
def test_padding_mask_matches_transformers(tmp_path):
    """Left padding: every real position's logits equal transformers' with the same attention mask."""
    hf, folder = tiny_gpt_oss(tmp_path)
    model = mhf.load_pretrained(folder)
    ids = inputs(97, seq=12)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :5] = False
    want = hf(ids, attention_mask=mask.long()).logits
    got = model(ids, mask=mask).logits
    assert (got - want)[mask].abs().max() <= 1e-4


@torch.no_grad()
def test_sinks_window_and_clamp_change_the_numbers(tmp_path):
    """The parity above means something only if sinks, the window and the SwiGLU clamp matter on these inputs."""
    _, folder = tiny_gpt_oss(tmp_path)
    model = mhf.load_pretrained(folder)
    ids = inputs(97, seq=14)
    base = model(ids).logits
    sinks = [block.attn.sinks.clone() for block in model.blocks]
    for block in model.blocks:
        block.attn.sinks.fill_(-1e4)
    assert (model(ids).logits - base).abs().max() > 1e-3
    for block, s in zip(model.blocks, sinks):
        block.attn.sinks.copy_(s)
        block.window = None
    assert (model(ids).logits - base).abs().max() > 1e-3
    model = mhf.load_pretrained(folder)
    for block in model.blocks:
        block.ffn.experts.swiglu_limit = 100.0
    assert (model(ids).logits - base).abs().max() > 1e-3


def test_unsupported_quantization_is_refused_by_name(tmp_path):
    _, folder = tiny_gpt_oss(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFCheckpointError, match="bitsandbytes"):
        mhf.load_pretrained(folder)
