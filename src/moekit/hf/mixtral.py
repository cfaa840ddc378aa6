"""Mixtral: moekit's MoELM <-> transformers' MixtralForCausalLM (config and weight names).

Layouts: ours w_in [E, D, 2F] (gate | up) and w_out [E, F, D]; theirs gate_up_proj [E, 2F, D] and down_proj
[E, D, F] (transformers 5.x), so the expert tensors are transposed at the border, never inside the model.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from moekit.models.lm import MoELM


def mixtral_config_kwargs(model: MoELM) -> dict[str, Any]:
    """Keyword arguments of a transformers `MixtralConfig` describing a Mixtral-shaped MoELM."""
    cfg, moe = model.config, model.config.moe
    if moe is None:
        raise ValueError("a Mixtral config needs an MoE model (config.moe is None)")
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=moe.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k, tie_word_embeddings=cfg.tie_embeddings,
    )


def mixtral_state_dict(model: MoELM) -> dict[str, Tensor]:
    """The MoELM's weights under transformers' Mixtral names and layouts (detached copies)."""
    cfg = model.config
    H, G, X = cfg.n_heads, cfg.kv_heads, cfg.head_size
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv_proj.weight.split([H * X, G * X, G * X])
        state.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.o_proj.weight,
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "post_attention_layernorm.weight": block.ffn_norm.weight,
            p + "mlp.gate.weight": block.ffn.router.weight,
            p + "mlp.experts.gate_up_proj": block.ffn.experts.w_in.transpose(1, 2),
            p + "mlp.experts.down_proj": block.ffn.experts.w_out.transpose(1, 2),
        })
    return {name: tensor.detach().clone() for name, tensor in state.items()}
