"""OLMoE (Muennighoff et al. 2024, OLMoE-1B-7B): config and weight names of transformers' `OlmoeForCausalLM`.

Llama attention with RMSNorm over the whole q projection (H*X) and the whole k projection (G*X) before the heads
are split and rotated (`ModelConfig.qk_norm="proj"`), then, when `clip_qkv` is set, q, k and v clamped to
[-clip_qkv, clip_qkv]; `attention_bias` biases q/k/v and o. Every layer is MoE: softmax over all experts, top-k,
renormalised only when `norm_topk_prob` (false in the release). Expert names are Qwen2-MoE's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.arch import HFConfig
from moekit.config import ModelConfig
from moekit.hf.checkpoint import CheckpointReader, HFCheckpointError
from moekit.hf.common import (
    Weight, check_all_moe, check_fields, export_experts, export_skeleton, import_experts, import_skeleton, model_config,
    reject_unsupported, skeleton_config,
)  # fmt: skip
from moekit.hf.qwen2_moe import moe_config
from moekit.models.lm import MoELM

MODEL_TYPES = ("olmoe",)
ARCHITECTURE = "OlmoeForCausalLM"


def config_from_hf(c: HFConfig) -> ModelConfig:
    """moekit's ModelConfig for an OLMoE config.json (either spelling)."""
    reject_unsupported(c)
    d_model, heads = c.req("hidden_size"), c.req("num_attention_heads")
    if c.get("head_dim") not in (None, d_model // heads):
        # transformers sizes q_norm by hidden_size and k_norm by (hidden_size // heads) * kv_heads
        raise HFCheckpointError(
            f"olmoe with head_dim={c.get('head_dim')} != hidden_size // num_attention_heads = {d_model // heads} "
            "is not supported (its q/k norms are sized by hidden_size)"
        )
    bias = c.flag("attention_bias")
    return model_config(
        c, moe_config(c, d_ff=c.req("intermediate_size")), 4096, qkv_bias=bias, o_bias=bias, qk_norm="proj",
        clip_qkv=c.get("clip_qkv"),
    )  # fmt: skip


def import_weights(model: MoELM, ckpt: CheckpointReader, dtype: torch.dtype) -> Iterator[Weight]:
    """(moekit name, tensor, source) for every parameter, read from transformers' OLMoE names."""
    yield from import_skeleton(model, ckpt, dtype)  # q_norm / k_norm included
    for i, block in enumerate(model.blocks):
        m, b = f"model.layers.{i}.mlp.", f"blocks.{i}.ffn."
        yield b + "router.weight", ckpt.take(m + "gate.weight", dtype), m + "gate.weight"
        yield from import_experts(ckpt, dtype, block.ffn.config.num_experts, b + "experts.", m + "experts.")


def export_weights(model: MoELM) -> dict[str, Tensor]:
    """Every parameter under the names released OLMoE checkpoints use."""
    out = export_skeleton(model)
    for i, block in enumerate(model.blocks):
        m = f"model.layers.{i}.mlp."
        out[m + "gate.weight"] = block.ffn.router.weight
        out.update(export_experts(block.ffn.experts, m + "experts."))
    return out


def check_exportable(model: MoELM) -> None:
    """Raise a ValueError naming the first feature an OLMoE checkpoint cannot express."""
    cfg = model.config
    check_all_moe(model, "OLMoE", article="an", heads_fill_d_model=True)
    check_fields(cfg, "", "OLMoE", dict(qk_norm="proj", o_bias=cfg.qkv_bias, attn_sinks=False, sliding_window=None))
    check_fields(cfg.moe, "moe.", "OLMoE", dict(
        activation="swiglu", router="topk", softmax_order="softmax_topk", expert_bias=False, router_bias=False,
        num_shared_experts=0, selection_bias=False,
    ))  # fmt: skip


def hf_config(model: MoELM) -> dict[str, Any]:
    """config.json for transformers' OlmoeConfig."""
    cfg, moe = model.config, model.config.moe
    config = dict(
        skeleton_config(model), model_type="olmoe", architectures=[ARCHITECTURE], intermediate_size=moe.d_ff,
        num_experts=moe.num_experts, num_experts_per_tok=moe.top_k, norm_topk_prob=moe.norm_topk_prob,
        attention_bias=cfg.qkv_bias, clip_qkv=cfg.clip_qkv,
    )  # fmt: skip
    config.pop("head_dim")  # OlmoeConfig has none: it derives hidden_size // num_attention_heads
    return config
