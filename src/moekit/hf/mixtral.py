"""Mixtral (Jiang et al. 2024): config and weight names of transformers' `MixtralForCausalLM`.

The model is moekit's MoELM unchanged: Llama attention (a `sliding_window`, if the file sets one, on every
layer), and per layer a top-2-of-8 SwiGLU MoE whose router takes
the top k logits, then a softmax over those k (`softmax_order="topk_softmax"`). Released checkpoints store each
expert apart (`block_sparse_moe.experts.{j}.w1/w3/w2`: gate, up, down, each [out, in]); transformers 5 fuses them
in memory (`mlp.experts.gate_up_proj` [E, 2F, D], `down_proj` [E, D, F]) and writes the per-expert names back on
save. Both are read; the per-expert names are written. moekit keeps w_in [E, D, 2F] (gate | up), w_out [E, F, D]:
the transposes happen here, at the border.
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
    Weight, check_all_moe, check_fields, export_skeleton, import_skeleton, rope_from_hf, skeleton_config,
)  # fmt: skip
from moekit.models.lm import MoELM

MODEL_TYPES = ("mixtral",)
ARCHITECTURE = "MixtralForCausalLM"


def config_from_hf(c: HFConfig) -> ModelConfig:
    """moekit's ModelConfig for a Mixtral config.json (either spelling)."""
    theta, scaling = rope_from_hf(c)
    d_model, heads = c.req("hidden_size"), c.req("num_attention_heads")
    moe = MoEConfig(
        d_model=d_model, d_ff=c.req("intermediate_size"), num_experts=c.req("num_local_experts", "num_experts"),
        top_k=c.req("num_experts_per_tok"), activation="swiglu", router="topk", softmax_order="topk_softmax",
    )  # fmt: skip
    return ModelConfig(
        vocab_size=c.req("vocab_size"), d_model=d_model, n_layers=c.req("num_hidden_layers"), n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or d_model // heads,
        max_seq_len=c.get("max_position_embeddings", default=4096 * 32), rope_theta=theta, rope_scaling=scaling,
        norm_eps=c.req("rms_norm_eps"), moe=moe, tie_embeddings=c.flag("tie_word_embeddings"),
        sliding_window=c.get("sliding_window") or None,  # every layer (Mistral's window); null in released Mixtrals
    )  # fmt: skip


def import_weights(model: MoELM, ckpt: CheckpointReader, dtype: torch.dtype) -> Iterator[Weight]:
    """(moekit name, tensor, source) for every parameter, read from transformers' Mixtral names."""
    yield from import_skeleton(model, ckpt, dtype)
    yield from import_sparse_moe(model, ckpt, dtype, fused_router="mlp.gate.weight")


def import_sparse_moe(model: MoELM, ckpt: CheckpointReader, dtype: torch.dtype, fused_router: str) -> Iterator[Weight]:
    """Every layer's router and experts from Mixtral's `block_sparse_moe` names (or transformers 5's fused ones,
    whose router is `model.layers.{i}.<fused_router>`); PhiMoE stores its experts the same way."""
    for i, block in enumerate(model.blocks):
        p, b = f"model.layers.{i}.", f"blocks.{i}.ffn."
        E = block.ffn.config.num_experts
        if p + fused_router in ckpt:  # transformers 5's in-memory (fused) names
            yield b + "router.weight", ckpt.take(p + fused_router, dtype), p + fused_router
            for ours, theirs in (("w_in", "gate_up_proj"), ("w_out", "down_proj")):
                name = p + "mlp.experts." + theirs
                yield b + "experts." + ours, ckpt.take(name, dtype).transpose(1, 2).contiguous(), name
            continue
        m = p + "block_sparse_moe."
        yield b + "router.weight", ckpt.take(m + "gate.weight", dtype), m + "gate.weight"
        gate_up = [(f"{m}experts.{j}.w1.weight", f"{m}experts.{j}.w3.weight") for j in range(E)]
        w_in = ckpt.take_stacked(gate_up, dtype, lambda gate, up: torch.cat((gate, up)).T)
        yield b + "experts.w_in", w_in, f"{m}experts.*.w1/w3.weight"
        w_out = ckpt.take_stacked([f"{m}experts.{j}.w2.weight" for j in range(E)], dtype, lambda down: down.T)
        yield b + "experts.w_out", w_out, f"{m}experts.*.w2.weight"


def export_weights(model: MoELM) -> dict[str, Tensor]:
    """Every parameter under the names released Mixtral checkpoints (and transformers' save_pretrained) use."""
    return {**export_skeleton(model), **export_sparse_moe(model)}


def export_sparse_moe(model: MoELM) -> dict[str, Tensor]:
    """Every layer's router and experts under the released `block_sparse_moe` names (Mixtral, PhiMoE)."""
    out = {}
    for i, block in enumerate(model.blocks):
        m = f"model.layers.{i}.block_sparse_moe."
        out[m + "gate.weight"] = block.ffn.router.weight
        F = block.ffn.config.d_ff
        for j in range(block.ffn.config.num_experts):
            gate, up = block.ffn.experts.w_in[j].T.split([F, F])
            out[f"{m}experts.{j}.w1.weight"] = gate
            out[f"{m}experts.{j}.w3.weight"] = up
            out[f"{m}experts.{j}.w2.weight"] = block.ffn.experts.w_out[j].T
    return out


def check_exportable(model: MoELM) -> None:
    """Raise a ValueError naming the first feature a Mixtral checkpoint cannot express."""
    cfg = model.config
    check_all_moe(model, "Mixtral")
    moe = cfg.moe
    wanted = dict(activation="swiglu", router="topk", softmax_order="topk_softmax", expert_bias=False,
                  router_bias=False, num_shared_experts=0, selection_bias=False)  # fmt: skip
    for name, value in wanted.items():
        if getattr(moe, name) != value:
            raise ValueError(f"a Mixtral checkpoint needs moe.{name}={value!r}, this model has {getattr(moe, name)!r}")
    check_fields(cfg, "", "Mixtral", dict(qkv_bias=False, o_bias=False, qk_norm=None, clip_qkv=None, attn_sinks=False,
                                           window_layers=None))  # fmt: skip


def hf_config(model: MoELM) -> dict[str, Any]:
    """config.json for transformers' MixtralConfig."""
    moe = model.config.moe
    return dict(
        skeleton_config(model), model_type="mixtral", architectures=[ARCHITECTURE], intermediate_size=moe.d_ff,
        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k, sliding_window=model.config.sliding_window,
    )


# Convenience for code that builds a transformers Mixtral from a moekit model in memory (tests, bench_train).
def mixtral_config_kwargs(model: MoELM) -> dict[str, Any]:
    """Keyword arguments of a transformers `MixtralConfig` describing a Mixtral-shaped MoELM."""
    config = hf_config(model)
    for key in ("model_type", "architectures", "dtype"):
        config.pop(key)
    return config


def mixtral_state_dict(model: MoELM) -> dict[str, Tensor]:
    """The MoELM's weights under transformers' in-memory Mixtral names and layouts (fused experts; copies)."""
    out = export_skeleton(model)
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}.mlp."
        out[p + "gate.weight"] = block.ffn.router.weight
        out[p + "experts.gate_up_proj"] = block.ffn.experts.w_in.transpose(1, 2)
        out[p + "experts.down_proj"] = block.ffn.experts.w_out.transpose(1, 2)
    return {name: tensor.detach().clone() for name, tensor in out.items()}
