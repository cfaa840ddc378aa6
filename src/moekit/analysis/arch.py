"""A normalised description of a transformer's architecture (`ArchSpec`), read from Hugging Face `config.json` files.

Every MoE family moekit knows has one small reader here that maps its `config.json` (a dict) to an `ArchSpec`; the
counting in `analysis/params.py` works only on `ArchSpec`, so a new family needs a reader and nothing else.

Readers accept both spellings of a config: the older one (`rope_theta` + `rope_scaling`, `torch_dtype`,
`num_experts`) and the newer one transformers 5 writes (`rope_parameters`, `dtype`, `num_local_experts`, ...).
Where a key is missing, a reader uses the default of the transformers 5 config class (`DEFAULTS`), as
`AutoConfig.from_pretrained` would: a released file, a file saved by transformers 5 and a hand-trimmed one of the
same model give the same spec. Layer placement follows the models:
`decoder_sparse_step`/`mlp_only_layers` (Qwen-MoE), `first_k_dense_replace`/`moe_layer_freq` (DeepSeek; transformers
ignores `moe_layer_freq`, DeepSeek's own code honours it, as we do — every released config has 1), every other layer
(Switch, GLaM).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class FFNSpec:
    """One feed-forward network: a dense FFN, one routed expert, or all shared experts of a layer as one FFN."""

    d_ff: int  # hidden width
    gated: bool = True  # 3 matrices (SwiGLU/GeGLU: gate, up, down) or 2 (ReLU/GELU: up, down)
    bias: bool = False  # biases on its projections (GPT-OSS experts, DeepSeek-V2 mlp_bias)


@dataclass(frozen=True)
class MoESpec:
    """The MoE part of a layer: router, routed experts and (optionally) always-on shared experts."""

    num_experts: int  # routed experts E
    top_k: int  # routed experts per token K
    expert: FFNSpec  # one routed expert
    router_bias: bool = False  # GPT-OSS
    shared: FFNSpec | None = None  # all shared experts as one FFN (DeepSeek builds n_shared experts as one wide MLP)
    num_shared: int = 0  # how many experts `shared` stands for (for display)
    shared_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x . w), a [1, D] projection
    selection_bias: bool = False  # DeepSeek-V3 e_score_correction_bias: a [E] buffer, not a parameter


@dataclass(frozen=True)
class AttentionSpec:
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
class LayerSpec:
    """One transformer block: attention, then either a dense FFN or an MoE."""

    attention: AttentionSpec
    ffn: FFNSpec | None = None  # dense layers
    moe: MoESpec | None = None  # MoE layers
    window: int | None = None  # sliding-window attention span; None = full causal attention
    cross_attention: AttentionSpec | None = None  # decoder blocks of an encoder-decoder
    rel_pos_buckets: int = 0  # T5-style relative position bias table [buckets, heads] (first block of a stack)
    stack: str = "decoder"  # "encoder" or "decoder"


@dataclass(frozen=True)
class ArchSpec:
    """A whole model, normalised: what the counting in `analysis.params` needs and nothing else."""

    model_type: str
    vocab_size: int
    d_model: int
    layers: tuple[LayerSpec, ...]
    tie_embeddings: bool = False  # output head shares the input embedding matrix
    norm_bias: bool = False  # LayerNorm with a bias (PhiMoE); RMSNorm and bias-free LayerNorm have a weight only
    lm_head_bias: bool = False  # PhiMoE
    final_norms: int = 1  # one per stack: 2 for an encoder-decoder
    mtp_layers: int = 0  # DeepSeek-V3 multi-token-prediction modules (reported apart, never in the totals)
    dtype: str | None = None  # checkpoint dtype as the config states it
    quantization: str | None = None  # quantization_config.quant_method, if any


# ---------------------------------------------------------------------------------------------------- reading


# Defaults of the transformers 5 config classes (their structural fields): a key a file lacks takes this value, as
# it would in transformers. A key with no default here is an error that names it.
_LLAMA_LIKE = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, num_key_value_heads=None)
DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        _LLAMA_LIKE, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(
        _LLAMA_LIKE, vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, decoder_sparse_step=1, mlp_only_layers=[],
        qkv_bias=True, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
    ),
    "qwen3_moe": dict(
        _LLAMA_LIKE, vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
        sliding_window=4096,
    ),
    "olmoe": dict(
        _LLAMA_LIKE, vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
        num_attention_heads=16, num_experts=64, num_experts_per_tok=8,
    ),
    "deepseek_v2": dict(
        _LLAMA_LIKE, vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, mlp_bias=False, first_k_dense_replace=0, moe_layer_freq=1, kv_lora_rank=512,
        q_lora_rank=1536, n_routed_experts=64, n_shared_experts=2, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, moe_intermediate_size=1407,
    ),
    "deepseek_v3": dict(
        _LLAMA_LIKE, vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, num_experts_per_tok=8, first_k_dense_replace=3, moe_layer_freq=1,
        num_nextn_predict_layers=1,
    ),
    "gpt_oss": dict(
        _LLAMA_LIKE, num_hidden_layers=36, num_local_experts=128, vocab_size=201088, hidden_size=2880,
        intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8, sliding_window=128,
        num_experts_per_tok=4, attention_bias=True,
    ),
    "phimoe": dict(
        _LLAMA_LIKE, vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2,
        lm_head_bias=False,
    ),
    "granitemoe": dict(
        _LLAMA_LIKE, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_local_experts=8, num_experts_per_tok=2,
    ),
    "dbrx": dict(d_model=2048, n_heads=16, n_layers=24, vocab_size=32000, tie_word_embeddings=False),
    "switch_transformers": dict(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12,
        num_sparse_encoder_layers=3, num_sparse_decoder_layers=3, num_experts=8, router_bias=False,
        relative_attention_num_buckets=32, tie_word_embeddings=True,
    ),
    "glam": dict(tie_word_embeddings=True, moe_layer_freq=2, dense_ffn_gated=True, expert_ffn_gated=False),
}  # fmt: skip
DEFAULTS["granitemoeshared"] = dict(DEFAULTS["granitemoe"], shared_intermediate_size=0)
_SUB_DEFAULTS = {  # DBRX's nested configs
    "dbrx.attn_config": dict(kv_n_heads=1),
    "dbrx.ffn_config": dict(ffn_hidden_size=3584, moe_num_experts=4, moe_top_k=1),
}


class HFConfig:
    """A config.json dict: lookups try every spelling of a key in the file, then the family's default."""

    def __init__(self, data: dict[str, Any], model_type: str):
        self.data, self.model_type = data, model_type
        self.defaults = DEFAULTS.get(model_type) or _SUB_DEFAULTS.get(model_type, {})

    def get(self, *keys: str, default: Any = None) -> Any:
        """The first of `keys` the file gives a non-null value, else the first with a family default."""
        for key in keys:
            if self.data.get(key) is not None:
                return self.data[key]
        for key in keys:
            if self.defaults.get(key) is not None:
                return self.defaults[key]
        return default

    def req(self, *keys: str) -> Any:
        value = self.get(*keys)
        if value is None:
            raise ValueError(f"{self.model_type} config lacks {' / '.join(map(repr, keys))}")
        return value

    def flag(self, key: str) -> bool:
        return bool(self.get(key, default=False))

    def sub(self, key: str) -> HFConfig:
        value = self.data.get(key) or {}
        if not isinstance(value, dict):  # a transformers sub-config object passed by a caller
            value = value.to_dict()
        return HFConfig(value, f"{self.model_type}.{key}")


def _nullable(c: HFConfig, key: str, if_null: Any) -> Any:
    """A key whose explicit null means something (`if_null`), unlike a missing key (the family default)."""
    value = c.data[key] if key in c.data else c.defaults.get(key)
    return if_null if value is None else value


def _gqa(c: HFConfig, *, bias: bool = False, out_bias: bool | None = None, qk_norm: str | None = None, sinks=False):
    heads = c.req("num_attention_heads")
    head_dim = c.get("head_dim") or c.req("hidden_size") // heads
    return AttentionSpec(
        "gqa",
        num_heads=heads,
        num_kv_heads=_nullable(c, "num_key_value_heads", heads),  # null: as many as the query heads
        qk_head_dim=head_dim,
        v_head_dim=head_dim,
        in_bias=bias,
        out_bias=bias if out_bias is None else out_bias,
        qk_norm=qk_norm,
        sinks=sinks,
    )


def _windows(c: HFConfig, rule: Callable[[int], bool]) -> list[int | None]:
    """Per layer: the sliding window, or None. An explicit `layer_types` list wins over the family's rule."""
    window, types = c.get("sliding_window") or None, c.get("layer_types")  # Qwen2-MoE writes 0 for "none"
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types]
    return [window if window and rule(i) else None for i in range(c.req("num_hidden_layers"))]


def _decoder(c: HFConfig, layers: list[LayerSpec], **extra: Any) -> ArchSpec:
    quant, dtype = c.get("quantization_config"), c.get("dtype", "torch_dtype")
    return ArchSpec(
        model_type=c.model_type,
        vocab_size=c.req("vocab_size"),
        d_model=c.req("hidden_size", "d_model"),
        layers=tuple(layers),
        tie_embeddings=c.flag("tie_word_embeddings"),
        dtype=str(dtype).removeprefix("torch.") if dtype else None,
        quantization=quant.get("quant_method") if isinstance(quant, dict) else None,
        **extra,
    )


def _num_experts(c: HFConfig) -> int:
    return c.req("num_local_experts", "num_experts", "n_routed_experts")


def _read_mixtral(c: HFConfig) -> ArchSpec:
    moe = MoESpec(_num_experts(c), c.req("num_experts_per_tok"), FFNSpec(c.req("intermediate_size")))
    windows = _windows(c, lambda i: True)  # Mixtral applies `sliding_window` (if set) to every layer
    return _decoder(c, [LayerSpec(_gqa(c), moe=moe, window=w) for w in windows])


def _read_phimoe(c: HFConfig) -> ArchSpec:
    moe = MoESpec(_num_experts(c), c.req("num_experts_per_tok"), FFNSpec(c.req("intermediate_size")))
    attention = _gqa(c, bias=c.flag("attention_bias"))
    layers = [LayerSpec(attention, moe=moe, window=w) for w in _windows(c, lambda i: True)]
    return _decoder(c, layers, norm_bias=True, lm_head_bias=c.flag("lm_head_bias"))


def _qwen_moe_layers(c: HFConfig, attention: AttentionSpec, moe: MoESpec, windows: list[int | None]) -> list[LayerSpec]:
    # Qwen2/3-MoE: a layer is MoE unless listed in mlp_only_layers, and then only every decoder_sparse_step-th.
    step, dense_only = c.req("decoder_sparse_step"), set(c.get("mlp_only_layers", default=[]))
    dense = FFNSpec(c.req("intermediate_size"))
    layers = []
    for i, window in enumerate(windows):
        sparse = i not in dense_only and moe.num_experts > 0 and (i + 1) % step == 0
        layers.append(LayerSpec(attention, moe=moe if sparse else None, ffn=None if sparse else dense, window=window))
    return layers


def _read_qwen2_moe(c: HFConfig) -> ArchSpec:
    shared_width = c.get("shared_expert_intermediate_size", default=0)
    moe = MoESpec(
        _num_experts(c),
        c.req("num_experts_per_tok"),
        FFNSpec(c.req("moe_intermediate_size")),
        shared=FFNSpec(shared_width),
        num_shared=1 if shared_width else 0,
        shared_gate=True,
    )
    attention = _gqa(c, bias=c.flag("qkv_bias"), out_bias=False)  # q/k/v biased, o not
    max_window_layers, use_window = c.req("max_window_layers"), c.flag("use_sliding_window")
    # transformers' Qwen2MoeConfig rule when no layer_types are given: odd-numbered layers below max_window_layers
    windows = _windows(c, lambda i: use_window and (i + 1) % 2 == 1 and i < max_window_layers)
    return _decoder(c, _qwen_moe_layers(c, attention, moe, windows))


def _read_qwen3_moe(c: HFConfig) -> ArchSpec:
    moe = MoESpec(_num_experts(c), c.req("num_experts_per_tok"), FFNSpec(c.req("moe_intermediate_size")))
    attention = _gqa(c, bias=c.flag("attention_bias"), qk_norm="head")
    use_window = c.flag("use_sliding_window")
    return _decoder(c, _qwen_moe_layers(c, attention, moe, _windows(c, lambda i: use_window)))


def _read_olmoe(c: HFConfig) -> ArchSpec:
    moe = MoESpec(_num_experts(c), c.req("num_experts_per_tok"), FFNSpec(c.req("intermediate_size")))
    attention = _gqa(c, bias=c.flag("attention_bias"), qk_norm="proj")
    return _decoder(c, [LayerSpec(attention, moe=moe) for _ in range(c.req("num_hidden_layers"))])


def _read_granitemoe(c: HFConfig) -> ArchSpec:
    shared_width = c.get("shared_intermediate_size", default=0)
    moe = MoESpec(
        _num_experts(c),
        c.req("num_experts_per_tok"),
        FFNSpec(c.req("intermediate_size")),
        shared=FFNSpec(shared_width) if shared_width else None,
        num_shared=1 if shared_width else 0,
    )
    attention = _gqa(c, bias=c.flag("attention_bias"))
    return _decoder(c, [LayerSpec(attention, moe=moe) for _ in range(c.req("num_hidden_layers"))])


def _read_gpt_oss(c: HFConfig) -> ArchSpec:
    moe = MoESpec(
        _num_experts(c),
        c.req("num_experts_per_tok", "experts_per_token"),
        FFNSpec(c.req("intermediate_size"), bias=True),  # clamped SwiGLU experts with biases
        router_bias=True,
    )
    attention = _gqa(c, bias=c.flag("attention_bias"), sinks=True)
    windows = _windows(c, lambda i: i % 2 == 0)  # transformers' default: sliding, full, sliding, ...
    return _decoder(c, [LayerSpec(attention, moe=moe, window=w) for w in windows])


def _read_deepseek(c: HFConfig) -> ArchSpec:
    heads = c.req("num_attention_heads")
    nope, rope, v = c.req("qk_nope_head_dim"), c.req("qk_rope_head_dim"), c.req("v_head_dim")
    attention = AttentionSpec(
        "mla",
        num_heads=heads,
        num_kv_heads=heads,
        qk_head_dim=nope + rope,
        v_head_dim=v,
        in_bias=c.flag("attention_bias"),
        out_bias=c.flag("attention_bias"),
        q_lora_rank=_nullable(c, "q_lora_rank", None),  # null: a full-rank q_proj (DeepSeek-V2-Lite)
        kv_lora_rank=c.req("kv_lora_rank"),
        qk_rope_head_dim=rope,
    )
    v3 = c.model_type == "deepseek_v3"
    mlp_bias = c.flag("mlp_bias") and not v3  # only DeepseekV2MLP reads mlp_bias
    n_shared, width = c.get("n_shared_experts", default=0), c.req("moe_intermediate_size")
    moe = MoESpec(
        _num_experts(c),
        c.req("num_experts_per_tok"),
        FFNSpec(width),
        shared=FFNSpec(n_shared * width, bias=mlp_bias) if n_shared else None,
        num_shared=n_shared,
        selection_bias=v3,
    )
    dense = FFNSpec(c.req("intermediate_size"), bias=mlp_bias)
    first_dense, freq = c.get("first_k_dense_replace", default=0), c.req("moe_layer_freq")
    layers = []
    for i in range(c.req("num_hidden_layers")):
        sparse = i >= first_dense and i % freq == 0  # DeepSeek's modeling code: MoE from layer k on, every freq-th
        layers.append(LayerSpec(attention, moe=moe if sparse else None, ffn=None if sparse else dense))
    mtp = c.get("num_nextn_predict_layers", "num_mtp_layers", default=0) if v3 else 0
    return _decoder(c, layers, mtp_layers=mtp)


def _read_dbrx(c: HFConfig) -> ArchSpec:
    attn, ffn = c.sub("attn_config"), c.sub("ffn_config")
    d, heads = c.req("d_model", "hidden_size"), c.req("n_heads", "num_attention_heads")
    attention = AttentionSpec("gqa", heads, attn.req("kv_n_heads"), d // heads, d // heads)  # one fused Wqkv
    moe = MoESpec(ffn.req("moe_num_experts"), ffn.req("moe_top_k"), FFNSpec(ffn.req("ffn_hidden_size")))
    layers = [LayerSpec(attention, moe=moe)] * c.req("n_layers", "num_hidden_layers")
    return _decoder(c, layers)  # DBRX's LayerNorms have no bias; its config rejects tied embeddings


def _read_switch(c: HFConfig) -> ArchSpec:
    heads, d_kv = c.req("num_heads", "num_attention_heads"), c.req("d_kv")
    attention = AttentionSpec("gqa", heads, heads, d_kv, d_kv)
    dense = FFNSpec(c.req("d_ff"), gated=False)  # transformers builds DenseActDense (wi, wo) whatever dense_act_fn says
    moe = MoESpec(c.req("num_experts"), 1, dense, router_bias=c.flag("router_bias"))
    enc_n = c.req("num_layers", "num_hidden_layers")
    layers = []
    for stack, n, n_sparse in (
        ("encoder", enc_n, c.req("num_sparse_encoder_layers")),
        ("decoder", _nullable(c, "num_decoder_layers", enc_n), c.req("num_sparse_decoder_layers")),
    ):
        step = n // n_sparse if n_sparse else 0
        for i in range(n):
            # transformers' rule: block i is sparse when i % step == 1 (every other block: 1, 3, 5, ...); with no
            # sparse layers asked for, none (transformers' own workaround would still make block 1 sparse)
            sparse = bool(step) and (step == 1 or i % step == 1)
            layers.append(
                LayerSpec(
                    attention,
                    moe=moe if sparse else None,
                    ffn=None if sparse else dense,
                    cross_attention=attention if stack == "decoder" else None,
                    rel_pos_buckets=c.req("relative_attention_num_buckets") if i == 0 else 0,
                    stack=stack,
                )
            )
    # With tie_word_embeddings=False, transformers 5.23 builds three input embedding matrices (`shared`, and the
    # encoder's and decoder's embed_tokens, which it ties only in tied models); the architecture, like T5 in the same
    # library, has one input embedding for both stacks, and that is what we count (the tests pin the difference).
    return _decoder(c, layers, final_norms=2)


def _read_glam(c: HFConfig) -> ArchSpec:
    # moekit's own description of an unreleased model (GLaM has no Hugging Face class); keys follow HF names.
    attention = _gqa(c)
    dense = FFNSpec(c.req("intermediate_size"), gated=c.flag("dense_ffn_gated"))
    expert = FFNSpec(c.req("intermediate_size"), gated=c.flag("expert_ffn_gated"))
    moe = MoESpec(c.req("num_experts"), c.req("num_experts_per_tok"), expert)
    freq = c.req("moe_layer_freq")
    sparse = [i % freq == freq - 1 for i in range(c.req("num_hidden_layers"))]
    return _decoder(c, [LayerSpec(attention, moe=moe if s else None, ffn=None if s else dense) for s in sparse])


READERS: dict[str, Callable[[HFConfig], ArchSpec]] = {
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
        raise ValueError(f"unsupported model_type {model_type!r}: moekit reads {', '.join(sorted(READERS))}")
    return READERS[model_type](HFConfig(config, model_type))


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
