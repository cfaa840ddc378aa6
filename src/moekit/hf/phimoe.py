"""PhiMoE (Microsoft Phi-3.5-MoE, 16 x 3.8B): config and weight names of transformers' `PhimoeForCausalLM`.

Mixtral's layout with:
- LayerNorm with a bias (eps `rms_norm_eps`) for the block and final norms (`norm="layernorm"`, `norm_bias`);
- biases on q, k, v and o (`attention_bias`) and on the output head (`lm_head_bias`);
- the `sparsemixer` router (layers/routing.py; GRIN, Liu et al. 2024): always 2 experts, chosen in two rounds, each
  weighted by its softmax probability among the experts within a relative logit gap of 2 * `router_jitter_noise` of
  the round's best (moekit `sparsemixer_eps`). transformers routes every token to 2 experts whatever
  `num_experts_per_tok` says, so any other value is refused. `input_jitter_noise` (training only) becomes the
  router-input jitter `input_jitter_eps`; transformers also jitters, in place, the input the experts see;
- `sliding_window` (131072 in the release) on every layer;
- RoPE: default (theta 1e6 when a file states none, transformers' PhimoeConfig default) or "longrope" with
  `short_factor` / `long_factor` and PhiMoE's `short_mscale` / `long_mscale` as the attention factor.

LongRoPE past `original_max_position_embeddings` (4096 in the release), a deliberate difference from transformers:
a sequence that long runs, in moekit, entirely with the long factors and long_mscale (ModelConfig's second RoPE table;
Microsoft's Phi-3.5-MoE reference code and transformers' Phi-3 do the same switch). transformers 5.24's
PhimoeRotaryEmbedding recomputes the frequencies without the sequence length on every call, so it keeps the short
factors and switches only the mscale. Up to that length the two agree exactly (tested); beyond it they differ. When
decoding with the KV cache across that length, keys cached before the switch keep their short-factor rotation (as in
the reference code and transformers' Phi-3).

Released checkpoints store experts apart (`block_sparse_moe.experts.{j}.w1/w3/w2`, router `block_sparse_moe.gate`);
transformers 5 fuses them in memory (`mlp.experts.gate_up_proj` [E, 2F, D], `down_proj` [E, D, F], `mlp.router`)
and writes the released names on save. Both are read, the released ones written.
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
    rope_from_hf, skeleton_config,
)  # fmt: skip
from moekit.hf.mixtral import export_sparse_moe, import_sparse_moe
from moekit.models.lm import MoELM

MODEL_TYPES = ("phimoe",)
ARCHITECTURE = "PhimoeForCausalLM"
EXTRAS = ("norm", "norm_bias", "lm_head_bias")
DEFAULT_THETA = 1e6  # transformers' PhimoeConfig.default_theta


def config_from_hf(c: HFConfig) -> ModelConfig:
    """moekit's ModelConfig for a PhiMoE config.json (either spelling)."""
    reject_unsupported(c)
    top_k = c.req("num_experts_per_tok")
    if top_k != 2:
        raise HFCheckpointError(
            f"phimoe with num_experts_per_tok={top_k} is not supported: PhiMoE's sparsemixer routes every token to "
            "exactly 2 experts (transformers ignores the setting)"
        )
    theta, scaling = rope_from_hf(c)
    if c.get("rope_parameters") is None and c.get("rope_theta") is None:
        theta = DEFAULT_THETA
    if scaling is not None:
        scaling = _longrope(c, scaling)
    moe = MoEConfig(
        d_model=c.req("hidden_size"), d_ff=c.req("intermediate_size"),
        num_experts=c.req("num_local_experts", "num_experts"), top_k=2, activation="swiglu", router="sparsemixer",
        sparsemixer_eps=float(c.get("router_jitter_noise", default=0.01)),
        input_jitter_eps=float(c.get("input_jitter_noise", default=0.0)),
    )  # fmt: skip
    bias = c.flag("attention_bias")
    return model_config(
        c, moe, 131072, rope_theta=theta, rope_scaling=scaling, norm="layernorm", norm_bias=True, qkv_bias=bias,
        o_bias=bias, lm_head_bias=c.flag("lm_head_bias"), sliding_window=c.get("sliding_window") or None,
    )  # fmt: skip


def _longrope(c: HFConfig, scaling: dict[str, Any]) -> dict[str, Any]:
    """PhiMoE's RoPE scaling: longrope with both mscales (transformers applies them to any non-default type)."""
    kind = scaling["rope_type"]
    if kind != "longrope":
        raise HFCheckpointError(f"phimoe with rope type {kind!r} is not supported: PhiMoE scales RoPE by longrope "
                                "(transformers multiplies any other type by short_mscale/long_mscale too)")  # fmt: skip
    missing = [k for k in ("short_mscale", "long_mscale") if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise HFCheckpointError(f"phimoe longrope scaling lacks {missing} (numbers, as transformers requires)")
    original = scaling.get("original_max_position_embeddings") or c.get("original_max_position_embeddings")
    if original is None:
        raise HFCheckpointError("phimoe longrope scaling lacks original_max_position_embeddings")
    return {**scaling, "original_max_position_embeddings": original}


def import_weights(model: MoELM, ckpt: CheckpointReader, dtype: torch.dtype) -> Iterator[Weight]:
    """(moekit name, tensor, source) for every parameter, read from transformers' PhiMoE names."""
    yield from import_skeleton(model, ckpt, dtype)  # norm, attention and head biases included
    yield from import_sparse_moe(model, ckpt, dtype, fused_router="mlp.router.weight")


def export_weights(model: MoELM) -> dict[str, Tensor]:
    """Every parameter under the names released PhiMoE checkpoints (and transformers' save_pretrained) use."""
    return {**export_skeleton(model), **export_sparse_moe(model)}


def check_exportable(model: MoELM) -> None:
    """Raise a ValueError naming the first feature a PhiMoE checkpoint cannot express."""
    cfg = model.config
    check_all_moe(model, "PhiMoE")
    check_fields(cfg, "", "PhiMoE", dict(norm="layernorm", norm_bias=True, o_bias=cfg.qkv_bias, qk_norm=None,
                                         clip_qkv=None, attn_sinks=False, window_layers=None))  # fmt: skip
    check_fields(cfg.moe, "moe.", "PhiMoE", dict(
        activation="swiglu", router="sparsemixer", expert_bias=False, router_bias=False, num_shared_experts=0,
    ))  # fmt: skip
    scaling = cfg.rope_scaling
    if scaling is not None and (scaling.get("rope_type") != "longrope" or scaling.get("short_mscale") is None
                                or scaling.get("long_mscale") is None):  # fmt: skip
        raise ValueError(f"a PhiMoE checkpoint needs no RoPE scaling or longrope with short/long_mscale, this model "
                         f"has {scaling}")  # fmt: skip


def hf_config(model: MoELM) -> dict[str, Any]:
    """config.json for transformers' PhimoeConfig."""
    cfg, moe = model.config, model.config.moe
    return dict(
        skeleton_config(model), model_type="phimoe", architectures=[ARCHITECTURE], intermediate_size=moe.d_ff,
        num_local_experts=moe.num_experts, num_experts_per_tok=2, attention_bias=cfg.qkv_bias,
        lm_head_bias=cfg.lm_head_bias, router_jitter_noise=moe.sparsemixer_eps, input_jitter_noise=moe.input_jitter_eps,
        sliding_window=cfg.sliding_window,
    )  # fmt: skip
