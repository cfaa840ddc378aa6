"""PhiMoE: LayerNorm with biases, attention and head biases, the sparsemixer router, longrope with PhiMoE's mscales,
sliding windows; logits, greedy generation and export against transformers on the same weights; where moekit
deliberately differs (longrope past the original context)."""

import json

import pytest
import torch

import moekit.hf as mhf
from moekit.hf.checkpoint import HFCheckpointError

from hf_harness import assert_same_greedy, assert_same_logits, edit_checkpoint, inputs, randomize, roundtrip

transformers = pytest.importorskip("transformers")
from transformers import PhimoeConfig, PhimoeForCausalLM  # noqa: E402

ORIGINAL = 16  # original_max_position_embeddings of the longrope variants
HEAD_DIM = 8
LONGROPE = {"rope_type": "longrope", "rope_theta": 5000.0, "original_max_position_embeddings": ORIGINAL,
            "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
            "long_factor": [2.0 + 0.5 * i for i in range(HEAD_DIM // 2)], "short_mscale": 1.1, "long_mscale": 1.3}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def tiny_phimoe(tmp_path, **overrides):
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=64,
                  attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0})  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    hf = PhimoeForCausalLM(PhimoeConfig(**kwargs)).eval()
    randomize(hf)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


VARIANTS = [
    {},
    {"rope_parameters": LONGROPE, "router_jitter_noise": 0.01, "input_jitter_noise": 0.01},  # the release's noise
    {"attention_bias": False, "lm_head_bias": False, "tie_word_embeddings": True, "sliding_window": 4},
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=str)
def test_logits_generation_and_export_match_transformers(tmp_path, overrides):
    hf, folder = tiny_phimoe(tmp_path, **overrides)
    model = mhf.load_pretrained(folder, dtype=torch.float32)
    assert model.config.moe.router == "sparsemixer" and model.blocks[0].attn_norm.bias is not None
    ids = inputs(97, seq=ORIGINAL - 4)
    assert_same_logits(hf, model, ids)
    assert_same_greedy(hf, model, ids[:1, :6], new_tokens=10)  # 16 positions: within the original context
    roundtrip(model, tmp_path / "out", PhimoeForCausalLM, ids)


def test_the_biases_and_the_router_eps_change_the_numbers(tmp_path):
    """The variants above test the norm and head biases and sparsemixer's eps only if each changes the logits."""
    _, folder = tiny_phimoe(tmp_path)
    ids = inputs(97)
    with torch.no_grad():
        model = mhf.load_pretrained(folder)
        want = model(ids).logits
        for change in ("norm bias", "head bias", "eps"):
            model = mhf.load_pretrained(folder)
            if change == "norm bias":
                model.norm.bias.zero_()
            elif change == "head bias":
                model.lm_head.bias.zero_()
            else:
                for block in model.blocks:
                    block.ffn.router.eps = 0.0
            assert (model(ids).logits - want).abs().max() > 1e-3, change


@torch.no_grad()
def test_longrope_past_the_original_context_uses_the_long_factors_where_transformers_keeps_the_short_ones(tmp_path):
    """Beyond original_max_position_embeddings moekit runs the sequence with long_factor and long_mscale (Phi-3.5-MoE's
    reference code). transformers 5.24's PhimoeRotaryEmbedding switches only the mscale and keeps short_factor: a
    transformers model whose short factors are the long ones is what moekit computes there."""
    hf, folder = tiny_phimoe(tmp_path, rope_parameters=LONGROPE)
    model = mhf.load_pretrained(folder)
    ids = inputs(97, seq=ORIGINAL + 6)
    position_ids = torch.arange(ORIGINAL + 6)[None]
    cos, _ = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), position_ids)
    short = torch.tensor(LONGROPE["short_factor"]) * 5000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    angles = position_ids[0, :, None].float() / short
    torch.testing.assert_close(cos[0], torch.cat((angles, angles), -1).cos() * 1.3)  # short factors, long mscale

    swapped = PhimoeForCausalLM(PhimoeConfig(**{**hf.config.to_dict(), "rope_parameters": {
        **LONGROPE, "short_factor": LONGROPE["long_factor"]}})).eval()  # fmt: skip
    swapped.load_state_dict(hf.state_dict())
    assert_same_logits(swapped, model, ids)
    assert (hf(ids).logits - model(ids).logits).abs().max() > 1e-3
    assert_same_logits(hf, model, ids[:, :ORIGINAL])  # within the original context: the same


def test_missing_rope_takes_transformers_default_theta(tmp_path):
    _, folder = tiny_phimoe(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["rope_parameters"]
    (folder / "config.json").write_text(json.dumps(config))
    assert mhf.load_pretrained(folder).config.rope_theta == PhimoeConfig().rope_parameters["rope_theta"] == 1e6


def test_transformers_in_memory_names_load_too(tmp_path):
    hf, folder = tiny_phimoe(tmp_path)

    def fuse(tensors):
        for i in range(2):
            m = f"model.layers.{i}.block_sparse_moe."
            tensors[f"model.layers.{i}.mlp.router.weight"] = tensors.pop(m + "gate.weight")
            gate_up = [torch.cat((tensors.pop(f"{m}experts.{j}.w1.weight"), tensors.pop(f"{m}experts.{j}.w3.weight")))
                       for j in range(6)]  # fmt: skip
            tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
            tensors[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
                [tensors.pop(f"{m}experts.{j}.w2.weight") for j in range(6)])
        return tensors

    edit_checkpoint(folder, fuse)
    assert_same_logits(hf, mhf.load_pretrained(folder), inputs(97))


def test_missing_norm_bias_is_named(tmp_path):
    _, folder = tiny_phimoe(tmp_path)
    dropped = "model.layers.1.post_attention_layernorm.bias"
    edit_checkpoint(folder, lambda t: {k: v for k, v in t.items() if k != dropped})
    with pytest.raises(HFCheckpointError, match=r"model\.layers\.1\.post_attention_layernorm\.bias"):
        mhf.load_pretrained(folder)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_experts_per_tok": 4}, "num_experts_per_tok=4 is not supported"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}}, "'yarn'"),
        ({"rope_scaling": {k: v for k, v in LONGROPE.items() if k not in ("rope_theta", "long_mscale")}},
         "lacks \\['long_mscale'\\]"),
    ],
)
def test_options_moekit_cannot_express_are_refused_by_name(change, match):
    from moekit.presets import get_preset

    with pytest.raises(HFCheckpointError, match=match):
        mhf.config_from_hf({**get_preset("phi-3.5-moe"), **change})
