"""Parameters, FLOPs and memory of an MoE model: total vs active, per part, beside its published figures.

Counting works on an `ArchSpec` (see `analysis/arch.py`), read from a preset, a `config.json` or a model folder.

Conventions (published figures differ in them, so every one is reported and named):
- `total_params` = `sum(p.numel() for p in model.parameters())` of the transformers model built from the same
  config (tied matrices once; one exception: see the Switch note in `analysis/arch.py`). Buffers are not parameters: DeepSeek-V3's `e_score_correction_bias` ([E] per MoE
  layer, 14,848 in all; kept in the checkpoint) is reported apart as `buffers`. DeepSeek-V3's multi-token-prediction
  module is not built by transformers and is not in the published 671B: reported apart as `mtp_params`.
- `active_params`: what one token uses — everything except the routed experts it is not sent to (top-k of E in
  each MoE layer). The whole embedding matrix and output head count (the Mixtral/Qwen convention: 12.9B for
  Mixtral-8x7B). `active_params_excl_embedding` drops the input embedding (the GPT-OSS and DeepSeek convention; with
  tied embeddings the shared matrix stays, as the output head); `active_params_excl_embedding_and_head` drops both
  (Kaplan et al. 2020's non-embedding N).
- Forward FLOPs per token = 2 * (active weights that take part in a matrix multiply: every projection, expert,
  router and shared-expert gate, and the output head; not the embedding lookup, norms, biases or sinks)
  + attention: 2 * ctx * H * (d_qk + d_v) per layer for the score (QK^T) and value (AV) products, where ctx is the
  context length capped at the layer's sliding window, and cross-attention attends to `context` source tokens.
  This is Kaplan et al. 2020 (Table 1) with the AV product counted as in Hoffmann et al. 2022 (App. F); softmax,
  norms and routing's top-k are not counted. ctx is the full context: the cost of the last token of a context, not
  the average over a causal sequence (half of that). Router FLOPs (2 * D * E per MoE layer) are included.
  An encoder-decoder's token is counted through both stacks. Training FLOPs = 3 x forward (backward = 2 x forward).
- Weight memory = total_params x bytes per parameter (fp32 4, bf16 2, fp8 1, int4 0.5); quantisation scales and
  buffers are not counted. GB = 10^9 bytes.
- KV cache: GQA/MHA layers cache K and V for the key/value heads, 2 * kv_heads * head_dim values per token; MLA
  layers cache the compressed latent and the shared rotary key, kv_lora_rank + qk_rope_head_dim values (DeepSeek-V2
  paper, Sec. 2.1; transformers itself caches decompressed keys and values); a sliding-window layer holds at most
  `window` tokens; an encoder-decoder's decoder also caches cross-attention K/V for `context` source tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moekit.analysis.arch import ArchSpec, AttentionSpec, FFNSpec, LayerSpec, MoESpec, arch_from_config, load_config

CATEGORIES = (
    "embedding", "attention", "dense_ffn", "router", "shared_experts", "routed_experts", "norms", "output_head",
    "other",
)  # fmt: skip
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int4": 0.5}
CONVENTIONS = {
    "all": "active_params: embedding matrix and output head included (Mixtral, Qwen, DBRX, OLMoE, GLaM)",
    "excl_embedding": "active_params_excl_embedding: input embedding excluded (GPT-OSS, DeepSeek)",
    "excl_embedding_and_head": "active_params_excl_embedding_and_head: Kaplan et al. 2020 non-embedding count",
}


# ---------------------------------------------------------------------------------------------------- counting


class _Tally:
    """Parameters by category: total, active per token, and which active ones are matmul weights (for FLOPs)."""

    def __init__(self) -> None:
        self.total = dict.fromkeys(CATEGORIES, 0)
        self.active = dict.fromkeys(CATEGORIES, 0)
        self.matmul_active = 0  # weights a token multiplies by
        self.matmul_all = 0  # the same if every routed expert ran

    def add(self, category: str, n: int, *, active: int | None = None, matmul: bool = True) -> None:
        active = n if active is None else active
        self.total[category] += n
        self.active[category] += active
        if matmul:
            self.matmul_active += active
            self.matmul_all += n


def _ffn(f: FFNSpec, d: int) -> tuple[int, int]:
    """(weights, biases) of one FFN."""
    n_in = 2 if f.gated else 1  # gate and up projections, or up only
    return (n_in + 1) * d * f.d_ff, (n_in * f.d_ff + d if f.bias else 0)


def _add_attention(t: _Tally, a: AttentionSpec, d: int) -> None:
    h, qk, v = a.num_heads, a.qk_head_dim, a.v_head_dim
    if a.kind == "gqa":
        kv = a.num_kv_heads
        weights = d * h * qk + d * kv * qk + d * kv * v + h * v * d  # q, k, v, o
        bias = (h * qk + kv * qk + kv * v if a.in_bias else 0) + (d if a.out_bias else 0)
        norms = {"head": 2 * qk, "proj": h * qk + kv * qk, None: 0}[a.qk_norm]
    elif a.kind == "mla":
        rq, rkv, rope = a.q_lora_rank, a.kv_lora_rank, a.qk_rope_head_dim
        q = d * rq + rq * h * qk if rq else d * h * qk  # q_a, q_b  or  q_proj
        kv = d * (rkv + rope) + rkv * h * (qk - rope + v)  # kv_a_proj_with_mqa, kv_b_proj
        weights = q + kv + h * v * d
        bias = ((rq or 0) + rkv + rope if a.in_bias else 0) + (d if a.out_bias else 0)  # q_a, kv_a; o
        norms = (rq or 0) + rkv  # q_a_layernorm, kv_a_layernorm
    else:
        raise ValueError(f"unknown attention kind {a.kind!r}")
    t.add("attention", weights)
    t.add("attention", bias + (h if a.sinks else 0), matmul=False)
    t.add("norms", norms, matmul=False)


def _add_moe(t: _Tally, m: MoESpec, d: int) -> None:
    t.add("router", d * m.num_experts)
    t.add("router", m.num_experts if m.router_bias else 0, matmul=False)
    weights, bias = _ffn(m.expert, d)
    t.add("routed_experts", m.num_experts * weights, active=m.top_k * weights)
    t.add("routed_experts", m.num_experts * bias, active=m.top_k * bias, matmul=False)
    if m.shared is not None:
        weights, bias = _ffn(m.shared, d)
        t.add("shared_experts", weights + (d if m.shared_gate else 0))
        t.add("shared_experts", bias, matmul=False)


def _add_layer(t: _Tally, layer: LayerSpec, d: int, norm_width: int) -> None:
    _add_attention(t, layer.attention, d)
    if layer.cross_attention is not None:
        _add_attention(t, layer.cross_attention, d)
    t.add("other", layer.rel_pos_buckets * layer.attention.num_heads, matmul=False)
    if layer.moe is not None:
        _add_moe(t, layer.moe, d)
    if layer.ffn is not None:
        weights, bias = _ffn(layer.ffn, d)
        t.add("dense_ffn", weights)
        t.add("dense_ffn", bias, matmul=False)
    sublayers = 3 if layer.cross_attention is not None else 2  # a norm before each sub-layer
    t.add("norms", sublayers * norm_width, matmul=False)


def _tally(spec: ArchSpec) -> _Tally:
    t, d = _Tally(), spec.d_model
    norm_width = 2 * d if spec.norm_bias else d
    # A tied matrix is one parameter: counted as the embedding, and as a matmul weight because the head uses it.
    t.add("embedding", spec.vocab_size * d, matmul=spec.tie_embeddings)
    for layer in spec.layers:
        _add_layer(t, layer, d, norm_width)
    t.add("norms", spec.final_norms * norm_width, matmul=False)
    if not spec.tie_embeddings:
        t.add("output_head", spec.vocab_size * d)
    t.add("output_head", spec.vocab_size if spec.lm_head_bias else 0, matmul=False)
    return t


def _mtp_params(spec: ArchSpec) -> int:
    # DeepSeek-V3 Sec. 2.2: each MTP module = RMSNorms of the hidden state and of the next token's embedding, a
    # [D, 2D] projection, one transformer block (MoE) and a final norm; embedding and output head are shared.
    if not spec.mtp_layers:
        return 0
    moe_layer = next(layer for layer in spec.layers if layer.moe is not None)
    t, d = _Tally(), spec.d_model
    _add_layer(t, moe_layer, d, d)
    return spec.mtp_layers * (sum(t.total.values()) + 2 * d * d + 3 * d)


# ---------------------------------------------------------------------------------------------------- FLOPs, KV cache


def _attention_flops(a: AttentionSpec, ctx: int) -> int:
    return 2 * ctx * a.num_heads * (a.qk_head_dim + a.v_head_dim)  # QK^T and AV, per token


def attention_flops_per_token(spec: ArchSpec, context: int) -> int:
    """FLOPs of the attention score and value products for one token that attends to `context` tokens."""
    flops = 0
    for layer in spec.layers:
        flops += _attention_flops(layer.attention, min(context, layer.window or context))
        if layer.cross_attention is not None:
            flops += _attention_flops(layer.cross_attention, context)
    return flops


def _kv_values_per_token(a: AttentionSpec) -> int:
    if a.kind == "mla":
        return a.kv_lora_rank + a.qk_rope_head_dim  # the latent c_KV and the shared rotary key k_R
    return a.num_kv_heads * (a.qk_head_dim + a.v_head_dim)  # K and V of every key/value head


def kv_cache_values(spec: ArchSpec, context: int) -> int:
    """Values (elements) one sequence of `context` tokens keeps in the KV cache, sliding windows honoured."""
    values = 0
    for layer in spec.layers:
        if layer.stack == "encoder":
            continue  # an encoder's keys and values are not cached; its output is, as the cross-attention K/V
        values += _kv_values_per_token(layer.attention) * min(context, layer.window or context)
        if layer.cross_attention is not None:
            values += _kv_values_per_token(layer.cross_attention) * context
    return values


# ---------------------------------------------------------------------------------------------------- the report


@dataclass
class ParamReport:
    """Everything `moekit params` prints for one model; `to_dict()` is its `--json` form. Integers are exact."""

    name: str
    model_type: str
    source: str | None
    total_params: int
    active_params: int
    active_params_excl_embedding: int
    active_params_excl_embedding_and_head: int
    breakdown: dict[str, dict[str, int]]  # category -> {"total": n, "active": n}
    buffers: int  # persistent buffers that are not parameters (DeepSeek-V3 e_score_correction_bias)
    mtp_params: int  # DeepSeek-V3 multi-token-prediction module, not in the totals
    layers: dict[str, int]  # total / dense / moe (and encoder / decoder for an encoder-decoder)
    experts: dict[str, int] | None  # routed / top_k / shared of the MoE layers; None for a dense model
    context: int
    batch: int
    forward_flops_per_token: int
    attention_flops_per_token: int
    training_flops_per_token: int
    flops_fraction_of_all_experts: float  # forward FLOPs / forward FLOPs if every routed expert ran
    weight_bytes: dict[str, int]  # fp32 / bf16 / fp8 / int4
    kv_cache: dict[str, Any]  # dtype, bytes_per_token, bytes_at_context (for `context` x `batch`)
    dense_equivalent: dict[str, int]  # a dense model with the same active parameters
    dtype: str | None = None
    quantization: str | None = None
    conventions: dict[str, str] = field(default_factory=lambda: dict(CONVENTIONS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def analyze(
    model: str | Path | dict[str, Any] | ArchSpec,
    *,
    context: int = 4096,
    batch: int = 1,
    kv_dtype: str = "bf16",
    name: str | None = None,
) -> ParamReport:
    """Count parameters, FLOPs and memory of a model.

    Args:
        model: a preset name, a `config.json` path, a Hugging Face model folder, a config dict or an ArchSpec.
        context: tokens of context for attention FLOPs and the KV cache.
        batch: sequences held in the KV cache.
        kv_dtype: KV cache element type, one of DTYPE_BYTES.
        name: display name (default: the preset or folder name, or the model_type).
    Returns:
        a ParamReport.
    """
    for label, value in (("context", context), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if kv_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    source = None
    if isinstance(model, ArchSpec):
        spec = model
    else:
        if isinstance(model, dict):
            config = model
        else:
            default_name, config = load_config(model)
            name = name or default_name
        spec, source = arch_from_config(config), config.get("source")
    name = name or spec.model_type

    t = _tally(spec)
    total, active = sum(t.total.values()), sum(t.active.values())
    embedding, head = t.total["embedding"], t.total["output_head"]
    attention = attention_flops_per_token(spec, context)
    forward = 2 * t.matmul_active + attention
    moe_layers = [layer.moe for layer in spec.layers if layer.moe is not None]
    layers = {"total": len(spec.layers), "dense": len(spec.layers) - len(moe_layers), "moe": len(moe_layers)}
    if any(layer.stack == "encoder" for layer in spec.layers):
        layers["encoder"] = sum(layer.stack == "encoder" for layer in spec.layers)
        layers["decoder"] = len(spec.layers) - layers["encoder"]
    moe = moe_layers[0] if moe_layers else None
    kv_bytes = DTYPE_BYTES[kv_dtype]
    return ParamReport(
        name=name,
        model_type=spec.model_type,
        source=source,
        total_params=total,
        active_params=active,
        active_params_excl_embedding=active - (0 if spec.tie_embeddings else embedding),
        active_params_excl_embedding_and_head=active - embedding - head,
        breakdown={c: {"total": t.total[c], "active": t.active[c]} for c in CATEGORIES},
        buffers=sum(m.num_experts for m in moe_layers if m.selection_bias),
        mtp_params=_mtp_params(spec),
        layers=layers,
        experts=None if moe is None else {"routed": moe.num_experts, "top_k": moe.top_k, "shared": moe.num_shared},
        context=context,
        batch=batch,
        forward_flops_per_token=forward,
        attention_flops_per_token=attention,
        training_flops_per_token=3 * forward,
        flops_fraction_of_all_experts=forward / (2 * t.matmul_all + attention),
        weight_bytes={k: math.ceil(total * b) for k, b in DTYPE_BYTES.items()},
        kv_cache={
            "dtype": kv_dtype,
            "bytes_per_token": math.ceil(kv_cache_values(spec, 1) * kv_bytes),
            "bytes_at_context": math.ceil(batch * kv_cache_values(spec, context) * kv_bytes),
        },
        dense_equivalent={
            "params": active,
            "weight_bytes_bf16": 2 * active,
            "forward_flops_per_token": forward,
        },
        dtype=spec.dtype,
        quantization=spec.quantization,
    )


# ---------------------------------------------------------------------------------------------------- published


def agreement(ours: int, published: str) -> str | None:
    """How `ours` agrees with a figure written as "46.7B" or "1.2T": "rounds" to it, "truncates" to it, or None.

    Authors round or cut at the digits they print (Qwen3-30B-A3B's 3.353B active is published as "3.3B").
    """
    scale = {"M": 1e6, "B": 1e9, "T": 1e12}[published[-1]]
    digits = published[:-1]
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    value, ulp = float(digits), 10.0**-decimals
    if round(ours / scale, decimals) == value:
        return "rounds"
    if value <= ours / scale < value + ulp:
        return "truncates"
    return None


def published_comparison(context: int = 4096) -> list[dict[str, Any]]:
    """Our counts beside the published ones, one row per preset with published figures.

    Returns:
        rows with name, published_total, ours_total, published_active, ours_active (in the published
        convention), convention, all three active counts, total_agrees / active_agrees ("rounds", "truncates"
        or None, see `agreement`), matches (both agree) and source.
    """
    from moekit.presets import PUBLISHED

    rows = []
    for name, pub in PUBLISHED.items():
        r = analyze(name, context=context)
        actives = {
            "all": r.active_params,
            "excl_embedding": r.active_params_excl_embedding,
            "excl_embedding_and_head": r.active_params_excl_embedding_and_head,
        }
        ours_active = actives[pub.convention]
        total_agrees = agreement(r.total_params, pub.total)
        active_agrees = agreement(ours_active, pub.active) if pub.active else "n/a"
        rows.append(
            {
                "name": name,
                "published_total": pub.total,
                "ours_total": r.total_params,
                "published_active": pub.active,
                "ours_active": ours_active,
                "convention": pub.convention,
                "active_params": actives,
                "total_agrees": total_agrees,
                "active_agrees": active_agrees,
                "matches": bool(total_agrees and active_agrees),
                "source": pub.source,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------- printing


def human(n: float, unit: str = "") -> str:
    """Counts as 46.70B (K, M, B, T); with a unit, SI prefixes: human(9.3e10, "B") -> '93.41 GB', 'GFLOP'."""
    prefixes = ((1e15, " P"), (1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " K")) if unit else (
        (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))  # fmt: skip
    for scale, prefix in prefixes:
        if abs(n) >= scale:
            return f"{n / scale:.2f}{prefix}{unit}"
    return f"{n:.0f} {unit}" if unit else f"{n:.0f}"


def _experts_text(r: ParamReport) -> str:
    if r.experts is None:
        return "dense (no MoE layers)"
    shared = f", {r.experts['shared']} shared" if r.experts["shared"] else ""
    return f"{r.experts['routed']} routed, top-{r.experts['top_k']}{shared}"


def _layers_text(r: ParamReport) -> str:
    stacks = f"{r.layers['encoder']} encoder + {r.layers['decoder']} decoder, " if "encoder" in r.layers else ""
    return f"{r.layers['total']} ({stacks}{r.layers['moe']} MoE, {r.layers['dense']} dense)"


def format_report(r: ParamReport) -> str:
    """The human-readable form of one report (what `moekit params <model>` prints)."""
    lines = [f"{r.name}  [{r.model_type}]"]
    if r.source:
        lines.append(f"  source: {r.source}")
    stored = f" · dtype {r.dtype}" if r.dtype else ""
    stored += f" (quantised: {r.quantization})" if r.quantization else ""
    lines += [f"  layers: {_layers_text(r)} · experts: {_experts_text(r)}{stored}", ""]
    row = lambda label, total, active: f"  {label:<16}{total:>18,} {human(total):>8}  {active:>18,} {human(active):>8}"
    lines.append(f"  {'parameters':<16}{'total':>27}  {'active per token':>27}")
    lines += [row(c, n["total"], n["active"]) for c, n in r.breakdown.items() if n["total"]]
    lines += [row("total", r.total_params, r.active_params), ""]
    lines.append(
        f"  active per token: {human(r.active_params)} with embedding and output head (Mixtral, Qwen convention); "
        f"{human(r.active_params_excl_embedding)} without the input embedding (GPT-OSS, DeepSeek); "
        f"{human(r.active_params_excl_embedding_and_head)} without either (Kaplan non-embedding)"
    )
    share = r.active_params / r.total_params
    lines.append(f"  a token uses {share:.1%} of the parameters")
    if r.buffers:
        lines.append(f"  buffers (not parameters, not counted): {r.buffers:,} (router e_score_correction_bias)")
    if r.mtp_params:
        lines.append(
            f"  multi-token-prediction module (not counted): {human(r.mtp_params)} besides shared embedding/head"
        )
    lines += [
        "",
        (
            f"  compute per token at context {r.context:,}: forward {human(r.forward_flops_per_token, 'FLOP')} "
            f"(of which attention {human(r.attention_flops_per_token, 'FLOP')}); "
            f"training {human(r.training_flops_per_token, 'FLOP')} (3x forward)"
        ),
        f"  {r.flops_fraction_of_all_experts:.1%} of the forward FLOPs the model would need with every expert active",
        "  weights: " + " · ".join(f"{k} {human(v, 'B')}" for k, v in r.weight_bytes.items()),
        (
            f"  KV cache ({r.kv_cache['dtype']}): {human(r.kv_cache['bytes_per_token'], 'B')} per token; "
            f"{human(r.kv_cache['bytes_at_context'], 'B')} at context {r.context:,} x batch {r.batch}"
        ),
        (
            f"  dense model with the same active parameters: {human(r.active_params)} parameters, "
            f"{human(r.dense_equivalent['weight_bytes_bf16'], 'B')} of bf16 weights "
            f"({r.total_params / r.active_params:.1f}x less than this model's {human(r.weight_bytes['bf16'], 'B')}), "
            "the same FLOPs per token"
        ),
    ]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, columns padded so it also reads as plain text."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |"

    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def format_comparison(reports: list[ParamReport]) -> str:
    """Models side by side (what `moekit params --compare a b c` prints)."""
    r0 = reports[0]
    rows = [
        ("model type", lambda r: r.model_type),
        ("layers", _layers_text),
        ("experts", _experts_text),
        ("total params", lambda r: human(r.total_params)),
        ("active params (all)", lambda r: human(r.active_params)),
        ("active excl. embedding", lambda r: human(r.active_params_excl_embedding)),
        ("active excl. emb. + head", lambda r: human(r.active_params_excl_embedding_and_head)),
        ("active share", lambda r: f"{r.active_params / r.total_params:.1%}"),
        ("routed experts (total)", lambda r: human(r.breakdown["routed_experts"]["total"])),
        ("forward FLOPs/token", lambda r: human(r.forward_flops_per_token, "FLOP")),
        ("training FLOPs/token", lambda r: human(r.training_flops_per_token, "FLOP")),
        ("FLOPs vs all experts", lambda r: f"{r.flops_fraction_of_all_experts:.1%}"),
        *[(f"weights {k}", lambda r, k=k: human(r.weight_bytes[k], "B")) for k in DTYPE_BYTES],
        (f"KV/token ({r0.kv_cache['dtype']})", lambda r: human(r.kv_cache["bytes_per_token"], "B")),
        (f"KV @ {r0.context} x {r0.batch}", lambda r: human(r.kv_cache["bytes_at_context"], "B")),
        ("dense-equivalent bf16", lambda r: human(r.dense_equivalent["weight_bytes_bf16"], "B")),
    ]
    return _table(["", *(r.name for r in reports)], [[label, *(get(r) for r in reports)] for label, get in rows])


def format_published_table(rows: list[dict[str, Any]]) -> str:
    """The ours-vs-published table (Markdown), as `moekit params --published` prints it."""
    names = {"all": "with embedding + head", "excl_embedding": "excl. input embedding"}
    body = [
        [
            row["name"],
            row["published_total"],
            human(row["ours_total"]),
            row["published_active"] or "–",
            human(row["ours_active"]) if row["published_active"] else "–",
            names.get(row["convention"], row["convention"]),
            f"{row['total_agrees'] or 'NO'} / {row['active_agrees'] or 'NO'}",
            row["source"],
        ]
        for row in rows
    ]
    header = ["model", "published total", "ours", "published active", "ours", "active convention", "agrees", "source"]
    return _table(header, body)
