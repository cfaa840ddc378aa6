"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): config and weight names of transformers' `Qwen2MoeForCausalLM`.

Llama attention with q/k/v biases (no o bias). Layer i is MoE unless it is in `mlp_only_layers`, and only when
(i + 1) % decoder_sparse_step == 0; other layers are a dense SwiGLU MLP of width `intermediate_size`
(moekit: `ModelConfig.dense_layers`). The MoE block: softmax over all experts, top-k, renormalised only when
`norm_topk_prob`; plus one shared SwiGLU expert whose output is scaled by sigmoid(x . w_gate), w_gate [1, D]
(moekit: one shared expert with `shared_expert_gate`). Sliding windows (`use_sliding_window`, off in released
checkpoints) follow `layer_types`, or transformers' rule: even-indexed layers below `max_window_layers`.
Experts are read per expert (`mlp.experts.{j}.gate_proj/up_proj/down_proj`, as released) or fused
(transformers 5 in memory), and written per expert.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.arch import HFConfig
from moekit.config import MoEConfig, ModelConfig
from moekit.hf.checkpoint import CheckpointReader, HFCheckpointError
from moekit.hf.common import (
    Weight, check_fields, check_layer_types, export_dense_mlp, export_experts, export_skeleton, import_dense_mlp,
    import_experts, import_skeleton, model_config, reject_unsupported, skeleton_config,
)  # fmt: skip
from moekit.models.lm import MoELM

MODEL_TYPES = ("qwen2_moe",)
ARCHITECTURE = "Qwen2MoeForCausalLM"


def dense_layers(c: HFConfig) -> list[int] | None:
    """Qwen-MoE's dense layers: those in mlp_only_layers, and those off the decoder_sparse_step pattern."""
    n, step = c.req("num_hidden_layers"), c.req("decoder_sparse_step")
    only = c.get("mlp_only_layers", default=[]) or []
    bad = [i for i in only if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise HFCheckpointError(f"{c.model_type} mlp_only_layers {only} names layers outside 0..{n - 1}: {bad}")
    dense = [i for i in range(n) if i in only or (i + 1) % step != 0]
    if len(dense) == n:
        raise HFCheckpointError(f"{c.model_type} config has no MoE layer (mlp_only_layers={only}, "
                                f"decoder_sparse_step={step}): load it as a dense model instead")  # fmt: skip
    return dense or None


def windows(c: HFConfig, rule) -> dict[str, Any]:
    """sliding_window / window_layers for ModelConfig: `layer_types` if given, else `rule(i)` per layer."""
    window = c.get("sliding_window") or None
    if not c.flag("use_sliding_window") or window is None:
        return {}
    n, types = c.req("num_hidden_layers"), c.get("layer_types")
    if types is not None:
        check_layer_types(c, types, n)
    layers = [i for i in range(n) if (types[i] == "sliding_attention" if types is not None else rule(i))]
    if not layers:
        return {}
    return dict(sliding_window=window, window_layers=None if len(layers) == n else layers)


def moe_config(c: HFConfig, **fields: Any) -> MoEConfig:
    """The routed part shared by Qwen2-MoE, Qwen3-MoE and OLMoE: softmax over all, top-k, optional renorm."""
    return MoEConfig(
        d_model=c.req("hidden_size"), num_experts=c.req("num_experts", "num_local_experts"),
        top_k=c.req("num_experts_per_tok"),
        activation="swiglu", router="topk", softmax_order="softmax_topk",
        norm_topk_prob=bool(c.get("norm_topk_prob", default=False)), **fields,
    )  # fmt: skip


def config_from_hf(c: HFConfig) -> ModelConfig:
    """moekit's ModelConfig for a Qwen2-MoE config.json (either spelling)."""
    reject_unsupported(c)
    shared = c.req("shared_expert_intermediate_size")
    if shared <= 0:
        raise HFCheckpointError("qwen2_moe with shared_expert_intermediate_size=0 is not supported (a zero-width "
                                "shared expert with a gate); released checkpoints all have one")  # fmt: skip
    moe = moe_config(
        c, d_ff=c.req("moe_intermediate_size"), num_shared_experts=1, shared_d_ff=shared, shared_expert_gate=True
    )
    max_window = c.req("max_window_layers")
    return model_config(
        c, moe, 32768, dense_d_ff=c.req("intermediate_size"), dense_layers=dense_layers(c), qkv_bias=c.flag("qkv_bias"),
        **windows(c, lambda i: (i + 1) % 2 == 1 and i < max_window),
    )  # fmt: skip


def import_weights(model: MoELM, ckpt: CheckpointReader, dtype: torch.dtype) -> Iterator[Weight]:
    """(moekit name, tensor, source) for every parameter, read from transformers' Qwen2-MoE names."""
    yield from import_skeleton(model, ckpt, dtype)
    for i, block in enumerate(model.blocks):
        m, b = f"model.layers.{i}.mlp.", f"blocks.{i}.ffn."
        if not block.is_moe:
            yield from import_dense_mlp(ckpt, dtype, b, m)
            continue
        yield b + "router.weight", ckpt.take(m + "gate.weight", dtype), m + "gate.weight"
        yield from import_experts(ckpt, dtype, block.ffn.config.num_experts, b + "experts.", m + "experts.")
        yield from import_dense_mlp(ckpt, dtype, b + "shared_experts.", m + "shared_expert.")
        name = m + "shared_expert_gate.weight"
        yield b + "shared_gate.weight", ckpt.take(name, dtype), name


def export_weights(model: MoELM) -> dict[str, Tensor]:
    """Every parameter under the names released Qwen2-MoE checkpoints use."""
    out = export_skeleton(model)
    for i, block in enumerate(model.blocks):
        m = f"model.layers.{i}.mlp."
        if not block.is_moe:
            out.update(export_dense_mlp(block.ffn, m))
            continue
        out[m + "gate.weight"] = block.ffn.router.weight
        out.update(export_experts(block.ffn.experts, m + "experts."))
        out.update(export_dense_mlp(block.ffn.shared_experts, m + "shared_expert."))
        out[m + "shared_expert_gate.weight"] = block.ffn.shared_gate.weight
    return out


def check_exportable(model: MoELM) -> None:
    """Raise a ValueError naming the first feature a Qwen2-MoE checkpoint cannot express."""
    cfg = model.config
    if cfg.moe is None:
        raise ValueError("a Qwen2-MoE checkpoint needs MoE layers (this model has none)")
    check_fields(cfg, "", "Qwen2-MoE", dict(o_bias=False, qk_norm=None, clip_qkv=None, attn_sinks=False))
    check_fields(cfg.moe, "moe.", "Qwen2-MoE", dict(
        activation="swiglu", router="topk", softmax_order="softmax_topk", expert_bias=False, router_bias=False,
        num_shared_experts=1, shared_expert_gate=True, selection_bias=False,
    ))  # fmt: skip


def layer_placement(model: MoELM) -> dict[str, Any]:
    """config.json keys for which layers are dense and which windowed (Qwen2/3-MoE spelling)."""
    cfg = model.config
    return dict(
        decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)],
        use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
    )  # fmt: skip


def hf_config(model: MoELM) -> dict[str, Any]:
    """config.json for transformers' Qwen2MoeConfig."""
    cfg, moe = model.config, model.config.moe
    windowed = [cfg.window_of(i) is not None for i in range(cfg.n_layers)]
    return dict(
        skeleton_config(model), **layer_placement(model), model_type="qwen2_moe", architectures=[ARCHITECTURE],
        intermediate_size=cfg.dense_d_ff, moe_intermediate_size=moe.d_ff,
        shared_expert_intermediate_size=moe.shared_d_ff or moe.d_ff,
        num_experts=moe.num_experts, num_experts_per_tok=moe.top_k, norm_topk_prob=moe.norm_topk_prob,
        qkv_bias=cfg.qkv_bias, max_window_layers=cfg.n_layers,
        layer_types=["sliding_attention" if w else "full_attention" for w in windowed],
    )  # fmt: skip
