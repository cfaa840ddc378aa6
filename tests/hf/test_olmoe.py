"""OLMoE: q/k RMSNorm over the whole projections, clip_qkv, norm_topk_prob; logits, greedy generation and export
against transformers on the same weights."""

import pytest
import torch

import moekit.hf as mhf

from hf_harness import assert_same_greedy, assert_same_logits, inputs, randomize, roundtrip

transformers = pytest.importorskip("transformers")
from transformers import OlmoeConfig, OlmoeForCausalLM  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def tiny_olmoe(tmp_path, **overrides):
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, max_position_embeddings=64,
                  rope_theta=5000.0, pad_token_id=0, eos_token_id=None)  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    hf = OlmoeForCausalLM(OlmoeConfig(**kwargs)).eval()
    randomize(hf)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


VARIANTS = [
    {},
    {"norm_topk_prob": True, "tie_word_embeddings": True},
    {"clip_qkv": 0.05, "attention_bias": True},  # small enough to clamp many entries of these tiny projections
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
def test_logits_generation_and_export_match_transformers(tmp_path, overrides):
    hf, folder = tiny_olmoe(tmp_path, **overrides)
    model = mhf.load_pretrained(folder, dtype=torch.float32)
    assert model.blocks[0].attn.k_norm.weight.shape == (2 * 8,)  # over the whole k projection, G * X
    ids = inputs(97)
    assert_same_logits(hf, model, ids)
    assert_same_greedy(hf, model, ids[:1, :5], new_tokens=9)
    roundtrip(model, tmp_path / "out", OlmoeForCausalLM, ids)


def test_clip_qkv_changes_the_numbers(tmp_path):
    """The clip variant above is a real test only if clipping changes the logits."""
    hf, folder = tiny_olmoe(tmp_path, clip_qkv=0.05)
    model = mhf.load_pretrained(folder)
    ids = inputs(97)
    clipped = model(ids).logits
    for block in model.blocks:
        block.attn.clip_qkv = None
    assert (model(ids).logits - clipped).abs().max() > 1e-3
