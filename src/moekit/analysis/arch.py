"""A normalised description of a transformer's architecture (`ArchSpec`), read from Hugging Face `config.json` files.

Every MoE family moekit knows has one small reader here that maps its `config.json` (a dict) to an `ArchSpec`; the
counting in `analysis/params.py` works only on `ArchSpec`, so a new family needs a reader and nothing else.

Readers accept both spellings of a config: the older one (`rope_theta` + `rope_scaling`, `torch_dtype`,
`num_experts`) and the newer one transformers 5 writes (`rope_parameters`, `dtype`, `num_local_experts`, ...).
Where a key is missing, a reader uses the default of the transformers config class, so a config written by
`PreTrainedConfig.to_dict()` and the sparse release file give the same spec. Layer placement follows the models:
`decoder_sparse_step`/`mlp_only_layers` (Qwen-MoE), `first_k_dense_replace`/`moe_layer_freq` (DeepSeek; transformers
ignores `moe_layer_freq`, DeepSeek's own code honours it, as we do — every released config has 1), every other layer
(Switch, GLaM).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# ---------------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class FFN:
    """One feed-forward network: a dense FFN, one routed expert, or all shared experts of a layer as one FFN."""

    d_ff: int  # hidden width
    gated: bool = True  # 3 matrices (SwiGLU/GeGLU: gate, up, down) or 2 (ReLU/GELU: up, down)
    bias: bool = False  # biases on its projections (GPT-OSS experts, DeepSeek-V2 mlp_bias)


@dataclass(frozen=True)
class MoE:
    """The MoE part of a layer: router, routed experts and (optionally) always-on shared experts."""

    num_experts: int  # routed experts E
    top_k: int  # routed experts per token K
    expert: FFN  # one routed expert
    router_bias: bool = False  # GPT-OSS
    shared: FFN | None = None  # all shared experts as one FFN (DeepSeek builds n_shared experts as one wide MLP)
    num_shared: int = 0  # how many experts `shared` stands for (for display)
    shared_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x . w), a [1, D] projection
    selection_bias: bool = False  # DeepSeek-V3 e_score_correction_bias: a [E] buffer, not a parameter


@dataclass(frozen=True)
class Attention:
    """Self- or cross-attention. `gqa` covers MHA (kv_heads == heads) and MQA; `mla` is DeepSeek's latent attention."""

    kind: str  # "gqa" or "mla"
    num_heads: int
    num_kv_heads: int  # gqa: key/value heads; mla: equal to num_heads (keys are decompressed per head)
    qk_head_dim: int  # per-head query/key width (mla: qk_nope_head_dim + qk_rope_head_dim)
    v_head_dim: int
    in_bias: bool = False  # biases on the input projections (q, k, v; mla: q_a and kv_a)
    out_bias: bool = False  # bias on the output projection
    qk_norm: str | None = None  # "head": RMSNorm over one head (Qwen3); "proj": over the whole q/k projection (OLMoE)
    sinks: bool = False  # GPT-OSS: one learned attention-sink logit per head
    q_lora_rank: int | None = None  # mla: queries through a low-rank bottleneck (None: a full q projection)
    kv_lora_rank: int = 0  # mla: width of the compressed key/value latent (what is cached)
    qk_rope_head_dim: int = 0  # mla: the decoupled rotary key, shared by all heads (also cached)


@dataclass(frozen=True)
class Layer:
    """One transformer block: attention, then either a dense FFN or an MoE."""

    attention: Attention
    ffn: FFN | None = None  # dense layers
    moe: MoE | None = None  # MoE layers
    window: int | None = None  # sliding-window attention span; None = full causal attention
    cross_attention: Attention | None = None  # decoder blocks of an encoder-decoder
    rel_pos_buckets: int = 0  # T5-style relative position bias table [buckets, heads] (first block of a stack)
    stack: str = "decoder"  # "encoder" or "decoder"


@dataclass(frozen=True)
class ArchSpec:
    """A whole model, normalised: what the counting in `analysis.params` needs and nothing else."""

    model_type: str
    vocab_size: int
    d_model: int
    layers: tuple[Layer, ...]
    tie_embeddings: bool = False  # output head shares the input embedding matrix
    norm_bias: bool = False  # LayerNorm with a bias (PhiMoE); RMSNorm and bias-free LayerNorm have a weight only
    lm_head_bias: bool = False  # PhiMoE
    final_norms: int = 1  # one per stack: 2 for an encoder-decoder
    mtp_layers: int = 0  # DeepSeek-V3 multi-token-prediction modules (reported apart, never in the totals)
    dtype: str | None = None  # checkpoint dtype as the config states it
    quantization: str | None = None  # quantization_config.quant_method, if any

    @property
    def num_moe_layers(self) -> int:
        return sum(layer.moe is not None for layer in self.layers)


# ---------------------------------------------------------------------------------------------------- reading


class _Config:
    """A config.json dict with lookups that name the model type and the missing key when one is required."""

    def __init__(self, data: dict[str, Any], model_type: str):
        self.data, self.model_type = data, model_type

    def get(self, *keys: str, default: Any = None) -> Any:
        """The first of `keys` present with a non-null value (alternative spellings), else `default`."""
        for key in keys:
            if self.data.get(key) is not None:
                return self.data[key]
        return default

    def req(self, *keys: str) -> Any:
        value = self.get(*keys)
        if value is None:
            raise ValueError(f"{self.model_type} config lacks {' / '.join(map(repr, keys))}")
        return value

    def sub(self, key: str) -> "_Config":
        value = self.data.get(key) or {}
        if not isinstance(value, dict):  # a transformers sub-config object passed by a caller
            value = value.to_dict()
        return _Config(value, f"{self.model_type}.{key}")


def _gqa(c: _Config, *, bias: bool = False, out_bias: bool | None = None, qk_norm: str | None = None, sinks=False):
    heads = c.req("num_attention_heads")
    head_dim = c.get("head_dim") or c.req("hidden_size") // heads
    return Attention(
        "gqa",
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads", default=heads),
        qk_head_dim=head_dim,
        v_head_dim=head_dim,
        in_bias=bias,
        out_bias=bias if out_bias is None else out_bias,
        qk_norm=qk_norm,
        sinks=sinks,
    )


def _windows(c: _Config, rule: Callable[[int], bool]) -> list[int | None]:
    """Per layer: the sliding window, or None. An explicit `layer_types` list wins over the family's rule."""
    n, window = c.req("num_hidden_layers"), c.get("sliding_window")
    types = c.get("layer_types")
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types]
    return [window if window and rule(i) else None for i in range(n)]


def _decoder(c: _Config, layers: list[Layer], **extra: Any) -> ArchSpec:
    quant, dtype = c.get("quantization_config"), c.get("dtype", "torch_dtype")
    return ArchSpec(
        model_type=c.model_type,
        vocab_size=c.req("vocab_size"),
        d_model=c.req("hidden_size", "d_model"),
        layers=tuple(layers),
        tie_embeddings=bool(c.get("tie_word_embeddings", default=False)),
        dtype=str(dtype).removeprefix("torch.") if dtype else None,
        quantization=quant.get("quant_method") if isinstance(quant, dict) else None,
        **extra,
    )


def _num_experts(c: _Config) -> int:
    return c.req("num_local_experts", "num_experts", "n_routed_experts")


def _read_mixtral(c: _Config) -> ArchSpec:
    moe = MoE(_num_experts(c), c.req("num_experts_per_tok"), FFN(c.req("intermediate_size")))
    windows = _windows(c, lambda i: True)  # Mixtral applies `sliding_window` (if set) to every layer
    return _decoder(c, [Layer(_gqa(c), moe=moe, window=w) for w in windows])


def _read_phimoe(c: _Config) -> ArchSpec:
    moe = MoE(_num_experts(c), c.get("num_experts_per_tok", default=2), FFN(c.req("intermediate_size")))
    attention = _gqa(c, bias=bool(c.get("attention_bias", default=False)))
    layers = [Layer(attention, moe=moe, window=w) for w in _windows(c, lambda i: True)]
    return _decoder(c, layers, norm_bias=True, lm_head_bias=bool(c.get("lm_head_bias", default=False)))


def _qwen_moe_layers(c: _Config, attention: Attention, moe: MoE, windows: list[int | None]) -> list[Layer]:
    # Qwen2/3-MoE: a layer is MoE unless listed in mlp_only_layers, and then only every decoder_sparse_step-th.
    step, dense_only = c.get("decoder_sparse_step", default=1), set(c.get("mlp_only_layers", default=[]))
    dense = FFN(c.req("intermediate_size"))
    layers = []
    for i, window in enumerate(windows):
        sparse = i not in dense_only and moe.num_experts > 0 and (i + 1) % step == 0
        layers.append(Layer(attention, moe=moe if sparse else None, ffn=None if sparse else dense, window=window))
    return layers


def _read_qwen2_moe(c: _Config) -> ArchSpec:
    shared_width = c.get("shared_expert_intermediate_size", default=5632)
    moe = MoE(
        _num_experts(c),
        c.req("num_experts_per_tok"),
        FFN(c.req("moe_intermediate_size")),
        shared=FFN(shared_width),
        num_shared=1 if shared_width else 0,
        shared_gate=True,
    )
    attention = _gqa(c, bias=bool(c.get("qkv_bias", default=True)), out_bias=False)  # q/k/v biased, o not
    max_window_layers = c.get("max_window_layers", default=28)
    use_window = bool(c.get("use_sliding_window", default=False))
    # transformers' Qwen2MoeConfig rule when no layer_types are given: odd-numbered layers below max_window_layers
    windows = _windows(c, lambda i: use_window and (i + 1) % 2 == 1 and i < max_window_layers)
    return _decoder(c, _qwen_moe_layers(c, attention, moe, windows))


def _read_qwen3_moe(c: _Config) -> ArchSpec:
    moe = MoE(_num_experts(c), c.req("num_experts_per_tok"), FFN(c.req("moe_intermediate_size")))
    attention = _gqa(c, bias=bool(c.get("attention_bias", default=False)), qk_norm="head")
    use_window = bool(c.get("use_sliding_window", default=False))
    return _decoder(c, _qwen_moe_layers(c, attention, moe, _windows(c, lambda i: use_window)))


def _read_olmoe(c: _Config) -> ArchSpec:
    moe = MoE(_num_experts(c), c.get("num_experts_per_tok", default=8), FFN(c.req("intermediate_size")))
    attention = _gqa(c, bias=bool(c.get("attention_bias", default=False)), qk_norm="proj")
    return _decoder(c, [Layer(attention, moe=moe) for _ in range(c.req("num_hidden_layers"))])


def _read_granitemoe(c: _Config) -> ArchSpec:
    shared_width = c.get("shared_intermediate_size", default=0)
    moe = MoE(
        _num_experts(c),
        c.get("num_experts_per_tok", default=2),
        FFN(c.req("intermediate_size")),
        shared=FFN(shared_width) if shared_width else None,
        num_shared=1 if shared_width else 0,
    )
    attention = _gqa(c, bias=bool(c.get("attention_bias", default=False)))
    return _decoder(c, [Layer(attention, moe=moe) for _ in range(c.req("num_hidden_layers"))])


def _read_gpt_oss(c: _Config) -> ArchSpec:
    moe = MoE(
        _num_experts(c),
        c.req("num_experts_per_tok", "experts_per_token"),
        FFN(c.req("intermediate_size"), bias=True),  # clamped SwiGLU experts with biases
        router_bias=True,
    )
    attention = _gqa(c, bias=bool(c.get("attention_bias", default=True)), sinks=True)
    windows = _windows(c, lambda i: i % 2 == 0)  # transformers' default: sliding, full, sliding, ...
    return _decoder(c, [Layer(attention, moe=moe, window=w) for w in windows])


def _read_deepseek(c: _Config) -> ArchSpec:
    heads = c.req("num_attention_heads")
    nope, rope, v = c.req("qk_nope_head_dim"), c.req("qk_rope_head_dim"), c.req("v_head_dim")
    attention = Attention(
        "mla",
        num_heads=heads,
        num_kv_heads=heads,
        qk_head_dim=nope + rope,
        v_head_dim=v,
        in_bias=bool(c.get("attention_bias", default=False)),
        out_bias=bool(c.get("attention_bias", default=False)),
        q_lora_rank=c.get("q_lora_rank"),
        kv_lora_rank=c.req("kv_lora_rank"),
        qk_rope_head_dim=rope,
    )
    v3 = c.model_type == "deepseek_v3"
    mlp_bias = bool(c.get("mlp_bias", default=False)) and not v3  # only DeepseekV2MLP reads mlp_bias
    n_shared = c.get("n_shared_experts", default=1 if v3 else 2)
    moe = MoE(
        _num_experts(c),
        c.req("num_experts_per_tok"),
        FFN(c.req("moe_intermediate_size")),
        shared=FFN(n_shared * c.req("moe_intermediate_size"), bias=mlp_bias) if n_shared else None,
        num_shared=n_shared,
        selection_bias=v3,
    )
    dense = FFN(c.req("intermediate_size"), bias=mlp_bias)
    first_dense, freq = c.get("first_k_dense_replace", default=3 if v3 else 0), c.get("moe_layer_freq", default=1)
    layers = []
    for i in range(c.req("num_hidden_layers")):
        sparse = i >= first_dense and i % freq == 0  # DeepSeek's modeling code: MoE from layer k on, every freq-th
        layers.append(Layer(attention, moe=moe if sparse else None, ffn=None if sparse else dense))
    mtp = c.get("num_nextn_predict_layers", "num_mtp_layers", default=0) if v3 else 0
    return _decoder(c, layers, mtp_layers=mtp)


def _read_dbrx(c: _Config) -> ArchSpec:
    attn, ffn = c.sub("attn_config"), c.sub("ffn_config")
    d, heads = c.get("d_model", "hidden_size", default=2048), c.get("n_heads", "num_attention_heads", default=16)
    attention = Attention("gqa", heads, attn.get("kv_n_heads", default=1), d // heads, d // heads)  # fused Wqkv
    moe = MoE(
        ffn.get("moe_num_experts", default=4),
        ffn.get("moe_top_k", default=1),
        FFN(ffn.get("ffn_hidden_size", default=3584)),
    )
    n = c.get("n_layers", "num_hidden_layers", default=24)
    spec = _decoder(_Config({**c.data, "hidden_size": d}, c.model_type), [Layer(attention, moe=moe)] * n)
    return spec  # DBRX's LayerNorms have no bias; its embedding is never tied (the config rejects it)


def _read_switch(c: _Config) -> ArchSpec:
    d, heads, d_kv = c.get("d_model", default=768), c.get("num_heads", default=12), c.get("d_kv", default=64)
    attention = Attention("gqa", heads, heads, d_kv, d_kv)
    dense = FFN(c.get("d_ff", default=2048), gated=False)  # transformers builds DenseActDense (wi, wo) always
    moe = MoE(c.get("num_experts", default=8), 1, dense, router_bias=bool(c.get("router_bias", default=False)))
    buckets = c.get("relative_attention_num_buckets", default=32)
    enc_n = c.get("num_layers", default=12)
    dec_n = c.get("num_decoder_layers", default=enc_n)
    layers = []
    for stack, n, n_sparse in (
        ("encoder", enc_n, c.get("num_sparse_encoder_layers", default=3)),
        ("decoder", dec_n, c.get("num_sparse_decoder_layers", default=3)),
    ):
        step = n // n_sparse if n_sparse else 0
        for i in range(n):
            # transformers' rule: block i is sparse when i % step == 1 (every other block: 1, 3, 5, ...)
            sparse = bool(step) and (step == 1 or i % step == 1)
            layers.append(
                Layer(
                    attention,
                    moe=moe if sparse else None,
                    ffn=None if sparse else dense,
                    cross_attention=attention if stack == "decoder" else None,
                    rel_pos_buckets=buckets if i == 0 else 0,
                    stack=stack,
                )
            )
    data = {**c.data, "hidden_size": d, "tie_word_embeddings": c.get("tie_word_embeddings", default=True)}
    return _decoder(_Config(data, c.model_type), layers, final_norms=2)


def _read_glam(c: _Config) -> ArchSpec:
    # moekit's own description of an unreleased model (GLaM has no Hugging Face class); keys follow HF names.
    attention = _gqa(c)
    dense = FFN(c.req("intermediate_size"), gated=bool(c.get("dense_ffn_gated", default=True)))
    expert = FFN(c.req("intermediate_size"), gated=bool(c.get("expert_ffn_gated", default=False)))
    moe = MoE(c.req("num_experts"), c.req("num_experts_per_tok"), expert)
    freq = c.get("moe_layer_freq", default=2)
    layers = [
        Layer(attention, moe=moe if i % freq == freq - 1 else None, ffn=None if i % freq == freq - 1 else dense)
        for i in range(c.req("num_hidden_layers"))
    ]
    return _decoder(c, layers)


READERS: dict[str, Callable[[_Config], ArchSpec]] = {
    "mixtral": _read_mixtral,
    "qwen2_moe": _read_qwen2_moe,
    "qwen3_moe": _read_qwen3_moe,
    "olmoe": _read_olmoe,
    "deepseek_v2": _read_deepseek,
    "deepseek_v3": _read_deepseek,
    "gpt_oss": _read_gpt_oss,
    "phimoe": _read_phimoe,
    "granitemoe": _read_granitemoe,
    "granitemoeshared": _read_granitemoe,
    "dbrx": _read_dbrx,
    "switch_transformers": _read_switch,
    "glam": _read_glam,
}


def arch_from_config(config: dict[str, Any]) -> ArchSpec:
    """Map a Hugging Face `config.json` dict to an `ArchSpec`.

    Args:
        config: the parsed `config.json` (either spelling); `model_type` picks the reader.
    Returns:
        the normalised ArchSpec.
    Raises:
        ValueError: unsupported or missing `model_type` (the message lists the supported ones), or a missing key.
    """
    model_type = config.get("model_type")
    if model_type not in READERS:
        raise ValueError(
            f"unsupported model_type {model_type!r}: moekit reads {', '.join(sorted(READERS))}"
        )
    return READERS[model_type](_Config(config, model_type))


def load_config(source: str | Path) -> tuple[str, dict[str, Any]]:
    """Resolve a preset name, a `config.json` path or a Hugging Face model folder to (display name, config dict).

    Raises:
        ValueError: no such preset or file, or a file that is not a JSON object; the message names the path.
    """
    from moekit.presets import PRESETS, get_preset

    if str(source) in PRESETS:
        return str(source), get_preset(str(source))
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{str(path)!r} is neither a preset nor a config.json file or model folder "
            f"(presets: {', '.join(sorted(PRESETS))})"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(data).__name__}, not a config object")
    name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    return name, data
