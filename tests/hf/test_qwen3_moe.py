"""Qwen3-MoE: per-head q/k RMSNorm, norm_topk_prob, dense layers; logits, greedy generation and export against
transformers on the same weights."""

import pytest
import torch

import moekit.hf as mhf

from hf_harness import assert_same_greedy, assert_same_logits, inputs, randomize, roundtrip

transformers = pytest.importorskip("transformers")
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def tiny_qwen3_moe(tmp_path, **overrides):
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_experts=6, num_experts_per_tok=2,
                  max_position_embeddings=64, rope_theta=5000.0, norm_topk_prob=True)  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs)).eval()
    randomize(hf)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


VARIANTS = [
    {},
    {"norm_topk_prob": False, "tie_word_embeddings": True, "attention_bias": True},
    {"mlp_only_layers": [2], "decoder_sparse_step": 2},  # MoE only at layer 1
    {"use_sliding_window": True, "sliding_window": 4},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
def test_logits_generation_and_export_match_transformers(tmp_path, overrides):
    hf, folder = tiny_qwen3_moe(tmp_path, **overrides)
    model = mhf.load_pretrained(folder, dtype=torch.float32)
    assert model.blocks[0].attn.q_norm.weight.shape == (12,)  # per head
    ids = inputs(97)
    assert_same_logits(hf, model, ids)
    assert_same_greedy(hf, model, ids[:1, :5], new_tokens=9)
    roundtrip(model, tmp_path / "out", Qwen3MoeForCausalLM, ids)
