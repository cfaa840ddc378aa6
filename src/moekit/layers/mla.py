"""Multi-head latent attention (MLA, DeepSeek-V2: arXiv 2405.04434, §2.1), as DeepSeek-V2 and V3 use it.

Legend: B batch, S new tokens (the chunk being run), L keys attended (cached + new), D model dim, H heads,
C kv_lora_rank (the latent), Q q_lora_rank, N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim.

Keys and values are not projected per head from x but decompressed from one small latent per token,
c_KV = RMSNorm(x W_DKV) [C] (eq. 9), with k^C, v = c_KV W_UK, c_KV W_UV (eq. 10-11); the query is low-rank too when
q_lora_rank is set (eq. 12-13). RoPE cannot pass through the decompression, so it is "decoupled" (eq. 14-19): each
head's query gets R extra rotated dims, and the key gets R rotated dims computed from x once and shared by all
heads. A head attends with [q^C; q^R] . [k^C; k^R] over N + R dims, scale 1/sqrt(N + R) (times the YaRN mscale²
when the RoPE is YaRN-scaled with mscale_all_dim, as DeepSeek's code does), and reads V-wide values.

The KV cache keeps what the paper says to keep: the normalised latent c_KV (in the cache's k, [B, 1, L, C]) and the
rotated shared key k^R (in its v, [B, 1, L, R]), C + R values per token instead of 2·H·(N+R). A decoding step (up
to 16 new tokens over a cached prefix, without autograd) never decompresses them: W_UK is folded into the query and
W_UV applied after the attention, the paper's inference form (`_absorbed`); prefill and training run the plain form.

RoPE is applied in the "rotate half" layout like everywhere in moekit. DeepSeek's checkpoints rotate interleaved
pairs (V2's complex multiply, V3's rope_interleave); since a query and key are rotated alike and only their dot
product matters, moekit permutes the rotary rows of the query and latent projections once at import (hf/deepseek.py)
instead of permuting activations at every step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.config import MLAConfig
from moekit.layers.attention import RMSNorm, apply_rope, causal_attention, sdpa


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1) (Peng et al. 2023)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(qk_head_dim: int, rope_scaling: dict | None) -> float:
    """1/sqrt(N + R), times mscale(factor, mscale_all_dim)² under a scaled RoPE that sets mscale_all_dim.

    DeepSeek-V2/V3 (their modeling code and transformers' `yarn_apply_mscale`): the rotary tables are multiplied by
    mscale/mscale_all_dim, and the whole score by mscale_all_dim's factor squared, so the unrotated dims are
    tempered too.
    """
    scale = qk_head_dim**-0.5
    if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
        m_all = rope_scaling.get("mscale_all_dim")
        if m_all:
            scale *= yarn_mscale(float(rope_scaling["factor"]), m_all) ** 2
    return scale


class MultiHeadLatentAttention(nn.Module):
    """Causal multi-head latent attention with decoupled RoPE and a latent KV cache.

    Args:
        d_model: D.
        n_heads: H.
        config: the MLAConfig (ranks and head widths).
        rope_scaling: the model's rope_scaling dict (the softmax scale depends on YaRN's mscale_all_dim).
    """

    def __init__(self, d_model: int, n_heads: int, config: MLAConfig, rope_scaling: dict | None = None) -> None:
        super().__init__()
        self.n_heads, self.config = n_heads, config
        N, R, V, C = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, n_heads * (N + R), bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, config.q_lora_rank, bias=False)  # W_DQ
            self.q_a_norm = RMSNorm(config.q_lora_rank, config.latent_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, n_heads * (N + R), bias=False)  # W_UQ | W_QR
        self.kv_a_proj = nn.Linear(d_model, C + R, bias=False)  # W_DKV | W_KR
        self.kv_a_norm = RMSNorm(C, config.latent_norm_eps)
        self.kv_b_proj = nn.Linear(C, n_heads * (N + V), bias=False)  # per head: W_UK rows, then W_UV rows
        self.o_proj = nn.Linear(n_heads * V, d_model, bias=False)
        self.scale = mla_softmax_scale(N + R, rope_scaling)

    def forward(
        self,
        x_BSD: Tensor,
        cos_SR: Tensor,
        sin_SR: Tensor,
        kv_cache: tuple[Tensor, Tensor] | None = None,
        start_pos: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from the chunk's tokens to themselves and, with a cache, to every earlier cached position.

        Args:
            x_BSD: [B, S, D] normalised hidden states of the chunk.
            cos_SR, sin_SR: [S, R] RoPE tables at the chunk's positions.
            kv_cache: this layer's (latent [B, 1, max_len, C], rotated key [B, 1, max_len, R]) cache tensors,
                written in place; None = no cache.
            start_pos: position of the chunk's first token.
            mask: from `attention_mask` (None = causal over the chunk, or all keys for a single cached token).
        Returns:
            [B, S, D].
        """
        B, S, _ = x_BSD.shape
        H, cfg = self.n_heads, self.config
        N, R, V, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            q_BSHK = self.q_proj(x_BSD).view(B, S, H, N + R)
        else:
            q_BSHK = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD))).view(B, S, H, N + R)
        q_nope_BSHN, q_rope_BSHR = q_BSHK.split([N, R], dim=-1)
        latent_BSC, k_rope_BSR = self.kv_a_proj(x_BSD).split([C, R], dim=-1)
        latent_BSC = self.kv_a_norm(latent_BSC)
        q_rope_BSHR = apply_rope(q_rope_BSHR, cos_SR, sin_SR)
        k_rope_BSR = apply_rope(k_rope_BSR[:, :, None], cos_SR, sin_SR)[:, :, 0]
        if kv_cache is not None:
            latent_cache, k_rope_cache = kv_cache
            latent_cache[:, 0, start_pos : start_pos + S] = latent_BSC
            k_rope_cache[:, 0, start_pos : start_pos + S] = k_rope_BSR
            if start_pos > 0:  # attend over the cached prefix too
                latent_BSC = latent_cache[:, 0, : start_pos + S]
                k_rope_BSR = k_rope_cache[:, 0, : start_pos + S]
        L = latent_BSC.shape[1]
        is_causal = mask is None and L == S and S > 1
        if S < L and S <= _ABSORB_MAX_NEW and not torch.is_grad_enabled():  # decoding over a cached prefix
            out_BHSV = self._absorbed(q_nope_BSHN, q_rope_BSHR, latent_BSC, k_rope_BSR, mask)
        else:
            k_nope_BLHN, v_BLHV = self.kv_b_proj(latent_BSC).view(B, L, H, N + V).split([N, V], dim=-1)
            k_BHLK = _heads_with_rope(k_nope_BLHN, k_rope_BSR)
            q_BHSK = _heads_with_rope(q_nope_BSHN, q_rope_BSHR)
            v_BHLV = v_BLHV.transpose(1, 2)
            if is_causal:  # the C++ kernel on short float32 CPU chunks, else SDPA
                out_BHSV = causal_attention(q_BHSK, k_BHLK, v_BHLV, self.scale)
            else:
                out_BHSV = sdpa(q_BHSK, k_BHLK, v_BHLV, attn_mask=mask, scale=self.scale)
        return self.o_proj(out_BHSV.transpose(1, 2).reshape(B, S, H * V))

    def _absorbed(
        self, q_nope_BSHN: Tensor, q_rope_BSHR: Tensor, latent_BLC: Tensor, k_rope_BLR: Tensor, mask: Tensor | None
    ) -> Tensor:
        """The same attention with W_UK folded into the queries and W_UV applied after it (DeepSeek-V2 §2.1.2's
        inference form): q^C . (c_KV W_UK^h) = (q^C W_UK^h^T) . c_KV, and sum_l p_l (c_l W_UV^h) = (sum_l p_l c_l)
        W_UV^h. Every head then attends over the shared [c_KV; k^R] (C + R dims) with the latents as values, so a
        decoding step costs O(L (C + R)) per head instead of decompressing all L cached latents (O(L C H (N + V))).
        Returns [B, H, S, V]; equal to the plain form up to float rounding (tested).
        """
        H, cfg = self.n_heads, self.config
        N, V, C = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        B, S, L = q_nope_BSHN.shape[0], q_nope_BSHN.shape[1], latent_BLC.shape[1]
        w_uk_HNC, w_uv_HVC = self.kv_b_proj.weight.view(H, N + V, C).split([N, V], dim=1)
        q_lat_BHSC = torch.einsum("bshn,hnc->bhsc", q_nope_BSHN, w_uk_HNC)
        # Batched matmuls with the heads folded into the rows against the one key "head" [c_KV; k^R] that all H
        # share, its two parts scored separately (no per-step concatenation of the cache). SDPA's GQA path would
        # copy the shared key and value H times (measured 10x slower than this at DeepSeek-V3's widths).
        scores_BXL = torch.bmm(q_lat_BHSC.reshape(B, H * S, C), latent_BLC.transpose(1, 2))  # X = H * S
        q_rope_BXR = q_rope_BSHR.transpose(1, 2).reshape(B, H * S, -1)
        scores_BXL.baddbmm_(q_rope_BXR, k_rope_BLR.transpose(1, 2))
        scores_BHSL = scores_BXL.view(B, H, S, L).float().mul_(self.scale)
        if mask is not None:  # bool [S, L] or [B, 1, S, L] from `attention_mask`: False = not attended
            scores_BHSL = scores_BHSL.masked_fill(~mask, float("-inf"))
        p_BHSL = torch.softmax(scores_BHSL, dim=-1).to(latent_BLC.dtype)
        out_BHSC = torch.bmm(p_BHSL.view(B, H * S, L), latent_BLC).view(B, H, S, C)
        return torch.einsum("bhsc,hvc->bhsv", out_BHSC, w_uv_HVC)


# New tokens per call up to which a forward over a cached prefix attends in the latent space. Per query that costs
# H L (2C + R) multiply-adds against the plain form's H L (N + R + V), but saves decompressing the L cached latents
# (L C H (N + V)) once per call: at DeepSeek-V3's widths the break-even is ~170 new tokens, and the absorbed form
# holds an [H S, L] float32 score matrix, so it is kept to decoding-sized calls (speculative drafts included).
_ABSORB_MAX_NEW = 16


def _heads_with_rope(nope_BLHN: Tensor, rope: Tensor) -> Tensor:
    """[B, H, L, N + R]: [nope; rope] per head, written once into head-major memory (each head's [L, N + R] rows
    contiguous, as the attention kernel and SDPA read them); a 3-d rope [B, L, R] (the key's) is shared by every
    head, a 4-d one is [B, L, H, R]."""
    B, L, H, N = nope_BLHN.shape
    out_BHLK = nope_BLHN.new_empty(B, H, L, N + rope.shape[-1])
    out_BHLK[..., :N] = nope_BLHN.transpose(1, 2)
    out_BHLK[..., N:] = rope[:, None] if rope.dim() == 3 else rope.transpose(1, 2)
    return out_BHLK
