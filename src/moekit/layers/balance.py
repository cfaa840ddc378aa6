"""Load-balancing losses and the auxiliary-loss-free bias balancer.

Legend: T tokens, B sequences, S tokens per sequence, E experts, K experts per token.

Every loss takes an optional token mask (True = a real token): padding neither counts as load nor as probability
mass. All losses are computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked_mean(values_T: Tensor, mask_T: Tensor | None) -> Tensor:
    if mask_T is None:
        return values_T.mean(dim=0)
    weight = mask_T.to(values_T.dtype)
    weight = weight.view(-1, *([1] * (values_T.dim() - 1)))
    return (values_T * weight).sum(dim=0) / weight.sum().clamp_min(1.0)


def slot_counts(indices_TK: Tensor, num_experts: int, mask_T: Tensor | None = None) -> Tensor:
    """Slots routed to each expert, [E] float32; empty slots (-1) and masked tokens do not count."""
    valid_TK = indices_TK >= 0
    if mask_T is not None:
        valid_TK = valid_TK & mask_T.unsqueeze(1)
    flat = indices_TK[valid_TK]
    return torch.bincount(flat, minlength=num_experts).to(torch.float32)


def switch_loss(probs_TE: Tensor, counts_E: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Switch Transformer / GShard auxiliary loss, N * sum_i f_i * P_i (Fedus et al. 2021, eq. 4-6).

    f_i is the fraction of routed slots sent to expert i (so top-k is normalised by T*K), P_i the mean router
    probability of expert i over real tokens. Perfect balance gives exactly 1; all tokens on one expert with
    probability 1 gives E.

    Args:
        probs_TE: [T, E] routing distribution (differentiable).
        counts_E: [E] routed slots per expert (not differentiable).
        mask_T: optional [T] bool, True for real tokens.
    """
    num_experts = probs_TE.shape[-1]
    f_E = counts_E.float() / counts_E.sum().clamp_min(1.0)
    p_E = _masked_mean(probs_TE.float(), mask_T)
    return num_experts * (f_E * p_E).sum()


def cv_squared(x_E: Tensor) -> Tensor:
    """Squared coefficient of variation, population variance / mean^2 (0 for a constant vector)."""
    x_E = x_E.float()
    if x_E.numel() <= 1:
        return x_E.new_zeros(())
    return x_E.var(correction=0) / (x_E.mean() ** 2 + 1e-10)


def cv2_loss(gates_TE: Tensor, load_TE_or_E: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Importance + load loss, CV(importance)^2 + CV(load)^2 (Shazeer et al. 2017, eq. 6-7 and 10-11).

    Args:
        gates_TE: [T, E] sparse gate values (the combine weights scattered to their experts); importance is their
            sum over real tokens.
        load_TE_or_E: the load: [T, E] smooth selection probabilities (noisy top-k) or [E] slot counts.
        mask_T: optional [T] bool, True for real tokens.
    """
    gates_TE = gates_TE.float()
    if mask_T is not None:
        gates_TE = gates_TE * mask_T.unsqueeze(1)
    importance_E = gates_TE.sum(dim=0)
    if load_TE_or_E.dim() == 2:
        load_TE = load_TE_or_E.float()
        load_E = (load_TE * mask_T.unsqueeze(1)).sum(dim=0) if mask_T is not None else load_TE.sum(dim=0)
    else:
        load_E = load_TE_or_E.float()
    return cv_squared(importance_E) + cv_squared(load_E)


def z_loss(logits_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Router z-loss, mean over tokens of logsumexp(logits)^2 (Zoph et al. 2022, ST-MoE eq. 5)."""
    return _masked_mean(torch.logsumexp(logits_TE.float(), dim=-1) ** 2, mask_T)


def sequence_balance_loss(probs_BSE: Tensor, indices_BSK: Tensor, mask_BS: Tensor | None = None) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss, mean over sequences of sum_i f_i * P_i (arXiv 2412.19437, eq. 17-20).

    Per sequence of S real tokens: f_i = E / (K * S) * (slots routed to i), P_i = mean normalised affinity of i.
    Perfectly balanced routing in every sequence gives exactly 1.

    Args:
        probs_BSE: [B, S, E] normalised affinities (rows sum to 1).
        indices_BSK: [B, S, K] chosen experts, -1 for empty slots.
        mask_BS: optional [B, S] bool, True for real tokens.
    """
    B, S, E = probs_BSE.shape
    K = indices_BSK.shape[-1]
    valid_BSK = indices_BSK >= 0
    token_w_BS = torch.ones(B, S, device=probs_BSE.device) if mask_BS is None else mask_BS.float()
    valid_BSK = valid_BSK & (token_w_BS > 0).unsqueeze(-1)
    counts_BE = torch.zeros(B, E + 1, device=probs_BSE.device)
    counts_BE.scatter_add_(1, torch.where(valid_BSK, indices_BSK, E).view(B, S * K), valid_BSK.float().view(B, S * K))
    counts_BE = counts_BE[:, :E]
    tokens_B = token_w_BS.sum(dim=1)
    f_BE = counts_BE * E / (K * tokens_B.clamp_min(1.0)).unsqueeze(1)
    p_BE = (probs_BSE.float() * token_w_BS.unsqueeze(-1)).sum(dim=1) / tokens_B.clamp_min(1.0).unsqueeze(1)
    per_seq_B = (f_BE * p_BE).sum(dim=1)
    has_tokens_B = tokens_B > 0
    return per_seq_B[has_tokens_B].mean() if bool(has_tokens_B.any()) else per_seq_B.sum() * 0.0


def router_entropy(probs_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Mean entropy (nats) of the routing distribution over real tokens; log(E) is uniform, 0 is one-hot."""
    p = probs_TE.float()
    return _masked_mean(-(p * torch.log(p.clamp_min(1e-20))).sum(dim=-1), mask_T)


@torch.no_grad()
def aux_free_bias_update(bias_E: Tensor, load_E: Tensor, rate: float) -> Tensor:
    """One step of auxiliary-loss-free balancing, in place: b_i += rate * sign(mean_load - load_i).

    This is the sign-update variant of Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for
    Mixture-of-Experts", arXiv 2408.15664, Algorithm 1) as used by DeepSeek-V3 (arXiv 2412.19437 §2.1.2, bias update
    speed gamma): overloaded experts' biases go down by gamma, underloaded ones up, balanced ones stay.
    It is applied once per optimizer step on the load accumulated over that step's micro-batches.

    Args:
        bias_E: [E] the selection bias buffer, updated in place.
        load_E: [E] tokens routed to each expert during the step.
        rate: gamma, the update speed (DeepSeek-V3: 0.001).
    Returns:
        bias_E.
    """
    load_E = load_E.float()
    bias_E += rate * torch.sign(load_E.mean() - load_E).to(bias_E.dtype)
    return bias_E
