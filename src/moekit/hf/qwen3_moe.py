"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): config and weight names of transformers' `Qwen3MoeForCausalLM`.

Qwen2-MoE without the shared expert and the q/k/v biases, with per-head RMSNorm of queries and keys over head_dim,
before RoPE (`ModelConfig.qk_norm="head"`); `attention_bias` puts biases on q/k/v and o together. Layer placement
(`mlp_only_layers`, `decoder_sparse_step`) and expert names are Qwen2-MoE's. A sliding window, when
`use_sliding_window`, applies to every layer (transformers builds one sliding mask for all of them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.arch import HFConfig
from moekit.config import ModelConfig
from moekit.hf.checkpoint import CheckpointReader
from moekit.hf.common import (
    Weight, check_fields, export_dense_mlp, export_experts, export_skeleton, import_dense_mlp, import_experts,
    import_skeleton, model_config, reject_unsupported, skeleton_config,
)  # fmt: skip
from moekit.hf.qwen2_moe import dense_layers, layer_placement, moe_config, windows
from moekit.models.lm import MoELM

MODEL_TYPES = ("qwen3_moe",)
ARCHITECTURE = "Qwen3MoeForCausalLM"


def config_from_hf(c: HFConfig) -> ModelConfig:
    """moekit's ModelConfig for a Qwen3-MoE config.json (either spelling)."""
    reject_unsupported(c)
    bias = c.flag("attention_bias")
    return model_config(
        c, moe_config(c, d_ff=c.req("moe_intermediate_size")), 32768, dense_d_ff=c.req("intermediate_size"),
        dense_layers=dense_layers(c), qkv_bias=bias, o_bias=bias, qk_norm="head", **windows(c, lambda i: True),
    )  # fmt: skip


def import_weights(model: MoELM, ckpt: CheckpointReader, dtype: torch.dtype) -> Iterator[Weight]:
    """(moekit name, tensor, source) for every parameter, read from transformers' Qwen3-MoE names."""
    yield from import_skeleton(model, ckpt, dtype)  # q_norm / k_norm included
    for i, block in enumerate(model.blocks):
        m, b = f"model.layers.{i}.mlp.", f"blocks.{i}.ffn."
        if not block.is_moe:
            yield from import_dense_mlp(ckpt, dtype, b, m)
            continue
        yield b + "router.weight", ckpt.take(m + "gate.weight", dtype), m + "gate.weight"
        yield from import_experts(ckpt, dtype, block.ffn.config.num_experts, b + "experts.", m + "experts.")


def export_weights(model: MoELM) -> dict[str, Tensor]:
    """Every parameter under the names released Qwen3-MoE checkpoints use."""
    out = export_skeleton(model)
    for i, block in enumerate(model.blocks):
        m = f"model.layers.{i}.mlp."
        if not block.is_moe:
            out.update(export_dense_mlp(block.ffn, m))
            continue
        out[m + "gate.weight"] = block.ffn.router.weight
        out.update(export_experts(block.ffn.experts, m + "experts."))
    return out


def check_exportable(model: MoELM) -> None:
    """Raise a ValueError naming the first feature a Qwen3-MoE checkpoint cannot express."""
    cfg = model.config
    if cfg.moe is None:
        raise ValueError("a Qwen3-MoE checkpoint needs MoE layers (this model has none)")
    check_fields(cfg, "", "Qwen3-MoE", dict(qk_norm="head", o_bias=cfg.qkv_bias, clip_qkv=None, attn_sinks=False,
                                             window_layers=None))  # fmt: skip
    check_fields(cfg.moe, "moe.", "Qwen3-MoE", dict(
        activation="swiglu", router="topk", softmax_order="softmax_topk", expert_bias=False, router_bias=False,
        num_shared_experts=0, selection_bias=False,
    ))  # fmt: skip


def hf_config(model: MoELM) -> dict[str, Any]:
    """config.json for transformers' Qwen3MoeConfig."""
    cfg, moe = model.config, model.config.moe
    return dict(
        skeleton_config(model), **layer_placement(model), model_type="qwen3_moe", architectures=[ARCHITECTURE],
        intermediate_size=cfg.dense_d_ff, moe_intermediate_size=moe.d_ff, num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k, norm_topk_prob=moe.norm_topk_prob, attention_bias=cfg.qkv_bias,
        max_window_layers=cfg.n_layers,
    )  # fmt: skip
