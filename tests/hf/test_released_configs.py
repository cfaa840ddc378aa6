"""The released configs (moekit's presets hold their config.json) map onto moekit models whose parameter counts
equal the independent count of `moekit.analysis` exactly; options moekit cannot express are refused by name."""

import pytest
import torch

import moekit.hf as mhf
from moekit.analysis.params import analyze
from moekit.hf.checkpoint import HFCheckpointError
from moekit.models.lm import MoELM
from moekit.presets import PRESETS

RELEASED = [name for name, p in PRESETS.items() if isinstance(p, dict) and p.get("model_type") in mhf.FAMILY_MODULES]


def _unquantized(preset: dict) -> dict:
    return {k: v for k, v in preset.items() if k != "quantization_config"}  # the count is the same either way


@pytest.mark.parametrize("name", RELEASED)
def test_released_config_builds_a_model_with_the_analysed_parameter_counts(name):
    hf = _unquantized(PRESETS[name])
    config = mhf.config_from_hf(hf)
    with torch.device("meta"):
        model = MoELM(config)
    report = analyze(hf)
    assert (model.num_params(), model.active_params()) == (report.total_params, report.active_params)


def test_every_new_family_has_a_released_config():
    assert {PRESETS[n]["model_type"] for n in RELEASED} >= {
        "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe", "dbrx", "phimoe",
    }  # fmt: skip


def test_released_layer_placement_and_windows():
    gpt = mhf.config_from_hf(_unquantized(PRESETS["gpt-oss-20b"]))
    assert [gpt.window_of(i) for i in range(4)] == [128, None, 128, None]
    assert gpt.rope_scaling["rope_type"] == "yarn" and gpt.qkv_bias and gpt.o_bias and gpt.attn_sinks
    qwen3 = mhf.config_from_hf(PRESETS["qwen3-30b-a3b"])
    assert qwen3.qk_norm == "head" and qwen3.moe.norm_topk_prob and qwen3.dense_layers is None
    assert qwen3.sliding_window is None
    qwen2 = mhf.config_from_hf(PRESETS["qwen1.5-moe-a2.7b"])
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.moe.shared_expert_gate and not qwen2.moe.norm_topk_prob
    olmoe = mhf.config_from_hf(PRESETS["olmoe-1b-7b"])
    assert olmoe.qk_norm == "proj" and olmoe.clip_qkv is None and not olmoe.moe.norm_topk_prob
    granite = mhf.config_from_hf(PRESETS["granite-3.0-3b-a800m"])
    assert (granite.embedding_multiplier, granite.residual_multiplier, granite.attention_multiplier,
            granite.logits_scaling) == (12.0, 0.22, 1 / 64, 6.0)  # fmt: skip
    assert granite.tie_embeddings and granite.moe.softmax_order == "topk_softmax" and granite.moe.top_k == 8
    dbrx = mhf.config_from_hf(PRESETS["dbrx"])
    assert dbrx.rope_theta == 500000 and dbrx.clip_qkv == 8 and dbrx.norm == "layernorm" and not dbrx.norm_bias
    assert dbrx.kv_heads == 8 and dbrx.moe.norm_topk_prob and dbrx.moe.topk_norm_p == 1.0 and dbrx.moe.top_k == 4
    phi = mhf.config_from_hf(PRESETS["phi-3.5-moe"])
    assert phi.norm == "layernorm" and phi.norm_bias and phi.lm_head_bias and phi.qkv_bias and phi.o_bias
    assert phi.moe.router == "sparsemixer" and phi.moe.sparsemixer_eps == 0.01 and phi.sliding_window == 131072


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("gpt-oss-20b", {"quantization_config": {"quant_method": "gptq"}}, "quantized.*'gptq'"),
        ("qwen1.5-moe-a2.7b", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("qwen1.5-moe-a2.7b", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size=0"),
        ("qwen1.5-moe-a2.7b", {"mlp_only_layers": [30]}, "mlp_only_layers"),
        ("qwen3-30b-a3b", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        ("olmoe-1b-7b", {"head_dim": 64}, "head_dim=64"),
        ("gpt-oss-120b", {"num_hidden_layers": 5, "quantization_config": None}, "36 layer_types for 5 layers"),
        ("granite-3.0-3b-a800m", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("phi-3.5-moe", {"num_experts_per_tok": 1}, "num_experts_per_tok=1"),
        ("dbrx", {"tie_word_embeddings": True}, "tie_word_embeddings"),
    ],
)
def test_options_moekit_cannot_express_are_refused_by_name(name, change, match):
    with pytest.raises(HFCheckpointError, match=match):
        mhf.config_from_hf({**PRESETS[name], **change})


PLACEMENT_VARIANTS = [
    ("qwen1.5-moe-a2.7b", {"num_hidden_layers": 6, "mlp_only_layers": [0, 3], "decoder_sparse_step": 2}),
    ("qwen1.5-moe-a2.7b", {"num_hidden_layers": 6, "use_sliding_window": True, "sliding_window": 64,
                           "max_window_layers": 4}),
    ("qwen3-30b-a3b", {"num_hidden_layers": 5, "mlp_only_layers": [4], "decoder_sparse_step": 1,
                       "use_sliding_window": True, "sliding_window": 64}),
    ("gpt-oss-120b", {"num_hidden_layers": 5, "layer_types": None}),  # transformers' rule: sliding, full, ...
    ("gpt-oss-120b", {"num_hidden_layers": 3,
                      "layer_types": ["full_attention", "sliding_attention", "full_attention"]}),
    ("mixtral-8x7b", {"num_hidden_layers": 2, "sliding_window": 64}),
    ("phi-3.5-moe", {"num_hidden_layers": 2, "sliding_window": 64}),
    ("granite-3.0-3b-a800m", {"num_hidden_layers": 3}),
    ("dbrx", {"n_layers": 3}),
]  # fmt: skip


@pytest.mark.parametrize("name, change", PLACEMENT_VARIANTS, ids=str)
def test_layer_placement_and_windows_agree_with_moekit_analysis(name, change):
    """Two independent readings of the same config.json (moekit.hf for models, moekit.analysis for counting) put
    MoE layers and sliding windows in the same places."""
    from moekit.analysis.arch import arch_from_config

    hf = {**_unquantized(PRESETS[name]), **change}
    config, spec = mhf.config_from_hf(hf), arch_from_config(hf)
    assert [config.is_moe_layer(i) for i in range(config.n_layers)] == [s.moe is not None for s in spec.layers]
    assert [config.window_of(i) for i in range(config.n_layers)] == [s.window for s in spec.layers]
