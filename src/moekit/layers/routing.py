"""Routers: each maps tokens to experts and returns the same `RouterOutput`.

Legend: T tokens, D model dim, E experts, K experts per token (slots per token), C capacity (tokens per expert),
G expert groups.

Token-choice routers fill `indices [T, K]` with the expert of each slot (-1 for an empty slot, e.g. a padding token
or a top-p token that needed fewer than K experts) and `weights [T, K]` with the combine weight of each slot.
The expert-choice router instead fills `indices [E, C]` with the token each expert picked (`expert_choice=True`).

Router arithmetic runs in float32 (float64 for float64 input) whatever the activation dtype: softmax and top-k
over bf16 logits flip selections (Switch Transformer §2.4 "selective precision").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ROUTERS, MoEConfig


@dataclass
class RouterOutput:
    """What a router decided for one batch of tokens.

    Attributes:
        weights: [T, K] combine weight per slot, float32 (0 for an empty slot); expert choice: [E, C].
        indices: [T, K] expert of each slot, -1 for an empty slot; expert choice: [E, C] token of each slot.
        logits: [T, E] raw router logits, float32 (z-loss, statistics).
        probs: [T, E] the routing distribution, rows summing to 1 (balance losses, entropy).
        scores: [T, E] selection scores (selection bias included, -inf for experts a token may not use); they rank
            a token's experts for re-routing. None for routers that do not rank (expert choice).
        load_probs: [T, E] differentiable probability that each expert is selected (noisy top-k's smooth load
            estimator, Shazeer et al. 2017 Appendix A); None elsewhere.
        expert_choice: True when `indices`/`weights` are per expert rather than per token.
    """

    weights: Tensor
    indices: Tensor
    logits: Tensor
    probs: Tensor
    scores: Tensor | None = None
    load_probs: Tensor | None = None
    expert_choice: bool = False


class Router(nn.Module):
    """Base class: a linear scoring of tokens against experts, plus the optional selection bias.

    The selection bias (DeepSeek-V3's `e_score_correction_bias`) is a buffer, not a parameter: it is added to the
    scores only to choose experts and is moved by the auxiliary-loss-free balancer, never by gradients.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.d_model = config.num_experts, config.top_k, config.d_model
        self.norm_topk_prob, self.topk_norm_p = config.norm_topk_prob, config.topk_norm_p
        self.input_jitter_eps = config.input_jitter_eps
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        if config.selection_bias:
            self.register_buffer("selection_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.selection_bias = None
        nn.init.uniform_(self.weight, -1 / math.sqrt(config.d_model), 1 / math.sqrt(config.d_model))

    def router_dtype(self, x_TD: Tensor) -> torch.dtype:
        return torch.promote_types(x_TD.dtype, torch.float32)  # float32, or float64 for float64 input

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        dtype = self.router_dtype(x_TD)
        bias = None if self.bias is None else self.bias.to(dtype)
        x_TD = x_TD.to(dtype)
        if self.training and self.input_jitter_eps > 0:  # Switch Transformer's multiplicative jitter (training only)
            eps = self.input_jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return F.linear(x_TD, self.weight.to(dtype), bias)

    def biased(self, scores_TE: Tensor) -> Tensor:
        return scores_TE if self.selection_bias is None else scores_TE + self.selection_bias

    def renormalize(self, w_TK: Tensor) -> Tensor:
        """With norm_topk_prob, the k weights divided by their sum (their p-norm for topk_norm_p = p != 1, DBRX)."""
        if not self.norm_topk_prob:
            return w_TK
        if self.topk_norm_p == 1:
            return w_TK / w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return w_TK / w_TK.norm(p=self.topk_norm_p, dim=-1, keepdim=True).clamp_min(1e-20)

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None) -> RouterOutput:
        raise NotImplementedError


class TopKRouter(Router):
    """Top-k routing with either softmax order.

    - `softmax_topk` (Switch, GShard, Qwen-MoE, OLMoE): softmax over all E experts, keep the k largest, optionally
      renormalise them to sum to 1 (`norm_topk_prob`).
    - `topk_softmax` (Mixtral): top-k on the logits, softmax over those k only (always sums to 1).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.softmax_order = config.softmax_order

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None) -> RouterOutput:
        logits_TE = self.compute_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.softmax_order == "softmax_topk":
            scores_TE = self.biased(probs_TE)
            indices_TK = scores_TE.topk(self.top_k, dim=-1).indices
            weights_TK = self.renormalize(probs_TE.gather(1, indices_TK))
        else:
            scores_TE = self.biased(logits_TE)
            indices_TK = scores_TE.topk(self.top_k, dim=-1).indices
            weights_TK = logits_TE.gather(1, indices_TK).softmax(dim=-1)
        return RouterOutput(weights_TK, indices_TK, logits_TE, probs_TE, scores_TE.detach())


class NoisyTopKRouter(Router):
    """Noisy top-k gating, "KeepTopK" (Shazeer et al. 2017, eq. 3-5).

    H(x)_i = (x W_g)_i + N(0, 1) * (softplus((x W_noise)_i) + eps), in training only; all but the top k of H set to
    -inf, then softmax. `load_probs` is the paper's smooth estimate of P(expert i is selected) (Appendix A, eq. 9),
    which makes the load term of the CV^2 loss differentiable.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        # The paper initialises both W_g and W_noise to zero; zero noise weights keep that (softplus(0) = log 2).
        self.noise_weight = nn.Parameter(torch.zeros(config.num_experts, config.d_model))
        self.noise_eps = config.noise_eps
        # (rank, ranks) when this layer sees rank's equal share of a batch split over `ranks` processes in rank
        # order (set by `moekit.parallel.shard_experts`): the noise is then drawn for the whole batch, from the
        # generator every rank seeds alike, and this rank keeps its rows, so each token gets the noise one process
        # would give it (and the generators stay in step).
        self.noise_shard: tuple[int, int] | None = None

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None) -> RouterOutput:
        clean_TE = self.compute_logits(x_TD)
        load_probs_TE = None
        if self.training:
            std_TE = F.softplus(F.linear(x_TD.to(clean_TE.dtype), self.noise_weight.to(clean_TE.dtype))) + self.noise_eps
            noisy_TE = clean_TE + self._noise(clean_TE) * std_TE
            if self.top_k < self.num_experts:
                load_probs_TE = self._load_probs(clean_TE, noisy_TE, std_TE)
        else:
            noisy_TE = clean_TE
        scores_TE = self.biased(noisy_TE)
        indices_TK = scores_TE.topk(self.top_k, dim=-1).indices
        weights_TK = noisy_TE.gather(1, indices_TK).softmax(dim=-1)  # = softmax(KeepTopK(H)) at the kept slots
        probs_TE = noisy_TE.softmax(dim=-1)
        return RouterOutput(weights_TK, indices_TK, clean_TE, probs_TE, scores_TE.detach(), load_probs_TE)

    def _noise(self, like_TE: Tensor) -> Tensor:
        if self.noise_shard is None:
            return torch.randn_like(like_TE)
        rank, ranks = self.noise_shard
        T, E = like_TE.shape
        noise_NE = torch.randn(ranks * T, E, dtype=like_TE.dtype, device=like_TE.device)
        return noise_NE[rank * T : (rank + 1) * T]

    def _load_probs(self, clean_TE: Tensor, noisy_TE: Tensor, std_TE: Tensor) -> Tensor:
        # P(i selected) = Phi((clean_i - kth_excluding(H, k, i)) / std_i): the k-th largest noisy logit among the
        # others is the (k+1)-th overall if i is itself in the top k, else the k-th.
        top_TK1 = noisy_TE.topk(self.top_k + 1, dim=-1).values
        kth_TE = top_TK1[:, self.top_k - 1 : self.top_k]
        kth_plus_TE = top_TK1[:, self.top_k : self.top_k + 1]
        in_top = noisy_TE >= kth_TE
        threshold_TE = torch.where(in_top, kth_plus_TE, kth_TE)
        return torch.special.ndtr((clean_TE - threshold_TE) / std_TE.clamp_min(1e-20))


class DeepSeekRouter(Router):
    """DeepSeek routing: sigmoid (V3) or softmax (V2) affinities, group-limited top-k, selection bias.

    DeepSeek-V3 (arXiv 2412.19437, §2.1.2): s = sigmoid(u W); experts are split into `n_group` groups, a group is
    scored by the sum of its top-2 (biased) scores, a token may use only the `topk_group` best groups, and picks its
    top-k experts among them by s + b. The combine weights come from the unbiased s, renormalised over the k when
    `norm_topk_prob`, then multiplied by `routed_scaling_factor`. DeepSeek-V2 ("group_limited_greedy") uses
    softmax affinities and scores a group by its best expert.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.score_func, self.n_group, self.topk_group = config.score_func, config.n_group, config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None) -> RouterOutput:
        logits_TE = self.compute_logits(x_TD)
        if self.score_func == "sigmoid":
            affinity_TE = logits_TE.sigmoid()
            probs_TE = affinity_TE / affinity_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        else:
            affinity_TE = probs_TE = logits_TE.softmax(dim=-1)
        scores_TE = self.biased(affinity_TE)
        if self.n_group > 1 and self.topk_group < self.n_group:
            scores_TE = limit_to_top_groups(scores_TE, self.n_group, self.topk_group, self.score_func == "sigmoid")
        indices_TK = scores_TE.topk(self.top_k, dim=-1).indices
        weights_TK = self.renormalize(affinity_TE.gather(1, indices_TK)) * self.routed_scaling_factor
        return RouterOutput(weights_TK, indices_TK, logits_TE, probs_TE, scores_TE.detach())


def limit_to_top_groups(scores_TE: Tensor, n_group: int, topk_group: int, top2_sum: bool) -> Tensor:
    """Set the scores of experts outside each token's `topk_group` best groups to -inf.

    A group is scored by the sum of its two best experts (DeepSeek-V3) or by its best expert (DeepSeek-V2).
    """
    T, E = scores_TE.shape
    grouped_TGX = scores_TE.view(T, n_group, E // n_group)
    if top2_sum:
        group_scores_TG = grouped_TGX.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores_TG = grouped_TGX.amax(dim=-1)
    top_groups_TX = group_scores_TG.topk(topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TX, True)
    return grouped_TGX.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert picks its top-C tokens by softmax affinity.

    Every expert is filled exactly (C = ceil(capacity_factor * T * K / E), capacity_factor defaulting to 1, so K is
    the average number of experts per token); a token may get any number of experts, including none.
    NOT CAUSAL: whether a token is picked depends on the other tokens of the batch, future ones included, so an
    autoregressive model routed this way sees the future at training time and cannot decode token by token the way
    it was trained.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.capacity_factor = 1.0 if config.capacity_factor is None else config.capacity_factor
        self.min_capacity = config.min_capacity

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, max(self.min_capacity, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)))

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None) -> RouterOutput:
        logits_TE = self.compute_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        num_valid = x_TD.shape[0] if mask_T is None else int(mask_T.sum())
        capacity = self.capacity(num_valid) if num_valid else 0
        choice_ET = probs_TE.t()
        if mask_T is not None:
            choice_ET = choice_ET.masked_fill(~mask_T, -1.0)  # padding is never picked: probabilities are >= 0
        top = choice_ET.topk(capacity, dim=-1)
        weights_EC = probs_TE.t().gather(1, top.indices)
        return RouterOutput(weights_EC, top.indices, logits_TE, probs_TE, None, expert_choice=True)


class TopPRouter(Router):
    """Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts").

    Each token takes its experts in order of probability until their mass reaches `top_p`, at least one and at most
    `top_k`; unused slots are empty (-1). Weights are the softmax probabilities, renormalised over the chosen experts
    when `norm_topk_prob`.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.top_p = config.top_p

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None) -> RouterOutput:
        logits_TE = self.compute_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        scores_TE = self.biased(probs_TE)
        indices_TK = scores_TE.topk(self.top_k, dim=-1).indices
        chosen_TK = probs_TE.gather(1, indices_TK)
        mass_before_TK = chosen_TK.cumsum(dim=-1) - chosen_TK
        keep_TK = mass_before_TK < self.top_p  # the first slot always has mass_before = 0
        keep_TK[:, 0] = True
        weights_TK = self.renormalize(chosen_TK * keep_TK)
        indices_TK = indices_TK.masked_fill(~keep_TK, -1)
        return RouterOutput(weights_TK, indices_TK, logits_TE, probs_TE, scores_TE.detach())


class HashRouter(Router):
    """Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a fixed token-id -> expert map.

    No learned parameters decide the route: slot j of a token goes to expert (hash(id) + j) mod E, so the K experts
    of a token are distinct; each gets weight 1/K. Needs the token ids. The `weight` matrix is kept only so that the
    router logits, z-loss and statistics remain defined; it does not affect routing.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.hash_seed = config.hash_seed

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None) -> RouterOutput:
        if token_ids_T is None:
            raise ValueError("the hash router needs token_ids (the integer ids of the tokens being routed); got None")
        if token_ids_T.shape != x_TD.shape[:1]:
            raise ValueError(f"token_ids has shape {tuple(token_ids_T.shape)}, expected ({x_TD.shape[0]},) to match the tokens")
        logits_TE = self.compute_logits(x_TD)
        base_T = hash_token_ids(token_ids_T, self.hash_seed) % self.num_experts
        offsets_K = torch.arange(self.top_k, device=x_TD.device)
        indices_TK = (base_T.unsqueeze(1) + offsets_K) % self.num_experts
        weights_TK = torch.full(indices_TK.shape, 1.0 / self.top_k, device=x_TD.device, dtype=logits_TE.dtype)
        probs_TE = torch.zeros_like(logits_TE).scatter_(1, indices_TK, weights_TK)
        return RouterOutput(weights_TK, indices_TK, logits_TE, probs_TE, probs_TE)


def hash_token_ids(ids: Tensor, seed: int = 0) -> Tensor:
    """A fixed, well-mixed 32-bit integer hash of token ids (the "lowbias32"-style mix), as int64 >= 0."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be an integer tensor, got dtype {ids.dtype}")
    mask = 0xFFFFFFFF
    h = (ids.long() + seed * 0x9E3779B9) & mask
    h = ((h >> 16) ^ h) * 0x45D9F3B & mask
    h = ((h >> 16) ^ h) * 0x45D9F3B & mask
    return (h >> 16) ^ h


class HierarchicalRouter(Router):
    """Two-level routing: a group router picks `topk_group` of `n_group` expert groups, then an expert router picks
    the top-k experts inside the chosen groups.

    p(e) = p(group(e)) * p(e | group(e)), each a softmax at its level (in the spirit of Shazeer et al. 2017 §B,
    "hierarchical MoE"); combine weights are p(e) at the chosen experts, renormalised when `norm_topk_prob`.
    Groups are ranked by p(group) plus the sum of their experts' selection biases, if any.
    `logits` are the expert-level logits (the z-loss sees those).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.group_weight = nn.Parameter(torch.empty(config.n_group, config.d_model))
        nn.init.uniform_(self.group_weight, -1 / math.sqrt(config.d_model), 1 / math.sqrt(config.d_model))

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None) -> RouterOutput:
        T = x_TD.shape[0]
        logits_TE = self.compute_logits(x_TD)
        group_probs_TG = F.linear(x_TD.to(logits_TE.dtype), self.group_weight.to(logits_TE.dtype)).softmax(dim=-1)
        within_TGX = logits_TE.view(T, self.n_group, -1).softmax(dim=-1)
        probs_TE = (group_probs_TG.unsqueeze(-1) * within_TGX).view(T, self.num_experts)
        # A group's score is the sum of its experts' (biased) scores: p(group) itself when there is no selection
        # bias, and with one, the aux-loss-free balancer can move load between groups, not only inside them.
        scores_TGX = self.biased(probs_TE).view(T, self.n_group, -1)
        top_groups_TX = scores_TGX.sum(dim=-1).topk(self.topk_group, dim=-1).indices
        keep_TG = torch.zeros_like(group_probs_TG, dtype=torch.bool).scatter_(1, top_groups_TX, True)
        scores_TE = scores_TGX.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, self.num_experts)
        indices_TK = scores_TE.topk(self.top_k, dim=-1).indices
        weights_TK = self.renormalize(probs_TE.gather(1, indices_TK))
        return RouterOutput(weights_TK, indices_TK, logits_TE, probs_TE, scores_TE.detach())


class SparseMixerRouter(Router):
    """SparseMixer top-2 routing (Liu et al. 2024, "GRIN: GRadient-INformed MoE", arXiv 2409.12136; PhiMoE).

    Two rounds, each choosing one expert. In a round, with m the best logit among the experts still available, an
    expert stays in the running only when (m - s) / max(|s|, m) <= 2 * eps (`sparsemixer_eps`; the relative gap of
    its logit s to the best, the threshold always read against the token's unmasked logits); the round's expert is
    the best one (eval) or a sample from the softmax over the experts left in the running (training, Gumbel-max), and
    its weight is its probability under that softmax. The second round runs with the first round's expert removed.
    In training, the weight of a sampled expert that is not the round's argmax is scaled by 1/3 (0.3333) except
    with probability 1/4, and the gradient is that of the unscaled probability: SparseMixer's Heun third-order
    (midpoint) estimate of the routing gradient, as in the PhiMoE reference code.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.eps = config.sparsemixer_eps

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None) -> RouterOutput:
        logits_TE = self.compute_logits(x_TD)
        first_T1, weight1_T1 = self._round(logits_TE, logits_TE)
        remaining_TE = logits_TE.scatter(1, first_T1, float("-inf"))
        second_T1, weight2_T1 = self._round(logits_TE, remaining_TE)
        indices_TK = torch.cat((first_T1, second_T1), dim=1)
        weights_TK = torch.cat((weight1_T1, weight2_T1), dim=1)
        return RouterOutput(weights_TK, indices_TK, logits_TE, logits_TE.softmax(dim=-1), logits_TE.detach())

    def _round(self, logits_TE: Tensor, available_TE: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            best_T1, argmax_T1 = available_TE.max(dim=-1, keepdim=True)
            gap_TE = (best_T1 - logits_TE) / logits_TE.abs().clamp(min=best_T1)
            out_TE = gap_TE > 2 * self.eps
        masked_TE = available_TE.masked_fill(out_TE, float("-inf"))
        probs_TE = masked_TE.softmax(dim=-1)
        if not self.training:
            return argmax_T1, probs_TE.gather(1, argmax_T1)
        with torch.no_grad():  # Gumbel-max: the argmax of logits + Gumbel noise is a sample of their softmax
            gumbel_TE = -torch.empty_like(masked_TE).exponential_().log()
            chosen_T1 = (masked_TE + gumbel_TE).argmax(dim=-1, keepdim=True)
            keep_T1 = (chosen_T1 == probs_TE.argmax(dim=-1, keepdim=True)) | (torch.rand_like(best_T1) > 0.75)
            scale_T1 = 0.3333 + 0.6667 * keep_T1.to(probs_TE.dtype)
        weight_T1 = probs_TE.gather(1, chosen_T1)
        return chosen_T1, weight_T1 + (weight_T1 * (scale_T1 - 1.0)).detach()  # value p * scale, gradient of p


ROUTER_CLASSES: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "deepseek": DeepSeekRouter,
    "expert_choice": ExpertChoiceRouter,
    "top_p": TopPRouter,
    "hash": HashRouter,
    "hierarchical": HierarchicalRouter,
    "sparsemixer": SparseMixerRouter,
}
assert tuple(ROUTER_CLASSES) == ROUTERS


def build_router(config: MoEConfig) -> Router:
    """The router named by `config.router`."""
    if config.router not in ROUTER_CLASSES:
        raise ValueError(f"unknown router {config.router!r}: expected one of {', '.join(map(repr, ROUTER_CLASSES))}")
    return ROUTER_CLASSES[config.router](config)
