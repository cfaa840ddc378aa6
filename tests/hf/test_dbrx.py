"""DBRX: nested config, fused Wqkv with clip_qkv, bias-free LayerNorms, p-norm renormalised top-k, [E*F, D] expert
matrices; logits, greedy generation and export against transformers on the same weights; the rope_theta transformers
5.24 ignores."""

import json

import pytest
import torch

import moekit.hf as mhf
from moekit.hf.checkpoint import HFCheckpointError

from hf_harness import assert_same_greedy, assert_same_logits, edit_checkpoint, inputs, randomize, roundtrip

transformers = pytest.importorskip("transformers")
from transformers import DbrxConfig, DbrxForCausalLM  # noqa: E402

THETA = 5000.0


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def tiny_dbrx(tmp_path, attn=None, ffn=None, **overrides):
    """A tiny DBRX whose rope_theta is stated where DBRX reads it and where transformers 5.24 does (both equal)."""
    attn_config = {"kv_n_heads": 2, "clip_qkv": 0.3, "rope_theta": THETA, **(attn or {})}
    ffn_config = {"ffn_hidden_size": 16, "moe_num_experts": 6, "moe_top_k": 3, "moe_normalize_expert_weights": 1.0,
                  **(ffn or {})}  # fmt: skip
    kwargs = dict(vocab_size=97, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, attn_config=attn_config,
                  ffn_config=ffn_config, rope_parameters={"rope_type": "default", "rope_theta": THETA})  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    hf = DbrxForCausalLM(DbrxConfig(**kwargs)).eval()
    randomize(hf)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


VARIANTS = [
    ({}, {}),
    ({"clip_qkv": 8.0, "kv_n_heads": 4}, {"moe_normalize_expert_weights": 2.0, "moe_top_k": 2}),  # the release's
    #   clip, which these tiny activations never reach
    ({"kv_n_heads": 1}, {"moe_normalize_expert_weights": None, "moe_jitter_eps": 0.01}),
]


@pytest.mark.parametrize("attn, ffn", VARIANTS, ids=str)
def test_logits_generation_and_export_match_transformers(tmp_path, attn, ffn):
    hf, folder = tiny_dbrx(tmp_path, attn, ffn)
    model = mhf.load_pretrained(folder, dtype=torch.float32)
    assert model.config.norm == "layernorm" and model.blocks[0].attn_norm.bias is None
    ids = inputs(97)
    assert_same_logits(hf, model, ids)
    assert_same_greedy(hf, model, ids[:1, :5], new_tokens=9)
    roundtrip(model, tmp_path / "out", DbrxForCausalLM, ids)


def test_clip_qkv_and_the_p_norm_change_the_numbers(tmp_path):
    """The variants above test clip_qkv and the p-norm only if each changes the logits."""
    _, folder = tiny_dbrx(tmp_path, ffn={"moe_normalize_expert_weights": 2.0})
    model = mhf.load_pretrained(folder)
    assert model.config.clip_qkv == 0.3 and model.config.moe.topk_norm_p == 2.0
    ids = inputs(97)
    with torch.no_grad():
        want = model(ids).logits
        for block in model.blocks:
            block.attn.clip_qkv = None
        assert (model(ids).logits - want).abs().max() > 1e-3
        model = mhf.load_pretrained(folder)
        for block in model.blocks:
            block.ffn.router.topk_norm_p = 1.0
        assert (model(ids).logits - want).abs().max() > 1e-3


def test_no_clip_qkv_loads_as_no_clamp(tmp_path):
    """transformers 5.24's DbrxAttention cannot run clip_qkv=null (torch.clamp with neither bound raises), so the
    reference here is a clip no activation reaches; moekit loads null as no clamp at all."""
    hf, folder = tiny_dbrx(tmp_path, {"clip_qkv": 1e4})
    config = json.loads((folder / "config.json").read_text())
    config["attn_config"]["clip_qkv"] = None
    (folder / "config.json").write_text(json.dumps(config))
    model = mhf.load_pretrained(folder)
    assert model.config.clip_qkv is None
    assert_same_logits(hf, model, inputs(97))
    with pytest.raises(RuntimeError, match="At least one of 'min' or 'max' must not be None"):
        DbrxForCausalLM(DbrxConfig(d_model=32, n_heads=4, n_layers=1, attn_config={"rope_theta": 1e4}))(inputs(97))


def test_released_rope_theta_in_attn_config_is_used_though_transformers_ignores_it(tmp_path):
    """transformers 5.24 builds DBRX's rotary embedding from the top-level rope_parameters (default theta 10000) and
    never reads attn_config.rope_theta, the field DBRX's release sets (500000). moekit reads DBRX's field. If this
    test starts failing, transformers has changed its reading: revisit hf/dbrx.py."""
    config = DbrxConfig(d_model=32, n_heads=4, n_layers=1, attn_config={"kv_n_heads": 2, "rope_theta": 500000.0})
    assert config.rope_parameters["rope_theta"] == 10000.0  # transformers' value, not the file's
    hf = DbrxForCausalLM(config)
    inv_freq = hf.transformer.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq, 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8))

    released = {"model_type": "dbrx", "d_model": 32, "n_heads": 4, "n_layers": 1, "vocab_size": 97,
                "attn_config": {"kv_n_heads": 2, "rope_theta": 500000.0},
                "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2}}  # fmt: skip
    assert mhf.config_from_hf(released).rope_theta == 500000.0
    as_written_by_transformers = {**released, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    assert mhf.config_from_hf(as_written_by_transformers).rope_theta == 500000.0
    newer = {**released, "attn_config": {"kv_n_heads": 2}, "rope_parameters": {"rope_theta": 7.0e5}}
    assert mhf.config_from_hf(newer).rope_theta == 7.0e5


def test_export_states_the_theta_where_both_readers_find_it(tmp_path):
    _, folder = tiny_dbrx(tmp_path)
    model = mhf.load_pretrained(folder)
    mhf.save_pretrained(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attn_config"]["rope_theta"] == config["rope_parameters"]["rope_theta"] == THETA
    back = DbrxForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.rope_parameters["rope_theta"] == THETA


def test_wrong_expert_matrix_size_is_named(tmp_path):
    _, folder = tiny_dbrx(tmp_path)
    edit_checkpoint(folder, lambda t: {**t, "transformer.blocks.1.ffn.experts.mlp.v1": torch.zeros(5 * 16, 32)})
    with pytest.raises(HFCheckpointError, match=r"experts\.mlp\.v1 has shape \(80, 32\), expected \(96, d_model\)"):
        mhf.load_pretrained(folder)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"tie_word_embeddings": True}, "tie_word_embeddings=true"),
        ({"ffn_config": {"ffn_act_fn": {"name": "gelu"}}}, "ffn_act_fn='gelu'"),
        ({"ffn_config": {"moe_normalize_expert_weights": 0.0}}, "topk_norm_p must be a finite number > 0"),
    ],
)
def test_options_moekit_cannot_express_are_refused_by_name(change, match):
    from moekit.presets import get_preset

    config = get_preset("dbrx")
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    with pytest.raises(HFCheckpointError, match=match):
        mhf.config_from_hf(config)
