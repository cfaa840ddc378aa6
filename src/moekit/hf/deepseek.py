"""DeepSeek-V2 and DeepSeek-V3: config and weight names of transformers' `DeepseekV2ForCausalLM` /
`DeepseekV3ForCausalLM`, shared by the two family modules `hf/deepseek_v2.py` and `hf/deepseek_v3.py`.

The model is moekit's MoELM with multi-head latent attention (`ModelConfig.mla`, layers/mla.py), the first
`first_k_dense_replace` layers dense (SwiGLU of `intermediate_size`), the rest DeepSeekMoE layers: routed experts of
`moe_intermediate_size`, `n_shared_experts` shared experts run as one FFN, and the `deepseek` router:
- V2 (arXiv 2405.04434): softmax affinities; `topk_method` "greedy" (plain top-k) or "group_limited_greedy" (a group
  scored by its best expert, the best `topk_group` of `n_group` groups kept); weights = the top-k softmax
  probabilities, not renormalised, times `routed_scaling_factor`.
- V3 (arXiv 2412.19437): sigmoid affinities; `e_score_correction_bias` (moekit's float32 `selection_bias`) added for
  choosing only; groups scored by the sum of their top-2 biased scores; weights = the unbiased sigmoids, renormalised
  when `norm_topk_prob`, times `routed_scaling_factor`.

RoPE layout: DeepSeek rotates interleaved pairs of the rotary dims (V2 as complex numbers, V3 when `rope_interleave`,
its released value). moekit rotates halves, so the rotary rows of q_proj / q_b_proj and of kv_a_proj_with_mqa are
de-interleaved here on import (and interleaved back on export): the same scores, no per-step permutation.

Multi-token prediction: released V3 checkpoints hold `num_nextn_predict_layers` extra layers (`model.layers.61.*`)
used only to train (and for speculative decoding), never for next-token logits; transformers drops them on load.
They are skipped here on purpose — marked consumed without being read — and nothing else may be left over.

The FP8 release of DeepSeek-V3 (block-quantized weights with `weight_scale_inv`) is dequantized by the reader as
it is read. Options moekit cannot express (attention or MLP biases, other activations, MoE every n-th layer, V2
with norm_topk_prob — which transformers ignores but DeepSeek's own code applies) raise a HFCheckpointError naming them rather than loading into a model that computes something else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.arch import HFConfig
from moekit.config import MLAConfig, ModelConfig, MoEConfig
from moekit.hf.checkpoint import CheckpointReader, HFCheckpointError, read_config
from moekit.hf.common import Weight, dtype_name, reject_unsupported, rope_from_hf, rope_to_hf
from moekit.models.lm import MoELM

ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def _nullable(c: HFConfig, key: str) -> Any:
    """A key whose explicit null means something (q_lora_rank: null = full-rank q_proj), unlike a missing key."""
    return c.data[key] if key in c.data else c.defaults.get(key)


def config_from_hf(c: HFConfig) -> ModelConfig:
    """moekit's ModelConfig for a DeepSeek-V2/V3 config.json (either RoPE spelling)."""
    v3 = c.model_type == "deepseek_v3"
    _refuse_unsupported(c, v3)
    theta, scaling = rope_from_hf(c)
    d_model, top_k = c.req("hidden_size"), c.req("num_experts_per_tok")
    if v3:
        n_group, topk_group = c.get("n_group", default=8), c.get("topk_group", default=4)
    elif c.get("topk_method", default="greedy") == "group_limited_greedy":
        n_group, topk_group = c.req("n_group"), c.req("topk_group")
    else:
        n_group = topk_group = 1  # greedy: no group limit
    width = c.req("moe_intermediate_size")
    moe = MoEConfig(
        d_model=d_model, d_ff=width, num_experts=c.req("n_routed_experts", "num_local_experts", "num_experts"),
        top_k=top_k, activation="swiglu", router="deepseek", score_func="sigmoid" if v3 else "softmax",
        n_group=n_group, topk_group=topk_group, norm_topk_prob=v3 and bool(c.get("norm_topk_prob", default=True)),
        routed_scaling_factor=float(c.get("routed_scaling_factor", default=2.5 if v3 else 1.0)), selection_bias=v3,
        num_shared_experts=c.req("n_shared_experts"), shared_d_ff=width,
    )  # fmt: skip
    mla = MLAConfig(
        q_lora_rank=_nullable(c, "q_lora_rank"), kv_lora_rank=c.req("kv_lora_rank"),
        qk_nope_head_dim=c.req("qk_nope_head_dim"), qk_rope_head_dim=c.req("qk_rope_head_dim"),
        v_head_dim=c.req("v_head_dim"),
    )  # fmt: skip
    heads = c.req("num_attention_heads")
    return ModelConfig(
        vocab_size=c.req("vocab_size"), d_model=d_model, n_layers=c.req("num_hidden_layers"), n_heads=heads,
        max_seq_len=c.get("max_position_embeddings", default=4096 if v3 else 2048), rope_theta=theta,
        rope_scaling=scaling, norm_eps=c.req("rms_norm_eps"), mla=mla, dense_d_ff=c.req("intermediate_size"),
        moe=moe, first_k_dense=c.get("first_k_dense_replace", default=3 if v3 else 0),
        tie_embeddings=c.flag("tie_word_embeddings"),
    )  # fmt: skip


def _refuse_unsupported(c: HFConfig, v3: bool) -> None:
    def refuse(what: str) -> None:
        raise HFCheckpointError(f"{c.model_type}: {what}")

    reject_unsupported(c, silu=False)  # quantization: the reader dequantizes DeepSeek-V3's FP8 release on load
    if c.flag("attention_bias"):
        refuse("attention_bias=true (biases on q_a_proj/kv_a_proj_with_mqa/o_proj) is not supported by moekit's MLA")
    if not v3 and c.flag("mlp_bias"):
        refuse("mlp_bias=true (biases in the dense and shared-expert MLPs) is not supported")
    act = c.get("hidden_act", default="silu")
    if act != "silu":
        refuse(f"hidden_act={act!r} is not supported (moekit's DeepSeek layers are SwiGLU: silu)")
    freq = c.get("moe_layer_freq", default=1)
    if freq != 1:
        refuse(f"moe_layer_freq={freq} is not supported: transformers ignores it (MoE on every layer from "
               "first_k_dense_replace) while DeepSeek's code puts MoE on every freq-th layer; released configs use 1")
    if not c.get("n_shared_experts"):
        refuse("n_shared_experts must be >= 1 (transformers' DeepSeek MoE always has shared experts)")
    score_func = c.get("scoring_func")
    if score_func is not None and score_func != ("sigmoid" if v3 else "softmax"):
        refuse(f"scoring_func={score_func!r} is not what transformers computes for this family "
               f"({'sigmoid' if v3 else 'softmax'})")
    method = c.get("topk_method")
    if v3 and method not in (None, "noaux_tc"):
        refuse(f"topk_method={method!r}: transformers' DeepSeek-V3 routes only as 'noaux_tc'")
    if not v3:
        if c.get("topk_method", default="greedy") not in ("greedy", "group_limited_greedy"):
            refuse(f"topk_method={method!r} is not supported: expected 'greedy' or 'group_limited_greedy'")
        if c.flag("norm_topk_prob") and c.req("num_experts_per_tok") > 1:
            refuse("norm_topk_prob=true is ambiguous for DeepSeek-V2: DeepSeek's code renormalises the top-k "
                   "weights, transformers' DeepseekV2 ignores the flag; released V2 configs set false")


# --- RoPE layout at the border ---


def _deinterleave(rope_dims: int) -> Tensor:
    """The permutation taking interleaved pairs (x0, x1), (x2, x3), ... to halves (x0, x2, ... | x1, x3, ...)."""
    return torch.cat((torch.arange(0, rope_dims, 2), torch.arange(1, rope_dims, 2)))


def _permute_q_rows(w: Tensor, heads: int, nope: int, perm: Tensor) -> Tensor:
    """Permute the rotary rows of each head in a query projection [H * (N + R), in]."""
    w_HKI = w.reshape(heads, -1, w.shape[-1])
    return torch.cat((w_HKI[:, :nope], w_HKI[:, nope:][:, perm]), dim=1).reshape(w.shape)


def _permute_kv_a_rows(w: Tensor, latent: int, perm: Tensor) -> Tensor:
    """Permute the rotary rows (after the latent's) of kv_a_proj_with_mqa [C + R, D]."""
    return torch.cat((w[:latent], w[latent:][perm]))


def _interleaved(hf: dict[str, Any], model_type: str) -> bool:
    return model_type == "deepseek_v2" or bool(hf.get("rope_interleave", True))


# --- import ---


def import_weights(model: MoELM, ckpt: CheckpointReader, dtype: torch.dtype) -> Iterator[Weight]:
    """(moekit name, tensor, source) for every parameter, read from transformers' DeepSeek-V2/V3 names."""
    hf = read_config(ckpt.path)
    cfg, mla = model.config, model.config.mla
    H, N, C = cfg.n_heads, mla.qk_nope_head_dim, mla.kv_lora_rank
    perm = _deinterleave(mla.qk_rope_head_dim) if _interleaved(hf, hf.get("model_type")) else None

    def take(moekit: str, name: str, transform=None) -> Weight:
        tensor = ckpt.take(name, dtype)
        return moekit, tensor if transform is None or perm is None else transform(tensor), name

    yield take("embed.weight", "model.embed_tokens.weight")
    for i, block in enumerate(model.blocks):
        p, a, b = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"blocks.{i}."
        yield take(b + "attn_norm.weight", p + "input_layernorm.weight")
        yield take(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        q_rows = lambda w: _permute_q_rows(w, H, N, perm)
        if mla.q_lora_rank is None:
            yield take(b + "attn.q_proj.weight", a + "q_proj.weight", q_rows)
        else:
            yield take(b + "attn.q_a_proj.weight", a + "q_a_proj.weight")
            yield take(b + "attn.q_a_norm.weight", a + "q_a_layernorm.weight")
            yield take(b + "attn.q_b_proj.weight", a + "q_b_proj.weight", q_rows)
        kv_rows = lambda w: _permute_kv_a_rows(w, C, perm)
        yield take(b + "attn.kv_a_proj.weight", a + "kv_a_proj_with_mqa.weight", kv_rows)
        yield take(b + "attn.kv_a_norm.weight", a + "kv_a_layernorm.weight")
        yield take(b + "attn.kv_b_proj.weight", a + "kv_b_proj.weight")
        yield take(b + "attn.o_proj.weight", a + "o_proj.weight")
        m = p + "mlp."
        if not block.is_moe:
            yield from _import_ffn(ckpt, dtype, b + "ffn.", m)
            continue
        yield take(b + "ffn.router.weight", m + "gate.weight")
        if block.ffn.router.selection_bias is not None:
            name = m + "gate.e_score_correction_bias"
            yield b + "ffn.router.selection_bias", ckpt.take(name, torch.float32), name
        yield from _import_experts(ckpt, dtype, b + "ffn.experts.", m + "experts.", block.ffn.config.num_experts)
        yield from _import_ffn(ckpt, dtype, b + "ffn.shared_experts.", m + "shared_experts.")
    yield take("norm.weight", "model.norm.weight")
    if not cfg.tie_embeddings:
        yield take("lm_head.weight", "lm_head.weight")
    elif "lm_head.weight" in ckpt:  # a tied checkpoint that stores the head anyway: it must equal the embedding
        if not torch.equal(ckpt.take("lm_head.weight", dtype), ckpt.take("model.embed_tokens.weight", dtype)):
            raise HFCheckpointError("tie_word_embeddings is true but lm_head.weight differs from the embedding")
    # Multi-token-prediction layers (see the module docstring): dropped on purpose, unread.
    first, extra = cfg.n_layers, int(hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0)
    mtp = tuple(f"model.layers.{k}." for k in range(first, first + extra))
    if mtp:
        ckpt.skip(name for name in ckpt.names() if name.startswith(mtp))


def _import_ffn(ckpt: CheckpointReader, dtype: torch.dtype, moekit: str, hf: str) -> Iterator[Weight]:
    gate_up = [hf + "gate_proj.weight", hf + "up_proj.weight"]
    yield moekit + "w_in.weight", torch.cat([ckpt.take(n, dtype) for n in gate_up]), " + ".join(gate_up)
    yield moekit + "w_out.weight", ckpt.take(hf + "down_proj.weight", dtype), hf + "down_proj.weight"


def _import_experts(ckpt: CheckpointReader, dtype: torch.dtype, moekit: str, hf: str, E: int) -> Iterator[Weight]:
    if hf + "gate_up_proj" in ckpt:  # transformers 5's in-memory (fused) names: [E, 2F, D], [E, D, F]
        for ours, theirs in (("w_in", "gate_up_proj"), ("w_out", "down_proj")):
            yield moekit + ours, ckpt.take(hf + theirs, dtype).transpose(1, 2).contiguous(), hf + theirs
        return
    gate_up = [(f"{hf}{j}.gate_proj.weight", f"{hf}{j}.up_proj.weight") for j in range(E)]
    w_in = ckpt.take_stacked(gate_up, dtype, lambda gate, up: torch.cat((gate, up)).T)
    yield moekit + "w_in", w_in, f"{hf}*.gate_proj/up_proj.weight"
    w_out = ckpt.take_stacked([f"{hf}{j}.down_proj.weight" for j in range(E)], dtype, lambda down: down.T)
    yield moekit + "w_out", w_out, f"{hf}*.down_proj.weight"


# --- export ---


def export_weights(model: MoELM, model_type: str) -> dict[str, Tensor]:
    """Every parameter under the names released DeepSeek checkpoints use (per-expert tensors; interleaved RoPE)."""
    cfg, mla = model.config, model.config.mla
    H, N, C = cfg.n_heads, mla.qk_nope_head_dim, mla.kv_lora_rank
    inverse = torch.argsort(_deinterleave(mla.qk_rope_head_dim))  # always written interleaved (see hf_config)
    out = {"model.embed_tokens.weight": model.embed.weight}
    for i, block in enumerate(model.blocks):
        p, a, attn = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", block.attn
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        if mla.q_lora_rank is None:
            out[a + "q_proj.weight"] = _permute_q_rows(attn.q_proj.weight.detach(), H, N, inverse)
        else:
            out[a + "q_a_proj.weight"] = attn.q_a_proj.weight
            out[a + "q_a_layernorm.weight"] = attn.q_a_norm.weight
            out[a + "q_b_proj.weight"] = _permute_q_rows(attn.q_b_proj.weight.detach(), H, N, inverse)
        out[a + "kv_a_proj_with_mqa.weight"] = _permute_kv_a_rows(attn.kv_a_proj.weight.detach(), C, inverse)
        out[a + "kv_a_layernorm.weight"] = attn.kv_a_norm.weight
        out[a + "kv_b_proj.weight"] = attn.kv_b_proj.weight
        out[a + "o_proj.weight"] = attn.o_proj.weight
        m = p + "mlp."
        if not block.is_moe:
            out.update(_export_ffn(block.ffn, m))
            continue
        ffn = block.ffn
        out[m + "gate.weight"] = ffn.router.weight
        if ffn.router.selection_bias is not None:
            out[m + "gate.e_score_correction_bias"] = ffn.router.selection_bias.float()
        F = ffn.config.d_ff
        for j in range(ffn.config.num_experts):
            gate, up = ffn.experts.w_in[j].T.split([F, F])
            out[f"{m}experts.{j}.gate_proj.weight"] = gate
            out[f"{m}experts.{j}.up_proj.weight"] = up
            out[f"{m}experts.{j}.down_proj.weight"] = ffn.experts.w_out[j].T
        out.update(_export_ffn(ffn.shared_experts, m + "shared_experts."))
    out["model.norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def _export_ffn(ffn, prefix: str) -> dict[str, Tensor]:
    gate, up = ffn.w_in.weight.chunk(2)
    return {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up,
            prefix + "down_proj.weight": ffn.w_out.weight}


def check_exportable(model: MoELM, model_type: str) -> None:
    """Raise a ValueError naming the first feature a DeepSeek-V2/V3 checkpoint cannot express."""
    v3 = model_type == "deepseek_v3"
    cfg, name = model.config, f"a {model_type} checkpoint"
    if cfg.mla is None:
        raise ValueError(f"{name} needs multi-head latent attention (ModelConfig.mla), this model has GQA")
    if cfg.moe is None:
        raise ValueError(f"{name} needs MoE layers (ModelConfig.moe), this model has none")
    if cfg.moe_every != 1:
        raise ValueError(f"{name} has MoE on every layer after the dense ones, this model moe_every={cfg.moe_every}")
    moe = cfg.moe
    wanted = dict(activation="swiglu", router="deepseek", score_func="sigmoid" if v3 else "softmax", expert_bias=False,
                  router_bias=False, selection_bias=v3, shared_expert_gate=False, capacity_factor=None)  # fmt: skip
    if not v3 and moe.top_k > 1:
        wanted["norm_topk_prob"] = False
    for field, value in wanted.items():
        if getattr(moe, field) != value:
            raise ValueError(f"{name} needs moe.{field}={value!r}, this model has {getattr(moe, field)!r}")
    if moe.num_shared_experts < 1 or (moe.shared_d_ff or moe.d_ff) != moe.d_ff:
        raise ValueError(f"{name} needs >= 1 shared experts as wide as the routed ones (moe_intermediate_size)")


def hf_config(model: MoELM, model_type: str) -> dict[str, Any]:
    """config.json for transformers' DeepseekV2Config / DeepseekV3Config (transformers 5 spelling)."""
    cfg, mla, moe = model.config, model.config.mla, model.config.moe
    out = dict(
        model_type=model_type, architectures=[ARCHITECTURES[model_type]], vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len, rope_parameters=rope_to_hf(model),
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, dtype=dtype_name(model.embed.weight.dtype),
        hidden_act="silu", attention_bias=False, intermediate_size=cfg.dense_d_ff,
        first_k_dense_replace=cfg.first_k_dense,
        moe_layer_freq=1, q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
        qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
        moe_intermediate_size=moe.d_ff, n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        n_shared_experts=moe.num_shared_experts, routed_scaling_factor=moe.routed_scaling_factor,
        n_group=moe.n_group, topk_group=moe.topk_group, norm_topk_prob=moe.norm_topk_prob,
    )  # fmt: skip
    if model_type == "deepseek_v3":
        out.update(rope_interleave=True, num_nextn_predict_layers=0, topk_method="noaux_tc", scoring_func="sigmoid")
    else:
        grouped = moe.n_group > 1 and moe.topk_group < moe.n_group
        out.update(mlp_bias=False, topk_method="group_limited_greedy" if grouped else "greedy", scoring_func="softmax")
    return out
