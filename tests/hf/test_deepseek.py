"""DeepSeek-V2 / V3: logits, greedy generation, padding and export against transformers on the same weights; the
routers against transformers' own; MTP layers skipped on purpose; options moekit cannot express refused."""

import json

import pytest
import torch
from hf_harness import assert_same_greedy, assert_same_logits, inputs, randomize, roundtrip
from safetensors.torch import load_file, save_file

import moekit.hf as mhf
from moekit.hf.checkpoint import HFCheckpointError

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

V = 97
CLASSES = {"v2": (DeepseekV2Config, DeepseekV2ForCausalLM), "v3": (DeepseekV3Config, DeepseekV3ForCausalLM)}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}


def grouped(version, **extra):
    """Group-limited routing (4 groups of 2 experts, 2 kept), spelt as each version's config spells it."""
    method = {"topk_method": "group_limited_greedy"} if version == "v2" else {}
    return dict(n_group=4, topk_group=2, **extra, **method)


def tiny(tmp_path, version, **overrides):
    kwargs = dict(vocab_size=V, hidden_size=32, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3,
                  num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                  kv_lora_rank=12, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                  first_k_dense_replace=1, max_position_embeddings=64, routed_scaling_factor=1.5,
                  rope_parameters={"rope_theta": 5000.0, "rope_type": "default"})  # fmt: skip
    kwargs.update(overrides)
    config_class, model_class = CLASSES[version]
    torch.manual_seed(0)
    hf = model_class(config_class(**kwargs)).eval()
    randomize(hf)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


VARIANTS = [
    ("v3", {"n_group": 4, "topk_group": 2}),  # V3 as released: q-LoRA, grouped sigmoid routing, a dense first layer
    ("v3", {"q_lora_rank": None, "norm_topk_prob": False, "rope_interleave": False, "n_group": 1, "topk_group": 1,
            "first_k_dense_replace": 0}),
    ("v3", {"n_group": 2, "topk_group": 1, "num_experts_per_tok": 3,
            "rope_parameters": {"rope_theta": 5000.0, **YARN, "mscale": 0.8, "mscale_all_dim": 1.0}}),
    ("v2", {"q_lora_rank": None, "topk_method": "greedy", "first_k_dense_replace": 0,  # V2-Lite-shaped
            "rms_norm_eps": 0.05}),  # large: the latent norms keep transformers' fixed 1e-6
    ("v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
            "rope_parameters": {"rope_theta": 5000.0, **YARN, "mscale": 0.707, "mscale_all_dim": 0.707}}),
    ("v2", {"topk_method": "greedy", "num_experts_per_tok": 1, "norm_topk_prob": True, "tie_word_embeddings": True}),
]


@pytest.mark.parametrize("version,overrides", VARIANTS, ids=[f"{v}-{'-'.join(o)}" for v, o in VARIANTS])
def test_logits_generation_and_export_match_transformers(tmp_path, version, overrides):
    hf, folder = tiny(tmp_path, version, **overrides)
    model = mhf.load_pretrained(folder, dtype=torch.float32)
    ids = inputs(V)
    assert_same_logits(hf, model, ids)
    assert_same_greedy(hf, model, ids[:1, :5], new_tokens=10)
    roundtrip(model, tmp_path / "out", CLASSES[version][1], ids)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_left_padding_matches_transformers_attention_mask(tmp_path, version):
    hf, folder = tiny(tmp_path, version, **grouped(version))
    model = mhf.load_pretrained(folder)
    ids = inputs(V)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :4] = False
    with torch.no_grad():
        want = hf(ids, attention_mask=mask.long()).logits
        got = model(ids, mask=mask).logits
    assert (got - want)[mask].abs().max().item() <= 1e-4


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_routers_choose_and_weight_as_transformers(tmp_path, version):
    """Many tokens through both routers on the same weights: same expert sets, same weights per expert."""
    hf, folder = tiny(tmp_path, version, **grouped(version, num_experts_per_tok=3))
    model = mhf.load_pretrained(folder)
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, want_w, want_i = hf.model.layers[1].mlp.gate(x)
        route = model.blocks[1].ffn.router(x)
    dense = lambda w, i: torch.zeros(512, 8).scatter(1, i, w)  # order-free comparison
    assert torch.equal(dense(torch.ones_like(want_w), want_i), dense(torch.ones_like(route.weights), route.indices))
    assert torch.allclose(dense(want_w, want_i), dense(route.weights, route.indices), atol=1e-6)


def test_group_rule_differs_between_versions():
    """V3 scores a group by its top-2 sum, V2 by its best expert: a case where they pick different groups."""
    from moekit.config import MoEConfig
    from moekit.layers.routing import limit_to_top_groups

    scores = torch.tensor([[0.9, 0.0, 0.5, 0.5]])  # group 0: max 0.9, top-2 0.9; group 1: max 0.5, top-2 1.0
    assert torch.isinf(limit_to_top_groups(scores, 2, 1, top2_sum=True)[0, :2]).all()
    assert torch.isinf(limit_to_top_groups(scores, 2, 1, top2_sum=False)[0, 2:]).all()
    assert MoEConfig(router="deepseek", score_func="sigmoid", n_group=2, num_experts=4).score_func == "sigmoid"


def test_bf16_keeps_the_correction_bias_float32(tmp_path):
    hf, folder = tiny(tmp_path, "v3", n_group=4, topk_group=2)
    model = mhf.load_pretrained(folder, dtype="bfloat16")
    assert model.blocks[1].ffn.router.selection_bias.dtype == torch.float32
    assert model.blocks[1].attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.blocks[1].ffn.router.selection_bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)
    # bf16 decoding runs the latent-space (absorbed) attention: close to the one-pass bf16 logits
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(ids).logits.float()
        cache = model.new_cache(1, 8)
        steps = [model(ids[:, :4], cache=cache).logits]
        steps += [model(ids[:, i : i + 1], cache=cache, start_pos=i).logits for i in (4, 5)]
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), whole, atol=0.1, rtol=0.05)


def test_older_config_spelling_with_yarn(tmp_path):
    """Released V2/V3 config.json files spell RoPE as rope_theta + rope_scaling {"type": "yarn", ...}."""
    rope = {"rope_theta": 5000.0, **YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
    hf, folder = tiny(tmp_path, "v2", rope_parameters=rope, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    config = json.loads((folder / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    config.update(rope_scaling=params, torch_dtype=config.pop("dtype"))
    (folder / "config.json").write_text(json.dumps(config))
    model = mhf.load_pretrained(folder)
    assert model.config.rope_scaling["rope_type"] == "yarn"
    assert_same_logits(hf, model, inputs(V))


def _edit(folder, change_tensors=None, change_config=None):
    if change_tensors is not None:
        tensors = load_file(folder / "model.safetensors")
        change_tensors(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if change_config is not None:
        config = json.loads((folder / "config.json").read_text())
        change_config(config)
        (folder / "config.json").write_text(json.dumps(config))


def test_mtp_layers_are_skipped_on_purpose_and_nothing_else(tmp_path):
    hf, folder = tiny(tmp_path, "v3", n_group=4, topk_group=2)  # 3 layers: a released-style MTP layer is layer 3
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(32, 64), "model.layers.3.enorm.weight": torch.ones(32)}
    _edit(folder, lambda t: t.update(mtp), lambda c: c.update(num_nextn_predict_layers=1))
    assert_same_logits(hf, mhf.load_pretrained(folder), inputs(V))
    _edit(folder, change_config=lambda c: c.update(num_nextn_predict_layers=0))
    with pytest.raises(HFCheckpointError, match=r"no place for.*model\.layers\.3\.eh_proj\.weight"):
        mhf.load_pretrained(folder)


def test_missing_correction_bias_is_named(tmp_path):
    _, folder = tiny(tmp_path, "v3", n_group=4, topk_group=2)
    _edit(folder, lambda t: t.pop("model.layers.2.mlp.gate.e_score_correction_bias"))
    with pytest.raises(HFCheckpointError, match=r"model\.layers\.2\.mlp\.gate\.e_score_correction_bias"):
        mhf.load_pretrained(folder)


@pytest.mark.parametrize(
    "version,change,message",
    [
        ("v3", {"attention_bias": True}, "attention_bias"),
        ("v2", {"mlp_bias": True}, "mlp_bias"),
        ("v2", {"norm_topk_prob": True}, "norm_topk_prob"),
        ("v3", {"moe_layer_freq": 2}, "moe_layer_freq"),
        ("v3", {"hidden_act": "gelu"}, "hidden_act"),
        ("v2", {"topk_method": "noaux_tc"}, "topk_method"),
        ("v3", {"topk_method": "group_limited_greedy"}, "topk_method"),
        ("v3", {"quantization_config": {"quant_method": "awq"}}, "awq"),
    ],
    ids=str,
)
def test_options_moekit_cannot_express_are_refused(tmp_path, version, change, message):
    _, folder = tiny(tmp_path, version, **grouped(version))
    _edit(folder, change_config=lambda c: c.update(change))
    with pytest.raises(HFCheckpointError, match=message):
        mhf.load_pretrained(folder)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    from moekit.models.lm import MoELM
    from moekit.presets import get_preset

    with pytest.raises(ValueError, match="multi-head latent attention"):
        mhf.save_pretrained(MoELM(get_preset("tiny-mixtral")), tmp_path / "x", model_type="deepseek_v3")
    _, folder = tiny(tmp_path, "v3", n_group=4, topk_group=2)
    model = mhf.load_pretrained(folder)
    with pytest.raises(ValueError, match="score_func='softmax'"):
        mhf.save_pretrained(model, tmp_path / "y", model_type="deepseek_v2")


def test_cache_keeps_the_latent_and_analysis_stays_sensible(tmp_path):
    _, folder = tiny(tmp_path, "v3", n_group=4, topk_group=2)
    model = mhf.load_pretrained(folder)
    cache = model.new_cache(2, 16)
    assert cache.k[0].shape == (2, 1, 16, 12) and cache.v[0].shape == (2, 1, 16, 4)  # C = 12, R = 4 per token
    ids = inputs(V, seq=10)
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :6], cache=cache).logits
        rest = model(ids[:, 6:], cache=cache, start_pos=6).logits
    assert torch.allclose(torch.cat((first, rest), dim=1), full, atol=1e-5)
    routed = sum(b.ffn.experts.w_in.numel() + b.ffn.experts.w_out.numel() for b in model.blocks if b.is_moe)
    assert model.active_params() == model.num_params() - routed + routed * 2 // 8
    # MLA scores over N + R = 12 dims and reads V = 6-wide values in each of 4 heads, 3 layers
    assert model.flops_per_token(10) - model.flops_per_token(0) == 2 * 3 * 10 * 4 * (12 + 6)


@pytest.mark.parametrize("name,total,active", [("deepseek-v2", 235.74e9, 20.85e9), ("deepseek-v3", 671.03e9, 36.63e9)])
def test_released_configs_build_the_published_sizes(name, total, active):
    """The released config.json files (presets) give 236B/21B and 671B/37B (active without the embedding, as the
    papers count; V3's MTP layer not counted); built on the meta device, so nothing is allocated."""
    from moekit.models.lm import MoELM
    from moekit.presets import PRESETS

    hf = {k: v for k, v in PRESETS[name].items() if k not in ("source", "quantization_config")}
    with torch.device("meta"):
        model = MoELM(mhf.config_from_hf(hf))
    assert model.num_params() == pytest.approx(total, rel=1e-4)
    assert model.active_params() - model.embed.weight.numel() == pytest.approx(active, rel=1e-3)
