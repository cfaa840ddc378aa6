"""Configuration dataclasses. Plain data, validated at construction with errors that name the bad value.

`MoEConfig` describes one Mixture-of-Experts layer: every option a paper names has a field here, and the
defaults are those of the most common modern recipe (Mixtral-style SwiGLU experts, softmax top-2, dropless).
`ModelConfig` describes a decoder-only language model built from such layers (and dense ones); `VisionConfig` a
vision transformer with MoE layers (V-MoE).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

ACTIVATIONS = ("swiglu", "geglu", "relu", "gelu", "silu", "swiglu_oai")
GATED_ACTIVATIONS = ("swiglu", "geglu", "swiglu_oai")
QK_NORMS = ("head", "proj")
ROUTERS = ("topk", "noisy_topk", "deepseek", "expert_choice", "top_p", "hash", "hierarchical", "sparsemixer")
SOFTMAX_ORDERS = ("softmax_topk", "topk_softmax")
SCORE_FUNCS = ("softmax", "sigmoid")
OVERFLOW_POLICIES = ("drop", "reroute")
CAPACITY_PRIORITIES = ("position", "score")
EXPERT_IMPLS = ("auto", "grouped_mm", "loop")
NORMS = ("rmsnorm", "layernorm")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(map(repr, allowed))}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}a finite number > 0, got {value!r}")


def _check_known_fields(cls: type, data: dict[str, Any]) -> None:
    """A from_dict's guard: every key of `data` names a field of the dataclass `cls`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}: expected a subset of {sorted(known)}")


@dataclass
class MoEConfig:
    """One MoE layer: router, experts, capacity, balancing and shared experts.

    Field groups follow the layer's path: sizes, experts, router, capacity, balancing, shared experts, execution.
    """

    # --- sizes ---
    d_model: int = 512  # hidden size of the token stream (the layer's input and output width)
    d_ff: int = 1024  # hidden width of ONE routed expert; fine-grained experts (DeepSeekMoE) just make this small
    num_experts: int = 8  # routed experts E
    top_k: int = 2  # experts per token K (max K for top_p; average experts per token for expert_choice)

    # --- experts ---
    activation: str = "swiglu"  # swiglu/geglu: gated 3-matrix (Mixtral, DeepSeek); relu/gelu/silu: 2-matrix (Switch)
    expert_bias: bool = False  # biases in expert projections (GPT-OSS, original Switch); most modern MoEs have none
    # swiglu_oai, GPT-OSS's clamped SwiGLU: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with
    # g = clamp(gate, max=limit); g * sigmoid(1.702 g) is the sigmoid approximation of GELU (Hendrycks & Gimpel 2016)
    swiglu_alpha: float = 1.702  # swiglu_oai only: sigmoid gain (1.702, the sigmoid approximation of GELU)
    swiglu_limit: float = 7.0  # swiglu_oai only: clamp bound of gate (above) and up (both sides), as GPT-OSS

    # --- router ---
    router: str = "topk"  # one of ROUTERS
    softmax_order: str = "softmax_topk"  # softmax over all E then top-k (Switch/Qwen/OLMoE) or top-k then softmax (Mixtral)
    norm_topk_prob: bool = True  # renormalise the k selected weights to sum to 1 (Mixtral, Qwen3; not Switch/OLMoE)
    topk_norm_p: float = 1.0  # norm_topk_prob divides by the k weights' p-norm: 1 = their sum; DBRX names p in
    #   moe_normalize_expert_weights (1 in the release)
    router_bias: bool = False  # a learned bias in the router projection (GPT-OSS)
    score_func: str = "softmax"  # deepseek router: sigmoid (V3) or softmax (V2) expert affinities
    n_group: int = 1  # deepseek/hierarchical: experts split into this many groups (devices/nodes in DeepSeek)
    topk_group: int = 1  # deepseek/hierarchical: groups a token may route into
    routed_scaling_factor: float = 1.0  # deepseek: routed output multiplied by this (V3: 2.5)
    top_p: float = 0.5  # top_p router: probability mass a token's experts must reach (Huang et al. 2024 use 0.4)
    noise_eps: float = 1e-2  # noisy_topk: floor added to the softplus noise std (Shazeer et al. 2017 code)
    hash_seed: int = 0  # hash router: seed of the fixed token-id -> expert hash
    selection_bias: bool = False  # per-expert bias added to scores only to choose experts (aux-loss-free balancing)
    bias_update_rate: float = 0.0  # gamma of the aux-loss-free update b_i += gamma*sign(mean_load - load_i); 0 = off
    sparsemixer_eps: float = 0.01  # sparsemixer router (PhiMoE's router_jitter_noise): a round's softmax keeps only
    #   experts whose logit is within a relative gap of 2 * eps of that round's best (Liu et al. 2024, SparseMixer)
    input_jitter_eps: float = 0.0  # training only: the router's input times U(1 - eps, 1 + eps) per element
    #   (Switch Transformer's multiplicative jitter; DBRX moe_jitter_eps, PhiMoE input_jitter_noise); 0 = off

    # --- capacity ---
    capacity_factor: float | None = None  # None = dropless; else C = ceil(cf * T * K / E) slots per expert
    overflow: str = "drop"  # what happens to slots over capacity: drop (residual carries them) or reroute
    # which tokens keep their experts when capacity runs out (within each choice rank): position = batch order
    # (Switch, GShard); score = batch prioritized routing, largest top combine weight first (V-MoE, Riquelme 2021)
    capacity_priority: str = "position"
    min_capacity: int = 1  # lower bound on C so tiny batches still route (GShard uses 4 in some configs)

    # --- load balancing losses (each computed whenever its coefficient is non-zero) ---
    aux_loss_coef: float = 0.0  # Switch/GShard  E * sum_i f_i P_i  (Switch uses 1e-2)
    cv2_loss_coef: float = 0.0  # Shazeer 2017 importance + load CV^2 (paper uses 0.1 for each)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss (paper uses 1e-3)
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss alpha (paper uses 1e-4)

    # --- shared experts ---
    num_shared_experts: int = 0  # always-on experts (DeepSeekMoE, Qwen2-MoE); run as one FFN of n * shared width
    shared_d_ff: int | None = None  # width of ONE shared expert; None = d_ff
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x . w_gate)

    # --- execution ---
    expert_impl: str = "auto"  # auto: torch._grouped_mm on GPUs that have it, a segment loop of torch.mm on CPU (faster there)
    checkpoint_experts: bool = False  # recompute expert activations in backward to save memory

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k", "n_group", "topk_group", "min_capacity"):
            _positive_int(name, getattr(self, name))
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("router", self.router, ROUTERS)
        _choice("softmax_order", self.softmax_order, SOFTMAX_ORDERS)
        _choice("score_func", self.score_func, SCORE_FUNCS)
        _choice("overflow", self.overflow, OVERFLOW_POLICIES)
        _choice("capacity_priority", self.capacity_priority, CAPACITY_PRIORITIES)
        _choice("expert_impl", self.expert_impl, EXPERT_IMPLS)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.capacity_factor is not None:
            if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float)) or not (
                math.isfinite(self.capacity_factor) and self.capacity_factor > 0
            ):
                raise ValueError(f"capacity_factor must be None (dropless) or a number > 0, got {self.capacity_factor!r}")
        if self.router in ("deepseek", "hierarchical"):
            if self.num_experts % self.n_group:
                raise ValueError(f"num_experts={self.num_experts} must be divisible by n_group={self.n_group}")
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
            per_group = self.num_experts // self.n_group
            if self.top_k > self.topk_group * per_group:
                raise ValueError(
                    f"top_k={self.top_k} exceeds the {self.topk_group * per_group} experts reachable in "
                    f"topk_group={self.topk_group} groups of {per_group}"
                )
        if self.router == "deepseek" and self.score_func == "sigmoid" and self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise ValueError("deepseek sigmoid routing scores a group by its top-2 experts: need >= 2 experts per group")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.hash_seed, bool) or not isinstance(self.hash_seed, int):
            raise ValueError(f"hash_seed must be an integer, got {self.hash_seed!r}")
        if self.router == "expert_choice" and self.overflow == "reroute" and self.capacity_factor is not None:
            raise ValueError("overflow='reroute' does not apply to expert_choice routing (experts pick tokens)")
        for name in ("aux_loss_coef", "cv2_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate", "noise_eps"):
            _non_negative(name, getattr(self, name))
        for name in ("swiglu_alpha", "swiglu_limit"):
            _positive(name, getattr(self, name))
        _non_negative("routed_scaling_factor", self.routed_scaling_factor)
        if self.routed_scaling_factor == 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        if self.shared_d_ff is not None:
            _positive_int("shared_d_ff", self.shared_d_ff)
        if self.bias_update_rate > 0 and not self.selection_bias:
            raise ValueError("bias_update_rate > 0 needs selection_bias=True (the bias it updates)")
        if self.selection_bias and self.router in ("hash", "expert_choice", "sparsemixer"):
            raise ValueError(f"selection_bias has no effect on the {self.router!r} router")
        _positive("topk_norm_p", self.topk_norm_p)
        _non_negative("sparsemixer_eps", self.sparsemixer_eps)
        _non_negative("input_jitter_eps", self.input_jitter_eps)
        if self.input_jitter_eps >= 1:
            got = self.input_jitter_eps
            raise ValueError(f"input_jitter_eps must be < 1 (the jitter factor stays positive), got {got!r}")
        if self.router == "sparsemixer" and self.top_k != 2:
            raise ValueError(f"the sparsemixer router picks exactly 2 experts per token, got top_k={self.top_k}")

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        _check_known_fields(cls, data)
        return cls(**data)


ROPE_TYPES = {  # rope_scaling["rope_type"] -> the keys it needs (HF spelling)
    "default": (),
    "linear": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


def _check_rope_scaling(scaling: Any) -> None:
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported: expected one of {sorted(ROPE_TYPES)}")
    missing = [key for key in ROPE_TYPES[kind] if scaling.get(key) is None]
    if missing:
        raise ValueError(f"rope_scaling {scaling} (type {kind!r}) lacks {missing}")
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = scaling[key]
            if not isinstance(factors, (list, tuple)) or not factors or any(
                isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in factors
            ):
                raise ValueError(f"rope_scaling {key} must be a non-empty list of numbers > 0, got {factors!r}")
        if len(scaling["short_factor"]) != len(scaling["long_factor"]):
            raise ValueError("rope_scaling short_factor and long_factor must have the same length (head_dim / 2)")
        has_mscales = scaling.get("short_mscale") is not None and scaling.get("long_mscale") is not None
        if not has_mscales and scaling.get("attention_factor") is None and scaling.get("factor") is None:
            raise ValueError(
                "longrope rope_scaling needs its attention factor: short_mscale and long_mscale (PhiMoE), "
                "attention_factor, or factor (max_position_embeddings / original_max_position_embeddings)"
            )


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, §2.1): keys and values are rebuilt per head
    from one small shared latent (what the KV cache keeps), and RoPE goes on a few extra decoupled dimensions.

    The query (and key) of a head is qk_nope_head_dim dims without position plus qk_rope_head_dim rotated ones; the
    rotated key dims are shared by all heads.
    """

    q_lora_rank: int | None = None  # low-rank query (V2: 1536, V3: 1536); None = one full-rank q_proj (V2-Lite)
    kv_lora_rank: int = 512  # width of the compressed key/value latent c_KV: what the cache stores per token (d_c)
    qk_nope_head_dim: int = 128  # per-head query/key dims without position (d_h)
    qk_rope_head_dim: int = 64  # decoupled rotary dims per head (d_h^R); the rotated key part is shared by all heads
    v_head_dim: int = 128  # per-head value width; need not equal the query/key width
    latent_norm_eps: float = 1e-6  # eps of the RMSNorms on the latents (transformers fixes 1e-6, not rms_norm_eps)

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive_int(name, getattr(self, name))
        if self.q_lora_rank is not None:
            _positive_int("q_lora_rank", self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        _positive("latent_norm_eps", self.latent_norm_eps)

    @property
    def qk_head_dim(self) -> int:
        """Width of one head's query and key: the unrotated plus the rotated dims."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MLAConfig":
        _check_known_fields(cls, data)
        return cls(**data)


@dataclass
class ModelConfig:
    """A decoder-only language model: attention blocks whose feed-forward is an MoE layer or a dense SwiGLU FFN.

    Which layers are MoE: none when `moe` is None; otherwise every layer not in `dense_layers` when that list is
    given, else layer i is MoE when i >= first_k_dense and (i - first_k_dense) % moe_every == 0 (see
    `is_moe_layer`); which attend within a sliding window: `window_of`. Fields left None are derived (`head_size`,
    `kv_heads`) so that `dataclasses.replace` of a size keeps them consistent.
    """

    # --- sizes ---
    vocab_size: int = 4096  # a small BPE vocabulary; the tokenizer sets the real value via dataclasses.replace
    d_model: int = 256  # width of the residual stream
    n_layers: int = 4
    n_heads: int = 4  # query heads
    n_kv_heads: int | None = None  # key/value heads (GQA, Ainslie et al. 2023); None = n_heads (multi-head)
    head_dim: int | None = None  # None = d_model // n_heads; must be even (RoPE rotates pairs of dimensions)
    max_seq_len: int = 256  # longest context: the RoPE table and the largest KV cache
    rope_theta: float = 10000.0  # RoPE base (Su et al. 2021); Mixtral uses 1e6 for long contexts
    rope_scaling: dict | None = None  # long-context RoPE: HF-style dict, rope_type default/linear/yarn/llama3/longrope
    #   (see moekit.layers.attention.rope_frequencies); None = plain RoPE
    norm_eps: float = 1e-5  # epsilon of the block and final norms (RMSNorm: Zhang & Sennrich 2019, as Llama/Mixtral)
    norm: str = "rmsnorm"  # "rmsnorm", or "layernorm" (mean subtracted, Ba et al. 2016: DBRX, PhiMoE)
    norm_bias: bool = False  # the LayerNorms have a bias too (PhiMoE; DBRX's have none); needs norm="layernorm"
    mla: MLAConfig | None = None  # multi-head latent attention (DeepSeek-V2/V3) instead of GQA; n_kv_heads and
    #   head_dim are then unused, and RoPE rotates only mla.qk_rope_head_dim dims

    # --- attention variants (defaults: Llama/Mixtral attention, which none of these change) ---
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2-MoE, GPT-OSS, OLMoE/Qwen3 attention_bias)
    o_bias: bool = False  # bias on the attention output projection (GPT-OSS)
    qk_norm: str | None = None  # RMSNorm of q and k before RoPE (training stability, OLMo/Qwen3): "head" = over
    #   each head's X dims (Qwen3-MoE), "proj" = over the whole projection, H*X for q, G*X for k (OLMoE); None = off
    clip_qkv: float | None = None  # clamp q, k, v to [-clip_qkv, clip_qkv] after the qk norm (OLMoE, DBRX)
    attn_sinks: bool = False  # one learned logit per head added to the softmax denominator: a head may attend to
    #   "nothing" (GPT-OSS; attention sinks, Xiao et al. 2023)
    sliding_window: int | None = None  # windowed layers let a query see itself and the W-1 keys before it
    #   (Mistral; GPT-OSS uses 128); None = full causal attention everywhere
    window_layers: list[int] | None = None  # the layers that use sliding_window; None = all (GPT-OSS: 0, 2, 4, ...)

    # --- feed-forward ---
    dense_d_ff: int = 768  # hidden width of the dense SwiGLU FFN layers (the dense baseline, first_k_dense layers)
    moe: MoEConfig | None = None  # the MoE layer config; None = every layer dense
    first_k_dense: int = 0  # the first k layers stay dense (DeepSeekMoE/V3: early layers balance poorly)
    moe_every: int = 1  # MoE on every n-th layer from first_k_dense (2 = every other layer, Switch/GShard)
    dense_layers: list[int] | None = None  # explicit dense layers, any pattern (Qwen-MoE mlp_only_layers and
    #   decoder_sparse_step); when set, first_k_dense and moe_every must keep their defaults

    # --- embeddings and init ---
    tie_embeddings: bool = False  # share the token embedding with the output head (Press & Wolf 2017)
    lm_head_bias: bool = False  # a bias on the output head (PhiMoE)

    # --- scaling constants (muP-style, Granite: Yang et al. 2022); the defaults change nothing ---
    embedding_multiplier: float = 1.0  # token embeddings are multiplied by this (Granite-3.0: 12)
    residual_multiplier: float = 1.0  # each attention / FFN output is multiplied by this before the residual add
    #   (Granite-3.0: 0.22)
    attention_multiplier: float | None = None  # the softmax scale of q.k; None = 1/sqrt(head_dim) (Granite: 1/64)
    logits_scaling: float = 1.0  # the output logits are divided by this (Granite-3.0: 6)
    init_std: float = 0.02  # std of the normal init of every weight matrix (GPT-2); output projections / sqrt(2L)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if isinstance(self.mla, dict):
            self.mla = MLAConfig.from_dict(self.mla)
        if self.mla is not None and not isinstance(self.mla, MLAConfig):
            raise ValueError(f"mla must be an MLAConfig, a dict of its fields, or None; got {type(self.mla).__name__}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "dense_d_ff", "moe_every"):
            _positive_int(name, getattr(self, name))
        for name in ("n_kv_heads", "head_dim"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.mla is None and self.head_dim is None and self.d_model % self.n_heads:  # (GQA's head shape)
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: set head_dim explicitly"
            )
        if self.mla is None and self.head_size % 2:
            raise ValueError(f"head_dim={self.head_size} must be even (RoPE rotates pairs of dimensions)")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads} (GQA groups)")
        for name in ("rope_theta", "norm_eps", "init_std", "embedding_multiplier", "residual_multiplier",
                     "logits_scaling"):
            _positive(name, getattr(self, name))
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        _choice("norm", self.norm, NORMS)
        if self.norm_bias is True and self.norm != "layernorm":
            raise ValueError(f"norm_bias=True needs norm='layernorm' (an RMSNorm has no bias), got norm={self.norm!r}")
        a = self.attention_multiplier
        if a is not None:
            _positive("attention_multiplier", a, allow_none=True)
            if self.mla is not None:
                raise ValueError("attention_multiplier is not supported with mla (MLA sets its own softmax scale)")
        k = self.first_k_dense
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.n_layers:
            raise ValueError(f"first_k_dense must be an integer in [0, n_layers={self.n_layers}], got {k!r}")
        if self.qk_norm is not None:
            _choice("qk_norm", self.qk_norm, QK_NORMS)
        _positive("clip_qkv", self.clip_qkv, allow_none=True)
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if self.window_layers is not None:
            if self.sliding_window is None:
                raise ValueError("window_layers is set but sliding_window is None (the window those layers use)")
            self.window_layers = self._layer_list("window_layers", self.window_layers)
        if self.dense_layers is not None:
            if self.first_k_dense != 0 or self.moe_every != 1:
                raise ValueError(
                    "dense_layers lists the dense layers explicitly: leave first_k_dense=0 and moe_every=1 "
                    f"(got {self.first_k_dense} and {self.moe_every})"
                )
            self.dense_layers = self._layer_list("dense_layers", self.dense_layers)
        for name in ("qkv_bias", "o_bias", "attn_sinks", "norm_bias", "lm_head_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                got = type(self.moe).__name__
                raise ValueError(f"moe must be a MoEConfig, a dict of its fields, or None; got {got}")
            if self.moe.d_model != self.d_model:
                raise ValueError(f"moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")
            if not any(self.is_moe_layer(i) for i in range(self.n_layers)):
                raise ValueError(
                    f"moe is set but no layer is MoE: first_k_dense={self.first_k_dense}, "
                    f"dense_layers={self.dense_layers} of n_layers={self.n_layers}"
                )

    def _layer_list(self, name: str, layers: Any) -> list[int]:
        """A list of distinct layer indices in [0, n_layers), sorted (a tuple or any order is accepted)."""
        if not isinstance(layers, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers for i in layers
        ):
            raise ValueError(f"{name} must be a list of layer indices in [0, n_layers={self.n_layers}), got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"{name} lists a layer twice: {layers!r}")
        return sorted(layers)

    @property
    def head_size(self) -> int:
        """Width of one attention head: head_dim, or d_model // n_heads when head_dim is None."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Width of the RoPE tables: the head width, or MLA's decoupled rotary dims."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_size

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads: n_kv_heads, or n_heads when n_kv_heads is None."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i (0-based) uses the MoE feed-forward: not in dense_layers when that is given, else
        i >= first_k_dense and every moe_every-th layer from there."""
        if not 0 <= i < self.n_layers:
            raise ValueError(f"layer index {i} out of range for n_layers={self.n_layers}")
        if self.moe is None:
            return False
        if self.dense_layers is not None:
            return i not in self.dense_layers
        return i >= self.first_k_dense and (i - self.first_k_dense) % self.moe_every == 0

    def window_of(self, i: int) -> int | None:
        """The sliding-window span of layer i's attention, or None for full causal attention."""
        if not 0 <= i < self.n_layers:
            raise ValueError(f"layer index {i} out of range for n_layers={self.n_layers}")
        if self.sliding_window is None or (self.window_layers is not None and i not in self.window_layers):
            return None
        return self.sliding_window

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable fields; `moe` and `mla` become nested dicts (or None)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict`. Raises ValueError on unknown keys (here or in the nested `moe`/`mla` dicts)."""
        _check_known_fields(cls, data)
        data = dict(data)
        if isinstance(data.get("moe"), dict):
            data["moe"] = MoEConfig.from_dict(data["moe"])
        if isinstance(data.get("mla"), dict):
            data["mla"] = MLAConfig.from_dict(data["mla"])
        return cls(**data)


POOLINGS = ("cls", "mean")


@dataclass
class VisionConfig:
    """A vision transformer whose feed-forward blocks are MoE layers on some layers (V-MoE, Riquelme et al. 2021).

    Images are cut into patch_size x patch_size patches, each linearly embedded (a strided convolution), a class
    token prepended (pool="cls") and learned position embeddings added (ViT, Dosovitskiy et al. 2021); pre-norm
    blocks with bidirectional attention follow. Layer i is MoE when `moe` is set and i % moe_every == moe_every - 1
    (V-MoE's "every other layer": 1, 3, 5, ...).
    """

    image_size: int = 32  # square images, image_size x image_size pixels
    patch_size: int = 4  # divides image_size; (image_size / patch_size)^2 patch tokens
    channels: int = 3
    num_classes: int = 10
    d_model: int = 192
    n_layers: int = 6
    n_heads: int = 3
    dense_d_ff: int = 768  # hidden width of the dense GELU MLPs (ViT: 4 * d_model)
    moe: MoEConfig | None = None  # the MoE layer config; None = a dense ViT
    moe_every: int = 2  # MoE on layers moe_every-1, 2*moe_every-1, ... (V-MoE: every other layer)
    pool: str = "cls"  # "cls": classify the class token (ViT); "mean": average the patch tokens
    norm_eps: float = 1e-6  # LayerNorm epsilon (ViT)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        for name in ("image_size", "patch_size", "channels", "num_classes", "d_model", "n_layers", "n_heads",
                     "dense_d_ff", "moe_every"):
            _positive_int(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        _choice("pool", self.pool, POOLINGS)
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise ValueError(
                    f"moe must be a MoEConfig, a dict of its fields, or None; got {type(self.moe).__name__}"
                )
            if self.moe.d_model != self.d_model:
                raise ValueError(f"moe.d_model={self.moe.d_model} must equal d_model={self.d_model}")
            if self.moe.router == "hash":
                raise ValueError("the hash router needs token ids; image patches have none: choose another router")
            if self.moe.seq_aux_loss_coef:
                raise ValueError("seq_aux_loss_coef (DeepSeek-V3's sequence-wise loss) is for language models")
        for name in ("norm_eps", "init_std"):
            _positive(name, getattr(self, name))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer % self.moe_every == self.moe_every - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VisionConfig":
        _check_known_fields(cls, data)
        return cls(**data)
