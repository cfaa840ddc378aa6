"""Pieces every family shares: reading configs in both spellings, and the Llama-shaped skeleton of weights.

Most MoE families are Llama underneath (embedding, pre-norm blocks with q/k/v/o attention, a final norm, an
output head); only the feed-forward and a few attention details differ. `import_skeleton` / `export_skeleton`
map that common part; a family file adds its MoE block (and its attention extras).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from moekit.analysis.arch import HFConfig
from moekit.hf.checkpoint import CheckpointReader
from moekit.models.lm import MoELM

# (moekit parameter name, tensor, the checkpoint name(s) it came from: for error messages)
Weight = tuple[str, Tensor, str]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def rope_from_hf(c: HFConfig) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from either spelling: `rope_parameters` (transformers 5) or
    `rope_theta` + `rope_scaling` (older files)."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = c.get("rope_theta", default=10000.0)
        scaling = dict(c.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    return float(theta), scaling


def rope_to_hf(model: MoELM) -> dict[str, Any]:
    """`rope_parameters` for a config.json (transformers 5 spelling)."""
    cfg = model.config
    return {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}


def checkpoint_dtype(hf: dict[str, Any]) -> torch.dtype:
    """The dtype a config.json states (`dtype` or `torch_dtype`), float32 if it states none."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def import_skeleton(model: MoELM, ckpt: CheckpointReader, dtype: torch.dtype, prefix: str = "model.") -> Iterator[Weight]:
    """Embedding, per-layer norms and q/k/v/o attention (+ biases when present), final norm and output head."""
    cfg = model.config
    yield "embed.weight", ckpt.take(prefix + "embed_tokens.weight", dtype), prefix + "embed_tokens.weight"
    for i, block in enumerate(model.blocks):
        p = f"{prefix}layers.{i}."
        yield from _norm(ckpt, dtype, f"blocks.{i}.attn_norm.weight", p + "input_layernorm.weight")
        yield from _norm(ckpt, dtype, f"blocks.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight")
        a = p + "self_attn."
        names = [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]
        yield f"blocks.{i}.attn.qkv_proj.weight", _cat(ckpt, names, dtype), " + ".join(names)
        if block.attn.qkv_proj.bias is not None:
            names = [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]
            yield f"blocks.{i}.attn.qkv_proj.bias", _cat(ckpt, names, dtype), " + ".join(names)
        yield f"blocks.{i}.attn.o_proj.weight", ckpt.take(a + "o_proj.weight", dtype), a + "o_proj.weight"
        if block.attn.o_proj.bias is not None:
            yield f"blocks.{i}.attn.o_proj.bias", ckpt.take(a + "o_proj.bias", dtype), a + "o_proj.bias"
    yield from _norm(ckpt, dtype, "norm.weight", prefix + "norm.weight")
    if not cfg.tie_embeddings:
        yield "lm_head.weight", ckpt.take("lm_head.weight", dtype), "lm_head.weight"
    elif "lm_head.weight" in ckpt:  # some tied checkpoints store the head anyway: it must equal the embedding
        head = ckpt.take("lm_head.weight", dtype)
        embed = ckpt.take(prefix + "embed_tokens.weight", dtype)
        if head.shape != embed.shape or not torch.equal(head, embed):
            from moekit.hf.checkpoint import HFCheckpointError

            raise HFCheckpointError("tie_word_embeddings is true but lm_head.weight differs from the embedding")


def export_skeleton(model: MoELM, prefix: str = "model.") -> dict[str, Tensor]:
    """The inverse of `import_skeleton`: transformers' names for the Llama-shaped part of the model."""
    cfg = model.config
    H, G, X = cfg.n_heads, cfg.kv_heads, cfg.head_size
    out = {prefix + "embed_tokens.weight": model.embed.weight}
    for i, block in enumerate(model.blocks):
        p, a = f"{prefix}layers.{i}.", f"{prefix}layers.{i}.self_attn."
        out[p + "input_layernorm.weight"] = block.attn_norm.weight
        out[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for proj, part in zip("qkv", block.attn.qkv_proj.weight.split([H * X, G * X, G * X])):
            out[a + f"{proj}_proj.weight"] = part
        if block.attn.qkv_proj.bias is not None:
            for proj, part in zip("qkv", block.attn.qkv_proj.bias.split([H * X, G * X, G * X])):
                out[a + f"{proj}_proj.bias"] = part
        out[a + "o_proj.weight"] = block.attn.o_proj.weight
        if block.attn.o_proj.bias is not None:
            out[a + "o_proj.bias"] = block.attn.o_proj.bias
    out[prefix + "norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def skeleton_config(model: MoELM) -> dict[str, Any]:
    """config.json keys shared by the Llama-shaped families (transformers 5 spelling)."""
    cfg = model.config
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size,
        max_position_embeddings=cfg.max_seq_len, rope_parameters=rope_to_hf(model), rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, dtype=dtype_name(model.embed.weight.dtype), hidden_act="silu",
    )  # fmt: skip


def _norm(ckpt: CheckpointReader, dtype: torch.dtype, name: str, source: str) -> Iterator[Weight]:
    yield name, ckpt.take(source, dtype), source


def _cat(ckpt: CheckpointReader, names: list[str], dtype: torch.dtype) -> Tensor:
    return torch.cat([ckpt.take(name, dtype) for name in names])


def expert_names(ckpt: CheckpointReader, pattern: str, num_experts: int) -> list[str]:
    """`pattern.format(j=...)` for every expert j."""
    return [pattern.format(j=j) for j in range(num_experts)]
