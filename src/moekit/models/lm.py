"""A decoder-only Mixture-of-Experts language model (Mixtral / DeepSeekMoE / Switch shaped), with a KV cache.

Legend: B batch, S sequence (the chunk being run), D model dim, V vocabulary, L layers.

Reading order is data order: `Block` (RMSNorm -> causal GQA attention with RoPE -> residual -> RMSNorm -> MoE or
dense SwiGLU FFN -> residual), then `MoELM` (embedding -> blocks -> RMSNorm -> output head, losses). The layout
matches Llama/Mixtral (pre-norm, no biases, RoPE "rotate half"), so a Mixtral checkpoint maps onto it by renaming
and restacking weights; `tests/models/test_lm.py` holds the logits to `transformers.MixtralForCausalLM`. With
`config.mla` set, the attention is DeepSeek's multi-head latent attention instead (layers/mla.py; parameters
`blocks.{i}.attn.{q_proj | q_a_proj, q_a_norm, q_b_proj}`, `kv_a_proj`, `kv_a_norm`, `kv_b_proj`, `o_proj`).
Other opt-in variants (ModelConfig): LayerNorm instead of RMSNorm, with or without a bias (DBRX, PhiMoE); a bias on
the output head (PhiMoE); Granite's constants: embeddings times `embedding_multiplier`, each sub-layer's output times
`residual_multiplier` before the residual add, attention scale `attention_multiplier`, logits / `logits_scaling`.

Parameter names (for checkpoint conversion): `embed.weight`; `blocks.{i}.attn_norm.weight`,
`blocks.{i}.attn.qkv_proj.weight` (rows: q heads, k heads, v heads), `blocks.{i}.attn.o_proj.weight` (+ `.bias`
of either, `attn.q_norm.weight`, `attn.k_norm.weight`, `attn.sinks` where the config asks for them),
`blocks.{i}.ffn_norm.weight`, then either the MoE layer's `blocks.{i}.ffn.router.weight`,
`blocks.{i}.ffn.experts.w_in` [E, D, 2F] (gate | up), `blocks.{i}.ffn.experts.w_out` [E, F, D] (+ shared experts)
or the dense `blocks.{i}.ffn.w_in.weight` [2F, D] (gate rows, then up), `blocks.{i}.ffn.w_out.weight`; `norm.weight`,
`lm_head.weight` (the same tensor as `embed.weight` when tied); the norms' and the head's `.bias` where configured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.layers.attention import (
    Attention,
    KVCache,
    RMSNorm,
    attention_mask,
    longrope_switch,
    make_norm,
    rope_tables,
)
from moekit.layers import kernels
from moekit.layers.experts import FFN, Experts
from moekit.layers.mla import MultiHeadLatentAttention
from moekit.layers.moe import MoE, MoEStats, collect_stats
from moekit.layers.routing import Router


@dataclass
class LMOutput:
    """What one forward of the language model returns.

    Attributes:
        logits: [B, S, V].
        loss: ce_loss + aux_loss, or None without targets.
        ce_loss: mean next-token cross-entropy over targets != -100 (float32), or None without targets.
        aux_loss: 0-d float32 tensor, the sum of every MoE layer's weighted balance losses of this forward.
    """

    logits: Tensor
    loss: Tensor | None
    ce_loss: Tensor | None
    aux_loss: Tensor


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then h + ffn(norm(h)), the FFN an MoE layer or dense.

    Args:
        config: the model config.
        layer_idx: this block's index; `config.is_moe_layer(layer_idx)` picks the feed-forward.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = make_norm(config.norm, config.d_model, config.norm_eps, config.norm_bias)
        if config.mla is not None:  # DeepSeek-V2/V3's multi-head latent attention
            self.attn = MultiHeadLatentAttention(config.d_model, config.n_heads, config.mla, config.rope_scaling)
        else:
            self.attn = Attention(
                config.d_model, config.n_heads, config.kv_heads, config.head_size, qkv_bias=config.qkv_bias,
                o_bias=config.o_bias, qk_norm=config.qk_norm, norm_eps=config.norm_eps, clip_qkv=config.clip_qkv,
                sinks=config.attn_sinks, scale=config.attention_multiplier,
            )  # fmt: skip
        self.window = config.window_of(layer_idx)  # sliding-window span, or None (the mask MoELM passes says so)
        self.ffn_norm = make_norm(config.norm, config.d_model, config.norm_eps, config.norm_bias)
        self.residual_multiplier = config.residual_multiplier  # Granite: sub-layer outputs scaled before the add
        self.is_moe = config.is_moe_layer(layer_idx)
        self.ffn = MoE(config.moe) if self.is_moe else FFN(config.d_model, config.dense_d_ff, "swiglu")

    def forward(
        self,
        x_BSD: Tensor,
        cos_SX: Tensor,
        sin_SX: Tensor,
        token_ids_BS: Tensor,
        pad_mask_BS: Tensor | None,
        kv_cache: tuple[Tensor, Tensor] | None,
        start_pos: int,
        attn_mask: Tensor | None,
    ) -> Tensor:
        """[B, S, D] -> [B, S, D]; see `Attention.forward` and `MoE.forward` for the arguments."""
        a_BSD = self.attn(self.attn_norm(x_BSD), cos_SX, sin_SX, kv_cache, start_pos, attn_mask)
        h_BSD = x_BSD + self._scaled(a_BSD)
        if self.is_moe:  # token ids feed the hash router; the padding mask keeps padding out of routing and losses
            f_BSD = self.ffn(self.ffn_norm(h_BSD), token_ids=token_ids_BS, mask=pad_mask_BS)
        else:
            f_BSD = self.ffn(self.ffn_norm(h_BSD))
        return h_BSD + self._scaled(f_BSD)

    def _scaled(self, y_BSD: Tensor) -> Tensor:
        return y_BSD if self.residual_multiplier == 1.0 else y_BSD * self.residual_multiplier


IGNORE_INDEX = -100  # targets that count for nothing (padding), as in F.cross_entropy


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits [N, V] over the targets that are not IGNORE_INDEX, in C++ (layers/kernels): one
    pass over the logits computes each row's logsumexp and, when the logits need a gradient, writes the row's
    gradient (softmax minus one-hot, over the count) while the row is still in cache; the backward only scales it by
    the incoming gradient (nothing at all for the usual 1.0). `F.cross_entropy` takes log_softmax, its backward and
    the one-hot gradient's zero-fill: ~22 ms of a tiny-mixtral training step where this takes ~5."""

    @staticmethod
    def forward(ctx, logits_NV: Tensor, targets_N: Tensor) -> Tensor:  # type: ignore[override]
        total, count, grad_NV = kernels.cpu_kernels().cross_entropy_forward(
            logits_NV, targets_N, IGNORE_INDEX, ctx.needs_input_grad[0]
        )
        ctx.save_for_backward(grad_NV)
        return (total / count).to(logits_NV.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (grad_NV,) = ctx.saved_tensors
        scale = float(grad)
        return (grad_NV if scale == 1.0 else grad_NV * scale), None


def cross_entropy(logits_NV: Tensor, targets_N: Tensor) -> Tensor:
    """F.cross_entropy(logits, targets, ignore_index=-100) (mean over the counted targets; NaN if none), fused on
    float32 CPU tensors (layers/kernels)."""
    if (
        logits_NV.dim() == 2 and logits_NV.is_contiguous() and targets_N.dtype == torch.int64
        and kernels.usable(logits_NV)
    ):  # fmt: skip
        return _CrossEntropy.apply(logits_NV, targets_N.contiguous())
    return F.cross_entropy(logits_NV, targets_N, ignore_index=IGNORE_INDEX)


class MoELM(nn.Module):
    """Decoder-only language model: embedding -> n_layers Blocks -> RMSNorm -> output head.

    Args:
        config: the ModelConfig (which layers are MoE, sizes, init).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps, config.norm_bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # [max_seq_len, X] (MLA: its rotary dims). LongRoPE reaching past its original context has a second pair of
        # tables, used for a whole forward once the sequence is longer than that (the Phi-3 / PhiMoE reference).
        for name, table in self._rope_buffers().items():
            self.register_buffer(name, table, persistent=False)
        self.reset_parameters()

    def _rope_buffers(self) -> dict[str, Tensor | None]:
        cfg = self.config
        args = (cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        switch = longrope_switch(cfg.rope_scaling, cfg.max_seq_len)
        cos, sin = rope_tables(cfg.max_seq_len if switch is None else switch, *args)  # longrope: the short factors
        long_cos = long_sin = None
        if switch is not None:
            long_cos, long_sin = rope_tables(cfg.max_seq_len, *args, seq_len=cfg.max_seq_len)
        return {"rope_cos": cos, "rope_sin": sin, "rope_cos_long": long_cos, "rope_sin_long": long_sin}

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the buffers no checkpoint stores (RoPE tables, MoE step loads) on `device` (default: the
        embedding's), e.g. after building the model on the meta device and loading its weights with assign=True."""
        device = self.embed.weight.device if device is None else device
        for name, table in self._rope_buffers().items():
            setattr(self, name, None if table is None else table.to(device))
        for module in self.modules():
            if isinstance(module, MoE):
                module.step_load = torch.zeros_like(module.step_load, device=device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init (Radford et al. 2019): every matrix ~ N(0, init_std), the projections that write into the
        residual stream (attention output, FFN and expert down projections) scaled by 1/sqrt(2 * n_layers) so the
        residual's variance does not grow with depth; biases 0, norms 1. Routers get N(0, init_std) too.
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                nn.init.normal_(module.w_in, 0.0, std)
                nn.init.normal_(module.w_out, 0.0, out_std)
                for bias in (module.b_in, module.b_out):
                    if bias is not None:
                        nn.init.zeros_(bias)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                if getattr(module, "group_weight", None) is not None:  # hierarchical router's group level
                    nn.init.normal_(module.group_weight, 0.0, std)
        for block in self.blocks:
            nn.init.normal_(block.attn.o_proj.weight, 0.0, out_std)
            if getattr(block.attn, "sinks", None) is not None:
                nn.init.zeros_(block.attn.sinks)
            dense = block.ffn if isinstance(block.ffn, FFN) else block.ffn.shared_experts
            if dense is not None:
                nn.init.normal_(dense.w_out.weight, 0.0, out_std)

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int = 0,
        mask: Tensor | None = None,
    ) -> LMOutput:
        """Run a chunk of tokens; with targets, also the losses.

        Args:
            input_ids: [B, S] int64 token ids, at positions start_pos .. start_pos+S-1.
            targets: [B, S] int64 next-token ids, -100 where no loss is wanted (e.g. padding); None = no loss.
            cache: a KVCache from `new_cache`: the chunk's keys/values are written at start_pos.. and the chunk
                attends to every cached position before it. None = attend within the chunk only.
            start_pos: position of the first token (RoPE; where the cache is written and read up to).
            mask: [B, S] bool, True for real tokens. Padding is not attended to (as a key), not routed, and not
                counted in MoE losses/statistics. Targets at padding are NOT masked for you: set them to -100.
        Returns:
            LMOutput(logits [B, S, V], loss, ce_loss, aux_loss). ce_loss is NaN if every target is -100.
        """
        logits_BSV = self.logits(self.hidden_states(input_ids, cache, start_pos, mask))
        aux_loss = self._aux_loss(logits_BSV.device)
        if targets is None:
            return LMOutput(logits_BSV, None, None, aux_loss)
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(input_ids.shape)} (input_ids)")
        ce_loss = cross_entropy(logits_BSV.flatten(0, 1).float(), targets.flatten())
        return LMOutput(logits_BSV, ce_loss + aux_loss, ce_loss, aux_loss)

    def logits(self, hidden_BSD: Tensor) -> Tensor:
        """The output head on final hidden states [..., D] -> logits [..., V] (divided by config.logits_scaling)."""
        logits = self.lm_head(hidden_BSD)
        scaling = self.config.logits_scaling
        return logits if scaling == 1.0 else logits / scaling

    def hidden_states(
        self, input_ids: Tensor, cache: KVCache | None = None, start_pos: int = 0, mask: Tensor | None = None
    ) -> Tensor:
        """The final normalised hidden states [B, S, D] (the forward without the output head and losses)."""
        B, S = self._check_input(input_ids, cache, start_pos, mask)
        x_BSD = self.embed(input_ids)
        if self.config.embedding_multiplier != 1.0:
            x_BSD = x_BSD * self.config.embedding_multiplier
        cos, sin = self.rope_cos, self.rope_sin
        if self.rope_cos_long is not None and start_pos + S > cos.shape[0]:  # longrope past its original context
            cos, sin = self.rope_cos_long, self.rope_sin_long
        cos_SX, sin_SX = cos[start_pos : start_pos + S], sin[start_pos : start_pos + S]
        # With a cache and start_pos > 0 the chunk also attends to the cached positions 0..start_pos-1.
        num_keys = start_pos + S if cache is not None and start_pos > 0 else S
        key_mask_BL = mask if cache is None else cache.write_mask(start_pos, mask, S)  # [B, num_keys] or None
        attn_mask = attention_mask(S, num_keys, key_mask_BL, input_ids.device)
        window = self.config.sliding_window
        if window is not None:  # the windowed layers' mask (the cache keeps every position; the mask limits reach)
            window_mask = attention_mask(S, num_keys, key_mask_BL, input_ids.device, window)
        for i, block in enumerate(self.blocks):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            layer_mask = attn_mask if block.window is None else window_mask
            x_BSD = block(x_BSD, cos_SX, sin_SX, input_ids, mask, kv, start_pos, layer_mask)
        if cache is not None:
            cache.length = start_pos + S
        return self.norm(x_BSD)

    def _check_input(self, input_ids: Tensor, cache: KVCache | None, start_pos: int, mask: Tensor | None):
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            got = f"{tuple(input_ids.shape)} {input_ids.dtype}"
            raise ValueError(f"input_ids must be a [B, S] integer tensor, got {got}")
        B, S = input_ids.shape
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos must be an integer >= 0, got {start_pos!r}")
        if start_pos + S > self.config.max_seq_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + S - 1} exceed max_seq_len={self.config.max_seq_len}"
            )
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds batch size {cache.batch_size}, input_ids has {B}")
            if start_pos + S > cache.max_len:
                raise ValueError(f"positions up to {start_pos + S} do not fit the cache's max_len={cache.max_len}")
        if mask is not None and (mask.shape != input_ids.shape or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a [B, S] bool tensor like input_ids, got {tuple(mask.shape)} {mask.dtype}")
        return B, S

    def _aux_loss(self, device: torch.device) -> Tensor:
        """Sum of the weighted balance losses that this forward's MoE layers attached to `.last`."""
        losses = [block.ffn.last.aux_loss for block in self.blocks if block.is_moe]
        if not losses:
            return torch.zeros((), device=device)
        return torch.stack(losses).sum().float()

    # --- analysis ---

    def num_params(self) -> int:
        """Total parameters (a tied embedding/head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _routed_params(self) -> list[tuple[int, float]]:
        """Per MoE layer: (routed expert parameters, fraction active per token = top_k / num_experts)."""
        out = []
        for block in self.blocks:
            if block.is_moe:
                moe_cfg = block.ffn.config
                routed = sum(p.numel() for p in block.ffn.experts.parameters())
                out.append((routed, moe_cfg.top_k / moe_cfg.num_experts))
        return out

    def active_params(self) -> int:
        """Parameters a token uses: everything except the routed experts, which count top_k / num_experts of
        theirs (the Mixtral "active parameters" convention: embedding and output head included). For top-p
        routing top_k is the maximum, for expert choice the average.
        """
        routed = self._routed_params()
        return round(self.num_params() - sum(n for n, _ in routed) + sum(n * frac for n, frac in routed))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at context length seq_len.

        2 * (active matrix parameters) + 2 * n_layers * seq_len * n_heads * head_dim * 2: a multiply-add per
        weight (the embedding lookup is free, the output head is not; norms and biases are ignored), plus QK^T and
        AV over seq_len keys, without halving for the causal mask (Kaplan et al. 2020, Table 1; PaLM, Chowdhery et
        al. 2022, Appendix B; training is about 3x this). With MLA, head_dim * 2 becomes qk_head_dim + v_head_dim,
        and the key/value decompression counts once per token (its weights are among the matrices), as in prefill.
        """
        cfg = self.config
        matrices = sum(p.numel() for p in self.parameters() if p.dim() >= 2)
        if not cfg.tie_embeddings:
            matrices -= self.embed.weight.numel()
        matrices -= sum(n * (1 - frac) for n, frac in self._routed_params())
        if cfg.mla is not None:  # MLA: scores over N + R dims, values V wide (decompression is in `matrices`)
            attention = 2 * cfg.n_layers * seq_len * cfg.n_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim)
        else:
            attention = 2 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_size * 2
        return 2 * matrices + attention

    def moe_stats(self) -> list[MoEStats]:
        """The last forward's statistics of every MoE layer, in layer order (`collect_stats(self)`)."""
        return collect_stats(self)

    # --- inference ---

    def new_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty KV cache for batch_size sequences of up to max_len positions (<= max_seq_len).

        device and dtype default to the model's.
        """
        cfg = self.config
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
        weight = self.embed.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        if cfg.mla is not None:  # the latent and the shared rotated key, one "head" each (see layers/mla.py)
            return KVCache(cfg.n_layers, batch_size, 1, max_len, cfg.mla.kv_lora_rank, device=device, dtype=dtype,
                           v_head_dim=cfg.mla.qk_rope_head_dim)
        return KVCache(cfg.n_layers, batch_size, cfg.kv_heads, max_len, cfg.head_size, device=device, dtype=dtype)

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """Sample a continuation with the KV cache: `moekit.generate.generate(self, ...)` (see there)."""
        from moekit.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)
