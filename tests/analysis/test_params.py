"""moekit.analysis.params: counts equal transformers' models on the meta device, published figures are reproduced,
both config spellings agree, FLOP/KV formulas match closed forms, and `moekit params` works from the command line."""

from __future__ import annotations

import copy
import json
import re
from fractions import Fraction

import pytest
import torch

from moekit.analysis import analyze, arch_from_config, published_comparison
from moekit.analysis.params import DTYPE_BYTES, agreement
from moekit.cli import main
from moekit.presets import PRESETS, PUBLISHED, get_preset

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

# ---------------------------------------------------------------------------------------------------- helpers


def _hf_model(config: dict):
    """The transformers model for a config dict, built on the meta device (no memory, no init cost)."""
    config = {k: v for k, v in config.items() if k not in ("source", "quantization_config")}
    hf_config = transformers.AutoConfig.for_model(**config)
    if config["model_type"] == "switch_transformers":
        auto = transformers.AutoModelForSeq2SeqLM
    else:
        auto = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(hf_config)


def _meta_counts(config: dict) -> tuple[int, int, int]:
    """(parameters, active parameters, persistent buffers other than rotary tables) of the transformers model."""
    model = _hf_model(config)
    total = sum(p.numel() for p in model.parameters())
    report = analyze(config)  # only for E and K, to turn the routed-expert tensors' size into their active part
    experts = sum(p.numel() for n, p in model.named_parameters() if re.search(r"\.experts\.", n))
    if report.experts:
        e, k = report.experts["routed"], report.experts["top_k"]
        active = total - Fraction(experts * (e - k), e)
    else:
        active = total
    buffers = sum(b.numel() for n, b in model.named_buffers() if "inv_freq" not in n)
    return total, int(active), buffers


TINY = dict(vocab_size=97, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4)
TINY_CONFIGS = {
    "mixtral": dict(TINY, model_type="mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "mixtral-window-tied-headdim": dict(
        TINY, model_type="mixtral", num_key_value_heads=2, head_dim=8, sliding_window=8, tie_word_embeddings=True,
        num_local_experts=4, num_experts_per_tok=1,
    ),
    "qwen2_moe": dict(
        TINY, model_type="qwen2_moe", num_key_value_heads=2, moe_intermediate_size=8, num_experts=6,
        num_experts_per_tok=2, shared_expert_intermediate_size=12, decoder_sparse_step=2, mlp_only_layers=[1],
    ),
    "qwen2_moe-nobias-window": dict(
        TINY, model_type="qwen2_moe", moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
        shared_expert_intermediate_size=12, qkv_bias=False, use_sliding_window=True, sliding_window=8,
        max_window_layers=3,
    ),
    "qwen3_moe": dict(
        TINY, model_type="qwen3_moe", num_key_value_heads=2, head_dim=8, moe_intermediate_size=8, num_experts=6,
        num_experts_per_tok=2, mlp_only_layers=[0], attention_bias=True,
    ),
    "olmoe": dict(TINY, model_type="olmoe", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  attention_bias=True, eos_token_id=None, pad_token_id=None),
    "deepseek_v2": dict(
        TINY, model_type="deepseek_v2", moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4,
        qk_rope_head_dim=2, v_head_dim=4, attention_bias=True, mlp_bias=True,
    ),
    "deepseek_v3": dict(
        TINY, model_type="deepseek_v3", moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=2, q_lora_rank=6, kv_lora_rank=8, qk_nope_head_dim=4,
        qk_rope_head_dim=2, v_head_dim=4, n_group=2, topk_group=1,
    ),
    "gpt_oss": dict(TINY, model_type="gpt_oss", num_key_value_heads=2, head_dim=4, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=8),
    "phimoe": dict(TINY, model_type="phimoe", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                   attention_bias=True, lm_head_bias=True),
    "granitemoe": dict(TINY, model_type="granitemoe", num_key_value_heads=2, num_local_experts=4,
                       num_experts_per_tok=2, attention_bias=True),
    "granitemoeshared": dict(TINY, model_type="granitemoeshared", num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=10),
    "dbrx": dict(
        model_type="dbrx", vocab_size=97, d_model=16, n_heads=4, n_layers=3,
        attn_config={"kv_n_heads": 2, "clip_qkv": 8, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2},
    ),
    "switch_transformers": dict(
        model_type="switch_transformers", vocab_size=97, d_model=16, d_kv=4, d_ff=24, num_heads=2, num_layers=4,
        num_decoder_layers=2, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1, num_experts=3,
        router_bias=True,
    ),
}  # fmt: skip
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe",
            "granitemoe", "granitemoeshared", "dbrx", "switch_transformers"]  # fmt: skip
REAL_PRESETS = [name for name, cfg in PRESETS.items() if cfg["model_type"] != "glam"]

# ---------------------------------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_config_counts_equal_the_transformers_model_on_meta(name):
    config = TINY_CONFIGS[name]
    total, active, _ = _meta_counts(config)
    report = analyze(config)
    assert (report.total_params, report.active_params) == (total, active)


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_full_size_preset_counts_equal_the_transformers_model_on_meta(name):
    total, active, buffers = _meta_counts(get_preset(name))
    report = analyze(name)
    assert (report.total_params, report.active_params, report.buffers) == (total, active, buffers)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_transformers_default_config_as_written_by_to_dict_counts_equal(model_type):
    config = transformers.AutoConfig.for_model(model_type).to_dict()  # the newer spelling, every key present
    if model_type == "dbrx":
        config["attn_config"]["rope_theta"] = 10000.0  # transformers 5.23's DbrxAttention still reads it here
    if model_type == "deepseek_v2":
        config["num_experts_per_tok"] = 6  # the default (None) builds a model that cannot route
    total, active, _ = _meta_counts(config)
    report = analyze(config)
    assert (report.total_params, report.active_params) == (total, active)


def test_deepseek_v3_selection_bias_is_a_buffer_reported_apart_from_the_parameters():
    report = analyze("deepseek-v3")
    assert report.buffers == 58 * 256  # e_score_correction_bias: [E] in each of the 58 MoE layers
    assert report.total_params == 671_026_404_352  # model.parameters(), without the buffer


def test_untied_switch_counts_one_input_embedding_where_transformers_5_builds_three():
    # With tie_word_embeddings=False, transformers 5.23's Switch keeps `shared`, encoder.embed_tokens and
    # decoder.embed_tokens as three matrices (its tie map is applied only to tied models); the architecture, and T5
    # in the same library, has one input embedding shared by both stacks. We count that one.
    config = dict(TINY_CONFIGS["switch_transformers"], tie_word_embeddings=False)
    total, _, _ = _meta_counts(config)
    assert analyze(config).total_params == total - 2 * 97 * 16


def test_deepseek_v3_mtp_module_is_one_moe_block_plus_projection_and_norms_reported_apart():
    report, d = analyze("deepseek-v3"), 7168
    moe_block = (
        report.breakdown["routed_experts"]["total"]
        + report.breakdown["shared_experts"]["total"]
        + report.breakdown["router"]["total"]
    ) // 58 + report.breakdown["attention"]["total"] // 61
    moe_block += 2 * d + 512 + 1536  # the block's two norms, and MLA's latent norms
    assert report.mtp_params == moe_block + 2 * d * d + 3 * d  # eh_proj [D, 2D]; enorm, hnorm, final norm
    assert report.total_params + report.mtp_params < 685e9  # DeepSeek's "685B" adds the MTP's copies of emb/head


# ---------------------------------------------------------------------------------------------------- published


def test_mixtral_8x7b_reproduces_46_7b_total_and_12_9b_active():
    report = analyze("mixtral-8x7b")
    assert round(report.total_params / 1e9, 1) == 46.7
    assert round(report.active_params / 1e9, 1) == 12.9


def test_phi_3_5_moe_reproduces_41_9b_total_and_6_6b_active():
    report = analyze("phi-3.5-moe")
    assert round(report.total_params / 1e9, 1) == 41.9 and round(report.active_params / 1e9, 1) == 6.6
    # LayerNorm biases (2 per layer + final), attention biases and the head's bias are counted: transformers' count
    assert report.breakdown["norms"]["total"] == (2 * 32 + 1) * 2 * 4096


def test_granite_3_0_3b_a800m_reproduces_3_3b_total_and_800m_active_without_embedding():
    report = analyze("granite-3.0-3b-a800m")
    assert round(report.total_params / 1e9, 1) == 3.3
    assert round(report.active_params_excl_embedding_and_head / 1e8) == 8  # 807M; 883M with the tied embedding


def test_deepseek_v3_reproduces_671b_total_and_37b_active_without_mtp():
    report = analyze("deepseek-v3")
    assert round(report.total_params / 1e9) == 671
    assert round(report.active_params_excl_embedding / 1e9) == 37


def test_every_published_figure_is_reproduced_in_its_stated_convention():
    rows = published_comparison()
    assert {row["name"] for row in rows} == set(PUBLISHED)
    assert [row["name"] for row in rows if not row["matches"]] == []


def test_agreement_accepts_rounding_and_truncation_at_the_published_digits_only():
    assert agreement(12_879_925_248, "12.9B") == "rounds"
    assert agreement(3_353_032_704, "3.3B") == "truncates"
    assert agreement(13_000_000_000, "12.9B") is None
    assert agreement(1_161_756_155_904, "1.2T") == "rounds"


# ---------------------------------------------------------------------------------------------------- spellings

_NEW_EXPERT_KEY = {"mixtral", "qwen3_moe", "olmoe", "gpt_oss"}  # families whose configs accept both expert-count keys


def _old_spelling(config: dict) -> dict:
    c = copy.deepcopy(config)
    if "dtype" in c:
        c["torch_dtype"] = c.pop("dtype")
    if "rope_parameters" in c:
        rope = dict(c.pop("rope_parameters"))
        c["rope_theta"] = rope.pop("rope_theta")
        kind = rope.pop("rope_type", "default")
        c["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    if c["model_type"] in _NEW_EXPERT_KEY and "num_local_experts" in c:
        c["num_experts"] = c.pop("num_local_experts")
    return c


def _new_spelling(config: dict) -> dict:
    c = copy.deepcopy(config)
    if "torch_dtype" in c:
        c["dtype"] = c.pop("torch_dtype")
    if "rope_theta" in c:
        scaling = dict(c.pop("rope_scaling", None) or {})
        kind = scaling.pop("rope_type", scaling.pop("type", "default"))
        c["rope_parameters"] = {"rope_type": kind, "rope_theta": c.pop("rope_theta"), **scaling}
    if c["model_type"] == "dbrx" and "rope_theta" in c.get("attn_config", {}):
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": c["attn_config"].pop("rope_theta")}
    if c["model_type"] in _NEW_EXPERT_KEY and "num_experts" in c:
        c["num_local_experts"] = c.pop("num_experts")
    return c


@pytest.mark.parametrize("name", [n for n in REAL_PRESETS if PRESETS[n]["model_type"] != "switch_transformers"])
def test_old_and_new_config_spellings_give_identical_results(name):
    old, new = _old_spelling(get_preset(name)), _new_spelling(get_preset(name))
    assert ("rope_theta" in old or old["model_type"] == "dbrx") and "rope_parameters" in new
    assert "torch_dtype" in old and "dtype" in new
    assert arch_from_config(old) == arch_from_config(new)
    assert analyze(old).to_dict() == analyze(new).to_dict()
    if name != "dbrx":  # transformers 5.23 cannot build DBRX from the newer spelling (reads attn_config.rope_theta)
        assert _meta_counts(new)[0] == analyze(new).total_params


# ---------------------------------------------------------------------------------------------------- formulas


def test_mixtral_active_params_match_the_closed_form():
    d, f, v, layers, heads, kv, hd = 4096, 14336, 32000, 32, 32, 8, 128
    attention = d * heads * hd * 2 + d * kv * hd * 2
    per_layer = attention + 2 * 3 * d * f + 8 * d + 2 * d  # 2 of 8 experts, router, two norms
    assert analyze("mixtral-8x7b").active_params == layers * per_layer + 2 * v * d + d


def test_forward_flops_are_twice_the_active_matmul_weights_plus_attention_and_training_is_three_times():
    d, v, layers, heads, hd, ctx = 4096, 32000, 32, 32, 128, 2048
    report = analyze("mixtral-8x7b", context=ctx)
    norms = (2 * layers + 1) * d
    matmul = report.active_params - v * d - norms  # everything but the embedding lookup and the norm weights
    attention = layers * 2 * ctx * heads * (hd + hd)
    assert report.attention_flops_per_token == attention
    assert report.forward_flops_per_token == 2 * matmul + attention
    assert report.training_flops_per_token == 3 * report.forward_flops_per_token


def test_all_experts_active_costs_the_full_forward_flops():
    config = dict(TINY_CONFIGS["mixtral"], num_experts_per_tok=4)  # top-4 of 4: a dense model in disguise
    assert analyze(config).flops_fraction_of_all_experts == 1.0
    assert analyze("mixtral-8x7b").flops_fraction_of_all_experts < 0.3  # top-2 of 8, attention shared


def test_mla_caches_the_latent_and_rope_key_per_layer():
    report = analyze("deepseek-v3", context=1000, batch=3, kv_dtype="fp8")
    assert report.kv_cache["bytes_per_token"] == 61 * (512 + 64)
    assert report.kv_cache["bytes_at_context"] == 3 * 1000 * 61 * (512 + 64)


def test_gqa_caches_k_and_v_of_the_kv_heads_and_sliding_layers_stop_at_the_window():
    report = analyze("gpt-oss-20b", context=4096)
    per_layer_token = 2 * 8 * 64 * 2  # K and V, 8 kv heads of 64, bf16
    assert report.kv_cache["bytes_per_token"] == 24 * per_layer_token
    assert report.kv_cache["bytes_at_context"] == 12 * per_layer_token * 128 + 12 * per_layer_token * 4096


def test_encoder_decoder_caches_decoder_self_and_cross_attention_only():
    report = analyze("switch-base-128", context=10)
    assert report.kv_cache["bytes_per_token"] == 12 * 2 * (2 * 12 * 64) * 2  # 12 decoder layers, self + cross


def test_weight_memory_is_total_params_times_bytes_and_the_dense_equivalent_has_the_active_params():
    report = analyze("qwen3-30b-a3b")
    assert report.weight_bytes == {k: int(report.total_params * b) for k, b in DTYPE_BYTES.items()}
    assert report.dense_equivalent["params"] == report.active_params
    assert report.dense_equivalent["weight_bytes_bf16"] == 2 * report.active_params


def test_switch_places_experts_in_every_other_block_of_both_stacks():
    spec = arch_from_config(get_preset("switch-base-128"))
    sparse = [(layer.stack, i % 12) for i, layer in enumerate(spec.layers) if layer.moe is not None]
    assert sparse == [(s, i) for s in ("encoder", "decoder") for i in (1, 3, 5, 7, 9, 11)]


def test_tied_embeddings_keep_the_matrix_as_the_head_when_the_embedding_is_excluded():
    report = analyze("switch-base-128")
    assert report.active_params_excl_embedding == report.active_params
    assert report.active_params_excl_embedding_and_head == report.active_params - 32128 * 768


# ---------------------------------------------------------------------------------------------------- inputs, errors


def test_a_model_folder_and_a_config_file_read_like_the_preset(tmp_path):
    folder = tmp_path / "Mixtral-8x7B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(get_preset("mixtral-8x7b")))
    from_folder, from_file = analyze(folder), analyze(folder / "config.json")
    assert from_folder.name == from_file.name == "Mixtral-8x7B"
    assert from_folder.total_params == from_file.total_params == analyze("mixtral-8x7b").total_params


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported model_type 'llama'.*mixtral.*qwen3_moe"):
        analyze({"model_type": "llama"})


def test_missing_file_and_bad_json_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nope.json"))):
        analyze(tmp_path / "nope.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*not valid JSON"):
        analyze(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a config object"):
        analyze(tmp_path)


def test_missing_key_without_a_default_is_named():
    config = get_preset("glam-64e")  # GLaM has no transformers class, hence no defaults
    del config["hidden_size"]
    with pytest.raises(ValueError, match="glam config lacks 'hidden_size'"):
        analyze(config)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "gpt-oss-20b", "switch-base-128",
                                  "granite-3.0-3b-a800m", "phi-3.5-moe"])
def test_a_config_saved_by_transformers_5_reads_like_the_release(name, tmp_path):
    config = {k: v for k, v in get_preset(name).items() if k not in ("source", "quantization_config")}
    transformers.AutoConfig.for_model(**config).save_pretrained(tmp_path)  # the newer spelling, as written today
    ignore = {"name": None, "source": None, "quantization": None}  # we dropped quantization_config above
    assert analyze(tmp_path).to_dict() | ignore == analyze(name).to_dict() | ignore


def test_missing_keys_take_the_transformers_class_defaults():
    # MixtralConfig()'s defaults are Mixtral-8x7B: a config naming only the model type is that model
    assert analyze({"model_type": "mixtral"}).total_params == analyze("mixtral-8x7b").total_params
    assert analyze({"model_type": "qwen3_moe"}).total_params == _meta_counts({"model_type": "qwen3_moe"})[0]


def test_context_and_kv_dtype_are_validated():
    with pytest.raises(ValueError, match="context must be a positive integer"):
        analyze("mixtral-8x7b", context=0)
    with pytest.raises(ValueError, match="unknown kv_dtype 'fp16'"):
        analyze("mixtral-8x7b", kv_dtype="fp16")


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_json_has_total_and_active_params(capsys):
    assert main(["params", "mixtral-8x7b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["total_params"], data["active_params"]) == (46_702_792_704, 12_879_925_248)


def test_cli_compare_prints_one_column_per_model(capsys):
    assert main(["params", "--compare", "mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert all(name in header for name in ("mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b"))
    assert main(["params", "--compare", "mixtral-8x7b", "dbrx", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["mixtral-8x7b", "dbrx"]


def test_cli_text_report_and_published_table(capsys):
    assert main(["params", "deepseek-v3", "--context", "8192", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "671,026,404,352" in out and "context 8,192 x batch 2" in out
    assert main(["params", "--published"]) == 0
    assert "| mixtral-8x7b" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["granitemoe", "granitemoeshared", "dbrx", "phimoe"])
def test_cli_params_reads_a_folder_transformers_wrote(name, tmp_path, capsys):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY_CONFIGS[name]))
    hf.save_pretrained(tmp_path)
    assert main(["params", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model_type"] == name and data["total_params"] == sum(p.numel() for p in hf.parameters())


def test_cli_error_is_one_line_and_exit_code_2(capsys):
    assert main(["params", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit: error: 'no-such-model' is neither a preset") and err.count("\n") == 1
