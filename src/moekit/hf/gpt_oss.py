"""GPT-OSS (OpenAI 2025, gpt-oss-20b/120b): config and weight names of transformers' `GptOssForCausalLM`.

Attention: q/k/v/o biases (`attention_bias`), a learned sink logit per head (`self_attn.sinks`, moekit
`attn_sinks`), and `layer_types` alternating sliding-window (`sliding_window`, 128 in the release) and full layers;
RoPE with YaRN scaling. MoE on every layer: a router with a bias takes the top-k logits, then a softmax over those k
(`softmax_order="topk_softmax"`, `router_bias`); experts with biases and the clamped SwiGLU (`swiglu_oai`,
`swiglu_alpha`, `swiglu_limit`). transformers stores the experts fused: `gate_up_proj` [E, D, 2F] with gate and up
*interleaved* along the last dim (gate = [..., ::2], up = [..., 1::2]), `gate_up_proj_bias` [E, 2F] likewise,
`down_proj` [E, F, D], `down_proj_bias` [E, D]; moekit keeps gate | up halves, so the (de)interleave happens here.
The released checkpoints store the experts in MXFP4 (`quantization_config`): the reader dequantizes them on load.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.arch import HFConfig
from moekit.config import MoEConfig, ModelConfig
from moekit.hf.checkpoint import CheckpointReader
from moekit.hf.common import (
    Weight, check_all_moe, check_fields, check_layer_types, export_skeleton, import_skeleton, model_config,
    reject_unsupported, rope_from_hf, skeleton_config,
)  # fmt: skip
from moekit.models.lm import MoELM

MODEL_TYPES = ("gpt_oss",)
ARCHITECTURE = "GptOssForCausalLM"

# transformers' GptOssConfig when a file states no RoPE at all (the release's values)
DEFAULT_THETA = 150000.0
DEFAULT_ROPE_SCALING = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                            original_max_position_embeddings=4096)  # fmt: skip


def config_from_hf(c: HFConfig) -> ModelConfig:
    """moekit's ModelConfig for a GPT-OSS config.json (either spelling)."""
    reject_unsupported(c, silu=False)  # the experts' activation is fixed; hidden_act is not read
    theta, scaling = rope_from_hf(c)
    if c.get("rope_parameters") is None and c.get("rope_scaling") is None:
        scaling = dict(DEFAULT_ROPE_SCALING)
    if c.get("rope_parameters") is None and c.get("rope_theta") is None:
        theta = DEFAULT_THETA
    n, window = c.req("num_hidden_layers"), c.get("sliding_window")
    types = c.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    check_layer_types(c, types, n)
    windowed = [i for i, t in enumerate(types) if t == "sliding_attention"] if window else []
    moe = MoEConfig(
        d_model=c.req("hidden_size"), d_ff=c.req("intermediate_size"),
        num_experts=c.req("num_local_experts", "num_experts"), top_k=c.req("num_experts_per_tok", "experts_per_token"),
        activation="swiglu_oai", expert_bias=True, router="topk", softmax_order="topk_softmax", router_bias=True,
        swiglu_alpha=float(c.get("swiglu_alpha", default=1.702)),
        swiglu_limit=float(c.get("swiglu_limit", default=7.0)),
    )  # fmt: skip
    bias = c.flag("attention_bias")
    return model_config(
        c, moe, 131072, rope_theta=theta, rope_scaling=scaling, qkv_bias=bias, o_bias=bias, attn_sinks=True,
        sliding_window=window if windowed else None, window_layers=windowed if 0 < len(windowed) < n else None,
    )  # fmt: skip


def _deinterleave(t: Tensor) -> Tensor:
    """[..., 2F] gate/up interleaved -> [..., 2F] gate half, then up half."""
    return torch.cat((t[..., ::2], t[..., 1::2]), dim=-1)


def _interleave(t: Tensor) -> Tensor:
    gate, up = t.chunk(2, dim=-1)
    return torch.stack((gate, up), dim=-1).flatten(-2)


def import_weights(model: MoELM, ckpt: CheckpointReader, dtype: torch.dtype) -> Iterator[Weight]:
    """(moekit name, tensor, source) for every parameter, read from transformers' GPT-OSS names."""
    yield from import_skeleton(model, ckpt, dtype)  # attention biases and sinks included
    for i in range(len(model.blocks)):
        m, b = f"model.layers.{i}.mlp.", f"blocks.{i}.ffn."
        yield b + "router.weight", ckpt.take(m + "router.weight", dtype), m + "router.weight"
        yield b + "router.bias", ckpt.take(m + "router.bias", dtype), m + "router.bias"
        e = m + "experts."
        yield b + "experts.w_in", _deinterleave(ckpt.take(e + "gate_up_proj", dtype)), e + "gate_up_proj"
        yield b + "experts.b_in", _deinterleave(ckpt.take(e + "gate_up_proj_bias", dtype)), e + "gate_up_proj_bias"
        yield b + "experts.w_out", ckpt.take(e + "down_proj", dtype), e + "down_proj"
        yield b + "experts.b_out", ckpt.take(e + "down_proj_bias", dtype), e + "down_proj_bias"


def export_weights(model: MoELM) -> dict[str, Tensor]:
    """Every parameter under transformers' GPT-OSS names (unquantized)."""
    out = export_skeleton(model)
    for i, block in enumerate(model.blocks):
        m, experts = f"model.layers.{i}.mlp.", block.ffn.experts
        out[m + "router.weight"] = block.ffn.router.weight
        out[m + "router.bias"] = block.ffn.router.bias
        out[m + "experts.gate_up_proj"] = _interleave(experts.w_in)
        out[m + "experts.gate_up_proj_bias"] = _interleave(experts.b_in)
        out[m + "experts.down_proj"] = experts.w_out
        out[m + "experts.down_proj_bias"] = experts.b_out
    return out


def check_exportable(model: MoELM) -> None:
    """Raise a ValueError naming the first feature a GPT-OSS checkpoint cannot express."""
    cfg = model.config
    check_all_moe(model, "GPT-OSS")
    check_fields(cfg, "", "GPT-OSS", dict(attn_sinks=True, o_bias=cfg.qkv_bias, qk_norm=None, clip_qkv=None))
    check_fields(cfg.moe, "moe.", "GPT-OSS", dict(
        activation="swiglu_oai", expert_bias=True, router="topk", softmax_order="topk_softmax", router_bias=True,
        num_shared_experts=0, selection_bias=False,
    ))  # fmt: skip


def hf_config(model: MoELM) -> dict[str, Any]:
    """config.json for transformers' GptOssConfig."""
    cfg, moe = model.config, model.config.moe
    windowed = [cfg.window_of(i) is not None for i in range(cfg.n_layers)]
    return dict(
        skeleton_config(model), model_type="gpt_oss", architectures=[ARCHITECTURE], intermediate_size=moe.d_ff,
        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k, attention_bias=cfg.qkv_bias,
        swiglu_alpha=moe.swiglu_alpha, swiglu_limit=moe.swiglu_limit,
        layer_types=["sliding_attention" if w else "full_attention" for w in windowed],
        sliding_window=cfg.sliding_window or 128,  # read by no layer when every layer is full attention
    )  # fmt: skip
