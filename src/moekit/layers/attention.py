"""Attention for the language models: RMSNorm (or LayerNorm), rotary position embeddings, causal GQA attention, the
KV cache.

Legend: B batch, S new tokens (the chunk being run), L keys attended (cached + new), D model dim, H query heads,
G key/value heads (H is a multiple of G), X head dim.

Conventions follow Llama/Mixtral as implemented in Hugging Face transformers, so that converted checkpoints give
the same numbers: RMSNorm in float32, RoPE in the "rotate half" (non-interleaved) layout, no biases. The variants
other families need are opt-in and cost nothing when off: q/k/v and output biases, q/k RMSNorm per head or over the
whole projection, clamped q/k/v, attention sinks, sliding windows (a mask: `attention_mask(..., window=)`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ROPE_TYPES
from moekit.layers import kernels


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): x / rms(x) * weight, no mean subtraction, no bias.

    Args:
        dim: D.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]; low-precision inputs are normalised in float32, then scaled (as Llama/Mixtral)."""
        if x.dtype in (torch.float32, torch.float64):
            return _RMSNorm.apply(x, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype) * self.weight


_FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)  # (x, shape, w, eps) -> (y, rstd); torch >= 2.8


class _RMSNorm(torch.autograd.Function):
    """x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) per row, and a hand-written backward.

    On float32 CPU tensors forward and backward are one C++ pass each (layers/kernels). Elsewhere the forward is
    torch's `aten::_fused_rms_norm` (which also returns rstd; where the installed torch lacks it, the same arithmetic
    in three ops), and the backward 5 element-wise ops where torch's own is ~10 (d_xhat = g * w;
    d_x = rstd * (d_xhat - xhat * mean(d_xhat * xhat)); d_w = sum over rows of g * xhat).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight_D: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        D = x.shape[-1]
        x_ND = x.reshape(-1, D)
        ctx.fused = x_ND.is_contiguous() and weight_D.is_contiguous() and kernels.usable(x_ND, weight_D)
        if ctx.fused:  # one pass in C++ (layers/kernels)
            y_ND, rstd_N1 = kernels.cpu_kernels().rms_norm_forward(x_ND, weight_D, eps)
        elif _FUSED_RMS_NORM is not None:  # torch's kernel, which also returns rstd
            y_ND, rstd_N1 = _FUSED_RMS_NORM(x_ND, [D], weight_D, eps)
        else:
            rstd_N1 = torch.linalg.vecdot(x_ND, x_ND).div_(D).add_(eps).rsqrt_().unsqueeze(1)
            y_ND = (x_ND * rstd_N1).mul_(weight_D)
        ctx.save_for_backward(x_ND, rstd_N1, weight_D)
        ctx.shape = x.shape
        return y_ND.view(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x_ND, rstd_N1, weight_D = ctx.saved_tensors
        D = x_ND.shape[-1]
        grad_ND = grad.reshape(-1, D)
        if ctx.fused:
            grad_x, grad_w = kernels.cpu_kernels().rms_norm_backward(
                grad_ND.contiguous(), x_ND, rstd_N1, weight_D, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            )
            return (grad_x.view(ctx.shape) if ctx.needs_input_grad[0] else None), grad_w, None
        xhat_ND = x_ND * rstd_N1
        grad_w = (grad_ND * xhat_ND).sum(0) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            dxhat_ND = grad_ND * weight_D
            mean_N1 = torch.linalg.vecdot(dxhat_ND, xhat_ND).div_(D).unsqueeze(1)
            grad_x = xhat_ND.mul_(mean_N1).neg_().add_(dxhat_ND).mul_(rstd_N1).view(ctx.shape)
        return grad_x, grad_w, None


def make_norm(kind: str, dim: int, eps: float, bias: bool = False) -> nn.Module:
    """The block / final norm a model config names: RMSNorm, or LayerNorm (Ba et al. 2016; DBRX without a bias,
    PhiMoE with one), which normalises in the input dtype as torch's LayerNorm kernels do."""
    if kind == "rmsnorm":
        if bias:
            raise ValueError("an RMSNorm has no bias: use kind='layernorm' for a norm with a bias")
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"unknown norm {kind!r}: expected 'rmsnorm' or 'layernorm'")


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict | None = None, seq_len: int | None = None
) -> tuple[Tensor, float]:
    """The X/2 rotation frequencies of RoPE and the attention factor that multiplies cos and sin.

    Frequency i is theta^(-2i/X) (Su et al. 2021, eq. 34), then changed by `scaling` for long contexts, with the
    keys and meanings of Hugging Face's `rope_scaling` / `rope_parameters` dicts:
    - None or {"rope_type": "default"}: unchanged, factor 1;
    - "linear" (position interpolation, Chen et al. 2023): every frequency / factor;
    - "yarn" (Peng et al. 2023; DeepSeek-V2/V3, GPT-OSS): low frequencies interpolated by `factor`, high ones kept,
      a linear ramp between the correction dims of beta_fast (32) and beta_slow (1) rotations over
      original_max_position_embeddings (floored/ceiled unless truncate=False); attention factor given, or
      mscale(factor, mscale) / mscale(factor, mscale_all_dim) with mscale(s, m) = 0.1 * m * ln(s) + 1;
    - "llama3" (Llama 3.1): wavelengths longer than original_max_position_embeddings / low_freq_factor divided by
      factor, shorter than .. / high_freq_factor kept, smoothly blended between;
    - "longrope" (Ding et al. 2024, LongRoPE; Phi-3, PhiMoE): frequency i divided by short_factor[i], or by
      long_factor[i] when `seq_len` > original_max_position_embeddings; attention factor short_mscale / long_mscale
      where the dict has them (PhiMoE), else attention_factor, else sqrt(1 + ln(factor) / ln(original)).
    `seq_len` (the length of the sequence being run) matters only to longrope; None = within the original context.
    Returns (inv_freq [X/2] float32, attention_factor).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [X/2]
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported: expected one of {sorted(ROPE_TYPES)}")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "longrope":
        return _longrope_frequencies(head_dim, theta, scaling, seq_len)
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = scaling["original_max_position_embeddings"]
    if kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled), 1.0

    def mscale(s: float, m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as the reference implementation: avoid a division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 = keep the original frequency
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def _longrope_frequencies(head_dim: int, theta: float, scaling: dict, seq_len: int | None) -> tuple[Tensor, float]:
    original = scaling["original_max_position_embeddings"]
    long = seq_len is not None and seq_len > original
    factors = scaling["long_factor" if long else "short_factor"]
    if len(factors) != head_dim // 2:
        raise ValueError(f"longrope needs head_dim / 2 = {head_dim // 2} factors, got {len(factors)}")
    ext_factors = torch.tensor(factors, dtype=torch.float32)
    inv_freq = 1.0 / (ext_factors * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling.get("short_mscale") is not None and scaling.get("long_mscale") is not None:  # PhiMoE
        return inv_freq, float(scaling["long_mscale" if long else "short_mscale"])
    if scaling.get("attention_factor") is not None:
        return inv_freq, float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    return inv_freq, 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def longrope_switch(scaling: dict | None, max_len: int) -> int | None:
    """For longrope scaling whose context reaches past original_max_position_embeddings: that length (a sequence
    longer than it runs with the long factors); None otherwise (one set of RoPE tables serves every length)."""
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "longrope":
        return None
    original = scaling["original_max_position_embeddings"]
    return original if max_len > original else None


def rope_tables(
    max_len: int, head_dim: int, theta: float, scaling: dict | None = None, seq_len: int | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin of every position's rotation angles, float32, [max_len, X], times the attention factor.

    Each frequency of `rope_frequencies` appears twice, once per half of the head ("rotate half" layout, as
    GPT-NeoX, Llama and transformers lay it out, rather than interleaved pairs). `seq_len`: see rope_frequencies.
    """
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, seq_len)
    angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [max_len, X/2]
    angles = torch.cat((angles, angles), dim=-1)  # [max_len, X]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x_BSNX: Tensor, cos_SX: Tensor, sin_SX: Tensor, heads_major: bool = False) -> Tensor:
    """Rotate each head's (first-half, second-half) dimension pairs by the position's angles.

    Args:
        x_BSNX: [B, S, N, X] queries or keys (any number N of heads).
        cos_SX, sin_SX: [S, X] from `rope_tables`, rows of the chunk's positions.
        heads_major: store the result as [B, N, S, X] (returned as its [B, S, N, X] transpose), so that
            `.transpose(1, 2)` of it, or of a slice of its heads, is contiguous per head: the layout the CPU SDPA
            kernel runs fastest on (OLMoE-shaped prefill, S=512: 7.8 ms instead of 11.5 ms per layer, one thread).
    Returns:
        [B, S, N, X]: x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1).
    """
    half = x_BSNX.shape[-1] // 2
    cos_S1Y = cos_SX[:, None, :half].to(x_BSNX.dtype)  # both halves of the tables are equal: Y = X/2
    sin_S1Y = sin_SX[:, None, :half].to(x_BSNX.dtype)
    return _Rope.apply(x_BSNX, cos_S1Y, sin_S1Y, heads_major)


def _rotate(
    x_BSNX: Tensor, cos_S1Y: Tensor, sin_S1Y: Tensor, heads_major: bool = False, negate_sin: bool = False
) -> Tensor:
    """(x1 c - x2 s, x2 c + x1 s) written into one new tensor (no concatenation); s = -sin where negate_sin. Each
    product is rounded before the sum, as transformers' `q * cos + rotate_half(q) * sin` rounds it (addcmul_ would
    fuse them: other bits); the C++ kernel (float32 CPU) rounds the same way in one pass."""
    half = x_BSNX.shape[-1] // 2
    if heads_major:
        B, S, N, X = x_BSNX.shape
        out = torch.empty(B, N, S, X, dtype=x_BSNX.dtype, device=x_BSNX.device).transpose(1, 2)
    else:
        out = torch.empty(x_BSNX.shape, dtype=x_BSNX.dtype, device=x_BSNX.device)
    if (
        x_BSNX.dim() == 4 and x_BSNX.stride(-1) == 1 and cos_S1Y.stride(-1) == 1 and sin_S1Y.stride(-1) == 1
        and kernels.usable(x_BSNX, cos_S1Y, sin_S1Y)
    ):  # fmt: skip
        kernels.cpu_kernels().rope(x_BSNX, cos_S1Y[:, 0], sin_S1Y[:, 0], negate_sin, out)
        return out
    if negate_sin:
        sin_S1Y = -sin_S1Y
    x1, x2 = x_BSNX[..., :half], x_BSNX[..., half:]  # [B, S, N, X/2] each
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos_S1Y, out=out1).sub_(x2 * sin_S1Y)
    torch.mul(x2, cos_S1Y, out=out2).add_(x1 * sin_S1Y)
    return out


class _Rope(torch.autograd.Function):
    """The rotation as one autograd node: its backward is the rotation by the opposite angle (6 kernels instead of
    autograd's ~12 through the products, the sums and the concatenation)."""

    @staticmethod
    def forward(ctx, x_BSNX: Tensor, cos_S1Y: Tensor, sin_S1Y: Tensor, heads_major: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos_S1Y, sin_S1Y)
        return _rotate(x_BSNX, cos_S1Y, sin_S1Y, heads_major)

    @staticmethod
    def backward(ctx, grad_BSNX: Tensor):  # type: ignore[override]
        cos_S1Y, sin_S1Y = ctx.saved_tensors
        return _rotate(grad_BSNX, cos_S1Y, sin_S1Y, negate_sin=True), None, None, None


# The fused causal attention kernel (layers/kernels) takes chunks up to ATTENTION_KERNEL_MAX_SEQ tokens, and when
# a gradient is needed up to ATTENTION_KERNEL_MAX_TRAIN_SEQ: it keeps the probabilities [B, H, S, S] for its
# backward pass (no second softmax), memory that grows with S^2 where SDPA's flash kernel keeps [B, H, S]. Longer
# chunks go to SDPA. Ad-hoc interleaved timings against the flash kernel, one thread: forward+backward 0.6x its time
# at S=128 and 0.67x at S=256, inference 0.82x at S=512 and 1.9x at S=1024 (the [S, S] rows outgrow the cache).
# The probabilities of one call are also capped at ATTENTION_KERNEL_MAX_PROBS_BYTES (B*H*S*S floats), so a large
# batch or many heads cannot take much more memory than SDPA would.
ATTENTION_KERNEL_MAX_SEQ = 512
ATTENTION_KERNEL_MAX_TRAIN_SEQ = 256
ATTENTION_KERNEL_MAX_PROBS_BYTES = 64 << 20


def _heads_contiguous(t: Tensor) -> bool:
    return t.stride(3) == 1 and t.stride(2) == t.shape[3]


def causal_attention(q_BHSX: Tensor, k_BGSX: Tensor, v_BGSY: Tensor, scale: float | None = None) -> Tensor:
    """softmax(scale q k^T + causal mask) v over one chunk (query i sees keys 0..i), query head h reading key/value
    head h // (H / G): the same as `F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
    enable_gqa=True)`.

    Float32 CPU chunks of 2..ATTENTION_KERNEL_MAX_SEQ tokens (..ATTENTION_KERNEL_MAX_TRAIN_SEQ where a gradient is
    needed; probabilities within ATTENTION_KERNEL_MAX_PROBS_BYTES) with a positive scale run moekit's C++ kernel
    (layers/kernels: register-tiled products that follow the causal triangle, the probabilities kept for the
    backward pass); anything else runs SDPA.

    Args:
        q_BHSX: [B, H, S, X] queries; k_BGSX: [B, G, S, X] keys (G divides H); v_BGSY: [B, G, S, Y] values, Y may
            differ from X (MLA's value heads).
        scale: the softmax scale; None = 1/sqrt(X).
    Returns:
        [B, H, S, Y].
    """
    B, H, S, X = q_BHSX.shape
    G, Y = (k_BGSX.shape[1], v_BGSY.shape[-1]) if k_BGSX.dim() == 4 and v_BGSY.dim() == 4 else (0, 0)
    if k_BGSX.shape != (B, G, S, X) or v_BGSY.shape[:3] != (B, G, S) or Y < 1 or G < 1 or H % G:
        raise ValueError(f"k {tuple(k_BGSX.shape)} and v {tuple(v_BGSY.shape)} do not fit q {tuple(q_BHSX.shape)}: "
                         "expected k [B, G, S, X] and v [B, G, S, Y] with G dividing H")
    scale = 1.0 / math.sqrt(X) if scale is None else scale
    if _attention_kernel_takes(B * H, B * G, S, scale, q_BHSX, k_BGSX, v_BGSY):
        q, k, v = (t if _heads_contiguous(t) else t.contiguous() for t in (q_BHSX, k_BGSX, v_BGSY))
        return _CausalAttention.apply(q, k, v, scale)
    return sdpa(q_BHSX, k_BGSX, v_BGSY, is_causal=S > 1, scale=scale, enable_gqa=G != H)


def sdpa(q_BHSX: Tensor, k_BGSX: Tensor, v_BGSY: Tensor, **kwargs) -> Tensor:
    """`F.scaled_dot_product_attention(q, k, v, **kwargs)` -> [B, H, S, Y] for values of any width Y: its fused CPU
    kernel needs v as wide as q/k (else its math path, ~3x slower: 21.7 vs 7.5 ms for an MLA layer at S=512), so a
    narrower v is zero-padded and the padded output columns dropped."""
    X, Y = q_BHSX.shape[-1], v_BGSY.shape[-1]
    if Y >= X:
        return F.scaled_dot_product_attention(q_BHSX, k_BGSX, v_BGSY, **kwargs)
    return F.scaled_dot_product_attention(q_BHSX, k_BGSX, F.pad(v_BGSY, (0, X - Y)), **kwargs)[..., :Y]


def _attention_kernel_takes(heads: int, groups: int, S: int, scale: float, *tensors: Tensor) -> bool:
    """Whether the C++ attention kernel takes `heads` (B*H) query heads in `groups` (B*G) key/value groups of S
    tokens: see ATTENTION_KERNEL_*. It runs one task per group, ~2x faster per thread than SDPA's flash kernel here,
    so it also needs at least half as many groups as threads (a many-core CPU prefilling one sequence keeps SDPA,
    which splits the queries too; that rule is reasoned, not measured: this machine has 2 cores)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    max_seq = ATTENTION_KERNEL_MAX_TRAIN_SEQ if grad else ATTENTION_KERNEL_MAX_SEQ
    return (
        1 < S <= max_seq and heads * S * S * 4 <= ATTENTION_KERNEL_MAX_PROBS_BYTES and scale > 0
        and 2 * groups >= torch.get_num_threads() and kernels.usable(*tensors)
    )  # fmt: skip


class _CausalAttention(torch.autograd.Function):
    """`causal_attention` through the C++ kernel: one node, the probabilities saved (B*H*S*S floats)."""

    @staticmethod
    def forward(ctx, q_BHSX: Tensor, k_BGSX: Tensor, v_BGSX: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        out_BHSX, p_BHSS = kernels.cpu_kernels().causal_attention_forward(q_BHSX, k_BGSX, v_BGSX, scale)
        ctx.save_for_backward(q_BHSX, k_BGSX, v_BGSX, out_BHSX, p_BHSS)
        ctx.scale = scale
        return out_BHSX

    @staticmethod
    def backward(ctx, grad_BHSX: Tensor):  # type: ignore[override]
        return (*_attention_kernel_backward(grad_BHSX, *ctx.saved_tensors, ctx.scale), None)


def _attention_kernel_backward(grad_BHSX: Tensor, q_BHSX: Tensor, k_BGSX: Tensor, v_BGSX: Tensor, out_BHSX: Tensor,
                               p_BHSS: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(grad q, grad k, grad v) of the C++ attention kernel's forward (out, P) for the output gradient."""
    if not _heads_contiguous(grad_BHSX):
        grad_BHSX = grad_BHSX.contiguous()
    return kernels.cpu_kernels().causal_attention_backward(grad_BHSX, q_BHSX, k_BGSX, v_BGSX, out_BHSX, p_BHSS, scale)


class _RopeCausalAttention(torch.autograd.Function):
    """RoPE of q and k, then `causal_attention`, from the fused projection [B, S, (H + 2G) X] as one node (the
    kernel path of `Attention` without a cache): the gradient of the projection is written into one tensor (the
    rotated-back q and k gradients and v's) instead of autograd concatenating the pieces of two splits."""

    @staticmethod
    def forward(ctx, qkv_BSY: Tensor, cos_SY: Tensor, sin_SY: Tensor, H: int, G: int, scale: float) -> Tensor:  # type: ignore[override]
        B, S, _ = qkv_BSY.shape
        qkv_BSNX = qkv_BSY.view(B, S, H + 2 * G, -1)
        qk_BNSX = _rotate(qkv_BSNX[:, :, : H + G], cos_SY[:, None], sin_SY[:, None], heads_major=True).transpose(1, 2)
        v_BGSX = qkv_BSNX[:, :, H + G :].transpose(1, 2).contiguous()
        q_BHSX, k_BGSX = qk_BNSX[:, :H], qk_BNSX[:, H:]
        out_BHSX, p_BHSS = kernels.cpu_kernels().causal_attention_forward(q_BHSX, k_BGSX, v_BGSX, scale)
        ctx.save_for_backward(q_BHSX, k_BGSX, v_BGSX, out_BHSX, p_BHSS, cos_SY, sin_SY)
        ctx.scale = scale
        return out_BHSX

    @staticmethod
    def backward(ctx, grad_BHSX: Tensor):  # type: ignore[override]
        q_BHSX, k_BGSX, v_BGSX, out_BHSX, p_BHSS, cos_SY, sin_SY = ctx.saved_tensors
        module = kernels.cpu_kernels()
        gq_BHSX, gk_BGSX, gv_BGSX = _attention_kernel_backward(
            grad_BHSX, q_BHSX, k_BGSX, v_BGSX, out_BHSX, p_BHSS, ctx.scale
        )
        B, H, S, X = q_BHSX.shape
        G = k_BGSX.shape[1]
        grad_BSNX = torch.empty(B, S, H + 2 * G, X, dtype=grad_BHSX.dtype, device=grad_BHSX.device)
        module.rope(gq_BHSX.transpose(1, 2), cos_SY, sin_SY, True, grad_BSNX[:, :, :H])  # rotated back
        module.rope(gk_BGSX.transpose(1, 2), cos_SY, sin_SY, True, grad_BSNX[:, :, H : H + G])
        grad_BSNX[:, :, H + G :] = gv_BGSX.transpose(1, 2)
        return grad_BSNX.view(B, S, -1), None, None, None, None, None


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    A forward with `cache` and `start_pos` writes the chunk's keys/values at positions start_pos:start_pos+S and
    attends over positions 0:start_pos+S. Positions are the caller's: re-running from an earlier start_pos simply
    overwrites (e.g. to rewind).

    Attributes:
        k, v: per layer, [B, G, max_len, X] (v: [B, G, max_len, v_head_dim] when that is given). Multi-head latent
            attention (layers/mla.py) keeps its compressed latent in k and its shared rotated key in v (G = 1).
        key_mask: [B, max_len] bool, True for real tokens; None until a forward passes a padding mask.
        length: the end position of the last write (informational).
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 v_head_dim: int | None = None) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        v_shape = shape if v_head_dim is None else (batch_size, n_kv_heads, max_len, v_head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(v_shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.key_mask: Tensor | None = None
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def write_mask(self, start_pos: int, mask_BS: Tensor | None, num_new: int) -> Tensor | None:
        """Record the chunk's padding mask; return the key mask [B, start_pos+S] to attend with (None = all real)."""
        if mask_BS is not None and self.key_mask is None:
            self.key_mask = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=self.k[0].device)
        if self.key_mask is None:
            return None
        self.key_mask[:, start_pos : start_pos + num_new] = True if mask_BS is None else mask_BS
        return self.key_mask[:, : start_pos + num_new]


def attention_mask(
    num_new: int, num_keys: int, key_mask_BL: Tensor | None, device, window: int | None = None
) -> Tensor | None:
    """The boolean attention mask (True = attend) of a chunk whose S queries are the last S of its L keys.

    Query i (key position L - S + i) sees key j when j <= L - S + i, j > L - S + i - window (with a sliding
    window), and key j is not padding; a query always sees itself, so padding rows stay finite. Returns None when
    `scaled_dot_product_attention` needs no mask: no padding, no key outside a window, and either the keys are the
    chunk itself (is_causal=True) or a single new token (sees every key).

    Args:
        num_new: S.
        num_keys: L (S, or start_pos + S when reading a cache).
        key_mask_BL: [B, L] bool, True for real tokens; None = no padding.
        window: sliding-window span W (a query sees itself and the W-1 keys before it); None = full causal.
    Returns:
        [S, L] or [B, 1, S, L] bool, or None.
    """
    windowed = window is not None and num_keys > window  # shorter: no query reaches past its window
    if key_mask_BL is None and not windowed and (num_keys == num_new or num_new == 1):
        return None
    query_pos_S1 = torch.arange(num_keys - num_new, num_keys, device=device)[:, None]
    key_pos_1L = torch.arange(num_keys, device=device)[None, :]
    causal_SL = key_pos_1L <= query_pos_S1
    if windowed:
        causal_SL = causal_SL & (key_pos_1L > query_pos_S1 - window)
    if key_mask_BL is None:
        return causal_SL
    return (causal_SL & (key_mask_BL[:, None, :] | (key_pos_1L == query_pos_S1)))[:, None]


class Attention(nn.Module):
    """Causal multi-head attention with grouped key/value heads (GQA, Ainslie et al. 2023) and RoPE.

    Queries, keys and values come from one fused projection (one matmul instead of three); attention is
    `torch.nn.functional.scaled_dot_product_attention` with scale 1/sqrt(X) unless `scale` says otherwise, except
    where `causal_attention`'s C++ kernel takes the chunk (float32 CPU, short, no cache): then RoPE and the attention
    are one autograd node (`_RopeCausalAttention`) from the fused projection.

    Args:
        d_model: D.
        n_heads: H.
        n_kv_heads: G.
        head_dim: X.
        qkv_bias: biases on the q/k/v projection (Qwen2-MoE, GPT-OSS).
        o_bias: a bias on the output projection (GPT-OSS).
        qk_norm: RMSNorm of queries and keys before RoPE: "head" over each head's X dims (Qwen3), "proj" over the
            whole q [H*X] and k [G*X] projections (OLMoE); None = off.
        norm_eps: epsilon of those norms.
        clip_qkv: clamp q, k and v to [-clip_qkv, clip_qkv] after the norms (OLMoE); None = off.
        sinks: a learned logit per head that joins the softmax denominator (GPT-OSS): out = softmax([s, sink]) v
            without the sink's column, so a head may give little weight to every key.
        scale: the softmax scale of q.k (Granite's attention_multiplier); None = 1/sqrt(X).
    """

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, qkv_bias: bool = False,
        o_bias: bool = False, qk_norm: str | None = None, norm_eps: float = 1e-5, clip_qkv: float | None = None,
        sinks: bool = False, scale: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.scale = scale
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.qkv_proj = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)  # rows: q, k, v
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=o_bias)
        self.qk_norm, self.clip_qkv = qk_norm, clip_qkv
        self.q_norm = self.k_norm = None
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, norm_eps), RMSNorm(head_dim, norm_eps)
        elif qk_norm == "proj":
            self.q_norm, self.k_norm = RMSNorm(n_heads * head_dim, norm_eps), RMSNorm(n_kv_heads * head_dim, norm_eps)
        elif qk_norm is not None:
            raise ValueError(f"unknown qk_norm {qk_norm!r}: expected 'head', 'proj' or None")
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if sinks else None  # [H]

    def forward(
        self,
        x_BSD: Tensor,
        cos_SX: Tensor,
        sin_SX: Tensor,
        kv_cache: tuple[Tensor, Tensor] | None = None,
        start_pos: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from the chunk's tokens to themselves and, with a cache, to every earlier cached position.

        Args:
            x_BSD: [B, S, D] normalised hidden states of the chunk.
            cos_SX, sin_SX: [S, X] RoPE tables at the chunk's positions.
            kv_cache: this layer's (k, v) cache tensors [B, G, max_len, X], written in place; None = no cache.
            start_pos: position of the chunk's first token.
            mask: from `attention_mask` (None = causal over the chunk, or all keys for a single cached token).
        Returns:
            [B, S, D].
        """
        B, S, _ = x_BSD.shape
        H, G, X = self.n_heads, self.n_kv_heads, self.head_dim
        qkv_BSY = self.qkv_proj(x_BSD)  # Y = (H + 2G) X
        if self.q_norm is not None or self.clip_qkv is not None:
            qkv_BSY = self._norm_and_clip(qkv_BSY)
        scale = 1.0 / math.sqrt(X) if self.scale is None else self.scale
        if (
            kv_cache is None and mask is None and self.sinks is None and qkv_BSY.is_contiguous()
            and _attention_kernel_takes(B * H, B * G, S, scale, qkv_BSY, cos_SX, sin_SX)
        ):  # fmt: skip
            cos_SY, sin_SY = cos_SX[:, : X // 2], sin_SX[:, : X // 2]  # both halves of the tables are equal
            out_BHSX = _RopeCausalAttention.apply(qkv_BSY, cos_SY, sin_SY, H, G, scale)
            return self.o_proj(out_BHSX.transpose(1, 2).reshape(B, S, H * X))
        # split (not slicing): its backward is one concatenation of the gradients, not a zero-filled copy per slice
        qk_BSNX, v_BSGX = qkv_BSY.view(B, S, H + 2 * G, X).split([H + G, G], dim=2)
        # q and k rotated in one pass, into heads-major storage; v copied into it too: SDPA's CPU kernel runs
        # markedly faster on per-head contiguous inputs than on these strided views of the fused projection.
        q_BSHX, k_BSGX = apply_rope(qk_BSNX, cos_SX, sin_SX, heads_major=True).split([H, G], dim=2)
        q_BHSX, k_BGSX, v_BGSX = q_BSHX.transpose(1, 2), k_BSGX.transpose(1, 2), v_BSGX.transpose(1, 2).contiguous()
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            k_cache[:, :, start_pos : start_pos + S] = k_BGSX
            v_cache[:, :, start_pos : start_pos + S] = v_BGSX
            if start_pos > 0:  # attend over the cached prefix too
                k_BGSX, v_BGSX = k_cache[:, :, : start_pos + S], v_cache[:, :, : start_pos + S]
        if self.sinks is not None:
            k_BGSX, v_BGSX, mask = self._with_sink(k_BGSX, v_BGSX, mask, S)
        if mask is None and k_BGSX.shape[2] == S and S > 1:  # causal over the chunk itself
            out_BHSX = causal_attention(q_BHSX, k_BGSX, v_BGSX, self.scale)
        else:
            out_BHSX = F.scaled_dot_product_attention(
                q_BHSX, k_BGSX, v_BGSX, attn_mask=mask, scale=self.scale, enable_gqa=G != H
            )
        return self.o_proj(out_BHSX.transpose(1, 2).reshape(B, S, H * X))

    def _norm_and_clip(self, qkv_BSY: Tensor) -> Tensor:
        H, G, X = self.n_heads, self.n_kv_heads, self.head_dim
        q_BSZ, k_BSZ, v_BSZ = qkv_BSY.split([H * X, G * X, G * X], dim=-1)
        if self.qk_norm == "head":
            q_BSZ = self.q_norm(q_BSZ.unflatten(-1, (H, X))).flatten(-2)
            k_BSZ = self.k_norm(k_BSZ.unflatten(-1, (G, X))).flatten(-2)
        elif self.qk_norm == "proj":
            q_BSZ, k_BSZ = self.q_norm(q_BSZ), self.k_norm(k_BSZ)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q_BSZ, k_BSZ, v_BSZ = q_BSZ.clamp(-c, c), k_BSZ.clamp(-c, c), v_BSZ.clamp(-c, c)
        return torch.cat((q_BSZ, k_BSZ, v_BSZ), dim=-1)

    def _with_sink(self, k_BGLX: Tensor, v_BGLX: Tensor, mask: Tensor | None, S: int):
        """Attention sinks through the SDPA kernel: one extra key of zeros whose additive mask entry is the head's
        sink logit (its score is exactly the sink), with a zero value (it adds to the denominator only)."""
        B, G, L, X = k_BGLX.shape
        H = self.n_heads
        if mask is None:  # causal over the chunk, or a single new token that sees every key: both are this
            key_pos_1L = torch.arange(L, device=k_BGLX.device)[None, :]
            mask = key_pos_1L <= torch.arange(L - S, L, device=k_BGLX.device)[:, None]  # [S, L]
        zero_BG1X = k_BGLX.new_zeros(B, G, 1, X)
        k_BGLX, v_BGLX = torch.cat((k_BGLX, zero_BG1X), dim=2), torch.cat((v_BGLX, zero_BG1X), dim=2)
        bias_NHSL = torch.zeros(mask.shape, dtype=k_BGLX.dtype, device=k_BGLX.device).masked_fill_(~mask, float("-inf"))
        bias_NHSL = bias_NHSL.view(-1, 1, S, L).expand(-1, H, S, L)  # N = B, or 1 for a mask shared by the batch
        sink_NHS1 = self.sinks.to(k_BGLX.dtype).view(1, H, 1, 1).expand(bias_NHSL.shape[0], H, S, 1)
        return k_BGLX, v_BGLX, torch.cat((bias_NHSL, sink_NHS1), dim=-1)
