"""Granite MoE (IBM Granite-3.0 1B-A400M / 3B-A800M; PowerMoE): config and weight names of transformers'
`GraniteMoeForCausalLM` and `GraniteMoeSharedForCausalLM`, shared by `hf/granitemoe.py` and `hf/granitemoeshared.py`.

Mixtral underneath (Llama attention, a top-k MoE on every layer whose router takes the top k logits and then a softmax
over those k: `softmax_order="topk_softmax"`), with the muP-style constants of Granite (moekit ModelConfig fields):
- `embedding_multiplier`: the token embeddings are multiplied by it (12 in Granite-3.0);
- `residual_multiplier`: each attention and MoE output is multiplied by it before the residual add (0.22);
- `attention_multiplier`: the softmax scale of q.k in place of 1/sqrt(head_dim) (1/64 for head_dim 64; transformers'
  default when a file omits it is 1.0, not 1/sqrt(head_dim));
- `logits_scaling`: the logits are divided by it (6).
`attention_bias` puts biases on q, k, v and o together. Experts are stored fused: `block_sparse_moe.input_linear.weight`
[E, 2F, D] (gate rows, then up rows) and `output_linear.weight` [E, D, F]; the router is `block_sparse_moe.router.layer`
[E, D] (transformers 5 renames these in memory to `experts.gate_up_proj` / `experts.down_proj` / `router.weight`
and writes the released names on save; both are read, the released ones written). moekit keeps w_in [E, D, 2F],
w_out [E, F, D]: a transpose each.

GraniteMoeShared adds, when `shared_intermediate_size` > 0, an always-on SwiGLU MLP beside the experts
(`shared_mlp.input_linear` [2S, D], gate rows then up rows; `shared_mlp.output_linear` [D, S]) whose output is added
to the routed one before the residual multiplier, with no gate (moekit: one shared expert of width S).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.arch import HFConfig
from moekit.config import ModelConfig, MoEConfig
from moekit.hf.checkpoint import CheckpointReader, HFCheckpointError
from moekit.hf.common import (
    Weight, check_all_moe, check_fields, export_skeleton, import_skeleton, model_config, reject_unsupported,
    skeleton_config,
)  # fmt: skip
from moekit.models.lm import MoELM

ARCHITECTURES = {"granitemoe": "GraniteMoeForCausalLM", "granitemoeshared": "GraniteMoeSharedForCausalLM"}
EXTRAS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")


def config_from_hf(c: HFConfig) -> ModelConfig:
    """moekit's ModelConfig for a GraniteMoe / GraniteMoeShared config.json (either spelling)."""
    reject_unsupported(c)
    d_model = c.req("hidden_size")
    shared = c.get("shared_intermediate_size", default=0) if c.model_type == "granitemoeshared" else 0
    if not isinstance(shared, int) or shared < 0:
        raise HFCheckpointError(f"{c.model_type} shared_intermediate_size must be an integer >= 0, got {shared!r}")
    moe = MoEConfig(
        d_model=d_model, d_ff=c.req("intermediate_size"), num_experts=c.req("num_local_experts", "num_experts"),
        top_k=c.req("num_experts_per_tok"), activation="swiglu", router="topk", softmax_order="topk_softmax",
        num_shared_experts=1 if shared else 0, shared_d_ff=shared or None,
    )  # fmt: skip
    bias = c.flag("attention_bias")
    return model_config(
        c, moe, 2048, qkv_bias=bias, o_bias=bias,
        embedding_multiplier=float(c.get("embedding_multiplier", default=1.0)),
        residual_multiplier=float(c.get("residual_multiplier", default=1.0)),
        attention_multiplier=_attention_multiplier(c),
        logits_scaling=float(c.get("logits_scaling", default=1.0)),
    )  # fmt: skip


def _attention_multiplier(c: HFConfig) -> float | None:
    """A missing key is transformers' default 1.0 (not 1/sqrt(head_dim)); an explicit null, SDPA's 1/sqrt(head_dim)."""
    if "attention_multiplier" not in c.data:
        return 1.0
    value = c.data["attention_multiplier"]
    return None if value is None else float(value)


def import_weights(model: MoELM, ckpt: CheckpointReader, dtype: torch.dtype) -> Iterator[Weight]:
    """(moekit name, tensor, source) for every parameter, read from transformers' Granite MoE names."""
    yield from import_skeleton(model, ckpt, dtype)
    for i, block in enumerate(model.blocks):
        m, b = f"model.layers.{i}.block_sparse_moe.", f"blocks.{i}.ffn."
        fused = m + "router.weight" in ckpt  # transformers 5's in-memory names
        names = ("router.weight", "experts.gate_up_proj", "experts.down_proj") if fused else (
            "router.layer.weight", "input_linear.weight", "output_linear.weight")  # fmt: skip
        yield b + "router.weight", ckpt.take(m + names[0], dtype), m + names[0]
        for moekit_name, name in (("experts.w_in", names[1]), ("experts.w_out", names[2])):
            yield b + moekit_name, ckpt.take(m + name, dtype).transpose(1, 2).contiguous(), m + name
        if block.ffn.shared_experts is not None:
            s = f"model.layers.{i}.shared_mlp."
            for moekit_name, name in (("w_in", "input_linear.weight"), ("w_out", "output_linear.weight")):
                yield f"{b}shared_experts.{moekit_name}.weight", ckpt.take(s + name, dtype), s + name


def export_weights(model: MoELM) -> dict[str, Tensor]:
    """Every parameter under the names released Granite MoE checkpoints (and transformers' save_pretrained) use."""
    out = export_skeleton(model)
    for i, block in enumerate(model.blocks):
        m, ffn = f"model.layers.{i}.block_sparse_moe.", block.ffn
        out[m + "router.layer.weight"] = ffn.router.weight
        out[m + "input_linear.weight"] = ffn.experts.w_in.transpose(1, 2)
        out[m + "output_linear.weight"] = ffn.experts.w_out.transpose(1, 2)
        if ffn.shared_experts is not None:
            out[f"model.layers.{i}.shared_mlp.input_linear.weight"] = ffn.shared_experts.w_in.weight
            out[f"model.layers.{i}.shared_mlp.output_linear.weight"] = ffn.shared_experts.w_out.weight
    return out


def check_exportable(model: MoELM, model_type: str) -> None:
    """Raise a ValueError naming the first feature a Granite MoE checkpoint of `model_type` cannot express."""
    cfg, name = model.config, ARCHITECTURES[model_type].removesuffix("ForCausalLM")
    check_all_moe(model, name)
    check_fields(cfg, "", name, dict(o_bias=cfg.qkv_bias, qk_norm=None, clip_qkv=None, attn_sinks=False,
                                     sliding_window=None))  # fmt: skip
    check_fields(cfg.moe, "moe.", name, dict(
        activation="swiglu", router="topk", softmax_order="topk_softmax", expert_bias=False, router_bias=False,
        selection_bias=False, shared_expert_gate=False,
    ))  # fmt: skip
    if model_type == "granitemoe" and cfg.moe.num_shared_experts:
        raise ValueError("a GraniteMoe checkpoint has no shared experts: save it as model_type='granitemoeshared'")


def hf_config(model: MoELM, model_type: str) -> dict[str, Any]:
    """config.json for transformers' GraniteMoeConfig / GraniteMoeSharedConfig."""
    cfg, moe = model.config, model.config.moe
    config = dict(
        skeleton_config(model), model_type=model_type, architectures=[ARCHITECTURES[model_type]],
        intermediate_size=moe.d_ff, num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        attention_bias=cfg.qkv_bias, embedding_multiplier=cfg.embedding_multiplier,
        residual_multiplier=cfg.residual_multiplier, logits_scaling=cfg.logits_scaling,
        attention_multiplier=cfg.attention_multiplier or cfg.head_size**-0.5,
    )  # fmt: skip
    if model_type == "granitemoeshared":  # n shared experts run as one MLP n times as wide
        config["shared_intermediate_size"] = moe.num_shared_experts * (moe.shared_d_ff or moe.d_ff)
    return config
