"""DBRX (Databricks 2024, dbrx-base / dbrx-instruct): config and weight names of transformers' `DbrxForCausalLM`.

The config nests attention and FFN options: `d_model`, `n_heads`, `n_layers`, `max_seq_len` at the top,
`attn_config` {kv_n_heads, clip_qkv, rope_theta} and `ffn_config` {ffn_hidden_size, moe_num_experts, moe_top_k,
moe_normalize_expert_weights, moe_jitter_eps, ffn_act_fn}. The model is moekit's MoELM with:
- LayerNorm without a bias (eps 1e-5, torch's default: DBRX has no eps setting) for the block and final norms
  (`norm="layernorm"`);
- one fused `Wqkv` [(H + 2G) X, D], rows q, k, v (moekit's qkv_proj layout as is), the result clamped to
  [-clip_qkv, clip_qkv] when set (transformers 5.24 raises for clip_qkv=null; moekit runs it unclamped);
  `out_proj`; no biases anywhere; the head is never tied to the embedding;
- every layer MoE: softmax over all experts, top-k, the k weights divided by their p-norm with
  p = `moe_normalize_expert_weights` (1 in the release: their sum; null: not renormalised) — moekit
  `norm_topk_prob` + `topk_norm_p`; `moe_jitter_eps` is training-only router-input jitter (`input_jitter_eps`);
- experts stored as three [E * F, D] matrices: `w1` (gate) and `v1` (up), applied as x @ w1[e].T, and `w2`
  applied as h @ w2[e] (not transposed): moekit w_in [E, D, 2F] = (w1[e] | v1[e]).T, w_out [E, F, D] = w2[e].

RoPE theta, decided deliberately: DBRX's own field is `attn_config.rope_theta` (500000 in the release, what the
model was trained with). transformers 5.24 ignores it: its rotary embedding reads the top-level `rope_parameters`,
which a released file lacks, so it runs the release with the default theta 10000 (and it cannot build a model
whose attn_config lacks rope_theta: DbrxAttention reads the attribute). moekit reads `attn_config.rope_theta` when
present, else `rope_parameters.rope_theta` (a file in transformers 5's spelling), else 10000; it writes both, equal,
so transformers runs an exported model with the theta moekit used. A folder transformers 5.24 wrote from the release
(attn_config 500000, rope_parameters 10000) therefore loads with 500000, as DBRX's reference code runs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.arch import HFConfig
from moekit.config import ModelConfig, MoEConfig
from moekit.hf.checkpoint import CheckpointReader, HFCheckpointError
from moekit.hf.common import Weight, check_all_moe, check_fields, dtype_name, reject_unsupported, rope_from_hf
from moekit.models.lm import MoELM

MODEL_TYPES = ("dbrx",)
ARCHITECTURE = "DbrxForCausalLM"
EXTRAS = ("norm", "topk_norm_p")
NORM_EPS = 1e-5  # torch.nn.LayerNorm's default: DBRX's norms are built without an eps


def rope_theta(c: HFConfig) -> float:
    """`attn_config.rope_theta` (DBRX's field), else rope_parameters' / rope_theta (see the module docstring)."""
    attn = c.data.get("attn_config") or {}
    if not isinstance(attn, dict):
        attn = attn.to_dict()
    if attn.get("rope_theta") is not None:
        return float(attn["rope_theta"])
    return rope_from_hf(c)[0]


def config_from_hf(c: HFConfig) -> ModelConfig:
    """moekit's ModelConfig for a DBRX config.json (the released nested spelling, or transformers 5's)."""
    reject_unsupported(c, silu=False)
    attn, ffn = c.sub("attn_config"), c.sub("ffn_config")
    act = (ffn.get("ffn_act_fn") or {}).get("name", "silu")
    if act != "silu":
        raise HFCheckpointError(f"dbrx with ffn_config.ffn_act_fn={act!r} is not supported: moekit's SwiGLU uses SiLU")
    if c.flag("tie_word_embeddings"):
        raise HFCheckpointError("dbrx with tie_word_embeddings=true is not supported (nor by transformers' DbrxConfig)")
    _, scaling = rope_from_hf(c)
    d_model, heads = c.req("d_model", "hidden_size"), c.req("n_heads", "num_attention_heads")
    p = ffn.data.get("moe_normalize_expert_weights", 1.0)  # null: no renormalisation; absent: transformers' 1.0
    try:
        moe = MoEConfig(
            d_model=d_model, d_ff=ffn.req("ffn_hidden_size"), num_experts=ffn.req("moe_num_experts"),
            top_k=ffn.req("moe_top_k"), activation="swiglu", router="topk", softmax_order="softmax_topk",
            norm_topk_prob=p is not None, topk_norm_p=float(p) if p is not None else 1.0,
            input_jitter_eps=float(ffn.get("moe_jitter_eps") or 0.0),
        )  # fmt: skip
        return ModelConfig(
            vocab_size=c.req("vocab_size"), d_model=d_model, n_layers=c.req("n_layers", "num_hidden_layers"),
            n_heads=heads, n_kv_heads=attn.req("kv_n_heads"),
            max_seq_len=c.get("max_seq_len", "max_position_embeddings", default=2048), rope_theta=rope_theta(c),
            rope_scaling=scaling, norm="layernorm", norm_eps=NORM_EPS, clip_qkv=attn.get("clip_qkv"), moe=moe,
        )  # fmt: skip
    except ValueError as err:
        raise HFCheckpointError(f"dbrx config cannot be expressed in moekit: {err}") from None


def import_weights(model: MoELM, ckpt: CheckpointReader, dtype: torch.dtype) -> Iterator[Weight]:
    """(moekit name, tensor, source) for every parameter, read from DBRX's names."""

    def take(moekit: str, name: str) -> Weight:
        return moekit, ckpt.take(name, dtype), name

    yield take("embed.weight", "transformer.wte.weight")
    for i, block in enumerate(model.blocks):
        p, b = f"transformer.blocks.{i}.", f"blocks.{i}."
        yield take(b + "attn_norm.weight", p + "norm_attn_norm.norm_1.weight")
        yield take(b + "attn.qkv_proj.weight", p + "norm_attn_norm.attn.Wqkv.weight")
        yield take(b + "attn.o_proj.weight", p + "norm_attn_norm.attn.out_proj.weight")
        yield take(b + "ffn_norm.weight", p + "norm_attn_norm.norm_2.weight")
        yield take(b + "ffn.router.weight", p + "ffn.router.layer.weight")
        E, F = block.ffn.config.num_experts, block.ffn.config.d_ff
        e = p + "ffn.experts.mlp."
        gate_EFD, up_EFD = (_per_expert(ckpt.take(e + name, dtype), E, F, e + name) for name in ("w1", "v1"))
        yield b + "ffn.experts.w_in", torch.cat((gate_EFD, up_EFD), dim=1).transpose(1, 2).contiguous(), e + "w1 + v1"
        yield b + "ffn.experts.w_out", _per_expert(ckpt.take(e + "w2", dtype), E, F, e + "w2"), e + "w2"
    yield take("norm.weight", "transformer.norm_f.weight")
    yield take("lm_head.weight", "lm_head.weight")


def _per_expert(w: Tensor, E: int, F: int, name: str) -> Tensor:
    """[E * F, D] -> [E, F, D] (a clear error for a tensor of another size)."""
    if w.dim() != 2 or w.shape[0] != E * F:
        raise HFCheckpointError(
            f"{name} has shape {tuple(w.shape)}, expected ({E * F}, d_model) for {E} experts of width {F}"
        )
    return w.view(E, F, w.shape[1])


def export_weights(model: MoELM) -> dict[str, Tensor]:
    """Every parameter under DBRX's names."""
    out = {"transformer.wte.weight": model.embed.weight}
    for i, block in enumerate(model.blocks):
        p, experts = f"transformer.blocks.{i}.", block.ffn.experts
        out[p + "norm_attn_norm.norm_1.weight"] = block.attn_norm.weight
        out[p + "norm_attn_norm.attn.Wqkv.weight"] = block.attn.qkv_proj.weight
        out[p + "norm_attn_norm.attn.out_proj.weight"] = block.attn.o_proj.weight
        out[p + "norm_attn_norm.norm_2.weight"] = block.ffn_norm.weight
        out[p + "ffn.router.layer.weight"] = block.ffn.router.weight
        gate_EFD, up_EFD = experts.w_in.transpose(1, 2).chunk(2, dim=1)
        for name, w_EFD in (("w1", gate_EFD), ("v1", up_EFD), ("w2", experts.w_out)):
            out[p + "ffn.experts.mlp." + name] = w_EFD.reshape(-1, w_EFD.shape[-1])
    out["transformer.norm_f.weight"] = model.norm.weight
    out["lm_head.weight"] = model.lm_head.weight
    return out


def check_exportable(model: MoELM) -> None:
    """Raise a ValueError naming the first feature a DBRX checkpoint cannot express."""
    cfg = model.config
    check_all_moe(model, "DBRX", heads_fill_d_model=True)
    check_fields(cfg, "", "DBRX", dict(
        norm="layernorm", norm_eps=NORM_EPS, tie_embeddings=False, qkv_bias=False, o_bias=False, qk_norm=None,
        attn_sinks=False, sliding_window=None,
    ))  # fmt: skip
    check_fields(cfg.moe, "moe.", "DBRX", dict(
        activation="swiglu", router="topk", softmax_order="softmax_topk", expert_bias=False, router_bias=False,
        num_shared_experts=0, selection_bias=False,
    ))  # fmt: skip


def hf_config(model: MoELM) -> dict[str, Any]:
    """config.json for transformers' DbrxConfig: the theta both where DBRX and where transformers 5.24 read it."""
    cfg, moe = model.config, model.config.moe
    rope = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    return dict(
        model_type="dbrx", architectures=[ARCHITECTURE], vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        n_heads=cfg.n_heads, n_layers=cfg.n_layers, max_seq_len=cfg.max_seq_len, tie_word_embeddings=False,
        attn_config=dict(kv_n_heads=cfg.kv_heads, clip_qkv=cfg.clip_qkv, rope_theta=cfg.rope_theta),
        ffn_config=dict(
            ffn_act_fn={"name": "silu"}, ffn_hidden_size=moe.d_ff, moe_num_experts=moe.num_experts,
            moe_top_k=moe.top_k, moe_normalize_expert_weights=moe.topk_norm_p if moe.norm_topk_prob else None,
            moe_jitter_eps=moe.input_jitter_eps or None,
        ),
        rope_parameters=rope, dtype=dtype_name(model.embed.weight.dtype),
    )  # fmt: skip
