"""Qwen2-MoE: logits, greedy generation and export against transformers on the same weights, over the config
options that change the numbers (norm_topk_prob, mlp_only_layers, decoder_sparse_step, sliding windows, ties)."""

import pytest
import torch

import moekit.hf as mhf
from moekit.hf.checkpoint import HFCheckpointError

from hf_harness import assert_same_greedy, assert_same_logits, inputs, randomize, roundtrip

transformers = pytest.importorskip("transformers")
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def tiny_qwen2_moe(tmp_path, **overrides):
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                  shared_expert_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, max_position_embeddings=64,
                  rope_theta=5000.0, norm_topk_prob=False)  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    hf = Qwen2MoeForCausalLM(Qwen2MoeConfig(**kwargs)).eval()
    randomize(hf)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


VARIANTS = [
    {},
    {"norm_topk_prob": True, "tie_word_embeddings": True},
    {"mlp_only_layers": [0], "decoder_sparse_step": 2},  # dense: 0 (listed), 2 (off the step); MoE: 1
    {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2, "qkv_bias": False},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
def test_logits_generation_and_export_match_transformers(tmp_path, overrides):
    hf, folder = tiny_qwen2_moe(tmp_path, **overrides)
    model = mhf.load_pretrained(folder, dtype=torch.float32)
    ids = inputs(97)
    assert_same_logits(hf, model, ids)
    assert_same_greedy(hf, model, ids[:1, :5], new_tokens=9)
    roundtrip(model, tmp_path / "out", Qwen2MoeForCausalLM, ids)


def test_layer_placement_follows_mlp_only_layers_and_sparse_step(tmp_path):
    _, folder = tiny_qwen2_moe(tmp_path, num_hidden_layers=4, mlp_only_layers=[1], decoder_sparse_step=2)
    model = mhf.load_pretrained(folder)
    assert [block.is_moe for block in model.blocks] == [False, False, False, True]  # (i + 1) % 2 == 0, minus 1


def test_sliding_window_layers_follow_transformers_rule(tmp_path):
    _, folder = tiny_qwen2_moe(tmp_path, num_hidden_layers=4, use_sliding_window=True, sliding_window=4,
                               max_window_layers=3)  # fmt: skip
    model = mhf.load_pretrained(folder)
    assert [block.window for block in model.blocks] == [4, None, 4, None]


def test_no_moe_layer_is_a_clear_error(tmp_path):
    _, folder = tiny_qwen2_moe(tmp_path, mlp_only_layers=[0, 1, 2])
    with pytest.raises(HFCheckpointError, match="no MoE layer"):
        mhf.load_pretrained(folder)
