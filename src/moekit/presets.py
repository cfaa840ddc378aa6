"""Named configurations: tiny models to train on a CPU, famous MoE models, and the figures their authors published.

`TINY_PRESETS` are `ModelConfig`s small enough to train on two CPU cores, built so that their comparisons are fair
(the same active parameters per token). `get_preset(name)` returns a fresh `ModelConfig` for those.

Each famous preset (`PRESETS`) is a dict in Hugging Face `config.json` form (the structural fields of the released
file, in the spelling of the release), plus a `source` note saying where the values come from. `moekit params
<preset>` reads them with the same readers as a downloaded `config.json`. GLaM was never released: its preset uses
moekit's own `model_type: "glam"` with the dimensions of the paper's table.

`PUBLISHED` holds the totals and active counts stated by the authors, with the convention each one uses, so that
`moekit params --published` can set our counts beside them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from moekit.config import ModelConfig, MoEConfig, VisionConfig


def _alternating_sliding(num_layers: int) -> list[str]:
    # GPT-OSS: even layers use a 128-token sliding window, odd layers attend to the full context.
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": {
        "source": "mistralai/Mixtral-8x7B-v0.1 config.json (identical to transformers' MixtralConfig() defaults)",
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "mixtral-8x22b": {
        "source": "mistralai/Mixtral-8x22B-v0.1 config.json",
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 6144,
        "intermediate_size": 16384,
        "num_hidden_layers": 56,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 65536,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "deepseek-v2": {
        "source": "deepseek-ai/DeepSeek-V2 config.json (transformers' DeepseekV2Config() defaults are a smaller model)",
        "model_type": "deepseek_v2",
        "architectures": ["DeepseekV2ForCausalLM"],
        "vocab_size": 102400,
        "hidden_size": 5120,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 160,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_group": 8,
        "topk_group": 3,
        "topk_method": "group_limited_greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 16.0,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "attention_bias": False,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "deepseek-v3": {
        "source": "deepseek-ai/DeepSeek-V3 config.json (identical to transformers' DeepseekV3Config() defaults); "
        "the checkpoint stores fp8 weights; the multi-token-prediction module is not counted in the totals",
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "n_group": 8,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "attention_bias": False,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
    },
    "qwen1.5-moe-a2.7b": {
        "source": "Qwen/Qwen1.5-MoE-A2.7B config.json (transformers' Qwen2MoeConfig() defaults match its sizes)",
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "norm_topk_prob": False,
        "max_position_embeddings": 8192,
        "max_window_layers": 21,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {
        "source": "Qwen/Qwen3-30B-A3B config.json (transformers' Qwen3MoeConfig() defaults are a 24-layer model)",
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "attention_bias": False,
        "max_position_embeddings": 40960,
        "max_window_layers": 48,
        "use_sliding_window": False,
        "sliding_window": None,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "dbrx": {
        "source": "databricks/dbrx-base config.json (nested attn_config/ffn_config, older spelling)",
        "model_type": "dbrx",
        "architectures": ["DbrxForCausalLM"],
        "vocab_size": 100352,
        "d_model": 6144,
        "n_heads": 48,
        "n_layers": 40,
        "max_seq_len": 32768,
        "attn_config": {"kv_n_heads": 8, "clip_qkv": 8, "rope_theta": 500000},
        "ffn_config": {
            "ffn_act_fn": {"name": "silu"},
            "ffn_hidden_size": 10752,
            "moe_num_experts": 16,
            "moe_top_k": 4,
            "moe_jitter_eps": 0,
            "moe_loss_weight": 0.05,
            "moe_normalize_expert_weights": 1.0,  # released as 1; transformers 5 wants a float
        },
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "olmoe-1b-7b": {
        "source": "allenai/OLMoE-1B-7B-0924 config.json (transformers' OlmoeConfig() default intermediate_size "
        "2048 is not the release's 1024)",
        "model_type": "olmoe",
        "architectures": ["OlmoeForCausalLM"],
        "vocab_size": 50304,
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "attention_bias": False,
        "clip_qkv": None,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05,
        "pad_token_id": 1,
        "eos_token_id": 50279,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "gpt-oss-20b": {
        "source": "openai/gpt-oss-20b config.json (experts stored in mxfp4 in the checkpoint)",
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 24,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "attention_bias": True,
        "sliding_window": 128,
        "layer_types": _alternating_sliding(24),
        "max_position_embeddings": 131072,
        "initial_context_length": 4096,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": False,
        },
        "swiglu_limit": 7.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4"},
    },
    "gpt-oss-120b": {
        "source": "openai/gpt-oss-120b config.json (transformers' GptOssConfig() defaults have its sizes)",
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 36,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "attention_bias": True,
        "sliding_window": 128,
        "layer_types": _alternating_sliding(36),
        "max_position_embeddings": 131072,
        "initial_context_length": 4096,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": False,
        },
        "swiglu_limit": 7.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4"},
    },
    "granite-3.0-3b-a800m": {
        "source": "ibm-granite/granite-3.0-3b-a800m-base config.json (the instruct model's is the same): 32 layers "
        "of d_model 1536, 24 query heads of 64 and 8 key/value heads, 40 SwiGLU experts of 512, top-8, embedding "
        "tied to the head; muP constants: embeddings x12, sub-layer outputs x0.22, attention scale 1/64, logits / 6",
        "model_type": "granitemoe",
        "architectures": ["GraniteMoeForCausalLM"],
        "vocab_size": 49155,
        "hidden_size": 1536,
        "intermediate_size": 512,
        "num_hidden_layers": 32,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "num_local_experts": 40,
        "num_experts_per_tok": 8,
        "max_position_embeddings": 4096,
        "rope_theta": 10000,
        "rope_scaling": None,
        "attention_bias": False,
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625,
        "logits_scaling": 6.0,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    "phi-3.5-moe": {
        "source": "microsoft/Phi-3.5-MoE-instruct config.json: 32 layers of d_model 4096, 32 query heads of 128 and "
        "8 key/value heads, 16 SwiGLU experts of 6400 routed 2 per token by sparsemixer, LayerNorms, attention and "
        "head biases. Its RoPE is longrope (original context 4096, short/long mscale 1.2432) with two lists of 64 "
        "factors that are not reproduced here: they change no count, and a runnable model should come from the "
        "release's own config.json (without them this preset is plain RoPE, theta 10000)",
        "model_type": "phimoe",
        "architectures": ["PhimoeForCausalLM"],
        "vocab_size": 32064,
        "hidden_size": 4096,
        "intermediate_size": 6400,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 131072,
        "rope_theta": 10000.0,
        "sliding_window": 131072,
        "attention_bias": True,
        "lm_head_bias": True,
        "router_jitter_noise": 0.01,
        "input_jitter_noise": 0.01,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "switch-base-128": {
        "source": "google/switch-base-128 config.json: T5-Base encoder-decoder (12+12 layers), every other FFN "
        "a 128-expert top-1 Switch layer, ReLU experts, embedding shared with the output head",
        "model_type": "switch_transformers",
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "vocab_size": 32128,
        "d_model": 768,
        "d_kv": 64,
        "d_ff": 3072,
        "num_heads": 12,
        "num_layers": 12,
        "num_decoder_layers": 12,
        "num_experts": 128,
        "num_sparse_encoder_layers": 6,
        "num_sparse_decoder_layers": 6,
        "expert_capacity": 64,
        "router_bias": False,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dense_act_fn": "relu",
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    },
    "glam-64e": {
        "source": "GLaM paper (Du et al. 2022, arXiv:2112.06905) Table 4, GLaM (64B/64E): 64 layers, every other "
        "one MoE with 64 top-2 experts, d_model 8192, FFN 32768, 128 heads of 128; 256K vocabulary, embedding "
        "shared with the softmax. Never released, so no config.json: moekit's own model_type. Dense FFNs are "
        "gated (GLU), experts are 2-matrix GELU FFNs: the paper's text, and the only reading that reproduces its "
        "1.2T total and 96.6B active. Per-layer relative position biases are not counted.",
        "model_type": "glam",
        "vocab_size": 256000,
        "hidden_size": 8192,
        "intermediate_size": 32768,
        "num_hidden_layers": 64,
        "num_attention_heads": 128,
        "head_dim": 128,
        "num_experts": 64,
        "num_experts_per_tok": 2,
        "moe_layer_freq": 2,
        "dense_ffn_gated": True,
        "expert_ffn_gated": False,
        "tie_word_embeddings": True,
    },
}


@dataclass(frozen=True)
class Published:
    """Parameter counts as their authors state them, as written ("46.7B"), with the convention they follow."""

    total: str
    active: str | None
    convention: str  # which of our active counts the published one corresponds to (see analysis.params)
    source: str


# convention names: "all" = active_params (embedding matrix and output head included, the Mixtral convention),
# "excl_embedding" = active_params_excl_embedding, "excl_embedding_and_head" = the Kaplan non-embedding count.
PUBLISHED: dict[str, Published] = {
    "mixtral-8x7b": Published("46.7B", "12.9B", "all", "Mistral AI, 'Mixtral of experts' (2023)"),
    "mixtral-8x22b": Published("141B", "39B", "all", "Mistral AI, 'Cheaper, Better, Faster, Stronger' (2024)"),
    # DeepSeek's activated counts leave out the input embedding: V2 20.85B -> "21B", V3 36.63B -> "37B", V2-Lite
    # 2.45B -> "2.4B" (with the embedding they would be 21.38B, 37.55B and 2.66B).
    "deepseek-v2": Published("236B", "21B", "excl_embedding", "DeepSeek-V2 paper (arXiv:2405.04434), abstract"),
    "deepseek-v3": Published(
        "671B", "37B", "excl_embedding", "DeepSeek-V3 report (arXiv:2412.19437), abstract; MTP module excluded"
    ),
    "qwen1.5-moe-a2.7b": Published("14.3B", "2.7B", "all", "Qwen blog, 'Qwen1.5-MoE' (2024)"),
    "qwen3-30b-a3b": Published("30.5B", "3.3B", "all", "Qwen3-30B-A3B model card"),
    "dbrx": Published("132B", "36B", "all", "Databricks blog, 'Introducing DBRX' (2024)"),
    "olmoe-1b-7b": Published("6.9B", "1.3B", "all", "OLMoE paper (arXiv:2409.02060)"),
    "gpt-oss-20b": Published("20.91B", "3.61B", "excl_embedding", "gpt-oss model card (OpenAI 2025), Table 1"),
    "gpt-oss-120b": Published("116.83B", "5.13B", "excl_embedding", "gpt-oss model card (OpenAI 2025), Table 1"),
    # IBM prints "800M" active, a one-significant-figure value written here as 0.8B so that it is compared at its
    # own precision: 807.4M without the (tied) embedding matrix, Kaplan's non-embedding count (882.9M with it).
    "granite-3.0-3b-a800m": Published(
        "3.3B", "0.8B", "excl_embedding_and_head", "IBM Granite 3.0 model card, architecture table (3.3B / 800M)"
    ),
    "phi-3.5-moe": Published(
        "41.9B", "6.6B", "all", "microsoft/Phi-3.5-MoE-instruct model card (6.6B active) and Hub page (41.9B params)"
    ),
    "switch-base-128": Published("7B", None, "all", "Switch Transformers paper (arXiv:2101.03961), Table 9"),
    "glam-64e": Published("1.2T", "96.6B", "all", "GLaM paper (arXiv:2112.06905), Table 4"),
}


# --- tiny presets: 4 layers of d_model 256 (4 query heads of 64, 2 key/value heads), 256 positions, a 4096-token
# vocabulary, embedding tied to the output head. Every one has the same ACTIVE feed-forward width per token, 768
# (3 * d_model, a SwiGLU FFN of 3 * 256 * 768 = 589,824 weights), so at equal tokens they cost the same FLOPs and
# differ only in how many parameters they can hold. Counts at vocab 4096 (`MoELM.num_params` / `active_params`):
#   tiny-dense      4,196,608 total, 4,196,608 active
#   tiny-mixtral   11,282,688 total, 4,204,800 active   (8 experts of 384, top-2, every layer)
#   tiny-switch    12,458,240 total, 4,200,704 active   (8 experts of 768, top-1, layers 1 and 3)
#   tiny-deepseek   9,959,680 total, 4,208,896 active   (1 shared + 16 routed of 192, top-3, layers 1-3)
# (the few thousand extra active weights of the MoE models are their routers, 256 * E per MoE layer).

_TINY = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256, tie_embeddings=True)

TINY_PRESETS: dict[str, ModelConfig] = {
    # The baseline: a dense Llama-style model; its SwiGLU width equals the MoE models' active width.
    "tiny-dense": ModelConfig(**_TINY, dense_d_ff=768),
    # Mixtral (Jiang et al. 2024): 8 SwiGLU experts in every layer, top-2, softmax over the two chosen logits,
    # dropless; a light Switch balance loss and the ST-MoE router z-loss (Zoph et al. 2022) for stable logits.
    "tiny-mixtral": ModelConfig(
        **_TINY,
        dense_d_ff=768,
        moe=MoEConfig(
            d_model=256, d_ff=384, num_experts=8, top_k=2, router="topk", softmax_order="topk_softmax",
            aux_loss_coef=1e-2, z_loss_coef=1e-3,
        ),
    ),
    # Switch Transformer (Fedus et al. 2021): top-1 routing to experts as wide as the dense FFN, capacity factor
    # 1.25 with overflowing tokens dropped (the residual carries them), every other layer MoE (layers 1, 3 as in
    # the released Switch-T5); the combine weight is the un-renormalised router probability so the router learns
    # from the task loss, plus the Switch balance loss at the paper's 1e-2. Capacity depends on the batch: a token
    # can be dropped because of the tokens ahead of it in the batch (other rows included), and decoding one token
    # at a time never drops, so cached decoding matches the full forward only where that dropped nothing.
    "tiny-switch": ModelConfig(
        **_TINY,
        dense_d_ff=768,
        first_k_dense=1,
        moe_every=2,
        moe=MoEConfig(
            d_model=256, d_ff=768, num_experts=8, top_k=1, router="topk", softmax_order="softmax_topk",
            norm_topk_prob=False, capacity_factor=1.25, overflow="drop", aux_loss_coef=1e-2,
        ),
    ),
    # DeepSeekMoE / DeepSeek-V3: fine-grained experts (each Mixtral expert split in two: 16 of width 192) plus one
    # always-on shared expert; keeping compute constant, the shared expert replaces one routed slot (DeepSeekMoE
    # §3.2: top-(2*2 - 1) = top-3). Sigmoid affinities, auxiliary-loss-free balancing by a selection bias moved
    # 1e-3 per step, the tiny sequence-wise balance loss (alpha 1e-4), and the first layer dense (V3 §4.2).
    "tiny-deepseek": ModelConfig(
        **_TINY,
        dense_d_ff=768,
        first_k_dense=1,
        moe=MoEConfig(
            d_model=256, d_ff=192, num_experts=16, top_k=3, router="deepseek", score_func="sigmoid",
            norm_topk_prob=True, selection_bias=True, bias_update_rate=1e-3, seq_aux_loss_coef=1e-4,
            num_shared_experts=1,
        ),
    ),
}


def list_presets() -> list[str]:
    """Names of the tiny `ModelConfig` presets (those `get_preset` returns as a ModelConfig), sorted."""
    return sorted(TINY_PRESETS)


def get_preset(name: str) -> ModelConfig | dict[str, Any]:
    """A fresh copy of a named preset, so callers may edit it.

    Args:
        name: a tiny preset (`list_presets()`) or a famous model (`PRESETS`).
    Returns:
        A `ModelConfig` for a tiny preset; the Hugging Face config dict for a famous one.
    Raises:
        ValueError: unknown name; the message lists every preset.
    """
    if name in TINY_PRESETS:
        return copy.deepcopy(TINY_PRESETS[name])
    if name in PRESETS:
        return copy.deepcopy(PRESETS[name])
    raise ValueError(
        f"unknown preset {name!r}: expected one of {', '.join(list_presets())} (tiny models) or "
        f"{', '.join(sorted(PRESETS))} (famous models, as config dicts)"
    )


# --- vision: a ViT and its V-MoE twin, small enough to train on 2 CPU cores (moekit train-vision) -----------------
# 32x32 images in 4x4 patches (64 patch tokens + a class token), 6 pre-norm blocks of width 128. The V-MoE
# (Riquelme et al. 2021) replaces the MLP of every other block (layers 1, 3, 5) by 8 GELU experts of half the
# dense width with top-2 routing (softmax over all experts, the probabilities as combine weights), capacity
# factor 1.05 with batch prioritized routing, and the importance + load losses; so each token uses the same
# expert parameters as the dense MLP it replaces (active parameters equal but for the routers).
_TINY_VIT = dict(image_size=32, patch_size=4, channels=3, num_classes=10, d_model=128, n_layers=6, n_heads=4,
                 dense_d_ff=512)

VISION_PRESETS: dict[str, VisionConfig] = {
    "tiny-vit": VisionConfig(**_TINY_VIT),
    "tiny-vmoe": VisionConfig(
        **_TINY_VIT,
        moe=MoEConfig(
            d_model=128, d_ff=256, num_experts=8, top_k=2, activation="gelu", expert_bias=True, router="topk",
            softmax_order="softmax_topk", norm_topk_prob=False, capacity_factor=1.05, capacity_priority="score",
            cv2_loss_coef=0.01,
        ),
    ),
}


def get_vision_preset(name: str) -> VisionConfig:
    """A fresh copy of a named vision preset.

    Raises:
        ValueError: unknown name; the message lists the vision presets.
    """
    if name not in VISION_PRESETS:
        raise ValueError(f"unknown vision preset {name!r}: expected one of {', '.join(sorted(VISION_PRESETS))}")
    return copy.deepcopy(VISION_PRESETS[name])
