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
from moekit.config import MoEConfig, ModelConfig
from moekit.hf.checkpoint import CheckpointReader, HFCheckpointError
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
    """Embedding, per-layer norms and q/k/v/o attention (+ biases when present), final norm and output head (+ the
    norms' and the head's biases where the model has them: PhiMoE)."""
    cfg = model.config
    yield "embed.weight", ckpt.take(prefix + "embed_tokens.weight", dtype), prefix + "embed_tokens.weight"
    for i, block in enumerate(model.blocks):
        p = f"{prefix}layers.{i}."
        yield from import_norm(block.attn_norm, ckpt, dtype, f"blocks.{i}.attn_norm.", p + "input_layernorm.")
        yield from import_norm(block.ffn_norm, ckpt, dtype, f"blocks.{i}.ffn_norm.", p + "post_attention_layernorm.")
        a = p + "self_attn."
        names = [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]
        yield f"blocks.{i}.attn.qkv_proj.weight", _cat(ckpt, names, dtype), " + ".join(names)
        if block.attn.qkv_proj.bias is not None:
            names = [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]
            yield f"blocks.{i}.attn.qkv_proj.bias", _cat(ckpt, names, dtype), " + ".join(names)
        yield f"blocks.{i}.attn.o_proj.weight", ckpt.take(a + "o_proj.weight", dtype), a + "o_proj.weight"
        if block.attn.o_proj.bias is not None:
            yield f"blocks.{i}.attn.o_proj.bias", ckpt.take(a + "o_proj.bias", dtype), a + "o_proj.bias"
        for extra in _ATTENTION_EXTRAS:  # q/k norms (Qwen3, OLMoE), sinks (GPT-OSS): the same names everywhere
            if _attention_extra(block.attn, extra) is not None:
                yield f"blocks.{i}.attn.{extra}", ckpt.take(a + extra, dtype), a + extra
    yield from import_norm(model.norm, ckpt, dtype, "norm.", prefix + "norm.")
    if model.lm_head.bias is not None:
        yield "lm_head.bias", ckpt.take("lm_head.bias", dtype), "lm_head.bias"
    if not cfg.tie_embeddings:
        yield "lm_head.weight", ckpt.take("lm_head.weight", dtype), "lm_head.weight"
    elif "lm_head.weight" in ckpt:  # some tied checkpoints store the head anyway: it must equal the embedding
        head = ckpt.take("lm_head.weight", dtype)
        embed = ckpt.take(prefix + "embed_tokens.weight", dtype)
        if head.shape != embed.shape or not torch.equal(head, embed):
            raise HFCheckpointError("tie_word_embeddings is true but lm_head.weight differs from the embedding")


def export_skeleton(model: MoELM, prefix: str = "model.") -> dict[str, Tensor]:
    """The inverse of `import_skeleton`: transformers' names for the Llama-shaped part of the model."""
    cfg = model.config
    H, G, X = cfg.n_heads, cfg.kv_heads, cfg.head_size
    out = {prefix + "embed_tokens.weight": model.embed.weight}
    for i, block in enumerate(model.blocks):
        p, a = f"{prefix}layers.{i}.", f"{prefix}layers.{i}.self_attn."
        out.update(export_norm(block.attn_norm, p + "input_layernorm."))
        out.update(export_norm(block.ffn_norm, p + "post_attention_layernorm."))
        for proj, part in zip("qkv", block.attn.qkv_proj.weight.split([H * X, G * X, G * X])):
            out[a + f"{proj}_proj.weight"] = part
        if block.attn.qkv_proj.bias is not None:
            for proj, part in zip("qkv", block.attn.qkv_proj.bias.split([H * X, G * X, G * X])):
                out[a + f"{proj}_proj.bias"] = part
        out[a + "o_proj.weight"] = block.attn.o_proj.weight
        if block.attn.o_proj.bias is not None:
            out[a + "o_proj.bias"] = block.attn.o_proj.bias
        for extra in _ATTENTION_EXTRAS:
            tensor = _attention_extra(block.attn, extra)
            if tensor is not None:
                out[a + extra] = tensor
    out.update(export_norm(model.norm, prefix + "norm."))
    if model.lm_head.bias is not None:
        out["lm_head.bias"] = model.lm_head.bias
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    return out


def import_norm(norm, ckpt: CheckpointReader, dtype: torch.dtype, name: str, source: str) -> Iterator[Weight]:
    """A norm's `weight` (and `bias`, when the model's norm has one) from `{source}weight` / `{source}bias`."""
    for attr in ("weight", "bias"):
        if getattr(norm, attr, None) is not None:
            yield name + attr, ckpt.take(source + attr, dtype), source + attr


def export_norm(norm, prefix: str) -> dict[str, Tensor]:
    return {prefix + attr: getattr(norm, attr) for attr in ("weight", "bias") if getattr(norm, attr, None) is not None}


# ModelConfig / MoEConfig fields that only some formats express, at the values that change nothing. A family module
# names in EXTRAS the ones its format expresses; save_pretrained refuses a model that sets any other (a Mixtral
# checkpoint cannot carry Granite's multipliers: exporting one would silently compute something else).
PLAIN_FIELDS = dict(
    norm="rmsnorm", norm_bias=False, lm_head_bias=False, embedding_multiplier=1.0, residual_multiplier=1.0,
    attention_multiplier=None, logits_scaling=1.0,
)  # fmt: skip
PLAIN_MOE_FIELDS = dict(topk_norm_p=1.0)


def check_extras(model: MoELM, family: str, extras: tuple[str, ...] = ()) -> None:
    """ValueError naming the first field of PLAIN_FIELDS / PLAIN_MOE_FIELDS (other than `extras`) that the model
    sets to a value `family`'s format cannot hold."""
    cfg = model.config
    check_fields(cfg, "", family, {k: v for k, v in PLAIN_FIELDS.items() if k not in extras})
    if cfg.moe is not None and cfg.moe.norm_topk_prob:  # topk_norm_p acts only through the renormalisation
        check_fields(cfg.moe, "moe.", family, {k: v for k, v in PLAIN_MOE_FIELDS.items() if k not in extras})


def skeleton_config(model: MoELM) -> dict[str, Any]:
    """config.json keys shared by the Llama-shaped families (transformers 5 spelling)."""
    cfg = model.config
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size,
        max_position_embeddings=cfg.max_seq_len, rope_parameters=rope_to_hf(model), rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, dtype=dtype_name(model.embed.weight.dtype), hidden_act="silu",
    )  # fmt: skip


_ATTENTION_EXTRAS = ("q_norm.weight", "k_norm.weight", "sinks")


def _attention_extra(attn, name: str) -> Tensor | None:
    module, _, attr = name.rpartition(".")
    owner = getattr(attn, module, None) if module else attn  # attention classes without the extra have no attribute
    return None if owner is None else getattr(owner, attr, None)


def reject_unsupported(c: HFConfig, *, silu: bool = True) -> None:
    """Raise HFCheckpointError for options every family here would otherwise silently ignore: a quantization
    method the reader does not dequantize (it handles fp8 and mxfp4), and (where the family's MLPs read it) an
    activation other than SiLU."""
    from moekit.hf.checkpoint import QUANT_METHODS

    quant = c.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        if method not in QUANT_METHODS:
            raise HFCheckpointError(
                f"{c.model_type} checkpoint is quantized (quantization_config.quant_method={method!r}): moekit "
                f"dequantizes {', '.join(QUANT_METHODS)} on load, nothing else; dequantize it first (e.g. "
                "transformers' from_pretrained with a dequantize option, then save_pretrained)"
            )
    act = c.get("hidden_act", default="silu")
    if silu and act not in ("silu", "swish"):
        raise HFCheckpointError(f"{c.model_type} with hidden_act={act!r} is not supported: moekit's SwiGLU uses SiLU")


def model_config(c: HFConfig, moe: MoEConfig, max_positions: int, **fields: Any) -> ModelConfig:
    """ModelConfig from the Llama-shaped keys of a config.json (either spelling), plus family-specific `fields`;
    max_positions is the family's default max_position_embeddings (transformers' config class)."""
    theta, scaling = rope_from_hf(c)
    d_model, heads = c.req("hidden_size"), c.req("num_attention_heads")
    base = dict(
        vocab_size=c.req("vocab_size"), d_model=d_model, n_layers=c.req("num_hidden_layers"), n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or d_model // heads,
        max_seq_len=c.get("max_position_embeddings", default=max_positions), rope_theta=theta, rope_scaling=scaling,
        norm_eps=c.req("rms_norm_eps"), moe=moe, tie_embeddings=c.flag("tie_word_embeddings"),
    )  # fmt: skip
    try:
        return ModelConfig(**{**base, **fields})
    except ValueError as err:
        raise HFCheckpointError(f"{c.model_type} config cannot be expressed in moekit: {err}") from None


def check_layer_types(c: HFConfig, types: Any, n: int) -> None:
    """`layer_types` must name each of the n layers "sliding_attention" or "full_attention"."""
    if not isinstance(types, list) or len(types) != n:
        got = len(types) if isinstance(types, list) else repr(types)
        raise HFCheckpointError(f"{c.model_type} config has {got} layer_types for {n} layers")
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise HFCheckpointError(f"{c.model_type} layer_types {unknown} are not supported (sliding/full attention only)")


def check_all_moe(model: MoELM, family: str, article: str = "a", heads_fill_d_model: bool = False) -> None:
    """Raise a ValueError unless every layer of `model` is MoE (families without dense layers) and, with
    `heads_fill_d_model`, unless head_dim * n_heads == d_model (formats that store no head_dim)."""
    cfg = model.config
    if cfg.moe is None or not all(block.is_moe for block in model.blocks):
        raise ValueError(f"{article} {family} checkpoint needs every layer to be MoE (this model has dense layers)")
    if heads_fill_d_model and cfg.head_size * cfg.n_heads != cfg.d_model:
        raise ValueError(f"{article} {family} checkpoint needs head_dim * n_heads == d_model, this model has "
                         f"{cfg.head_size} * {cfg.n_heads} != {cfg.d_model}")  # fmt: skip


def check_fields(obj: Any, label: str, family: str, wanted: dict[str, Any]) -> None:
    """ValueError naming the first field of `obj` (a config) that differs from what `family`'s format can hold."""
    for name, value in wanted.items():
        if getattr(obj, name) != value:
            got = getattr(obj, name)
            raise ValueError(f"a {family} checkpoint needs {label}{name}={value!r}, this model has {got!r}")


def import_dense_mlp(ckpt: CheckpointReader, dtype: torch.dtype, name: str, source: str) -> Iterator[Weight]:
    """A dense SwiGLU MLP stored as `{source}gate_proj/up_proj/down_proj.weight` -> moekit FFN `{name}w_in/w_out`."""
    gate_up = [source + "gate_proj.weight", source + "up_proj.weight"]
    yield name + "w_in.weight", _cat(ckpt, gate_up, dtype), " + ".join(gate_up)
    yield name + "w_out.weight", ckpt.take(source + "down_proj.weight", dtype), source + "down_proj.weight"


def export_dense_mlp(ffn, prefix: str) -> dict[str, Tensor]:
    """The inverse of `import_dense_mlp`."""
    gate, up = ffn.w_in.weight.chunk(2)
    return {
        prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up, prefix + "down_proj.weight": ffn.w_out.weight
    }


def import_experts(
    ckpt: CheckpointReader, dtype: torch.dtype, num_experts: int, name: str, source: str
) -> Iterator[Weight]:
    """Routed SwiGLU experts in the Qwen2-MoE naming (shared by Qwen2/3-MoE and OLMoE): per expert
    `{source}{j}.gate_proj/up_proj/down_proj.weight` as released, or transformers 5's fused in-memory
    `{source}gate_up_proj` [E, 2F, D] and `{source}down_proj` [E, D, F]. moekit: w_in [E, D, 2F], w_out [E, F, D]."""
    if source + "gate_up_proj" in ckpt:
        for moekit_name, fused in (("w_in", "gate_up_proj"), ("w_out", "down_proj")):
            yield name + moekit_name, ckpt.take(source + fused, dtype).transpose(1, 2).contiguous(), source + fused
        return
    pairs = [(f"{source}{j}.gate_proj.weight", f"{source}{j}.up_proj.weight") for j in range(num_experts)]
    w_in = ckpt.take_stacked(pairs, dtype, lambda gate, up: torch.cat((gate, up)).T)
    yield name + "w_in", w_in, f"{source}*.gate_proj/up_proj.weight"
    downs = [f"{source}{j}.down_proj.weight" for j in range(num_experts)]
    yield name + "w_out", ckpt.take_stacked(downs, dtype, lambda d: d.T), f"{source}*.down_proj.weight"


def export_experts(experts, prefix: str) -> dict[str, Tensor]:
    """The inverse of `import_experts`, under the released per-expert names."""
    out, F = {}, experts.d_ff
    for j in range(experts.num_experts):
        gate, up = experts.w_in[j].T.split([F, F])
        out[f"{prefix}{j}.gate_proj.weight"] = gate
        out[f"{prefix}{j}.up_proj.weight"] = up
        out[f"{prefix}{j}.down_proj.weight"] = experts.w_out[j].T
    return out


def _cat(ckpt: CheckpointReader, names: list[str], dtype: torch.dtype) -> Tensor:
    return torch.cat([ckpt.take(name, dtype) for name in names])


def expert_names(ckpt: CheckpointReader, pattern: str, num_experts: int) -> list[str]:
    """`pattern.format(j=...)` for every expert j."""
    return [pattern.format(j=j) for j in range(num_experts)]
